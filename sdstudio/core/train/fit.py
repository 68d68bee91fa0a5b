"""Fit my GPU: a short trial of candidate settings at the run's resolution that finds the fastest one fitting the
free memory with a safety margin, and the overlay that applies it.

Candidates are tried from the cheapest in step time to the most frugal (each adds one lever to the previous one:
gradient checkpointing, an 8-bit optimizer, a quantized base, frozen parts off the device, the EMA in CPU memory,
activations offloaded, block swap, then a smaller batch with more accumulation); the first that fits wins, so
later (slower) ones are only tried when needed. Each trial runs the real training loop for a few steps with no run folder, previews,
checkpoints or exports. The peak is measured on a GPU (``torch.cuda.max_memory_allocated``); on the CPU, where
nothing limits memory, it is the estimate of ``memory.py`` for the trial's built model (how tests and CPU users
try it with a stand-in budget).
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import events as ev
from ..config import RunConfig
from ..errors import UserError
from .memory import GIB, estimate_memory

log = logging.getLogger("sdstudio")
SAFETY_MARGIN = 0.10  # of the budget, left free for fragmentation and what the trial did not see
TRIAL_STEPS = 3  # the first is warm-up; the step time is the mean of the others


@dataclass
class Trial:
    name: str
    overrides: dict[str, Any]
    peak_bytes: float | None = None
    step_s: float | None = None
    fits: bool = False
    note: str = ""

    def row(self) -> list[str]:
        peak = "-" if self.peak_bytes is None else f"{self.peak_bytes / GIB:.2f}"
        step = "-" if self.step_s is None else f"{self.step_s:.3f}"
        return [self.name, peak, step, "yes" if self.fits else "no", self.note]


@dataclass
class FitResult:
    budget_bytes: float
    trials: list[Trial] = field(default_factory=list)
    winner: Trial | None = None

    def table(self) -> str:
        head = ["setting", "peak GiB", "step s", "fits", "note"]
        rows = [head] + [t.row() for t in self.trials]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def candidates(config: RunConfig) -> list[tuple[str, dict[str, Any]]]:
    """(name, cumulative overrides), fastest first."""
    t, lora = config.train, config.lora.enabled
    steps: list[tuple[str, dict[str, Any]]] = [("as configured", {})]
    if not t.gradient_checkpointing:
        steps.append(("+ gradient checkpointing", {"train.gradient_checkpointing": True}))
    if t.optimizer in ("adamw", "adam") and importlib.util.find_spec("bitsandbytes") is not None:
        steps.append(("+ 8-bit AdamW", {"train.optimizer": "adamw8bit"}))
    if lora and config.model.quantize == "none":
        steps.append(("+ fp8 base", {"model.quantize": "fp8"}))
    latent = config.data.cache_latents or config.data.cache_text_embeddings
    if latent and not t.offload_frozen:
        steps.append(("+ frozen parts off the GPU", {"train.offload_frozen": True}))
    if t.ema and not t.ema_on_cpu:
        steps.append(("+ EMA in CPU memory", {"train.ema_on_cpu": True}))
    if not t.offload_activations:
        steps.append(("+ activations offloaded", {"train.offload_activations": True}))
    if lora and importlib.util.find_spec("torchao") is not None and config.model.quantize in ("none", "fp8"):
        steps.append(("+ nf4 base", {"model.quantize": "nf4"}))
    if lora:
        for n in (2, 4, 8, 16):
            if n > t.blocks_to_swap:
                steps.append((f"+ {n} blocks swapped", {"train.blocks_to_swap": n}))
    batch, accumulation = t.batch_size, t.gradient_accumulation
    while batch > 1:
        batch //= 2
        accumulation *= 2
        steps.append((f"+ batch {batch} x {accumulation} accumulated",
                      {"train.batch_size": batch, "train.gradient_accumulation": accumulation}))
    out: list[tuple[str, dict[str, Any]]] = []
    current: dict[str, Any] = {}
    for name, extra in steps:
        current = {**current, **extra}
        if current.get("train.gradient_accumulation", 1) > 1 and t.fused_backward:
            current["train.fused_backward"] = False  # cannot accumulate (config check)
        out.append((name, dict(current)))
    return out


def trial_config(config: RunConfig, overrides: dict[str, Any], steps: int) -> RunConfig:
    """The config of one trial: the candidate, a few steps, nothing written, the largest (square) bucket."""
    quiet = {"train.max_steps": steps, "train.epochs": 0, "train.log_every": 1, "train.val_every_steps": 0,
             "train.early_stopping_patience": 0, "sample.every_steps": 0, "sample.every_epochs": 0,
             "sample.at_end": False, "checkpoint.every_steps": 0, "checkpoint.every_epochs": 0,
             "checkpoint.keep_best": False, "export.formats": [], "eval.inception_weights": "",
             "data.bucketing": False, "train.tensorboard": False}
    return config.with_overrides({**overrides, **quiet})


def measured_peak(config: RunConfig, device: torch.device) -> Callable[[], float]:
    """Reset the peak counter now; the returned function reads the peak (GPU) or the estimate (CPU)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return lambda: float(torch.cuda.max_memory_allocated(device))

    def estimate() -> float:
        from .setup import build_model

        bundle = build_model(config, [""], device=torch.device("cpu"))
        return estimate_memory(bundle, config).total
    return estimate


