"""train.compile_prewarm (issue 14): with torch.compile and static shapes every aspect-ratio bucket's graphs are
compiled before step 1 (a forward and backward per shape, nothing kept), so nothing compiles mid-run, the losses
and weights are bit for bit those of a run without it, the warm-up is reported apart (a ``compiled`` event row
with ``warmup_s``), and a resume pre-warms again.

The runs compile with the ``aot_eager`` backend (dynamo's graphs, guards and recompiles and AOT autograd's joint
forward/backward, without inductor's C++ code generation: minutes per shape on this CPU; tests/test_speed.py runs
inductor itself).
The whole-model compile (``train.compile_mode = "whole"``) pre-warms through the same path (~70 s here: not
run by default; add it to the parametrize list to check it)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdstudio.core import events as ev
from sdstudio.core.control import TrainingControl
from sdstudio.core.data.buckets import BucketSize
from sdstudio.core.train.loop import train
from sdstudio.core.train.speed import compiler_available
from tests.conftest_data import noise_image, save

SQUARE, WIDE = BucketSize(16, 16), BucketSize(24, 8)


def two_bucket_folder(root: Path) -> Path:
    """Two square and two 3:1 wide captioned images: at 16 px and batch 2, one batch of each bucket per epoch."""
    for i in range(2):
        for name, (w, h) in (("square", (48, 48)), ("wide", (96, 32))):
            save(noise_image(w, h, seed=10 + i * 7 + len(name)), root / f"{name}{i}.png")
            (root / f"{name}{i}.txt").write_text(f"a {name} picture", encoding="utf-8")
    return root


@pytest.fixture
def bucket_config(tiny_config, tmp_path: Path):
    return tiny_config.with_overrides({
        "data.path": str(two_bucket_folder(tmp_path / "data")), "data.bucketing": True, "data.val_split": 0.0,
        "train.batch_size": 2, "train.max_steps": 4, "train.lr_scheduler": "constant",
        "train.compile": True, "train.compile_mode": "whole", "train.compile_cache": False,
        "checkpoint.every_steps": 2, "sample.at_end": False})


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _run(config, run_dir: Path, *, resume: bool = False, stop_after: int = 0) -> tuple[list[ev.Event], dict[int, int]]:
    """All events of the run, and the number of dynamo graphs compiled so far at each logged step."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # every run compiles from nothing
    counters.clear()
    control = TrainingControl()
    events, graphs = [], {}
    for event in train(config, control, run_dir=run_dir, resume=resume):
        events.append(event)
        if isinstance(event, ev.StepMetrics):
            graphs[event.step] = _graphs()
            if stop_after and event.step == stop_after:
                control.request_stop()
    assert isinstance(events[-1], ev.Finished), events[-1]
    return events, graphs


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def _rows(run_dir: Path, event: str) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "event" and r.get("event") == event]


@pytest.fixture
def aot_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    if compiler_available(torch.device("cpu")):
        pytest.skip(compiler_available(torch.device("cpu")))
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))


def test_the_shapes_ahead_are_the_buckets_the_run_meets(bucket_config) -> None:
    from sdstudio.core.train.session import TrainingSession

    session = TrainingSession(bucket_config, run_dir=None, resume=False)
    session.prepare_data()
    batches = session.batches
    order = [keys[0].size for e in range(2) for keys in batches.order.batches(e)]
    assert set(order[:2]) == {SQUARE, WIDE}  # one batch of each bucket per epoch
    assert batches.shapes_ahead(0, 0, 4) == order[:2]  # in the order they come up
    assert batches.shapes_ahead(0, 0, 1) == order[:1]  # a one-step run meets one bucket
    assert batches.shapes_ahead(0, 1, 1) == order[1:2]  # ... from where a resumed run stands
    assert batches.shapes_ahead(1, 1, 0) == []
    batch = batches.shape_batch(WIDE)
    assert batch["pixels"].shape == (2, 3, 8, 24)
    plain = TrainingSession(bucket_config.with_overrides({"data.bucketing": False}), run_dir=None, resume=False)
    plain.prepare_data()
    assert plain.batches.shapes_ahead(0, 0, 4) == [None]
    assert plain.batches.shape_batch(None)["pixels"].shape == (2, 3, 16, 16)


