"""Flow matching (core/flow.py): closed-form cases, the shift against diffusers' scheduler, and the [flow] keys
changing what the objective trains on."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sdstudio.core.config import FlowConfig, LossConfig, RunConfig
from sdstudio.core.flow import (
    FlowSchedule,
    flow_loss,
    loss_weights,
    noised,
    resolution_shift,
    sample_sigmas,
    shift_sigmas,
    training_shift,
    velocity,
)
from sdstudio.core.models.bundle import ModelBundle
from sdstudio.core.models.registry import get_family

DEV = get_family("flux-dev").flow
SCHNELL = get_family("flux-schnell").flow


def test_exact_velocity_reconstructs_x0() -> None:
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([0.1, 0.5, 0.97])
    xt = noised(x0, noise, t)
    v = velocity(x0, noise)
    assert torch.allclose(xt - t.view(-1, 1, 1, 1) * v, x0, atol=1e-6)  # one Euler step to t = 0
    assert torch.allclose(xt + (1 - t).view(-1, 1, 1, 1) * v, noise, atol=1e-6)  # and to t = 1
    assert torch.equal(noised(x0, noise, torch.zeros(3)), x0) and torch.equal(noised(x0, noise, torch.ones(3)), noise)


class _Identity(ModelBundle):
    """A 'latent' bundle whose model space is the picture itself (for the sampler's closed form)."""

    def encode_captions(self, captions, device):
        return {}


def test_sampler_with_the_exact_velocity_lands_on_x0() -> None:
    """The real preview sampler (FlowMatchEulerDiscreteScheduler, Flux dev's resolution shift) driven by the
    exact velocity field towards a known x0 returns x0 from pure noise, whatever the steps."""
    from sdstudio.core.sampling.sampler import generate

    x0 = torch.linspace(-0.9, 0.9, 3 * 16 * 16).reshape(1, 3, 16, 16)

    class Exact(torch.nn.Module):
        def forward(self, x, t, cond):
            return (x - x0) / t.view(-1, 1, 1, 1)  # = noise - x0 on the straight path through x0

    bundle = _Identity(family="flux-dev", trainable=Exact(), save_modules={}, prediction_type="flow", in_channels=3,
                       sample_size=16, architecture={"patch_size": 2})
    for steps in (1, 4, 28):
        images = generate(bundle, Exact(), FlowSchedule(FlowConfig(), DEV), ["x"], [0], steps=steps, guidance=1.0,
                          sampler="euler", device=torch.device("cpu"))
        expected = ((x0 + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1, steps


def test_shift_matches_diffusers_scheduler() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sd3 = FlowMatchEulerDiscreteScheduler(shift=3.0)
    base = np.linspace(1.0, 1 / 20, 20)
    sd3.set_timesteps(sigmas=base)
    assert torch.allclose(sd3.sigmas[:-1].float(), shift_sigmas(torch.tensor(base, dtype=torch.float32), 3.0),
                          atol=1e-5)
    for seq in (256, 1024, 4096):
        dyn = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
        sig = np.linspace(1.0, 1 / 20, 20)
        dyn.set_timesteps(sigmas=sig, mu=calculate_shift(seq))
        ours = shift_sigmas(torch.tensor(sig, dtype=torch.float32), resolution_shift(seq))
        assert torch.allclose(dyn.sigmas[:-1].float(), ours, atol=1e-5), seq
    assert resolution_shift(256) == pytest.approx(math.exp(0.5)) and resolution_shift(4096) == pytest.approx(
        math.exp(1.15))
    # the scheduler our sampler builds for Flux dev shifts exactly so
    sched = FlowSchedule(FlowConfig(), DEV).sampling_timesteps(10, 1024)
    ref = shift_sigmas(torch.tensor(np.linspace(1.0, 0.1, 10), dtype=torch.float32), resolution_shift(1024))
    assert torch.allclose(sched.sigmas[:-1].float(), ref, atol=1e-5)
    plain = FlowSchedule(FlowConfig(), SCHNELL).sampling_timesteps(4, 1024)
    assert torch.allclose(plain.sigmas[:-1].float(), torch.tensor([1.0, 0.75, 0.5, 0.25]), atol=1e-6)


def test_training_shift_modes() -> None:
    assert training_shift(FlowConfig(), DEV, 1024) == pytest.approx(resolution_shift(1024))  # auto: as it samples
    assert training_shift(FlowConfig(), SCHNELL, 1024) == 1.0
    assert training_shift(FlowConfig(shift="fixed", shift_value=3.0), SCHNELL, 1024) == 3.0
    assert training_shift(FlowConfig(shift="none"), DEV, 1024) == 1.0
    wide = FlowConfig(shift="resolution", base_shift=0.2, max_shift=2.0)
    assert training_shift(wide, SCHNELL, 4096) == pytest.approx(math.exp(2.0))
    assert training_shift(wide, SCHNELL, 256) == pytest.approx(math.exp(0.2))


def _median(cfg: FlowConfig, shift: float = 1.0) -> float:
    return float(sample_sigmas(20000, cfg, shift, torch.Generator().manual_seed(1)).median())


def test_timestep_densities() -> None:
    assert _median(FlowConfig()) == pytest.approx(0.5, abs=0.02)
    assert _median(FlowConfig(logit_mean=1.0)) == pytest.approx(1 / (1 + math.exp(-1.0)), abs=0.02)
    narrow = sample_sigmas(20000, FlowConfig(logit_std=0.3), 1.0, torch.Generator().manual_seed(1))
    wide = sample_sigmas(20000, FlowConfig(logit_std=2.0), 1.0, torch.Generator().manual_seed(1))
    assert narrow.std() < 0.5 * wide.std()
    uniform = sample_sigmas(20000, FlowConfig(timestep_sampling="uniform"), 1.0, torch.Generator().manual_seed(1))
    assert abs(float(uniform.mean()) - 0.5) < 0.01 and abs(float(uniform.std()) - (1 / 12) ** 0.5) < 0.01
    mode = sample_sigmas(20000, FlowConfig(timestep_sampling="mode", mode_scale=1.29), 1.0,
                         torch.Generator().manual_seed(1))
    assert float(((mode > 0.25) & (mode < 0.75)).float().mean()) > 0.6  # more mass in the middle than uniform's 0.5
    mode0 = sample_sigmas(20000, FlowConfig(timestep_sampling="mode", mode_scale=0.0), 1.0,
                          torch.Generator().manual_seed(1))
    assert torch.allclose(mode0, 1 - uniform, atol=1e-6)  # scale 0 is uniform (mirrored)
    assert _median(FlowConfig(), shift=3.0) == pytest.approx(0.75, abs=0.02)  # shift(0.5, 3) = 0.75


def test_loss_weightings() -> None:
    s = torch.tensor([0.2, 0.5, 0.8])
    assert torch.allclose(loss_weights("none", s), torch.ones(3))
    assert torch.allclose(loss_weights("sigma_sqrt", s), s ** -2)
    assert torch.allclose(loss_weights("cosmap", s), 2 / (math.pi * (1 - 2 * s + 2 * s ** 2)))
    pred, target = torch.zeros(3, 1, 2, 2), torch.ones(3, 1, 2, 2)
    plain = flow_loss(pred, target, s, LossConfig(), FlowConfig())
    weighted = flow_loss(pred, target, s, LossConfig(), FlowConfig(weighting="sigma_sqrt"))
    assert float(plain) == pytest.approx(1.0) and float(weighted) == pytest.approx(float((s ** -2).mean()))


def _objective(overrides: dict) -> object:
    from sdstudio.core.train.flow_objective import FlowMatchingObjective

    cfg = RunConfig().with_overrides({"model.family": "flux-dev", "lora.enabled": True, **overrides})
    bundle = SimpleNamespace(architecture={"patch_size": 2}, model_family=get_family("flux-dev"))
    sched = FlowMatchingObjective.schedule(cfg, bundle, torch.device("cpu"))  # type: ignore[arg-type]
    acc = SimpleNamespace(device=torch.device("cpu"), process_index=0)
    return FlowMatchingObjective(cfg, bundle, sched, None, acc, None, None)  # type: ignore[arg-type]


def _drawn(overrides: dict, side: int = 64) -> torch.Tensor:
    obj = _objective(overrides)
    clean = torch.zeros(256, 16, side, side)
    _, _, t = obj.noised(clean, obj._noise_generator(0, 0))
    return t


@pytest.mark.parametrize("key,value,higher", [
    ("flow.shift", "none", False), ("flow.logit_mean", 1.0, True), ("flow.timestep_sampling", "uniform", None),
])
def test_flow_keys_change_the_training_timesteps(key: str, value: object, higher: bool | None) -> None:
    base = _drawn({})
    changed = _drawn({key: value})
    assert not torch.equal(base, changed)
    if higher is not None:
        assert (float(changed.mean()) > float(base.mean())) == higher


def test_resolution_shift_follows_the_image_size_in_training() -> None:
    small, large = _drawn({}, side=16), _drawn({}, side=128)  # 64 vs 4096 image tokens: more noise when larger
    assert float(large.mean()) > float(small.mean()) + 0.1
    fixed = _drawn({"flow.shift": "fixed", "flow.shift_value": 6.0})
    assert float(fixed.median()) == pytest.approx(6 * 0.5 / (1 + 5 * 0.5), abs=0.05)
    lifted = _drawn({"flow.shift": "resolution", "flow.base_shift": 1.5, "flow.max_shift": 2.5})
    assert float(lifted.mean()) > float(_drawn({"flow.shift": "resolution"}).mean())
    mode = _drawn({"flow.timestep_sampling": "mode", "flow.mode_scale": 1.0, "flow.shift": "none"})
    assert not torch.equal(mode, _drawn({"flow.timestep_sampling": "mode", "flow.mode_scale": 0.0,
                                         "flow.shift": "none"}))
    assert float(_drawn({"flow.logit_std": 0.2}).std()) < float(_drawn({}).std())


def test_flow_weighting_changes_the_training_loss() -> None:
    obj = _objective({"flow.weighting": "cosmap"})
    plain = _objective({})
    pred, target, t = torch.zeros(4, 1, 2, 2), torch.ones(4, 1, 2, 2), torch.tensor([0.1, 0.3, 0.6, 0.9])
    assert float(obj._loss(pred, target, t)) != pytest.approx(float(plain._loss(pred, target, t)))
