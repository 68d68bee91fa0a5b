"""Rectified flow (flow matching), as Flux.1 and SD3 were trained: ``x_t = (1 - t) x0 + t noise``, the model
predicts the velocity ``noise - x0``; t ("sigma") in [0, 1], 1 = pure noise.

Timesteps are drawn by the SD3 paper's densities (logit-normal, uniform, mode: ``core/timesteps.py``, the one
home of the densities, bit for bit diffusers' ``compute_density_for_timestep_sampling``), then shifted towards noise: the SD3 shift
``s t / (1 + (s - 1) t)``, or Flux's resolution-dependent one (the same formula with ``s = exp(mu)``, mu linear
in the number of image tokens: diffusers' ``calculate_shift``). The SD3 paper's loss weightings come from
diffusers' ``compute_loss_weighting_for_sd3``. Sampling is diffusers' ``FlowMatchEulerDiscreteScheduler``.

A family that trains so says ``objective = "flow_matching"`` and states its schedule in ``FlowDefaults``;
the run's ``[flow]`` section chooses the sampling, shift and weighting (``config.FlowConfig``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .config import FlowConfig, LossConfig
from .diffusion import per_sample_loss
from .models.family import FlowDefaults
from .timesteps import base_fractions, shift_fractions


def shift_sigmas(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The SD3 timestep shift: more time near noise for shift > 1 (shift 1 = unchanged)."""
    return shift_fractions(t, shift)


def resolution_shift(image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15,
                     base_seq_len: int = 256, max_seq_len: int = 4096) -> float:
    """Flux's shift for an image of ``image_seq_len`` tokens (packed 2x2 latent patches): exp(mu)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return math.exp(calculate_shift(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift))


def training_shift(cfg: FlowConfig, defaults: FlowDefaults, image_seq_len: int) -> float:
    """The shift applied to training timesteps: flow.shift says which ("auto": the family's own)."""
    mode = cfg.shift
    if mode == "auto":
        mode = "resolution" if defaults.dynamic else ("fixed" if defaults.shift != 1.0 else "none")
        value = defaults.shift
    else:
        value = cfg.shift_value
    if mode == "none":
        return 1.0
    if mode == "fixed":
        return float(value)
    return resolution_shift(image_seq_len, cfg.base_shift, cfg.max_shift, defaults.base_seq_len,
                            defaults.max_seq_len)


def sample_sigmas(n: int, cfg: FlowConfig, shift: float, generator: torch.Generator | None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """``n`` training timesteps in (0, 1): drawn by flow.timestep_sampling, then shifted."""
    u = base_fractions(n, cfg.timestep_sampling, gen=generator, device=device, logit_mean=cfg.logit_mean,
                       logit_std=cfg.logit_std, mode_scale=cfg.mode_scale, clamp=False)
    return shift_fractions(u.float(), shift)


def noised(clean: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise, t per sample."""
    s = sigmas.view(-1, *([1] * (clean.ndim - 1))).to(clean.dtype)
    return (1 - s) * clean + s * noise


def velocity(clean: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching target: d x_t / d t = noise - x0."""
    return noise - clean


def loss_weights(weighting: str, sigmas: torch.Tensor) -> torch.Tensor:
    """The SD3 paper's loss weightings ("none", "sigma_sqrt", "cosmap"), one per sample."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    return compute_loss_weighting_for_sd3(weighting, sigmas=sigmas.float()).float()


def flow_loss_per_sample(pred: torch.Tensor, target: torch.Tensor, sigmas: torch.Tensor, loss_cfg: LossConfig,
                         flow_cfg: FlowConfig, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The training loss of each sample (B,): the configured loss (masked when ``mask``, Bx1xhxw at the
    latents' size) times the SD3 weighting of its timestep; its mean is ``flow_loss``."""
    loss = per_sample_loss(pred, target, loss_cfg, mask=mask)
    return loss * loss_weights(flow_cfg.weighting, sigmas).to(loss.device)


def flow_loss(pred: torch.Tensor, target: torch.Tensor, sigmas: torch.Tensor, loss_cfg: LossConfig,
              flow_cfg: FlowConfig, mask: torch.Tensor | None = None) -> torch.Tensor:
    return flow_loss_per_sample(pred, target, sigmas, loss_cfg, flow_cfg, mask).mean()


@dataclass
class FlowSchedule:
    """What a flow-matching run trains and samples with (in place of a DDPM schedule)."""

    cfg: FlowConfig
    defaults: FlowDefaults

    objective = "flow_matching"

    def training_shift(self, image_seq_len: int) -> float:
        return training_shift(self.cfg, self.defaults, image_seq_len)

    def sampler(self) -> Any:
        """diffusers' flow-matching Euler scheduler with the base model's configuration."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        d = self.defaults
        config = {"num_train_timesteps": 1000, "shift": d.shift, "use_dynamic_shifting": d.dynamic,
                  "base_shift": d.base_shift, "max_shift": d.max_shift, "base_image_seq_len": d.base_seq_len,
                  "max_image_seq_len": d.max_seq_len}
        return FlowMatchEulerDiscreteScheduler.from_config(config)

    def sampling_timesteps(self, steps: int, image_seq_len: int, device: Any = None) -> Any:
        """A scheduler with the timesteps of ``steps`` Euler steps, as FluxPipeline / SD3 pipelines set them."""
        sched = self.sampler()
        sigmas = np.linspace(1.0, 1 / steps, steps)
        kwargs: dict[str, Any] = {}
        if sched.config.use_dynamic_shifting:
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            kwargs["mu"] = calculate_shift(image_seq_len, sched.config.base_image_seq_len,
                                           sched.config.max_image_seq_len, sched.config.base_shift,
                                           sched.config.max_shift)
        sched.set_timesteps(sigmas=sigmas, device=device, **kwargs)
        return sched


def validation_sigmas(buckets: int) -> list[float]:
    """Fixed validation timesteps: the middles of ``buckets`` equal slices of (0, 1)."""
    return [(k + 0.5) / buckets for k in range(buckets)]
