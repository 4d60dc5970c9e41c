"""`edgetune bench compress`: what pruning, recovery and int8 cost in accuracy and buy in speed.

SmolLM2-135M on the demo's task (BBC News, 5 topics, max_length 64, seed 0, held-out
accuracy) and on TinyStories text (perplexity of a fixed slice). The base is first
fine-tuned with first-order LoRA exactly like the demo's FO run (or `--adapter` is used),
so accuracy is that of a task-tuned model; every compress run starts from that adapter.

Rows (one `edgetune compress` run can give several: its "after-prune" stage is the
no-recovery row of the run that then recovers):
  unpruned            the "before" stage (model + task adapter)
  R % pruned          mlp,heads at R in 10/20/30/50 %, "after-prune"
  R % + FO LoRA       first-order LoRA recovery, "after-recover"
  R % + FO + distill  FO recovery with the unpruned model as teacher
  30 % + ZO + distill zeroth-order recovery (forward passes only) with distillation
  int8 / 30 % + int8  "after-quantize"
  vocabulary (task)   the task's tokens kept (`--vocab task`, nearest kept token for
                      unseen input), "after-vocab"; + int8 and with the label tokens
                      alone as the head (`--vocab-head labels`) in runs of their own
and one memory line: ZO LoRA steps on the frozen int8 base against fp32 inference at the
same batch (`edgetune.bench.memory` children, each its own process).

Every compress / eval runs as its own process with explicit --threads, so each peak RSS
is that process's own. Speed ratios are taken inside one compress run (before and after
are measured in the same process, one after the other), never across runs. A second
seed (`--seeds 0,1`) repeats the base fine-tune and the 30 % runs with distillation on
that seed: the seed draws the data split and the recovery's randomness together, so a
seed keeps its own base adapter (its held-out rows stay held out).

Budget (2-core CPU, 2 threads): 150 held-out articles per evaluation (~20 s, three per
compress run), FO recovery 20 steps of batch 8 (~2.5 s each), ZO recovery 40 steps of
batch 16 with distillation (~4.5 s each), perplexity on 32 TinyStories blocks of 128
tokens, and HellaSwag acc_norm on 800 seeded tasks (about 3,200 sequences a model, the
largest cost of a row): estimated (from those step costs, not yet timed end to end) at
well over an hour with two seeds.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgetune.bench.int8_memory import LOSSES
from edgetune.bench.markdown import machine_line, write_section
from edgetune.errors import ConfigError
from edgetune.recipes.demo import COMMON, FULL, QUICK, QUICK_COMMON, compress_data, stage_speed
from edgetune.recipes.finetune import run_in_subprocess
from edgetune.runs import read_jsonl

RATIOS = (0.1, 0.2, 0.3, 0.5)
SEEDED_RATIO = 0.3  # the rows of the target get every --seeds value
FO_STEPS, ZO_STEPS = 20, 40
PERPLEXITY = ["--dataset", "tinystories", "data.eval_size=32", "data.max_length=128"]
MEMORY = ("16", "64", "3")  # batch, sequence length, timed steps of the int8 ZO line
QUICK_PERPLEXITY = ["--dataset", "tinystories", "data.eval_size=8", "data.max_length=32"]
QUICK_MEMORY = ("4", "32", "1")
# HellaSwag (acc_norm, 95 % interval ~ +-3.4 points at 800 tasks) on each saved model
HELLASWAG_TASKS, QUICK_HELLASWAG_TASKS = 800, 8
# Targets of issue 13.
PRUNE_SPEEDUP, PRUNE_LOSS = 1.3, 0.02
INT8_SMALLER, INT8_SPEEDUP, INT8_LOSS = 3.5, 1.4, 0.01
ZO_INT8_RSS = 0.6
# Targets of issue 29 (vocabulary pruning): the deployed file and resident size at most
# 40 % of the unpruned model's within 1 point (a model whose embedding dominates: Gemma 3
# 270M), and 1.2x faster prefill from the label head at no accuracy cost
VOCAB_SIZE_SHARE, VOCAB_LOSS, LABEL_HEAD_SPEEDUP = 0.4, 1.0, 1.2
# int8 weight-only (accurate, trainable under LoRA) and SmoothQuant + dynamic int8 (fast)
QUANT_KINDS = ("int8", "int8-dynamic")
# Task-aware vocabulary pruning (issue 29's targets): the task's tokens with the nearest
# kept token for unseen input, alone, with int8, and with the label tokens as the head
VOCAB = ["--vocab", "task", "vocab_oov=nearest"]
VOCAB_RUNS = {
    "vocab": ([*VOCAB], "vocabulary (task)", "after-vocab"),
    "vocab-int8": ([*VOCAB, "--quantize", "int8"], "vocabulary + int8", "after-quantize"),
    "vocab-labels": (
        [*VOCAB, "--vocab-head", "labels"],
        "vocabulary, label head",
        "after-vocab",
    ),
}


@dataclass(frozen=True)
class Run:
    """One `edgetune compress` run and the table rows (label, stage) it gives."""

    name: str
    args: list[str]
    rows: list[tuple[str, str]]
    seed: int = 0


@dataclass
class Settings:
    """Full or quick sizes."""

    model: str
    data: list[str]
    base: list[str]
    ratios: tuple[float, ...]
    fo_steps: int
    zo_steps: int
    perplexity: list[str]
    memory: tuple[str, str, str]
    threads: int
    seeds: list[int] = field(default_factory=lambda: [0])
    fo_batch: str = "recover.batch_size=8"
    zo_batch: str = "recover.batch_size=16"
    quick: bool = False


def settings(model: str, quick: bool, threads: int, seeds: list[int]) -> Settings:
    """The demo's data and FO run (full), or stories260K + SST-2 in seconds (quick)."""
    if quick:
        return Settings(
            model, QUICK_COMMON, QUICK["fo"], (0.3,), 2, 2, QUICK_PERPLEXITY, QUICK_MEMORY,
            threads, seeds, "recover.batch_size=4", "recover.batch_size=4", quick=True,
        )  # fmt: skip
    return Settings(
        model, COMMON, FULL["fo"], RATIOS, FO_STEPS, ZO_STEPS, PERPLEXITY, MEMORY, threads, seeds
    )


