"""`edgetune ondevice`: ZO / P-RGE fine-tuning of a LoRA adapter through an exported
graph, with the runtime (ONNX Runtime or ExecuTorch) as the only engine.

read the export folder (`export.json`, checksums) -> open the runtime session -> the
tokenizer saved with the export -> data and task -> the starting adapter (the one
exported with the graph, else a fresh LoRA from the run seed; saved as DIR/adapter_init)
-> the same `fit` loop, steppers, estimators and ZO optimizers as `edgetune finetune`,
with every loss computed from runtime logits -> DIR/adapter in PEFT's format.

No PyTorch model is built and nothing runs backward: torch serves as the array library
for the adapter tensors and the seeded directions, so a step's (seeds, scalars) in
DIR/trace.jsonl replay on the PyTorch model (`ondevice/replay.py`) to the same adapter.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgetune import console, threads, track
from edgetune.config import check_choice, option, to_dict
from edgetune.data import DataConfig, build_task, load_splits
from edgetune.data.splits import resolved_data
from edgetune.errors import ConfigError
from edgetune.export.manifest import read_manifest
from edgetune.ondevice.adapter import LORA_METHODS, build_adapter, init_lora, load_lora
from edgetune.ondevice.runtime import RUNTIMES, RuntimeLM, open_session
from edgetune.peft.card import ModelCard
from edgetune.runs import RunDir, check_out, peak_rss_mb
from edgetune.train import OptimConfig, TrainConfig, fit
from edgetune.train.config import check_optim_read_by, resolve_step_size
from edgetune.train.factory import build_stepper, check_zo_read
from edgetune.train.loop import keeps_best
from edgetune.train.outcome import outcome, report_outcome
from edgetune.zo import ZOConfig

METHODS = ("zo", "prge")


@dataclass
class OnDevicePeft:
    """What trains (the graph fixes the LoRA shapes: targets, rank, alpha)."""

    method: str = option("lora", "lora | lora-fa (A frozen, only B trains)", flag="--peft")

    def __post_init__(self) -> None:
        check_choice("peft", "method", self.method, LORA_METHODS)


@dataclass
class OnDeviceConfig:
    """Everything `edgetune ondevice` needs."""

    model: str = option(
        "runs/export", "export folder (edgetune export) with adapter inputs", flag="--model"
    )
    runtime: str = option("ort", "ort (ONNX Runtime) | executorch", flag="--runtime")
    seed: int = option(
        0, "run seed: data split, batch order, adapter init, ZO directions", flag="--seed"
    )
    out: str = option("runs/ondevice", "run directory", flag="--out")
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    peft: OnDevicePeft = dataclasses.field(default_factory=OnDevicePeft)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    zo: ZOConfig = dataclasses.field(default_factory=ZOConfig)
    threads: int = option(0, "runtime threads (0 = chosen at start from the free cores)")
    report_to: str = track.report_to_option()

    def __post_init__(self) -> None:
        check_choice("ondevice", "runtime", self.runtime, RUNTIMES)
        threads.check(self.threads, "threads")
        track.names(self.report_to)  # an unknown tracker fails here, with the closest
        if self.train.method not in METHODS:
            raise ConfigError(
                f"train.method={self.train.method!r}: an exported graph has no backward, so "
                f"on-device training is forward-only: --method {' or '.join(METHODS)}"
            )
        check_zo_read(self.train.method, self.zo)
        if self.zo.estimator == "fwdgrad":
            raise ConfigError(
                "zo.estimator=fwdgrad needs Jacobian-vector products, which an inference "
                "runtime does not compute; use zo.estimator=central or one-sided"
            )
        check_optim_read_by(self.optim, self.train.method)
        resolve_step_size(self.optim, self.zo, self.train.method)


def run(cfg: OnDeviceConfig, *, overwrite: bool = False) -> dict[str, Any]:
    """Train through the runtime and write the run directory; returns the summary.

    Raises:
        EdgetuneError: not an export folder, a damaged or truncated export, a graph of
            another format than --runtime or one without adapter inputs, a task the
            graph's logits cannot serve; all before DIR is written.
    """
    from transformers import AutoTokenizer

    start = time.perf_counter()
    track.require(cfg.report_to)  # a missing tracker package stops here, before any work
    folder = Path(cfg.model)
    manifest = read_manifest(folder)
    check_out(cfg.out)  # and a run already there, before the runtime loads the graph
    if (Path(cfg.out) / "metrics.jsonl").exists() and not overwrite:
        raise ConfigError(
            f"{cfg.out} already holds a run; pass --overwrite to replace it, or another --out"
        )
    fmt = RUNTIMES[cfg.runtime]
    if manifest.format != fmt:
        raise ConfigError(
            f"{folder} holds a {manifest.format} export, but --runtime {cfg.runtime} runs "
            f"{fmt}; pass --runtime {_runtime_for(manifest.format)} or export with --format {fmt}"
        )
    if not manifest.adapter_inputs:
        raise ConfigError(
            f"the graph in {folder} has no adapter inputs (a plain or merged export), so "
            "there is nothing to train through it; export again with --lora-rank R (or "
            "--adapter DIR, without --merge)"
        )
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    splits = load_splits(cfg.data, cfg.seed)
    task = build_task(splits, cfg.data, tokenizer)
    cfg = dataclasses.replace(cfg, data=resolved_data(cfg.data, splits))
    if task.name == "instruction":
        raise ConfigError(
            "ondevice evaluates through the graph, which has no generation loop for the "
            "instruction task's ROUGE-L; use --task classification or lm"
        )
    if manifest.logits == "last" and task.name != "classification":
        raise ConfigError(
            f"the graph in {folder} returns only the last position's logits (--logits last), "
            f"which serves classification; the {task.name} task reads every position: export "
            "with --logits all"
        )
    console.status(f"opening {folder / manifest.files['graph']} in {cfg.runtime}")
    session = open_session(fmt, folder / manifest.files["graph"], cfg.threads or 1)
    if manifest.adapter:
        tensors = load_lora(folder / manifest.adapter, manifest.slots)
    else:
        tensors = init_lora(manifest.slots, cfg.seed)
    model = RuntimeLM(session, manifest, list(tensors.values()))
    adapter = build_adapter(model, cfg.peft.method, tensors, manifest.peft_config or {})
    run_dir = RunDir(cfg.out, overwrite=overwrite)
    run_dir.write_config(to_dict(cfg))
    run_dir.track(cfg.report_to, to_dict(cfg))
    adapter.save(run_dir.path, manifest.base_model, name="adapter_init")
    train_rows, eval_rows = task.prepare_rows(splits.train), task.prepare_rows(splits.eval)
    state = fit(
        adapter,  # type: ignore[arg-type]
        task,
        train_rows,
        eval_rows,
        _stepper(cfg, adapter, task),
        cfg.train,
        cfg.optim,
        run_dir,
        cfg.seed,
    )
    result = outcome(state, keeps_best(cfg.train, eval_rows))
    final = {k: v for k, v in result.items() if k.startswith("eval/")}
    method = (
        f"edgetune ondevice, {cfg.runtime}, train.method={cfg.train.method}, {state.step} steps"
    )
    card = ModelCard.for_run(cfg, "ondevice", method, final)
    saved = adapter.save(run_dir.path, manifest.base_model, card)
    report_outcome(result, cfg.train.progress)
    summary = {
        "command": "ondevice",
        "runtime": cfg.runtime,
        "export": str(folder),
        "base_model": manifest.base_model,
        "method": cfg.train.method,
        "peft": cfg.peft.method,
        "trainable_params": adapter.num_trainable(),
        "steps": state.step,
        "final_loss": next(
            (r["loss"] for r in reversed(run_dir.read_metrics()) if "loss" in r), None
        ),
        **result,
        "step_s": state.train_s / max(state.step, 1),
        "saved": str(saved),
        "wall_s": time.perf_counter() - start,
        "peak_rss_mb": peak_rss_mb(),
    }
    run_dir.write_summary(summary)
    return summary


def _runtime_for(fmt: str) -> str:
    return next((r for r, f in RUNTIMES.items() if f == fmt), "none (gguf runs in llama.cpp)")


def _stepper(cfg: OnDeviceConfig, adapter: Any, task: Any) -> Any:
    """The `finetune` stepper of `cfg.train.method`, its P-RGE copies run as the graph's
    copy axis; a LoRA copy is cheap, so ZO restores exactly unless told not to."""
    return build_stepper(
        cfg.train.method,
        adapter,
        task,
        cfg.optim,
        cfg.zo,
        cfg.train.grad_accum,
        cfg.seed,
        exact_restore=str(cfg.zo.exact_restore).lower() != "false",
        copies=adapter.model.copies,
        trunk=cfg.train.trunk,
    )
