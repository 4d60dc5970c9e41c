"""`edgetune bench memory`: peak memory and step time of inference, ZO, FO LoRA and full FT.

Each mode runs in its own child process (peak RSS is per process), on the same model,
batch and sequence length. After the model is loaded the child resets the kernel's
peak-RSS mark (`/proc/self/clear_refs`), runs one warm-up step and `steps` timed steps,
and reports the peak (VmHWM) and the median step time. Ratios are taken against the
inference peak measured in the same run.

Modes:
  inference  forward pass under no_grad
  zo         MeZO step, q=1, on LoRA (two forward passes, in-place perturbation)
  fo-lora    forward + backward + AdamW on LoRA
  fo-full    forward + backward + AdamW on every parameter
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from edgetune.bench.markdown import threads_line
from edgetune.runs import reset_peak_rss, status_mb

MODES = ("inference", "zo", "fo-lora", "fo-full")


def timed_steps(step: Callable[[int], None], steps: int) -> tuple[float, float]:
    """Reset the peak-RSS mark, run a warm-up step and `steps` timed ones.

    Returns:
        (median step seconds, peak RSS in MB since the reset).
    """
    reset_peak_rss()
    step(0)  # warm-up: allocates optimizer state, grads, copies
    times = []
    for i in range(1, steps + 1):
        start = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times), status_mb("VmHWM")


def child(mode: str, model_spec: str, batch: int, seq: int, steps: int) -> dict[str, Any]:
    """Run one mode in this process and return its measurements."""
    import torch

    from edgetune import models
    from edgetune.peft import PeftConfig, attach
    from edgetune.zo import ZOSGD, MeZOEstimator
    from edgetune.zo.seeds import derive_seed

    model, _ = models.load(model_spec)
    method = "full" if mode == "fo-full" else "lora"
    adapter = None if mode == "inference" else attach(model, PeftConfig(method=method), seed=0)
    net = adapter.model if adapter else model
    ids = torch.randint(
        0, net.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)
    )

    def loss() -> torch.Tensor:
        return net(input_ids=ids, labels=ids).loss

    if mode == "inference":

        def step(i: int) -> None:
            with torch.no_grad():
                loss()
    elif mode == "zo":
        est, opt = MeZOEstimator(eps=1e-3, queries=1), ZOSGD()

        def step(i: int) -> None:
            with torch.no_grad():
                params = adapter.trainable()
                opt.step(
                    params, est.estimate(lambda: float(loss()), params, derive_seed(0, i)), 1e-4
                )
    else:
        optimizer = torch.optim.AdamW(adapter.trainable(), lr=1e-5)
        net.train()

        def step(i: int) -> None:
            loss().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    after_load = status_mb("VmRSS")
    step_s, peak_mb = timed_steps(step, steps)
    return {
        "mode": mode,
        "peak_mb": peak_mb,
        "after_load_mb": after_load,
        "step_s": step_s,
        "trainable": adapter.num_trainable() if adapter else 0,
        "threads": torch.get_num_threads(),
    }


def run(model: str, batch: int, seq: int, steps: int, output: str) -> list[dict[str, Any]]:
    """Measure every mode in a child process and write the table to `output`."""
    from edgetune.bench.markdown import machine_line, write_section

    results = []
    for mode in MODES:
        cmd = [
            sys.executable,
            "-m",
            "edgetune.bench.memory",
            mode,
            model,
            str(batch),
            str(seq),
            str(steps),
        ]
        print(f"[bench memory] {mode} ...", flush=True)
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"[bench memory] {mode}: {results[-1]}", flush=True)
    body = render(results, model, batch, seq, steps, machine_line())
    write_section(output, "memory", body)
    print(body)
    return results


def render(
    results: list[dict[str, Any]], model: str, batch: int, seq: int, steps: int, machine: str
) -> str:
    """The Markdown table of a run."""
    base = next(r for r in results if r["mode"] == "inference")
    lines = [
        "## Memory and step time: inference vs ZO vs first-order (`edgetune bench memory`)",
        "",
        f"Command: `edgetune bench memory --model {model} --batch-size {batch} --seq-len {seq} --steps {steps}`  ",
        f"Machine: {machine}  ",
        threads_line([r.get("threads", 0) for r in results], "measuring process"),
        "Peak = the process's peak resident memory (VmHWM) during the steps, reset after the "
        "model is loaded; time = median step over the timed steps (after one warm-up step).",
        "",
        "| mode | trainable params | peak RSS (MB) | peak / inference | step time (s) | time / inference |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['mode']} | {r['trainable']:,} | {r['peak_mb']:.0f} | "
            f"{r['peak_mb'] / base['peak_mb']:.3f}x | {r['step_s']:.3f} | "
            f"{r['step_s'] / base['step_s']:.2f}x |"
        )
    zo = next(r for r in results if r["mode"] == "zo")
    verdict = "met" if zo["peak_mb"] <= 1.15 * base["peak_mb"] else "NOT met"
    lines += [
        "",
        f"Target ZO peak <= 1.15x inference peak: {verdict} "
        f"({zo['peak_mb'] / base['peak_mb']:.3f}x).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    mode, spec, b, s, n = sys.argv[1:6]
    print(json.dumps(child(mode, spec, int(b), int(s), int(n))))
