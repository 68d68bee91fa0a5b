"""The schedule preview draws the learning-rate schedule and the training-timestep distribution of the
current settings (train.lr_scheduler, loss.timestep_*)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from sdstudio.core.config import DiffusionConfig, LossConfig, TrainConfig


@pytest.mark.parametrize(("kind", "extra", "expected_mid"), [
    ("cosine_with_restarts", {"lr_cycles": 2}, 1.0),  # step 51 (index 50): the second cycle restarts
    ("polynomial", {"lr_power": 2.0}, 0.25),
    ("warmup_stable_decay", {"lr_decay_fraction": 0.2}, 1.0),
    ("rex", {}, 0.5 / 0.75),
    ("piecewise", {"lr_piecewise_steps": [0, 100], "lr_piecewise_values": [1.0, 0.0]}, 0.5),
])
def test_lr_curve_data_follow_each_schedule(kind: str, extra: dict, expected_mid: float) -> None:
    from sdstudio.gui.panels.schedule import lr_curve, planned_steps

    train = TrainConfig(lr_scheduler=kind, learning_rate=2e-4, max_steps=100, **extra)
    total, note = planned_steps(train, None)
    steps, lr = lr_curve(train, total)
    assert (total, note) == (100, "") and len(steps) == len(lr) == 100 and steps[0] == 1
    assert lr[50] == pytest.approx(2e-4 * expected_mid)
    assert lr[0] == pytest.approx(2e-4)


def test_planned_steps_from_epochs() -> None:
    from sdstudio.gui.panels.schedule import planned_steps

    train = TrainConfig(max_steps=0, epochs=3, batch_size=4, gradient_accumulation=2)
    assert planned_steps(train, 80) == (30, "")
    assert planned_steps(train, None)[1].startswith("steps guessed")


def test_timestep_frequencies_show_the_distribution_within_the_range() -> None:
    from sdstudio.gui.panels.schedule import timestep_frequencies

    centres, shares = timestep_frequencies(LossConfig(), DiffusionConfig(num_timesteps=1000))
    assert len(centres) == 100 and shares.sum() == pytest.approx(1.0)
    assert np.allclose(shares, 0.01, atol=0.002), "uniform is flat"
    lo = LossConfig(timestep_distribution="logit_normal", timestep_min=200, timestep_max=600)
    centres, shares = timestep_frequencies(lo, DiffusionConfig(num_timesteps=1000))
    assert centres[0] == pytest.approx(202) and centres[-1] == pytest.approx(598)
    middle = shares[25:75].sum()  # [300, 500): the middle half of the range
    assert middle == pytest.approx(math.erf(math.log(3) / math.sqrt(2)), abs=0.01)
    shifted = timestep_frequencies(LossConfig(timestep_shift=3.0), DiffusionConfig())[1]
    assert shifted[-10:].sum() > 0.2 > shifted[:10].sum(), "shift > 1: more weight at the noisy end"


def test_schedule_panel_draws_lr_and_timesteps(qtbot) -> None:
    from sdstudio.gui.panels.schedule import SchedulePanel

    panel = SchedulePanel()
    qtbot.addWidget(panel)
    panel.set_inputs(DiffusionConfig(), train=TrainConfig(lr_scheduler="rex", max_steps=40, learning_rate=1e-3),
                     loss=LossConfig(timestep_distribution="mode"))
    panel.update_now()
    lr = panel.lr_curve.yData
    assert len(lr) == 40 and lr[0] == pytest.approx(1e-3) and lr[20] == pytest.approx(1e-3 * 0.5 / 0.75)
    assert "rex" in panel.lr_plot.titleLabel.text
    shares = panel.timestep_curve.yData
    assert shares[45:55].sum() > shares[:10].sum(), "mode sampling: the middle is drawn more often"
    panel.set_inputs(train=TrainConfig(lr_scheduler="constant", max_steps=10))
    qtbot.waitUntil(lambda: len(panel.lr_curve.yData) == 10, timeout=5_000)
    assert set(panel.lr_curve.yData.tolist()) == {1e-3}


def test_piecewise_points_are_editable_in_the_settings_form(qtbot) -> None:
    from sdstudio.gui.panels.settings_form import config_field_specs
    from sdstudio.gui.widgets.field_editors import FieldEditor

    specs = {s.key: s for s in config_field_specs()}
    assert specs["train.lr_piecewise_steps"].kind == "int_list"
    editor = FieldEditor(specs["train.lr_piecewise_values"])
    qtbot.addWidget(editor)
    editor.set_value([1.0, 0.5, 0.1])
    assert editor.value() == [1.0, 0.5, 0.1]


def test_learned_schedule_shows_live_in_the_schedule_view(window, qtbot) -> None:
    """diffusion.learned_schedule: each LearnedSchedule event of a run redraws the learned curve (dashed) over
    the configured one; a new run clears it. A screenshot of the view goes to $SDSTUDIO_SCREENSHOT_DIR if set."""
    import os

    from sdstudio.core import events as ev

    panel = window.schedule
    window.tabs.setCurrentWidget(panel)
    panel.update_now()
    steps = list(range(0, 1000, 37)) + [999]
    configured = np.interp(steps, np.arange(len(panel.snr_curve.yData)), panel.snr_curve.yData)
    for step, bend in ((10, 0.5), (20, 1.5)):
        window.on_event(ev.LearnedSchedule(step, steps, [float(v - bend * math.sin(math.pi * s / 999))
                                                         for s, v in zip(steps, configured, strict=True)]))
    assert panel.learned_step == 20
    assert np.allclose(panel.learned_snr.xData, steps)
    assert panel.learned_snr.yData[len(steps) // 2] == pytest.approx(configured[len(steps) // 2] - 1.5, abs=0.01)
    alpha = panel.learned_alpha.yData
    assert np.all(np.diff(alpha) <= 1e-12) and 0 < alpha[-1] < alpha[0] < 1
    assert "learned, step 20" in panel.snr_plot.titleLabel.text
    if os.environ.get("SDSTUDIO_SCREENSHOT_DIR"):
        window.resize(1200, 800)
        qtbot.wait(200)
        window.grab().save(str(Path(os.environ["SDSTUDIO_SCREENSHOT_DIR"]) / "learned-schedule.png"))
    window.on_event(ev.Started(Path("."), {}, 10))
    assert panel.learned_step is None and len(panel.learned_snr.yData or []) == 0


def test_a_past_runs_learned_schedule_shows_when_it_is_selected(window, qtbot, tmp_path: Path) -> None:
    """Selecting a run in the Runs tab shows the learned schedule its noise_schedule.json kept; a run without
    one (or with a broken file) clears a past run's curve but never the live run's."""
    import json

    from sdstudio.core import events as ev
    from sdstudio.core.train.recipe import SCHEDULE_FILE, read_schedule_snapshot

    panel = window.schedule
    steps, values = [0, 500, 999], [2.0, 0.1, -2.5]
    learned = tmp_path / "learned-run"
    learned.mkdir()
    (learned / SCHEDULE_FILE).write_text(json.dumps({"step": 1200, "timesteps": steps, "log10_snr": values}))
    plain, broken = tmp_path / "plain-run", tmp_path / "broken-run"
    plain.mkdir()
    broken.mkdir()
    (broken / SCHEDULE_FILE).write_text('{"step": 3, "timesteps": [1, 2]')  # cut short
    assert read_schedule_snapshot(broken) is None and read_schedule_snapshot(plain) is None

    window.runs.run_selected.emit(learned)
    assert panel.learned_step == 1200 and panel.learned_run == learned
    assert list(panel.learned_snr.yData) == values
    assert "learned by learned-run, step 1200" in panel.snr_plot.titleLabel.text
    window.runs.run_selected.emit(broken)
    assert panel.learned_step is None and len(panel.learned_snr.yData or []) == 0
    # the live run's curve stays when a run without a schedule is selected
    window.on_event(ev.LearnedSchedule(40, steps, [1.0, 0.0, -1.0]))
    window.runs.run_selected.emit(plain)
    window.runs.run_selected.emit(None)
    assert panel.learned_step == 40 and list(panel.learned_snr.yData) == [1.0, 0.0, -1.0]
