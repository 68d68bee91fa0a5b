"""The app's views of issue 18: per-image loss in the dataset view (sortable, double-click opens the caption),
the checkpoint grid (a column picked and handed to the export dialog)."""

from __future__ import annotations

import json
from pathlib import Path

from sdstudio.core import events as ev
from sdstudio.core.runs import RunFolder, save_run_config
from sdstudio.core.train.loop import train
from tests.gui.gui_helpers import tiny_run_config


def test_dataset_view_lists_per_image_loss_and_opens_the_caption(qtbot, tiny_dataset: Path, tmp_path: Path,
                                                                monkeypatch) -> None:
    from sdstudio.core import paths
    from sdstudio.gui.panels.datasets import DatasetsPanel

    run = paths.runs_dir() / "20260101-000000-demo"
    run.mkdir(parents=True)
    save_run_config(run, tiny_run_config(tiny_dataset))
    images = sorted(p.name for p in tiny_dataset.glob("*.png"))
    data = {"images": {name: {"loss": 1.0 + i * 0.01, "n": 4} for i, name in enumerate(images)},
            "outliers": [images[3]], "step": 6}
    data["images"][images[3]]["loss"] = 3.0
    RunFolder(run).image_loss_file.write_text(json.dumps(data))
    panel = DatasetsPanel()
    qtbot.addWidget(panel)
    panel.open_folder(tiny_dataset, remember=False)
    qtbot.waitUntil(lambda: panel.model.rowCount() > 0, timeout=20_000)
    view = panel.image_loss
    assert view.runs.count() == 1
    rows = view.rows()
    assert rows[0] == (f"⚠ {images[3]}", 3.0)  # worst first, flagged
    assert [loss for _n, loss in rows] == sorted((loss for _n, loss in rows), reverse=True)
    view.table.sortItems(1)  # sortable by the number, ascending
    assert view.rows()[-1][1] == 3.0 and view.rows()[0][1] == 1.0
    row = next(r for r in range(view.table.rowCount()) if view.table.item(r, 0).text().endswith(images[3]))
    view.table.cellDoubleClicked.emit(row, 0)
    record = panel.caption.record if hasattr(panel.caption, "record") else None
    current = panel.grid.currentIndex()
    assert current.isValid() and panel.model.records()[current.row()].path.name == images[3]
    del record


def test_checkpoint_grid_dialog_picks_a_column_for_export(qtbot, tiny_dataset: Path, tmp_path: Path) -> None:
    from sdstudio.gui.panels.checkpoint_grid import CheckpointGridDialog

    config = tiny_run_config(tiny_dataset).with_overrides({"train.max_steps": 4, "checkpoint.every_steps": 2,
                                                           "sample.steps": 2})
    run = tmp_path / "run"
    events = list(train(config, run_dir=run))
    assert isinstance(events[-1], ev.Finished)
    dialog = CheckpointGridDialog(run)
    qtbot.addWidget(dialog)
    dialog.show()
    dialog.prompts.setPlainText("a red circle on white")
    dialog.seeds.setText("0")
    dialog.steps.setValue(2)
    with qtbot.waitSignal(dialog.grid_ready, timeout=120_000):
        dialog.make_grid()
    assert dialog.column.count() == 2 and dialog.image.pixmap() is not None
    dialog.column.setCurrentIndex(0)
    export = dialog.export_column()
    assert export is not None
    source, best, tag = export.checkpoint_source()
    assert source == run / "checkpoints" / "step-00000002" and not best and tag == "step00000002"
    export.reject()


def test_compare_marks_pruned_runs_and_shows_importances(qtbot, tmp_path: Path) -> None:
    from sdstudio.gui.panels.compare import ComparePanel, load_sweep_folder

    folder = tmp_path / "search"
    folder.mkdir()
    rows = [{"index": 0, "run_dir": "", "status": "completed", "message": "", "train.learning_rate": 1e-3,
             "best_val_loss": 0.2, "steps": 4},
            {"index": 1, "run_dir": "", "status": "pruned", "message": "pruned at step 2: validation loss 0.9",
             "train.learning_rate": 1e-9, "best_val_loss": 0.9, "steps": 2}]
    (folder / "summary.json").write_text(json.dumps({"name": "s", "mode": "search", "keys": ["train.learning_rate"],
                                                     "rows": rows, "importances": {"train.learning_rate": 1.0}}))
    comparison = load_sweep_folder(folder)
    assert comparison.importances == {"train.learning_rate": 1.0}
    panel = ComparePanel()
    qtbot.addWidget(panel)
    panel.show_comparison(comparison)
    texts = panel.row_texts()
    assert texts[1][2] == "✂ pruned" and texts[0][2] == "completed"
    assert "1 pruned" in panel.title.text()
    assert "train.learning_rate" in panel.importances.text() and "1.00" in panel.importances.text()
