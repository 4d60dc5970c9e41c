"""`edgetune eval`: task metrics of a model, optionally with a trained adapter.

The held-out rows are the ones `edgetune finetune` holds out for the same data settings
and seed, so a trained adapter can be re-scored on exactly its eval split.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from edgetune.errors import EdgetuneError
from edgetune.models.loader import check_adapter_fits


def load_adapter(model: Any, adapter: str | None) -> Any:
    """Wrap `model` with the PEFT adapter saved in folder `adapter` (if given)."""
    if not adapter:
        return model
    path = Path(adapter)
    if not (path / "adapter_config.json").exists():
        raise EdgetuneError(
            f"{path} is not a PEFT adapter folder (no adapter_config.json); pass RUN/adapter "
            f"of a finetune run"
        )
    from peft import PeftModel

    check_adapter_fits(model, path)
    return PeftModel.from_pretrained(model, path).eval()


def run(args: argparse.Namespace, flags: dict[str, Any]) -> dict[str, Any]:
    """Evaluate and (with --out) write a run directory; returns the summary."""
    from edgetune import models
    from edgetune.config import resolve_config, to_dict
    from edgetune.data import build_task, load_splits
    from edgetune.recipes.finetune import FinetuneConfig
    from edgetune.runs import RunDir, peak_rss_mb

    start = time.perf_counter()
    cfg = resolve_config(FinetuneConfig, args.config, args.overrides, flags)
    model, tokenizer = models.load(cfg.model)
    model = load_adapter(model, args.adapter)
    splits = load_splits(cfg.data, cfg.seed)
    task = build_task(splits, cfg.data, tokenizer)
    rows = task.prepare_rows(splits.eval)
    metrics = {
        f"eval/{k}": float(v) for k, v in task.evaluate(model, rows, args.batch_size).items()
    }
    summary = {
        "command": "eval",
        "model": cfg.model,
        "adapter": args.adapter,
        "eval_examples": len(rows),
        **metrics,
        "wall_s": time.perf_counter() - start,
        "peak_rss_mb": peak_rss_mb(),
    }
    if args.out:
        rundir = RunDir(args.out)  # never overwrites a run (it may hold the adapter)
        rundir.write_config({**to_dict(cfg), "adapter": args.adapter})
        rundir.log({"step": 0, **metrics})
        rundir.write_summary(summary)
    return summary
