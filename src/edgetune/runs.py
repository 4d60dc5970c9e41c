"""The run directory: everything a training or evaluation command leaves behind.

DIR/config.yaml      the fully resolved config
DIR/metrics.jsonl    one JSON object per line; `step` + `loss` for training,
                     `eval/*` keys for evaluation. Only deterministic values go here,
                     so the same config and seed give the same file byte for byte.
DIR/timing.jsonl     wall-clock per step (`step_s`, cumulative `train_s`), kept apart
                     from metrics.jsonl because timings are not reproducible; every line
                     is stamped with `wall_s`, the run's wall time so far over all its
                     calls (a --resume carries the earlier calls' time forward)
DIR/summary.json     final figures: wall_s, peak_rss_mb, last eval/* values, status
DIR/adapter/         the trained PEFT adapter (or DIR/model/ for selective/full)
DIR/checkpoints/     step-NNNNNN/ folders for --resume
DIR/resumes.jsonl    one line per --resume: the step (or federated round) continued from,
                     damaged checkpoints dropped, settings changed, and `wall_s_before`:
                     the wall time of the calls before it, up to the last timing line the
                     interrupted call wrote (so a report sums the calls)
DIR/tensorboard/     with report_to: metrics.jsonl and the config mirrored into
DIR/mlruns/          TensorBoard / MLflow (`edgetune.track`), rebuilt on every start

Every `*.jsonl` log is read through `read_jsonl` and rewritten through `write_atomic`.
A run killed mid-append (a crash, a full disk) leaves half a line at the end: that line
is dropped with a warning and everything before it kept, since the run resumes from a
checkpoint that predates it anyway. A damaged line before the last was not left by an
interrupted append, so it is refused with its line number. Rewrites (resume trims the
lines after its checkpoint) go to a temporary sibling that replaces the file only once
it is complete on disk, so a kill during the rewrite loses nothing.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from edgetune import track
from edgetune.config import CONFIG_END, CONFIG_HEAD, read_run_config
from edgetune.console import warn
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
RUN_FOLDERS = ("checkpoints", "state", "state.tmp", "adapter", "model", *track.FOLDERS)
TMP_SUFFIX = ".tmp"  # `write_atomic`'s temporary sibling


class RunFileError(EdgetuneError):
    """A run-folder log is damaged somewhere other than a torn last line."""


# The largest resident size this process has seen: kernel marks from before any
# `reset_peak_rss`, and every `status_mb` reading. The kernel's own mark (VmHWM, which
# ru_maxrss also reads) is not raised when reclaim drops mapped file pages, so a VmRSS
# reading taken earlier can exceed the mark read later; both count toward the peak.
_peak_seen = 0.0
_libc: Any = None  # glibc, once looked up (False where there is none)


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


def trim_heap() -> bool:
    """Give the C heap's free pages back to the system (glibc's `malloc_trim(0)`); whether
    any were (False without glibc). A training process that evaluates between steps otherwise
    keeps the freed evaluation and step buffers as fragmented heap: measured on SmolLM2 /
    AG News (MeZO, 20 steps, evaluations of 300 rows at steps 0, 10 and 20), peak RSS
    1,144 MB, against 1,061 MB with a trim before and after each evaluation and 1,065 MB
    for the evaluation alone."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim  # noqa: B018 (musl and others have no malloc_trim)
        except (OSError, AttributeError):
            _libc = False
    return bool(_libc) and bool(_libc.malloc_trim(0))


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


# Torn lines already reported, so a resume that reads a log several times before it
# rewrites it warns once: (file, the dropped bytes).
_reported: set[tuple[str, bytes]] = set()


def _parse(raw: bytes) -> dict[str, Any] | str:
    """One log line as a dict, or why it is not one."""
    try:
        row = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, and UnicodeDecodeError from bytes
        return f"not JSON: {exc}"
    return row if isinstance(row, dict) else f"a JSON {type(row).__name__}, not an object"


