"""Optimizers and learning-rate schedules (a pure function of the step, plus plateau state)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from ..config import TrainConfig
from ..errors import ConfigError


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
    if cfg.optimizer in ("adamw8bit", "paged_adamw8bit"):
        try:
            import bitsandbytes as bnb  # type: ignore[import-not-found]
        except ImportError:
            raise ConfigError(f"train.optimizer = {cfg.optimizer!r} needs bitsandbytes: pip install "
                              "'sdstudio[bnb]', or choose adamw") from None
        if device.type not in ("cuda", "cpu"):  # bitsandbytes >= 0.45 has CPU kernels for its 8-bit optimizers
            raise ConfigError(f"train.optimizer = {cfg.optimizer!r} runs on CUDA GPUs and the CPU only; choose "
                              "adamw on this device")
        # paged: the states live in unified memory that the driver pages out to the CPU under memory pressure
        cls = bnb.optim.PagedAdamW8bit if cfg.optimizer == "paged_adamw8bit" else bnb.optim.AdamW8bit
        return cls(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=wd)
    raise ConfigError(f"train.optimizer = {cfg.optimizer!r} is not known")


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
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        if self.kind == "cosine":
            return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return self.floor + (1 - self.floor) * (1 - progress)  # linear

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


def param_groups(named: Iterable[tuple[str, list[torch.nn.Parameter], float]]) -> list[dict[str, Any]]:
    """[(name, params, lr)] -> torch param groups with ``base_lr`` kept for the schedule."""
    return [{"name": name, "params": params, "lr": lr, "base_lr": lr} for name, params, lr in named if params]
