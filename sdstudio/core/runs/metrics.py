"""A run's ``metrics.jsonl``: appending rows, reading them back (a torn last line is skipped), and the curves
every reader draws from them (the app's run list, comparison and live plot, a sweep's summary and overlay),
smoothed one way everywhere: the debiased exponential moving average TensorBoard uses."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from ..atomic import write_text_atomic
from ..errors import RunDirError

SMOOTHING = 0.8  # EMA weight of smoothed loss curves; higher is smoother and lags more


class MetricsWriter:
    """Appends one JSON object per line and flushes, so a crash loses at most the line being written.

    ``mirror`` also receives every row written (the run's TensorBoard log)."""

    def __init__(self, path: Path, mirror: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.path = path
        self.mirror = mirror
        self._fh: TextIO | None = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the run's life

    def write(self, row: dict[str, Any]) -> None:
        if self._fh is None:
            return
        try:
            self._fh.write(json.dumps(row, separators=(",", ":")) + "\n")
            self._fh.flush()
        except OSError as exc:
            self.close_quietly()
            raise RunDirError(f"{self.path}: cannot append metrics ({exc.strerror or exc}); free disk space or make "
                              "the run folder writable, then resume the run (its last checkpoint is intact)") from exc
        if self.mirror is not None:
            self.mirror(row)

    def close_quietly(self) -> None:
        try:
            self.close()
        except OSError:
            self._fh = None

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All complete rows; a truncated or garbled line (a kill mid-write) is skipped, never fatal."""
    rows: list[dict[str, Any]] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict):
                    rows.append(row)
    except FileNotFoundError:
        pass
    return rows


def truncate_metrics_after(path: Path, step: int) -> None:
    """On resume: drop rows logged after the checkpoint's step (rewritten atomically)."""
    rows = [r for r in read_metrics(path) if int(r.get("step", 0)) <= step]
    write_text_atomic(path, "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows))


def metrics_row(kind: str, step: int, epoch: int, **values: Any) -> dict[str, Any]:
    return {"step": step, "epoch": epoch, "time": round(time.time(), 3), "kind": kind, **values}


# -- curves -----------------------------------------------------------------------------------------------
def _number(value: Any) -> float | None:
    """A finite number from a row, else None (bools, strings, NaN and inf are not curve points)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _array(values: Iterable[float]) -> np.ndarray:
    return np.fromiter(values, dtype=np.float64)


@dataclass(frozen=True)
class RunCurves:
    """What a run logged, as curves: training loss and validation loss against steps (float64 arrays), FID/KID
    points, the run's events in order (``started``, ``stopped``, ``completed``...), its last step and how long
    its rows span in seconds."""

    train_steps: np.ndarray = field(default_factory=lambda: np.empty(0))
    train_loss: np.ndarray = field(default_factory=lambda: np.empty(0))
    val_steps: np.ndarray = field(default_factory=lambda: np.empty(0))
    val_loss: np.ndarray = field(default_factory=lambda: np.empty(0))
    fid: list[tuple[int, float]] = field(default_factory=list)  # (step, fid) of the FID/KID rows
    kid: list[tuple[int, float, float | None]] = field(default_factory=list)  # (step, kid_mean, kid_std)
    events: list[str] = field(default_factory=list)
    last_step: int = 0
    seconds: float | None = None

    @property
    def train(self) -> list[tuple[int, float]]:
        """(step, loss) pairs of the training rows."""
        return [(int(s), float(v)) for s, v in zip(self.train_steps, self.train_loss, strict=True)]

    @property
    def val(self) -> list[tuple[int, float]]:
        """(step, val_loss) pairs of the validation rows that have one."""
        return [(int(s), float(v)) for s, v in zip(self.val_steps, self.val_loss, strict=True)]

    def smoothed_train_loss(self, weight: float = SMOOTHING) -> np.ndarray:
        return smooth_ema(self.train_loss, weight)


def curves_from_rows(rows: Iterable[dict[str, Any]]) -> RunCurves:
    """Rows of kind "train" give the loss curve; rows of kind "val" carry either a validation loss
    (``val_loss``) or FID/KID (``fid``, ``kid_mean``, ``kid_std``, no ``val_loss``): each curve takes the rows
    that have its value. Rows without an integer step are skipped; unknown keys are ignored."""
    train: list[tuple[int, float]] = []
    val: list[tuple[int, float]] = []
    fid: list[tuple[int, float]] = []
    kid: list[tuple[int, float, float | None]] = []
    events: list[str] = []
    times: list[float] = []
    last_step = 0
    for row in rows:
        step = row.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            continue
        last_step = max(last_step, step)
        if (t := _number(row.get("time"))) is not None:
            times.append(t)
        kind = row.get("kind")
        if kind == "train" and (loss := _number(row.get("loss"))) is not None:
            train.append((step, loss))
        elif kind == "val":
            if (val_loss := _number(row.get("val_loss"))) is not None:
                val.append((step, val_loss))
            if (value := _number(row.get("fid"))) is not None:
                fid.append((step, value))
            if (kid_mean := _number(row.get("kid_mean"))) is not None:
                kid.append((step, kid_mean, _number(row.get("kid_std"))))
        elif kind == "event" and isinstance(row.get("event"), str):
            events.append(row["event"])
    return RunCurves(_array(s for s, _ in train), _array(v for _, v in train),
                     _array(s for s, _ in val), _array(v for _, v in val), fid, kid, events, last_step,
                     max(times) - min(times) if len(times) >= 2 else None)


def read_curves(metrics_file: Path) -> RunCurves:
    return curves_from_rows(read_metrics(metrics_file))


# -- smoothing --------------------------------------------------------------------------------------------
class EmaSmoother:
    """The debiased exponential moving average, one value at a time (live curves): the average starts at 0
    and is divided by ``1 - weight**n``, so a constant stays constant from the first point."""

    def __init__(self, weight: float = SMOOTHING) -> None:
        self.weight = weight
        self.reset()

    def reset(self) -> None:
        self._avg, self._count = 0.0, 0

    def add(self, value: float) -> float:
        self._avg = self.weight * self._avg + (1.0 - self.weight) * value
        self._count += 1
        return self._avg / (1.0 - self.weight ** self._count)


def smooth_ema(values: np.ndarray | Iterable[float], weight: float = SMOOTHING) -> np.ndarray:
    """The debiased EMA of a whole curve (TensorBoard's smoothing); a non-finite value is skipped (NaN out,
    the average carries on past it)."""
    data = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64)
    out = np.full(len(data), np.nan)
    smoother = EmaSmoother(weight)
    for i, value in enumerate(data):
        if math.isfinite(value):
            out[i] = smoother.add(float(value))
    return out
