"""train.fsdp with two processes on the CPU (gloo ranks started by torchrun, as reference/performance.md says).

What this torch / accelerate can do here: accelerate (1.16) turns a run into FSDP only for GPU-like devices; with
``Accelerator(cpu=True)`` it keeps the FSDP plugin unused and runs the ranks data-parallel (MULTI_CPU, DDP), with
no error. So on this machine:
- the run says so (a warning naming train.fsdp), instead of silently training unsharded;
- the two ranks give the same loss curve and weights as one process doing their micro-batches in turn;
- the sharding itself is skipped with the distributed type accelerate reported (run on GPUs to test it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from sdstudio.core.config import RunConfig
from sdstudio.core.train.objective import DiffusionObjective
from sdstudio.core.train.session import TrainingSession
from tests.conftest import TINY_OVERRIDES

STEPS = 4
OVERRIDES = {**TINY_OVERRIDES, "train.batch_size": 2, "train.max_steps": STEPS, "train.fsdp": True,
             "checkpoint.every_steps": 0, "train.val_every_steps": 0, "train.threads": 1, "sample.at_end": False}
LOSS_RTOL = 1e-4  # the same batches and noise; only the order of float additions differs (DDP vs accumulation)


@pytest.fixture(scope="module")
def two_ranks(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    torchrun = shutil.which("torchrun")
    cmd = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    reports = tmp_path_factory.mktemp("fsdp-reports")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*cmd, "--nproc_per_node", "2", "--master_port", "29523", str(Path(__file__).with_name("fsdp_train_script.py")),
         str(tiny_dataset), str(reports), json.dumps(OVERRIDES)],
        check=False, capture_output=True, text=True, timeout=600, env=env, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ranks = [json.loads((reports / f"rank{r}.json").read_text()) for r in (0, 1)]
    return {"ranks": ranks, "weights": load_file(str(reports / "weights.safetensors"))}


def _one_process_in_turn(tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[int, float], dict]:
    """One process, the two ranks' micro-batches as its two accumulated micro-batches, micro-batch m drawing the
    noise rank m draws: the computation of the two ranks, done in one."""
    original = DiffusionObjective._noise_generator

    def as_rank(self: DiffusionObjective, step: int, micro: int) -> torch.Generator:
        rank, self.rank = self.rank, micro
        try:
            return original(self, step, 0)
        finally:
            self.rank = rank

    monkeypatch.setattr(DiffusionObjective, "_noise_generator", as_rank)
    cfg = RunConfig().with_overrides({**OVERRIDES, "train.fsdp": False, "train.gradient_accumulation": 2,
                                      "data.path": str(tiny_dataset)})
    losses: dict[int, float] = {}
    weights: dict[str, torch.Tensor] = {}
    original_step, original_close = TrainingSession.optimizer_step, TrainingSession.close

    def recording_step(self: TrainingSession, group):
        out = original_step(self, group)
        losses[self.step + 1] = float(out[0])  # the lazy step may return a device tensor
        return out

    def keep_weights(self: TrainingSession) -> None:
        weights.update({k: v.detach().clone() for k, v in self.accelerator.get_state_dict(self.model).items()})
        original_close(self)

    monkeypatch.setattr(TrainingSession, "optimizer_step", recording_step)
    monkeypatch.setattr(TrainingSession, "close", keep_weights)
    from sdstudio.core.train.loop import train

    events = list(train(cfg))
    assert type(events[-1]).__name__ == "Finished", events[-1]
    return losses, weights


@pytest.mark.slow
def test_two_cpu_ranks_train_as_one_process_and_say_fsdp_is_not_used(two_ranks: dict[str, Any], tiny_dataset: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    r0, r1 = two_ranks["ranks"]
    assert r0["world"] == r1["world"] == 2 and r0["last"] == r1["last"] == "Finished"
    if r0["distributed_type"] != "FSDP":
        assert any("train.fsdp = true not used" in w for w in r0["warnings"]), r0["warnings"]
    curve = {s: (r0["losses"][str(s)] + r1["losses"][str(s)]) / 2 for s in range(1, STEPS + 1)}
    losses, weights = _one_process_in_turn(tiny_dataset, monkeypatch)
    assert list(losses) == list(range(1, STEPS + 1))
    assert [curve[s] for s in losses] == pytest.approx([losses[s] for s in losses], rel=LOSS_RTOL)
    sharded = two_ranks["weights"]
    assert sharded.keys() == weights.keys()
    for k in weights:
        assert torch.allclose(sharded[k], weights[k], rtol=1e-4, atol=1e-6), k


@pytest.mark.slow
def test_fsdp_shards_the_model_over_two_ranks(two_ranks: dict[str, Any]) -> None:
    r0 = two_ranks["ranks"][0]
    if r0["distributed_type"] != "FSDP":
        import accelerate

        pytest.skip(f"accelerate {accelerate.__version__} with torch {torch.__version__} does not run FSDP on CPU "
                    f"ranks: with train.fsdp = true the two gloo ranks ran as {r0['distributed_type']} "
                    f"({r0['model_class']}), the FSDP plugin unused (accelerate sets FSDP only for GPU-like "
                    "devices); the sharding needs GPUs")
    assert "FullyShardedDataParallel" in r0["model_class"] or "FSDP" in r0["model_class"]
