"""What a report knows about a run: its command, resolved config, summary and metric
lines, read once from the run directory; and the "what was run" lines and plot titles
that every report and plot opens with."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edgetune.config import config_text
from edgetune.errors import EdgetuneError
from edgetune.report import numbers
from edgetune.runs import read_jsonl

FEDERATED_COMMANDS = ("federate", "flower run")
SINGLE_COMMANDS = ("finetune", "eval")
STAGED_COMMANDS = ("compress",)
REPORTED = SINGLE_COMMANDS + FEDERATED_COMMANDS + STAGED_COMMANDS
TRAIN_METHODS = {
    "fo": "first-order (backprop)",
    "zo": "MeZO (zeroth-order)",
    "prge": "P-RGE (zeroth-order)",
    "auto": "the cheapest method that fits each device",
}


class NotARunError(EdgetuneError):
    """The report was pointed at something that is not a readable run directory."""


@dataclass(frozen=True)
class RunRecord:
    """One run directory as a report reads it."""

    path: Path
    command: str  # finetune | eval | federate | flower run
    config: dict[str, Any]
    summary: dict[str, Any]  # empty while the run has not finished
    metrics: list[dict[str, Any]] = field(default_factory=list)
    clients: list[dict[str, Any]] = field(default_factory=list)  # federated runs
    resumes: list[dict[str, Any]] = field(default_factory=list)  # one per --resume

    @property
    def federated(self) -> bool:
        return self.command in FEDERATED_COMMANDS


def _fix(path: Path) -> str:
    return (
        f"pass the --out folder of an `edgetune finetune`, `eval --out`, `federate`, "
        f"`flower run` or `compress` (it holds config.yaml and metrics.jsonl); {path} is not one"
    )


def _command_of(config: dict[str, Any]) -> str:
    """The command of an unfinished run (no summary yet), from the sections its config has."""
    if "fed" in config:
        return "federate"
    return "compress" if "prune" in config and "quantize" in config else "finetune"


def load_run(run_dir: str | Path) -> RunRecord:
    """Read the run in `run_dir`.

    Raises:
        NotARunError: `run_dir` is missing, a file, or lacks config.yaml / metrics.jsonl,
            or one of its files cannot be parsed.
    """
    path = Path(run_dir)
    if not path.is_dir():
        what = "is a file" if path.exists() else "does not exist"
        raise NotARunError(f"{path} {what}; {_fix(path)}")
    missing = [n for n in ("config.yaml", "metrics.jsonl") if not (path / n).is_file()]
    if missing:
        raise NotARunError(f"{path} has no {' and no '.join(missing)}; {_fix(path)}")
    config = _mapping(path / "config.yaml", yaml.safe_load, config_text)
    summary_path = path / "summary.json"
    summary = _mapping(summary_path, json.loads) if summary_path.is_file() else {}
    command = summary.get("command") or _command_of(config)
    if command not in REPORTED:
        raise NotARunError(
            f"{path}: summary.json names the command {command!r}, which has no report "
            f"(reports exist for {', '.join(REPORTED)} runs)"
        )
    metrics = read_jsonl(path / "metrics.jsonl")
    clients = read_jsonl(path / "clients.jsonl") if command in FEDERATED_COMMANDS else []
    resumes = read_jsonl(path / "resumes.jsonl")
    return RunRecord(path, command, config, summary, metrics, clients, resumes)


def wall_time(run: RunRecord) -> str:
    """The run's wall time in words, summed over its calls: the calls before the last
    `--resume` (`wall_s_before` in resumes.jsonl, up to the last line each logged) plus
    the last call's summary.json `wall_s`."""
    last = run.summary.get("wall_s")
    if not isinstance(last, int | float):
        return "wall time not recorded"
    if not run.resumes:
        return f"wall time {numbers.seconds(last)} s"
    before = run.resumes[-1].get("wall_s_before")
    calls = len(run.resumes) + 1
    if not isinstance(before, int | float):  # a run resumed before edgetune recorded it
        return (
            f"wall time of the last of {calls} calls {numbers.seconds(last)} s (the earlier "
            "calls' time was not recorded)"
        )
    return (
        f"wall time {numbers.seconds(before + last)} s over {calls} calls "
        f"({len(run.resumes)} --resume; the last call {numbers.seconds(last)} s)"
    )


