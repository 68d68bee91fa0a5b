"""Where a run stands: its position (step, epoch, step in the epoch, what was last done at which step) and
early stopping on the validation loss. The loop advances them; checkpoints keep them."""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Any

import torch

from ..config import TrainConfig
from .state import Position


class Progress:
    """The run's position. ``last_*_step``: the step of the last validation / sample grid / checkpoint, so
    the end of an epoch or of the run does not do the same work twice at one step."""

    def __init__(self) -> None:
        self.step = self.epoch = self.step_in_epoch = 0
        self.total_steps = self.steps_per_epoch = 0
        self.last_val_step = self.last_sample_step = self.last_checkpoint_step = -1
        self.started = False  # training has begun (results may have been written)

    def plan(self, train: TrainConfig, steps_per_epoch: int) -> None:
        """The length of the run: ``train.max_steps``, else ``train.epochs`` epochs."""
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = train.max_steps if train.max_steps > 0 else train.epochs * steps_per_epoch

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps

    @property
    def epoch_complete(self) -> bool:
        return self.step_in_epoch >= self.steps_per_epoch

    def begin(self) -> None:
        self.started = True

    def step_done(self) -> None:
        self.step += 1
        self.step_in_epoch += 1

    def epoch_done(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0

    def validated(self) -> None:
        self.last_val_step = self.step

    def sampled(self) -> None:
        self.last_sample_step = self.step

    def checkpointed(self) -> None:
        self.last_checkpoint_step = self.step

    def position(self) -> Position:
        return Position(self.step, self.epoch, self.step_in_epoch)

    def restore(self, position: dict[str, Any]) -> None:
        """Back to a checkpoint's position (which is, by definition, checkpointed)."""
        self.step, self.epoch = int(position["step"]), int(position["epoch"])
        self.step_in_epoch = int(position["step_in_epoch"])
        self.last_checkpoint_step = self.step


class EarlyStopping:
    """The best validation loss so far and how many validations since have not improved on it by
    ``train.early_stopping_min_delta``; ``stopped`` after ``train.early_stopping_patience`` of them (0: never)."""

    def __init__(self, train: TrainConfig) -> None:
        self.patience = train.early_stopping_patience
        self.min_delta = train.early_stopping_min_delta
        self.best_val = math.inf
        self.best_step = -1
        self.bad_vals = 0
        self.stopped = False

    def observe(self, val_loss: float, step: int) -> bool:
        """True when ``val_loss`` improved on the best (the caller marks that checkpoint best)."""
        if val_loss < self.best_val - self.min_delta:
            self.best_val, self.best_step, self.bad_vals = val_loss, step, 0
            return True
        self.bad_vals += 1
        if self.patience and self.bad_vals >= self.patience:
            self.stopped = True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"best_val": self.best_val, "best_step": self.best_step, "bad_vals": self.bad_vals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_val = float(state.get("best_val", math.inf))
        self.best_step = int(state.get("best_step", -1))
        self.bad_vals = int(state.get("bad_vals", 0))


class StepTimer:
    """Durations of the last ``keep`` optimizer steps for the ETA. On a GPU from CUDA events recorded around each
    step and read only when ``median`` is asked for (at the logging interval; no sync per step); elsewhere the
    host clock (where a step ends when its host code returns)."""

    def __init__(self, device: torch.device, keep: int = 50) -> None:
        self.cuda = device.type == "cuda"
        self.done: deque[float] = deque(maxlen=keep)
        self._events: deque[tuple[Any, Any]] = deque(maxlen=keep)  # recorded, not read yet
        self._start: Any = None

    def start(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((self._start, end))
        else:
            self.done.append(time.perf_counter() - self._start)

    def median(self) -> float:
        """Median seconds per step over the kept steps (waits for the last recorded step on a GPU)."""
        while self._events:
            start, end = self._events.popleft()
            end.synchronize()
            self.done.append(start.elapsed_time(end) / 1000.0)
        times = sorted(self.done)
        return times[len(times) // 2] if times else 0.0
