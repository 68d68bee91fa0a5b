"""[search] sweeps: Optuna TPE with a seed, pruning of runs that fall behind at the same step, the study in
OUT/study.db (an interrupted sweep resumes), summary rows completed / pruned / failed, importances."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
seed = 0
startup_trials = 1
"train.learning_rate" = [3e-3, 1e-9]
"""


def _events(plan, out: Path, control=None) -> list:
    from sdstudio.core.sweeps.search import run_search

    return list(run_search(plan, out, control))


@pytest.fixture
def fake_train(monkeypatch):
    """The search's training loop replaced by a stand-in: validation losses at steps 2 and 4 that depend on the
    learning rate (1e-9 does not learn), metrics.jsonl rows and checkpoints as a run writes them. ``stop_at``:
    the step at which the next run stops (as after Ctrl-C)."""
    from sdstudio.core import events as ev
    from sdstudio.core.runs import RunFolder
    from sdstudio.core.runs.checkpoints import FORMAT, MANIFEST
    from sdstudio.core.sweeps import search

    calls: dict = {"resumed": [], "stop_at": None}

    def train(config, control, *, run_dir: Path, resume: bool):
        folder = RunFolder(run_dir)
        if not resume:
            folder.create()
        calls["resumed"].append(resume)
        start = max((int(p.name.split("-")[1]) for p in folder.checkpoints()), default=0)
        lr = config.train.learning_rate
        for step in (2, 4):
            if step <= start:
                continue
            val = 0.5 / step if lr > 1e-6 else 1.0
            with open(folder.metrics_file, "a") as fh:
                fh.write(json.dumps({"kind": "val", "step": step, "epoch": 0, "time": 0.0, "val_loss": val}) + "\n")
            yield ev.ValidationResult(step, 0, val, {})
            ckpt = folder.checkpoint_dir(step)
            ckpt.mkdir(parents=True, exist_ok=True)
            (ckpt / MANIFEST).write_text(json.dumps({"format": FORMAT, "step": step, "files": {}}))
            if calls["stop_at"] == step:
                calls["stop_at"] = None
                yield ev.Finished(run_dir, "stopped", step)
                return
        yield ev.Finished(run_dir, "completed", 4)

    monkeypatch.setattr(search, "train", train)
    return calls


def test_search_prunes_a_run_behind_at_the_same_step_and_resumes(base_toml: Path, tmp_path: Path,  # noqa: F811
                                                                  fake_train) -> None:
    plan = load_sweep(sweep_file(tmp_path, SEARCH.format(trials=4)))
    assert plan.mode == "search" and plan.combinations == [] and plan.search["trials"] == 4
    out = tmp_path / "out"
    events = _events(plan, out)
    ended = [e for e in events if isinstance(e, SweepRunEnded)]
    assert len(ended) == 4 and (out / "study.db").is_file()
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["rows"]
    assert {r["status"] for r in rows} <= {"completed", "pruned", "failed"}
    # runs that learn complete; only runs behind at step 2 (the rate that does not learn) are pruned there
    for row in rows:
        if row["train.learning_rate"] == 3e-3:
            assert row["status"] == "completed" and row["steps"] == 4
        if row["status"] == "pruned":
            assert row["train.learning_rate"] == 1e-9 and row["steps"] == 2 and "pruned at step 2" in row["message"]
    assert "pruned" in {r["status"] for r in rows} and "completed" in {r["status"] for r in rows}
    assert summary["mode"] == "search" and summary["best"]["best_val_loss"] == 0.125
    assert isinstance(summary["importances"], dict)
    # the same seed draws the same values
    other = tmp_path / "other"
    _events(plan, other)
    again_rows = json.loads((other / "summary.json").read_text())["rows"]
    assert [r["train.learning_rate"] for r in again_rows] == [r["train.learning_rate"] for r in rows]

    # the study resumes: asking for 5 trials runs only the one missing
    more = load_sweep(sweep_file(tmp_path, SEARCH.format(trials=5)))
    events = _events(more, out)
    assert next(e for e in events if isinstance(e, SweepStarted)).to_run == 1
    assert len([e for e in events if isinstance(e, SweepRunEnded)]) == 1
    assert len(json.loads((out / "summary.json").read_text())["rows"]) == 5


