"""train.wandb: the run's metrics and sample grids mirrored to Weights & Biases in offline mode (no network)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from sdstudio.core import events as ev
from sdstudio.core.train.loop import train

pytest.importorskip("wandb", reason="the wandb extra is not installed")


def _flushed_record(path: Path, keys: tuple[bytes, ...], timeout_s: float = 60.0) -> bytes:
    """W&B's record log (protobuf: the keys are plain text) as its service process leaves it. ``run.finish()``
    waits for the exit record, but the service closes and flushes the file a moment later on its own (wandb 0.31
    informs it without waiting), so on a busy machine the file can still hold only its header right after the run:
    CI read ``b":W&B..."`` and nothing else once. Poll until every key is there or the timeout passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        record = path.read_bytes()
        if all(key in record for key in keys) or time.monotonic() > deadline:
            return record
        time.sleep(0.2)


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
    keys = (b"train/loss", b"train/lr", b"train/grad_norm", b"val/loss")
    record = _flushed_record(next(runs[0].glob("run-*.wandb")), keys)
    for key in keys:
        assert key in record, key
    assert list((runs[0] / "files" / "media" / "images").glob("samples_3_*.png"))  # the grid of step 3


def test_without_wandb_nothing_is_written(tiny_config, tmp_path: Path) -> None:
    config = tiny_config.with_overrides({"train.max_steps": 1, "checkpoint.every_steps": 0})
    list(train(config, run_dir=tmp_path / "run"))
    assert not (tmp_path / "run" / "wandb").exists()
