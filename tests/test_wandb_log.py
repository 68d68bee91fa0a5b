"""train.wandb: the run's metrics and sample grids mirrored to Weights & Biases in offline mode (no network)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdstudio.core import events as ev
from sdstudio.core.train.loop import train

pytest.importorskip("wandb", reason="the wandb extra is not installed")


def test_offline_wandb_run_gets_the_metrics(tiny_config, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))  # the run's own folder must win
    config = tiny_config.with_overrides({"train.wandb": True, "train.max_steps": 3, "checkpoint.every_steps": 0,
                                         "sample.at_end": True})
    events = list(train(config, run_dir=tmp_path / "run"))
    assert isinstance(events[-1], ev.Finished), events[-1]
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_id = (tmp_path / "run" / "wandb" / "run-id").read_text()
    assert run_id in runs[0].name and list(runs[0].glob("run-*.wandb"))
    record = next(runs[0].glob("run-*.wandb")).read_bytes()  # W&B's record log (protobuf): the keys are plain text
    for key in (b"train/loss", b"train/lr", b"train/grad_norm", b"val/loss"):
        assert key in record, key
    assert list((runs[0] / "files" / "media" / "images").glob("samples_3_*.png"))  # the grid of step 3


def test_without_wandb_nothing_is_written(tiny_config, tmp_path: Path) -> None:
    config = tiny_config.with_overrides({"train.max_steps": 1, "checkpoint.every_steps": 0})
    list(train(config, run_dir=tmp_path / "run"))
    assert not (tmp_path / "run" / "wandb").exists()
