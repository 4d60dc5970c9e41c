"""Every benchmark section says how many threads its measuring processes ran."""

from __future__ import annotations

from pathlib import Path

import torch

from edgetune.bench import fed, flower, memory, zo
from edgetune.bench.markdown import machine_line


def test_memory_and_zo_headers_give_the_childrens_threads():
    rows = [
        {"mode": m, "trainable": 1, "peak_mb": 10.0, "step_s": 1.0, "threads": 1}
        for m in memory.MODES
    ]
    text = memory.render(rows, "m", 8, 128, 3, "a machine")
    assert "Threads: 1 in each measuring process" in text.splitlines()[4]
    step = {"step_s": 1.0, "peak_mb": 10.0, "threads": 2}
    results = {("inference", r, zo.BLOCKS): step for r in (1, 2, 4, 8, 16, 32)}
    results |= {(m, q, zo.BLOCKS): step for m in zo.METHODS for q in zo.QUERIES}
    results |= {
        (m, q, k): step
        for m in ("mezo", "prge", "floor")
        for q in zo.QUERIES
        for k in zo.TRUNK_TOPS
    }
    text = zo.render(results, {}, "m", "lora", 3, 0, "p.png", "B.md", "a machine")
    assert "Threads: 2 in each measuring process" in text.splitlines()[4]


def test_fed_and_flower_headers_give_the_runs_threads():
    run = {
        "start": 0.2, "final": 0.5, "best": 0.5, "up_per_client_round": 100.0,
        "down_per_client_round": 100.0, "bytes_to_target": None, "sim_s_to_target": None,
        "round_to_target": None, "threads": 2,
    }  # fmt: skip
    results = {label: run for label in fed.RUNS}
    text = fed.render(results, 0.4, "m", 3, 10, "a machine", Path("docs"), Path("B.md"))
    assert "Threads: 2 in each simulator run (config.yaml)" in text
    keys = ("sim_round_s", "flower_round_s", "sim_rpm", "flower_rpm", "overhead_round_s")
    keys += ("overhead_message_s", "setup_s", "handler_s", "train_s", "payload_up", "carried_up")
    keys += ("payload_down", "carried_down", "max_abs_diff")
    figures = {**dict.fromkeys(keys, 1.0), "sim_threads": 2, "node_threads": 1}
    text = flower.render({"fedit (fo)": figures}, "m", 3, 2, "a machine")
    assert "Threads: 2 in each simulator process; 1 in each of the 2 SuperNodes" in text


def test_the_machine_line_names_this_processs_threads():
    assert f"{torch.get_num_threads()} torch threads per process" in machine_line()
