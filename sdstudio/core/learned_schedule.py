"""A learnable noise schedule in the spirit of Variational Diffusion Models (Kingma et al. 2021), on the
discrete timestep grid the rest of sdstudio uses.

``gamma(t) = -log SNR(t)`` must increase with t. It is written as the configured schedule's own gamma read at a
learned time warp, ``gamma(t) = gamma_base(w(t))``, where ``w`` maps [0, 1] onto [0, 1] monotonically: a
linear term plus sigmoid units, every weight made positive by softplus, normalised so ``w(0) = 0`` and
``w(1) = 1``. Any increasing schedule with the same endpoints is such a warp, so nothing is lost by the form, the
log-SNR endpoints stay the configured schedule's (VDM: with fixed endpoints the continuous-time bound does not
depend on the curve between them), and training starts exactly at the configured schedule.

Training: VDM learns the curve between the endpoints by lowering the variance of the bound's Monte-Carlo
estimate. On the grid the bound's term at step i is ``w_i * err_i`` with ``w_i = SNR(i-1) / SNR(i) - 1`` for an
epsilon error (the target's own factor otherwise, ``bound_weights``); the schedule's gradient is that of
``mean(L_i^2) / mean(L_i)^2`` (scale-free, so clipping and the optimizer treat it like any loss), reaching the
schedule both directly through ``w_i`` and through the noisy input, whose gradient ``ScheduleGradient``
rescales per sample (the denoiser itself learns from its ordinary loss only).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def log_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """log(alpha-bar / (1 - alpha-bar)), float64, finite."""
    ac = alphas_cumprod.double().clamp(1e-12, 1 - 1e-12)
    return torch.log(ac) - torch.log1p(-ac)


class LearnedNoiseSchedule(nn.Module):
    """The learned gamma on the grid: ``alphas_cumprod()`` has one value per training timestep."""

    def __init__(self, base_alphas_cumprod: torch.Tensor | int, units: int = 32) -> None:
        """``base_alphas_cumprod``: the configured schedule, or its number of timesteps (then ``set_base``
        before use: a model is built without the diffusion code, the objective gives the base)."""
        super().__init__()
        n = base_alphas_cumprod if isinstance(base_alphas_cumprod, int) else len(base_alphas_cumprod)
        # rebuilt from the config, not saved
        self.register_buffer("base_gamma", torch.linspace(-10.0, 10.0, n), persistent=False)
        self.has_base = False
        if isinstance(base_alphas_cumprod, torch.Tensor):
            self.set_base(base_alphas_cumprod)
        self.linear = nn.Parameter(torch.tensor(0.5413))  # softplus -> 1: w starts as the identity
        self.scale = nn.Parameter(torch.full((units,), -6.0))  # softplus -> 0.0025: sigmoid units start faint
        self.slope = nn.Parameter(torch.linspace(1.0, 3.0, units))  # softplus -> slopes 1.3 .. 3.0
        self.centre = nn.Parameter(torch.linspace(0.0, 1.0, units))

    def set_base(self, base_alphas_cumprod: torch.Tensor) -> None:
        """The configured schedule the learned one warps (its log-SNR must fall strictly with t)."""
        gamma = -log_snr(base_alphas_cumprod).float().to(self.base_gamma.device)
        if gamma.shape != self.base_gamma.shape or not bool((gamma[1:] > gamma[:-1]).all()):
            raise ValueError("the base schedule must have one log-SNR per timestep, falling strictly with t")
        self.base_gamma.copy_(gamma)
        self.has_base = True

    @property
    def num_timesteps(self) -> int:
        return int(self.base_gamma.shape[0])

    def warp(self, u: torch.Tensor) -> torch.Tensor:
        """w(u): [0, 1] -> [0, 1], increasing, w(0) = 0, w(1) = 1."""
        def raw(x: torch.Tensor) -> torch.Tensor:
            h = torch.sigmoid(F.softplus(self.slope) * 8.0 * (x[..., None] - self.centre))
            return F.softplus(self.linear) * x + (h * F.softplus(self.scale)).sum(-1)

        ends = raw(torch.tensor([0.0, 1.0], device=u.device, dtype=u.dtype))
        return ((raw(u) - ends[0]) / (ends[1] - ends[0])).clamp(0.0, 1.0)

    def gamma(self) -> torch.Tensor:
        """-log SNR at every grid timestep (T,), float32, differentiable in the schedule's parameters."""
        if not self.has_base:
            raise RuntimeError("the learned schedule has no base schedule yet (set_base)")
        n = self.num_timesteps
        u = torch.linspace(0.0, 1.0, n, device=self.base_gamma.device)
        pos = self.warp(u) * (n - 1)
        lo = pos.detach().floor().long().clamp(0, n - 2)
        frac = pos - lo
        return self.base_gamma[lo] * (1 - frac) + self.base_gamma[lo + 1] * frac

    def alphas_cumprod(self) -> torch.Tensor:
        return torch.sigmoid(-self.gamma())


