"""An EMA that costs less per step (issue 13): ``train.ema_every`` (an update every N steps with the decays of the
N steps multiplied) and ``train.ema_on_cpu`` (copies into reused CPU buffers, the averaging in a background
thread). Tolerance against diffusers' per-step average: at most (N - 1) times the largest per-step change of a
weight (the window's weights stand in for the N - 1 steps before them, whose weights the average would have
taken in with weights summing to less than one)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file

from sdstudio.core import events as ev
from sdstudio.core.control import TrainingControl
from sdstudio.core.train.ema import EmaWeights
from sdstudio.core.train.loop import train

DECAY = 0.99


def _params() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(64, 32)), torch.nn.Parameter(torch.randn(128))]


def _reference(params: list[torch.nn.Parameter]) -> EMAModel:
    return EMAModel([p.detach().clone().requires_grad_(True) for p in params], decay=DECAY, foreach=True)


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def test_windowed_decay_is_exact_when_weights_change_only_between_windows() -> None:
    params = _params()
    ref, lean = _reference(params), EmaWeights(params, ["a", "b"], decay=DECAY, on_cpu=False, every=5)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, 61):
        ref.step(params)
        lean.update()
        if step % 5 == 0:  # the weights stay put inside a window: decay**N is then the per-step average exactly
            with torch.no_grad():
                for p in params:
                    p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    assert lean.optimization_step == 60
    assert _max_diff(lean.average.shadow_params, ref.shadow_params) < 1e-5


@pytest.mark.parametrize("on_cpu", [False, True])
def test_every_n_steps_stays_within_the_stated_tolerance_and_copies_n_times_less(on_cpu: bool) -> None:
    every, steps = 4, 200
    params = _params()
    ref = _reference(params)
    lean = EmaWeights(params, ["a", "b"], decay=DECAY, on_cpu=on_cpu, every=every)
    per_step = EmaWeights(params, ["a", "b"], decay=DECAY, on_cpu=on_cpu, every=1)
    gen = torch.Generator().manual_seed(2)
    largest_move = 0.0
    for _ in range(steps):
        with torch.no_grad():
            for p in params:
                move = torch.randn(p.shape, generator=gen) * 1e-3 + 1e-3  # noise and a drift, like training
                p.add_(move)
                largest_move = max(largest_move, move.abs().max().item())
        ref.step(params)
        lean.update()
        per_step.update()
    err = _max_diff(lean.average.shadow_params, ref.shadow_params)
    assert 0 < err <= (every - 1) * largest_move, (err, largest_move)
    assert _max_diff(per_step.average.shadow_params, ref.shadow_params) < 1e-6  # the per-step path is unchanged
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    if on_cpu:  # one copy of the weights per update: N times fewer
        assert per_step.bytes_copied == steps * weight_bytes
        assert lean.bytes_copied == steps // every * weight_bytes
    else:
        assert lean.bytes_copied == per_step.bytes_copied == 0
    assert all(s.device.type == "cpu" for s in lean.average.shadow_params)


def test_cpu_average_runs_in_a_background_thread_and_reads_wait_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    params = _params()
    ema = EmaWeights(params, ["a", "b"], decay=DECAY, on_cpu=True, every=1)
    seen: list[str] = []
    real_sub = torch._foreach_sub_

    def slow_sub(*args, **kwargs):
        seen.append(threading.current_thread().name)
        threading.Event().wait(0.05)
        return real_sub(*args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_sub_", slow_sub)
    ema.update()
    ema.update()
    assert ema.average.optimization_step == 2  # the read waited for the second update
    assert seen and all(name.startswith("sdstudio-ema") for name in seen)
    monkeypatch.undo()
    ref = _reference(params)
    ref.step(params)
    ref.step(params)
    assert _max_diff(ema.average.shadow_params, ref.shadow_params) == 0.0
    ema.close()


def _ema_of(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step-{step:08d}" / "ema.safetensors"))


def _run(cfg, run_dir: Path, control: TrainingControl | None = None, resume: bool = False, stop_at: int = 0):
    events = []
    for event in train(cfg, control=control, run_dir=run_dir, resume=resume):
        events.append(event)
        if stop_at and isinstance(event, ev.StepMetrics) and event.step == stop_at:
            assert control is not None
            control.request_stop()
    assert isinstance(events[-1], ev.Finished), events[-1]
    return events


@pytest.mark.slow  # four tiny runs: ~20 s on a quiet 2-core machine, minutes when it is shared
def test_ema_every_changes_the_average_in_training_and_resumes_exactly(tiny_config, tmp_path: Path) -> None:
    base = {"train.ema": True, "train.ema_decay": 0.9, "checkpoint.every_steps": 0, "train.max_steps": 8}
    per_step = tmp_path / "per-step"
    _run(tiny_config.with_overrides(base), per_step)
    cfg = tiny_config.with_overrides({**base, "train.ema_every": 3})
    straight = tmp_path / "straight"
    _run(cfg, straight)
    a, b = _ema_of(per_step, 8), _ema_of(straight, 8)
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a), "train.ema_every = 3 averages fewer times"
    spread = max((a[k] - b[k]).abs().max().item() for k in a)
    assert spread < 0.05  # close: 8 steps of a tiny model at its learning rate move the weights little
    # stopped mid-window (step 4 of the window 4..6) and resumed: the same average as straight through
    split = tmp_path / "split"
    _run(cfg, split, TrainingControl(), stop_at=4)
    _run(cfg, split, resume=True)
    c = _ema_of(split, 8)
    assert all(torch.equal(b[k], c[k]) for k in b)
