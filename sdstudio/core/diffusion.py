"""The diffusion process: the noise schedule (diffusers schedulers), forward noising, targets, losses."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffusers.training_utils import compute_snr

from .config import DiffusionConfig, LossConfig
from .timesteps import discrete_timesteps

BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
SAMPLERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler,
            "dpmpp_2m": DPMSolverMultistepScheduler}


def training_scheduler(cfg: DiffusionConfig, *, pixel_space: bool) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=cfg.num_timesteps, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
                         beta_schedule=BETA_SCHEDULES[cfg.schedule], prediction_type=cfg.prediction_type,
                         rescale_betas_zero_snr=cfg.zero_terminal_snr, clip_sample=pixel_space,
                         timestep_spacing="trailing")


def sampling_scheduler(train_sched: DDPMScheduler, sampler: str, *, learned_variance: bool = False) -> Any:
    """A sampler sharing the training schedule (``learned_variance``: the model also outputs Improved DDPM's
    v, which the ddpm sampler uses as its step variance; the deterministic samplers have no variance to learn).

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
    if sampler == "ddpm" and learned_variance:
        extra["variance_type"] = "learned_range"
    return cls.from_config(train_sched.config, **extra)


def step_kwargs(sched: Any) -> dict[str, Any]:
    """Extra arguments of ``sched.step``. DDIM clips its predicted image in pixel space (``clip_sample``) but by
    default keeps the unclipped noise estimate; with v-prediction the two then disagree and guided samples lose
    their colours (the compositional test, guidance 3: colour 0.10 -> 1.00 seen with the noise estimate
    recomputed from the clipped image). For epsilon-prediction the recomputation measured worse (all-correct
    0.83 -> 0.75), so it is used for v-prediction only. Mirrored in the exported pixel pipeline."""
    cfg = sched.config
    if (isinstance(sched, DDIMScheduler) and cfg.get("clip_sample")
            and cfg.get("prediction_type") == "v_prediction"):
        return {"use_clipped_model_output": True}
    return {}


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


def mask_to_model_space(masks: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Pixel masks (Bx1xHxW in [0, 1]) at the model's spatial size: the mean of each latent cell's pixels."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks.float()
    return F.adaptive_avg_pool2d(masks.float(), tuple(size))


def target_for(sched: DDPMScheduler, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    kind = sched.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return sched.get_velocity(clean, noise, t)
    return clean


def sample_noise(clean: torch.Tensor, loss_cfg: LossConfig, gen: torch.Generator | None) -> tuple[torch.Tensor,
                                                                                                   torch.Tensor]:
    """(noise for the target, noise added to the input): pyramid noise, noise offset and input perturbation
    applied (each draws from ``gen`` only when on, so the defaults draw exactly what they always did)."""
    noise = torch.randn(clean.shape, generator=gen, device=clean.device, dtype=clean.dtype)
    if loss_cfg.pyramid_noise_iterations:
        noise = pyramid_noise(noise, loss_cfg.pyramid_noise_iterations, loss_cfg.pyramid_noise_discount, gen)
    if loss_cfg.noise_offset:
        noise = noise + loss_cfg.noise_offset * torch.randn(
            (clean.shape[0], clean.shape[1], 1, 1), generator=gen, device=clean.device, dtype=clean.dtype)
    model_noise = noise
    if loss_cfg.input_perturbation:
        model_noise = noise + loss_cfg.input_perturbation * torch.randn(
            clean.shape, generator=gen, device=clean.device, dtype=clean.dtype)
    return noise, model_noise


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float,
                  gen: torch.Generator | None) -> torch.Tensor:
    """Multi-resolution noise (kohya's ``multires_noise``): coarser noise at random scales (r in [2, 4) per
    level) upsampled bilinearly and added with weight discount^level, then each sample rescaled to unit std."""
    b, c, h, w = noise.shape
    out = noise.float().clone()
    for level in range(1, iterations + 1):
        r = 2.0 + 2.0 * float(torch.rand((), generator=gen, device=noise.device))
        hn, wn = max(1, int(h / r ** level)), max(1, int(w / r ** level))
        coarse = torch.randn((b, c, hn, wn), generator=gen, device=noise.device, dtype=torch.float32)
        out += F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False) * discount ** level
        if hn == 1 or wn == 1:
            break
    out = out / out.flatten(1).std(dim=1).clamp_min(1e-12).view(b, 1, 1, 1)
    return out.to(noise.dtype)


