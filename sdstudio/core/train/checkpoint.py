"""Writing checkpoints: into a temp folder, given a manifest (sizes, sha256), then renamed; and pruning old ones.

Reading them (verify, list, the newest valid) is the run folder's: sdstudio/core/runs/checkpoints.py."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..checksums import sha256_file
from ..errors import CheckpointError
from ..runs.checkpoints import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    CheckpointInfo,
    checkpoint_name,
    list_checkpoints,
    newest_valid_checkpoint,
    valid_checkpoints,
    verify_checkpoint,
)

# the readers are re-exported: the trainer's modules and older scripts import them from here
__all__ = ["CheckpointInfo", "checkpoint_name", "list_checkpoints", "newest_valid_checkpoint", "prune_checkpoints",
           "valid_checkpoints", "verify_checkpoint", "write_checkpoint"]
log = logging.getLogger("sdstudio")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_checkpoint(root: Path, step: int, epoch: int, fill: Callable[[Path], None],
                     extra: dict[str, Any] | None = None) -> Path:
    """Write ``checkpoints/step-N`` atomically: ``fill(folder)`` writes the files into a temp folder,
    which gets a manifest (sizes, sha256) and is then renamed.

    On any failure (disk full, permission) the temp folder is removed and the error re-raised with the
    path; earlier checkpoints are untouched.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        fill(tmp)
        files: dict[str, dict[str, Any]] = {}
        for target in sorted(p for p in tmp.rglob("*") if p.is_file()):
            with open(target, "rb+") as fh:
                os.fsync(fh.fileno())
            files[target.relative_to(tmp).as_posix()] = {"size": target.stat().st_size,
                                                         "sha256": sha256_file(target)}
        manifest = {"format": FORMAT, "version": FORMAT_VERSION, "step": step, "epoch": epoch,
                    "created": time.time(), "files": files, **(extra or {})}
        with open(tmp / MANIFEST, "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        if final.exists():  # a checkpoint of the same step (save-now twice): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        need = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) if tmp.exists() else 0
        raise CheckpointError(f"could not write checkpoint {final}: {exc.strerror or exc}; free disk space "
                              f"or make the folder writable (a checkpoint needs about "
                              f"{_estimate_size(root, need)}); the previous checkpoint is still valid") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _estimate_size(root: Path, fallback: int) -> str:
    sizes = [sum(f.stat().st_size for f in p.iterdir() if f.is_file()) for p in valid_checkpoints(root)[-1:]]
    n = sizes[0] if sizes else fallback
    return f"{n / 1e6:.1f} MB" if n else "as much as the model's weights"


def prune_checkpoints(root: Path, keep_last: int, protect: set[Path] | None = None) -> list[Path]:
    """Delete all but the newest ``keep_last`` valid checkpoints (and leftovers of failed writes)."""
    removed = []
    for leftover in root.glob(".tmp-step-*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid != str(os.getpid()):
            shutil.rmtree(leftover, ignore_errors=True)
    valid = valid_checkpoints(root)
    keep = set(valid[-keep_last:]) | (protect or set())
    for path in valid[:-keep_last] if keep_last > 0 else []:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
