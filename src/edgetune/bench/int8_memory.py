"""Peak memory of ZO LoRA steps over a frozen int8 base against fp32 inference.

Each mode runs in its own child process (peak RSS is per process), same batch and length:
  fp32-inference     the fp32 model, forward under no_grad
  int8-zo            the model loaded from an int8 folder (`compress/int8_folder.py`, no
                     fp32 copy of the quantized layers ever exists), MeZO steps (q=1) on LoRA
  int8-zo-inprocess  the fp32 model loaded, `quantize_int8` + `release_file_pages` in the
                     process, then the same MeZO steps (its process peak includes the
                     fp32 load)
Two losses (`loss`): "lm" scores every position (the logits, 16 x 64 x 49152 fp32 = 192 MiB
for SmolLM2, are held in both modes alike and dominate at that batch); "last" scores the
last position only (`logits_to_keep=1`, what the classification tasks of `edgetune
finetune` compute), where the weights dominate.
Each child reports where its memory goes: the Python + torch + transformers runtime before
any model (runtime_mb), resident size after the model is ready (after_load_mb), the peak
during the steps (steps_peak_mb, the kernel mark reset after loading) and the process's
peak over its whole life (process_peak_mb). Ratios are taken against fp32-inference.

Run: `python -m edgetune.bench.int8_memory smollm2-135m 16 64 2` (model, batch, seq, steps).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from edgetune.bench.memory import timed_steps
from edgetune.runs import peak_rss_mb, status_mb

MODES = ("fp32-inference", "int8-zo", "int8-zo-inprocess")


LOSSES = ("lm", "last")


def child(
    mode: str, spec: str, batch: int, seq: int, steps: int, loss: str = "lm"
) -> dict[str, Any]:
    """Run one mode in this process and return its memory (MB) and step time."""
    import torch

    from edgetune import models
    from edgetune.compress.int8_folder import release_file_pages
    from edgetune.compress.quantize import quantize_int8
    from edgetune.peft import PeftConfig, attach
    from edgetune.zo import ZOSGD, MeZOEstimator
    from edgetune.zo.seeds import derive_seed

    runtime = status_mb("VmRSS")
    model, _ = models.load(spec)
    if mode == "int8-zo-inprocess":
        release_file_pages(quantize_int8(model))
    adapter = None if mode == "fp32-inference" else attach(model, PeftConfig(), seed=0)
    net = adapter.model if adapter else model
    ids = torch.randint(0, net.config.vocab_size, (batch, seq), generator=torch.Generator())
    est, opt = MeZOEstimator(eps=1e-3, queries=1), ZOSGD()

    def value() -> float:
        if loss == "lm":
            return float(net(input_ids=ids, labels=ids).loss)
        last = net(input_ids=ids, logits_to_keep=1).logits[:, -1]
        return float(torch.nn.functional.cross_entropy(last, ids[:, 0]))

    @torch.no_grad()
    def step(i: int) -> None:
        if adapter is None:
            value()
            return
        params = adapter.trainable()
        opt.step(params, est.estimate(value, params, derive_seed(0, i)), 1e-4)

    after_load = status_mb("VmRSS")
    step_s, steps_peak = timed_steps(step, steps)
    return {
        "mode": mode,
        "loss": loss,
        "runtime_mb": runtime,
        "after_load_mb": after_load,
        "steps_peak_mb": steps_peak,
        "process_peak_mb": peak_rss_mb(),
        "step_s": step_s,
        "threads": torch.get_num_threads(),
    }


def save_int8_copy(spec: str, folder: Path) -> None:
    """Quantize `spec` and save it as an int8 folder (run in a child: it loads fp32)."""
    from edgetune import models
    from edgetune.compress.int8_folder import save_int8
    from edgetune.compress.quantize import quantize_int8

    model, tokenizer = models.load(spec)
    save_int8(quantize_int8(model), folder)
    tokenizer.save_pretrained(folder)


def zo_int8_peak(
    spec: str, batch: int = 16, seq: int = 64, steps: int = 2, loss: str = "lm"
) -> dict[str, Any]:
    """Measure every mode in its own child process, with the `loss` of `LOSSES`.

    Returns:
        {"rows": one dict per mode (see `child`), "ratios": each mode's process_peak_mb
        and steps_peak_mb over fp32-inference's}.
    """
    with tempfile.TemporaryDirectory(prefix="edgetune-int8-") as tmp:
        folder = Path(tmp) / "int8"
        subprocess.run([*_cmd(), "save", spec, str(folder)], check=True, capture_output=True)
        rows = []
        for mode in MODES:
            source = str(folder) if mode == "int8-zo" else spec
            args = [mode, source, str(batch), str(seq), str(steps), loss]
            out = subprocess.run([*_cmd(), *args], check=True, capture_output=True, text=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]
    ratios = {
        r["mode"]: {
            "process_peak": r["process_peak_mb"] / base["process_peak_mb"],
            "steps_peak": r["steps_peak_mb"] / base["steps_peak_mb"],
        }
        for r in rows[1:]
    }
    return {
        "model": spec, "batch": batch, "seq": seq, "loss": loss, "rows": rows, "ratios": ratios
    }  # fmt: skip


def _cmd() -> list[str]:
    return [sys.executable, "-m", "edgetune.bench.int8_memory"]


if __name__ == "__main__":
    if sys.argv[1] == "save":
        save_int8_copy(sys.argv[2], Path(sys.argv[3]))
    elif sys.argv[1] in MODES:
        mode, spec, b, s, n, kind = sys.argv[1:7]
        print(json.dumps(child(mode, spec, int(b), int(s), int(n), kind)))
    else:
        spec, b, s, n, *kind = sys.argv[1:6]
        print(json.dumps(zo_int8_peak(spec, int(b), int(s), int(n), *kind), indent=2))
