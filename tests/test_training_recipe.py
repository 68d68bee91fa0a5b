"""The training recipe's other terms (issue 19): the variational bound with learned variances (Improved DDPM),
the contrastive caption term, and the learned noise schedule (VDM). Closed forms first, then each wired into
the objective, the samplers and a tiny training run with resume."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdstudio.core import events as ev
from sdstudio.core.config import RunConfig
from sdstudio.core.diffusion import sampling_scheduler, training_scheduler
from sdstudio.core.errors import ConfigError
from sdstudio.core.learned_schedule import (
    LearnedNoiseSchedule,
    bound_weights,
    log_snr,
    sync_scheduler,
)
from sdstudio.core.models.pixel.model import PixelBundle
from sdstudio.core.sampling.sampler import generate
from sdstudio.core.train.recipe import TrainingRecipe, info_nce
from sdstudio.core.vlb import (
    LOG2,
    discretized_gaussian_log_likelihood,
    normal_kl,
    posterior,
    vlb_terms,
)

CPU = torch.device("cpu")


def _sched(**kw):
    cfg = RunConfig().diffusion.model_copy(update=kw)
    return training_scheduler(cfg, pixel_space=True)


# -- the variational bound -----------------------------------------------------------------------------------
def test_normal_kl_matches_torch_distributions() -> None:
    gen = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(50, generator=gen), torch.randn(50, generator=gen)
    lv1, lv2 = torch.randn(50, generator=gen), torch.randn(50, generator=gen)
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                                 torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    assert torch.allclose(normal_kl(m1, lv1, m2, lv2), expected, atol=1e-5)


def test_discretized_likelihood_is_a_distribution_over_the_256_levels() -> None:
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in ((0.1, math.log(0.05)), (-0.7, math.log(0.3)), (0.98, math.log(0.01))):
        ll = discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean),
                                                 torch.full_like(levels, log_scale))
        assert abs(float(ll.exp().sum()) - 1.0) < 1e-6
        # an inner level: the Gaussian's mass over its bin, in closed form
        k = 100
        dist = torch.distributions.Normal(mean, math.exp(log_scale))
        mass = dist.cdf(levels[k] + 1 / 255) - dist.cdf(levels[k] - 1 / 255)
        assert abs(float(ll[k].exp()) - float(mass)) < 1e-9


def test_vlb_term_is_the_gaussian_kl_to_the_true_posterior() -> None:
    sched = _sched()
    ac = sched.alphas_cumprod
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(2, 3, 4, 4, generator=gen) * 2 - 1
    eps = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([10, 500])
    a = ac[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    # a perfect mean with v = -1 (the posterior's own variance beta-tilde): the bound's term is 0
    zero = vlb_terms(ac, x0, xt, t, eps, -torch.ones_like(x0), "epsilon")
    assert torch.allclose(zero, torch.zeros(2), atol=1e-6)
    # v = +1 (variance beta_t) with a perfect mean: KL of two zero-mean-difference Gaussians, closed form
    prev = torch.cat([torch.ones(1), ac[:-1]]).double()
    beta = 1 - ac.double() / prev
    tilde = beta * (1 - prev) / (1 - ac.double())
    expected = 0.5 * (-1 + torch.log(beta[t] / tilde[t]) + tilde[t] / beta[t]) / LOG2
    got = vlb_terms(ac, x0, xt, t, eps, torch.ones_like(x0), "epsilon")
    assert torch.allclose(got.double(), expected, rtol=1e-4)
    # a wrong mean adds the squared mean error over the variance, also in closed form
    wrong = eps + 0.1
    mean_true, lv = posterior(ac, x0, xt, t)
    x0_wrong = (xt.double() - (1 - a.double()).sqrt() * wrong.double()) / a.double().sqrt()
    mean_wrong, _ = posterior(ac, x0_wrong, xt, t)
    closed = (0.5 * (mean_true - mean_wrong) ** 2 / lv.exp()).mean(dim=(1, 2, 3)) / LOG2
    got = vlb_terms(ac, x0, xt, t, wrong, -torch.ones_like(x0), "epsilon")
    assert torch.allclose(got.double(), closed, rtol=1e-4)


def test_vlb_term_at_t0_is_the_decoder_nll() -> None:
    sched = _sched()
    ac = sched.alphas_cumprod
    x0 = (torch.randint(0, 256, (1, 3, 4, 4)).double() / 127.5 - 1)
    t = torch.tensor([0])
    xt = ac[0].sqrt() * x0 + (1 - ac[0]).sqrt() * 0.01 * torch.ones_like(x0)
    pred = torch.zeros_like(x0)
    v = torch.zeros_like(x0)
    got = vlb_terms(ac, x0, xt, t, pred, v, "epsilon")
    from sdstudio.core.vlb import learned_log_variance, predicted_x0

    mean, _ = posterior(ac, predicted_x0(ac, xt, pred, t, "epsilon"), xt, t)
    ll = discretized_gaussian_log_likelihood(x0, mean, 0.5 * learned_log_variance(ac, v, t))
    assert torch.allclose(got.double(), -ll.mean() / LOG2, rtol=1e-5)
    assert float(got) > 0


def _recipe(**overrides) -> tuple[TrainingRecipe, RunConfig]:

    cfg = RunConfig().with_overrides({"train.device": "cpu", **overrides})
    model = nn.Identity()
    return TrainingRecipe(cfg, model, _sched()), cfg


def test_hybrid_loss_trains_only_the_variance_from_the_bound() -> None:
    recipe, _ = _recipe(**{"model.learned_variance": True, "loss.vlb_weight": 0.001})
    gen = torch.Generator().manual_seed(2)
    x0 = torch.rand(4, 3, 8, 8, generator=gen) * 2 - 1
    t = torch.tensor([0, 3, 400, 990])
    a = recipe.sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=gen)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    pred = (noise + 0.3 * torch.randn(x0.shape, generator=gen)).requires_grad_()
    v = torch.zeros_like(x0, requires_grad=True)
    extra = recipe.terms(clean=x0, noisy=xt, t=t, pred=pred, v=v, target=noise, cond={}, captions=["a"] * 4,
                         per_sample=torch.zeros(4))
    extra.backward()
    assert pred.grad is None  # stop-gradient on the mean
    assert v.grad is not None and float(v.grad.abs().sum()) > 0
    assert float(recipe.last["vlb"]) > 0


class _ConstantModel(nn.Module):
    """Predicts epsilon = 0 and a fixed v: what the sampler does with v is all that differs."""

    def __init__(self, v: float, learned: bool = True) -> None:
        super().__init__()
        self.v, self.learned = v, learned

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        eps = torch.zeros_like(x)
        return torch.cat([eps, torch.full_like(x, self.v)], dim=1) if self.learned else eps


def _bundle() -> PixelBundle:
    return PixelBundle(family="pixel", trainable=nn.Identity(), save_modules={}, prediction_type="epsilon",
                       in_channels=3, sample_size=8)


def _images(model: nn.Module, sampler: str, sched=None) -> np.ndarray:
    return generate(_bundle(), model, sched if sched is not None else _sched(), [""], [0, 1], steps=5,
                    guidance=1.0, sampler=sampler, device=CPU)


def test_ancestral_sampler_uses_the_learned_variance_and_deterministic_ones_ignore_it() -> None:
    low, high = _images(_ConstantModel(-1.0), "ddpm"), _images(_ConstantModel(1.0), "ddpm")
    assert not np.array_equal(low, high)  # v changes the step's noise
    assert np.array_equal(_images(_ConstantModel(-1.0), "ddim"), _images(_ConstantModel(1.0), "ddim"))
    assert np.array_equal(_images(_ConstantModel(-1.0), "ddim"), _images(_ConstantModel(0.0, learned=False), "ddim"))
    sched = sampling_scheduler(_sched(), "ddpm", learned_variance=True)
    assert sched.config.variance_type == "learned_range"


# -- the contrastive caption term ---------------------------------------------------------------------------
def test_info_nce_values_on_constructed_errors() -> None:
    none = torch.zeros(3, 2, dtype=torch.bool)
    right = torch.tensor([[0.1, 0.5, 0.6]] * 3)
    assert float(info_nce(right, none, 0.01)) < 1e-6  # own caption clearly best: ~0
    wrong = torch.tensor([[0.6, 0.1, 0.5]] * 3)
    assert float(info_nce(wrong, none, 0.01)) > 40  # another caption best: ~ (0.6 - 0.1) / 0.01
    equal = torch.full((3, 3), 0.2)
    assert abs(float(info_nce(equal, none, 0.01)) - math.log(3)) < 1e-6  # no preference: log(1 + K)
    same = torch.tensor([[True, True]] * 3)  # every other caption is the own one: nothing to contrast
    assert float(info_nce(wrong, same, 0.01)) == 0.0


class _CaptionModel(nn.Module):
    """Denoises perfectly (target 0) only under its own caption: error = scale * (caption id - image id)^2;
    the image's id is in its noisy input, the caption's in cond["ids"]."""

    def __init__(self, sign: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0 * sign))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        gap = (cond["ids"].float() - x[:, 0, 0, 0]).view(-1, 1, 1, 1)
        return torch.ones_like(x) * self.scale * gap.abs()


def _contrastive(model: nn.Module, negatives: int = 3, captions: list[str] | None = None) -> torch.Tensor:

    cfg = RunConfig().with_overrides({"loss.contrastive_weight": 1.0, "loss.contrastive_temperature": 0.01,
                                      "loss.contrastive_negatives": negatives})
    recipe = TrainingRecipe(cfg, model, _sched())
    b = 4
    noisy = torch.arange(b, dtype=torch.float32).view(-1, 1, 1, 1).expand(b, 3, 4, 4).contiguous()
    target = torch.zeros_like(noisy)
    cond = {"ids": torch.arange(b)}
    t = torch.full((b,), 500)
    pred = model(noisy, t, cond)
    return recipe.contrastive(noisy, t, pred, target, cond, captions or ["a", "b", "c", "d"])


def test_contrastive_term_is_low_when_the_own_caption_denoises_best_and_its_gradient_flows() -> None:
    good = _CaptionModel()
    loss = _contrastive(good)
    assert float(loss.detach()) < 0.01
    bad_model = _CaptionModel(sign=0.0)
    with torch.no_grad():
        bad_model.scale.fill_(0.0)  # every caption equally good: log(1 + K)
    assert abs(float(_contrastive(bad_model)) - math.log(4)) < 1e-5
    # the gradient pushes the mismatched captions' error up (scale grows)
    weak = _CaptionModel()
    with torch.no_grad():
        weak.scale.fill_(0.01)
    _contrastive(weak).backward()
    assert weak.scale.grad is not None and float(weak.scale.grad) < 0
    # duplicates of the own caption are not negatives; dropped (empty) captions have nothing to prefer
    assert float(_contrastive(_CaptionModel(), captions=["a", "a", "a", "a"])) == 0.0
    assert float(_contrastive(_CaptionModel(), captions=["", "", "", ""])) == 0.0


# -- the learned schedule ----------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_learned_schedule_is_monotone_with_fixed_endpoints_for_random_weights(seed: int) -> None:
    base = _sched().alphas_cumprod
    schedule = LearnedNoiseSchedule(base, units=16)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in schedule.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 4)
    gamma = schedule.gamma()
    assert bool((gamma[1:] >= gamma[:-1]).all())
    base_gamma = -log_snr(base).float()
    assert torch.allclose(gamma[[0, -1]], base_gamma[[0, -1]], rtol=1e-5)


def test_learned_schedule_starts_at_the_configured_schedule() -> None:
    base = _sched().alphas_cumprod
    learned = LearnedNoiseSchedule(base).alphas_cumprod()
    # the sigmoid units start faint, not off (else they would barely learn): within 0.2 of a log-SNR range of 30
    gap = (log_snr(learned) - log_snr(base)).abs()
    assert float(gap.max()) < 0.2 and float(gap[100:900].max()) < 0.05


def test_schedule_gradient_reaches_the_schedule_and_not_the_denoiser() -> None:

    cfg = RunConfig().with_overrides({"diffusion.learned_schedule": True})
    trainable = nn.Module()
    trainable.denoiser = nn.Conv2d(3, 3, 3, padding=1)
    trainable.noise_schedule = LearnedNoiseSchedule(_sched().alphas_cumprod, units=8)
    gen = torch.Generator().manual_seed(4)
    clean = torch.rand(6, 3, 8, 8, generator=gen) * 2 - 1
    noise = torch.randn(clean.shape, generator=gen)
    t = torch.tensor([1, 50, 200, 400, 700, 950])

    def grads(with_schedule_term: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        trainable.zero_grad()
        recipe = TrainingRecipe(cfg, trainable, _sched())
        recipe.begin()
        noisy, target = recipe.noised(clean, noise, noise, t, learn=True)
        pred = trainable.denoiser(noisy)
        per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        loss = per_sample.mean()
        if with_schedule_term:
            loss = loss + recipe.terms(clean=clean, noisy=noisy, t=t, pred=pred, v=None, target=target, cond={},
                                       captions=[""] * 6, per_sample=per_sample)
        loss.backward()
        sched_grad = trainable.noise_schedule.scale.grad
        return trainable.denoiser.weight.grad.clone(), None if sched_grad is None else sched_grad.clone()

    plain, no_sched = grads(False)
    assert no_sched is None or float(no_sched.abs().sum()) == 0  # without its term the schedule learns nothing
    with_term, sched_grad = grads(True)
    assert torch.allclose(plain, with_term)  # the denoiser learns from its own loss only
    assert sched_grad is not None and float(sched_grad.abs().sum()) > 0


def test_bound_weights_are_the_snr_ratio() -> None:
    gamma = torch.tensor([-2.0, -1.0, 0.5, 3.0])
    t = torch.tensor([0, 1, 2, 3])
    w = bound_weights(gamma, t, "epsilon")
    assert float(w[0]) == 0.0
    assert torch.allclose(w[1:], torch.exp(gamma[1:] - gamma[:-1]) - 1)


def test_sampler_uses_the_learned_schedule() -> None:
    base = _sched()
    learned_sched = _sched()
    schedule = LearnedNoiseSchedule(base.alphas_cumprod, units=8)
    with torch.no_grad():
        schedule.scale.fill_(2.0)  # a clearly different curve
    sync_scheduler(learned_sched, schedule.alphas_cumprod())
    for sampler in ("ddim", "ddpm", "euler", "dpmpp_2m"):
        s = sampling_scheduler(learned_sched, sampler)
        assert torch.allclose(s.alphas_cumprod, schedule.alphas_cumprod().detach(), rtol=1e-3), sampler
    a = _images(_ConstantModel(0.0, learned=False), "ddim", base)
    b = _images(_ConstantModel(0.0, learned=False), "ddim", learned_sched)
    assert not np.array_equal(a, b)


# -- configuration ------------------------------------------------------------------------------------------
def test_recipe_options_refuse_what_they_do_not_fit() -> None:
    with pytest.raises(ConfigError, match="model.learned_variance"):
        RunConfig().with_overrides({"model.family": "sd1", "model.path": "x", "model.learned_variance": True})
    with pytest.raises(ConfigError, match="diffusion.zero_terminal_snr"):
        RunConfig().with_overrides({"diffusion.learned_schedule": True, "diffusion.zero_terminal_snr": True})
    with pytest.raises(ConfigError, match="train.batch_size"):
        RunConfig().with_overrides({"loss.contrastive_weight": 0.1, "train.batch_size": 1})
    with pytest.raises(ConfigError, match="model.conditional"):
        RunConfig().with_overrides({"loss.contrastive_weight": 0.1, "model.conditional": False})


# -- end to end: a tiny run with every option, stopped and resumed -----------------------------------------
@pytest.mark.slow  # three tiny runs and an export: ~40 s alone on 2 cores, minutes when the machine is shared
def test_tiny_run_with_every_option_trains_resumes_and_samples(tiny_config, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from sdstudio.core.control import TrainingControl
    from sdstudio.core.runs import load_run_config, read_metrics
    from sdstudio.core.sampling.from_run import load_trained
    from sdstudio.core.train.loop import train

    cfg = tiny_config.with_overrides({
        "model.learned_variance": True, "loss.contrastive_weight": 0.1, "diffusion.learned_schedule": True,
        "train.max_steps": 4, "checkpoint.every_steps": 2, "train.learning_rate": 3e-3, "sample.sampler": "ddpm",
        "data.caption_dropout": 0.0})

    def run(run_dir: Path, control: TrainingControl | None = None, resume: bool = False, stop_at: int = 0):
        events = []
        for event in train(cfg, control, run_dir=run_dir, resume=resume):
            events.append(event)
            if stop_at and isinstance(event, ev.StepMetrics) and event.step == stop_at:
                control.request_stop()
        return events

    straight = run(tmp_path / "a")
    assert straight[-1].reason == "completed", straight[-1]
    curves = [e for e in straight if isinstance(e, ev.LearnedSchedule)]
    assert [c.step for c in curves] == [1, 2, 3, 4] and len(curves[-1].log10_snr) == len(curves[-1].timesteps)
    assert curves[0].log10_snr != curves[-1].log10_snr  # the schedule learns
    assert (tmp_path / "a" / "noise_schedule.json").is_file()
    control = TrainingControl()
    assert run(tmp_path / "b", control, stop_at=2)[-1].reason == "stopped"
    assert run(tmp_path / "b", resume=True)[-1].reason == "completed"
    wa = load_file(str(tmp_path / "a" / "checkpoints" / "step-00000004" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "checkpoints" / "step-00000004" / "model.safetensors"))
    assert any(k.startswith("noise_schedule.") for k in wa)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    train_a = [r for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if r["kind"] == "train"]
    train_b = [r for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["loss"] for r in train_a] == [r["loss"] for r in train_b]
    # the recipe's terms are logged beside the loss (mean over the logged window), the same after a resume
    for term in ("vlb", "contrastive"):
        values = [r[term] for r in train_a]
        assert len(values) == 4 and all(math.isfinite(v) and v > 0 for v in values), (term, values)
        assert values == [r[term] for r in train_b]
    saved = load_run_config(tmp_path / "b")
    assert saved.diffusion.learned_schedule and saved.model.learned_variance and saved.loss.contrastive_weight == 0.1
    # sampling from the run: the learned schedule's alphas and the learned-variance head
    loaded = load_trained(tmp_path / "a", use_ema=False, device="cpu")
    schedule = loaded.bundle.trainable.noise_schedule
    assert torch.allclose(loaded.scheduler.alphas_cumprod, schedule.alphas_cumprod().detach(), rtol=1e-3)
    assert not torch.allclose(loaded.scheduler.alphas_cumprod, _sched().alphas_cumprod, rtol=1e-3)
    images = loaded.generate(["a red circle on white"], [0], steps=4, sampler="ddpm")
    assert images.shape == (1, 16, 16, 3)
    # exported as a diffusers folder: the learned schedule and the variance head travel with it
    from sdstudio.core.export.api import export
    from sdstudio.core.sampling.from_files import load_model

    folder = export(tmp_path / "a", "diffusers-folder", tmp_path / "export", dtype=torch.float32)
    reloaded = load_model(folder, device="cpu")
    assert torch.allclose(reloaded.scheduler.alphas_cumprod, loaded.scheduler.alphas_cumprod, rtol=1e-4)
    for sampler in ("ddpm", "ddim"):
        again = reloaded.generate(["a red circle on white"], [0], steps=4, sampler=sampler)
        assert np.array_equal(again, loaded.generate(["a red circle on white"], [0], steps=4, sampler=sampler))


def test_learned_variance_model_loss_falls(tiny_config, tmp_path: Path) -> None:
    from sdstudio.core.train.loop import train

    cfg = tiny_config.with_overrides({"model.learned_variance": True, "train.max_steps": 8,
                                      "train.learning_rate": 3e-3, "checkpoint.every_steps": 0,
                                      "sample.at_end": False, "data.val_split": 0.0})
    from sdstudio.core.sampling.from_run import load_trained

    losses = [e.loss for e in train(cfg, None, run_dir=tmp_path / "run") if isinstance(e, ev.StepMetrics)]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    loaded = load_trained(tmp_path / "run", device="cpu")
    assert loaded.bundle.trainable.unet.config.out_channels == 6
    for sampler in ("ddpm", "ddim"):
        images = loaded.generate(["a red circle on white"], [0, 1], steps=4, sampler=sampler)
        assert images.shape == (2, 16, 16, 3) and images.std() > 0