def learned_schedule_of(model: nn.Module) -> LearnedNoiseSchedule | None:
    """The learned schedule a (possibly wrapped) training model carries, if any."""
    inner = getattr(model, "module", model)  # DDP
    inner = getattr(inner, "_orig_mod", inner)  # torch.compile
    found = getattr(inner, "noise_schedule", None)
    return found if isinstance(found, LearnedNoiseSchedule) else None


def sync_scheduler(sched: Any, alphas_cumprod: torch.Tensor) -> None:
    """Make a diffusers DDPM-style scheduler use ``alphas_cumprod`` (tensors and config's ``trained_betas``, so
    samplers made ``from_config`` of it use the learned schedule too)."""
    ac = alphas_cumprod.detach().double().cpu()
    prev = torch.cat([ac.new_ones(1), ac[:-1]])
    betas = (1.0 - ac / prev).clamp(1e-12, 0.999)
    # diffusers drops config keys listed as defaults when it makes a scheduler from a config
    defaults = [k for k in sched.config.get("_use_default_values", []) if k != "trained_betas"]
    sched.register_to_config(trained_betas=[float(b) for b in betas], _use_default_values=defaults)
    sched.betas = betas.float()
    sched.alphas = 1.0 - sched.betas
    device = sched.alphas_cumprod.device
    sched.alphas_cumprod = torch.cumprod(sched.alphas.double(), 0).float().to(device)


def bound_weights(gamma: torch.Tensor, t: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Weight w_i of the bound's term for a per-sample mean squared error of the model's target at grid
    timestep ``t`` (0 at t = 0, which has no earlier step on the grid): (SNR(s) - SNR(t)) times the target's
    factor (1 / SNR(t) for epsilon, 1 / (1 + SNR(t)) for v, 1 for the sample)."""
    prev = gamma[(t - 1).clamp_min(0)]
    cur = gamma[t]
    delta = torch.expm1(cur - prev)  # SNR(s)/SNR(t) - 1
    if prediction_type == "epsilon":
        w = delta
    elif prediction_type == "v_prediction":
        w = delta * torch.sigmoid(cur)  # SNR(t) / (1 + SNR(t)) * (SNR(s)/SNR(t) - 1)
    else:
        w = delta * torch.exp(-cur)
    return torch.where(t > 0, w, torch.zeros_like(w))


class GradientSlot:
    """Per-sample factors set after the forward pass, read by ``ScheduleGradient``'s backward."""

    def __init__(self) -> None:
        self.scale: torch.Tensor | None = None


class ScheduleGradient(torch.autograd.Function):
    """Identity on the per-sample alpha-bar; the gradient reaching it is multiplied by the slot's factors (0
    when none was set: the schedule then learns nothing through the noisy input)."""

    @staticmethod
    def forward(ctx: Any, alpha_bar: torch.Tensor, slot: GradientSlot) -> torch.Tensor:  # type: ignore[override]
        ctx.slot = slot
        return alpha_bar.view_as(alpha_bar)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        scale = ctx.slot.scale
        if scale is None:
            return torch.zeros_like(grad), None
        return grad * scale.to(grad.device, grad.dtype).view_as(grad), None


def variance_objective(per_sample: torch.Tensor, weights: torch.Tensor, slot: GradientSlot) -> torch.Tensor:
    """The schedule's loss term, 0 in value: its gradient is that of mean(L^2) / mean(L)^2 with L = w * err
    through ``weights``; the part through the noisy input goes into ``slot`` (per_sample's gradient is 1/B)."""
    err = per_sample.detach().float()
    w = weights.float()
    bound = w.detach() * err
    mean = bound.mean().clamp_min(1e-12)
    # d/d(err_i) of mean(L^2)/mean^2 is 2 L_i w_i / (B mean^2); the ordinary loss sends 1/B there
    slot.scale = (2.0 * bound * w.detach() / mean ** 2).detach()
    direct = (w * err) ** 2
    term = direct.mean() / mean ** 2
    return term - term.detach()


def curve_points(schedule: LearnedNoiseSchedule, points: int = 65) -> list[float]:
    """log10 SNR of the learned schedule at ``points`` evenly spaced grid timesteps (what the app plots)."""
    with torch.no_grad():
        gamma = schedule.gamma().double().cpu()
    idx = torch.linspace(0, len(gamma) - 1, points).round().long()
    return [float(-gamma[i] / 2.302585092994046) for i in idx]


@torch.no_grad()
def refresh_scheduler(sched: Any, model: nn.Module) -> None:
    """Before sampling or validating: ``sched`` as ``model``'s learned schedule now is (nothing without one).
    The model given is the one that samples (EMA weights when swapped in), so its schedule goes with it."""
    schedule = learned_schedule_of(model)
    if schedule is not None and schedule.has_base:
        sync_scheduler(sched, schedule.alphas_cumprod())
