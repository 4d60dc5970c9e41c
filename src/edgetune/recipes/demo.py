"""`edgetune demo` (what `make demo` runs): zero-shot vs ZO LoRA vs first-order LoRA.

On SmolLM2-135M and BBC News (5 topics), with no network: evaluate the model zero-shot
on held-out articles, fine-tune LoRA with MeZO (forward passes only) and with backprop,
and compare held-out accuracy, peak memory and time side by side. Each fine-tune runs as
its own `edgetune finetune` process, so its peak memory is its own. The ending compresses
the first-order model (`edgetune compress` on its adapter) and compares size, speed and
accuracy before and after, then exports it to GGUF and runs it in llama.cpp. Results: a table in the terminal and `OUT/report.md` +
`OUT/accuracy.png`; each run's directory is under `OUT/zo`, `OUT/fo` and `OUT/compress`.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from edgetune.recipes.finetune import run_in_subprocess
from edgetune.report.run_info import short_name
from edgetune.runs import RunDir

# Shared by both runs: same data, split, seed and eval set, so only the method differs.
COMMON = [
    "--dataset",
    "bbc-news",
    "--seed",
    "0",
    "data.eval_size=150",
    "data.max_length=64",
    "train.eval_batch_size=25",
]
# The zeroth-order run, by `edgetune demo --zo`. The default, prge-top6: P-RGE with q=4
# directions on b=4 examples, LoRA on the top 6 of SmolLM2's 30 blocks, so the 24 below run
# once per step for all 8 perturbed copies (the shared trunk). `edgetune bench zo` measured
# it against the former default (mezo: MeZO q=1 on 16 examples, all blocks): 3.4x faster
# per step; it reaches mezo's final accuracy 1.6x (seed 0) and 3.6x (seed 1) sooner and
# ends higher in less time, though it learns less per step. Its step size is the largest
# that stayed stable there (1e-2 diverged). prge: P-RGE q=4 on all blocks.
MEZO = [
    "--method",
    "zo",
    "--peft",
    "lora",
    "--steps",
    "60",
    "--batch-size",
    "16",
    "--lr",
    "2e-3",
    "zo.eps=1e-3",
    "train.eval_every=30",
]
PRGE = ["--method", "prge", "--queries", "4", "--batch-size", "4"]
ZO = {
    "prge-top6": [
        *PRGE,
        "--peft",
        "lora",
        "peft.layers=top:6",
        "--steps",
        "120",
        "--lr",
        "5e-3",
        "zo.eps=1e-3",
        "train.eval_every=40",
    ],
    "mezo": MEZO,
    "prge": [*MEZO, *PRGE],  # later flags win
}
ZO_LABELS = {
    "prge-top6": "ZO LoRA (P-RGE q=4, top 6 blocks)",
    "mezo": "ZO LoRA (MeZO)",
    "prge": "ZO LoRA (P-RGE, q=4)",
}
FULL = {
    "zo": ZO["prge-top6"],
    "fo": [
        "--method",
        "fo",
        "--peft",
        "lora",
        "--steps",
        "30",
        "--batch-size",
        "8",
        "--lr",
        "5e-4",
        "train.eval_every=30",
        "train.eval_at_start=false",
    ],
}
# Tiny settings for the CLI test: the real pipeline on stories260K in seconds.
QUICK_COMMON = [
    "--dataset",
    "sst2",
    "--seed",
    "0",
    "data.eval_size=32",
    "data.train_size=256",
    "data.max_length=32",
]
QUICK = {
    "zo": ["--method", "zo", "--steps", "6", "--batch-size", "8", "train.eval_every=3"],
    "fo": [
        "--method",
        "fo",
        "--steps",
        "6",
        "--batch-size",
        "8",
        "train.eval_every=3",
        "train.eval_at_start=false",
    ],
}
# The ending: `edgetune compress` of the first-order model (its adapter), on the same data.
# int8 (adapter merged first): ~4x smaller linear weights at about no accuracy cost; 20 %
# pruning without recovery cost 52 points here (0.90 -> 0.38), and recovery steps do not
# fit the demo's time.
COMPRESS = ["--quantize", "int8-dynamic"]
QUICK_COMPRESS = COMPRESS  # the same path as the full demo, on the tiny model
# The tiny model's --zo variants: flags added to QUICK["zo"] (stories260K has 5 blocks).
QUICK_ZO = {"prge-top6": [*PRGE, "peft.layers=top:2"], "mezo": [], "prge": PRGE}
LABELS = {"fo": "first-order LoRA"}
# The federated part: FedIT over a mixed fleet of 5 devices; `fed.method=auto` gives each
# the cheapest method that fits its memory (the phone cannot backprop SmolLM2: it runs
# P-RGE and uploads seeds; the others send LoRA deltas). Two rounds: each round ends
# with an evaluation of the 150 held-out articles (~19 s here), and the demo keeps to
# its 10 minutes.
FED = [
    "--algorithm",
    "fedit",
    "--method",
    "auto",
    "--fleet",
    "mixed",
    "--clients",
    "5",
    "--participation",
    "1.0",
    "--partition",
    "dirichlet:0.5",
    "--rounds",
    "2",
    "--local-steps",
    "3",
    "--batch-size",
    "4",
    "--lr",
    "5e-4",
]
# The deployment: the first-order model, its adapter merged, as a Q8_0 GGUF that
# llama.cpp runs standalone; it then classifies a few held-out articles by continuing
# their prompts (skipped with a line saying so when llama.cpp's binding is missing).
GGUF = ["--format", "gguf", "--merge", "--gguf-type", "q8_0"]
LLAMA_ARTICLES = 10
QUICK_FED = [
    "--algorithm",
    "fedit",
    "--method",
    "auto",
    "--fleet",
    "mixed",
    "--clients",
    "3",
    "--participation",
    "1.0",
    "--rounds",
    "1",
    "--local-steps",
    "2",
    "--batch-size",
    "4",
]


def run(
    out: str, model: str = "smollm2-135m", quick: bool = False, zo: str = "prge-top6"
) -> dict[str, Any]:
    """Run the demo and write its report; returns the per-run summaries.

    Args:
        out: the demo's folder.
        model: the model spec.
        quick: tiny settings (tests).
        zo: the zeroth-order run, a key of `ZO`: "prge-top6" (P-RGE q=4 on the top 6
            blocks, shared trunk), "mezo" (sequential MeZO, all blocks) or "prge" (P-RGE
            q=4, all blocks).
    """
    from edgetune.report.plots import plot_metric

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    common, runs = (QUICK_COMMON, dict(QUICK)) if quick else (COMMON, dict(FULL))
    runs["zo"] = [*runs["zo"], *QUICK_ZO[zo]] if quick else ZO[zo]
    labels = {"zo": ZO_LABELS[zo], **LABELS}
    start = time.perf_counter()
    for name, args in runs.items():
        print(f"\n=== demo: {labels[name]} ===", flush=True)
        run_in_subprocess(root / name, model, [*common, *args])
    summaries = {n: json.loads((root / n / "summary.json").read_text()) for n in runs}
    metrics = {n: RunDir(root / n, resume=True).read_metrics() for n in runs}
    # The FO run skips its step-0 evaluation: it is the same model and eval set as ZO's.
    zero_shot = summaries["zo"]["initial_eval"]
    metrics["fo"] = [{"step": 0, **zero_shot}, *metrics["fo"]]
    key = "eval/accuracy" if "eval/accuracy" in zero_shot else "eval/loss"
    dataset = common[common.index("--dataset") + 1]
    plot_metric(
        {labels[n]: rows for n, rows in metrics.items()},
        key,
        root / "accuracy.png",
        title=f"{short_name(model)} on {dataset}: zero-shot vs ZO LoRA vs first-order LoRA",
    )
    compress_args = [*compress_data(common), *(QUICK_COMPRESS if quick else COMPRESS)]
    compressed = compress_fo(root, model, compress_args)
    print("\n=== demo: federated FedIT over a mixed fleet ===", flush=True)
    fed_args = [*common, *(QUICK_FED if quick else FED)]
    run_in_subprocess(root / "fed", model, fed_args, command="federate")
    fed_section = federated_section(root / "fed", key)
    deployed = deploy_fo(root, model)
    configs = {n: RunDir(root / n, resume=True).read_config() for n in runs}
    table = render(summaries, zero_shot, key, model, time.perf_counter() - start, labels, configs)
    (root / "report.md").write_text(
        table
        + "\n\n![accuracy against steps](accuracy.png)\n\n"
        + compressed
        + "\n\n"
        + fed_section
        + "\n\n"
        + deployed
        + "\n"
    )
    print("\n" + compressed)
    print("\n" + fed_section)
    print("\n" + deployed)
    print("\n" + table)
    print(f"\nreport: {root / 'report.md'}  plot: {root / 'accuracy.png'}")
    return summaries


def render(
    summaries: dict[str, dict],
    zero_shot: dict,
    key: str,
    model: str,
    wall: float,
    labels: dict[str, str],
    configs: dict[str, dict],
) -> str:
    """The side-by-side Markdown table, after what was run."""
    name = key.split("/")[1]
    lines = [
        f"# edgetune demo: {short_name(model)}, zero-shot vs ZO LoRA vs first-order LoRA",
        "",
        *settings(summaries, configs, labels),
        "",
        f"| method | held-out {name} | steps | trainable params | peak RSS (MB) | wall time (s) |",
        "|---|---:|---:|---:|---:|---:|",
        f"| zero-shot | {zero_shot[key]:.3f} | 0 | 0 | | |",
    ]
    for n, s in summaries.items():
        lines.append(
            f"| {labels[n]} | {s[key]:.3f} | {s['steps']} | {s['trainable_params']:,} | "
            f"{s['peak_rss_mb']:.0f} | {s['wall_s']:.1f} |"
        )
    lines += [
        "",
        f"Held-out examples: {summaries['zo']['eval_examples']}; total demo time {wall:.1f} s.",
    ]
    return "\n".join(lines)


def settings(summaries: dict[str, dict], configs: dict[str, dict], labels: dict) -> list[str]:
    """Markdown bullets: the data, seed, and each fine-tune's method and length."""
    data = next(iter(configs.values()))["data"]
    first = next(iter(summaries.values()))
    lines = [
        f"- **data**: {data['dataset']}, {first['train_examples']:,} training examples, "
        f"{first['eval_examples']:,} held-out, at most {data['max_length']} tokens each; "
        f"seed {next(iter(configs.values()))['seed']}",
    ]
    for n, cfg in configs.items():
        peft, train, optim = cfg["peft"], cfg["train"], cfg["optim"]
        blocks = (
            "" if peft["layers"] == "all" else f" on the {peft['layers'].replace(':', ' ')} blocks"
        )
        lines.append(
            f"- **{labels[n]}**: {peft['method']} rank {peft['rank']}{blocks}, "
            f"{train['steps']} steps of batch {train['batch_size']}, learning rate {optim['lr']}"
        )
    return lines


