"""Short training runs on messy and mixed-aspect folders: problem files cost one warning each, never the
run, and the folder is never written to."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from sdstudio.core import events as ev
from sdstudio.core.train.loop import train

try:
    from conftest_data import (
        make_aspect_folder,
        make_messy_folder,
        noise_image,
        save,
        snapshot,
        with_data_keys,
    )
except ImportError:  # tests/ imported as a package
    from tests.conftest_data import (
        make_aspect_folder,
        make_messy_folder,
        noise_image,
        save,
        snapshot,
        with_data_keys,
    )

ERROR_FILES = ("truncated.jpg", "empty.png", "notes.jpg", "huge.png")
SHORT = {"train.max_steps": 3, "train.threads": 1, "checkpoint.every_steps": 0, "data.resolution": 16}


def _kohya_messy(root: Path) -> Path:
    """A kohya parent: the messy folder as one concept, a clean concept, a folder kohya skips."""
    make_messy_folder(root / "3_messy thing")
    for i in range(3):
        save(noise_image(40, 32, seed=200 + i), root / "2_cat" / f"cat{i}.png")
    save(noise_image(32, 32, seed=210), root / "notes" / "stray.png")
    return root


@pytest.fixture(scope="module")
def messy_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[ev.Event], dict, dict]:
    from sdstudio.core.config import RunConfig

    try:
        from conftest import TINY_OVERRIDES
    except ImportError:
        from tests.conftest import TINY_OVERRIDES
    base = tmp_path_factory.mktemp("messy-run")
    folder = _kohya_messy(base / "data")
    before = snapshot(folder)
    cfg = RunConfig().with_overrides({**TINY_OVERRIDES, **SHORT, "data.path": str(folder)})
    with pytest.MonkeyPatch.context() as mp:  # module scope: the autouse home fixture is not active yet
        mp.setenv("SDSTUDIO_HOME", str(base / "home"))
        events = list(train(cfg, run_dir=base / "run"))
    return folder, events, before, snapshot(folder)


def test_training_on_a_messy_folder_finishes_with_one_warning_per_bad_file(messy_run) -> None:
    _folder, events, _before, _after = messy_run
    assert isinstance(events[-1], ev.Finished) and events[-1].reason == "completed", events[-1]
    warnings = [e.text for e in events if isinstance(e, ev.Warning)]
    for name in ERROR_FILES:
        hits = [w for w in warnings if f"/{name}:" in w]
        assert len(hits) == 1, (name, warnings)
    skipping = [w for w in warnings if w.startswith("skipping")]
    assert len(skipping) == len(ERROR_FILES), skipping


def test_training_never_changes_the_dataset_folder(messy_run) -> None:
    _folder, _events, before, after = messy_run
    assert after == before


def test_bucketed_training_on_mixed_aspect_ratios_finishes(tiny_config, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    folder = make_aspect_folder(tmp_path / "aspect")
    cfg = with_data_keys(tiny_config.with_overrides({**SHORT, "data.path": str(folder), "data.val_split": 0.0,
                                                     "data.flip_p": 0.5}), bucketing=True)
    with caplog.at_level(logging.INFO, logger="sdstudio"):
        events = list(train(cfg, run_dir=tmp_path / "run"))
    assert isinstance(events[-1], ev.Finished) and events[-1].reason == "completed", events[-1]
    text = caplog.text
    assert "aspect-ratio buckets" in text and "24x8" in text and "8x24" in text and "16x16" in text
