"""Run by tests/test_multiprocess.py under `torchrun --nproc_per_node 2`: a tiny training run whose
every rank writes its world size and a digest of its final weights (only rank 0 writes the run)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from sdstudio.core.config import RunConfig
from sdstudio.core.train.loop import train
from sdstudio.core.train.session import TrainingSession


def main() -> int:
    dataset, run_dir, report_dir, overrides = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    config = RunConfig().with_overrides({**json.loads(overrides), "data.path": str(dataset)})
    original_close = TrainingSession.close

    def close_with_digest(self: TrainingSession) -> None:
        digest = hashlib.sha256()
        for name, tensor in sorted(self.accelerator.unwrap_model(self.model).state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        (report_dir / f"rank{self.rank}.json").write_text(json.dumps(
            {"world": self.world, "rank": self.rank, "step": self.step, "digest": digest.hexdigest(),
             "lazy": self.steps.lazy, "bad_steps": self.steps.bad_steps}))
        original_close(self)

    TrainingSession.close = close_with_digest  # type: ignore[method-assign]
    poison = os.environ.get("SDSTUDIO_TEST_POISON")  # "RANK:STEP": that rank's loss is NaN at that step
    if poison:
        rank, step = (int(x) for x in poison.split(":"))
        original_loss = TrainingSession.compute_loss

        def poisoned(self: TrainingSession, batch, micro):  # type: ignore[no-untyped-def]
            loss = original_loss(self, batch, micro)
            return loss * float("nan") if (self.rank, self.step + 1) == (rank, step) else loss

        TrainingSession.compute_loss = poisoned  # type: ignore[method-assign]
    last = None
    for event in train(config, run_dir=run_dir):
        last = event
    print(f"rank {os.environ.get('RANK')}: {type(last).__name__} {getattr(last, 'message', '')}", flush=True)
    return 0 if type(last).__name__ == "Finished" else 1


if __name__ == "__main__":
    sys.exit(main())