def compress_data(common: list[str]) -> list[str]:
    """The demo's data settings as `edgetune compress` takes them (no train.* section)."""
    return [a for a in common if not a.startswith("train.")]


def compress_fo(root: Path, model: str, args: list[str]) -> str:
    """Compress the first-order model into `root/compress`; returns the report section.

    The previous demo's compress run is removed first: compress never replaces a run,
    and the demo's other runs are re-run with --overwrite too.
    """
    print("\n=== demo: compress the first-order model ===", flush=True)
    out = root / "compress"
    shutil.rmtree(out, ignore_errors=True)
    adapter = ["--adapter", str(root / "fo" / "adapter")]
    run_in_subprocess(out, model, [*args, *adapter], command="compress", overwrite=False)
    return compress_section(out)


def compress_section(run: Path) -> str:
    """The demo report's compression part: size, speed and accuracy before and after."""
    rd = RunDir(run, resume=True)
    summary = json.loads((run / "summary.json").read_text())
    stages = [m for m in rd.read_metrics() if "stage" in m]
    first, last = stages[0], stages[-1]
    key = "eval/accuracy" if "eval/accuracy" in first else "eval/loss"
    before, after = summary["before"], stage_speed(summary, last["stage"])
    size_before = summary["model_bytes_before"] or 4 * summary["params_before"]
    lines = [
        f"## Compressed: the first-order model, {what_was_done(rd.read_config())}",
        "",
        f"| model | parameters | size (MB) | prefill ms (batch 1 x 128) | decode tokens/s "
        f"| held-out {key.split('/')[1]} |",
        "|---|---:|---:|---:|---:|---:|",
        f"| before | {summary['params_before']:,} | {size_before / 1e6:.1f} | "
        f"{before['prefill_ms']:.1f} | {before['decode_tokens_per_s']:.1f} | {first[key]:.3f} |",
        f"| after ({last['stage']}) | {summary['params_after']:,} | "
        f"{summary['model_bytes_after'] / 1e6:.1f} | {after['prefill_ms']:.1f} | "
        f"{after['decode_tokens_per_s']:.1f} | {last[key]:.3f} |",
        "",
        f"Speed: {before['prefill_ms'] / after['prefill_ms']:.2f}x prefill, "
        f"{after['decode_tokens_per_s'] / before['decode_tokens_per_s']:.2f}x decode, "
        "measured one after the other in the compress process. Size: the model folder's "
        f"files on disk (weights, config, tokenizer). Wall "
        f"{summary['wall_s']:.1f} s, peak RSS {summary['peak_rss_mb']:.0f} MB.",
    ]
    quant = summary.get("after-quantize")
    if quant:
        before_mb, after_mb = (quant[f"linear_weight_bytes_{k}"] / 1e6 for k in ("before", "after"))
        on_disk = quant.get("weights_on_disk", "int8")
        lines.append(
            f"Linear weights in memory: {before_mb:.1f} MB fp32 -> {after_mb:.1f} MB int8 "
            f"({before_mb / after_mb:.2f}x smaller); weights on disk: {on_disk}."
        )
    return "\n".join(lines)


