"""The run's position and early stopping as parts of a training session (no model needed)."""

from __future__ import annotations

import math

from sdstudio.core.config import RunConfig
from sdstudio.core.train.progress import EarlyStopping, Progress


def test_progress_counts_steps_and_epochs_and_comes_back_from_a_checkpoint() -> None:
    train = RunConfig().with_overrides({"train.max_steps": 0, "train.epochs": 2}).train
    p = Progress()
    p.plan(train, steps_per_epoch=3)
    assert p.total_steps == 6 and not p.finished and not p.started
    for _ in range(3):
        p.step_done()
    assert p.epoch_complete and (p.step, p.epoch, p.step_in_epoch) == (3, 0, 3)
    p.epoch_done()
    p.sampled()
    assert (p.step, p.epoch, p.step_in_epoch, p.last_sample_step) == (3, 1, 0, 3)
    again = Progress()
    again.restore(p.position().__dict__)
    assert again.position() == p.position() and again.last_checkpoint_step == 3


def test_early_stopping_after_patience_validations_without_improvement() -> None:
    train = RunConfig().with_overrides({"train.early_stopping_patience": 2,
                                        "train.early_stopping_min_delta": 0.01}).train
    early = EarlyStopping(train)
    assert early.observe(1.0, 2) and early.observe(0.8, 4)
    assert not early.observe(0.795, 6) and not early.stopped, "an improvement below min_delta does not count"
    assert not early.observe(0.9, 8) and early.stopped
    assert (early.best_val, early.best_step) == (0.8, 4)
    resumed = EarlyStopping(train)
    resumed.load_state_dict(early.state_dict())
    assert resumed.state_dict() == early.state_dict() == {"best_val": 0.8, "best_step": 4, "bad_vals": 2}
    assert math.isinf(EarlyStopping(train).best_val)
