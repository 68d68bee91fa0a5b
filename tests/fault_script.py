"""Run the sdstudio CLI with one injected fault (used by tests/test_faults.py in a subprocess).

    python tests/fault_script.py FAULT:N -- <sdstudio CLI arguments>

FAULT: kill-at-step (SIGKILL at the start of optimizer step N), kill-in-checkpoint (SIGKILL while the N-th
checkpoint's files are written, before its manifest and rename), kill-in-metrics (SIGKILL after half of the
N-th metrics line is on disk)."""

from __future__ import annotations

import os
import signal
import sys


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(fault: str, n: int) -> None:
    count = {"calls": 0}

    def hit() -> bool:
        count["calls"] += 1
        return count["calls"] == n

    if fault == "kill-at-step":
        from sdstudio.core.train.session import TrainingSession

        original = TrainingSession.optimizer_step

        def step(self, group):  # type: ignore[no-untyped-def]
            if self.step + 1 == n:
                die()
            return original(self, group)

        TrainingSession.optimizer_step = step  # type: ignore[method-assign]
    elif fault == "kill-in-checkpoint":
        from sdstudio.core.train import state

        original_save = state.save_training_files

        def save(folder, *args, **kwargs):  # type: ignore[no-untyped-def]
            original_save(folder, *args, **kwargs)
            if hit():
                die()

        state.save_training_files = save
    elif fault == "kill-in-metrics":
        from sdstudio.core.runs import MetricsWriter

        original_write = MetricsWriter.write

        def write(self, row):  # type: ignore[no-untyped-def]
            if hit():
                import json

                line = json.dumps(row)
                self._fh.write(line[: len(line) // 2])
                self._fh.flush()
                die()
            original_write(self, row)

        MetricsWriter.write = write  # type: ignore[method-assign]
    else:
        raise SystemExit(f"unknown fault {fault}")


if __name__ == "__main__":
    spec, sep, *cli = sys.argv[1:]
    assert sep == "--"
    name, _, number = spec.partition(":")
    install(name, int(number))
    from sdstudio.cli import main

    sys.exit(main(cli))
