"""Where training timesteps are drawn from: pure functions, the one home of the timestep densities and the shift
for the discrete (DDPM: epsilon / v / sample) families and flow matching (``core/flow.py`` draws through them).

Every distribution first draws a fraction ``u`` in [0, 1) (0 = clean, 1 = pure noise), then shifts it
(``shift``: SD3 / Flux's ``shift * u / (1 + (shift - 1) * u)``, > 1 moves weight to the noisy end), then maps it
into the allowed range ``[t_min, t_max)``: discrete families take ``floor`` of it as the timestep index, flow
matching can use the fraction itself as its sigma (``timestep_fractions``).

- ``uniform``: every timestep in the range equally often (for the discrete families drawn with ``randint``
  exactly as before this module existed, so old runs reproduce bit for bit).
- ``logit_normal``: ``u = sigmoid(N(mean, std))`` (SD3, Esser et al. 2024): most weight in the middle.
- ``mode``: SD3's "mode sampling with heavy tails", ``u = 1 - v - s (cos^2(pi v / 2) - 1 + v)`` for uniform
  ``v``: ``s > 0`` puts more weight in the middle, ``s < 0`` at the ends, ``s = 0`` is uniform.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Distribution = Literal["uniform", "logit_normal", "mode"]
DISTRIBUTIONS: tuple[str, ...] = ("uniform", "logit_normal", "mode")


def base_fractions(n: int, distribution: str, *, gen: torch.Generator | None, device: torch.device | str = "cpu",
                   logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29,
                   clamp: bool = True) -> torch.Tensor:
    """``n`` fractions (float32) drawn from ``distribution`` with ``gen`` (before shift and range), in [0, 1)
    with ``clamp``; without it exactly diffusers' ``compute_density_for_timestep_sampling`` (what flow
    matching trains with: mode sampling may give 1.0)."""
    if distribution == "uniform":
        u = torch.rand((n,), generator=gen, device=device)
    elif distribution == "logit_normal":
        # torch.normal, as diffusers draws it (bit for bit equal to mean + std * randn for mean 0, std 1)
        u = torch.sigmoid(torch.normal(mean=logit_mean, std=logit_std, size=(n,), generator=gen, device=device))
    elif distribution == "mode":
        v = torch.rand((n,), generator=gen, device=device)
        u = 1 - v - mode_scale * (torch.cos(math.pi * v / 2) ** 2 - 1 + v)
    else:
        raise ValueError(f"unknown timestep distribution {distribution!r} (allowed: {', '.join(DISTRIBUTIONS)})")
    return u.clamp(0.0, 1.0 - 1e-7) if clamp else u


def shift_fractions(u: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 / Flux timestep shift: ``shift * u / (1 + (shift - 1) * u)`` (1 = unchanged)."""
    if shift == 1.0:
        return u
    return shift * u / (1 + (shift - 1) * u)


def timestep_fractions(n: int, distribution: str, *, gen: torch.Generator | None, device: torch.device | str = "cpu",
                       logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29,
                       shift: float = 1.0, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """Fractions in ``[low, high)`` (continuous time for flow matching: 0 = clean, 1 = noise)."""
    u = base_fractions(n, distribution, gen=gen, device=device, logit_mean=logit_mean, logit_std=logit_std,
                       mode_scale=mode_scale)
    u = shift_fractions(u, shift)
    return low + (high - low) * u


def discrete_timesteps(n: int, distribution: str, *, t_min: int, t_max: int, gen: torch.Generator | None,
                       device: torch.device | str = "cpu", logit_mean: float = 0.0, logit_std: float = 1.0,
                       mode_scale: float = 1.29, shift: float = 1.0) -> torch.Tensor:
    """``n`` integer timesteps in ``[t_min, t_max)`` (int64) for the DDPM families."""
    if distribution == "uniform" and shift == 1.0:
        # the original draw: unchanged so that runs made before these options reproduce exactly
        return torch.randint(t_min, t_max, (n,), generator=gen, device=device)
    u = timestep_fractions(n, distribution, gen=gen, device=device, logit_mean=logit_mean, logit_std=logit_std,
                           mode_scale=mode_scale, shift=shift)
    t = t_min + torch.floor(u * (t_max - t_min)).long()
    return t.clamp(t_min, t_max - 1)


def density(distribution: str, *, bins: int, logit_mean: float = 0.0, logit_std: float = 1.0,
            mode_scale: float = 1.29, shift: float = 1.0, samples: int = 200_000, seed: int = 0) -> torch.Tensor:
    """Relative frequency of each of ``bins`` equal slices of [0, 1) (a histogram of many seeded draws, sums
    to 1): what the app's schedule preview draws."""
    gen = torch.Generator().manual_seed(seed)
    u = timestep_fractions(samples, distribution, gen=gen, logit_mean=logit_mean, logit_std=logit_std,
                           mode_scale=mode_scale, shift=shift)
    counts = torch.bincount(torch.floor(u * bins).long().clamp(0, bins - 1), minlength=bins).double()
    return counts / counts.sum()
