"""Fault injection: every file a command reads, every path it writes, damaged one way.

The table is generated, not listed: for each input (model weights and config, an adapter,
an export's `export.json` and graph, a run folder's config.yaml, logs and checkpoints,
data, a fleet file) the commands that read it, crossed with the fault classes of
`tests/faults.py` (truncated, corrupt, empty, missing, a field of the wrong type or an
edited shape); and for each command that writes a folder, the paths it cannot write
(under a regular file, a symlink loop, /proc) and an --out that already holds a run.

Every case must exit 2 with a message naming the file (or path) and a fix, print no
traceback, and lose nothing: every file of the inputs, the damaged one included, is byte
for byte what it was. A command that does slow work before it refuses fails the case's
time budget. Counts for the closing note of a round:

    PYTHONPATH=src OMP_NUM_THREADS=1 python -m pytest -q tests/test_faults.py -p no:randomly \
        2>&1 | grep -oE '(TRACEBACK|SILENT|WRONG STATUS|WRONG MESSAGE|WRONG PROBLEM|LOST|SLOW)' | sort | uniq -c
"""

from __future__ import annotations

import re
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from transformers.utils import logging as hf_logging

from edgetune.cli import main
from faults import FILE_FAULTS, OUT_FAULTS, edit_json, edit_safetensors, edit_yaml, lost, snapshot

hf_logging.get_logger(
    "transformers"
)  # bind its handler to the session's stderr (see test_bad_input)

# A message names a fix when it tells the user what to do.
FIX = (
    r"(pass|restore|export|train|delete|remove|use|give|copy|download|run|start|rename|"
    r"choose|drop|fix|write|edit|check|resume|lower|raise|re-?create|save|add|put)\b"
)
# What an --out fault's message must say the problem is (not, say, "already exists" for
# a link that loops).
OUT_PROBLEM = {
    "under-a-file": r"is a file|not a folder|Not a directory",
    "symlink-loop": r"symbolic link|loop|Too many levels",
    "special-fs": r"cannot (be )?(create|write)|read-only|special",
    "already-there": r"already (holds|exists)",
}
# Messages that blame something else than the fault injected: an adapter whose two files
# disagree was trained on the model given, so "pass the model it was trained on" is wrong.
WRONG_BLAME = {
    "adapter-config/rank-edited": r"different model|pass --model",
    "adapter-weights/wrong-shape": r"different model|pass --model",
}
BUDGET_S = 20.0  # a refusal that took longer did slow work before checking its input

HEADER = "sentence,label\n"
ROWS = "a fine film,good\na dull film,bad\n" * 6
FLEET = "fleet:\n  - {name: dev, memory_mb: 4000, gflops: 100, up_mbps: 12, down_mbps: 50}\n"
DATA = ["data.train_size=8", "data.eval_size=2", "data.max_length=32"]

COMMANDS: dict[str, list[str]] = {
    "finetune": [
        "finetune", "--model", "{model}", "--dataset", "{data}", "--steps", "1",
        "--batch-size", "2", "--out", "{out}", *DATA, "train.progress=false", "--threads", "1",
    ],
    "federate": [
        "federate", "--model", "{model}", "--dataset", "{data}", "--clients", "2",
        "--rounds", "1", "--local-steps", "1", "--batch-size", "2", "--fleet", "{fleet}",
        "--partition", "iid", "--out", "{out}", *DATA, "train.progress=false",
        "--threads", "1",
    ],
    "eval": [
        "eval", "--model", "{model}", "--dataset", "{data}", "--eval-size", "2",
        "data.max_length=32", "--out", "{out}", "--threads", "1",
    ],
    "compress": [
        "compress", "--model", "{model}", "--dataset", "{data}", "--prune", "0.25",
        "--calib", "4", "--batch-size", "2", "--out", "{out}", *DATA, "progress=false",
        "--threads", "1",
    ],
    "export": ["export", "--model", "{model}", "--format", "onnx", "--out", "{out}",
               "--threads", "1"],
    "ondevice": [
        "ondevice", "--model", "{export}", "--dataset", "{data}", "--steps", "1",
        "--batch-size", "2", "--out", "{out}", *DATA, "train.progress=false",
        "--threads", "1",
    ],
    "generate": ["generate", "--model", "{model}", "--prompt", "Once", "--max-new-tokens",
                 "2", "--threads", "1"],
    "finetune --resume": ["finetune", "--resume", "{run}", "--threads", "1"],
    "federate --resume": ["federate", "--resume", "{fed}", "--threads", "1"],
    "eval RUN": ["eval", "{run}", "--threads", "1"],
    "report": ["report", "{run}"],
    "report FED": ["report", "{fed}"],
}  # fmt: skip
WITH_ADAPTER = {"eval", "generate", "compress", "export"}  # `--adapter {adapter}` added


