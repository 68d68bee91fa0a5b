"""Running a sweep: its combinations one after another as normal runs in ``OUT/<index>-<slug>/``.

``run_sweep`` is a generator like ``train``: it yields the sweep's own events around each run's training
events, records every status change in ``OUT/sweep.json`` and rewrites the summary after every run. A failed
run is recorded and the sweep goes on; a stop request stops the current run resumably and ends the sweep;
running it again resumes (completed runs are skipped, a stopped run continues from its checkpoint).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from .. import events as ev
from ..control import TrainingControl
from ..runs import RunFolder, RunLock
from ..train.loop import train
from .plan import SweepPlan
from .plot import Series, draw_overlay
from .state import RunRecord, SweepState, open_state
from .summary import OVERLAY_PNG, run_labels, write_summary

SWEEP_LOG = "sweep.log"


@dataclass(frozen=True)
class SweepStarted(ev.Event):
    out_dir: Path
    total: int
    to_run: int  # combinations this call will run (the others are completed, or failed without a retry)


@dataclass(frozen=True)
class SweepRunStarted(ev.Event):
    index: int
    total: int
    run_dir: Path
    overrides: dict
    resumed: bool


@dataclass(frozen=True)
class SweepRunEnded(ev.Event):
    index: int
    status: str  # "completed" | "failed" | "stopped"
    message: str
    run_dir: Path
    seconds: float


@dataclass(frozen=True)
class SweepFinished(ev.Event):
    out_dir: Path
    reason: str  # "completed" (every combination had its turn) | "stopped"
    counts: dict


def run_sweep(plan: SweepPlan, out_dir: Path, control: TrainingControl | None = None, *,
              retry_failed: bool = False) -> Iterator[ev.Event]:
    """Run (or resume) a validated sweep into ``out_dir``.

    Raises UserError before any run when ``out_dir`` holds something else or is in use by another process.
    """
    control = control or TrainingControl()
    out_dir = out_dir.expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out_dir)  # one sweep process per folder; a dead owner's lock is taken over
    lock.acquire()
    try:
        state = open_state(plan, out_dir)
        todo = [r for r in state.records
                if r.status in ("pending", "stopped") or (r.status == "failed" and retry_failed)]
        _log(out_dir, f"sweep {plan.name}: {len(todo)} of {len(state.records)} combinations to run "
                      f"(retry failed: {retry_failed})")
        yield SweepStarted(out_dir, len(state.records), len(todo))
        yield from _outputs(state)
        reason = "completed"
        for record in todo:
            if control.stop_requested:
                reason = "stopped"
                break
            yield from _run_one(state, record, control)
            yield from _outputs(state)
            if record.status == "stopped":
                reason = "stopped"
                break
        _log(out_dir, f"sweep {reason}: {state.counts()}")
        yield SweepFinished(out_dir, reason, state.counts())
    finally:
        lock.release()


def _run_one(state: SweepState, record: RunRecord, control: TrainingControl) -> Iterator[ev.Event]:
    plan, out_dir = state.plan, state.out_dir
    combo = plan.combinations[record.index]
    resume = record.status == "stopped" and bool(record.run_dir) and _resumable(out_dir / record.run_dir)
    if not resume:
        record.run_dir = _fresh_folder(out_dir, combo.folder)
        record.folders.append(record.run_dir)
        record.steps = 0
    run_dir = out_dir / record.run_dir
    record.status, record.message = "running", ""
    record.attempts += 1
    state.save()
    _log(out_dir, f"[{record.index}] {'resuming' if resume else 'starting'} {record.run_dir}: {combo.describe()}")
    yield SweepRunStarted(record.index, len(state.records), run_dir, dict(combo.overrides), resume)

    status, message = "failed", "the training loop ended without a result"
    t0 = time.perf_counter()
    events: Generator[ev.Event, None, None] | None = None
    try:
        events = train(combo.config, control, run_dir=run_dir, resume=resume)
        for event in events:
            if isinstance(event, ev.Finished):
                # early stopping ends a combination as planned: completed, and the sweep goes on
                status = "completed" if event.reason in ("completed", "early_stopped") else "stopped"
                message = {"completed": "", "early_stopped": f"early-stopped at step {event.step}"}.get(
                    event.reason, f"stopped at step {event.step}")
                record.steps = event.step
            elif isinstance(event, ev.Failed):
                status, message = "failed", event.message
            yield event
    except Exception as exc:  # noqa: BLE001 - one broken combination must not end the sweep
        status, message = "failed", f"unexpected error: {type(exc).__name__}: {exc}"
        _log(out_dir, f"[{record.index}] {message}\n{traceback.format_exc()}")
    except BaseException:
        # Ctrl-C twice, or the consumer stopped iterating: keep the run resumable from its last checkpoint
        record.status, record.message = "stopped", "interrupted"
        record.seconds += time.perf_counter() - t0
        state.save()
        raise
    finally:
        if events is not None:
            events.close()
    record.status, record.message = status, message
    record.seconds += time.perf_counter() - t0
    if not run_dir.exists():  # bad input found before training began: the loop left no folder behind
        if record.run_dir in record.folders:
            record.folders.remove(record.run_dir)
        record.run_dir = ""
    state.save()
    _log(out_dir, f"[{record.index}] {status}{': ' + message if message else ''}")
    yield SweepRunEnded(record.index, status, message, run_dir, record.seconds)


def _resumable(run_dir: Path) -> bool:
    run = RunFolder(run_dir)
    return run.is_run() and run.newest_valid_checkpoint_or_none() is not None


def _fresh_folder(out_dir: Path, name: str) -> str:
    """``name``, or ``name-2``, ``name-3``... when an earlier attempt left its folder (kept for reference)."""
    candidate, n = name, 1
    while (out_dir / candidate).exists() and any((out_dir / candidate).iterdir()):
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def _outputs(state: SweepState) -> Iterator[ev.Event]:
    """Rewrite summary.csv/.json and overlay.png; a plot problem is a warning, never the end of the sweep."""
    _, curves = write_summary(state)
    shown = [r for r in state.records if (c := curves.get(r.index)) is not None and (c.train or c.val)]
    labels, notes = run_labels(shown, state.plan.keys)
    series = [Series(labels[r.index] + (" (failed)" if r.status == "failed" else ""), curves[r.index].train,
                     curves[r.index].val) for r in shown]
    try:
        draw_overlay(series, state.out_dir / OVERLAY_PNG, f"sweep {state.plan.name}: training and validation loss",
                     notes)
    except Exception as exc:  # noqa: BLE001
        _log(state.out_dir, f"could not draw {OVERLAY_PNG}: {exc}\n{traceback.format_exc()}")
        yield ev.Warning(f"could not draw {state.out_dir / OVERLAY_PNG} ({exc}); the summary is written")


def _log(out_dir: Path, text: str) -> None:
    try:
        with open(out_dir / SWEEP_LOG, "a", encoding="utf-8") as fh:
            fh.write(f"{datetime.now():%Y-%m-%d %H:%M:%S} {text}\n")
    except OSError:
        pass  # the log is a convenience; sweep.json holds the state