# regional (the default) compiles small block graphs: ~35 s here; whole (one graph of the model): ~70 s
@pytest.mark.parametrize("mode", ["regional"])
def test_prewarm_compiles_every_bucket_before_step_1_and_changes_nothing(mode: str, bucket_config, tmp_path: Path,
                                                                         aot_eager) -> None:
    bucket_config = bucket_config.with_overrides({"train.compile_mode": mode})
    warm_events, warm = _run(bucket_config, tmp_path / "warm")
    cold_events, cold = _run(bucket_config.with_overrides({"train.compile_prewarm": False}), tmp_path / "cold")
    # pre-warmed: both buckets' graphs exist at step 1 and nothing compiles after it
    assert warm[1] == warm[4] >= 2
    # without: the second bucket compiles when it first comes up (step 2: one batch of each bucket per epoch)
    assert cold[1] < cold[2] == cold[4] == warm[4]
    # bit for bit the same run
    assert _losses(tmp_path / "warm") == _losses(tmp_path / "cold")
    final = "checkpoints/step-00000004/model.safetensors"
    wa, wb = load_file(str(tmp_path / "warm" / final)), load_file(str(tmp_path / "cold" / final))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # the warm-up, reported apart: a Status with the count, progress per shape, the time, an event row
    statuses = [(e.phase, e.text) for e in warm_events if isinstance(e, ev.Status)]
    assert ("compiling", "compiling 2 bucket shapes (") in [(p, t[:27]) for p, t in statuses]
    assert any(p == "compiled" and "2 bucket shapes compiled in" in t for p, t in statuses)
    progress = [(e.done, e.total) for e in warm_events if isinstance(e, ev.Progress) and "bucket" in e.what]
    assert progress == [(0, 2), (1, 2), (2, 2)]
    (row,) = _rows(tmp_path / "warm", "compiled")
    assert row["step"] == 0 and row["warmup_s"] > 0 and sorted(row["shapes"]) == ["16x16", "24x8"]
    assert row["batch_size"] == 2
    assert not _rows(tmp_path / "cold", "compiled")
    assert not any(isinstance(e, ev.Status) and e.phase == "compiled" for e in cold_events)


@pytest.mark.slow
def test_a_resumed_run_prewarms_again_and_continues_exactly(bucket_config, tmp_path: Path, aot_eager) -> None:
    bucket_config = bucket_config.with_overrides({"train.compile_mode": "regional"})  # the default, half the time
    _run(bucket_config, tmp_path / "whole")
    _run(bucket_config, tmp_path / "cut", stop_after=2)
    assert max(_losses(tmp_path / "cut")) == 2
    _, graphs = _run(bucket_config, tmp_path / "cut", resume=True)
    assert graphs[3] == graphs[4] >= 2  # steps 3 and 4: the two buckets, both compiled before step 3
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "whole")
    rows = _rows(tmp_path / "cut", "compiled")
    assert [r["step"] for r in rows] == [0, 2]


def test_prewarm_is_off_without_compile_or_with_dynamic_shapes(bucket_config) -> None:
    from sdstudio.core.train.session import TrainingSession

    for overrides in ({"train.compile": False}, {"train.compile_dynamic": True}, {"train.compile_prewarm": False}):
        session = TrainingSession(bucket_config.with_overrides(overrides), run_dir=None, resume=False)
        session.prepare_data()
        session.build()
        try:
            assert session.prewarm_shapes() == []
        finally:
            session.close()


class _Tracker:
    def __init__(self) -> None:
        self.seen = 0

    def observe(self, *args) -> None:
        self.seen += 1


