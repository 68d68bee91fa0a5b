"""One writer per run folder: the ``lock`` file holding the writing process's pid."""

from __future__ import annotations

import os
from pathlib import Path

import psutil

from ..errors import RunDirError

LOCK_FILE = "lock"


def pid_alive(pid: int) -> bool:
    """Is a process with this pid running? (psutil: os.kill(pid, 0) would terminate it on Windows.)"""
    return pid > 0 and psutil.pid_exists(pid)


def lock_owner(lock_file: Path) -> int:
    """The pid a lock file names; 0 when there is none or it is unreadable."""
    try:
        return int(lock_file.read_text().strip() or "0")
    except (OSError, ValueError):
        return 0


def held_by_live_process(lock_file: Path) -> bool:
    """A lock whose writer still runs (a crashed run leaves a stale lock behind)."""
    pid = lock_owner(lock_file)
    return pid == os.getpid() or pid_alive(pid)


class RunLock:
    """One writer per folder (a run's, a sweep's): FOLDER/lock holding the owner's pid; stale locks are taken over."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_FILE
        self.held = False

    def acquire(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid = lock_owner(self.path)
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
