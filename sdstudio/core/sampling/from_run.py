"""Load a trained checkpoint for sampling outside a training run (CLI `sample`, the app, evaluation)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import RunConfig
from ..models.bundle import ModelBundle
from ..presets import load_config_file
from ..runs import resolve_checkpoint
from ..runs.checkpoints import TOKENIZER
from ..train import state as ckpt_state
from ..train.objective import training_schedule
from ..train.setup import build_model, pick_device
from .sampler import generate

__all__ = ["LoadedModel", "load_trained", "resolve_checkpoint"]  # resolve_checkpoint: the run folder's


@dataclass
class LoadedModel:
    config: RunConfig
    bundle: ModelBundle
    scheduler: Any
    device: torch.device
    checkpoint: Path
    ema_used: bool

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], *, steps: int | None = None,
                 guidance: float | None = None, sampler: str | None = None,
                 negative_prompt: str | None = None, size: tuple[int, int] | None = None) -> np.ndarray:
        s = self.config.sample
        return generate(self.bundle, self.bundle.trainable, self.scheduler, list(prompts), list(seeds),
                        steps=steps or s.steps, guidance=s.guidance if guidance is None else guidance,
                        sampler=sampler or s.sampler,
                        negative_prompt=s.negative_prompt if negative_prompt is None else negative_prompt,
                        device=self.device, autocast_dtype=self.autocast_dtype, size=size)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """A run trained in fp16/bf16 keeps its frozen weights in that dtype: sample under autocast, as the run's
        previews did (fp32 latents against bf16 weights fail otherwise)."""
        dtype = getattr(self.bundle, "weight_dtype", torch.float32)
        return dtype if dtype != torch.float32 else None


def load_trained(run_or_checkpoint: Path, checkpoint: Path | None = None, *, use_ema: bool = True,
                 device: str = "auto") -> LoadedModel:
    folder = resolve_checkpoint(run_or_checkpoint, checkpoint)
    config = load_config_file(folder / ckpt_state.CONFIG)
    tokenizer = folder / TOKENIZER
    dev = pick_device(device)
    bundle = build_model(config, [], tokenizer_file=tokenizer if tokenizer.is_file() else None, device=dev)
    ckpt_state.load_model_state(bundle, ckpt_state.load_weights(folder), folder)
    ema_used = False
    if use_ema and (folder / ckpt_state.EMA_WEIGHTS).is_file():
        shadow = ckpt_state.load_weights(folder, ckpt_state.EMA_WEIGHTS)
        params = dict(bundle.trainable.named_parameters())
        with torch.no_grad():
            for name, tensor in shadow.items():
                if name in params:
                    params[name].copy_(tensor)
        ema_used = True
    bundle.trainable.to(dev).eval()
    sched = training_schedule(config, bundle, dev)  # what its previews sampled with
    return LoadedModel(config, bundle, sched, dev, folder, ema_used)
