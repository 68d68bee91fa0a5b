"""A run card (``run-card.json``): what is needed to do a run again and to tell whether it can be done bit
for bit: the full config, a manifest of the dataset (relative file names, sizes, sha256), the versions of
the libraries and of sdstudio, the device, the seeds and the command line.

The card is written once, when a run starts (a resume keeps it); ``sdstudio rerun`` reads it back,
checks the dataset against the manifest and the environment against the versions, and says what differs."""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from ... import __version__
from ..checksums import sha256_file
from ..config import RunConfig
from ..errors import RunDirError
from ..paths import training_data_dir
from .folder import CARD_FILE

CARD_VERSION = 1
LIBRARIES = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "numpy", "pillow")
CAPTION_SUFFIXES = (".txt", ".caption")
# sidecar files that belong to the dataset as a whole (imagefolder captions, masks are per image)
FOLDER_FILES = ("metadata.jsonl",)


@dataclass
class ManifestDiff:
    """How a dataset folder differs from a card's manifest (relative paths)."""

    missing: list[str]
    changed: list[str]
    added: list[str]

    @property
    def same(self) -> bool:
        return not (self.missing or self.changed or self.added)

    def describe(self, limit: int = 5) -> str:
        parts = []
        for label, names in (("missing", self.missing), ("changed", self.changed), ("new", self.added)):
            if names:
                shown = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
                parts.append(f"{len(names)} {label} ({shown})")
        return "; ".join(parts) if parts else "the same files"


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "sdstudio": __version__}
    for name in LIBRARIES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            continue
    return versions


def device_description(device: Any) -> dict[str, Any]:
    """The device a run trains on: its type, and the GPU's name and CUDA version on a GPU."""
    import torch

    kind = getattr(device, "type", str(device))
    out: dict[str, Any] = {"type": kind, "platform": platform.platform(), "machine": platform.machine()}
    if kind == "cuda" and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(device)
        out["cuda"] = torch.version.cuda
        out["gpu_count"] = torch.cuda.device_count()
    return out


def dataset_files(root: Path, image_paths: list[Path]) -> list[Path]:
    """The files a run reads: its images, their caption sidecars and the folder's metadata.jsonl."""
    files: set[Path] = set()
    for image in image_paths:
        files.add(image)
        for suffix in CAPTION_SUFFIXES:
            sidecar = image.with_suffix(suffix)
            if sidecar.is_file():
                files.add(sidecar)
    for name in FOLDER_FILES:
        for found in root.rglob(name):
            files.add(found)
    return sorted(files)


def dataset_manifest(root: Path, files: list[Path]) -> dict[str, dict[str, Any]]:
    """{relative path (posix): {"size", "sha256"}} of ``files`` under ``root``."""
    out: dict[str, dict[str, Any]] = {}
    for path in files:
        try:
            rel = path.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            rel = str(path)
        out[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return out


def compare_manifest(manifest: dict[str, dict[str, Any]], current: dict[str, dict[str, Any]]) -> ManifestDiff:
    missing = sorted(set(manifest) - set(current))
    added = sorted(set(current) - set(manifest))
    changed = sorted(k for k in set(manifest) & set(current) if manifest[k].get("sha256") != current[k].get("sha256"))
    return ManifestDiff(missing, changed, added)


def build_card(config: RunConfig, *, image_paths: list[Path], device: Any, command: list[str] | None = None,
               reg_image_paths: list[Path] | None = None) -> dict[str, Any]:
    """The card of a run about to start (its config already final)."""
    root = training_data_dir(config.data.path)
    card: dict[str, Any] = {
        "card_version": CARD_VERSION,
        "created": time.time(),
        "config": config.to_dict(),
        "dataset": {"root": str(root), "files": dataset_manifest(root, dataset_files(root, image_paths))},
        "versions": library_versions(),
        "device": device_description(device),
        "seeds": {"train": config.train.seed, "validation_split": config.data.val_seed,
                  "samples": list(config.sample.seeds)},
        "command": list(sys.argv if command is None else command),
    }
    if reg_image_paths and config.data.reg_path:
        reg_root = Path(config.data.reg_path).expanduser()
        card["reg_dataset"] = {"root": str(reg_root),
                               "files": dataset_manifest(reg_root, dataset_files(reg_root, reg_image_paths))}
    return card


def read_card(path: Path) -> dict[str, Any]:
    """A card from a run folder or a ``run-card.json`` file; RunDirError naming the file when unreadable."""
    file = path / CARD_FILE if path.is_dir() else path
    try:
        card = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunDirError(f"{path}: no {CARD_FILE} (runs started before run cards existed have none)") from None
    except (OSError, ValueError) as exc:
        raise RunDirError(f"{file}: not a readable run card ({exc})") from None
    if not isinstance(card, dict) or "config" not in card:
        raise RunDirError(f"{file}: not a run card (no config)")
    return card


def card_config(card: dict[str, Any]) -> RunConfig:
    return RunConfig.from_dict(card["config"], source=CARD_FILE)


def card_summary(card: dict[str, Any]) -> dict[str, Any]:
    """The short form that exported files carry in their metadata: enough to find and judge the run again."""
    files = card.get("dataset", {}).get("files", {})
    manifest_hash = _manifest_hash(files)
    device = card.get("device", {})
    return {"created": card.get("created"), "versions": card.get("versions", {}),
            "device": device.get("gpu") or device.get("type"), "seeds": card.get("seeds", {}),
            "dataset_files": len(files), "dataset_sha256": manifest_hash, "command": card.get("command", [])}


def _manifest_hash(files: dict[str, dict[str, Any]]) -> str:
    """One sha256 over the sorted (name, sha256) pairs: two datasets with the same files share it."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\0{files[name].get('sha256', '')}\n".encode())
    return digest.hexdigest()


def environment_differences(card: dict[str, Any], device: Any) -> list[str]:
    """Where this machine differs from the card's (library versions, device): why a rerun may not be bit for bit."""
    notes = []
    then = card.get("versions", {})
    now = library_versions()
    for name in sorted(set(then) | set(now)):
        if then.get(name) != now.get(name):
            notes.append(f"{name} {then.get(name, 'absent')} then, {now.get(name, 'absent')} now")
    then_dev = card.get("device", {})
    now_dev = device_description(device)
    for key in ("type", "gpu", "cuda"):
        if then_dev.get(key) != now_dev.get(key):
            notes.append(f"device {key} {then_dev.get(key, 'none')} then, {now_dev.get(key, 'none')} now")
    return notes
