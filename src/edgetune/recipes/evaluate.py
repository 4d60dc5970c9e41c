"""`edgetune eval`: task metrics of a model, optionally with a trained adapter.

`edgetune eval RUN` (or `--adapter RUN/adapter`) evaluates a finetune (or federate)
run's adapter with everything the run used (model, data, task, template, labels,
verbalizer, max_length) read from RUN/config.yaml, on the rows that run held out. Only `--eval-size` and
`--seed` may differ, and they draw among the rows the run never trained on (see
`data.splits.load_held_out`); any other setting that differs from the run is an error,
since it would score something other than what was trained. Without a run, the flags
and `--config` say what to evaluate, as for `finetune`.

`--task hellaswag` (any name in `edgetune.eval.BENCHMARKS`) scores a standard benchmark
instead, on the model given (base, adapter, pruned or int8 folder, .gguf) or on a run's
model and weights; only `--dataset` (its file), `--eval-size` (the sample) and `--seed`
act on it, so any other data setting is refused. `--batch-size` counts sequences per
forward pass there too: 16 is four tasks of four endings.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgetune import console, threads
from edgetune.compress.int8_dynamic import is_dynamic_int8
from edgetune.compress.quantize import int8_as_linear
from edgetune.config import build, config_from_run, leaves, option, set_dotted, to_dict
from edgetune.data.builtin import BUILTIN_DATASETS
from edgetune.data.config import DataConfig
from edgetune.data.recorded import run_of_adapter
from edgetune.errors import ConfigError, EdgetuneError
from edgetune.eval import BENCHMARKS, Benchmark
from edgetune.models.builtin import builtin_for_base_model
from edgetune.models.loader import adapter_config, check_adapter_fits
from edgetune.runs import RunDir, check_out

# Settings an evaluation of a run may change: which held-out rows, how many, and
# whether a progress bar shows.
RUN_EVAL_KEYS = ("seed", "data.eval_size", "train.progress")


@dataclass
class EvalConfig:
    """Everything `edgetune eval` needs (YAML sections = the nested fields).

    With `run`, the model and data settings come from the run's config.yaml; the ones
    given here must agree with it, except `seed` and `data.eval_size` (see
    `config_for_run`).
    """

    run: str = option("", "a finetune or federate run directory to score ('' = none)")
    model: str = option(
        "smollm2-135m", "built-in name, HF folder, .gguf file or hub id", flag="--model"
    )
    adapter: str = option("", "PEFT adapter folder, e.g. RUN/adapter ('' = none)", flag="--adapter")
    seed: int = option(0, "which held-out rows (or benchmark items) are drawn", flag="--seed")
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    batch_size: int = option(16, "sequences per forward pass", flag="--batch-size")
    out: str = option("", "write a run directory with the metrics ('' = none)", flag="--out")
    progress: bool = option(True, "show a progress bar")
    threads: int = option(0, "threads (0 = chosen at start from the free cores)")

    def __post_init__(self) -> None:
        threads.check(self.threads, "threads")
        if self.batch_size < 1:
            raise ConfigError(
                f"batch_size: expected an integer >= 1, got {self.batch_size}; pass e.g. "
                "--batch-size 16"
            )


# The data settings a benchmark reads: its file, its name and the sample size.
BENCHMARK_DATA_KEYS = ("dataset", "task", "eval_size")


def load_adapter(model: Any, adapter: str | None) -> Any:
    """Wrap `model` with the PEFT adapter saved in folder `adapter` (if given).

    Raises:
        EdgetuneError: not an adapter folder, or one trained on another base model.
    """
    if not adapter:
        return model
    if is_dynamic_int8(model):
        raise EdgetuneError(
            f"{adapter}: an adapter cannot wrap a dynamic int8 model (PEFT has no LoRA layer "
            "for it); run edgetune compress --quantize int8-dynamic with --adapter, which "
            "merges the adapter before quantizing, or use the fp32 model"
        )
    path = Path(adapter)
    if not (path / "adapter_config.json").exists():
        raise EdgetuneError(
            f"{path} is not a PEFT adapter folder (no adapter_config.json); pass RUN/adapter "
            f"of a finetune run"
        )
    from peft import PeftModel

    check_adapter_fits(model, path)
    try:
        with int8_as_linear(model):  # a LoRA over an int8 model (edgetune compress)
            return PeftModel.from_pretrained(model, path).eval()
    except RuntimeError as exc:
        if "size mismatch" not in str(exc):
            raise
        base = _adapter_base(path)
        raise EdgetuneError(
            f"adapter {path} does not fit this model (its tensors have other shapes): it was "
            f"trained on {base}; pass --model {builtin_for_base_model(base) or base}"
        ) from None


def _adapter_base(path: Path) -> str:
    config = adapter_config(path)
    return str(config.get("base_model_name_or_path") or "an unrecorded base model")


def run_of(target: str | None, adapter: str | None) -> Path | None:
    """The finetune run to evaluate: `target` (RUN), or the run holding `adapter`.

    Raises:
        EdgetuneError: RUN is not a run directory, or RUN and --adapter disagree.
    """
    if target:
        run = Path(target)
        if not (run / "config.yaml").is_file():
            raise EdgetuneError(
                f"{run} is not a run directory (no config.yaml); pass the --out folder of a "
                f"finetune run, or evaluate a model with --model and --dataset"
            )
        if adapter and Path(adapter).resolve() != (run / "adapter").resolve():
            raise ConfigError(
                f"edgetune eval {run} evaluates {run / 'adapter'}, but --adapter {adapter} "
                f"was given too; pass one of them"
            )
        return run
    parent = run_of_adapter(adapter) if adapter else None
    if parent is None:
        return None
    # a compress run's adapter has no training settings to replay: it is evaluated from
    # the flags, like any adapter folder
    return None if "prune" in RunDir(parent, resume=True).read_config() else parent


def _weights_of(run: Path) -> tuple[str | None, str | None]:
    """(adapter folder, model folder) a run saved: a PEFT adapter, or a whole model."""
    if (run / "adapter" / "adapter_config.json").exists():
        return str(run / "adapter"), None
    if (run / "model" / "config.json").exists():
        return None, str(run / "model")
    raise EdgetuneError(
        f"{run} has no adapter/ or model/ folder: the run did not finish; resume it with "
        f"`edgetune finetune --resume {run}` first"
    )


# The eval settings that name a run setting (the others are the evaluation's own).
_RUN_KEY = {"model": "model", "seed": "seed", "progress": "train.progress"}


def config_for_run(run: Path, given: dict[str, Any]) -> Any:
    """(the run's config with the evaluation's `seed` / `data.eval_size` applied, the
    run's config as saved); a FinetuneConfig, or a FederateConfig for a federate run.
    `given` holds the settings the user gave (`config.given_settings`).

    Raises:
        ConfigError: a flag, override or --config value differs from the run in anything
            else (naming each setting, the run's value and the fix).
    """
    from edgetune.fed.config import FederateConfig
    from edgetune.recipes.finetune import FinetuneConfig

    cls = FederateConfig if "fed" in RunDir(run, resume=True).read_config() else FinetuneConfig
    saved = config_from_run(cls, run, [])
    tree = to_dict(saved)
    for key, value in leaves(given).items():
        if key.startswith("data.") or key in _RUN_KEY:
            set_dotted(tree, _RUN_KEY.get(key, key), value)
    requested = build(cls, tree)
    before, after = leaves(to_dict(saved)), leaves(to_dict(requested))
    conflicts = [k for k in after if after[k] != before.get(k) and k not in RUN_EVAL_KEYS]
    if conflicts:
        listed = "; ".join(f"{k}={after[k]!r} (the run's: {before.get(k)!r})" for k in conflicts)
        raise ConfigError(
            f"edgetune eval {run} takes its settings from {run / 'config.yaml'}, and these "
            f"differ: {listed}. Drop them (only --eval-size and --seed may change), or "
            f"evaluate without the run: edgetune eval --model ... --dataset ... --adapter ..."
        )
    return requested, saved


def run(cfg: EvalConfig, given: dict[str, Any]) -> dict[str, Any]:
    """Evaluate and (with `out`) write a run directory; returns the summary. `given`
    holds the settings the user gave (`config.given_settings`), which a run's must match.
    """
    from edgetune import models
    from edgetune.data import build_task, load_splits
    from edgetune.data.splits import load_held_out
    from edgetune.runs import peak_rss_mb
    from edgetune.train.loop import evaluate_model

    start = time.perf_counter()
    if cfg.out:  # refused now, not after the evaluation
        check_out(cfg.out)
        if (Path(cfg.out) / "metrics.jsonl").exists():
            raise EdgetuneError(
                f"--out {cfg.out} already holds a run; eval never replaces one: pass another --out"
            )
    source = run_of(cfg.run or None, cfg.adapter or None)
    if cfg.data.task in BENCHMARKS:
        return run_benchmark(cfg, given, source, start)
    adapter = cfg.adapter or None
    weights = None
    progress = cfg.progress
    if source is not None:
        run_cfg, saved = config_for_run(source, given)
        adapter, weights = _weights_of(source)
        model_spec, data, seed = run_cfg.model, run_cfg.data, run_cfg.seed
        progress = run_cfg.train.progress
    else:
        data, seed = cfg.data, cfg.seed
        model_spec = _model_for_adapter(adapter, cfg.model, "model" in given)
    console.status(f"loading model {model_spec} and data {data.dataset}", progress)
    model, tokenizer = models.load(model_spec)
    model = load_adapter(model, adapter) if weights is None else _load_weights(weights)
    if source is not None:
        splits = load_held_out(saved.data, saved.seed, data.eval_size, seed)
    else:
        splits = load_splits(data, seed)
    task = build_task(splits, data, tokenizer)
    rows = task.prepare_rows(splits.eval)
    metrics = evaluate_model(model, task, rows, cfg.batch_size, progress)
    summary = {
        "command": "eval",
        "model": model_spec,
        "adapter": adapter,
        **({"run": str(source)} if source is not None else {}),
        "eval_examples": len(rows),
        **metrics,
        "wall_s": time.perf_counter() - start,
        "peak_rss_mb": peak_rss_mb(),
    }
    _write_out(cfg, model_spec, adapter, metrics, summary)
    return summary


def _write_out(
    cfg: EvalConfig, model: str, adapter: str | None, metrics: dict, summary: dict
) -> None:
    """With `out`: a run directory holding the config, the metrics and the summary."""
    if not cfg.out:
        return
    rundir = RunDir(cfg.out)  # never overwrites a run (it may hold the adapter)
    rundir.write_config({**to_dict(cfg), "model": model, "adapter": adapter or ""})
    rundir.log({"step": 0, **metrics})
    rundir.write_summary(summary)


def run_benchmark(
    cfg: EvalConfig, given: dict[str, Any], source: Path | None, start: float
) -> dict[str, Any]:
    """Score the benchmark `cfg.data.task` on the model the settings (or the run) give."""
    from edgetune import models
    from edgetune.runs import peak_rss_mb

    benchmark = BENCHMARKS[str(cfg.data.task)]
    file = _benchmark_file(benchmark, cfg.data, "dataset" in given.get("data", {}))
    adapter, weights = cfg.adapter or None, None
    if source is not None:
        adapter, weights = _weights_of(source)
        model_spec = _run_model(source, cfg.model, "model" in given)
    else:
        model_spec = _model_for_adapter(adapter, cfg.model, "model" in given)
    items = benchmark.load(file, cfg.data.eval_size, cfg.seed)
    progress = cfg.progress
    console.status(f"loading model {model_spec}; {benchmark.name}: {len(items)} items", progress)
    model, tokenizer = models.load(model_spec)
    model = load_adapter(model, adapter) if weights is None else _load_weights(weights)
    bar = console.bar(len(items), benchmark.name, "task", enabled=progress, leave=False)
    try:
        scored = benchmark.score(model.eval(), tokenizer, items, cfg.batch_size, bar and bar.update)
    finally:
        if bar is not None:
            bar.close()
    metrics = {f"eval/{k}": float(v) for k, v in scored.items()}
    console.status(_benchmark_line(benchmark.name, scored, len(items)))
    summary = {
        "command": "eval",
        "model": model_spec,
        "adapter": adapter,
        **({"run": str(source)} if source is not None else {}),
        "benchmark": benchmark.name,
        "data": str(file),
        "seed": cfg.seed,
        "eval_examples": len(items),
        **metrics,
        "interval": "95 % Wilson score interval",
        "wall_s": time.perf_counter() - start,
        "peak_rss_mb": peak_rss_mb(),
    }
    _write_out(cfg, model_spec, adapter, metrics, summary)
    return summary


def _benchmark_file(benchmark: Benchmark, data: DataConfig, dataset_given: bool) -> Path:
    """The benchmark's file: `--dataset FILE`, else its default; refuses the data
    settings a benchmark does not read.

    Raises:
        ConfigError: a data setting besides dataset, task and eval_size was given, or
            --dataset names a built-in dataset, or eval_size is 0.
    """
    default = DataConfig()
    unread = [
        f"data.{name}={getattr(data, name)!r}"
        for name in vars(default)
        if name not in BENCHMARK_DATA_KEYS and getattr(data, name) != getattr(default, name)
    ]
    if unread:
        raise ConfigError(
            f"--task {benchmark.name} is scored as published, so {', '.join(unread)} would "
            f"not act on it; drop it (only --dataset FILE, --eval-size and --seed apply)"
        )
    if data.eval_size < 1:
        raise ConfigError(
            f"data.eval_size=0 scores nothing; pass --eval-size N (N items of {benchmark.name} "
            f"drawn with --seed; a number at least the file's size scores all of them)"
        )
    if not dataset_given and data.dataset == default.dataset:
        return benchmark.default_file()
    if data.dataset in BUILTIN_DATASETS:
        raise ConfigError(
            f"--dataset {data.dataset} is a built-in dataset, not a {benchmark.name} file; "
            f"drop --dataset to score the shipped {benchmark.name} data, or pass a file in "
            f"its layout"
        )
    return Path(data.dataset).expanduser()


def _run_model(run: Path, model: str, given: bool) -> str:
    """The model a run trained (its weights fit no other)."""
    trained = str(RunDir(run, resume=True).read_config().get("model"))
    if given and model != trained:
        raise ConfigError(
            f"--model {model} differs from the model {run} trained ({trained}); drop --model "
            f"to score the run, or pass --model alone to score another model"
        )
    return trained


def _benchmark_line(name: str, scored: dict[str, float], n: int) -> str:
    """ "hellaswag (1000 tasks): acc 0.312 [0.284, 0.341], acc_norm ..." """
    parts = [
        f"{key} {scored[key]:.3f} [{scored[f'{key}_ci95_low']:.3f}, "
        f"{scored[f'{key}_ci95_high']:.3f}]"
        for key in ("acc", "acc_norm")
        if key in scored
    ]
    return f"{name} ({n} items): {', '.join(parts)} (95 % Wilson intervals)"


def _load_weights(folder: str) -> Any:
    """The whole model a selective / full fine-tune saved (its tokenizer is the base's)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _model_for_adapter(adapter: str | None, model: str, given: bool) -> str:
    """Without a run, the model an adapter names as its base, unless the user chose one."""
    if not adapter or given or not (Path(adapter) / "adapter_config.json").exists():
        return model  # (a folder that is no adapter: load_adapter says what is wrong)
    base = _adapter_base(Path(adapter))
    return builtin_for_base_model(base) or base
