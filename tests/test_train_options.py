"""The options users bring from kohya_ss / OneTrainer: optimizers (Prodigy, schedule-free AdamW, Lion, CAME,
AdEMAMix, 8-bit variants), learning-rate schedules, timestep distributions, debiased estimation, pyramid noise
and scheduled Huber losses. Each is checked against its closed form or its statistics, trains a tiny model,
and (optimizers) survives an exact resume."""

from __future__ import annotations

import importlib
import io
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from sdstudio.core import events as ev
from sdstudio.core.config import DiffusionConfig, LossConfig, RunConfig, TrainConfig
from sdstudio.core.control import TrainingControl
from sdstudio.core.diffusion import (
    debiased_weights,
    diffusion_loss,
    huber_deltas,
    per_sample_loss,
    pyramid_noise,
    sample_noise,
    snr_curve,
    training_scheduler,
    training_timesteps,
)
from sdstudio.core.errors import ConfigError
from sdstudio.core.timesteps import base_fractions, density, discrete_timesteps, timestep_fractions
from sdstudio.core.train import optim
from sdstudio.core.train.optim import LRSchedule, build_optimizer, param_groups
from sdstudio.core.train.step import OptimizerStep

CPU = torch.device("cpu")


def _have(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


# learning rates that train the tiny regression below within 40 steps
OPTIMIZERS = {"adamw": 1e-2, "prodigy": 1.0, "adamw_schedulefree": 1e-2, "lion": 1e-3, "came": 1e-3,
              "ademamix": 1e-2, "adamw8bit": 1e-2, "lion8bit": 1e-3, "ademamix8bit": 1e-2}
NEEDS = {"prodigy": "prodigyopt", "adamw_schedulefree": "schedulefree", "lion": "pytorch_optimizer",
         "came": "pytorch_optimizer", "ademamix": "pytorch_optimizer", "adamw8bit": "bitsandbytes",
         "lion8bit": "bitsandbytes", "ademamix8bit": "bitsandbytes"}


def _optimizer_params() -> list:
    out = []
    for name in OPTIMIZERS:
        module = NEEDS.get(name)
        marks = [] if module is None or _have(module) else [pytest.mark.skip(
            reason=f"{module} is not installed here (pip install 'sdstudio[test]')")]
        out.append(pytest.param(name, marks=marks))
    return out


class _Regression:
    """A two-layer MLP fitting a fixed random linear map; a hidden layer of 8192 weights so that
    bitsandbytes keeps 8-bit state for it (it uses 32-bit state below 4096 elements)."""

    def __init__(self, name: str, steps: int) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(16, 512), torch.nn.SiLU(), torch.nn.Linear(512, 16))
        self.cfg = TrainConfig(optimizer=name, learning_rate=OPTIMIZERS[name], lr_scheduler="constant",
                               weight_decay=0.0, max_grad_norm=1.0, device="cpu")
        params = list(self.model.parameters())
        opt = build_optimizer(param_groups([("model", params, self.cfg.learning_rate)]), self.cfg, device=CPU)
        self.steps = OptimizerStep(Accelerator(cpu=True), self.model, opt, LRSchedule(self.cfg, steps), params,
                                   None, self.cfg)
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(64, 16, generator=gen)
        self.y = self.x @ torch.randn(16, 16, generator=gen) * 0.5

    def loss(self, batch: dict, micro: int) -> torch.Tensor:
        idx = batch["idx"]
        return F.mse_loss(self.model(self.x[idx]), self.y[idx])

    def run(self, start: int, stop: int) -> list[float]:
        return [self.steps.run([{"idx": torch.arange(s % 4 * 16, s % 4 * 16 + 16)}], s, self.loss)[0]
                for s in range(start, stop)]

    def full_loss(self) -> float:
        with torch.no_grad(), self.steps.evaluation_weights():
            return float(F.mse_loss(self.model(self.x), self.y))

    def checkpoint(self) -> bytes:
        """What the session saves: the evaluation weights, the optimizer, the schedule and the extra state."""
        with self.steps.evaluation_weights():
            weights = {k: v.clone() for k, v in self.model.state_dict().items()}
            state = {"optimizer": self.steps.optimizer.state_dict(), "schedule": self.steps.schedule.state_dict(),
                     "extra": self.steps.extra_state(), "weights": weights}
            buf = io.BytesIO()
            torch.save(state, buf)
        return buf.getvalue()

    def restore(self, blob: bytes) -> None:
        """What resume does (weights_only, as core/train/state.py reads training_state.pt)."""
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["weights"])
        self.steps.load_state(state)


