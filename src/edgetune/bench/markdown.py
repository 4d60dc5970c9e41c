"""Write one benchmark's section into docs/BENCHMARKS.md, leaving the others alone.

Each benchmark owns the text between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`;
re-running it replaces only that block.
"""

from __future__ import annotations

import platform
import re
from pathlib import Path


def machine_line() -> str:
    """A one-line description of this machine for the results, with the torch threads of
    this process, which its child processes inherit (`edgetune.threads.apply`)."""
    import os

    import psutil
    import torch

    mem = f", {psutil.virtual_memory().total / 1024**3:.0f} GB RAM"
    omp = os.environ.get("OMP_NUM_THREADS", "unset")
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores{mem}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads per process (OMP_NUM_THREADS={omp})"
    )


def threads_line(counts: list[int], where: str) -> str:
    """`Threads: ...` as the measuring processes reported them."""
    distinct = sorted(set(counts))
    return f"Threads: {' / '.join(map(str, distinct))} in each {where}  "


def write_section(path: str | Path, name: str, body: str) -> None:
    """Replace (or append) the `name` section of the Markdown file at `path`."""
    path = Path(path)
    text = (
        path.read_text()
        if path.exists()
        else "# Benchmarks\n\nMeasured, not estimated. Each section says the command that produced it.\n"
    )
    block = f"<!-- bench:{name} -->\n{body.rstrip()}\n<!-- /bench:{name} -->"
    pattern = re.compile(rf"<!-- bench:{name} -->.*?<!-- /bench:{name} -->", re.S)
    text = (
        pattern.sub(lambda _: block, text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + block + "\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
