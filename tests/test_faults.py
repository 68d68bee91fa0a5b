"""Fault injection: hard kills at awkward moments, corrupt checkpoints, full or read-only disks, NaN and
out-of-memory. Every case must end with nothing lost: a resumable run, a clear message, no partial file
under a final name. What is guaranteed and how it is tested: docs/reliability.md."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdstudio.core import events as ev
from sdstudio.core.runs import read_metrics
from sdstudio.core.train.loop import train
from sdstudio.core.train.session import TrainingSession
from tests.conftest import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]
STEPS = 8
OVERRIDES = {**TINY_OVERRIDES, "train.max_steps": STEPS, "checkpoint.every_steps": 2, "checkpoint.keep_last": 2,
             "train.log_every": 1}


def cli_args(dataset: Path, run: Path) -> list[str]:
    args = ["train", "--data", str(dataset), "--out", str(run), "--quiet"]
    for key, value in OVERRIDES.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    return args


def run_cli(args: list[str], fault: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if fault:
        cmd = [sys.executable, str(REPO / "tests" / "fault_script.py"), fault, "--", *args]
    else:
        cmd = [sys.executable, "-m", "sdstudio", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step-{STEPS:08d}" / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "weights differ from the uninterrupted run"


def assert_clean_metrics(run: Path) -> None:
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, STEPS + 1)), steps


@pytest.fixture(scope="module")
def reference(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    run = tmp_path_factory.mktemp("reference") / "run"
    proc = run_cli(cli_args(tiny_dataset, run))
    assert proc.returncode == 0, proc.stderr
    return final_weights(run)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill-at-step:4", "kill-in-checkpoint:2", "kill-in-metrics:6"])
def test_hard_kill_then_resume_gives_the_uninterrupted_result(fault: str, reference, tiny_dataset: Path,
                                                               tmp_path: Path) -> None:
    run = tmp_path / "run"
    killed = run_cli(cli_args(tiny_dataset, run), fault=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run_cli(["train", "--resume", str(run), "--quiet"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_weights(final_weights(run), reference)
    assert_clean_metrics(run)
    assert not list((run / "checkpoints").glob(".tmp-*")), "leftovers of the killed write are cleaned up"
    assert not (run / "lock").exists()


@pytest.mark.slow
def test_random_kills_in_a_loop(reference, tiny_dataset: Path, tmp_path: Path) -> None:
    """Real SIGKILLs at random moments (after the first checkpoint), resume after each."""
    rng = random.Random(1234)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "sdstudio", *cli_args(tiny_dataset, run)]
    for attempt in range(3):
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not list((run / "checkpoints").glob("step-*")):
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        args = [sys.executable, "-m", "sdstudio", "train", "--resume", str(run), "--quiet"]
        if proc.returncode == 0:
            break
    final = run_cli(["train", "--resume", str(run), "--quiet", "--set", f"train.max_steps={STEPS}"])
    # a run that had already finished resumes to its end at once
    assert final.returncode == 0, final.stderr[-2000:]
    assert_same_weights(final_weights(run), reference)
    assert_clean_metrics(run)


def test_bit_flip_in_the_newest_checkpoint_falls_back(tiny_config, tmp_path: Path) -> None:
    run = tmp_path / "run"
    list(train(tiny_config, run_dir=run))
    weights = run / "checkpoints" / "step-00000006" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x40
    weights.write_bytes(bytes(data))
    events = list(train(tiny_config.with_overrides({"train.max_steps": 7}), run_dir=run, resume=True))
    warnings = " ".join(e.text for e in events if isinstance(e, ev.Warning))
    assert "step-00000006" in warnings and "sha256" in warnings
    assert isinstance(events[-1], ev.Finished) and events[-1].step == 7


def _fail_writes(monkeypatch: pytest.MonkeyPatch, marker: str, code: int) -> None:
    """Make every open() for writing of a path containing ``marker`` fail with ``code``."""
    import builtins

    real_open = builtins.open

    def fake_open(file, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        if marker in str(file) and any(c in mode for c in "wax+"):
            raise OSError(code, os.strerror(code), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_checkpoint_write_failure_stops_and_keeps_the_previous(code: int, tiny_config, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    original = TrainingSession.save_checkpoint

    def failing_after_first(self):  # type: ignore[no-untyped-def]
        if self.step >= 6:
            _fail_writes(monkeypatch, ".tmp-step-", code)
        return original(self)

    monkeypatch.setattr(TrainingSession, "save_checkpoint", failing_after_first)
    run = tmp_path / "run"
    events = list(train(tiny_config, run_dir=run))
    failed = events[-1]
    assert isinstance(failed, ev.Failed), failed
    assert "step-00000006" in failed.message and os.strerror(code) in failed.message
    assert "previous checkpoint is still valid" in failed.message
    assert failed.resumable_from == run / "checkpoints" / "step-00000003"
    assert not list((run / "checkpoints").glob(".tmp-*")) and not (run / "checkpoints" / "step-00000006").exists()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_sample_write_failure_is_skipped_with_a_warning(code: int, tiny_config, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    real_save = Image.Image.save

    def failing_save(self, fp, *args, **kwargs):  # type: ignore[no-untyped-def]
        if "samples" in str(fp):
            raise OSError(code, os.strerror(code), str(fp))
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    run = tmp_path / "run"
    events = list(train(tiny_config.with_overrides({"sample.every_steps": 3}), run_dir=run))
    assert isinstance(events[-1], ev.Finished)
    assert any(isinstance(e, ev.Warning) and "sample grid" in e.text for e in events)
    assert not list((run / "samples").glob("*.png")) and not list((run / "samples").glob(".*"))


def test_export_to_a_full_disk_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sdstudio.core.errors import UserError
    from sdstudio.core.export.metadata import write_safetensors

    target = tmp_path / "out.safetensors"
    _fail_writes(monkeypatch, "out.safetensors", errno.ENOSPC)
    with pytest.raises(UserError, match="No space left on device.*MB of free space"):
        write_safetensors({"a": torch.zeros(1000)}, target, {})
    assert not list(tmp_path.iterdir())


def test_cache_write_failure_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sdstudio.core.data.cache import CacheWriteError, FeatureCache, TextItem

    cache = FeatureCache("test", root=tmp_path / "cache")
    _fail_writes(monkeypatch, str(tmp_path / "cache"), errno.ENOSPC)
    with pytest.raises(CacheWriteError, match="No space left on device.*data.cache_latents") as info:
        cache.put(TextItem("a"), {"x": torch.zeros(3)})
    assert info.value.errno == errno.ENOSPC
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()], "no partial cache entry"


def test_out_of_memory_stops_cleanly_with_advice_or_skips(tiny_config, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    original = TrainingSession.compute_loss

    def oom_at_5(self, batch, micro):  # type: ignore[no-untyped-def]
        if self.step + 1 == 5:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, batch, micro)

    monkeypatch.setattr(TrainingSession, "compute_loss", oom_at_5)
    run = tmp_path / "run"
    events = list(train(tiny_config.with_overrides({"checkpoint.every_steps": 0}), run_dir=run))
    failed = events[-1]
    assert isinstance(failed, ev.Failed) and failed.kind == "oom"
    assert "train.batch_size" in failed.message and "gradient_checkpointing" in failed.message
    assert failed.resumable_from == run / "checkpoints" / "step-00000004", "a checkpoint of the last good step"
    skipping = list(train(tiny_config.with_overrides({"train.oom_skip_batches": 1}), run_dir=tmp_path / "run2"))
    assert isinstance(skipping[-1], ev.Finished)


def test_metrics_write_failure_stops_with_the_path(tiny_config, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from sdstudio.core.runs import MetricsWriter

    original = MetricsWriter.write

    def full_after_step_4(self, row):  # type: ignore[no-untyped-def]
        if row.get("step", 0) >= 5:
            raise_full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self._fh.write = lambda *_a: (_ for _ in ()).throw(raise_full)  # the next write fails
        return original(self, row)

    monkeypatch.setattr(MetricsWriter, "write", full_after_step_4)
    run = tmp_path / "run"
    events = list(train(tiny_config, run_dir=run))
    failed = events[-1]
    assert isinstance(failed, ev.Failed) and failed.kind == "input", failed
    assert "metrics.jsonl" in failed.message and "No space left" in failed.message
    assert failed.resumable_from == run / "checkpoints" / "step-00000003"
