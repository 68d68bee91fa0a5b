"""[search] sweeps: Optuna TPE with a seed, pruning of runs that fall behind at the same step, the study in
OUT/study.db (an interrupted sweep resumes), summary rows completed / pruned / failed, importances."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdstudio.core.control import TrainingControl
from sdstudio.core.errors import UserError
from sdstudio.core.sweeps.plan import load_sweep
from sdstudio.core.sweeps.runner import SweepFinished, SweepRunEnded, SweepStarted
from tests.test_sweep import base_toml, cli, sweep_file  # noqa: F401 - the fixture

optuna = pytest.importorskip("optuna", reason="the search extra (optuna) is not installed")

SEARCH = """name = "s"
[search]
method = "tpe"
trials = {trials}
prune = true
seed = 3
startup_trials = 1
"train.learning_rate" = [3e-3, 1e-9]
"""


def _events(plan, out: Path, control=None) -> list:
    from sdstudio.core.sweeps.search import run_search

    return list(run_search(plan, out, control))


def test_search_prunes_a_run_behind_at_the_same_step_and_resumes(base_toml: Path, tmp_path: Path) -> None:  # noqa: F811
    plan = load_sweep(sweep_file(tmp_path, SEARCH.format(trials=4)))
    assert plan.mode == "search" and plan.combinations == [] and plan.search["trials"] == 4
    out = tmp_path / "out"
    events = _events(plan, out)
    ended = [e for e in events if isinstance(e, SweepRunEnded)]
    assert len(ended) == 4 and (out / "study.db").is_file()
    summary = json.loads((out / "summary.json").read_text())
    statuses = [r["status"] for r in summary["rows"]]
    assert set(statuses) <= {"completed", "pruned", "failed"} and "pruned" in statuses and "completed" in statuses
    pruned = next(r for r in summary["rows"] if r["status"] == "pruned")
    assert pruned["train.learning_rate"] == 1e-9 and pruned["steps"] < 4 and "pruned at step" in pruned["message"]
    assert summary["mode"] == "search" and summary["best"]["best_val_loss"] is not None
    assert isinstance(summary["importances"], dict)

    # the study resumes: asking for 5 trials runs only the one missing
    again = load_sweep(sweep_file(tmp_path, SEARCH.format(trials=5)))
    events = _events(again, out)
    assert next(e for e in events if isinstance(e, SweepStarted)).to_run == 1
    assert len([e for e in events if isinstance(e, SweepRunEnded)]) == 1
    assert len(json.loads((out / "summary.json").read_text())["rows"]) == 5


def test_a_stopped_search_continues_its_trial_from_the_checkpoint(base_toml: Path, tmp_path: Path) -> None:  # noqa: F811
    from sdstudio.core import events as ev

    plan = load_sweep(sweep_file(tmp_path, SEARCH.format(trials=1)))
    out = tmp_path / "out"
    control = TrainingControl()
    from sdstudio.core.sweeps.search import run_search

    seen = []
    for event in run_search(plan, out, control):
        seen.append(event)
        if isinstance(event, ev.CheckpointSaved) and event.step == 2:
            control.request_stop()
    assert next(e for e in seen if isinstance(e, SweepFinished)).reason == "stopped"
    events = _events(plan, out)
    started = [e for e in events if type(e).__name__ == "SweepRunStarted"]
    assert len(started) == 1 and started[0].resumed
    summary = json.loads((out / "summary.json").read_text())
    assert [r["status"] for r in summary["rows"]] == ["failed", "completed"]  # the interrupted trial, its continuation
    assert "continued in the same folder by trial 1" in summary["rows"][0]["message"]
    assert summary["rows"][1]["run_dir"] == summary["rows"][0]["run_dir"]


def test_search_file_errors(base_toml: Path, tmp_path: Path) -> None:  # noqa: F811
    with pytest.raises(UserError, match=r"\[search\] method = 'grid'"):
        load_sweep(sweep_file(tmp_path, '[search]\nmethod = "grid"\ntrials = 2\n"train.learning_rate" = [1e-3]\n'))
    with pytest.raises(UserError, match=r"\[search\] trials"):
        load_sweep(sweep_file(tmp_path, '[search]\n"train.learning_rate" = [1e-3]\n'))
    with pytest.raises(UserError, match="log range needs min > 0"):
        load_sweep(sweep_file(tmp_path, '[search]\ntrials = 2\n"train.learning_rate" = {min = 0, max = 1, log = true}\n'))


def test_cli_search_dry_run(base_toml: Path, tmp_path: Path, capsys) -> None:  # noqa: F811
    path = sweep_file(tmp_path, SEARCH.format(trials=2))
    assert cli(["sweep", str(path), "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "search: tpe, 2 trials, prune true, seed 3" in out and "study.db" in out
