"""Building what a run needs from its config: the device, the scanned data, the model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import paths
from ..config import RunConfig
from ..data.dataset import split_validation
from ..data.report import build_report
from ..data.scan import ImageRecord, ScanResult, scan_dataset
from ..errors import DatasetError, UserError
from ..models.bundle import ModelBundle


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device = 'cuda' but no CUDA GPU is available (CPU-only torch?); use 'auto' or 'cpu'")
    if choice == "mps" and not torch.backends.mps.is_available():
        raise UserError("train.device = 'mps' but Apple's MPS is not available; use 'auto' or 'cpu'")
    return torch.device(choice)


def data_root(config: RunConfig) -> Path:
    return paths.training_data_dir(config.data.path)


@dataclass
class PreparedData:
    scan: ScanResult
    train: list[ImageRecord]
    val: list[ImageRecord]


def prepare_data(config: RunConfig, warn: Callable[[str], None]) -> PreparedData:
    """Scan the folder; problem files are skipped with one warning each; no usable image is an error."""
    root = data_root(config)
    d = config.data
    exts = [d.caption_extension] + [e for e in (".txt", ".caption") if e != d.caption_extension]
    scan = scan_dataset(root, resolution=d.resolution, caption_extensions=exts,
                        instance_prompt=d.instance_prompt or None, caption_template=d.caption_template or None)
    for problem in scan.problems:
        if problem.severity == "error":
            warn(f"skipping {problem.path}: {problem.message}")
    if not scan.records:
        summary = build_report(scan, d.resolution).get("summary", "")
        raise DatasetError(f"{root}: no usable image ({summary}); run `sdstudio dataset check {root}` for details")
    if d.val_path:
        val_scan = scan_dataset(Path(d.val_path).expanduser(), resolution=d.resolution, caption_extensions=exts,
                                instance_prompt=d.instance_prompt or None,
                                caption_template=d.caption_template or None)
        train, val = list(scan.records), list(val_scan.records)
    else:
        train, val = split_validation(scan.records, d.val_split, d.val_seed)
    return PreparedData(scan, train, val)


def build_model(config: RunConfig, captions: list[str], tokenizer_file: Path | None = None,
                device: torch.device | None = None) -> ModelBundle:
    """The run's model, built by its family (core/models/registry.py)."""
    from ..models.registry import get_family

    return get_family(config.model.family).build(config, captions, tokenizer_file=tokenizer_file, device=device)