def test_a_stopped_search_continues_its_trial_from_the_checkpoint(base_toml: Path, tmp_path: Path,  # noqa: F811
                                                                  fake_train) -> None:
    plan = load_sweep(sweep_file(tmp_path, SEARCH.format(trials=1)))
    out = tmp_path / "out"
    fake_train["stop_at"] = 2
    first = _events(plan, out)
    assert next(e for e in first if isinstance(e, SweepFinished)).reason == "stopped"
    events = _events(plan, out)
    started = [e for e in events if type(e).__name__ == "SweepRunStarted"]
    assert len(started) == 1 and started[0].resumed and fake_train["resumed"] == [False, True]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["status"] for r in summary["rows"]] == ["failed", "completed"]  # the interrupted trial, its continuation
    assert "continued in the same folder by trial 1" in summary["rows"][0]["message"]
    assert summary["rows"][1]["run_dir"] == summary["rows"][0]["run_dir"]
    assert summary["rows"][0]["train.learning_rate"] == summary["rows"][1]["train.learning_rate"]


@pytest.mark.slow
def test_search_trains_real_runs(base_toml: Path, tmp_path: Path) -> None:  # noqa: F811
    plan = load_sweep(sweep_file(tmp_path, SEARCH.format(trials=2)))
    out = tmp_path / "out"
    _events(plan, out)
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert len(rows) == 2 and all(r["status"] in ("completed", "pruned") for r in rows)
    assert all((out / r["run_dir"] / "metrics.jsonl").is_file() for r in rows)


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
    assert "search: tpe, 2 trials, prune true, seed 0" in out and "study.db" in out


@pytest.mark.slow
def test_a_real_three_trial_search_prunes_and_its_study_resumes(base_toml: Path, tmp_path: Path) -> None:  # noqa: F811
    """Real training (the tiny pixel model, 4 steps, validation at 2 and 4): 3 TPE trials with pruning, the second
    stopped mid-run (as Ctrl-C does) and the search run again: the study in study.db continues that trial from its
    checkpoint and runs the last one; summary.json says completed / pruned."""
    from sdstudio.core import events as ev
    from sdstudio.core.control import TrainingControl
    from sdstudio.core.sweeps.runner import SweepRunStarted

    fast = '[set]\n"train.threads" = 1\n"sample.at_end" = false\n"eval.memorisation" = false\n'
    plan = load_sweep(sweep_file(tmp_path, SEARCH.format(trials=3).replace("[search]", fast + "[search]")))
    out = tmp_path / "out"
    control = TrainingControl()
    first: list = []
    trial = -1
    from sdstudio.core.sweeps.search import run_search

    for event in run_search(plan, out, control):
        first.append(event)
        if isinstance(event, SweepRunStarted):
            trial = event.index
        if trial == 1 and isinstance(event, ev.ValidationResult) and event.step == 2:
            control.request_stop()
    assert next(e for e in first if isinstance(e, SweepFinished)).reason == "stopped"
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert [r["status"] for r in rows][:1] in (["completed"], ["pruned"]) and rows[1]["status"] in ("stopped",
                                                                                                    "running")
    assert (out / "study.db").is_file()

    again = _events(plan, out)
    started = next(e for e in again if isinstance(e, SweepStarted))
    assert started.total == 3 and started.to_run == 2
    runs = [e for e in again if isinstance(e, SweepRunStarted)]
    assert len(runs) == 2 and runs[0].resumed and runs[0].run_dir.name == rows[1]["run_dir"]  # from its checkpoint
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["rows"]
    # the interrupted trial (failed, continued by another in its folder) does not count towards the 3 trials
    assert [r["status"] for r in rows][1] == "failed" and "continued in the same folder" in rows[1]["message"]
    rows = [r for i, r in enumerate(rows) if i != 1]
    assert len(rows) == 3 and {r["status"] for r in rows} <= {"completed", "pruned"}
    assert "completed" in {r["status"] for r in rows}
    for row in rows:
        assert row["steps"] == (4 if row["status"] == "completed" else 2)
        assert (out / row["run_dir"] / "metrics.jsonl").is_file()
    assert next(e for e in again if isinstance(e, SweepFinished)).reason == "completed"
    # finished: running it once more trains nothing
    assert next(e for e in _events(plan, out) if isinstance(e, SweepStarted)).to_run == 0
