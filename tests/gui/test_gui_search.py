"""The app's sweep dialog runs a TPE search (the CLI's [search] table): ranges, trials, pruning, seed; the search
trains on the app's worker and the comparison view then marks pruned trials and shows the importances. The
memorisation curve and alarm in the app's plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdstudio.core import events as ev
from sdstudio.core.sweeps.plan import load_sweep
from tests.gui.gui_helpers import use_tiny_settings
from tests.test_sweep_search import fake_train  # noqa: F401 - the fixture

pytest.importorskip("optuna", reason="the search extra (optuna) is not installed")
SHOTS = Path("/tmp/sdstudio-shots")


def test_sweep_dialog_builds_and_saves_a_search(qtbot, tmp_path: Path, tiny_dataset: Path) -> None:
    from sdstudio.gui.panels.sweep_dialog import SweepDialog, parse_range
    from tests.gui.gui_helpers import tiny_run_config

    assert parse_range("1e-4 .. 1e-2 log") == {"min": 1e-4, "max": 1e-2, "log": True}
    assert parse_range("{ min = 2, max = 8 }") == {"min": 2, "max": 8}
    assert parse_range("4, 8") == [4, 8]
    dialog = SweepDialog(tiny_run_config(tiny_dataset, **{"train.val_every_steps": 2}), "tiny")
    qtbot.addWidget(dialog)
    assert not dialog.search_box.isVisibleTo(dialog)
    dialog.set_method("tpe")
    assert dialog.search_box.isVisibleTo(dialog)
    dialog.set_row(0, "train.learning_rate", "1e-4 .. 1e-2 log")
    dialog.add_row("lora.rank", "4, 8")  # choices are fine in a search too
    dialog.trials.setValue(3)
    dialog.seed.setValue(7)
    dialog.prune.setChecked(False)
    plan = dialog.validate_now()
    assert plan is not None and plan.mode == "search", dialog.error
    assert plan.search == {"method": "tpe", "trials": 3, "prune": False, "seed": 7, "startup_trials": 2}
    assert plan.ranges == {"train.learning_rate": {"min": 1e-4, "max": 1e-2, "log": True}, "lora.rank": [4, 8]}
    assert dialog.queue_button.text() == "Run the search (3 trials)"
    assert "1e-04 .. 0.01 (log)" in dialog.preview.item(0).text() or "(log)" in dialog.preview.item(0).text()
    SHOTS.mkdir(parents=True, exist_ok=True)
    dialog.show()
    qtbot.waitExposed(dialog)
    dialog.grab().save(str(SHOTS / "sweep-dialog-search.png"))

    saved = dialog.save(tmp_path / "search.toml")
    assert saved is not None and saved.mode == "search"
    again = load_sweep(tmp_path / "search.toml")  # what `sdstudio sweep` reads
    assert again.search["trials"] == 3 and again.ranges == plan.ranges

    dialog.set_row(0, "train.learning_rate", "0.01 .. 0.001")  # min above max: the core's message
    assert dialog.validate_now() is None and "min" in dialog.error and not dialog.queue_button.isEnabled()
    dialog.set_method("grid")  # back to a grid: the same rows read as values
    dialog.set_row(0, "train.learning_rate", "1e-4, 1e-3")
    grid = dialog.validate_now()
    assert grid is not None and grid.mode == "grid" and len(grid.combinations) == 4


def test_the_app_runs_a_search_and_compares_its_trials(window, qtbot, tiny_dataset: Path,
                                                       fake_train) -> None:  # noqa: F811
    from sdstudio.core import paths

    use_tiny_settings(window, tiny_dataset, **{"train.val_every_steps": 2, "train.max_steps": 4})
    dialog = window.open_sweep_dialog()
    dialog.name.setText("app-search")
    dialog.set_method("tpe")
    dialog.set_row(0, "train.learning_rate", "3e-3, 1e-9")
    dialog.trials.setValue(4)
    assert dialog.validate_now() is not None, dialog.error
    dialog.queue_button.click()  # "Run the search"
    qtbot.waitUntil(lambda: not window.runner.is_running() and window.tabs.currentWidget() is window.compare,
                    timeout=60_000)
    out = paths.runs_dir() / "sweeps" / "app-search"
    assert (out / "study.db").is_file()
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert len(rows) == 4 and {r["status"] for r in rows} <= {"completed", "pruned"}
    qtbot.waitUntil(lambda: len(window.compare.row_texts()) == 4, timeout=30_000)  # loaded off the GUI thread
    texts = window.compare.row_texts()
    if any(r["status"] == "pruned" for r in rows):
        assert any(t[2] == "✂ pruned" for t in texts) and "pruned" in window.compare.title.text()
    assert window.compare.importances.isVisibleTo(window.compare) == bool(
        json.loads((out / "summary.json").read_text()).get("importances"))
    window.compare.grab().save(str(SHOTS / "compare-search.png"))


def test_plots_show_the_memorisation_curve_and_the_alarm(qtbot) -> None:
    from sdstudio.gui.panels.plots import PlotsPanel

    panel = PlotsPanel()
    qtbot.addWidget(panel)
    panel.add_event(ev.MemorisationResult(10, 0, 1.2, 1.0, 0.0, 1.3))
    panel.add_event(ev.MemorisationResult(20, 0, 0.1, 0.1, 1.0, 1.1, alarms=(
        "memorisation: from step 20 the samples reproduce training images (...)",)))
    panel.redraw()
    assert list(panel.memo_ratio.y) == [1.2, 0.1] and list(panel.diversity.y) == [1.3, 1.1]
    assert panel.alarm_label.isVisibleTo(panel) and panel.alarm_label.text() == "memorisation: from step 20"
    # from a run's rows (a resumed or finished run)
    panel.load_rows([{"kind": "sample", "step": 5, "memo_ratio": 0.2, "diversity": 0.9},
                     {"kind": "event", "step": 5, "event": "collapse", "text": "collapse: from step 5 the samples x"}])
    assert list(panel.memo_ratio.y) == [0.2] and panel.alarm_label.text() == "collapse: from step 5"
    panel.resize(900, 600)
    panel.show()
    qtbot.waitExposed(panel)
    panel.grab().save(str(SHOTS / "plots-memorisation.png"))


def test_checkpoint_grid_view_shows_the_memorisation_score_per_column(qtbot, tmp_path: Path,
                                                                     tiny_dataset: Path) -> None:
    import numpy as np

    from sdstudio.core.runs import save_run_config
    from sdstudio.core.sampling.checkpoint_grid import CheckpointGrid, GridColumn
    from sdstudio.gui.panels.checkpoint_grid import CheckpointGridDialog
    from tests.gui.gui_helpers import tiny_run_config

    save_run_config(tmp_path, tiny_run_config(tiny_dataset))
    panel = CheckpointGridDialog(tmp_path)
    qtbot.addWidget(panel)
    columns = [GridColumn(2, tmp_path / "a", 0.5, None, None, memo_ratio=1.1, diversity=0.9),
               GridColumn(4, tmp_path / "b", 0.4, 0.01, None, memo_ratio=0.05, diversity=0.1)]
    images = [np.zeros((2, 16, 16, 3), np.uint8), np.full((2, 16, 16, 3), 200, np.uint8)]
    panel.set_grid(CheckpointGrid(columns, [("x", 0), ("x", 1)], images))
    items = [panel.column.itemText(i) for i in range(panel.column.count())]
    assert items == ["step 2 · val 0.5000 · memo 1.10", "step 4 · val 0.4000 · KID 0.0100 · memo 0.05 COPY"]
    assert "copy training images at step 4" in panel.status.text()