def plan(s: Settings) -> list[Run]:
    """Every compress run of the benchmark, in order: all ratios with the first seed, the
    30 % recovery with distillation again with each other seed, then int8."""
    runs: list[Run] = []
    for seed in s.seeds:
        ratios = s.ratios if seed == s.seeds[0] else (SEEDED_RATIO,)
        for ratio in ratios:
            first = not any(r.seed == seed for r in runs)
            runs += ratio_runs(s, ratio, seed, first, plain_fo=seed == s.seeds[0])
    pct = round(SEEDED_RATIO * 100)
    prune = ["--prune", str(SEEDED_RATIO), "--prune-units", "mlp,heads"]
    seed = s.seeds[0]
    for kind in QUANT_KINDS:
        runs += [
            Run(kind, ["--quantize", kind], [(kind, "after-quantize")], seed),
            Run(
                f"prune{pct}-{kind}",
                [*prune, "--quantize", kind],
                [(f"{pct} % + {kind}", "after-quantize")],
                seed,
            ),  # fmt: skip
        ]
    for name, (args, label, stage) in VOCAB_RUNS.items():
        runs.append(Run(name, args, [(label, stage)], seed))
    return runs


def ratio_runs(s: Settings, ratio: float, seed: int, first: bool, plain_fo: bool) -> list[Run]:
    """The recovery runs of one pruning ratio and seed. The FO + distill run also gives
    the no-recovery row (its after-prune stage) and, if `first`, the seed's unpruned row."""
    pct = round(ratio * 100)
    prune = ["--prune", str(ratio), "--prune-units", "mlp,heads"]
    fo = [*prune, "--recover", "fo", "--recover-steps", str(s.fo_steps), s.fo_batch]
    rows = [("unpruned", "before")] if first else []
    rows += [(f"{pct} % pruned", "after-prune"), (f"{pct} % + FO + distill", "after-recover")]
    runs = [Run(f"prune{pct}-fo-distill-s{seed}", [*fo, "--distill"], rows, seed)]
    if plain_fo:
        runs.append(Run(f"prune{pct}-fo-s{seed}", fo, [(f"{pct} % + FO", "after-recover")], seed))
    if ratio == SEEDED_RATIO:  # ZO recovery is ~3 min a run: at the target's ratio only
        zo = [*prune, "--recover", "zo", "--recover-steps", str(s.zo_steps), s.zo_batch]
        zo_row = [(f"{pct} % + ZO + distill", "after-recover")]
        runs.append(Run(f"prune{pct}-zo-distill-s{seed}", [*zo, "--distill"], zo_row, seed))
    return runs


