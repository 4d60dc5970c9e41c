"""`edgetune bench threads` times real forward passes in fresh processes and reports what
the default chose; on the tiny stories260K model the rule picks 1 thread, quiet or busy."""

from __future__ import annotations

import os

from edgetune.bench import threads


def test_bench_threads_writes_its_section_with_the_defaults_choice(stories260k_path, tmp_path):
    out = tmp_path / "BENCHMARKS.md"

    threads.run(str(stories260k_path), batch=2, seq_len=8, repeats=1, output=str(out))

    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "(s)" not in line]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    labels = [c[0] for c in cells]
    assert labels == ["1 thread", f"{os.cpu_count()} threads (all cores)", "default (edgetune)"]
    assert cells[2][3] == "1 quiet / 1 busy"  # a tiny model gets 1 thread either way
    assert all(float(c[i]) > 0 for c in cells for i in (1, 2))
