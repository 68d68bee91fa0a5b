"""The run queue survives the app: saved on every change, restored at start (a run that was training comes back
stopped and resumable from its checkpoint); rows reorder by drag and drop."""

from __future__ import annotations

import json
from pathlib import Path

from sdstudio.core.run_queue import queue_file
from tests.gui.gui_helpers import tiny_run_config


def _labels(panel) -> list[str]:
    return [i.label for i in panel.items]


def test_queue_file_restores_after_the_app_is_killed(qtbot, tiny_dataset: Path, tmp_path: Path) -> None:
    from sdstudio.gui.panels.queue import QueuePanel

    config = tiny_run_config(tiny_dataset)
    first = QueuePanel()
    qtbot.addWidget(first)
    assert first.items == []
    a = first.add(config, "a", "first")
    first.add(config.with_overrides({"train.learning_rate": 5e-4}), "b", "lr 5e-4")
    first.add(config, "c", "third")
    run_dir = tmp_path / "run-a"
    (run_dir / "checkpoints" / "step-00000003").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-00000003" / "manifest.json").write_text("{}")
    first.mark_running(a, run_dir)  # then the app dies: no shutdown, no close
    saved = json.loads(queue_file().read_text())
    assert [i["label"] for i in saved["items"]] == ["a", "b", "c"] and saved["items"][0]["status"] == "running"

    second = QueuePanel()  # the app started again
    qtbot.addWidget(second)
    assert _labels(second) == ["a", "b", "c"]
    restored = second.items[0]
    assert restored.status == "stopped" and restored.resumable and restored.run_dir == run_dir
    assert "resumes it from its checkpoint" in restored.message and "Restored the queue" in second.status.text()
    assert second.items[1].config.train.learning_rate == 5e-4 and second.items[1].description == "lr 5e-4"
    assert second.pending_count() == 3  # Run queue resumes the stopped one and runs the others


def test_a_run_interrupted_before_its_first_checkpoint_starts_again(qtbot, tiny_dataset: Path,
                                                                    tmp_path: Path) -> None:
    from sdstudio.gui.panels.queue import QueuePanel

    first = QueuePanel()
    qtbot.addWidget(first)
    item = first.add(tiny_run_config(tiny_dataset), "a")
    first.mark_running(item, tmp_path / "no-checkpoint")
    second = QueuePanel()
    qtbot.addWidget(second)
    assert second.items[0].status == "pending" and second.items[0].run_dir is None


def test_drag_and_drop_reorders_and_saves(qtbot, tiny_dataset: Path) -> None:
    from sdstudio.gui.panels.queue import QueuePanel

    panel = QueuePanel()
    qtbot.addWidget(panel)
    for label in ("a", "b", "c"):
        panel.add(tiny_run_config(tiny_dataset), label)
    tree = panel.tree
    row = tree.takeTopLevelItem(2)  # what an internal-move drop does to the rows: "c" dropped on top
    tree.insertTopLevelItem(0, row)
    tree.reordered.emit()
    assert _labels(panel) == ["c", "a", "b"]
    assert [i["label"] for i in json.loads(queue_file().read_text())["items"]] == ["c", "a", "b"]
    assert tree.dragDropMode() == tree.DragDropMode.InternalMove