def stage_speed(summary: dict, stage: str) -> dict:
    """The speed measured for `stage` of a compress summary: the stage's own, else that
    of the model it left unchanged in shape (recovery trains a LoRA beside the pruned
    weights, so its speed is the pruned model's)."""
    for key in (stage, "after", "after-prune", "before"):
        if "prefill_ms" in summary.get(key, {}):
            return summary[key]
    raise KeyError(f"no speed measured for {stage} in the compress summary")


def what_was_done(cfg: dict) -> str:
    """'pruned 20 % (mlp,heads) + fo recovery, 5 steps + int8' from a compress config."""
    parts = []
    prune = cfg.get("prune", {})
    if prune.get("ratio"):
        parts.append(f"pruned {round(100 * prune['ratio'])} % ({prune['units']})")
    recover = cfg.get("recover", {})
    if recover.get("method", "none") != "none":
        distill = " with distillation" if recover.get("distill") else ""
        parts.append(f"{recover['method']} recovery{distill}, {recover['steps']} steps")
    if cfg.get("quantize", "none") != "none":
        parts.append(str(cfg["quantize"]))
    return " + ".join(parts)


def federated_section(run: Path, key: str) -> str:
    """The demo report's federated part: per-round metric and the per-device table."""
    from edgetune.report.federated import device_table, render

    render(run)  # run/report.md and its plots
    rd = RunDir(run, resume=True)
    rows = [r for r in rd.read_metrics() if "round" in r]
    summary = json.loads((run / "summary.json").read_text())
    trail = " -> ".join(f"{r[key]:.3f}" for r in rows)
    lines = [
        "## Federated: FedIT over a mixed fleet (fed.method=auto)",
        "",
        f"Held-out {key.split('/')[1]} by round: {trail}; uploaded {summary['bytes_up']:,} "
        f"bytes, downloaded {summary['bytes_down']:,}; simulated time {summary['sim_s']:.1f} s; "
        f"wall {summary['wall_s']:.1f} s. Full report: fed/report.md.",
        "",
        *device_table(rd.read_metrics("clients.jsonl"), summary["command"]),
        "",
        "Memory: the estimate is per device; the measured peak is the simulator process's "
        "(every simulated client runs in it), not a device's.",
    ]
    return "\n".join(lines)


