"""How many CPU threads torch may use, so that edgetune never thrashes a shared machine.

PyTorch starts as many OpenMP threads as there are cores. On a CPU that anything else
keeps busy, those threads wait on each other at every parallel region and a forward pass
collapses. Measured on a 2-core machine (SmolLM2-135M forward, 16 x 64 tokens):

    quiet machine, 2 threads                          1.17 s
    one busy process beside it, 2 threads             3.32 s
    one busy process beside it, 1 thread              2.17 s
    two torch processes of 2 threads each             11.4 s   (1.18 s alone)
    stories260K forward on a busy machine             1.9 s with 2 threads, 0.024 s with 1

The rule (`choose_threads`): give torch the cores nobody else is busy on, divided among
the processes edgetune itself runs at once, at least 1; a tiny model (weights under
`TINY_MODEL_BYTES`) gets 1, since its operations are too small to pay for a parallel
region. A core counts as busy when others use more than half of it: from the figures
above, 2 threads beat 1 while the neighbour is busy less than about 47 % of the time
(1.17 + 2.15 p < 2.17), and the loss from erring towards fewer threads is bounded (at
most the 1.85x of one thread on a quiet machine) while erring towards more is not (10x).

Where the number comes from (`resolve`): `--threads N` (or `threads: N` in a run's
config) > `OMP_NUM_THREADS` in the environment (the user's choice, or the one an
edgetune parent passed down) > the rule, with the other processes' load sampled over
`SAMPLE_S` seconds. `apply` sets torch's thread pools and `OMP_NUM_THREADS` /
`MKL_NUM_THREADS`, so every child process edgetune starts (benchmark runs, the demo's
runs, Flower's SuperLink) inherits the decision instead of measuring its siblings' load.
Local Flower SuperNodes get their share, `split(threads, clients)`.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

from edgetune.errors import ConfigError

TINY_MODEL_BYTES = 16 * 1024**2  # 4M fp32 parameters; stories260K is 1 MB, SmolLM2 540 MB
SAMPLE_S = 0.3  # how long the other processes' CPU use is sampled
ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


@dataclass(frozen=True)
class Threads:
    """A thread count and where it came from (for logs and benchmark headers)."""

    count: int
    source: str

    def __str__(self) -> str:
        return f"{self.count} thread{'s' * (self.count != 1)} ({self.source})"


def split(threads: int, processes: int) -> int:
    """Threads for each of `processes` processes sharing `threads` cores, at least 1."""
    return max(1, threads // max(1, processes))


def choose_threads(cores: int, busy: float, processes: int = 1, tiny: bool = False) -> int:
    """The default thread count: free cores, divided among edgetune's processes.

    Args:
        cores: logical CPUs of the machine.
        busy: cores other processes keep busy (1.0 = one core at 100 %).
        processes: processes edgetune runs at once on this machine (local SuperNodes).
        tiny: the model is tiny (weights under TINY_MODEL_BYTES): 1 thread.

    Returns:
        Threads for each process, at least 1.
    """
    if tiny:
        return 1
    taken = math.floor(max(0.0, busy) + 0.5)  # a core more than half busy is taken
    return split(cores - taken, processes)


def busy_cores(interval: float = SAMPLE_S) -> float:
    """Cores the other processes keep busy, sampled over `interval` seconds (this process
    sleeps meanwhile, so its own use does not count)."""
    import psutil

    return sum(psutil.cpu_percent(interval=interval, percpu=True)) / 100.0


def is_tiny(model: str | None) -> bool:
    """Whether `model` is a local folder or file whose weights are under TINY_MODEL_BYTES.
    A built-in name or hub id is not tiny (every built-in model is larger)."""
    if not model:
        return False
    path = Path(model).expanduser()
    if path.is_file():
        return path.stat().st_size < TINY_MODEL_BYTES
    if not path.is_dir():
        return False
    weights = [f for f in path.iterdir() if f.suffix in WEIGHT_SUFFIXES]
    return bool(weights) and sum(f.stat().st_size for f in weights) < TINY_MODEL_BYTES


def check(threads: int | None, where: str = "--threads") -> None:
    """Refuse a negative or non-integer thread count (0 or None = choose automatically)."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ConfigError(
            f"{where}: expected a whole number of threads >= 1 (or 0 = choose from the free "
            f"cores), got {threads!r}"
        )


def from_environment() -> int | None:
    """OMP_NUM_THREADS when it is set to a positive integer, else None."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(
            f"OMP_NUM_THREADS={value!r} is not a positive integer: unset it or set it to the "
            "number of threads (e.g. export OMP_NUM_THREADS=1), or pass --threads N"
        )
    return int(value)


def resolve(
    requested: int | None = None, model: str | None = None, source: str = "--threads"
) -> Threads:
    """The thread count for this process: `requested` (>= 1, from `source`) if given, else
    OMP_NUM_THREADS, else `choose_threads` on this machine's cores and current load."""
    check(requested, source)
    if requested:
        return Threads(requested, source)
    from_env = from_environment()
    if from_env is not None:
        return Threads(from_env, "OMP_NUM_THREADS")
    cores = os.cpu_count() or 1
    busy = busy_cores()
    tiny = is_tiny(model)
    count = choose_threads(cores, busy, 1, tiny)
    reason = "tiny model" if tiny else f"{cores} cores, {busy:.1f} busy"
    return Threads(count, f"auto: {reason}")


def child_env(threads: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default os.environ) with OMP_NUM_THREADS / MKL_NUM_THREADS = `threads`."""
    return {**(os.environ if base is None else base), **dict.fromkeys(ENV_VARS, str(threads))}


def apply(threads: int) -> None:
    """Use `threads` threads in torch here and in every child process started from now on."""
    import torch

    os.environ.update(child_env(threads, {}))
    torch.set_num_threads(threads)
    # torch allows this once per process, before any inter-op work (a second CLI call in
    # one process, as in tests, cannot); the intra-op threads above are what count
    if torch.get_num_interop_threads() != threads:
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(threads)
