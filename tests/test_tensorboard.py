"""TensorBoard event files (train.tensorboard): the tags and steps read back with TensorBoard's own reader,
a resumed run continuing one series (events after the checkpoint purged), a missing package as input error."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from sdstudio.core import events as ev
from sdstudio.core.control import TrainingControl
from sdstudio.core.runs import read_metrics
from sdstudio.core.train.session import TrainingSession
from sdstudio.core.train.tensorboard_log import INSTALL_HINT, TENSORBOARD_DIR

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.test_engine import run_all

TRAIN_TAGS = {"train/loss", "train/lr", "train/grad_norm", "train/img_per_s"}


def read_back(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / TENSORBOARD_DIR), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def scalar_steps(acc: EventAccumulator, tag: str) -> list[int]:
    return [e.step for e in acc.Scalars(tag)]


def values(acc: EventAccumulator, tag: str) -> list[float]:
    return [e.value for e in acc.Scalars(tag)]


def test_event_files_hold_losses_validation_fid_and_sample_grids(tiny_config, tmp_path: Path) -> None:
    from tests.fid_helpers import random_fid_state_dict

    weights = tmp_path / "inception.pth"
    torch.save(random_fid_state_dict(), weights)
    cfg = tiny_config.with_overrides({"train.tensorboard": True, "train.val_every_steps": 2,
                                      "sample.every_steps": 3, "eval.inception_weights": str(weights),
                                      "eval.fid_every_steps": 3, "eval.num_samples": 4,
                                      "eval.sampler_steps": 2})
    run_dir = tmp_path / "run"
    events = run_all(cfg, run_dir)
    assert isinstance(events[-1], ev.Finished) and events[-1].reason == "completed", events[-1]
    acc = read_back(run_dir)
    tags = set(acc.Tags()["scalars"])
    buckets = {f"val/loss_t{i}" for i in range(10)}
    assert TRAIN_TAGS | {"val/loss"} | buckets | {"eval/fid", "eval/kid_mean", "eval/kid_std"} <= tags
    rows = read_metrics(run_dir / "metrics.jsonl")
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert scalar_steps(acc, "train/loss") == [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert values(acc, "train/loss") == pytest.approx([r["loss"] for r in train_rows], rel=1e-6)
    assert values(acc, "train/lr") == pytest.approx([r["lr"] for r in train_rows], rel=1e-6)
    val_rows = [r for r in rows if r["kind"] == "val" and "val_loss" in r]
    assert scalar_steps(acc, "val/loss") == [r["step"] for r in val_rows] == [2, 4, 6]
    assert values(acc, "val/loss_t9") == pytest.approx([r["val_buckets"][9] for r in val_rows])
    fids = [e for e in events if isinstance(e, ev.EvalResult)]
    assert scalar_steps(acc, "eval/fid") == [e.step for e in fids] == [3, 6]
    assert values(acc, "eval/kid_mean") == pytest.approx([e.kid_mean for e in fids], rel=1e-6)
    images = acc.Images("samples")
    grid = next(e for e in events if isinstance(e, ev.SampleGrid)).image
    assert [i.step for i in images] == [3, 6] and (images[0].height, images[0].width) == grid.shape[:2]


def test_resume_continues_one_series_and_purges_events_after_the_checkpoint(tiny_config, tmp_path: Path,
                                                                          monkeypatch) -> None:
    """A crash at step 6 with the last checkpoint at step 3: the resumed run rewrites steps 4-8; the first
    session's steps 4-5 (and its sample grid of step 5) are hidden, the series has every step once."""
    cfg = tiny_config.with_overrides({"train.tensorboard": True, "train.max_steps": 8,
                                      "checkpoint.every_steps": 3, "sample.at_end": False})
    run_dir = tmp_path / "run"
    original = TrainingSession.optimizer_step

    def crash_at_6(self, group):
        if self.step == 5:
            raise RuntimeError("injected crash")
        return original(self, group)

    control = TrainingControl()

    def sample_at_5(event: ev.Event) -> None:
        if isinstance(event, ev.StepMetrics) and event.step == 5:
            control.request_sample()

    monkeypatch.setattr(TrainingSession, "optimizer_step", crash_at_6)
    first = run_all(cfg, run_dir, control, on_event=sample_at_5)
    assert isinstance(first[-1], ev.Failed) and first[-1].kind == "error"
    assert scalar_steps(read_back(run_dir), "train/loss") == [1, 2, 3, 4, 5]
    monkeypatch.setattr(TrainingSession, "optimizer_step", original)

    second = run_all(cfg, run_dir, resume=True)
    assert isinstance(second[-1], ev.Finished) and second[-1].reason == "completed", second[-1]
    assert len(list((run_dir / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 2, "one folder, appended"
    acc = read_back(run_dir)
    for tag in TRAIN_TAGS:
        assert scalar_steps(acc, tag) == list(range(1, 9)), tag
    train_rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert values(acc, "train/loss") == pytest.approx([r["loss"] for r in train_rows], rel=1e-6)
    images = acc.Images("samples") if "samples" in acc.Tags()["images"] else []
    assert images == [], "the grid of step 5 came after the checkpoint: purged"


def test_a_missing_tensorboard_package_is_an_input_error_before_training(tiny_config, tmp_path: Path,
                                                                        monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails like an absent package
    run_dir = tmp_path / "run"
    events = run_all(tiny_config.with_overrides({"train.tensorboard": True}), run_dir)
    failed = events[-1]
    assert isinstance(failed, ev.Failed) and failed.kind == "input", failed
    assert INSTALL_HINT in failed.message and "train.tensorboard" in failed.message
    assert not any(isinstance(e, ev.Started) for e in events) and not run_dir.exists()


def test_tensorboard_off_writes_no_event_files(tiny_config, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    events = run_all(tiny_config.with_overrides({"train.max_steps": 2}), run_dir)
    assert isinstance(events[-1], ev.Finished)
    assert not (run_dir / TENSORBOARD_DIR).exists()
