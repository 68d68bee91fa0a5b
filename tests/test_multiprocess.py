"""Data-parallel training through accelerate: two CPU ranks (gloo) started by torchrun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_OVERRIDES


def _two_ranks(dataset: Path, tmp_path: Path, overrides: dict, *, port: int,
               env: dict[str, str] | None = None) -> tuple[dict, dict]:
    """tests/mp_train_script.py on two CPU ranks (torchrun, gloo) writing tmp_path/run; each rank's report."""
    torchrun = shutil.which("torchrun")
    cmd = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    reports = tmp_path / "reports"
    reports.mkdir()
    proc = subprocess.run(
        [*cmd, "--nproc_per_node", "2", "--master_port", str(port), str(Path(__file__).with_name("mp_train_script.py")),
         str(dataset), str(tmp_path / "run"), str(reports), json.dumps(overrides)],
        capture_output=True, text=True, timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        cwd=Path(__file__).resolve().parents[1], check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads((reports / "rank0.json").read_text()), json.loads((reports / "rank1.json").read_text())


@pytest.mark.slow
def test_two_ranks_train_in_lockstep(tiny_dataset: Path, tmp_path: Path) -> None:
    overrides = {**TINY_OVERRIDES, "train.batch_size": 2, "train.max_steps": 4, "checkpoint.every_steps": 2}
    r0, r1 = _two_ranks(tiny_dataset, tmp_path, overrides, port=29517)
    assert r0["world"] == r1["world"] == 2
    assert r0["step"] == r1["step"] == 4
    assert r0["digest"] == r1["digest"], "gradients are synchronised: both ranks hold the same weights"
    run = tmp_path / "run"
    assert (run / "checkpoints" / "step-00000004" / "manifest.json").is_file()
    metrics = (run / "metrics.jsonl").read_text().splitlines()
    assert len([m for m in metrics if '"kind":"train"' in m]) == 4, "only rank 0 writes metrics"


@pytest.mark.slow
def test_a_nan_on_one_rank_is_skipped_on_both_without_a_sync_per_step(tiny_dataset: Path, tmp_path: Path) -> None:
    """Two ranks take the device-side step (no host sync per step): rank 1's loss is NaN at step 2, so its
    gradients are, and after the all-reduce every rank's gradient norm: both skip that step (one bad step each,
    within train.nan_skip_steps = 1), finish in lockstep with the same weights, and rank 0 logs the step as NaN."""
    overrides = {**TINY_OVERRIDES, "train.batch_size": 2, "train.max_steps": 4, "checkpoint.every_steps": 0,
                 "train.nan_skip_steps": 1, "sample.at_end": False}
    r0, r1 = _two_ranks(tiny_dataset, tmp_path, overrides, port=29519, env={"SDSTUDIO_TEST_POISON": "1:2"})
    assert r0["lazy"] and r1["lazy"], "the device-side step with two processes"
    assert r0["bad_steps"] == r1["bad_steps"] == 1
    assert r0["step"] == r1["step"] == 4 and r0["digest"] == r1["digest"]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in rows if r.get("kind") == "train"}
    assert losses[2] is None or losses[2] != losses[2], losses  # NaN (written as null) for the skipped step
    assert all(losses[s] == losses[s] and losses[s] is not None for s in (1, 3, 4)), losses

