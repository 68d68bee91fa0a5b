"""What an export starts from: a run's checkpoint (weights, EMA, config, architecture, run facts)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import RunConfig
from ..errors import CheckpointError
from ..presets import load_config_file
from ..runs import checkpoints as ckpt_files
from ..runs import resolve_checkpoint, run_of_checkpoint

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


@dataclass
class ExportSource:
    checkpoint: Path
    run_dir: Path | None
    config: RunConfig
    architecture: dict[str, Any]
    # what the checkpoint stores: "unet.<key>" (+ "text_encoder.<key>", "text_encoder_2.<key>" when the text
    # encoders trained); peft adapter tensors for a LoRA run, whole state dicts for a full fine-tune
    weights: dict[str, torch.Tensor]
    ema: bool
    step: int
    epoch: int
    created: float
    started: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return str(self.architecture.get("family", self.config.model.family))

    @property
    def lora(self) -> dict[str, Any] | None:
        return self.architecture.get("lora")

    @property
    def text_encoders_trained(self) -> list[str]:
        """The text encoders whose trained weights the checkpoint holds ("text_encoder", "text_encoder_2")."""
        return [name for name in TEXT_ENCODERS if any(k.startswith(f"{name}.") for k in self.weights)]


_ADAPTER = re.compile(r"\.(lora_[AB]|lora_embedding_[AB]|lora_magnitude_vector|hada_\w+?|lokr_\w+?|oft_R)"
                      r"\.default(\.|$)")


def _ema_as_weights(ema: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """EMA tensors are named like trainable parameters ("unet.x.lora_A.default.weight",
    "text_encoder.x.lora_A.default.weight"); map them onto the checkpoint's weight names
    ("unet.x.lora_A.weight").
    Parameters the EMA does not track (frozen ones) keep the checkpoint's tensors."""
    out = dict(weights)
    for name, tensor in ema.items():
        key = _ADAPTER.sub(r".\1\2", name)
        if key not in out and key.endswith(".weight"):  # DoRA's magnitude is saved without ".weight"
            key = key[: -len(".weight")]
        if key in out:
            out[key] = tensor
    return out


def load_export_source(path: Path, *, use_ema: bool = False, best: bool = False) -> ExportSource:
    """A run folder (its newest valid checkpoint, or the best with ``best``) or a checkpoint folder."""
    folder = resolve_checkpoint(path, best=best)
    info = ckpt_files.verify_checkpoint(folder)
    config = load_config_file(folder / ckpt_files.CONFIG)
    arch = ckpt_files.read_architecture(folder)
    weights = ckpt_files.load_weights(folder)
    if use_ema:
        if not (folder / ckpt_files.EMA_WEIGHTS).is_file():
            raise CheckpointError(f"{folder}: --ema asked for, but this run trained without EMA (train.ema = false)")
        weights = _ema_as_weights(ckpt_files.load_weights(folder, ckpt_files.EMA_WEIGHTS), weights)
    run = run_of_checkpoint(folder)
    started = None
    if run is not None:
        rows = run.metrics_rows()
        started = next((float(r["time"]) for r in rows if r.get("event") == "started"), None)
    return ExportSource(folder, run.path if run is not None else None, config, arch, weights, use_ema, info.step, info.epoch,
                        float(info.manifest.get("created", 0.0)), started)


def lora_peft_state(source: ExportSource, prefix: str = "unet.") -> dict[str, torch.Tensor]:
    """The PEFT-named adapter tensors of one module ("down_blocks.0....to_q.lora_A.weight"); prefix
    "text_encoder." / "text_encoder_2." for a text-encoder LoRA ("encoder.layers.0.self_attn.q_proj.lora_A...")."""
    if source.lora is None:
        raise CheckpointError(f"{source.checkpoint}: a full fine-tune, not a LoRA run; export it as "
                              "single-file or diffusers-folder")
    out = {k[len(prefix):]: v for k, v in source.weights.items() if k.startswith(prefix)}
    if not out:
        raise CheckpointError(f"{source.checkpoint}: no LoRA weights under {prefix!r}")
    return out


def describe_json(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), sort_keys=True)
