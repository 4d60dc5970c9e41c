"""The run directory: everything a training or evaluation command leaves behind.

DIR/config.yaml      the fully resolved config
DIR/metrics.jsonl    one JSON object per line; `step` + `loss` for training,
                     `eval/*` keys for evaluation. Only deterministic values go here,
                     so the same config and seed give the same file byte for byte.
DIR/timing.jsonl     wall-clock per step (`step_s`, cumulative `train_s`), kept apart
                     from metrics.jsonl because timings are not reproducible
DIR/summary.json     final figures: wall_s, peak_rss_mb, last eval/* values, status
DIR/adapter/         the trained PEFT adapter (or DIR/model/ for selective/full)
DIR/checkpoints/     step-NNNNNN/ folders for --resume
DIR/resumes.jsonl    one line per --resume: the step continued from, damaged checkpoints
                     dropped, settings changed
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
from pathlib import Path
from typing import Any

import yaml

from edgetune.errors import EdgetuneError

RUN_FILES = (
    "config.yaml",
    "metrics.jsonl",
    "summary.json",
    "trace.jsonl",
    "timing.jsonl",
    "clients.jsonl",
    "report.md",
    "resumes.jsonl",
)
RUN_FOLDERS = ("checkpoints", "state", "state.tmp", "adapter", "model")


# The largest resident size this process has seen: kernel marks from before any
# `reset_peak_rss`, and every `status_mb` reading. The kernel's own mark (VmHWM, which
# ru_maxrss also reads) is not raised when reclaim drops mapped file pages, so a VmRSS
# reading taken earlier can exceed the mark read later; both count toward the peak.
_peak_seen = 0.0


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports KB), including
    peaks from before any `reset_peak_rss` and every `status_mb` reading."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return max(own, _peak_seen)


def status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmHWM = peak RSS, VmRSS = current), in MB."""
    global _peak_seen
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    mb = int(line.split()[1]) / 1024.0
                    if field in ("VmRSS", "VmHWM"):
                        _peak_seen = max(_peak_seen, mb)
                    return mb
    except OSError:
        pass
    return float("nan")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS, so the next
    `status_mb("VmHWM")` measures only what follows. False where Linux does not allow it."""
    global _peak_seen
    _peak_seen = max(peak_rss_mb(), status_mb("VmHWM"))  # the first holds _peak_seen
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the line parseable
    return value


class RunDir:
    """Reads and writes one run directory."""

    def __init__(self, path: str | Path, *, resume: bool = False, overwrite: bool = False):
        self.path = Path(path)
        if resume and not (self.path / "config.yaml").exists():
            raise EdgetuneError(
                f"cannot resume {self.path}: no run there (config.yaml is missing); start a "
                f"new run with --out {self.path}"
            )
        if self.path.exists() and (self.path / "metrics.jsonl").exists() and not resume:
            if not overwrite:
                raise EdgetuneError(
                    f"{self.path} already holds a run; pass --resume {self.path} to continue "
                    f"it, --overwrite to replace it, or another --out"
                )
            # Everything a run writes goes, so nothing of the old run (log lines, a
            # checkpoint a later --resume would pick up) mixes into the new one.
            for name in RUN_FILES:
                (self.path / name).unlink(missing_ok=True)
            for name in RUN_FOLDERS:
                shutil.rmtree(self.path / name, ignore_errors=True)
        if self.path.exists() and not self.path.is_dir():
            raise EdgetuneError(
                f"--out {self.path} is a file, not a folder; pass a folder for the run "
                f"(it is created if missing)"
            )
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EdgetuneError(
                f"cannot create the run folder {self.path} ({exc.strerror}); pass --out a "
                f"folder you can write to"
            ) from None
        if not os.access(self.path, os.W_OK):
            raise EdgetuneError(
                f"cannot write to the run folder {self.path} (permission denied); pass --out "
                f"a folder you can write to"
            )

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def write_config(self, config: dict[str, Any]) -> None:
        """Write the resolved config as YAML."""
        (self.path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    def read_config(self) -> dict[str, Any]:
        """The resolved config of an existing run."""
        path = self.path / "config.yaml"
        if not path.exists():
            raise EdgetuneError(f"{self.path} has no config.yaml; is it a run directory?")
        try:
            config = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            config = exc
        if not isinstance(config, dict):
            raise EdgetuneError(
                f"{path} is damaged (not a YAML mapping of config sections: {config}); "
                "restore it from a copy of the run, or start a new run with --out"
            )
        return config

    def log(self, record: dict[str, Any], file: str = "metrics.jsonl") -> None:
        """Append one JSON line (flushed, so a killed run keeps every line written)."""
        line = json.dumps({k: _clean(v) for k, v in record.items()})
        with open(self.path / file, "a") as fh:
            fh.write(line + "\n")

    def read_metrics(self, file: str = "metrics.jsonl") -> list[dict[str, Any]]:
        """All lines of a JSONL file (empty if absent)."""
        path = self.path / file
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def truncate_after(self, step: int, file: str = "metrics.jsonl") -> None:
        """Drop lines logged after `step` (used when resuming from a checkpoint)."""
        kept = [r for r in self.read_metrics(file) if r.get("step", 0) <= step]
        (self.path / file).write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Write summary.json."""
        clean = {k: _clean(v) for k, v in summary.items()}
        (self.path / "summary.json").write_text(json.dumps(clean, indent=2) + "\n")