def task_args(s: Settings, seed: int) -> list[str]:
    """The demo's data settings with `seed` (the split, and for compress the recovery
    seed too), as compress takes them (it has no train.* section)."""
    data = compress_data(s.data)
    at = data.index("--seed") + 1
    return [*data[:at], str(seed), *data[at + 1 :]]


def base_args(s: Settings, seed: int) -> list[str]:
    """The demo's FO fine-tune on the split of `seed`."""
    train = [a for a in s.data if a.startswith("train.")]
    return [*task_args(s, seed), *train, *s.base, "--threads", str(s.threads)]


def compress_args(s: Settings, r: Run, adapter: Path) -> list[str]:
    """The command line of one run (after `edgetune compress --model M --out DIR`)."""
    return [*task_args(s, r.seed), "--adapter", str(adapter), *r.args, "--threads", str(s.threads)]


def perplexity(s: Settings, model: str, adapter: Path | None, out: Path) -> dict[str, float]:
    """TinyStories perplexity and the eval process's peak RSS of `model` (+ `adapter`).

    The adapter is copied out of its run folder first: `edgetune eval` reads an adapter
    inside a run as "evaluate that run on its own task", and this is another task.
    """
    args = [*s.perplexity, "--threads", str(s.threads), "progress=false"]
    if adapter is not None:
        detached = out.with_name(out.name + "-adapter")
        shutil.rmtree(detached, ignore_errors=True)
        shutil.copytree(adapter, detached)
        args += ["--adapter", str(detached)]
    shutil.rmtree(out, ignore_errors=True)  # a previous benchmark's; eval never replaces one
    run_in_subprocess(out, model, args, quiet=True, command="eval", overwrite=False)
    summary = json.loads((out / "summary.json").read_text())
    # a vocabulary-pruned model gives its pruned tokens the lowest logit: the loss of a
    # text that uses them is past exp's range, or written "inf" (metrics.jsonl's text for
    # a non-finite number)
    loss = float(summary["eval/loss"])
    ppl = math.exp(loss) if loss < 700 else (math.inf if loss > 0 else math.nan)
    return {"perplexity": ppl, "eval_rss_mb": summary["peak_rss_mb"]}


def hellaswag(s: Settings, model: str, adapter: Path | None, out: Path) -> dict[str, float]:
    """HellaSwag acc_norm of `model` (+ `adapter`, detached as for `perplexity`) on a
    fixed seeded sample of tasks, with its 95 % interval."""
    tasks = QUICK_HELLASWAG_TASKS if s.quick else HELLASWAG_TASKS
    args = ["--task", "hellaswag", "--eval-size", str(tasks), "--seed", "0"]
    args += ["--threads", str(s.threads), "progress=false"]
    if adapter is not None:
        detached = out.with_name(out.name + "-adapter")
        shutil.rmtree(detached, ignore_errors=True)
        shutil.copytree(adapter, detached)
        args += ["--adapter", str(detached)]
    shutil.rmtree(out, ignore_errors=True)
    run_in_subprocess(out, model, args, quiet=True, command="eval", overwrite=False)
    summary = json.loads((out / "summary.json").read_text())
    return {
        "hellaswag": summary["eval/acc_norm"],
        "hellaswag_low": summary["eval/acc_norm_ci95_low"],
        "hellaswag_high": summary["eval/acc_norm_ci95_high"],
    }


