"""`edgetune eval`: task metrics of a model, optionally with a trained adapter.

`edgetune eval RUN` (or `--adapter RUN/adapter`) evaluates a finetune (or federate)
run's adapter with everything the run used (model, data, task, template, labels,
verbalizer, max_length) read from RUN/config.yaml, on the rows that run held out. Only `--eval-size` and
`--seed` may differ, and they draw among the rows the run never trained on (see
`data.splits.load_held_out`); any other setting that differs from the run is an error,
since it would score something other than what was trained. Without a run, the flags
and `--config` say what to evaluate, as for `finetune`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from edgetune import console
from edgetune.compress.int8_dynamic import is_dynamic_int8
from edgetune.compress.quantize import int8_as_linear
from edgetune.config import (
    build,
    config_from_run,
    leaves,
    load_yaml,
    parse_override,
    resolve_config,
    set_dotted,
    to_dict,
)
from edgetune.data.recorded import run_of_adapter
from edgetune.errors import ConfigError, EdgetuneError
from edgetune.models.builtin import builtin_for_base_model
from edgetune.models.loader import check_adapter_fits
from edgetune.runs import RunDir

# Settings an evaluation of a run may change: which held-out rows, how many, and
# whether a progress bar shows.
RUN_EVAL_KEYS = ("seed", "data.eval_size", "train.progress")


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
    config = json.loads((path / "adapter_config.json").read_text())
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


def config_for_run(run: Path, file: str | None, overrides: list[str], flags: dict) -> Any:
    """(the run's config with the evaluation's `seed` / `data.eval_size` applied, the
    run's config as saved); a FinetuneConfig, or a FederateConfig for a federate run.

    Raises:
        ConfigError: a flag, override or --config value differs from the run in anything
            else (naming each setting, the run's value and the fix).
    """
    from edgetune.fed.config import FederateConfig
    from edgetune.recipes.finetune import FinetuneConfig

    cls = FederateConfig if "fed" in RunDir(run, resume=True).read_config() else FinetuneConfig
    saved = config_from_run(cls, run, [])
    tree = to_dict(saved)
    for key, value in leaves(load_yaml(file) if file else {}).items():
        set_dotted(tree, key, value)
    for key, value in flags.items():
        set_dotted(tree, key, value)
    for text in overrides:
        set_dotted(tree, *parse_override(text))
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


def run(args: argparse.Namespace, flags: dict[str, Any]) -> dict[str, Any]:
    """Evaluate and (with --out) write a run directory; returns the summary."""
    from edgetune import models
    from edgetune.data import build_task, load_splits
    from edgetune.data.splits import load_held_out
    from edgetune.recipes.finetune import FinetuneConfig
    from edgetune.runs import peak_rss_mb
    from edgetune.train.loop import evaluate_model

    start = time.perf_counter()
    flags = {k: v for k, v in flags.items() if k not in ("out", "train.batch_size")}
    source = run_of(getattr(args, "run", None), args.adapter)
    adapter = args.adapter
    weights = None
    if source is not None:
        cfg, saved = config_for_run(source, args.config, list(args.overrides), flags)
        adapter, weights = _weights_of(source)
        model_spec = cfg.model
    else:
        cfg = resolve_config(FinetuneConfig, args.config, args.overrides, flags)
        given = "model" in flags or cfg.model != FinetuneConfig().model
        model_spec = _model_for_adapter(adapter, cfg.model, given)
    progress = cfg.train.progress
    console.status(f"loading model {model_spec} and data {cfg.data.dataset}", progress)
    model, tokenizer = models.load(model_spec)
    model = load_adapter(model, adapter) if weights is None else _load_weights(weights)
    if source is not None:
        splits = load_held_out(saved.data, saved.seed, cfg.data.eval_size, cfg.seed)
    else:
        splits = load_splits(cfg.data, cfg.seed)
    task = build_task(splits, cfg.data, tokenizer)
    rows = task.prepare_rows(splits.eval)
    metrics = evaluate_model(model, task, rows, args.batch_size, progress)
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
    if args.out:
        rundir = RunDir(args.out)  # never overwrites a run (it may hold the adapter)
        rundir.write_config({**to_dict(cfg), "model": model_spec, "adapter": adapter})
        rundir.log({"step": 0, **metrics})
        rundir.write_summary(summary)
    return summary


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
