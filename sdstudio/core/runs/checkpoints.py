"""A run's checkpoint folders as they lie on disk (``checkpoints/step-N/``): their names, the manifest that
proves one complete (sizes, sha256), the files in them, and which one is the newest valid. Writing one is the
trainer's (core/train/checkpoint.py); reading needs no trainer, so exports and sampling use this module."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checksums import sha256_file
from ..errors import CheckpointError

if TYPE_CHECKING:  # torch is imported where weights are read: listing and verifying checkpoints need none
    import torch

MANIFEST = "manifest.json"
FORMAT = "sdstudio-checkpoint"
FORMAT_VERSION = 1
PREFIX = "step-"
# the files a checkpoint folder holds (next to its manifest)
WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "ema.safetensors"
TRAINING_STATE = "training_state.pt"
CONFIG = "config.toml"
TOKENIZER = "tokenizer.json"
ARCHITECTURE = "model.json"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def checkpoint_step(path: Path) -> int | None:
    """The step a checkpoint folder's name says (``step-00000120`` -> 120); None for another name."""
    digits = path.name.removeprefix(PREFIX)
    return int(digits) if path.name.startswith(PREFIX) and digits.isdigit() else None


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


def is_checkpoint_dir(path: Path) -> bool:
    """Has this folder a manifest (complete, though not yet verified)?"""
    return (path / MANIFEST).is_file()


def list_checkpoints(root: Path) -> list[Path]:
    """The ``step-N`` folders under ``root``, oldest first (complete or not)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


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


def load_weights(folder: Path, name: str = WEIGHTS) -> dict[str, torch.Tensor]:
    """One safetensors file of a checkpoint (the weights, or ``EMA_WEIGHTS``)."""
    from safetensors.torch import load_file  # imports torch: on demand, the app lists runs without it

    try:
        return load_file(str(folder / name))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad files
        raise CheckpointError(f"{folder / name}: not a readable safetensors file ({exc})") from None


def read_architecture(folder: Path) -> dict[str, Any]:
    """The checkpoint's model.json (family, sizes, LoRA settings: what rebuilds the model)."""
    try:
        return json.loads((folder / ARCHITECTURE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: missing or unreadable {ARCHITECTURE} ({exc})") from None