def final_scores(s: Settings, run: Path, out: Path) -> dict[str, float]:
    """`perplexity` and `hellaswag` of a compress run's saved model (and adapter, if it
    kept one)."""
    adapter = run / "adapter"
    kept = adapter if (adapter / "adapter_config.json").exists() else None
    scores = perplexity(s, str(run / "model"), kept, out)
    return {**scores, **hellaswag(s, str(run / "model"), kept, out.with_name(out.name + "-hs"))}


def row_values(run: Path, stage: str) -> dict[str, Any]:
    """Accuracy, parameters, file size and speed of one stage of a compress run."""
    summary = json.loads((run / "summary.json").read_text())
    lines = read_jsonl(run / "metrics.jsonl")
    metrics = next(m for m in lines if m.get("stage") == stage)
    before = stage == "before"
    speed = stage_speed(summary, stage)
    return {
        "accuracy": metrics["eval/accuracy"],
        "params": summary["params_before" if before else "params_after"],
        "file_mb": (bytes_before(summary) if before else summary["model_bytes_after"]) / 1e6,
        "prefill_ms": speed["prefill_ms"],
        "decode_tps": speed["decode_tokens_per_s"],
        "prefill_x": summary["before"]["prefill_ms"] / speed["prefill_ms"],
        "decode_x": speed["decode_tokens_per_s"] / summary["before"]["decode_tokens_per_s"],
        "loss_points": metrics["eval/accuracy"] - _stage_accuracy(lines, "before"),
        "run_rss_mb": summary["peak_rss_mb"],
        "linear_x": _linear_ratio(summary),
    }


def bytes_before(summary: dict) -> int:
    """The unpruned model's size: its folder's files, else (a hub id) fp32 parameters x 4."""
    return summary["model_bytes_before"] or 4 * summary["params_before"]


def _stage_accuracy(lines: list[dict], stage: str) -> float:
    return next(m["eval/accuracy"] for m in lines if m.get("stage") == stage)


def _linear_ratio(summary: dict) -> float | None:
    """fp32 / int8 bytes of the linear weights, when the run quantized."""
    q = summary.get("after-quantize")
    if not q:
        return None
    return q["linear_weight_bytes_before"] / q["linear_weight_bytes_after"]


