"""Checkpoints: written to a temp folder and renamed, with a manifest (sizes, sha256) verified on load."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checksums import sha256_file
from ..errors import CheckpointError

MANIFEST = "manifest.json"
FORMAT = "sdstudio-checkpoint"
FORMAT_VERSION = 1
log = logging.getLogger("sdstudio")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


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


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    epoch: int
    manifest: dict[str, Any]


def verify_checkpoint(path: Path, *, deep: bool = True) -> CheckpointInfo:
    """Check the manifest, every file's size and (``deep``) sha256. Raises CheckpointError saying why."""
    mpath = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {MANIFEST} (partial or not an sdstudio checkpoint)") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{mpath}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an sdstudio checkpoint (manifest format "
                              f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
    for name, meta in manifest.get("files", {}).items():
        fpath = path / name
        if not fpath.is_file():
            raise CheckpointError(f"{fpath}: missing (checkpoint incomplete)")
        size = fpath.stat().st_size
        if size != meta.get("size"):
            raise CheckpointError(f"{fpath}: {size} bytes, the manifest says {meta.get('size')} (truncated)")
        if deep and sha256_file(fpath) != meta.get("sha256"):
            raise CheckpointError(f"{fpath}: content does not match its sha256 in the manifest (corrupt)")
    return CheckpointInfo(path, int(manifest["step"]), int(manifest.get("epoch", 0)), manifest)


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def valid_checkpoints(root: Path) -> list[Path]:
    out = []
    for p in list_checkpoints(root):
        try:
            verify_checkpoint(p, deep=False)
            out.append(p)
        except CheckpointError:
            pass
    return out


def newest_valid_checkpoint(root: Path, warn: Callable[[str], None] | None = None) -> CheckpointInfo:
    """The newest checkpoint that verifies; corrupt newer ones are reported through ``warn``."""
    candidates = list_checkpoints(root)
    for path in reversed(candidates):
        try:
            return verify_checkpoint(path, deep=True)
        except CheckpointError as exc:
            if warn:
                warn(f"skipping checkpoint {path.name}: {exc}")
    if candidates:
        raise CheckpointError(f"{root}: none of the {len(candidates)} checkpoints is valid; the run cannot "
                              "be resumed (start a new run)")
    raise CheckpointError(f"{root}: no checkpoint to resume from (the run stopped before its first save)")


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
