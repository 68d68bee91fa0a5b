"""The app and the Flux families: the family picker lists them, the [flow] keys have their section, and a tiny
Flux-topology LoRA trains end to end from the Train button (offscreen)."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt

from sdstudio.core import events as ev
from tests.gui.gui_helpers import use_tiny_settings
from tests.tiny_flux import save_tiny_flux


def test_flux_trains_from_the_window(window, qtbot, tiny_dataset: Path, tmp_path: Path) -> None:
    family = window.form.editors["model.family"]
    choices = [family.input.itemText(i) for i in range(family.input.count())]
    assert {"flux-dev", "flux-schnell"} <= set(choices)
    assert "flow" in window.form.sections and "flow.shift" in window.form.editors
    model = save_tiny_flux(tmp_path / "flux")
    use_tiny_settings(window, tiny_dataset, **{
        "model.family": "flux-dev", "model.path": str(model), "lora.enabled": True, "lora.rank": 2,
        "data.resolution": 32, "model.t5_max_length": 8, "train.max_steps": 3, "train.batch_size": 2,
        "sample.every_steps": 0, "sample.at_end": True, "sample.steps": 2, "sample.seeds": [0],
        "checkpoint.every_steps": 0, "train.learning_rate": 1e-3})
    seen: list[ev.Event] = []
    window.runner.event.connect(seen.append)
    qtbot.mouseClick(window.train_bar.train_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not window.runner.is_running(), timeout=240_000)
    finished = [e for e in seen if isinstance(e, ev.Finished)]
    assert finished and finished[-1].reason == "completed", [e for e in seen if isinstance(e, ev.Finished)]
    assert finished[-1].step == 3
    assert len([e for e in seen if isinstance(e, ev.StepMetrics)]) == 3
    assert list((finished[-1].run_dir / "samples").glob("*.png"))