def memory_line(s: Settings, int8_model: Path) -> dict[str, dict[str, float]]:
    """Process peak RSS of ZO LoRA steps on the saved int8 base and of fp32 inference at
    the same batch, each in its own process, for both losses of `int8_memory.LOSSES`."""
    result = {}
    for loss in LOSSES:
        peaks = {}
        for mode, spec in (("fp32-inference", s.model), ("int8-zo", str(int8_model))):
            cmd = [sys.executable, "-m", "edgetune.bench.int8_memory", mode, spec]
            cmd += [*s.memory, loss]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True)
            peaks[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        result[loss] = {
            "fp32_inference_mb": peaks["fp32-inference"]["process_peak_mb"],
            "zo_int8_mb": peaks["int8-zo"]["process_peak_mb"],
            "runtime_mb": peaks["int8-zo"]["runtime_mb"],
        }
    return result


def base_adapters(s: Settings, root: Path) -> dict[int, Path]:
    """The demo's FO LoRA fine-tune of the base, once per seed (each on its own split)."""
    adapters = {}
    for seed in s.seeds:
        print(f"[bench compress] FO LoRA fine-tune of the base, seed {seed}", flush=True)
        run_in_subprocess(root / f"base-s{seed}", s.model, base_args(s, seed), quiet=True)
        adapters[seed] = root / f"base-s{seed}" / "adapter"
    return adapters


def run(
    model: str, output: str, work: str, quick: bool, threads: int, seeds: list[int],
    adapter: str | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Fine-tune (unless `adapter`), run every compress row, write the section and plot."""
    if adapter is not None and not (Path(adapter) / "adapter_config.json").exists():
        raise ConfigError(
            f"--adapter {adapter} is not a PEFT adapter folder (no adapter_config.json); pass "
            "RUN/adapter of a finetune run on the benchmark's task, or drop --adapter to "
            "fine-tune one"
        )
    if adapter is not None and len(seeds) > 1:
        raise ConfigError(
            f"--adapter was trained on one data split, but --seeds gives {len(seeds)}; a "
            "second seed draws another split whose held-out rows the adapter may have "
            "trained on. Give --seeds S (the adapter's run seed), or drop --adapter"
        )
    s = settings(model, quick, threads, seeds)
    root = Path(work)
    root.mkdir(parents=True, exist_ok=True)
    adapters = {seeds[0]: Path(adapter)} if adapter else base_adapters(s, root)
    results: list[dict[str, Any]] = []
    (root / "rows.jsonl").unlink(missing_ok=True)
    for r in plan(s):
        print(f"[bench compress] {r.name}: compress {' '.join(r.args)}", flush=True)
        folder = root / r.name
        shutil.rmtree(folder, ignore_errors=True)  # a previous benchmark's (the work folder)
        args = compress_args(s, r, adapters[r.seed])
        run_in_subprocess(folder, model, args, quiet=True, command="compress", overwrite=False)
        scores = final_scores(s, folder, root / f"{r.name}-ppl")
        for label, stage in r.rows:
            values = row_values(folder, stage)
            if stage == "before":
                base = root / f"base-s{r.seed}-ppl"
                values.update(perplexity(s, model, adapters[r.seed], base))
                values.update(
                    hellaswag(s, model, adapters[r.seed], base.with_name(base.name + "-hs"))
                )
            elif stage == r.rows[-1][1]:
                values.update(scores)  # only the run's final model is saved
            results.append({"label": label, "run": r.name, "seed": r.seed, **values})
            with (root / "rows.jsonl").open("a") as f:  # kept if a later run fails
                f.write(json.dumps(results[-1]) + "\n")
    memory = memory_line(s, root / "int8" / "model")
    png = Path(output).parent / "bench_compress_pareto.png"
    plot_pareto(results, png, model)
    body = render(results, memory, s, machine_line(), png.name)
    write_section(output, "compress", body)
    print(body)
    return results


def mean_rows(results: list[dict]) -> list[dict]:
    """One row per label: the mean over seeds, with each seed's accuracy kept."""
    merged: dict[str, list[dict]] = {}
    for r in results:
        merged.setdefault(r["label"], []).append(r)
    out = []
    for rows in merged.values():
        row = dict(rows[0])
        for key, value in rows[0].items():
            if isinstance(value, float) and all(isinstance(x.get(key), float) for x in rows):
                row[key] = statistics.mean(x[key] for x in rows)
        row["seed_accuracies"] = [x["accuracy"] for x in rows]
        out.append(row)
    return out


def pareto(rows: list[dict]) -> set[str]:
    """Labels no other row beats on both accuracy (higher) and prefill latency (lower)."""
    front = set()
    for r in rows:
        beaten = any(
            o["prefill_ms"] <= r["prefill_ms"]
            and o["accuracy"] >= r["accuracy"]
            and (o["prefill_ms"] < r["prefill_ms"] or o["accuracy"] > r["accuracy"])
            for o in rows
        )
        if not beaten:
            front.add(r["label"])
    return front


def plot_pareto(results: list[dict], path: Path, model: str) -> None:
    """Accuracy against prefill latency, one point per row, the Pareto front joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = mean_rows(results)
    front = pareto(rows)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        on = r["label"] in front
        ax.scatter(r["prefill_ms"], r["accuracy"], color="C3" if on else "C0", zorder=3)
        ax.annotate(r["label"], (r["prefill_ms"], r["accuracy"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")  # fmt: skip
    edge = sorted((r for r in rows if r["label"] in front), key=lambda r: r["prefill_ms"])
    ax.plot([r["prefill_ms"] for r in edge], [r["accuracy"] for r in edge], "C3--",
            label="Pareto front")  # fmt: skip
    ax.set_xlabel("prefill latency, batch 1 x 128 tokens (ms)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"{model}: accuracy vs prefill latency per compression")
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _cell(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def render(results: list[dict], memory: dict, s: Settings, machine: str, png: str) -> str:
    """The Markdown section: settings, table, targets."""
    rows = mean_rows(results)
    front = pareto(rows)
    seeds = ",".join(map(str, s.seeds))
    lines = [
        "## Compression: pruning, recovery, int8 (`edgetune bench compress`)",
        "",
        f"Command: `edgetune bench compress --model {s.model} --threads {s.threads} "
        f"--seeds {seeds}{' --quick' if s.quick else ''}`  ",
        f"Machine: {machine}  ",
        f"Threads: {s.threads} in each compress / eval process  ",
        f"Task: {' '.join(task_args(s, s.seeds[0]))}; base adapter: `edgetune finetune {' '.join(s.base)}`. "
        f"Recovery: FO LoRA {s.fo_steps} steps, ZO {s.zo_steps} steps (with distillation "
        f"from the unpruned model). Perplexity: `edgetune eval {' '.join(s.perplexity)}` on "
        "each run's saved model (a no-recovery row shares its run's folder with the "
        "recovered model, so its perplexity is not measured: –). HellaSwag: acc_norm of "
        f"`edgetune eval --task hellaswag --eval-size "
        f"{QUICK_HELLASWAG_TASKS if s.quick else HELLASWAG_TASKS} --seed 0` on the same "
        "saved models, with its 95 % Wilson interval. (x) = times faster than "
        "the unpruned fp32 model measured in the same compress process; absolute ms are "
        "per run. File MB: the model folder's files (weights, config, tokenizer). "
        "Peak RSS: the eval (inference) process of the row's model. Accuracy with two "
        "seeds: mean (each seed). **bold** = on the Pareto front.",
        "",
        "| row | params | file MB | prefill ms (x) | decode tok/s (x) | peak RSS MB | "
        "accuracy | loss (points) | perplexity | HellaSwag acc_norm |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        label = f"**{r['label']}**" if r["label"] in front else r["label"]
        acc = f"{r['accuracy']:.3f}"
        if len(r["seed_accuracies"]) > 1:
            acc += " (" + ", ".join(f"{a:.3f}" for a in r["seed_accuracies"]) + ")"
        lines.append(
            f"| {label} | {r['params'] / 1e6:.2f} M | {_cell(r['file_mb'], '.1f')} | "
            f"{r['prefill_ms']:.1f} ({r['prefill_x']:.2f}x) | {r['decode_tps']:.1f} "
            f"({r['decode_x']:.2f}x) | {_cell(r.get('eval_rss_mb'), '.0f')} | {acc} | "
            f"{100 * r['loss_points']:+.1f} | {_cell(r.get('perplexity'), '.2f')} | "
            f"{_hellaswag_cell(r)} |"
        )
    lines += ["", f"![accuracy vs prefill latency]({png})", "", *targets(rows, memory, s)]
    return "\n".join(lines)


def _hellaswag_cell(r: dict) -> str:
    """acc_norm [95 % interval], or – where the row's model was not saved."""
    if r.get("hellaswag") is None:
        return "–"
    return f"{r['hellaswag']:.3f} [{r['hellaswag_low']:.3f}, {r['hellaswag_high']:.3f}]"


def _lost(r: dict) -> float:
    """Accuracy points lost against the unpruned model (0.0, never -0.0)."""
    return 0.0 - 100 * r["loss_points"]


def vocab_targets(by: dict[str, dict]) -> list[str]:
    """PASS / MISS lines of the vocabulary rows that ran (against the unpruned row)."""
    lines = []
    base, small = by.get("unpruned"), by.get("vocabulary + int8")
    if base and small:
        file_share = small["file_mb"] / base["file_mb"]
        rss = small.get("eval_rss_mb"), base.get("eval_rss_mb")
        rss_share = rss[0] / rss[1] if None not in rss else None
        ok = file_share <= VOCAB_SIZE_SHARE and (rss_share or 1.0) <= VOCAB_SIZE_SHARE
        ok = ok and _lost(small) <= VOCAB_LOSS
        shares = f"file {100 * file_share:.1f} %, peak RSS {_cell(rss_share and 100 * rss_share, '.1f')} %"
        lines.append(
            f"- vocabulary + int8: {shares} of the unpruned model's (<= "
            f"{100 * VOCAB_SIZE_SHARE:.0f} %), accuracy loss {_lost(small):.1f} (<= "
            f"{VOCAB_LOSS:.0f} point): {_check(ok, f'{shares} / {_lost(small):.1f}')}"
        )  # fmt: skip
    head = by.get("vocabulary, label head")
    if head:
        ok = head["prefill_x"] >= LABEL_HEAD_SPEEDUP and _lost(head) <= 0.0
        lines.append(
            f"- vocabulary, label head: prefill {head['prefill_x']:.2f}x (>= "
            f"{LABEL_HEAD_SPEEDUP}x), accuracy loss {_lost(head):.1f} (<= 0 points): "
            + _check(ok, f"{head['prefill_x']:.2f}x / {_lost(head):.1f}")
        )
    return lines


def _check(ok: bool, miss: str) -> str:
    return "PASS" if ok else f"MISS ({miss})"


def targets(rows: list[dict], memory: dict, s: Settings) -> list[str]:
    """PASS / MISS with the miss size for each target of issue 13 whose rows ran."""
    by = {r["label"]: r for r in rows}
    pct = f"{round(SEEDED_RATIO * 100)} %"
    lines = ["Targets:", ""]
    for label in (f"{pct} + FO + distill", f"{pct} + ZO + distill"):
        if label not in by:
            continue
        r = by[label]
        slow = min(r["prefill_x"], r["decode_x"])
        ok = slow >= PRUNE_SPEEDUP and _lost(r) <= 100 * PRUNE_LOSS
        miss = f"speed {slow:.2f}x of {PRUNE_SPEEDUP}x, loss {_lost(r):.1f} of {100 * PRUNE_LOSS:.0f} points"
        lines.append(
            f"- {label}: prefill {r['prefill_x']:.2f}x and decode {r['decode_x']:.2f}x "
            f">= {PRUNE_SPEEDUP}x, accuracy loss {_lost(r):.1f} <= "
            f"{100 * PRUNE_LOSS:.0f} points: {_check(ok, miss)}"
        )  # fmt: skip
    for kind in (k for k in QUANT_KINDS if k in by):
        r = by[kind]
        small, fast = r["linear_x"], min(r["prefill_x"], r["decode_x"])
        ok = (small or 0) >= INT8_SMALLER and fast >= INT8_SPEEDUP
        ok = ok and _lost(r) <= 100 * INT8_LOSS
        lines.append(
            f"- {kind}: linear weights {_cell(small, '.2f')}x smaller (>= {INT8_SMALLER}x), "
            f"prefill {r['prefill_x']:.2f}x and decode {r['decode_x']:.2f}x (>= "
            f"{INT8_SPEEDUP}x), loss {_lost(r):.1f} (<= {100 * INT8_LOSS:.0f} point): "
            + _check(ok, f"{_cell(small, '.2f')}x / {fast:.2f}x / {_lost(r):.1f}")
        )  # fmt: skip
    lines += vocab_targets(by)
    batch, seq, _ = s.memory
    what = {
        "lm": "loss on every position (full logits)",
        "last": "loss on the last position (the classification tasks' logits_to_keep=1)",
    }
    for loss, m in memory.items():
        ratio = m["zo_int8_mb"] / m["fp32_inference_mb"]
        lines.append(
            f"- ZO LoRA on the int8 base, batch {batch} x {seq}, {what[loss]}: process peak "
            f"{m['zo_int8_mb']:.0f} MB vs fp32 inference {m['fp32_inference_mb']:.0f} MB = "
            f"{ratio:.2f}x (<= {ZO_INT8_RSS}x): "
            f"{_check(ratio <= ZO_INT8_RSS, f'{ratio - ZO_INT8_RSS:+.2f}x')}; the Python + "
            f"torch runtime alone is {m['runtime_mb']:.0f} MB of it"
        )
    return lines