def resumed_at(run: RunRecord) -> str:
    """Where the run was resumed, in words ("" if never)."""
    if not run.resumes:
        return ""
    points = ", ".join(
        f"{'step' if 'step' in r else 'round'} {r.get('step', r.get('round'))}" for r in run.resumes
    )
    return (
        f"Resumed {len(run.resumes)} time(s), continuing from {points} (dashed lines on the plots)."
    )


def _mapping(file: Path, parse: Any, read: Any = None) -> dict[str, Any]:
    """A run file (config.yaml, summary.json) parsed into a mapping.

    Raises:
        NotARunError: the file is empty, not UTF-8, does not parse or is not a mapping
            (damaged, or edited by hand), naming it and the fix.
    """
    try:
        data = parse(read(file) if read else file.read_text(encoding="utf-8"))
    except (ValueError, yaml.YAMLError) as exc:  # UnicodeDecodeError, JSONDecodeError too
        data = exc
    if not isinstance(data, dict):
        problem = (
            str(data).splitlines()[0]
            if isinstance(data, Exception)
            else ("empty" if data is None else f"a {type(data).__name__}, not a mapping")
        )
        raise NotARunError(
            f"{file} is damaged ({problem}); restore it from a copy of the run, or run the "
            "command that wrote it again"
        )
    return data


def short_name(spec: Any) -> str:
    """A model or dataset as a reader knows it: a built-in name stays, a path becomes
    its last part (`/data/models/stories260K` -> `stories260K`)."""
    text = str(spec or "?").rstrip("/")
    return Path(text).name if "/" in text and Path(text).is_absolute() else text


def method_name(run: RunRecord) -> str:
    """The method in words: the federated algorithm and client method, or the
    single-device method and adapter."""
    cfg = run.config
    peft = cfg.get("peft", {}).get("method", "?")
    if run.federated:
        fed = cfg.get("fed", {})
        client = TRAIN_METHODS.get(fed.get("method"), fed.get("method", "?"))
        return f"{fed.get('algorithm', '?')}, {peft}, {client}"
    if run.command == "eval":
        return "evaluation" + (" with an adapter" if run.summary.get("adapter") else ", zero-shot")
    if run.command == "compress":
        return compression(cfg)
    train = cfg.get("train", {}).get("method", "?")
    return f"{TRAIN_METHODS.get(train, train)}, {peft}"


def compression(cfg: dict[str, Any]) -> str:
    """A compress run's stages in words: "prune 0.3 (mlp,heads), recover zo, int8"."""
    prune, recover = cfg.get("prune", {}), cfg.get("recover", {})
    parts = []
    if prune.get("ratio") or prune.get("layer_ratios"):
        parts.append(f"prune {prune.get('ratio')} ({prune.get('units')})")
    if recover.get("method", "none") != "none":
        parts.append(
            f"recover {recover['method']}" + (" distilled" if recover.get("distill") else "")
        )
    if cfg.get("quantize", "none") != "none":
        parts.append(str(cfg["quantize"]))
    return ", ".join(parts) or "nothing"


def plot_title(run: RunRecord) -> str:
    """Model, data and method: the title line of every plot of this run."""
    data = short_name(run.config.get("data", {}).get("dataset"))
    return f"{short_name(run.config.get('model'))} on {data}: {method_name(run)}"


def task_name(run: RunRecord) -> str:
    """The task the run trained or evaluated: as configured, else as its metrics show."""
    task = run.config.get("data", {}).get("task")
    if task:
        return str(task)
    keys = {k for row in run.metrics for k in row}
    if "eval/accuracy" in keys:
        return "classification (inferred from the data)"
    if "eval/rougeL" in keys:
        return "instruction (inferred from the data)"
    return "lm (inferred from the data)" if "eval/perplexity" in keys else "inferred from the data"