@pytest.mark.parametrize("paths", ["fused_backward", "ema", "sd1-lora-checkpointing", "sd1-full"])
def test_a_prewarm_pass_runs_forward_and_backward_and_keeps_nothing(paths: str, bucket_config, tiny_sd1: Path,
                                                                   tmp_path: Path, monkeypatch) -> None:
    """Eager (the pass is the same with or without compile): the backward runs, and afterwards the weights, the
    gradients (None), the optimizer state, the EMA, the per-image loss and every random stream are as before."""
    import random

    import numpy as np

    from sdstudio.core.train.session import TrainingSession
    from tests.sd_helpers import sd_config

    config = bucket_config.with_overrides({"train.compile": False})
    size = WIDE
    if paths == "fused_backward":
        config = config.with_overrides({"train.fused_backward": True, "train.max_grad_norm": 0.0})
    elif paths == "ema":
        config = config.with_overrides({"train.ema": True})
    else:
        preset, extra = (("sd15-lora", {"train.gradient_checkpointing": True}) if paths.endswith("checkpointing")
                         else ("sd15-full", {"train.ema": False}))
        config = sd_config(preset, tiny_sd1, two_bucket_folder(tmp_path / "sd"),
                           **{"train.batch_size": 2, "train.max_steps": 2, **extra})
        size = None
    session = TrainingSession(config, run_dir=None, resume=False)
    session.prepare_data()
    session.build()
    try:
        trainable = [(n, p) for n, p in session.bundle.trainable.named_parameters() if p.requires_grad]
        weights = {n: p.detach().clone() for n, p in trainable}
        ema = session.ema.optimization_step if session.ema is not None else None
        backward: list[int] = []
        trainable[-1][1].register_hook(lambda g: backward.append(1))
        loss = session.objective.loss

        def drawing_loss(*args):  # something in a step that draws from the global streams (e.g. dropout)
            torch.rand(3), random.random(), np.random.rand()
            return loss(*args)

        monkeypatch.setattr(session.objective, "loss", drawing_loss)
        tracker = session.objective.image_losses = _Tracker()
        streams = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
        session.prewarm(size)
        assert backward, "the backward pass ran"
        assert all(p.grad is None for _, p in trainable)
        assert all(torch.equal(p, weights[n]) for n, p in trainable), "no weight moved"
        assert not session.optimizer.state, "the optimizer never stepped"
        if ema is not None:
            assert session.ema.optimization_step == ema == 0
        assert session.objective.image_losses is tracker and tracker.seen == 0
        assert torch.equal(torch.get_rng_state(), streams[0]) and random.getstate() == streams[1]
        assert np.array_equal(np.random.get_state()[1], streams[2])
    finally:
        session.close()


def test_the_cli_shows_the_warm_up(tiny_config, tmp_path: Path, monkeypatch, capsys) -> None:
    import argparse

    from sdstudio.cli.train import drive_training
    from sdstudio.core.train import loop

    def fake_train(config, control, *, run_dir, resume):
        yield ev.Started(run_dir, {}, 4, 0)
        yield ev.Status("compiling", "compiling 2 bucket shapes (16x16, 24x8; batch 2) with torch.compile")
        for done in range(3):
            yield ev.Progress(done, 2, "compiling bucket shapes")
        yield ev.Status("compiled", "2 bucket shapes compiled in 12.5 s")
        yield ev.Status("training", "training")
        yield ev.Finished(run_dir, "completed", 4)

    monkeypatch.setattr(loop, "train", fake_train)
    assert drive_training(tiny_config, tmp_path / "run", resume=False, quiet=False, args=argparse.Namespace()) == 0
    err = capsys.readouterr().err
    assert "compiling bucket shapes" in err  # the progress bar of the shapes
    assert "torch.compile warm-up: 2 bucket shapes compiled in 12.5 s" in err