def huber_deltas(sched: DDPMScheduler, t: torch.Tensor, loss_cfg: LossConfig) -> torch.Tensor:
    """The Huber delta of each sample's timestep (kohya's scheduled huber_c), float32 of shape (batch,)."""
    c = loss_cfg.huber_delta
    if loss_cfg.huber_schedule == "exponential":
        alpha = -math.log(c) / sched.config.num_train_timesteps
        return torch.exp(-alpha * t.float())
    if loss_cfg.huber_schedule == "snr":
        ac = sched.alphas_cumprod.to(t.device)[t].float()
        sigmas = ((1.0 - ac) / ac.clamp_min(1e-20)).sqrt()
        return (1 - c) / (1 + sigmas) ** 2 + c
    return torch.full(t.shape, c, dtype=torch.float32, device=t.device)


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, loss_cfg: LossConfig, *,
                    deltas: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of each sample, averaged over its elements; ``deltas``: a Huber delta per sample (None =
    loss.huber_delta). With ``mask`` (Bx1xhxw at the model's size, in [0, 1]) a weighted average:
    sum(loss * m) / sum(m) per sample, so a full mask gives exactly the unmasked loss and an image half masked
    out weighs as much as any other."""
    pred, target = pred.float(), target.float()
    if loss_cfg.kind == "mse":
        loss = F.mse_loss(pred, target, reduction="none")
    elif loss_cfg.kind == "l1":
        loss = F.l1_loss(pred, target, reduction="none")
    elif deltas is None and loss_cfg.kind == "huber":
        loss = F.huber_loss(pred, target, reduction="none", delta=loss_cfg.huber_delta)
    else:
        d = (deltas if deltas is not None
             else torch.full((pred.shape[0],), loss_cfg.huber_delta, device=pred.device))
        d = d.to(pred.device).view(-1, *([1] * (pred.ndim - 1)))
        err = pred - target
        if loss_cfg.kind == "huber":
            a = err.abs()
            loss = torch.where(a <= d, 0.5 * err ** 2, d * (a - 0.5 * d))
        else:  # pseudo_huber, as kohya's "huber": 2c (sqrt(e^2 + c^2) - c)
            loss = 2 * d * (torch.sqrt(err ** 2 + d ** 2) - d)
    dims = tuple(range(1, loss.ndim))
    if mask is None:
        return loss.mean(dim=dims)
    weights = mask.to(loss.device, torch.float32)
    if loss_cfg.unmasked_weight:
        weights = loss_cfg.unmasked_weight + (1.0 - loss_cfg.unmasked_weight) * weights
    weights = weights.expand_as(loss)
    # mean(loss * w) / mean(w): with w == 1 both means are exact, so a full mask is the unmasked loss bit for bit
    return (loss * weights).mean(dim=dims) / weights.mean(dim=dims).clamp_min(1e-8)


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


def debiased_weights(sched: DDPMScheduler, t: torch.Tensor) -> torch.Tensor:
    """Debiased estimation (kohya, after Yu et al. 2024): 1/sqrt(SNR) for epsilon, 1/(SNR + 1) for v
    prediction; for sample prediction sqrt(SNR), the epsilon weight in sample terms (an epsilon error is
    sqrt(SNR) times the sample error). SNR clamped to [1e-6, 1000] (t = 0 has SNR near infinity)."""
    snr = compute_snr(sched, t).float().clamp(1e-6, 1000.0)
    kind = sched.config.prediction_type
    if kind == "epsilon":
        return 1 / snr.sqrt()
    if kind == "v_prediction":
        return 1 / (snr + 1)
    return snr.sqrt()


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor, sched: DDPMScheduler,
                   loss_cfg: LossConfig, mask: torch.Tensor | None = None) -> torch.Tensor:
    return diffusion_loss_per_sample(pred, target, t, sched, loss_cfg, mask).mean()


def diffusion_loss_per_sample(pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor, sched: DDPMScheduler,
                              loss_cfg: LossConfig, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The training loss of each sample (B,): masked, scheduled Huber, Min-SNR and debiased weights as
    configured; its mean is ``diffusion_loss``."""
    deltas = None
    if loss_cfg.kind in ("huber", "pseudo_huber") and loss_cfg.huber_schedule != "constant":
        deltas = huber_deltas(sched, t, loss_cfg)
    loss = per_sample_loss(pred, target, loss_cfg, deltas=deltas, mask=mask)
    if loss_cfg.min_snr_gamma > 0:
        loss = loss * min_snr_weights(sched, t, loss_cfg.min_snr_gamma).to(loss.device)
    if loss_cfg.debiased_estimation:
        loss = loss * debiased_weights(sched, t).to(loss.device)
    return loss


def training_timesteps(n: int, loss_cfg: LossConfig, t_min: int, t_max: int, gen: torch.Generator | None,
                       device: torch.device | str) -> torch.Tensor:
    """``n`` training timesteps in [t_min, t_max) from loss.timestep_distribution and loss.timestep_shift."""
    return discrete_timesteps(n, loss_cfg.timestep_distribution, t_min=t_min, t_max=t_max, gen=gen, device=device,
                              logit_mean=loss_cfg.timestep_logit_mean, logit_std=loss_cfg.timestep_logit_std,
                              mode_scale=loss_cfg.timestep_mode_scale, shift=loss_cfg.timestep_shift)
