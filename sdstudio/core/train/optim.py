"""Optimizers and learning-rate schedules (a pure function of the step, plus plateau state)."""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from itertools import pairwise
from typing import Any

import torch

from ..config import TrainConfig
from ..errors import ConfigError

# train.optimizer -> the bitsandbytes class (bitsandbytes >= 0.45 runs these on the CPU too)
# paged_: the states live in unified memory that the driver pages out to the CPU under memory pressure
BNB_8BIT = {"adamw8bit": "AdamW8bit", "paged_adamw8bit": "PagedAdamW8bit", "lion8bit": "Lion8bit",
            "ademamix8bit": "AdEMAMix8bit"}
# the import name -> the pip package
PACKAGES = {"bitsandbytes": "bitsandbytes", "prodigyopt": "prodigyopt", "schedulefree": "schedulefree",
            "pytorch_optimizer": "pytorch-optimizer"}


def _require(module: str, optimizer: str, extra: str) -> Any:
    """The optional package ``module`` or one line naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"train.optimizer = {optimizer!r} needs the {PACKAGES[module]} package: pip install "
                          f"'sdstudio[{extra}]' (or choose adamw)") from None


def build_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig, *, device: torch.device) -> torch.optim.Optimizer:
    """``groups``: torch param groups (each with "params" and optionally its own "lr")."""
    lr, wd = cfg.learning_rate, cfg.weight_decay
    # fused Adam(W): one kernel for all parameters; on the CPU too (5x faster than the per-tensor default there:
    # 3 ms instead of 15 ms a step for the demo's 1.8 M parameters)
    fused = device.type in ("cuda", "cpu")
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=wd,
                                 **({"fused": True} if fused else {}))
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=wd,
                                **({"fused": True} if fused else {}))
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, momentum=cfg.momentum, eps=cfg.eps, weight_decay=wd)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=wd)
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor
        return Adafactor(groups, lr=lr, weight_decay=wd, scale_parameter=False, relative_step=False,
                         warmup_init=False)
    if cfg.optimizer in BNB_8BIT:
        bnb = _require("bitsandbytes", cfg.optimizer, "bnb")
        cls = getattr(bnb.optim, BNB_8BIT[cfg.optimizer])
        if cfg.optimizer == "ademamix8bit":
            return cls(groups, lr=lr, betas=(*cfg.betas, cfg.beta3), alpha=cfg.ademamix_alpha, eps=cfg.eps,
                       weight_decay=wd)
        if cfg.optimizer == "lion8bit":
            return cls(groups, lr=lr, betas=cfg.betas, weight_decay=wd)
        return cls(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=wd)
    if cfg.optimizer == "prodigy":
        prodigyopt = _require("prodigyopt", cfg.optimizer, "optimizers")
        return prodigyopt.Prodigy(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=wd,
                                  d_coef=cfg.prodigy_d_coef, d0=cfg.prodigy_d0,
                                  safeguard_warmup=cfg.prodigy_safeguard_warmup,
                                  use_bias_correction=cfg.prodigy_bias_correction)
    if cfg.optimizer == "adamw_schedulefree":
        schedulefree = _require("schedulefree", cfg.optimizer, "optimizers")
        # warm-up comes from train.warmup_steps through LRSchedule (schedule-free follows the group's lr)
        return schedulefree.AdamWScheduleFree(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=wd)
    if cfg.optimizer in ("lion", "came", "ademamix"):
        po = _require("pytorch_optimizer", cfg.optimizer, "optimizers")
        if cfg.optimizer == "lion":
            return po.Lion(groups, lr=lr, betas=cfg.betas, weight_decay=wd)
        if cfg.optimizer == "came":
            return po.CAME(groups, lr=lr, betas=(*cfg.betas, cfg.beta3), weight_decay=wd)
        return po.AdEMAMix(groups, lr=lr, betas=(*cfg.betas, cfg.beta3), alpha=cfg.ademamix_alpha, eps=cfg.eps,
                           weight_decay=wd)
    raise ConfigError(f"train.optimizer = {cfg.optimizer!r} is not known")


def optimizer_warnings(cfg: TrainConfig) -> list[str]:
    """Settings that run but are most likely a mistake (said once at the start of the run)."""
    if cfg.optimizer == "prodigy" and cfg.learning_rate < 0.1:
        return [(f"train.optimizer = 'prodigy' estimates the step size itself and expects train.learning_rate "
                f"= 1.0 (given {cfg.learning_rate:g}: the steps are that much smaller); use "
                "train.prodigy_d_coef to scale them instead")]
    return []


def switches_modes(optimizer: Any) -> bool:
    """Schedule-free optimizers keep two points: training steps at y, the model to use is x. They have
    ``train()`` / ``eval()`` that move the parameters between the two (accelerate's wrapper forwards them)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return callable(getattr(inner, "eval", None)) and callable(getattr(inner, "train", None))


def _params(inner: Any) -> list[torch.Tensor]:
    return [p for group in inner.param_groups for p in group["params"]]


@contextmanager
def evaluation_weights(optimizer: Any) -> Iterator[None]:
    """The weights to evaluate, sample and save inside the block (a schedule-free optimizer's averaged x);
    the training point y afterwards, restored exactly (a copy, not the inverse interpolation: sampling or
    validating never changes the training run by a rounding error). Nothing to do for the other optimizers."""
    if not switches_modes(optimizer):
        yield
        return
    inner = getattr(optimizer, "optimizer", optimizer)
    if not inner.param_groups[0].get("train_mode", True):  # already inside such a block
        yield
        return
    stash = training_point(optimizer)
    inner.eval()
    inner.sdstudio_training_point = stash  # what a checkpoint saved inside the block keeps as y
    try:
        yield
    finally:
        del inner.sdstudio_training_point
        inner.train()
        restore_training_point(optimizer, stash)


def training_point(optimizer: Any) -> list[torch.Tensor]:
    """A schedule-free optimizer's training-point parameters (y), copied; [] for the other optimizers."""
    if not switches_modes(optimizer):
        return []
    inner = getattr(optimizer, "optimizer", optimizer)
    stashed = getattr(inner, "sdstudio_training_point", None)
    if stashed is not None:  # inside evaluation_weights: the parameters hold x now
        return stashed
    with torch.no_grad():
        return [p.detach().clone() for p in _params(inner)]


def restore_training_point(optimizer: Any, point: list[torch.Tensor]) -> None:
    params = _params(getattr(optimizer, "optimizer", optimizer))
    if not point:
        return
    if len(point) != len(params):
        raise ValueError(f"the saved training point has {len(point)} tensors, the optimizer {len(params)}")
    with torch.no_grad():
        for p, y in zip(params, point, strict=True):
            p.copy_(y.to(p.device, p.dtype))


def training_mode(optimizer: Any) -> None:
    """Put a schedule-free optimizer into training mode (after building or loading it)."""
    if switches_modes(optimizer):
        getattr(optimizer, "optimizer", optimizer).train()


class LRSchedule:
    """LR factor for optimizer step ``step`` (0-based): warm-up, then the decay of ``kind``.

    ``reduce_on_plateau`` keeps a multiplier that drops by ``gamma`` after ``patience`` validations
    without improvement; its state goes into checkpoints.
    """

    def __init__(self, cfg: TrainConfig, total_steps: int) -> None:
        self.kind = cfg.lr_scheduler
        self.warmup = cfg.warmup_steps if self.kind != "constant" else 0
        self.total = max(1, total_steps)
        self.step_size = cfg.lr_step_size
        self.gamma = cfg.lr_gamma
        self.patience = cfg.plateau_patience
        self.floor = cfg.min_lr_ratio
        self.cycles = cfg.lr_cycles
        self.power = cfg.lr_power
        self.decay_fraction = cfg.lr_decay_fraction
        self.points = list(zip(cfg.lr_piecewise_steps, cfg.lr_piecewise_values, strict=False))
        self.plateau_scale = 1.0
        self.best = math.inf
        self.bad_evals = 0

    def factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind in ("constant", "constant_with_warmup"):
            return 1.0
        if self.kind == "reduce_on_plateau":
            return self.plateau_scale
        if self.kind == "step":
            return self.gamma ** ((step - self.warmup) // self.step_size)
        if self.kind == "piecewise":
            return piecewise(self.points, step)
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + (1 - self.floor) * self._decay(progress)

    def _decay(self, p: float) -> float:
        """From 1 at the end of warm-up (p = 0) to 0 at the last step (p = 1)."""
        if self.kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * p))
        if self.kind == "cosine_with_restarts":  # hard restarts (transformers' schedule of that name)
            return 0.0 if p >= 1.0 else 0.5 * (1 + math.cos(math.pi * ((self.cycles * p) % 1.0)))
        if self.kind == "polynomial":
            return (1 - p) ** self.power
        if self.kind == "warmup_stable_decay":  # flat, then linear over the last decay_fraction
            start = 1 - self.decay_fraction
            return 1.0 if p <= start else max(0.0, (1 - p) / self.decay_fraction)
        if self.kind == "rex":  # Chen et al. 2021, "REX: revisiting budgeted training"
            return (1 - p) / (1 - p / 2)
        return 1 - p  # linear

    def curve(self, steps: int | None = None) -> list[float]:
        """The factor at every step 0 .. steps-1 (all planned steps by default): the app's preview draws it."""
        return [self.factor(i) for i in range(self.total if steps is None else steps)]

    def observe(self, val_loss: float) -> None:
        if self.kind != "reduce_on_plateau":
            return
        if val_loss < self.best - 1e-12:
            self.best, self.bad_evals = val_loss, 0
        else:
            self.bad_evals += 1
            if self.bad_evals >= self.patience:
                self.plateau_scale *= self.gamma
                self.bad_evals = 0

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        f = self.factor(step)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * f
        return optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, float]:
        return {"plateau_scale": self.plateau_scale, "best": self.best, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.plateau_scale = float(state["plateau_scale"])
        self.best = float(state["best"])
        self.bad_evals = int(state["bad_evals"])


def piecewise(points: list[tuple[int, float]], step: int) -> float:
    """Linear between the (step, value) points, flat before the first and after the last."""
    if not points:
        return 1.0
    if step <= points[0][0]:
        return float(points[0][1])
    for (s0, v0), (s1, v1) in pairwise(points):
        if step <= s1:
            return float(v0 + (v1 - v0) * (step - s0) / (s1 - s0))
    return float(points[-1][1])


def param_groups(named: Iterable[tuple[str, list[torch.nn.Parameter], float]]) -> list[dict[str, Any]]:
    """[(name, params, lr)] -> torch param groups with ``base_lr`` kept for the schedule."""
    return [{"name": name, "params": params, "lr": lr, "base_lr": lr} for name, params, lr in named if params]