def deploy_fo(root: Path, model: str) -> str:
    """Export the first-order model (adapter merged) to a Q8_0 GGUF in `root/gguf` and let
    llama.cpp classify held-out articles with it; returns the report section."""
    from edgetune.export.manifest import read_manifest

    print("\n=== demo: the first-order model as GGUF, run by llama.cpp ===", flush=True)
    out = root / "gguf"
    shutil.rmtree(out, ignore_errors=True)  # export never replaces a folder
    adapter = ["--adapter", str(root / "fo" / "adapter")]
    run_in_subprocess(out, model, [*adapter, *GGUF], command="export", overwrite=False)
    gguf = out / read_manifest(out, verify=False).files["model"]
    lines = [
        "## Deployed: the first-order model as a GGUF file for llama.cpp",
        "",
        f"`{gguf}`: adapter merged, Q8_0 weights, tokenizer embedded "
        f"({gguf.stat().st_size / 1e6:.1f} MB).",
    ]
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        lines.append(
            "llama.cpp run skipped: its Python binding is not installed (make setup-test, "
            "or pip install 'edgetune[llama]'; it builds llama.cpp once, about 6 minutes)."
        )
        return "\n".join(lines)
    correct, shown = llama_cpp_articles(root, gguf)
    lines.append(
        f"llama.cpp, greedy, on {LLAMA_ARTICLES} held-out examples: {correct} of them continue "
        f"their prompt with the right label word. First: ...{shown!r}"
    )
    return "\n".join(lines)


def llama_cpp_articles(root: Path, gguf: Path) -> tuple[int, str]:
    """How many of the first held-out articles llama.cpp labels right (the first word of
    its greedy continuation of the prompt is the label's verbalizer word), and the first
    prompt's end with its continuation."""
    import torch
    from transformers import AutoTokenizer

    from edgetune.config import build
    from edgetune.data import DataConfig, build_task, load_splits
    from edgetune.export.llama_cpp import llama_cpp_generate

    cfg = RunDir(root / "fo", resume=True).read_config()
    data = build(DataConfig, cfg["data"])
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent / "tokenizer")
    splits = load_splits(data, cfg["seed"])
    task = build_task(splits, data, tokenizer)
    correct, shown = 0, ""
    for row in splits.eval[:LLAMA_ARTICLES]:
        prompt = tokenizer.decode(task.prompt_ids(row), skip_special_tokens=True)
        text = llama_cpp_generate(gguf, prompt, 3, threads=torch.get_num_threads())
        words = text.split()
        correct += bool(words) and words[0] == task.verbalizer[row["label"]].strip()
        shown = shown or prompt[-40:] + text
    return correct, shown