def _shrink_embedding(tensors: dict) -> dict:
    key = next(k for k in tensors if "embed_tokens" in k)
    return {**tensors, key: tensors[key][:-1].contiguous()}


def _halve_one_lora_a(tensors: dict) -> dict:
    key = next(k for k in sorted(tensors) if "lora_A" in k)
    return {**tensors, key: tensors[key][: tensors[key].shape[0] // 2].contiguous()}


def _set(section: str | None, key: str, value: object):
    def change(data: dict) -> dict:
        (data[section] if section else data)[key] = value
        return data

    return change


def _slots_rank(value: int):
    def change(data: dict) -> dict:
        for slot in data["slots"]:
            slot["rank"] = value
        return data

    return change


# A hand edit that keeps config.yaml valid is a fault only for --resume, which trains on
# from the checkpoint with it; eval RUN and report read the run's values as they are.
RUN_CONFIG_EDITS = {
    "wrong-type": {"finetune --resume", "eval RUN", "federate --resume"},
    "rank-edited": {"finetune --resume", "federate --resume"},
}


@dataclass
class Input:
    """A file commands read: where it lives, who reads it, its file-specific faults."""

    name: str
    path: str  # under the case's folder
    readers: list[str]
    extra: dict = field(default_factory=dict)  # fault name -> fault
    skip: tuple[str, ...] = ()  # generic faults that are no fault for this file
    only: dict = field(default_factory=dict)  # fault name -> the readers it is a fault for


INPUTS = [
    Input(
        "weights",
        "model/model.safetensors",
        ["finetune", "federate", "eval", "compress", "export", "generate"],
        {"wrong-shape": edit_safetensors(_shrink_embedding)},
    ),
    Input(
        "model-config",
        "model/config.json",
        ["finetune", "federate", "eval", "compress", "export", "generate"],
        {"wrong-type": edit_json(_set(None, "hidden_size", "sixty-four"))},
    ),
    Input(
        "adapter-weights",
        "adapter/adapter_model.safetensors",
        ["eval", "generate", "compress", "export"],
        {"wrong-shape": edit_safetensors(_halve_one_lora_a)},
    ),
    Input(
        "adapter-config",
        "adapter/adapter_config.json",
        ["eval", "generate", "compress", "export"],
        {
            "wrong-type": edit_json(_set(None, "r", "eight")),
            "rank-edited": edit_json(_set(None, "r", 4)),
        },
    ),
    Input(
        "export-manifest",
        "export/export.json",
        ["ondevice"],
        {
            "wrong-type": edit_json(_set(None, "slots", "q_proj")),
            "wrong-files": edit_json(_set(None, "files", ["model.onnx"])),
            "rank-edited": edit_json(_slots_rank(8)),
        },
    ),
    Input("export-graph", "export/model.onnx", ["ondevice"]),
    Input(
        "run-config",
        "run/config.yaml",
        ["finetune --resume", "eval RUN", "report"],
        {
            "wrong-type": edit_yaml(_set("train", "steps", "many")),
            "rank-edited": edit_yaml(_set("peft", "rank", 4)),
        },
        only=RUN_CONFIG_EDITS,
    ),
    Input(
        "fed-config",
        "fed/config.yaml",
        ["federate --resume", "report FED"],
        {
            "wrong-type": edit_yaml(_set("fed", "rounds", "many")),
            "rank-edited": edit_yaml(_set("peft", "rank", 4)),
        },
        only=RUN_CONFIG_EDITS,
    ),
    # a torn or missing log is what an interrupted run leaves: read tolerantly (test_runs.py)
    Input(
        "run-metrics",
        "run/metrics.jsonl",
        ["finetune --resume", "report"],
        skip=("truncated", "empty", "missing"),
    ),
    Input(
        "checkpoint",
        "run/checkpoints/step-000002/adapter.safetensors",
        ["finetune --resume"],
    ),
    Input(
        "checkpoint-state",
        "run/checkpoints/step-000002/state.json",
        ["finetune --resume"],
        {"wrong-type": edit_json(_set(None, "step", "two"))},
    ),
    Input("round-state", "fed/state/round-000001/round.json", ["federate --resume"]),
    Input("round-tensors", "fed/state/round-000001/algorithm.safetensors", ["federate --resume"]),
    Input("data", "data.csv", ["finetune", "federate", "eval", "compress", "ondevice"]),
    Input(
        "fleet",
        "fleet.yaml",
        ["federate"],
        {"wrong-type": edit_yaml(lambda d: {"fleet": d["fleet"][0]})},
    ),
]
# A run with one damaged checkpoint (or round state) falls back to an older one
# (tests/recipes/test_resume.py), so such a fault damages that file in every one of them.

WRITERS = ["finetune", "federate", "eval", "compress", "export", "ondevice"]


@dataclass
class Case:
    id: str
    command: str
    damaged: str | None = None  # the input's path under the case folder
    fault: object = None
    out_fault: str | None = None
    names: str = ""  # a regex the message must match: the file or path named


def _cases() -> list[Case]:
    cases = []
    for item in INPUTS:
        faults = {k: v for k, v in FILE_FAULTS.items() if k not in item.skip} | item.extra
        for command in item.readers:
            for name, fault in faults.items():
                if name in item.only and command not in item.only[name]:
                    continue
                cases.append(
                    Case(
                        f"{command.replace(' ', '-')}/{item.name}/{name}",
                        command,
                        damaged=item.path,
                        fault=fault,
                        names=re.escape(Path(item.path).name),
                    )
                )
    for command in WRITERS:
        for name in [*OUT_FAULTS, "already-there"]:
            cases.append(Case(f"{command}/out/{name}", command, out_fault=name))
    return cases


CASES = _cases()
# Cases whose fix is still missing, by case-id prefix -> why (strict: the fix that lands
# turns them into failures until the mark goes).
OWNED_ELSEWHERE: dict[str, str] = {}


def _param(case: Case):
    owner = next((why for prefix, why in OWNED_ELSEWHERE.items() if case.id.startswith(prefix)), "")
    marks = [pytest.mark.xfail(strict=True, reason=owner)] if owner else []
    return pytest.param(case, marks=marks, id=case.id)


@pytest.fixture(scope="module")
def world(tmp_path_factory, stories260k_path, onnx_lora_export) -> Path:
    """The good inputs every case copies: the model, data, a fleet, a finished finetune
    run with two checkpoints and its adapter, a finished federated run, an ONNX export."""
    root = tmp_path_factory.mktemp("world")
    shutil.copytree(stories260k_path, root / "model")
    (root / "data.csv").write_text(HEADER + ROWS)
    (root / "fleet.yaml").write_text(FLEET)
    fill = {"{model}": str(root / "model"), "{data}": str(root / "data.csv")}
    ft = [*_fill(COMMANDS["finetune"], fill | {"{out}": str(root / "run")})]
    assert main([*ft, "--steps", "2", "train.checkpoint_every=1"]) == 0
    shutil.copytree(root / "run" / "adapter", root / "adapter")
    fed = _fill(COMMANDS["federate"], fill | {"{out}": str(root / "fed"), "{fleet}": "uniform"})
    assert main([*fed, "--rounds", "2"]) == 0  # a lost round 2 cannot restart silently
    shutil.copytree(onnx_lora_export, root / "export")
    return root


def _fill(argv: list[str], values: dict[str, str]) -> list[str]:
    filled = []
    for arg in argv:
        for key, value in values.items():
            arg = arg.replace(key, value)
        filled.append(arg)
    return filled


def _argv(case: Case, root: Path, out: Path) -> list[str]:
    argv = list(COMMANDS[case.command])
    if case.command in WITH_ADAPTER and case.damaged and case.damaged.startswith("adapter/"):
        argv += ["--adapter", "{adapter}"]
    fleet = str(root / "fleet.yaml") if case.damaged == "fleet.yaml" else "uniform"
    values = {
        "{out}": str(out),
        "{fleet}": fleet,
        **{f"{{{name}}}": str(root / name) for name in ("model", "adapter", "run", "fed")},
        "{data}": str(root / "data.csv"),
        "{export}": str(root / "export"),
    }
    return _fill(argv, values)


def _out_path(case: Case, root: Path) -> Path:
    if case.out_fault in OUT_FAULTS:
        return OUT_FAULTS[case.out_fault](root)
    if case.out_fault == "already-there":  # a finished run (or export) in --out
        return root / ("export" if case.command == "export" else "run")
    return root / "out"


def _damage(case: Case, root: Path) -> None:
    if case.damaged is None:
        return
    target = root / case.damaged
    targets = [target]
    if target.parent.parent.name in ("checkpoints", "state"):  # in every saved step / round
        targets = [step / target.name for step in sorted(target.parent.parent.iterdir())]
    for path in targets:
        case.fault(path)  # type: ignore[operator]


def _run(argv: list[str], capfd) -> tuple[object, str]:
    try:
        status = main(argv)
    except SystemExit as exc:
        status = exc.code
    except Exception:  # noqa: BLE001 - a traceback: the case fails with it shown
        captured = capfd.readouterr()
        return "TRACEBACK", traceback.format_exc()[-2500:] + captured.err[-500:]
    captured = capfd.readouterr()
    return status, captured.out + captured.err


def _record_slow_work(monkeypatch) -> list[str]:
    """The model loads and runtime sessions a command starts (appended as they start)."""
    import edgetune.recipes.ondevice as ondevice
    from edgetune import models

    started: list[str] = []
    load, session = models.load, ondevice.open_session

    def recorded(real, what):
        return lambda *a, **k: started.append(f"{what} {a[0]}") or real(*a, **k)

    monkeypatch.setattr(models, "load", recorded(load, "loaded model"))
    monkeypatch.setattr(ondevice, "open_session", recorded(session, "opened session"))
    return started


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_a_fault_is_refused_cleanly(case, world, tmp_path, capfd, monkeypatch):
    # Prepare: a fresh copy of every good input, one fault applied
    root = tmp_path / "case"
    shutil.copytree(world, root, symlinks=True)
    _damage(case, root)
    out = _out_path(case, root)
    before = snapshot(root)
    names = case.names or re.escape(str(out.relative_to(root) if root in out.parents else out))
    slow_work = _record_slow_work(monkeypatch)
    capfd.readouterr()
    # Execute
    started = time.perf_counter()
    status, output = _run(_argv(case, root, out), capfd)
    took = time.perf_counter() - started
    # Assert: exit 2, the file and a fix named, no traceback, nothing lost, no slow work
    assert status != "TRACEBACK", f"TRACEBACK\n{output}"
    assert status != 0, f"SILENT: exit 0\n{output[-800:]}"
    assert status == 2, f"WRONG STATUS {status}\n{output[-800:]}"
    assert "Traceback" not in output, f"TRACEBACK on stderr\n{output[-2000:]}"
    named = re.search(names, output) and re.search(FIX, output, re.IGNORECASE)
    assert named, f"WRONG MESSAGE (want {names!r} and a fix)\n{output[-800:]}"
    problem = OUT_PROBLEM.get(case.out_fault or "")
    assert not problem or re.search(problem, output), f"WRONG PROBLEM\n{output[-800:]}"
    blame = WRONG_BLAME.get(case.id.split("/", 1)[-1])
    assert not blame or not re.search(blame, output), f"WRONG PROBLEM\n{output[-800:]}"
    assert not lost(before, snapshot(root)), f"LOST {lost(before, snapshot(root))}"
    assert took < BUDGET_S, f"SLOW: refused after {took:.0f} s"
    if case.out_fault:  # an --out is checked before anything slow starts
        assert not slow_work, f"SLOW: {slow_work[0]} before refusing --out"


def test_the_tier_covers_every_command_and_fault_class():
    commands = {c.command.split()[0] for c in CASES}
    assert commands >= {"finetune", "federate", "eval", "compress", "export", "ondevice",
                        "report", "generate"}  # fmt: skip
    faults = {c.id.rsplit("/", 1)[-1] for c in CASES}
    assert faults >= {*FILE_FAULTS, *OUT_FAULTS, "already-there", "wrong-type", "wrong-shape"}
    assert len(CASES) >= 150
