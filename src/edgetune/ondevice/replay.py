"""Replay an on-device run's trace on the PyTorch model: the check that what the runtime
trained is what PyTorch would have trained.

The run's DIR/adapter_init is loaded onto the base model with PEFT, and every line of
DIR/trace.jsonl (seeds, scalars, lr) is applied with the run's ZO optimizer, drawing the
directions from the same seeds in the same tensor order. The result equals DIR/adapter up
to float rounding: the two sides add the same fp32 updates in the same order, but the
runtime computed the losses (hence the scalars are its own), so replay reproduces the
run's update rule, not its forward passes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from edgetune import models
from edgetune.config import build
from edgetune.errors import EdgetuneError
from edgetune.runs import RunDir, read_jsonl
from edgetune.zo.estimate import ZOEstimate
from edgetune.zo.optimizers import make_zo_optimizer


def replay(run: Path, model: Any = None) -> Any:
    """The PEFT model rebuilt from `run`'s adapter_init and trace.

    Args:
        run: an `edgetune ondevice` run directory.
        model: the base model (default: loaded from the adapter's base_model_name_or_path).

    Returns:
        The PeftModel with the replayed adapter.
    """
    from edgetune.recipes.ondevice import OnDeviceConfig
    from peft import PeftModel

    run = Path(run)
    cfg = build(OnDeviceConfig, RunDir(run, resume=True).read_config())
    init = run / "adapter_init"
    if model is None:
        base = json.loads((init / "adapter_config.json").read_text())["base_model_name_or_path"]
        model, _ = models.load(base)
    peft = PeftModel.from_pretrained(model, init, is_trainable=True)
    params = [
        p
        for n, p in peft.named_parameters()
        if ".lora_B." in n or (".lora_A." in n and cfg.peft.method == "lora")
    ]
    optimizer = make_zo_optimizer(cfg.zo, cfg.optim.weight_decay)
    trace = run / "trace.jsonl"
    if not trace.is_file():  # read_jsonl would replay nothing and return adapter_init
        raise EdgetuneError(
            f"{run} has no trace.jsonl; pass the folder of an `edgetune ondevice` run"
        )
    for step in read_jsonl(trace):
        estimate = ZOEstimate(step["seeds"], step["scalars"], 0.0)
        with torch.no_grad():
            optimizer.step(params, estimate, step["lr"])
    return peft
