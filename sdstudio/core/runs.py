"""Run directories: the config snapshot, metrics.jsonl, the log file, the lock, samples and exports."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from . import paths
from .atomic import write_text_atomic
from .config import RunConfig
from .errors import RunDirError
from .presets import config_to_toml, load_config_file

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
LOG_FILE = "run.log"
LOCK_FILE = "lock"


def default_run_dir(preset: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = paths.runs_dir() / f"{stamp}-{preset or 'custom'}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def is_run_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def prepare_new_run_dir(path: Path) -> Path:
    """Create a fresh run folder; an existing non-empty folder is refused (a run is continued with resume instead)."""
    if path.exists() and any(path.iterdir()):
        hint = " (it is a run: continue it with `resume`)" if is_run_dir(path) else ""
        raise RunDirError(f"{path}: folder exists and is not empty{hint}; choose another `out`")
    try:
        for sub in ("", "samples", "checkpoints", "exports"):
            (path / sub).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"{path}: cannot create the run folder ({exc.strerror}); choose another `out`") from None
    return path


def save_run_config(run_dir: Path, config: RunConfig) -> None:
    write_text_atomic(run_dir / CONFIG_FILE, config_to_toml(config))


def load_run_config(run_dir: Path) -> RunConfig:
    if not is_run_dir(run_dir):
        raise RunDirError(f"{run_dir}: not an sdstudio run folder (no {CONFIG_FILE})")
    return load_config_file(run_dir / CONFIG_FILE)


# -- lock -------------------------------------------------------------------------------------------------
def pid_alive(pid: int) -> bool:
    """Is a process with this pid running? (psutil: os.kill(pid, 0) would terminate it on Windows.)"""
    import psutil

    return pid > 0 and psutil.pid_exists(pid)


class RunLock:
    """One writer per run folder: a lock file holding the owner's pid; stale locks are taken over."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self.held = False

    def acquire(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or "0")
                except (OSError, ValueError):
                    pid = 0
                if pid != os.getpid() and pid_alive(pid):
                    raise RunDirError(f"{self.path.parent}: another sdstudio process (pid {pid}) is writing "
                                      "this run; stop it first or use another folder") from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(str(os.getpid()))
            self.held = True
            return
        raise RunDirError(f"{self.path}: could not take the run lock")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


# -- metrics ----------------------------------------------------------------------------------------------
class MetricsWriter:
    """Appends one JSON object per line and flushes, so a crash loses at most the line being written.

    ``mirror`` also receives every row written (the run's TensorBoard log)."""

    def __init__(self, path: Path, mirror: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.path = path
        self.mirror = mirror
        self._fh: TextIO | None = open(path, "a", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        if self._fh is None:
            return
        try:
            self._fh.write(json.dumps(row, separators=(",", ":")) + "\n")
            self._fh.flush()
        except OSError as exc:
            self.close_quietly()
            raise RunDirError(f"{self.path}: cannot append metrics ({exc.strerror or exc}); free disk space or make "
                              "the run folder writable, then resume the run (its last checkpoint is intact)") from exc
        if self.mirror is not None:
            self.mirror(row)

    def close_quietly(self) -> None:
        try:
            self.close()
        except OSError:
            self._fh = None

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All complete rows; a truncated or garbled line (a kill mid-write) is skipped, never fatal."""
    rows: list[dict[str, Any]] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict):
                    rows.append(row)
    except FileNotFoundError:
        pass
    return rows


def truncate_metrics_after(path: Path, step: int) -> None:
    """On resume: drop rows logged after the checkpoint's step (rewritten atomically)."""
    rows = [r for r in read_metrics(path) if int(r.get("step", 0)) <= step]
    write_text_atomic(path, "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows))


def metrics_row(kind: str, step: int, epoch: int, **values: Any) -> dict[str, Any]:
    return {"step": step, "epoch": epoch, "time": round(time.time(), 3), "kind": kind, **values}


# -- log file ---------------------------------------------------------------------------------------------
def open_run_log(run_dir: Path) -> logging.Handler:
    """Attach a file handler for the ``sdstudio`` logger writing run.log; the caller removes it."""
    handler = logging.FileHandler(run_dir / LOG_FILE, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.setLevel(logging.INFO)
    logger = logging.getLogger("sdstudio")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return handler


def close_run_log(handler: logging.Handler) -> None:
    logging.getLogger("sdstudio").removeHandler(handler)
    handler.close()


def list_runs(root: Path | None = None) -> list[Path]:
    root = root or paths.runs_dir()
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and is_run_dir(p)), reverse=True)