def _adapter(cfg: dict[str, Any]) -> str:
    peft = cfg.get("peft", {})
    method = peft.get("method", "?")
    if method in ("lora", "lora-fa"):
        return f"{method} (rank {peft.get('rank')}, alpha {peft.get('alpha')})"
    return str(method)


def _data(run: RunRecord) -> str:
    data = run.config.get("data", {})
    sizes = []
    if run.summary.get("train_examples") is not None:
        sizes.append(f"{run.summary['train_examples']:,} training examples")
    if run.summary.get("eval_examples") is not None:
        sizes.append(f"{run.summary['eval_examples']:,} held-out")
    elif data.get("eval_size") is not None:
        sizes.append(f"{data['eval_size']:,} held-out")
    detail = f" ({', '.join(sizes)})" if sizes else ""
    line = f"{data.get('dataset')}{detail}, at most {data.get('max_length')} tokens per example"
    return line + packing(data)


def packing(data: dict[str, Any]) -> str:
    """For the lm task, how documents become examples ("" for other tasks)."""
    if data.get("task") != "lm":
        return ""
    docs = data.get("train_size")
    source = f"at most {docs:,} documents" if docs else "the training documents"
    return (
        f"; lm task: {source} packed end to end into blocks of {data.get('max_length')} "
        "tokens, one example per block (so the examples count blocks, not documents)"
    )


def _status(run: RunRecord) -> str:
    if not run.summary:
        return "unfinished, no summary.json yet"
    return str(run.summary.get("status", "done"))


def what_was_run(run: RunRecord) -> list[str]:
    """Markdown bullets: command, model, data, task, method, length, seed (and for a
    federation: clients, partition, fleet, algorithm and the methods devices ran)."""
    cfg = run.config
    train, optim = cfg.get("train", {}), cfg.get("optim", {})
    lines = [
        f"- **command**: `edgetune {run.command}` (status: {_status(run)})",
        f"- **model**: {cfg.get('model')}",
        f"- **data**: {_data(run)}",
        f"- **task**: {task_name(run)}",
    ]
    if run.command not in ("eval", "compress"):
        lines.append(f"- **adapter**: {_adapter(cfg)}")
    if run.federated:
        fed = cfg.get("fed", {})
        ran = run.summary.get("methods") or {}
        devices = ", ".join(f"{m} on {n} clients" for m, n in ran.items()) or "not recorded yet"
        share = fed.get("participation")
        asked = f"{share:.0%}" if isinstance(share, (int, float)) else share
        lines += [
            f"- **algorithm**: {fed.get('algorithm')} (aggregator {fed.get('aggregator')}, "
            f"server optimizer {fed.get('server_optimizer')})",
            f"- **client method**: {TRAIN_METHODS.get(fed.get('method'), fed.get('method'))}; "
            f"methods the devices ran: {devices}",
            f"- **clients**: {fed.get('clients')}, {asked} of them asked per round; "
            f"partition {fed.get('partition')}; fleet {fed.get('fleet')}",
            f"- **rounds**: {fed.get('rounds')} of {fed.get('local_steps')} local steps, "
            f"batch {train.get('batch_size')}, learning rate {optim.get('lr')}",
        ]
    elif run.command == "compress":
        lines += [
            f"- **compression**: {compression(cfg)}",
            f"- **adapter carried along**: {cfg.get('adapter') or 'none'}",
        ]
    elif run.command == "finetune":
        lines += [
            f"- **method**: {TRAIN_METHODS.get(train.get('method'), train.get('method'))}",
            f"- **steps**: {train.get('steps')} of batch {train.get('batch_size')}, "
            f"learning rate {optim.get('lr')}, evaluated every {train.get('eval_every')}",
        ]
    else:
        lines.append(f"- **adapter evaluated**: {run.summary.get('adapter') or 'none (zero-shot)'}")
    lines.append(f"- **seed**: {cfg.get('seed')}")
    return lines
