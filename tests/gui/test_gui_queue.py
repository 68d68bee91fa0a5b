"""The run queue (add, reorder, remove, run in order, a failure goes on, Stop stops), the sweep dialog (the
grid, validation by the core, the sweep file) and the comparison view (a sweep folder, selected runs)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from PySide6.QtCore import Qt

from sdstudio.core import events as ev
from sdstudio.core.runs import save_run_config
from tests.gui.gui_helpers import tiny_run_config, use_tiny_settings


def _record(win: Any) -> list[ev.Event]:
    seen: list[ev.Event] = []
    win.runner.event.connect(seen.append)
    return seen


def _statuses(win: Any) -> list[str]:
    return [item.status for item in win.queue.items]


def test_queue_add_reorder_remove_and_run_two_runs_in_order(window, qtbot, tiny_dataset) -> None:
    queue = window.queue
    use_tiny_settings(window, tiny_dataset, **{"train.max_steps": 3, "checkpoint.every_steps": 0, "name": "first"})
    assert window.add_current_to_queue() is not None
    window.form.set_value("name", "second")
    window.form.set_value("train.learning_rate", 2e-3)
    qtbot.mouseClick(window.train_bar.queue_button, Qt.MouseButton.LeftButton)
    window.form.set_value("name", "third")
    qtbot.mouseClick(queue.add_button, Qt.MouseButton.LeftButton)
    assert [i.label for i in queue.items] == ["first", "second", "third"]
    assert "train.learning_rate=0.002" in queue.items[1].description
    assert queue.tree.topLevelItemCount() == 3 and queue.tree.topLevelItem(1).text(1) == "second"

    # reorder and remove
    queue.select(2)
    qtbot.mouseClick(queue.up_button, Qt.MouseButton.LeftButton)
    assert [i.label for i in queue.items] == ["first", "third", "second"] and queue.selected_index() == 1
    assert queue.move(2, -2) and [i.label for i in queue.items] == ["second", "first", "third"]
    assert not queue.move(0, -1)
    queue.select(2)
    qtbot.mouseClick(queue.remove_button, Qt.MouseButton.LeftButton)
    assert [i.label for i in queue.items] == ["second", "first"]
    queue.move(1, -1)
    assert [i.label for i in queue.items] == ["first", "second"]

    seen = _record(window)
    assert queue.run_button.isEnabled()
    qtbot.mouseClick(queue.run_button, Qt.MouseButton.LeftButton)
    assert queue.active and window.runner.is_running() and queue.stop_button.isEnabled()
    assert not queue.run_button.isEnabled() and not window.train_bar.train_button.isEnabled()
    qtbot.waitUntil(lambda: not queue.active, timeout=120_000)
    assert _statuses(window) == ["completed", "completed"]
    started = [e for e in seen if isinstance(e, ev.Started)]
    assert [e.run_dir.name.split("-", 2)[-1] for e in started] == ["first", "second"], "one after another, in order"
    assert [e.config["train"]["learning_rate"] for e in started] == [1e-3, 2e-3]
    assert len([e for e in seen if isinstance(e, ev.Finished) and e.reason == "completed"]) == 2
    assert [i.run_dir for i in queue.items] == [e.run_dir for e in started]
    assert not window.runner.is_running() and window.train_bar.train_button.isEnabled()
    assert "Queue finished" in queue.status.text()

    # the queue's runs side by side
    qtbot.mouseClick(queue.compare_button, Qt.MouseButton.LeftButton)
    assert window.tabs.currentWidget() is window.compare
    qtbot.waitUntil(lambda: window.compare.comparison is not None, timeout=20_000)
    rows = window.compare.row_texts()
    assert len(rows) == 2 and rows[0][3] == "train.learning_rate=1e-3" and rows[1][3] == "train.learning_rate=2e-3"
    assert all(r[2] == "completed" and r[9] == "3" for r in rows)
    qtbot.mouseClick(queue.clear_button, Qt.MouseButton.LeftButton)
    assert queue.items == []


def test_a_failed_queued_run_is_marked_and_stop_stops_the_queue(window, qtbot, tiny_dataset, tmp_path) -> None:
    queue = window.queue
    use_tiny_settings(window, tiny_dataset)
    queue.add(tiny_run_config(tmp_path / "gone", **{"train.max_steps": 3}), "broken", "a dataset that is gone")
    queue.add(tiny_run_config(tiny_dataset, **{"train.max_steps": 12, "checkpoint.every_steps": 0}), "long")
    queue.add(tiny_run_config(tiny_dataset, **{"train.max_steps": 2, "checkpoint.every_steps": 0}), "short")
    seen = _record(window)
    qtbot.mouseClick(queue.run_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: any(isinstance(e, ev.StepMetrics) for e in seen), timeout=60_000)
    assert queue.items[0].status == "failed" and "gone" in queue.items[0].message
    assert window.failure_box is None, "a queued failure is marked, not a dialog per run"
    assert queue.items[1].status == "running"
    qtbot.mouseClick(queue.stop_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not queue.active and not window.runner.is_running(), timeout=60_000)
    assert _statuses(window) == ["failed", "stopped", "pending"], "Stop stops the queue"
    assert queue.items[1].resumable and "Queue stopped" in queue.status.text()

    # Run queue again: the stopped run continues from its checkpoint, then the rest; the failed one stays
    seen.clear()
    qtbot.mouseClick(queue.run_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not queue.active, timeout=120_000)
    assert _statuses(window) == ["failed", "completed", "completed"]
    started = [e for e in seen if isinstance(e, ev.Started)]
    assert started[0].run_dir == queue.items[1].run_dir and started[0].resumed_from_step > 0
    assert started[1].run_dir == queue.items[2].run_dir and started[1].resumed_from_step == 0


def test_parse_sweep_values_like_set() -> None:
    from sdstudio.core.errors import UserError
    from sdstudio.gui.panels.sweep_dialog import parse_values

    assert parse_values("1e-4, 3e-4") == [1e-4, 3e-4]
    assert parse_values("[16, 32], [32, 64]") == [[16, 32], [32, 64]]
    assert parse_values("cosine, constant") == ["cosine", "constant"]
    assert parse_values('true, "a, b", 4') == [True, "a, b", 4]
    assert parse_values("cosine, 4") == ["cosine", 4]
    for bad in ("", "1,,2"):
        with pytest.raises(UserError):
            parse_values(bad)


def test_sweep_dialog_makes_the_combinations_and_reports_an_invalid_one(window, qtbot, tiny_dataset,
                                                                       tmp_path) -> None:
    from sdstudio.core.sweeps.plan import load_sweep

    use_tiny_settings(window, tiny_dataset, **{"train.max_steps": 5})
    dialog = window.open_sweep_dialog()
    assert dialog is not None and dialog.isVisible()
    assert dialog.rows()[0][0] == "train.learning_rate" and dialog.plan is not None
    assert len(dialog.plan.combinations) == 3, "starts with the learning rate / 3, x 1, x 3"

    dialog.set_row(0, "train.learning_rate", "1e-3, 2e-3")
    dialog.add_row("train.batch_size", "2, 4")
    plan = dialog.validate_now()
    assert plan is not None
    assert [c.overrides for c in plan.combinations] == [
        {"train.learning_rate": 1e-3, "train.batch_size": 2}, {"train.learning_rate": 1e-3, "train.batch_size": 4},
        {"train.learning_rate": 2e-3, "train.batch_size": 2}, {"train.learning_rate": 2e-3, "train.batch_size": 4}]
    assert all(c.config.train.max_steps == 5 and c.config.data.path == str(tiny_dataset) for c in plan.combinations)
    assert "4 combinations" in dialog.count.text() and dialog.preview.count() == 4
    assert dialog.queue_button.isEnabled() and "4 runs" in dialog.queue_button.text()

    # an invalid combination is reported (by the core's validation) before anything runs
    dialog.set_row(0, "train.learning_rate", "1e-3, 5")
    assert dialog.validate_now() is None
    assert "combination 2 (train.learning_rate=5" in dialog.error and "train.learning_rate" in dialog.error
    assert "4 combinations, but" in dialog.count.text()
    assert not dialog.queue_button.isEnabled() and not dialog.save_button.isEnabled()
    dialog.set_row(0, "train.learning_rate", "1e-3, 2e-3")
    dialog.set_row(1, "train.batch_sise", "2, 4")
    assert dialog.validate_now() is None and "did you mean 'train.batch_size'" in dialog.error
    dialog.set_row(1, "train.lr_scheduler", "cosine, constant")
    assert dialog.validate_now() is not None
    assert [c.overrides["train.lr_scheduler"] for c in dialog.plan.combinations] == ["cosine", "constant"] * 2
    # the edits are validated shortly after typing, too
    dialog.set_row(1, "train.batch_size", "0")
    qtbot.waitUntil(lambda: dialog.plan is None and "train.batch_size" in dialog.error, timeout=5_000)
    dialog.set_row(1, "train.batch_size", "2, 4")

    # a sweep file for `sdstudio sweep`, with the current settings beside it
    saved = dialog.save(tmp_path / "lr-bs.toml")
    assert saved is not None and (tmp_path / "lr-bs-base.toml").is_file()
    again = load_sweep(tmp_path / "lr-bs.toml")
    assert [c.overrides for c in again.combinations] == [c.overrides for c in saved.combinations]
    assert again.combinations[0].config.train.max_steps == 5

    # and into the queue
    dialog.name.setText("lr bs")
    qtbot.mouseClick(dialog.queue_button, Qt.MouseButton.LeftButton)
    items = window.queue.items
    assert len(items) == 4 and [i.label for i in items][:2] == ["lr-bs-00-lr1e-3_bs2", "lr-bs-01-lr1e-3_bs4"]
    assert items[3].config.train.batch_size == 4 and items[3].description == "train.learning_rate=2e-3, " \
        "train.batch_size=4"
    assert window.tabs.currentWidget() is window.queue


# -- comparison ---------------------------------------------------------------------------------------------
def _metrics(run: Path, losses: list[float], vals: list[tuple[int, float]], fid_kid: tuple | None = None) -> None:
    rows = [{"step": 0, "epoch": 0, "time": 100.0, "kind": "event", "event": "started"}]
    rows += [{"step": i + 1, "epoch": 0, "time": 100.0 + i, "kind": "train", "loss": v} for i, v in enumerate(losses)]
    rows += [{"step": s, "epoch": 0, "time": 101.0, "kind": "val", "val_loss": v} for s, v in vals]
    if fid_kid is not None:  # an FID/KID row: kind "val" without val_loss
        rows.append({"step": len(losses), "epoch": 0, "time": 130.0, "kind": "val", "fid": fid_kid[0],
                     "kid_mean": fid_kid[1], "kid_std": fid_kid[2], "n_generated": 64, "n_real": 5,
                     "fid_meaningful": False, "note": "FID below 2048 images is not meaningful: read KID"})
    rows.append({"step": len(losses), "epoch": 0, "time": 140.0, "kind": "event", "event": "completed"})
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _fake_sweep(folder: Path, dataset: Path) -> Path:
    runs = {"00-lr0.001": (1e-3, [1.0, 0.8, 0.6, 0.5], [(2, 0.7), (4, 0.55)], None),
            "01-lr0.003": (3e-3, [1.0, 0.7, 0.4, 0.3], [(2, 0.5), (4, 0.35)], (48.5, 0.0123, 0.004))}
    rows = []
    for index, (name, (lr, losses, vals, fid_kid)) in enumerate(runs.items()):
        _metrics(folder / name, losses, vals, fid_kid)
        save_run_config(folder / name, tiny_run_config(dataset, **{"train.learning_rate": lr}))
        rows.append({"index": index, "run_dir": name, "status": "completed", "message": "",
                     "train.learning_rate": lr, "best_val_loss": min(v for _, v in vals),
                     "final_val_loss": vals[-1][1], "final_loss": sum(losses[-5:]) / len(losses[-5:]),
                     "steps": 4, "seconds": 40.0, "final_fid": fid_kid[0] if fid_kid else None})
    rows.append({"index": 2, "run_dir": "", "status": "failed", "message": "loss became NaN",
                 "train.learning_rate": 1.0, "best_val_loss": None, "final_val_loss": None, "final_loss": None,
                 "steps": 0, "seconds": 0.0, "final_fid": None})
    (folder / "summary.json").write_text(json.dumps({"name": "lr", "keys": ["train.learning_rate"], "rows": rows}))
    return folder


def test_comparison_of_a_sweep_folder_table_and_curves(qtbot, tiny_dataset, tmp_path) -> None:
    from sdstudio.gui.panels.compare import ComparePanel

    folder = _fake_sweep(tmp_path / "sweeps" / "lr", tiny_dataset)
    panel = ComparePanel()
    qtbot.addWidget(panel)
    panel.resize(1200, 800)
    panel.show()
    with qtbot.waitSignal(panel.loaded, timeout=20_000):
        panel.open_folder(folder)
    rows = panel.row_texts()
    assert [r[0] for r in rows] == ["0", "1", "2"]
    assert rows[0][1:5] == ["00-lr0.001", "completed", "train.learning_rate=1e-3", "0.5500"]
    assert rows[1][7] == "48.50" and rows[1][8] == "0.0123 ± 0.0040", "FID / KID from the val rows"
    assert rows[0][7] == "–" and rows[0][8] == "–" and rows[1][10] == "0:40"
    assert rows[2][2] == "failed" and rows[2][4] == "–" and "NaN" in panel.table.item(2, 2).toolTip()
    assert "sweep lr" in panel.title.text()

    panel.table.sortByColumn(4, Qt.SortOrder.AscendingOrder)  # best validation loss, missing values last
    assert [r[0] for r in panel.row_texts()] == ["1", "0", "2"]
    panel.table.sortByColumn(7, Qt.SortOrder.AscendingOrder)
    assert panel.row_texts()[0][0] == "1"

    curves = [item for item in panel.plot.getPlotItem().listDataItems() if item.xData is not None]
    assert len(curves) == 4, "a loss and a validation curve per run that ran"
    panel.table.selectRow(0)
    assert len(panel.plot.getPlotItem().listDataItems()) == 4
    panel.log_scale.setChecked(True)
    assert panel.plot.getPlotItem().getAxis("left").logMode

    # sweeps under <runs folder>/sweeps are listed
    from sdstudio.core import paths

    listed = _fake_sweep(paths.runs_dir() / "sweeps" / "found", tiny_dataset)
    panel.refresh_sweeps()
    assert panel.sweeps.findData(str(listed)) > 0
    panel.shutdown()


def test_compare_selected_runs_from_the_runs_panel(window, qtbot, tiny_dataset) -> None:
    from sdstudio.core import paths

    for name, lr, losses in (("20250101-000000-a", 1e-3, [0.9, 0.5]), ("20250101-000001-b", 2e-3, [0.8, 0.3])):
        run = paths.runs_dir() / name
        _metrics(run, losses, [(2, losses[-1] + 0.05)])
        save_run_config(run, tiny_run_config(tiny_dataset, **{"train.learning_rate": lr}))
    window.runs.refresh()
    qtbot.waitUntil(lambda: len(window.runs.summaries) == 2, timeout=20_000)
    window.runs.tree.selectAll()
    assert len(window.runs.selected_paths()) == 2 and window.runs.compare_button.isEnabled()
    qtbot.mouseClick(window.runs.compare_button, Qt.MouseButton.LeftButton)
    assert window.tabs.currentWidget() is window.compare
    qtbot.waitUntil(lambda: window.compare.comparison is not None, timeout=20_000)
    rows = window.compare.row_texts()
    assert {r[1] for r in rows} == {"20250101-000000-a", "20250101-000001-b"}
    assert {r[3] for r in rows} == {"train.learning_rate=1e-3", "train.learning_rate=2e-3"}
    assert all(r[2] == "completed" and r[9] == "2" for r in rows)


def test_val_rows_without_val_loss_and_eval_results_are_shown(qtbot, tmp_path) -> None:
    from sdstudio.gui.panels.plots import PlotsPanel
    from sdstudio.gui.panels.runs import summarize_run

    run = tmp_path / "run"
    _metrics(run, [1.0, 0.5], [(2, 0.6)], fid_kid=(80.0, 0.02, 0.005))
    (run / "config.toml").write_text("")
    summary = summarize_run(run)
    assert list(summary.val_loss) == [0.6] and summary.best_val == 0.6

    panel = PlotsPanel()
    qtbot.addWidget(panel)
    panel.load_rows(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
    assert len(panel.val_loss) == 1 and "FID 80.00" in panel.eval_label.text()
    assert "KID 0.0200 ± 0.0050" in panel.eval_label.text() and "not meaningful" in panel.eval_label.toolTip()
    panel.add_event(ev.EvalResult(8, 1, None, 0.01, 0.002, 64, 5, note="no weights file for FID"))
    assert panel.eval_label.text() == "step 8: KID 0.0100 ± 0.0020"
    panel.add_event(ev.ValidationResult(9, 1, math.nan))
    assert len(panel.val_loss) == 1
    panel.clear()
    assert not panel.eval_label.isVisibleTo(panel)


def test_an_early_stopped_run_is_completed_in_the_queue_and_the_runs_panel(qtbot, tiny_dataset, tmp_path) -> None:
    """Early stopping ends a run as planned: the queue goes on (not "stopped", not resumed again), and the Runs
    panel shows the run as completed, not resumable."""
    from sdstudio.core.runs import METRICS_FILE, MetricsWriter, metrics_row
    from sdstudio.gui.panels.queue import QueuePanel
    from sdstudio.gui.panels.runs import summarize_run

    panel = QueuePanel()
    qtbot.addWidget(panel)
    item = panel.add(tiny_run_config(tiny_dataset), "early")
    run = tmp_path / "run"
    panel.start()
    panel.mark_running(item, run)
    panel.observe(ev.Finished(run, "early_stopped", 4))
    assert item.status == "completed" and not item.resumable and "early-stopped at step 4" in item.message

    (run / "checkpoints" / "step-00000004").mkdir(parents=True)
    (run / "checkpoints" / "step-00000004" / "manifest.json").write_text("{}")
    writer = MetricsWriter(run / METRICS_FILE)
    writer.write(metrics_row("event", 0, 0, event="started", total_steps=10))
    writer.write(metrics_row("event", 4, 1, event="early_stopped"))
    writer.close()
    summary = summarize_run(run)
    assert summary.state == "completed" and not summary.resumable
