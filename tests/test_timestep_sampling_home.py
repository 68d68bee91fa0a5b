"""core/timesteps.py is the one home of the timestep densities and the shift: flow matching draws through it
exactly as before (diffusers' compute_density_for_timestep_sampling, then the SD3 shift, bit for bit), and the
discrete families' timesteps are those of the formula they used before."""

from __future__ import annotations

import math

import pytest
import torch

from sdstudio.core.config import FlowConfig
from sdstudio.core.flow import sample_sigmas, shift_sigmas
from sdstudio.core.timesteps import discrete_timesteps


def _before_flow(n: int, cfg: FlowConfig, shift: float, seed: int) -> torch.Tensor:
    """flow.sample_sigmas as it was: diffusers' densities, then s t / (1 + (s - 1) t)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(cfg.timestep_sampling, n, logit_mean=cfg.logit_mean,
                                              logit_std=cfg.logit_std, mode_scale=cfg.mode_scale,
                                              generator=torch.Generator().manual_seed(seed)).float()
    return shift * u / (1 + (shift - 1) * u)


@pytest.mark.parametrize("sampling", ["logit_normal", "uniform", "mode"])
def test_flow_sigmas_are_unchanged_bit_for_bit(sampling: str) -> None:
    for seed in range(5):
        for n, shift in ((1, 1.0), (7, 3.0), (64, math.exp(1.15)), (300, 1.0)):
            cfg = FlowConfig(timestep_sampling=sampling, logit_mean=0.3, logit_std=1.4, mode_scale=1.29)
            got = sample_sigmas(n, cfg, shift, torch.Generator().manual_seed(seed))
            assert torch.equal(got, _before_flow(n, cfg, shift, seed)), (sampling, seed, n, shift)
    t = torch.linspace(0, 1, 11)
    assert torch.equal(shift_sigmas(t, 3.0), 3.0 * t / (1 + 2.0 * t)) and torch.equal(shift_sigmas(t, 1.0), t)


def test_discrete_timesteps_are_those_of_the_former_formula() -> None:
    """The former draw was sigmoid(mean + std * randn): for the default (0, 1) the same numbers."""
    for seed in range(5):
        got = discrete_timesteps(4096, "logit_normal", t_min=0, t_max=1000, gen=torch.Generator().manual_seed(seed))
        u = torch.sigmoid(0.0 + 1.0 * torch.randn((4096,), generator=torch.Generator().manual_seed(seed)))
        want = torch.floor(u.clamp(0.0, 1.0 - 1e-7) * 1000).long().clamp(0, 999)
        assert torch.equal(got, want)
        got = discrete_timesteps(64, "uniform", t_min=100, t_max=900, gen=torch.Generator().manual_seed(seed))
        assert torch.equal(got, torch.randint(100, 900, (64,), generator=torch.Generator().manual_seed(seed)))
