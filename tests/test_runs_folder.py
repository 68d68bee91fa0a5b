"""The run-folder object: where its files lie, its checkpoints (newest valid, best), curves and smoothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sdstudio.core.errors import CheckpointError
from sdstudio.core.runs import (
    EmaSmoother,
    RunFolder,
    curves_from_rows,
    resolve_checkpoint,
    run_of_checkpoint,
    smooth_ema,
)
from sdstudio.core.train.checkpoint import write_checkpoint


def _checkpoint(run: RunFolder, step: int) -> Path:
    def fill(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"weights %d" % step)

    return write_checkpoint(run.checkpoints_dir, step, 0, fill)


@pytest.fixture
def run(tmp_path: Path) -> RunFolder:
    folder = RunFolder(tmp_path / "run").create()
    folder.config_file.write_text("", encoding="utf-8")
    return folder


def test_layout_follows_the_contract(tmp_path: Path) -> None:
    run = RunFolder(tmp_path / "r")
    assert run.config_file == tmp_path / "r" / "config.toml"
    assert run.metrics_file.name == "metrics.jsonl" and run.log_file.name == "run.log"
    assert run.lock_file.name == "lock" and run.best_file == tmp_path / "r" / "checkpoints" / "best.json"
    assert run.checkpoint_dir(120) == tmp_path / "r" / "checkpoints" / "step-00000120"
    assert run.sample_grid(120) == tmp_path / "r" / "samples" / "step-00000120.png"
    assert run.export_path("n", "step00000120", "kohya", ".safetensors") == tmp_path / "r" / "exports" / "n-step00000120-kohya.safetensors"
    assert run.export_path("n", "best", "diffusers-folder", "").name == "n-best-diffusers-folder"
    assert not run.is_run()
    run.create()
    assert run.checkpoints_dir.is_dir() and run.samples_dir.is_dir() and run.exports_dir.is_dir()


def test_newest_valid_checkpoint_skips_a_corrupt_one(run: RunFolder) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint"):
        run.newest_valid_checkpoint()
    assert run.newest_valid_checkpoint_or_none() is None
    _checkpoint(run, 2)
    newest = _checkpoint(run, 4)
    (newest / "model.safetensors").write_bytes(b"weights 5")  # same size, other content: corrupt
    (run.checkpoints_dir / "step-00000006").mkdir()  # a folder without a manifest: a partial write
    warnings: list[str] = []
    info = run.newest_valid_checkpoint(warnings.append)
    assert info.step == 2 and info.path == run.checkpoint_dir(2)
    assert any("step-00000004" in w and "corrupt" in w for w in warnings)
    assert [p.name for p in run.checkpoints()] == ["step-00000002", "step-00000004"]  # with a manifest
    assert resolve_checkpoint(run.path) == run.checkpoint_dir(2)
    assert resolve_checkpoint(run.checkpoint_dir(2)) == run.checkpoint_dir(2)
    assert run_of_checkpoint(run.checkpoint_dir(2)) == run


def test_best_checkpoint(run: RunFolder) -> None:
    assert run.best_checkpoint() is None
    with pytest.raises(CheckpointError, match="no checkpoint marked best"):
        resolve_checkpoint(run.path, best=True)
    _checkpoint(run, 2)
    _checkpoint(run, 4)
    run.mark_best(2, 0.25)
    assert json.loads(run.best_file.read_text())["checkpoint"] == "step-00000002"
    assert run.best_checkpoint() == run.checkpoint_dir(2)
    assert resolve_checkpoint(run.path, best=True) == run.checkpoint_dir(2)
    assert resolve_checkpoint(run.path) == run.checkpoint_dir(4)
    run.mark_best(8, 0.1)  # pruned or never written: no best
    assert run.best_checkpoint() is None


def test_curves_from_metrics_rows(run: RunFolder) -> None:
    rows = [{"step": 0, "epoch": 0, "time": 10.0, "kind": "event", "event": "started"},
            {"step": 1, "epoch": 0, "time": 11.0, "kind": "train", "loss": 1.0},
            {"step": 2, "epoch": 0, "time": 12.0, "kind": "train", "loss": float("nan")},
            {"step": 2, "epoch": 0, "time": 12.5, "kind": "train", "loss": True},  # not a number
            {"step": 3, "epoch": 0, "time": 13.0, "kind": "train", "loss": 0.5, "unknown": "ignored"},
            {"step": 3, "epoch": 0, "time": 13.0, "kind": "val", "val_loss": 0.7},
            {"step": 3, "epoch": 0, "time": 13.0, "kind": "val", "fid": 90.0, "kid_mean": 0.04, "kid_std": None},
            {"step": 3, "epoch": 0, "time": 14.0, "kind": "sample", "fid": 1.0},  # not a val row
            {"step": 3, "epoch": 0, "time": 15.0, "kind": "event", "event": "completed"}]
    run.metrics_file.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"step": 9, "ki', encoding="utf-8")
    curves = run.curves()
    assert curves.train_steps.tolist() == [1.0, 3.0] and curves.train_loss.tolist() == [1.0, 0.5]
    assert curves.train == [(1, 1.0), (3, 0.5)] and curves.val == [(3, 0.7)]
    assert curves.fid == [(3, 90.0)] and curves.kid == [(3, 0.04, None)]
    assert curves.events == ["started", "completed"] and curves.last_step == 3 and curves.seconds == 5.0
    assert curves_from_rows([]).last_step == 0 and curves_from_rows([]).seconds is None


def test_smoothing_is_the_debiased_ema() -> None:
    assert np.allclose(smooth_ema(np.full(10, 2.0)), 2.0), "a constant stays constant from the first point"
    values = np.array([1.0, 0.0, 0.0])
    w = 0.8
    expected = [1.0, (w * 0.2) / (1 - w**2), (w * w * 0.2) / (1 - w**3)]
    assert np.allclose(smooth_ema(values, w), expected)
    smoother = EmaSmoother(w)
    assert np.allclose([smoother.add(v) for v in values], expected), "live and whole-curve smoothing agree"
    gap = smooth_ema([1.0, float("nan"), 1.0])
    assert np.isnan(gap[1]) and np.allclose(gap[[0, 2]], 1.0)
    assert smooth_ema([]).shape == (0,)


def test_lock_refuses_a_live_writer(run: RunFolder) -> None:
    from sdstudio.core.errors import RunDirError

    lock = run.lock()
    lock.acquire()
    assert run.is_locked_by_live_process()
    lock.release()
    assert not run.lock_file.exists() and not run.is_locked_by_live_process()
    run.lock_file.write_text("1", encoding="utf-8")  # pid 1 (init) is alive and is not us
    with pytest.raises(RunDirError, match="another sdstudio process"):
        run.lock().acquire()
