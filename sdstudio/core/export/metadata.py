"""Header metadata other tools read (kohya ss_*, Stability's modelspec.*) and atomic safetensors writes."""

from __future__ import annotations

import hashlib
import json
import struct
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from ... import __version__
from .. import paths
from ..atomic import write_bytes_atomic
from ..data.scan import scan_dataset
from ..errors import UserError
from ..models.registry import get_family
from ..runs import RunFolder
from ..runs.card import card_summary
from .source import ExportSource


def _iso(ts: float | None) -> str:
    if not ts:
        return ""
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds")


def _dataset_facts(source: ExportSource) -> tuple[dict[str, Any], dict[str, Any], int]:
    """(ss_tag_frequency, ss_dataset_dirs, number of training images); best effort if the folder moved."""
    root = paths.training_data_dir(source.config.data.path)
    try:
        scan = scan_dataset(root)
    except UserError:
        return {}, {}, 0
    tags: dict[str, Counter[str]] = {}
    dirs: dict[str, dict[str, int]] = {}
    for record in scan.records:
        label = record.concept or root.name
        counter = tags.setdefault(label, Counter())
        for caption in record.captions[:1]:
            for tag in (t.strip() for t in caption.split(",")):
                if tag:
                    counter[tag] += 1
        entry = dirs.setdefault(label, {"n_repeats": record.repeats, "img_count": 0})
        entry["img_count"] += 1
    return ({k: dict(v) for k, v in tags.items()}, dirs, len(scan.records))


def _run_card_summary(source: ExportSource) -> dict[str, Any] | None:
    """The run card's summary (versions, device, seeds, dataset hash, command line) of the exported run."""
    if source.run_dir is None:
        return None
    try:
        return card_summary(RunFolder(source.run_dir).read_card())
    except UserError:
        return None


def training_metadata(source: ExportSource, *, title: str, lora: bool) -> dict[str, str]:
    cfg = source.config
    family = get_family(source.family)
    tags, dirs, n_images = _dataset_facts(source)
    res = cfg.data.resolution
    pred = source.architecture.get("prediction_type") or cfg.diffusion.prediction_type
    meta: dict[str, Any] = {
        "ss_v2": "True",
        "ss_base_model_version": family.base_model_version(pred),
        "ss_sd_model_name": Path(cfg.model.path).name if cfg.model.path else "",
        "ss_resolution": f"({res}, {res})",
        "ss_num_train_images": n_images,
        "ss_tag_frequency": json.dumps(tags),
        "ss_dataset_dirs": json.dumps(dirs),
        "ss_steps": source.step,
        "ss_epoch": source.epoch,
        "ss_learning_rate": cfg.train.learning_rate,
        "ss_unet_lr": cfg.train.learning_rate,
        "ss_text_encoder_lr": cfg.train.text_encoder_lr or cfg.train.learning_rate,
        "ss_optimizer": cfg.train.optimizer,
        "ss_lr_scheduler": cfg.train.lr_scheduler,
        "ss_seed": cfg.train.seed,
        "ss_mixed_precision": cfg.train.mixed_precision,
        "ss_min_snr_gamma": cfg.loss.min_snr_gamma,
        "ss_noise_offset": cfg.loss.noise_offset,
        "ss_training_started_at": source.started or "",
        "ss_training_finished_at": source.created,
        "ss_output_name": title,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": (family.modelspec_architecture or family.name) + ("/lora" if lora else ""),
        "modelspec.implementation": "diffusers",
        "modelspec.title": title,
        "modelspec.date": _iso(source.created) or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.prediction_type": "v" if pred == "v_prediction" else "epsilon",
        "sdstudio_version": __version__,
        "sdstudio_config": json.dumps(cfg.to_dict(), sort_keys=True),
        "sdstudio_ema": str(source.ema),
    }
    if cfg.data.instance_prompt:
        meta["modelspec.trigger_phrase"] = cfg.data.instance_prompt
    text_trained = bool(source.text_encoders_trained)
    if not text_trained:
        meta["ss_text_encoder_lr"] = 0.0  # the text encoder(s) did not train: no LR applied to them
    if lora and source.lora is not None:
        meta.update({"ss_network_module": "networks.lora", "ss_network_dim": source.lora["rank"],
                     "ss_network_alpha": source.lora["alpha"],
                     # kohya's flag: False = the file also holds text-encoder modules (lora_te*_)
                     "ss_network_train_unet_only": not text_trained,
                     "ss_network_args": json.dumps({"targets": source.lora["targets"],
                                                    "dropout": source.lora["dropout"],
                                                    "text_encoder": text_trained})})
    meta["sdstudio_text_encoder_trained"] = text_trained
    card = _run_card_summary(source)
    if card is not None:
        meta["sdstudio_run_card"] = json.dumps(card, sort_keys=True)
    return {k: str(v) for k, v in meta.items()}


def tensor_data_sha256(blob: bytes) -> str:
    """sha256 of a safetensors file's tensor bytes (without the header): what UIs show as the model hash."""
    (header_len,) = struct.unpack("<Q", blob[:8])
    return hashlib.sha256(memoryview(blob)[8 + header_len:]).hexdigest()


def cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str], *,
                      force: bool = False) -> Path:
    """Write atomically (temp name + rename); the tensor-data sha256 goes into the header."""
    if path.exists() and not force:
        raise UserError(f"{path}: exists already; choose another `out` or pass `force` to overwrite it")
    data_hash = tensor_data_sha256(save(tensors))
    meta = {**metadata, "sshs_model_hash": data_hash, "sdstudio_tensor_sha256": data_hash}
    blob = save(tensors, metadata=meta)
    try:
        write_bytes_atomic(path, blob)
    except OSError as exc:
        raise UserError(f"{path}: could not write the export ({exc.strerror or exc}); it needs "
                        f"{len(blob) / 1e6:.1f} MB of free space; nothing was written") from None
    return path
