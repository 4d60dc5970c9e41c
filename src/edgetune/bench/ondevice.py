"""`edgetune bench ondevice`: fine-tuning through an inference runtime against PyTorch,
and what each export format costs and runs at.

SmolLM2-135M on the demo's task (BBC News, 5 topics, max_length 64, 150 held-out
articles), LoRA rank 8 on q_proj and v_proj, batch 16, q = 2 directions, the same number
of steps for every row:
  PyTorch eager    `edgetune finetune --method zo|prge`
  ONNX Runtime     `edgetune ondevice --runtime ort` on `export --format onnx --lora-rank 8`
  ExecuTorch       `edgetune ondevice --runtime executorch` on `export --format executorch`
Each run is its own process with the same --threads, so its peak RSS is its own. Step time
is the mean of the steps after the first (timing.jsonl), evaluation excluded. Accuracy
after the same steps is quoted for every seed of --seeds on the zo rows (the seed draws the data split,
batch order, LoRA init and directions together; PyTorch and the runtime start from
different random A, so equal-seed rows are not the same trajectory).

Exports: time and file size per format (onnx, executorch, gguf f32 / q8_0 / q4_0), and
llama.cpp's greedy decode rate and prefill latency per GGUF type against PyTorch's, with
`compress/speed.py`'s protocol (batch 1; 128-token prefill; 32 tokens after an 8-token
prompt; median of 3).
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from edgetune.bench.markdown import machine_line, write_section
from edgetune.export.gguf import GGUF_TYPES
from edgetune.recipes.finetune import run_in_subprocess
from edgetune.runs import read_jsonl

DATA = [
    "--dataset",
    "bbc-news",
    "data.eval_size=150",
    "data.max_length=64",
    "train.eval_batch_size=16",
]
TRAIN = ["--batch-size", "16", "--queries", "2", "--lr", "2e-3", "train.eval_at_start=false"]
PYTORCH_LORA = "peft.target_modules=[q_proj,v_proj]"  # the runtimes' graphs fix theirs
TARGETS = "lora_targets=[q_proj,v_proj]"  # ExecuTorch lowering time grows with the slots
RUNTIMES = ("pytorch", "ort", "executorch")
LABELS = {"pytorch": "PyTorch eager", "ort": "ONNX Runtime", "executorch": "ExecuTorch (XNNPACK)"}
EXPORT = {
    "onnx": ["--format", "onnx", "--lora-rank", "8", TARGETS, "--logits", "last"],
    # an ExecuTorch program runs at its limits: one for MeZO (1 copy), one for P-RGE (2q)
    **{
        f"executorch-{method}": [
            "--format", "executorch", "--lora-rank", "8", TARGETS, "--logits", "last",
            "--max-copies", str(copies), "--max-batch", "16", "--max-seq", "64",
        ]
        for method, copies in (("zo", 1), ("prge", 4))
    },
}  # fmt: skip


def run(
    model: str, output: str, work: str, threads: int, steps: int, seeds: list[int]
) -> list[dict]:
    """Export, train every row, measure llama.cpp, and write the section; returns the rows."""
    root = Path(work)
    root.mkdir(parents=True, exist_ok=True)
    (root / "rows.jsonl").unlink(missing_ok=True)
    exports = {fmt: timed_export(root / fmt, model, args, threads) for fmt, args in EXPORT.items()}
    ggufs = {
        q: timed_export(root / f"gguf-{q}", model, ["--format", "gguf", "--gguf-type", q], threads)
        for q in GGUF_TYPES
    }
    rows = []
    for method in ("zo", "prge"):
        for runtime in RUNTIMES:
            for seed in seeds if method == "zo" else seeds[:1]:
                name = f"{method}-{runtime}-s{seed}"
                print(f"[bench ondevice] {name}", flush=True)
                folder = root / name
                args = [*DATA, *TRAIN, "--method", method, "--seed", str(seed), "--steps", str(steps),
                        f"train.eval_every={steps}", "--threads", str(threads)]  # fmt: skip
                if runtime == "pytorch":
                    run_in_subprocess(folder, model, [*args, PYTORCH_LORA], quiet=True)
                else:
                    export = exports["onnx" if runtime == "ort" else f"executorch-{method}"]
                    args = ["--runtime", runtime, *args]
                    run_in_subprocess(
                        folder, str(export["folder"]), args, quiet=True, command="ondevice"
                    )
                rows.append(
                    {"method": method, "runtime": runtime, "seed": seed, **run_figures(folder)}
                )
                with (root / "rows.jsonl").open("a") as f:
                    f.write(json.dumps(rows[-1]) + "\n")
    speeds = decode_speeds(model, ggufs, threads)
    body = render(rows, exports, ggufs, speeds, model, threads, steps, seeds)
    write_section(output, "ondevice", body)
    print(body)
    return rows


def timed_export(out: Path, model: str, args: list[str], threads: int) -> dict[str, Any]:
    """`edgetune export` in its own process; its time, files and sizes. An export this
    benchmark already made in `out` (with its recorded time) is reused: SmolLM2's
    ExecuTorch programs take minutes each."""
    record = out / "bench.json"
    if not record.exists():
        shutil.rmtree(out, ignore_errors=True)
        print(f"[bench ondevice] export {' '.join(args)}", flush=True)
        start = time.perf_counter()
        cmd = [*args, "--threads", str(threads)]
        run_in_subprocess(out, model, cmd, quiet=True, command="export", overwrite=False)
        record.write_text(json.dumps({"export_s": time.perf_counter() - start}))
    manifest = json.loads((out / "export.json").read_text())
    files = {name: (out / name).stat().st_size for name in manifest["files"].values()}
    export_s = json.loads(record.read_text())["export_s"]
    return {"folder": out, "export_s": export_s, "files": files, "facts": manifest["facts"]}


def run_figures(folder: Path) -> dict[str, float]:
    """Mean step time after the first step, peak RSS and final held-out accuracy."""
    summary = json.loads((folder / "summary.json").read_text())
    timing = [row["step_s"] for row in read_jsonl(folder / "timing.jsonl")]
    return {
        "step_s": statistics.mean(timing[1:]),
        "peak_rss_mb": summary["peak_rss_mb"],
        "accuracy": summary["eval/accuracy"],
    }


def decode_speeds(model: str, ggufs: dict[str, dict], threads: int) -> dict[str, dict]:
    """PyTorch's and llama.cpp's (per GGUF type) prefill ms and decode tokens/s."""
    import torch

    from edgetune import models
    from edgetune.compress.speed import measure_speed, prefill_ids

    torch.set_num_threads(threads)
    base, _ = models.load(model)
    ids = prefill_ids(base.config.vocab_size, 0)
    speeds = {"pytorch": measure_speed(base, ids, repeats=3)}
    del base
    for quant, info in ggufs.items():
        gguf = info["folder"] / next(iter(info["files"]))
        speeds[quant] = llama_cpp_speed(gguf, ids[0].tolist(), threads)
    return speeds


def llama_cpp_speed(gguf: Path, ids: list[int], threads: int, repeats: int = 3) -> dict[str, float]:
    """`measure_speed`'s protocol in llama.cpp: prefill latency over `ids`, greedy decode
    rate of 32 tokens after the first 8."""
    import numpy as np
    from llama_cpp import Llama

    from edgetune.compress.speed import DECODE_TOKENS, PROMPT_TOKENS

    llm = Llama(str(gguf), n_ctx=256, n_threads=threads, n_batch=256, verbose=False)
    prefill, decode = [], []
    try:
        for _ in range(repeats):
            llm.reset()
            start = time.perf_counter()
            llm.eval(ids)
            prefill.append(time.perf_counter() - start)
            llm.reset()
            llm.eval(ids[:PROMPT_TOKENS])
            start = time.perf_counter()
            for _ in range(DECODE_TOKENS):
                llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
            decode.append(DECODE_TOKENS / (time.perf_counter() - start))
    finally:
        llm.close()
    return {
        "prefill_ms": 1000 * statistics.median(prefill),
        "decode_tokens_per_s": statistics.median(decode),
    }


def render(
    rows: list[dict],
    exports: dict,
    ggufs: dict,
    speeds: dict,
    model: str,
    threads: int,
    steps: int,
    seeds: list[int],
) -> str:
    """The BENCHMARKS.md section: training table with ratios to PyTorch, exports, llama.cpp."""
    lines = [
        "## On-device fine-tuning through the runtime (`edgetune bench ondevice`)",
        "",
        f"Command: `edgetune bench ondevice --threads {threads}` ({steps} steps, seeds "
        f"{','.join(map(str, seeds))}). Machine: {machine_line()}. Model {model}, BBC News "
        "(5 topics, 150 held-out articles, max_length 64), LoRA rank 8 on q_proj and v_proj, "
        "batch 16, q = 2; every row its own process.",
        "",
        "| method | engine | seed | step (s) | vs PyTorch | peak RSS (MB) | vs PyTorch | held-out accuracy |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ref = next(
            x
            for x in rows
            if x["method"] == r["method"] and x["runtime"] == "pytorch" and x["seed"] == r["seed"]
        )
        lines.append(
            f"| {r['method']} | {LABELS[r['runtime']]} | {r['seed']} | {r['step_s']:.3f} | "
            f"{r['step_s'] / ref['step_s']:.2f}x | {r['peak_rss_mb']:.0f} | "
            f"{r['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x | {r['accuracy']:.3f} |"
        )
    lines += [
        "",
        "| export | time (s) | files (MB) | parity with PyTorch (max abs logit diff) |",
        "|---|---:|---|---:|",
    ]
    for name, info in [*exports.items(), *((f"gguf {q}", i) for q, i in ggufs.items())]:
        files = ", ".join(f"{f} {b / 1e6:.1f}" for f, b in info["files"].items())
        parity = info["facts"].get("parity_max_abs")
        lines.append(
            f"| {name} | {info['export_s']:.1f} | {files} | {'' if parity is None else f'{parity:.1e}'} |"
        )
    lines += [
        "",
        "| engine | prefill ms (1 x 128) | decode tokens/s | decode vs PyTorch |",
        "|---|---:|---:|---:|",
    ]
    ref = speeds["pytorch"]["decode_tokens_per_s"]
    for name, s in speeds.items():
        label = "PyTorch eager (fp32)" if name == "pytorch" else f"llama.cpp {name.upper()}"
        lines.append(
            f"| {label} | {s['prefill_ms']:.1f} | {s['decode_tokens_per_s']:.1f} | {s['decode_tokens_per_s'] / ref:.2f}x |"
        )
    return "\n".join(lines)
