"""A sweep that learns from finished runs: Optuna's TPE sampler draws each trial's values from the [search]
ranges, every validation of a run is reported to its trial at its step, and with ``prune = true`` a run whose
validation loss falls behind the others at the same step (Optuna's median rule, after ``startup_trials``
finished trials) is stopped there: ``pruned``.

The study lives in ``OUT/study.db`` (SQLite), so running the same sweep again resumes it: finished trials stay,
a trial that was running when the sweep was interrupted is continued from its run's checkpoint (its earlier
validations are reported again from metrics.jsonl). ``summary.json`` / ``summary.csv`` get one row per trial
with ``status`` ``completed``, ``pruned``, ``failed`` (or ``running`` / ``stopped`` while it is not over), plus
the parameter importances Optuna computes once enough trials completed."""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

from .. import events as ev
from ..atomic import write_text_atomic
from ..control import TrainingControl
from ..errors import UserError
from ..runs import RunCurves, RunFolder, RunLock
from ..train.loop import train
from .plan import SweepPlan, run_folder_name
from .runner import SweepFinished, SweepRunEnded, SweepRunStarted, SweepStarted, _log
from .state import RunRecord
from .summary import METRIC_COLUMNS, SUMMARY_CSV, SUMMARY_JSON, _csv_cell, summary_row

STUDY_FILE = "study.db"
RUN_DIR_ATTR = "run_dir"
MISSING = "Optuna is not installed: `pip install sdstudio[search]` (or `pip install optuna`) for [search] sweeps"


def require_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise UserError(MISSING) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def open_study(plan: SweepPlan, out_dir: Path) -> Any:
    optuna = require_optuna()
    assert plan.search is not None
    settings = plan.search
    sampler = optuna.samplers.TPESampler(seed=settings["seed"])
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=settings["startup_trials"], n_warmup_steps=0)
              if settings["prune"] else optuna.pruners.NopPruner())
    storage = f"sqlite:///{(out_dir / STUDY_FILE).as_posix()}"
    return optuna.create_study(study_name=plan.name, storage=storage, sampler=sampler, pruner=pruner,
                               direction="minimize", load_if_exists=True)


def _suggest(trial: Any, key: str, spec: Any) -> Any:
    if isinstance(spec, list):
        # Optuna's choices must be plain values: lists (e.g. prompts) travel as JSON text
        choices = [json.dumps(v) if isinstance(v, (list, dict)) else v for v in spec]
        return spec[choices.index(trial.suggest_categorical(key, choices))]
    low, high, log = spec["min"], spec["max"], spec.get("log", False)
    if isinstance(low, int) and isinstance(high, int):
        return trial.suggest_int(key, low, high, log=log)
    return trial.suggest_float(key, float(low), float(high), log=log)


def run_search(plan: SweepPlan, out_dir: Path, control: TrainingControl | None = None) -> Iterator[ev.Event]:
    """Run (or resume) a [search] sweep into ``out_dir``: ``trials`` trials in all, counting the finished ones."""
    optuna = require_optuna()
    control = control or TrainingControl()
    out_dir = out_dir.expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out_dir)
    lock.acquire()
    try:
        study = open_study(plan, out_dir)
        assert plan.search is not None and plan.ranges is not None
        total = plan.search["trials"]
        states = optuna.trial.TrialState
        interrupted = [t for t in study.trials if t.state == states.RUNNING]
        finished = _finished(study)
        to_run = max(0, total - len(finished))
        _log(out_dir, f"search {plan.name}: {len(finished)} of {total} trials finished, {to_run} to run")
        yield SweepStarted(out_dir, total, to_run)
        _write_summary(plan, out_dir, study)
        reason = "completed"
        while len(_finished(study)) < total:
            if control.stop_requested:
                reason = "stopped"
                break
            if interrupted:
                old = interrupted.pop(0)
                trial, run_dir, resume = _continue(study, old, out_dir)
            else:
                trial = study.ask()
                run_dir, resume = None, False
            status = yield from _run_trial(plan, study, trial, out_dir, control, run_dir, resume)
            _write_summary(plan, out_dir, study)
            if status == "stopped":
                reason = "stopped"
                break
        counts = _counts(study)
        _log(out_dir, f"search {reason}: {counts}")
        yield SweepFinished(out_dir, reason, counts)
    finally:
        lock.release()


def _finished(study: Any) -> list[Any]:
    """The finished trials that count towards ``trials``: an interrupted trial closed as failed because another
    continues its run does not (else every interruption would cost the search one of its trials)."""
    continued = {t.user_attrs.get("continues") for t in study.trials}
    return [t for t in study.trials if t.state.is_finished() and t.number not in continued]


def _continue(study: Any, old: Any, out_dir: Path) -> tuple[Any, Path | None, bool]:
    """A trial left RUNNING by an interrupted sweep: closed as failed in the study, its values asked again by a new
    trial that continues the same run folder from its checkpoint (when it has one)."""
    optuna = require_optuna()
    run_dir = old.user_attrs.get(RUN_DIR_ATTR)
    study.tell(old.number, state=optuna.trial.TrialState.FAIL)
    study.enqueue_trial(old.params, user_attrs={"continues": old.number})
    trial = study.ask()
    if run_dir and RunFolder(out_dir / run_dir).newest_valid_checkpoint_or_none() is not None:
        return trial, out_dir / run_dir, True
    return trial, None, False


