"""Run by tests/test_fsdp_cpu.py under `torchrun --nproc_per_node 2`: a tiny full fine-tune with train.fsdp = true;
every rank writes how accelerate ran it (distributed type, the wrapped model's class), its loss per step and (rank
0) the run's warnings and final weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from sdstudio.core import events as ev
from sdstudio.core.config import RunConfig
from sdstudio.core.train.loop import train
from sdstudio.core.train.session import TrainingSession


def main() -> int:
    dataset, report_dir, overrides = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    config = RunConfig().with_overrides({**json.loads(overrides), "data.path": str(dataset)})
    losses: dict[int, float] = {}
    report: dict = {"losses": losses}
    original_step, original_close = TrainingSession.optimizer_step, TrainingSession.close

    def recording_step(self: TrainingSession, group):
        out = original_step(self, group)
        losses[self.step + 1] = float(out[0])  # the lazy step may return a device tensor
        return out

    def close_with_report(self: TrainingSession) -> None:
        report.update(rank=self.rank, world=self.world, distributed_type=self.accelerator.distributed_type.value,
                      model_class=type(self.model).__name__)
        state = self.accelerator.get_state_dict(self.model)  # the full weights (gathered under FSDP)
        if self.rank == 0:
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(report_dir / "weights.safetensors"))
        original_close(self)

    TrainingSession.optimizer_step = recording_step  # type: ignore[method-assign]
    TrainingSession.close = close_with_report  # type: ignore[method-assign]
    events = list(train(config))
    report["warnings"] = [e.text for e in events if isinstance(e, ev.Warning)]
    report["last"] = type(events[-1]).__name__
    rank = report.get("rank", "x")
    (report_dir / f"rank{rank}.json").write_text(json.dumps(report))
    return 0 if report["last"] == "Finished" else 1


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