@pytest.mark.parametrize("name", _optimizer_params())
def test_optimizer_trains_and_resumes_exactly(name: str) -> None:
    n = 40
    straight = _Regression(name, n)
    before = straight.full_loss()
    straight.run(0, n)
    after = straight.full_loss()
    assert after < 0.5 * before, f"{name}: loss {before:.4f} -> {after:.4f}"

    first = _Regression(name, n)
    first.run(0, n // 2)
    blob = first.checkpoint()
    second = _Regression(name, n)  # a new process: the same initial weights, a fresh optimizer
    second.restore(blob)
    second.run(n // 2, n)
    for (k, a), b in zip(straight.model.state_dict().items(), second.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{name}: {k} differs after N/2 + resume + N/2"
    assert straight.full_loss() == second.full_loss()


@pytest.mark.skipif(not _have("schedulefree"), reason="schedulefree is not installed here")
def test_schedule_free_evaluates_the_averaged_weights_and_restores_the_training_point() -> None:
    reg = _Regression("adamw_schedulefree", 10)
    reg.run(0, 10)
    y = [p.detach().clone() for p in reg.model.parameters()]
    with reg.steps.evaluation_weights():
        x = [p.detach().clone() for p in reg.model.parameters()]
        with reg.steps.evaluation_weights():  # nested (a checkpoint saved during validation) stays in x
            assert all(torch.equal(a, p) for a, p in zip(x, reg.model.parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(x, y, strict=True)), "x (the average) differs from y"
    assert all(torch.equal(a, p) for a, p in zip(y, reg.model.parameters(), strict=True)), "y restored exactly"
    assert reg.steps.optimizer.param_groups[0]["train_mode"]


def test_missing_optimizer_package_names_the_extra(monkeypatch) -> None:
    real = importlib.import_module

    def fake(name: str, *args):
        if name == "prodigyopt":
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(optim.importlib, "import_module", fake)
    cfg = TrainConfig(optimizer="prodigy")
    with pytest.raises(ConfigError, match=r"train.optimizer = 'prodigy' needs the prodigyopt package: pip install "
                                          r"'sdstudio\[optimizers\]'"):
        build_optimizer(param_groups([("m", [torch.nn.Parameter(torch.zeros(2))], 1.0)]), cfg, device=CPU)


@pytest.mark.skipif(not _have("prodigyopt"), reason="prodigyopt is not installed here")
def test_prodigy_keys_reach_the_optimizer() -> None:
    cfg = TrainConfig(optimizer="prodigy", learning_rate=1.0, prodigy_d_coef=0.5, prodigy_d0=1e-4,
                      prodigy_safeguard_warmup=True, betas=(0.9, 0.99))
    opt = build_optimizer(param_groups([("m", [torch.nn.Parameter(torch.zeros(2))], 1.0)]), cfg, device=CPU)
    group = opt.param_groups[0]
    assert (group["d_coef"], group["d"], group["safeguard_warmup"], group["betas"]) == (0.5, 1e-4, True, (0.9, 0.99))


def test_prodigy_with_a_small_learning_rate_is_warned_about() -> None:
    assert optim.optimizer_warnings(TrainConfig(optimizer="prodigy", learning_rate=1.0)) == []
    (warning,) = optim.optimizer_warnings(TrainConfig(optimizer="prodigy", learning_rate=1e-4))
    assert "train.learning_rate = 1.0" in warning and "prodigy_d_coef" in warning


# -- learning-rate schedules ----------------------------------------------------------------------------------
def _schedule(total: int = 100, **kw) -> LRSchedule:
    return LRSchedule(TrainConfig(**kw), total)


def test_cosine_with_restarts_restarts_at_each_cycle() -> None:
    s = _schedule(lr_scheduler="cosine_with_restarts", lr_cycles=2)
    assert s.factor(0) == 1.0 and s.factor(50) == 1.0, "a hard restart at the second cycle"
    assert s.factor(25) == pytest.approx(0.5) and s.factor(75) == pytest.approx(0.5)
    assert s.factor(49) < 0.01 and s.factor(99) < 0.01
    floor = _schedule(lr_scheduler="cosine_with_restarts", lr_cycles=3, min_lr_ratio=0.1)
    assert min(floor.curve()) >= 0.1 - 1e-12


def test_polynomial_wsd_rex_and_piecewise_follow_their_closed_forms() -> None:
    poly = _schedule(lr_scheduler="polynomial", lr_power=2.0, warmup_steps=10)
    assert poly.factor(4) == pytest.approx(0.5)  # warm-up first
    assert poly.factor(10 + 45) == pytest.approx(0.25)  # (1 - 1/2)^2
    wsd = _schedule(lr_scheduler="warmup_stable_decay", lr_decay_fraction=0.2, min_lr_ratio=0.1)
    assert wsd.factor(79) == 1.0 and wsd.factor(50) == 1.0
    assert wsd.factor(90) == pytest.approx(0.1 + 0.9 * 0.5)
    assert wsd.factor(100) == pytest.approx(0.1)
    rex = _schedule(lr_scheduler="rex")
    assert rex.factor(50) == pytest.approx(0.5 / 0.75)
    lin = _schedule(lr_scheduler="linear")
    assert all(rex.factor(i) >= lin.factor(i) - 1e-12 for i in range(100)), "REX stays above linear"
    pw = _schedule(lr_scheduler="piecewise", lr_piecewise_steps=[0, 10, 20], lr_piecewise_values=[1.0, 0.5, 0.1])
    assert [pw.factor(i) for i in (0, 5, 10, 15, 20, 30)] == pytest.approx([1.0, 0.75, 0.5, 0.3, 0.1, 0.1])


def test_schedule_config_problems_are_named() -> None:
    with pytest.raises(ConfigError, match="lr_piecewise_steps: 2 steps and 1 values"):
        RunConfig().with_overrides({"train.lr_scheduler": "piecewise", "train.lr_piecewise_steps": [0, 5],
                                    "train.lr_piecewise_values": [1.0]})
    with pytest.raises(ConfigError, match="increasing"):
        RunConfig().with_overrides({"train.lr_scheduler": "piecewise", "train.lr_piecewise_steps": [5, 5],
                                    "train.lr_piecewise_values": [1.0, 0.5]})
    with pytest.raises(ConfigError, match="'adamw_schedulefree' replaces the schedule"):
        RunConfig().with_overrides({"train.optimizer": "adamw_schedulefree", "train.lr_scheduler": "cosine"})
    with pytest.raises(ConfigError, match="loss.timestep_logit_std"):
        RunConfig().with_overrides({"loss.timestep_logit_std": 0.0})


# -- timesteps ------------------------------------------------------------------------------------------------
def test_uniform_timesteps_draw_exactly_what_they_always_did() -> None:
    a = discrete_timesteps(64, "uniform", t_min=10, t_max=900, gen=torch.Generator().manual_seed(3))
    b = torch.randint(10, 900, (64,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_logit_normal_statistics() -> None:
    gen = torch.Generator().manual_seed(0)
    u = base_fractions(200_000, "logit_normal", gen=gen, logit_mean=0.5, logit_std=0.8).double()
    z = torch.log(u / (1 - u))
    assert float(z.mean()) == pytest.approx(0.5, abs=0.01) and float(z.std()) == pytest.approx(0.8, abs=0.01)
    t = discrete_timesteps(200_000, "logit_normal", t_min=0, t_max=1000, gen=torch.Generator().manual_seed(1))
    middle = float(((t >= 250) & (t < 750)).double().mean())
    # P(|N(0,1)| < logit(0.75)) = erf(ln 3 / sqrt 2)
    assert middle == pytest.approx(math.erf(math.log(3) / math.sqrt(2)), abs=0.005)


def test_mode_sampling_statistics() -> None:
    flat = density("mode", bins=10, mode_scale=0.0)
    assert torch.allclose(flat, torch.full((10,), 0.1, dtype=torch.float64), atol=0.005), "s = 0 is uniform"
    peaked = density("mode", bins=10, mode_scale=1.29)
    assert peaked[4] > 0.14 and peaked[0] < 0.08 and peaked[9] < 0.08
    ends = density("mode", bins=10, mode_scale=-0.8)
    assert ends[0] > 0.12 and ends[5] < 0.08


def test_shift_moves_timesteps_to_the_noisy_end() -> None:
    u = timestep_fractions(400_000, "uniform", gen=torch.Generator().manual_seed(0), shift=3.0)
    # E[3u / (1 + 2u)] for uniform u = 3/2 - (3/4) ln 3
    assert float(u.double().mean()) == pytest.approx(1.5 - 0.75 * math.log(3), abs=0.002)
    t = training_timesteps(100_000, LossConfig(timestep_shift=3.0), 0, 1000, torch.Generator().manual_seed(0), CPU)
    assert float(t.double().mean()) == pytest.approx(1000 * (1.5 - 0.75 * math.log(3)), abs=5)


@pytest.mark.parametrize("kind", ["uniform", "logit_normal", "mode"])
def test_every_distribution_keeps_to_the_timestep_range(kind: str) -> None:
    cfg = LossConfig(timestep_distribution=kind, timestep_shift=2.0, timestep_logit_std=3.0)
    t = training_timesteps(50_000, cfg, 100, 400, torch.Generator().manual_seed(0), CPU)
    assert t.dtype == torch.int64 and int(t.min()) == 100 and int(t.max()) == 399


# -- losses and noise -----------------------------------------------------------------------------------------
def _sched(prediction: str = "epsilon"):
    return training_scheduler(DiffusionConfig(prediction_type=prediction, schedule="scaled_linear",
                                              beta_start=0.00085, beta_end=0.012), pixel_space=False)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_debiased_estimation_weights_match_the_closed_form(prediction: str) -> None:
    sched = _sched(prediction)
    t = torch.tensor([0, 10, 500, 999])
    snr = snr_curve(sched)[t].float().clamp(1e-6, 1000)
    expected = {"epsilon": 1 / snr.sqrt(), "v_prediction": 1 / (snr + 1), "sample": snr.sqrt()}[prediction]
    assert torch.allclose(debiased_weights(sched, t), expected)
    pred, target = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    plain = per_sample_loss(pred, target, LossConfig())
    weighted = diffusion_loss(pred, target, t, sched, LossConfig(debiased_estimation=True))
    assert float(weighted) == pytest.approx(float((plain * expected).mean()), rel=1e-5)


def test_scheduled_huber_deltas_match_kohya() -> None:
    sched = _sched()
    t = torch.tensor([0, 250, 999])
    exp = huber_deltas(sched, t, LossConfig(kind="huber", huber_delta=0.1, huber_schedule="exponential"))
    assert torch.allclose(exp, torch.exp(math.log(0.1) / 1000 * t.float()))
    assert float(exp[0]) == 1.0 and float(exp[-1]) == pytest.approx(0.1, rel=0.01)
    snr = huber_deltas(sched, t, LossConfig(kind="huber", huber_delta=0.1, huber_schedule="snr"))
    ac = sched.alphas_cumprod[t].float()
    assert torch.allclose(snr, 0.9 / (1 + ((1 - ac) / ac).sqrt()) ** 2 + 0.1)
    assert float(snr[0]) > 0.9 and float(snr[-1]) < 0.11, "wide delta at clean timesteps, narrow at noisy"


def test_huber_and_pseudo_huber_with_per_sample_deltas() -> None:
    err = torch.tensor([0.05, 2.0]).view(2, 1, 1, 1)
    zero = torch.zeros_like(err)
    deltas = torch.tensor([0.1, 0.5])
    huber = per_sample_loss(err, zero, LossConfig(kind="huber"), deltas=deltas)
    assert torch.allclose(huber, torch.tensor([0.5 * 0.05 ** 2, 0.5 * (2.0 - 0.25)]))
    pseudo = per_sample_loss(err, zero, LossConfig(kind="pseudo_huber"), deltas=deltas)
    assert torch.allclose(pseudo, 2 * deltas * (torch.sqrt(err.flatten() ** 2 + deltas ** 2) - deltas))
    # a constant schedule keeps torch's huber_loss; per-sample deltas of the same value agree with it
    x, y = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    cfg = LossConfig(kind="huber", huber_delta=0.3)
    assert torch.allclose(per_sample_loss(x, y, cfg), per_sample_loss(x, y, cfg, deltas=torch.full((3,), 0.3)))
    # the scheduled loss weighs the same error differently at different timesteps
    sched = _sched()
    scheduled = LossConfig(kind="pseudo_huber", huber_delta=0.1, huber_schedule="snr")
    big = torch.full((1, 1, 4, 4), 3.0)
    low = diffusion_loss(big, torch.zeros_like(big), torch.tensor([0]), sched, scheduled)
    high = diffusion_loss(big, torch.zeros_like(big), torch.tensor([999]), sched, scheduled)
    assert float(low) > 4 * float(high)


def test_pyramid_noise_is_unit_variance_and_spatially_correlated() -> None:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(8, 4, 32, 32, generator=gen)
    noise = pyramid_noise(base, 6, 0.8, gen)
    assert torch.allclose(noise.flatten(1).std(dim=1), torch.ones(8), atol=1e-5)

    def lag1(x: torch.Tensor) -> float:
        a, b = x[..., :, :-1].flatten(), x[..., :, 1:].flatten()
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])

    assert abs(lag1(base)) < 0.05 and lag1(noise) > 0.3, "low frequencies added"
    clean = torch.zeros(2, 4, 16, 16)
    plain, _ = sample_noise(clean, LossConfig(), torch.Generator().manual_seed(5))
    assert torch.equal(plain, torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))), \
        "off by default: the same draw as before"
    pyr, _ = sample_noise(clean, LossConfig(pyramid_noise_iterations=4, pyramid_noise_discount=0.8),
                          torch.Generator().manual_seed(5))
    assert not torch.equal(pyr, plain) and lag1(pyr) > lag1(plain) + 0.1


LOSS_OPTIONS = {
    "debiased": {"debiased_estimation": True},
    "pyramid": {"pyramid_noise_iterations": 6, "pyramid_noise_discount": 0.5},
    "logit_normal": {"timestep_distribution": "logit_normal", "timestep_logit_mean": 0.3},
    "mode": {"timestep_distribution": "mode"},
    "shifted": {"timestep_shift": 3.0},
    "huber_exponential": {"kind": "huber", "huber_schedule": "exponential"},
    "pseudo_huber_snr": {"kind": "pseudo_huber", "huber_schedule": "snr"},
}


@pytest.mark.parametrize("option", list(LOSS_OPTIONS))
def test_a_tiny_denoiser_trains_with_each_loss_option(option: str) -> None:
    """30 steps of a tiny convolutional denoiser on fixed images: the validation MSE (fixed timesteps, fixed
    noise, as the session's) falls with every option."""
    loss_cfg = LossConfig(**LOSS_OPTIONS[option])
    sched = _sched()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(5, 32, 3, padding=1), torch.nn.SiLU(),
                                torch.nn.Conv2d(32, 4, 3, padding=1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    data_gen = torch.Generator().manual_seed(0)
    clean = torch.randn(8, 4, 1, 1, generator=data_gen).expand(8, 4, 16, 16).contiguous()

    def predict(noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = (t.float() / 1000).view(-1, 1, 1, 1).expand(-1, 1, *noisy.shape[2:])
        return model(torch.cat([noisy, tt], dim=1))

    def val() -> float:
        gen = torch.Generator().manual_seed(99)
        with torch.no_grad():
            total = 0.0
            for tk in (100, 400, 700):
                noise = torch.randn(clean.shape, generator=gen)
                t = torch.full((8,), tk)
                total += float(F.mse_loss(predict(sched.add_noise(clean, noise, t), t), noise))
        return total / 3

    before = val()
    for step in range(30):
        gen = torch.Generator().manual_seed(step)
        t = training_timesteps(8, loss_cfg, 0, 1000, gen, CPU)
        noise, model_noise = sample_noise(clean, loss_cfg, gen)
        loss = diffusion_loss(predict(sched.add_noise(clean, model_noise, t), t), noise, t, sched, loss_cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert val() < 0.8 * before, option


# -- end to end: the session wires it all, and resume is exact ------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not _have("schedulefree"), reason="schedulefree is not installed here")
def test_schedule_free_run_with_the_new_losses_resumes_exactly(tiny_config, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from sdstudio.core.runs import load_run_config, read_metrics
    from sdstudio.core.train.loop import train

    cfg = tiny_config.with_overrides({
        "train.optimizer": "adamw_schedulefree", "train.lr_scheduler": "constant_with_warmup",
        "train.warmup_steps": 2, "train.max_steps": 6, "checkpoint.every_steps": 0, "train.val_every_steps": 1,
        "loss.timestep_distribution": "logit_normal", "loss.pyramid_noise_iterations": 3,
        "loss.debiased_estimation": True, "loss.kind": "pseudo_huber", "loss.huber_schedule": "snr",
        "sample.every_steps": 2})

    def run(run_dir: Path, control: TrainingControl | None = None, resume: bool = False, stop_at: int = 0):
        events = []
        for event in train(cfg, control, run_dir=run_dir, resume=resume):
            events.append(event)
            if stop_at and isinstance(event, ev.StepMetrics) and event.step == stop_at:
                control.request_stop()
        return events

    straight = run(tmp_path / "a")
    assert isinstance(straight[-1], ev.Finished) and straight[-1].reason == "completed", straight[-1]
    control = TrainingControl()
    first = run(tmp_path / "b", control, stop_at=3)
    assert first[-1].reason == "stopped"
    second = run(tmp_path / "b", resume=True)
    assert second[-1].reason == "completed", second[-1]
    rows_a = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if r["kind"] == "train"}
    rows_b = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if r["kind"] == "train"}
    assert rows_a == rows_b
    wa = load_file(str(tmp_path / "a" / "checkpoints" / "step-00000006" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "checkpoints" / "step-00000006" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    saved = load_run_config(tmp_path / "b")
    assert saved.loss.huber_schedule == "snr" and saved.train.optimizer == "adamw_schedulefree"