def _drop_torn(path: Path, number: int, raw: bytes) -> None:
    """Warn (once per file and content) that the torn last line `raw` is dropped."""
    if (str(path), raw) in _reported:
        return
    _reported.add((str(path), raw))
    shown = raw[:80].decode("utf-8", "replace") + ("..." if len(raw) > 80 else "")
    warn(
        f"{path}: dropped its last line (line {number}, {len(raw)} bytes), cut short by an "
        f"interrupted write: {shown!r}; the lines before it are kept"
    )


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a run-folder log, one per line (empty if absent or empty).

    A damaged last line is what a killed append leaves: it is dropped with a warning.

    Raises:
        RunFileError: a line before the last is not a JSON object.
    """
    if not path.is_file():
        return []
    lines = [(n, raw) for n, raw in enumerate(path.read_bytes().split(b"\n"), 1) if raw.strip()]
    rows = []
    for index, (number, raw) in enumerate(lines):
        row = _parse(raw)
        if isinstance(row, dict):
            rows.append(row)
        elif index == len(lines) - 1:
            _drop_torn(path, number, raw)
        else:
            raise RunFileError(
                f"{path} line {number} is damaged ({row}); only a last line can be cut "
                f"short by an interrupted run, so this file was changed by something else. "
                f"Delete line {number} (or restore the file from a copy of the run) and run "
                f"the command again"
            )
    return rows


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` by `text` with no instant at which the file is partly written:
    write a temporary sibling, fsync it, `os.replace` it over `path`, fsync the folder."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    try:  # the rename itself is durable only once the folder is synced
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError:
        pass  # some filesystems refuse fsync on a folder; the replace is still atomic


def _ends_mid_line(path: Path) -> bool:
    """True if `path` is non-empty and its last byte is not a newline (a torn append)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() == 0:
                return False
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) != b"\n"
    except FileNotFoundError:
        return False


def check_out(path: str | Path, flag: str = "--out") -> None:
    """Refuse a folder that cannot be created or written, before any slow work starts:
    a path inside a regular file, a symbolic link that loops or points nowhere, a
    special or read-only filesystem. Creates nothing: the nearest existing ancestor is
    probed with a temporary folder that is removed at once.

    Raises:
        EdgetuneError: naming the path, the problem and the fix.
    """
    path = Path(path)
    fix = f"pass {flag} a folder you can write to"
    if path.is_symlink() and not path.exists():
        raise EdgetuneError(
            f"{flag} {path} is a symbolic link that loops or points nowhere "
            f"({os.readlink(path)}); remove the link, or {fix}"
        )
    if path.exists() and not path.is_dir():
        raise EdgetuneError(f"{flag} {path} is a file, not a folder; {fix}")
    ancestor = path
    while not ancestor.exists() and not ancestor.is_symlink() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise EdgetuneError(
            f"{flag} {path} cannot be created: {ancestor} is a file, not a folder; {fix}"
        )
    try:
        probe = tempfile.mkdtemp(prefix=".edgetune-probe-", dir=ancestor)
    except OSError as exc:
        raise EdgetuneError(
            f"{flag} {path} cannot be created in {ancestor} ({exc.strerror}: a read-only or "
            f"special filesystem, or no permission); {fix}"
        ) from None
    os.rmdir(probe)


