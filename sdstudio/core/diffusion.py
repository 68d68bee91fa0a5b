"""The diffusion process: the noise schedule (diffusers schedulers), forward noising, targets, losses."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffusers.training_utils import compute_snr

from .config import DiffusionConfig, LossConfig

BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
SAMPLERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler,
            "dpmpp_2m": DPMSolverMultistepScheduler}


def training_scheduler(cfg: DiffusionConfig, *, pixel_space: bool) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=cfg.num_timesteps, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
                         beta_schedule=BETA_SCHEDULES[cfg.schedule], prediction_type=cfg.prediction_type,
                         rescale_betas_zero_snr=cfg.zero_terminal_snr, clip_sample=pixel_space,
                         timestep_spacing="trailing")


def sampling_scheduler(train_sched: DDPMScheduler, sampler: str) -> Any:
    """A sampler sharing the training schedule.

    With zero terminal SNR the first step must be t = T ("trailing"). Otherwise sampling starts one
    stride below T ("leading", offset 1, the SD convention): at t = T a cosine schedule has
    alpha_bar ~ 1e-9 (sigma ~ 2e4), where samplers without clipping (Euler, DPM++) blow every error up.
    """
    cls = SAMPLERS[sampler]
    ztsnr = bool(train_sched.config.rescale_betas_zero_snr)
    extra: dict[str, Any] = ({"timestep_spacing": "trailing"} if ztsnr
                             else {"timestep_spacing": "leading", "steps_offset": 1})
    if sampler == "dpmpp_2m":
        extra.update(algorithm_type="dpmsolver++", solver_order=2)
        if ztsnr:
            extra["final_sigmas_type"] = "zero"
    return cls.from_config(train_sched.config, **extra)


def set_sampling_timesteps(sched: Any, train_sched: DDPMScheduler, steps: int, device: Any = None) -> int:
    """``sched.set_timesteps`` with as many of ``steps`` as the schedule has room for; returns the count used.

    With "leading" spacing and offset 1, asking for (nearly) as many steps as the schedule has training
    timesteps would put the first one at T or beyond (out of range), or repeat timesteps (DPM++), and counts
    that do not divide T start far below it (600 of 1000 steps: from t = 600, i.e. not from noise): the
    nearest smaller count whose timesteps start near T is taken there."""
    total = int(train_sched.config.num_train_timesteps)
    n = max(1, min(int(steps), total))
    while True:
        sched.set_timesteps(n, device=device)
        t = sched.timesteps
        starts_high = int(t.max()) >= total - 1.5 * total / n - 1  # leading spacing: 600 of 1000 would start at 600
        if (int(t.max()) < total and len(set(t.tolist())) == len(t) and starts_high) or n == 1:
            return n
        n -= 1


def alphas_cumprod(sched: DDPMScheduler) -> torch.Tensor:
    return sched.alphas_cumprod.clone()


def snr_curve(sched: DDPMScheduler) -> torch.Tensor:
    ac = sched.alphas_cumprod.double()
    return ac / (1 - ac).clamp_min(1e-20)


def target_for(sched: DDPMScheduler, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    kind = sched.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return sched.get_velocity(clean, noise, t)
    return clean


def sample_noise(clean: torch.Tensor, loss_cfg: LossConfig, gen: torch.Generator | None) -> tuple[torch.Tensor,
                                                                                                   torch.Tensor]:
    """(noise for the target, noise added to the input): noise offset and input perturbation applied."""
    noise = torch.randn(clean.shape, generator=gen, device=clean.device, dtype=clean.dtype)
    if loss_cfg.noise_offset:
        noise = noise + loss_cfg.noise_offset * torch.randn(
            (clean.shape[0], clean.shape[1], 1, 1), generator=gen, device=clean.device, dtype=clean.dtype)
    model_noise = noise
    if loss_cfg.input_perturbation:
        model_noise = noise + loss_cfg.input_perturbation * torch.randn(
            clean.shape, generator=gen, device=clean.device, dtype=clean.dtype)
    return noise, model_noise


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, loss_cfg: LossConfig) -> torch.Tensor:
    pred, target = pred.float(), target.float()
    if loss_cfg.kind == "mse":
        loss = F.mse_loss(pred, target, reduction="none")
    elif loss_cfg.kind == "l1":
        loss = F.l1_loss(pred, target, reduction="none")
    else:
        loss = F.huber_loss(pred, target, reduction="none", delta=loss_cfg.huber_delta)
    return loss.mean(dim=tuple(range(1, loss.ndim)))


def min_snr_weights(sched: DDPMScheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023), SNR clamped so zero-terminal-SNR gives no 0/0."""
    snr = compute_snr(sched, t).float().clamp_min(1e-6)
    clipped = torch.clamp(snr, max=gamma)
    kind = sched.config.prediction_type
    if kind == "epsilon":
        return clipped / snr
    if kind == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor, sched: DDPMScheduler,
                   loss_cfg: LossConfig) -> torch.Tensor:
    return diffusion_loss_per_sample(pred, target, t, sched, loss_cfg).mean()


def diffusion_loss_per_sample(pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor, sched: DDPMScheduler,
                              loss_cfg: LossConfig) -> torch.Tensor:
    """The training loss of each sample (B,), Min-SNR weighted; its mean is ``diffusion_loss``."""
    loss = per_sample_loss(pred, target, loss_cfg)
    if loss_cfg.min_snr_gamma > 0:
        loss = loss * min_snr_weights(sched, t, loss_cfg.min_snr_gamma).to(loss.device)
    return loss
