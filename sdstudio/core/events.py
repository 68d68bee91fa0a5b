"""What the training loop yields. Frozen dataclasses; images are uint8 numpy arrays (HxWx3)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Event:
    pass


@dataclass(frozen=True)
class Started(Event):
    run_dir: Path
    config: dict[str, Any]
    total_steps: int
    resumed_from_step: int = 0


@dataclass(frozen=True)
class Status(Event):
    """A phase: scanning, caching, building, compiling, training, sampling, saving, paused."""

    phase: str
    text: str


@dataclass(frozen=True)
class Progress(Event):
    done: int
    total: int
    what: str


@dataclass(frozen=True)
class StepMetrics(Event):
    step: int
    epoch: int
    loss: float
    lr: float
    grad_norm: float
    img_per_s: float
    total_steps: int
    eta_s: float


@dataclass(frozen=True)
class ValidationResult(Event):
    step: int
    epoch: int
    val_loss: float
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalResult(Event):
    """FID / KID of generated images against the validation images (eval section of the config).

    ``fid``/``kid_mean``/``kid_std`` are None when not computed; ``note`` says why (no weights file,
    too few images) or how to read the numbers (FID below 2048 images is not meaningful: read KID).
    The metrics.jsonl row has kind "val" (the contract's kinds) with these keys and no ``val_loss``."""

    step: int
    epoch: int
    fid: float | None
    kid_mean: float | None
    kid_std: float | None
    n_generated: int
    n_real: int
    fid_meaningful: bool = False
    note: str = ""


@dataclass(frozen=True)
class SampleGrid(Event):
    step: int
    epoch: int
    image: np.ndarray = field(repr=False)
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    path: Path | None = None
    # On the bundled demo data: colour_acc / shape_acc / both_acc of this grid (the demo's classifier).
    scores: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class MemorisationResult(Event):
    """How close the samples of one grid are to the training images and how much they differ across seeds
    (``eval.memorisation``; core/metrics/memorisation.py). ``ratio``: median nearest-training-image distance
    over the training set's own nearest-neighbour distance (near 0 = copies); ``copies``: share of samples
    below the threshold; ``diversity``: mean pairwise distance across seeds per prompt. ``alarms``: the
    warnings new at this step (each said once in a run)."""

    step: int
    epoch: int
    ratio: float | None
    nearest: float | None
    copies: float | None
    diversity: float | None
    features: str = "pixels"
    alarms: tuple[str, ...] = ()


@dataclass(frozen=True)
class CheckpointSaved(Event):
    path: Path
    step: int


@dataclass(frozen=True)
class Warning(Event):
    text: str


@dataclass(frozen=True)
class Finished(Event):
    run_dir: Path
    reason: str  # "completed" | "stopped"
    step: int


@dataclass(frozen=True)
class Failed(Event):
    message: str
    details: str
    resumable_from: Path | None
    run_dir: Path | None = None
    kind: str = "error"  # "input" (bad input: exit 2) | "nan" | "oom" | "error" (unexpected: exit 1)


@dataclass(frozen=True)
class LearnedSchedule(Event):
    """diffusion.learned_schedule: the schedule as learned so far, at each logged step (the app's schedule view
    draws it live; the run folder keeps the latest in noise_schedule.json)."""

    step: int
    timesteps: list[int]
    log10_snr: list[float]