class RunDir:
    """Reads and writes one run directory."""

    def __init__(self, path: str | Path, *, resume: bool = False, overwrite: bool = False):
        self.path = Path(path)
        self.mirror: track.Mirror | None = None  # trackers fed by `log`, once `track` opens them
        self._opened = time.perf_counter()  # this call's start, for the `wall_s` stamps
        self._wall_before: float | None = None  # earlier calls' wall time, read when needed
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
                (self.path / (name + TMP_SUFFIX)).unlink(missing_ok=True)
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
        """Write the resolved config as YAML, between the lines that say it is whole."""
        text = yaml.safe_dump(config, sort_keys=False)
        write_atomic(self.path / "config.yaml", f"{CONFIG_HEAD}\n{text}{CONFIG_END}\n")

    def read_config(self) -> dict[str, Any]:
        """The resolved config of an existing run (`config.read_run_config`)."""
        return read_run_config(self.path)

    def log(self, record: dict[str, Any], file: str = "metrics.jsonl") -> None:
        """Append one JSON line (flushed, so a killed run keeps every line written)."""
        path = self.path / file
        if _ends_mid_line(path):
            # a line appended to a torn one would glue onto it and damage the file mid-way
            self.rewrite(file, read_jsonl(path))
        if file == "timing.jsonl":
            record = {**record, "wall_s": round(self.wall_s(), 3)}
        clean = {k: _clean(v) for k, v in record.items()}
        with open(path, "a") as fh:
            fh.write(json.dumps(clean) + "\n")
        if self.mirror is not None and file == "metrics.jsonl":
            self.mirror.log(clean)

    def track(self, report_to: str, config: dict[str, Any]) -> None:
        """Mirror metrics.jsonl into the trackers of `report_to` from now on: their folders
        are rebuilt from the config and the lines already in metrics.jsonl (those a resume
        kept), so they hold exactly what metrics.jsonl holds. `write_summary` closes them.

        Raises:
            track.TrackerUnavailableError: a tracker's package is missing.
        """
        self.mirror = track.open_mirror(self.path, report_to, config)
        for row in self.read_metrics():
            self.mirror.log(row)

    def read_metrics(self, file: str = "metrics.jsonl") -> list[dict[str, Any]]:
        """All lines of a JSONL file of the run (`read_jsonl`: a torn last line dropped).

        Raises:
            RunFileError: a line before the last is damaged.
        """
        return read_jsonl(self.path / file)

    def rewrite(self, file: str, rows: list[dict[str, Any]]) -> None:
        """Replace a JSONL file of the run by `rows`, atomically (`write_atomic`)."""
        write_atomic(self.path / file, "".join(json.dumps(r) + "\n" for r in rows))

    def truncate_after(self, last: int, file: str = "metrics.jsonl", key: str = "step") -> None:
        """Drop lines whose `key` (`step`, or `round` for federated logs) is after `last`
        (resuming from a checkpoint); `last=-1` drops them all."""
        self.rewrite(file, [r for r in self.read_metrics(file) if r.get(key, 0) <= last])

    def wall_s(self) -> float:
        """The run's wall time so far: the calls before the last --resume, plus this one."""
        if self._wall_before is None:
            resumes = self.read_metrics("resumes.jsonl")
            self._wall_before = float(resumes[-1].get("wall_s_before", 0.0)) if resumes else 0.0
        return self._wall_before + time.perf_counter() - self._opened

    def log_resume(
        self, at: dict[str, int], dropped: list[str], changed: dict[str, tuple[Any, Any]]
    ) -> None:
        """One resumes.jsonl line for a --resume of any command. Call it before the logs
        are trimmed to the checkpoint: the interrupted call's last timing line tells how
        long it ran.

        Args:
            at: where the run continues from: `{"step": N}`, or `{"round": R}` federated.
            dropped: names of the damaged or diverged checkpoints removed.
            changed: dotted setting -> (value before, value now) for what this resume changed.
        """
        stamps = [r["wall_s"] for r in self.read_metrics("timing.jsonl") if "wall_s" in r]
        earlier = [r.get("wall_s_before", 0.0) for r in self.read_metrics("resumes.jsonl")]
        self._wall_before = max([0.0, *stamps, *earlier])
        changes = {k: list(v) for k, v in changed.items()}
        line = {**at, "dropped": dropped, "changed": changes, "wall_s_before": self._wall_before}
        self.log(line, file="resumes.jsonl")

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Write summary.json, the run's last act: the trackers are closed."""
        clean = {k: _clean(v) for k, v in summary.items()}
        (self.path / "summary.json").write_text(json.dumps(clean, indent=2) + "\n")
        if self.mirror is not None:  # the run ends here, finished or diverged
            self.mirror.close(str(summary.get("status", "done")))
            self.mirror = None
