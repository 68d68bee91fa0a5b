"""Helpers for the Stable Diffusion tests (configs for tiny models, running a run to its losses)."""

from __future__ import annotations

from pathlib import Path

from sdstudio.core import events as ev
from sdstudio.core.config import RunConfig
from sdstudio.core.presets import load_preset
from sdstudio.core.train.loop import train


def sd_config(preset: str, model: Path, data: Path, **overrides) -> RunConfig:
    base = {"model.path": str(model), "data.path": str(data), "data.resolution": 64, "data.val_split": 0.0,
            "data.caption_dropout": 0.0, "train.batch_size": 4, "train.max_steps": 30, "train.log_every": 1,
            "train.warmup_steps": 0, "train.lr_scheduler": "constant", "train.device": "cpu",
            "train.mixed_precision": "no", "sample.every_steps": 0, "sample.every_epochs": 0, "sample.at_end": False,
            "sample.steps": 2, "sample.seeds": [0], "checkpoint.every_steps": 0, "loss.min_snr_gamma": 0.0,
            "loss.timestep_min": 300, "loss.timestep_max": 700}
    return load_preset(preset).with_overrides({**base, **overrides})


def losses(config: RunConfig, run_dir: Path) -> list[float]:
    events = list(train(config, run_dir=run_dir))
    assert isinstance(events[-1], ev.Finished), events[-1]
    return [e.loss for e in events if isinstance(e, ev.StepMetrics)]
