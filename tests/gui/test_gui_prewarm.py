"""train.compile_prewarm in the app: the train bar says what is compiled and for how long, and its it/s rate
starts after the warm-up (the first step is not measured from the start of the run)."""

from __future__ import annotations

import time
from pathlib import Path

from sdstudio.core import events as ev
from sdstudio.gui.panels.train_bar import TrainBar


def test_the_train_bar_shows_the_warm_up_and_rates_the_steps_after_it(qtbot, monkeypatch) -> None:
    bar = TrainBar()
    qtbot.addWidget(bar)
    clock = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    bar.add_event(ev.Started(Path("run"), {}, 10, 0))
    bar.add_event(ev.Status("compiling", "compiling 2 bucket shapes (16x16, 24x8; batch 2) with torch.compile"))
    assert bar.phase.text() == "Compiling: compiling 2 bucket shapes (16x16, 24x8; batch 2) with torch.compile"
    clock[0] += 60.0  # the warm-up
    bar.add_event(ev.Status("compiled", "2 bucket shapes compiled in 60.0 s"))
    assert bar.phase.text() == "Compiled: 2 bucket shapes compiled in 60.0 s"
    clock[0] += 0.5  # one step
    bar.add_event(ev.StepMetrics(1, 0, 0.5, 1e-3, 1.0, 4.0, 10, 4.5))
    assert "2.00 it/s" in bar.stats.text()  # not 1 / 60.5
