"""`edgetune bench threads`: does the default thread count avoid torch's collapse?

One forward pass of the model over a batch (16 x 64 tokens by default) is timed in a
fresh process per cell: with 1 thread, with as many threads as cores, and with the
default (`edgetune.threads.resolve`: OMP_NUM_THREADS unset, so the free cores are
sampled), first on a quiet machine and then beside one process that keeps a core busy
(a pure-Python spin loop, the kind of neighbour a shared edge box or CI runner has).
Each cell loads the model once, runs one warm-up pass and reports the median of
`repeats` timed passes. The default should be close to the best fixed count in both
conditions; a fixed count of all cores is the one that collapses beside a neighbour.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from edgetune.bench.markdown import machine_line, write_section
from edgetune.errors import EdgetuneError

SPIN = "while True: pass"


def child(model: str, requested: int, batch: int, seq_len: int, repeats: int) -> None:
    """In a fresh process: choose threads (0 = the default rule), time the forward pass,
    print {"threads", "source", "seconds"} as JSON."""
    import torch

    from edgetune import models, threads

    chosen = threads.resolve(requested or None, model)
    threads.apply(chosen.count)
    net, _ = models.load(model)
    vocab = net.config.vocab_size
    ids = torch.randint(vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            began = time.perf_counter()
            net(input_ids=ids)
            if i:  # the first pass warms the allocator and kernels up
                times.append(time.perf_counter() - began)
    result = {"threads": chosen.count, "source": chosen.source}
    print(json.dumps({**result, "seconds": statistics.median(times)}))


def _cell(model: str, requested: int, batch: int, seq_len: int, repeats: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    code = (
        "from edgetune.bench.threads import child; "
        f"child({model!r}, {requested}, {batch}, {seq_len}, {repeats})"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise EdgetuneError(f"bench threads: a measuring process failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _row(model: str, batch: int, seq_len: int, repeats: int) -> list[dict]:
    cores = os.cpu_count() or 1
    return [_cell(model, n, batch, seq_len, repeats) for n in (1, cores, 0)]


def run(model: str, batch: int, seq_len: int, repeats: int, output: str) -> None:
    """Time the three thread choices quiet and beside a busy neighbour; write the table."""
    quiet = _row(model, batch, seq_len, repeats)
    spinner = subprocess.Popen([sys.executable, "-c", SPIN])
    try:
        time.sleep(1.0)  # let the neighbour's load show in the default rule's sample
        busy = _row(model, batch, seq_len, repeats)
    finally:
        spinner.kill()
        spinner.wait()
    labels = ["1 thread", f"{os.cpu_count()} threads (all cores)", "default (edgetune)"]
    lines = [
        "## Thread count: the default against fixed counts (`edgetune bench threads`)",
        "",
        f"Command: `edgetune bench threads --model {model} --batch-size {batch} "
        f"--seq-len {seq_len} --steps {repeats}`  ",
        f"Machine: {machine_line()}  ",
        f"One forward pass of {model} over {batch} x {seq_len} tokens, median of {repeats} "
        "after a warm-up, each cell in a fresh process; 'busy' = one other process spinning "
        "on a core for the whole measurement.",
        "",
        "| threads | quiet machine (s) | beside one busy process (s) | default chose |",
        "|---|---:|---:|---|",
    ]
    for label, q, b in zip(labels, quiet, busy, strict=True):
        chose = f"{q['threads']} quiet / {b['threads']} busy" if "default" in label else ""
        lines.append(f"| {label} | {q['seconds']:.3f} | {b['seconds']:.3f} | {chose} |")
    write_section(output, "threads", "\n".join(lines))
    print("\n".join(lines))