def _run_trial(plan: SweepPlan, study: Any, trial: Any, out_dir: Path, control: TrainingControl,
               run_dir: Path | None, resume: bool) -> Generator[ev.Event, None, str]:
    optuna = require_optuna()
    assert plan.ranges is not None and plan.search is not None
    overrides = {key: _suggest(trial, key, spec) for key, spec in plan.ranges.items()}
    if run_dir is None:
        run_dir = out_dir / run_folder_name(trial.number, max(plan.search["trials"], trial.number + 1), overrides)
    trial.set_user_attr(RUN_DIR_ATTR, run_dir.name)
    trial.set_user_attr("overrides", overrides)
    t0 = time.perf_counter()
    yield SweepRunStarted(trial.number, plan.search["trials"], run_dir, dict(overrides), resume)
    try:
        config = plan.trial_config(overrides, trial.number)
    except UserError as exc:
        trial.set_user_attr("message", str(exc))
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        yield SweepRunEnded(trial.number, "failed", str(exc), run_dir, 0.0)
        return "failed"
    if resume:  # the validations before the checkpoint: reported again so pruning compares like with like
        for step, value in RunFolder(run_dir).curves().val:
            trial.report(value, step)
    status, message, best = "failed", "the training loop ended without a result", None
    events = train(config, control, run_dir=run_dir, resume=resume)
    try:
        for event in events:
            yield event
            if isinstance(event, ev.ValidationResult):
                best = event.val_loss if best is None else min(best, event.val_loss)
                trial.report(event.val_loss, event.step)
                if trial.should_prune():
                    status = "pruned"
                    message = (f"pruned at step {event.step}: validation loss {event.val_loss:.5f} behind the "
                               "median of the other trials at this step")
                    break
            elif isinstance(event, ev.Finished):
                status = "completed" if event.reason in ("completed", "early_stopped") else "stopped"
                message = "" if status == "completed" else f"stopped at step {event.step}"
            elif isinstance(event, ev.Failed):
                status, message = "failed", event.message
    finally:
        events.close()  # a pruned run ends here: the loop's finally releases its lock and log
    seconds = time.perf_counter() - t0
    trial.set_user_attr("seconds", seconds)
    if message:
        trial.set_user_attr("message", message)
    if status == "completed" and best is not None:
        study.tell(trial, best)
    elif status == "completed":
        status, message = "failed", "no validation loss (the search needs validation images: data.val_split)"
        trial.set_user_attr("message", message)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    elif status == "pruned":
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    elif status == "failed":
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    # "stopped": the trial stays RUNNING in the study, and the next call continues its run from the checkpoint
    _log(out_dir, f"[trial {trial.number}] {status}{': ' + message if message else ''}")
    yield SweepRunEnded(trial.number, status, message, run_dir, seconds)
    return status


def _status(trial: Any) -> str:
    name = trial.state.name
    return {"COMPLETE": "completed", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running",
            "WAITING": "pending"}.get(name, name.lower())


def _counts(study: Any) -> dict[str, int]:
    counts = {"completed": 0, "pruned": 0, "failed": 0, "running": 0}
    for trial in study.trials:
        status = _status(trial)
        counts[status] = counts.get(status, 0) + 1
    return counts


def importances(study: Any) -> dict[str, float]:
    """Optuna's parameter importances (fANOVA by default) once two trials completed; {} before, or when it cannot."""
    optuna = require_optuna()
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(completed) < 2:
        return {}
    try:
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except Exception as exc:  # noqa: BLE001 - e.g. every completed trial drew the same values
        logging.getLogger("sdstudio").info("no parameter importances yet: %s", exc)
        return {}


def _write_summary(plan: SweepPlan, out_dir: Path, study: Any) -> list[dict[str, Any]]:
    rows = []
    continued = {int(t.user_attrs["continues"]): t.number for t in study.trials if "continues" in t.user_attrs}
    for trial in study.trials:
        run_dir = str(trial.user_attrs.get(RUN_DIR_ATTR, ""))
        overrides = dict(trial.user_attrs.get("overrides") or trial.params)
        record = RunRecord(trial.number, overrides, "", status=_status(trial),
                           message=str(trial.user_attrs.get("message", "")), run_dir=run_dir,
                           seconds=float(trial.user_attrs.get("seconds", 0.0)))
        folder = out_dir / run_dir if run_dir else None
        curves = RunFolder(folder).curves() if folder is not None and folder.is_dir() else RunCurves()
        row = summary_row(record, plan.keys, curves)
        row["trial"] = trial.number
        if trial.number in continued:
            row["message"] = f"interrupted; continued in the same folder by trial {continued[trial.number]}"
        rows.append(row)
    columns = ["index", "run_dir", "status", "message", *plan.keys, *METRIC_COLUMNS]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_cell(row.get(k)) for k in columns})
    write_text_atomic(out_dir / SUMMARY_CSV, buf.getvalue())
    done = [r for r in rows if r["status"] == "completed" and r["best_val_loss"] is not None]
    best = min(done, key=lambda r: r["best_val_loss"]) if done else None
    data = {"name": plan.name, "sweep_file": str(plan.path.resolve()), "base": plan.base, "mode": "search",
            "search": plan.search, "fixed": plan.fixed, "keys": plan.keys, "study": STUDY_FILE,
            "counts": _counts(study), "importances": importances(study),
            "best": None if best is None else {"index": best["index"], "run_dir": best["run_dir"],
                                               "best_val_loss": best["best_val_loss"]},
            "columns": columns, "rows": rows}
    write_text_atomic(out_dir / SUMMARY_JSON, json.dumps(data, indent=1) + "\n")
    return rows
