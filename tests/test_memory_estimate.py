"""The GPU memory estimate: it grows with batch and resolution, checkpointing and 8-bit Adam shrink it,
and a run that will not fit gets concrete advice."""

from __future__ import annotations

from pathlib import Path

import torch

from sdstudio.core.models.sd.model import build_sd_model
from sdstudio.core.train.memory import GIB, estimate_memory, memory_advice
from tests.sd_helpers import sd_config


def test_estimate_scales_and_advises(tiny_sd1: Path, four_images: Path) -> None:
    cfg = sd_config("sd15-full", tiny_sd1, four_images, **{"train.gradient_checkpointing": False, "train.ema": False})
    bundle = build_sd_model(cfg, torch.device("cpu"))
    base = estimate_memory(bundle, cfg)
    assert base.weights > 0 and base.gradients > 0 and base.optimizer == 2 * base.gradients
    bigger = estimate_memory(bundle, cfg.with_overrides({"train.batch_size": 8}))
    assert bigger.activations == 2 * base.activations
    ckpt = estimate_memory(bundle, cfg.with_overrides({"train.gradient_checkpointing": True}))
    assert ckpt.activations < base.activations
    assert memory_advice(base, free=100 * GIB, config=cfg) is None
    advice = memory_advice(base, free=base.total / 4, config=cfg)
    assert advice is not None and "train.batch_size" in advice and "gradient_checkpointing" in advice
    assert "cache_latents" in advice and "GiB free" in advice