def run_trial(config: RunConfig, trial: Trial, budget: float, device: torch.device, steps: int) -> None:
    from .loop import train

    cfg = trial_config(config, trial.overrides, steps)
    peak = measured_peak(cfg, device)
    times: list[float] = []
    last = time.perf_counter()
    for event in train(cfg):
        if isinstance(event, ev.StepMetrics):
            now = time.perf_counter()
            times.append(now - last)
            last = now
        elif isinstance(event, ev.Started):
            last = time.perf_counter()
        elif isinstance(event, ev.Failed):
            trial.note = "out of memory" if event.kind == "oom" else event.message.splitlines()[0][:80]
            if event.kind == "input" and not times:
                raise UserError(event.message)
            return
    trial.peak_bytes = peak()
    trial.step_s = sum(times[1:]) / len(times[1:]) if len(times) > 1 else (times[0] if times else None)
    trial.fits = trial.peak_bytes <= budget * (1 - SAFETY_MARGIN)


def free_device_memory_gb(config: RunConfig) -> float | None:
    """The free memory of the run's GPU in GiB, or None where the run has no GPU (a budget must stand in)."""
    from .setup import pick_device

    try:
        device = pick_device(config.train.device)
    except UserError:
        return None
    if device.type != "cuda":
        return None
    return torch.cuda.mem_get_info(device)[0] / GIB


def fit(config: RunConfig, *, budget_gb: float | None = None, steps: int = TRIAL_STEPS,
        on_trial: Callable[[Trial], None] | None = None, should_stop: Callable[[], bool] | None = None) -> FitResult:
    """Try the candidates in order until one fits ``budget_gb`` (default: the GPU's free memory).
    ``should_stop`` (asked before each trial, e.g. the app's Stop button) ends the search early."""
    from .setup import pick_device

    device = pick_device(config.train.device)
    if budget_gb is not None:
        budget = budget_gb * GIB
    elif device.type == "cuda":
        budget = float(torch.cuda.mem_get_info(device)[0])
    else:
        raise UserError("fitting needs a GPU to measure, or a memory budget in GB to fit on this "
                        f"{device.type} (train.device = {config.train.device!r})")
    result = FitResult(budget)
    for name, overrides in candidates(config):
        if should_stop is not None and should_stop():
            break
        trial = Trial(name, overrides)
        try:
            run_trial(config, trial, budget, device, steps)
        except UserError as exc:  # e.g. a lever this run cannot use: say so and go on
            trial.note = str(exc).splitlines()[0][:80]
        result.trials.append(trial)
        if on_trial is not None:
            on_trial(trial)
        if trial.fits:
            result.winner = trial
            break
    return result


def overlay(config: RunConfig, winner: Trial) -> dict[str, Any]:
    """The whole run as an overlay of the defaults (the preset, data and --set values and the winning levers):
    what ``train --config FILE`` reads."""
    from ..presets import config_diff

    data = config_diff(RunConfig().to_dict(), config.with_overrides(winner.overrides).to_dict())
    return {"schema_version": config.schema_version, **data}
