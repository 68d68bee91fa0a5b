"""Sweeps: a grid or random search run as normal runs, failures survived, stop and resume, the summary."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import signal
from pathlib import Path

import pytest
from PIL import Image

from sdstudio.core import events as ev
from sdstudio.core.control import TrainingControl
from sdstudio.core.errors import UserError
from sdstudio.core.presets import write_toml_atomic
from sdstudio.core.runs import is_run_dir, read_metrics
from sdstudio.core.sweeps import runner as sweep_run
from sdstudio.core.sweeps.plan import load_sweep, parse_sweep, run_folder_name
from sdstudio.core.sweeps.plot import Series, render_overlay, y_axis
from sdstudio.core.sweeps.runner import SweepFinished, SweepRunEnded, SweepRunStarted, SweepStarted, run_sweep
from sdstudio.core.sweeps.state import open_state
from sdstudio.core.sweeps.summary import write_summary
from sdstudio.core.train.session import TrainingSession
from tests.conftest import TINY_OVERRIDES


@pytest.fixture
def base_toml(tmp_path: Path, tiny_dataset: Path) -> Path:
    """The tiny config as a base_config file: 4 steps, a checkpoint every 2, validation every 2."""
    nested: dict = {}
    flat = {**TINY_OVERRIDES, "data.path": str(tiny_dataset), "train.max_steps": 4,
            "checkpoint.every_steps": 2, "train.val_every_steps": 2}
    for key, value in flat.items():
        section, name = key.split(".")
        nested.setdefault(section, {})[name] = value
    path = tmp_path / "base.toml"
    write_toml_atomic(path, nested)
    return path


def sweep_file(folder: Path, body: str, name: str = "sweep.toml") -> Path:
    path = folder / name
    path.write_text('base_config = "base.toml"\n' + body, encoding="utf-8")
    return path


def cli(argv: list[str]) -> int:
    """`sdstudio sweep ...` through the real entry point once registered, else through this module alone."""
    from sdstudio.cli import build_parser, main

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "sweep" in sub.choices:
        return main(argv)
    from sdstudio.cli import sweep as sweep_cli

    own = argparse.ArgumentParser(prog="sdstudio")
    sweep_cli.register(own.add_subparsers())
    args = own.parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        import sys

        print(f"sdstudio: {exc}", file=sys.stderr)
        return 2


def drain(events, on_event=None) -> list[ev.Event]:
    out = []
    for event in events:
        out.append(event)
        if on_event is not None:
            on_event(event)
    return out


def statuses(out: Path) -> list[str]:
    return [r["status"] for r in json.loads((out / "sweep.json").read_text())["runs"]]


def test_grid_2x2_runs_four_runs_and_writes_the_summaries(tmp_path: Path, base_toml: Path, capsys) -> None:
    path = sweep_file(tmp_path, '[grid]\n"train.learning_rate" = [1e-3, 3e-3]\n"train.batch_size" = [2, 4]\n')
    out = tmp_path / "out"
    assert cli(["sweep", str(path), "--out", str(out), "--quiet"]) == 0
    runs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert runs == ["00-lr1e-3_bs2", "01-lr1e-3_bs4", "02-lr3e-3_bs2", "03-lr3e-3_bs4"]
    assert all(is_run_dir(out / r) for r in runs)
    with open(out / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4
    assert list(rows[0]) == ["index", "run_dir", "status", "message", "train.learning_rate", "train.batch_size",
                             "best_val_loss", "final_val_loss", "final_loss", "steps", "seconds", "best_fid",
                             "final_fid", "best_kid", "final_kid", "final_kid_std"]
    assert [(r["train.learning_rate"], r["train.batch_size"]) for r in rows] == [
        ("0.001", "2"), ("0.001", "4"), ("0.003", "2"), ("0.003", "4")]
    for row in rows:
        assert row["status"] == "completed" and row["steps"] == "4"
        assert row["final_fid"] == row["best_kid"] == "", "FID/KID off: empty cells"
        assert float(row["best_val_loss"]) <= float(row["final_val_loss"]) and float(row["final_loss"]) > 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["rows"]) == 4 and summary["counts"]["completed"] == 4
    assert summary["best"]["index"] in range(4)
    with Image.open(out / "overlay.png") as img:
        assert img.size == (1200, 720)
    # a real run folder: the config carries the combination, the metrics have validation rows
    cfg = (out / runs[3] / "config.toml").read_text()
    assert "learning_rate = 0.003" in cfg and "batch_size = 4" in cfg
    assert any(r["kind"] == "val" for r in read_metrics(out / runs[3] / "metrics.jsonl"))
    err = capsys.readouterr().err
    assert "summary:" in err and "4 completed" in err


def test_a_failing_combination_is_marked_and_the_others_complete(tmp_path: Path, base_toml: Path,
                                                                 monkeypatch) -> None:
    path = sweep_file(tmp_path, '[grid]\n"train.learning_rate" = [1e-3, 5e-3, 2e-3]\n')
    plan = load_sweep(path)
    original_loss = TrainingSession.compute_loss
    original_train = sweep_run.train

    def nan_for_a_huge_rate(self, batch, micro):
        loss = original_loss(self, batch, micro)
        return loss * float("nan") if self.config.train.learning_rate == 5e-3 else loss

    def broken_for_one(config, control=None, **kw):
        if config.train.learning_rate == 2e-3:
            raise RuntimeError("injected failure")
        return original_train(config, control, **kw)

    monkeypatch.setattr(TrainingSession, "compute_loss", nan_for_a_huge_rate)
    monkeypatch.setattr(sweep_run, "train", broken_for_one)
    out = tmp_path / "out"
    events = drain(run_sweep(plan, out))
    ended = {e.index: e for e in events if isinstance(e, SweepRunEnded)}
    assert [ended[i].status for i in range(3)] == ["completed", "failed", "failed"]
    assert "learning rate" in ended[1].message  # the loop's NaN advice reaches the summary
    assert "RuntimeError: injected failure" in ended[2].message
    assert isinstance(events[-1], SweepFinished) and events[-1].reason == "completed"
    summary = json.loads((out / "summary.json").read_text())
    assert [r["status"] for r in summary["rows"]] == ["completed", "failed", "failed"]
    assert "learning rate" in summary["rows"][1]["message"]
    assert "injected failure" in (out / "sweep.log").read_text()

    # again: failed runs stay failed; with --retry-failed they rerun (here fixed) in fresh folders
    events = drain(run_sweep(plan, out))
    assert next(e for e in events if isinstance(e, SweepStarted)).to_run == 0
    monkeypatch.setattr(TrainingSession, "compute_loss", original_loss)
    monkeypatch.setattr(sweep_run, "train", original_train)
    events = drain(run_sweep(plan, out, retry_failed=True))
    assert [e.index for e in events if isinstance(e, SweepRunStarted)] == [1, 2]
    assert statuses(out) == ["completed"] * 3
    state = json.loads((out / "sweep.json").read_text())["runs"]
    assert state[1]["run_dir"] == "01-lr5e-3-2" and state[1]["attempts"] == 2
    assert (out / "01-lr5e-3").is_dir(), "the failed attempt's folder is kept"


def test_a_run_time_input_error_is_a_failed_combination_and_all_failed_exits_1(tmp_path: Path, base_toml: Path,
                                                                                 capsys) -> None:
    path = sweep_file(tmp_path, '[grid]\n"train.batch_size" = [64]\n')  # valid config, more than the 19 images
    out = tmp_path / "out"
    assert cli(["sweep", str(path), "--out", str(out), "--quiet"]) == 1
    assert "failed" in capsys.readouterr().err
    row = json.loads((out / "summary.json").read_text())["rows"][0]
    assert row["status"] == "failed" and "batch" in row["message"] and row["run_dir"] == ""
    assert not (out / "00-bs64").exists()


def test_ctrl_c_then_resume_skips_completed_runs_and_continues_the_stopped_one(tmp_path: Path, base_toml: Path,
                                                                                monkeypatch, capsys) -> None:
    path = sweep_file(tmp_path, '[grid]\n"train.learning_rate" = [1e-3, 2e-3, 3e-3]\n')
    plan = load_sweep(path)
    out = tmp_path / "out"
    original_train = sweep_run.train

    def ctrl_c_in_second_run(config, control=None, *, run_dir, resume=False):
        for event in original_train(config, control, run_dir=run_dir, resume=resume):
            if isinstance(event, ev.StepMetrics) and run_dir.name.startswith("01-") and event.step == 3:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: the CLI's handler asks the loop to stop
            yield event

    monkeypatch.setattr(sweep_run, "train", ctrl_c_in_second_run)
    assert cli(["sweep", str(path), "--out", str(out), "--quiet"]) == 130
    assert "resume with: sdstudio sweep" in capsys.readouterr().err
    assert statuses(out) == ["completed", "stopped", "pending"]
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert len(rows) == 3 and rows[1]["steps"] == 3 and rows[2]["run_dir"] == ""
    first_metrics = (out / "00-lr1e-3" / "metrics.jsonl").stat().st_mtime_ns

    # as if the sweep process had been killed during run 1: status "running" and a stale sweep lock
    state = json.loads((out / "sweep.json").read_text())
    state["runs"][1]["status"] = "running"
    (out / "sweep.json").write_text(json.dumps(state))
    (out / "lock").write_text("4194000")

    started = []
    monkeypatch.setattr(sweep_run, "train", _spy(original_train, started))
    events = drain(run_sweep(plan, out, TrainingControl()))
    assert next(e for e in events if isinstance(e, SweepStarted)).to_run == 2
    assert [(e.index, e.resumed) for e in events if isinstance(e, SweepRunStarted)] == [(1, True), (2, False)]
    assert started == [(out / "01-lr2e-3", True), (out / "02-lr3e-3", False)]
    assert next(e for e in events if isinstance(e, ev.Started)).resumed_from_step == 3
    assert statuses(out) == ["completed"] * 3
    assert (out / "00-lr1e-3" / "metrics.jsonl").stat().st_mtime_ns == first_metrics, "run 0 was not rerun"
    steps = [r["step"] for r in read_metrics(out / "01-lr2e-3" / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4]
    assert not (out / "lock").exists()

    # the same folder with a different sweep is refused before anything runs
    other = sweep_file(tmp_path, '[grid]\n"train.learning_rate" = [1e-3, 4e-3]\n', name="other.toml")
    with pytest.raises(UserError, match="holds a different sweep"):
        drain(run_sweep(load_sweep(other), out))


def _spy(train, calls: list):
    def spy(config, control=None, *, run_dir, resume=False):
        calls.append((run_dir, resume))
        return train(config, control, run_dir=run_dir, resume=resume)
    return spy


def test_random_search_is_reproducible_for_a_seed(tmp_path: Path, base_toml: Path, capsys) -> None:
    body = ('[random]\nsamples = 6\nseed = {seed}\n'
            '"train.learning_rate" = {{ min = 1e-5, max = 1e-2, log = true }}\n'
            '"train.batch_size" = [2, 4, 8]\n'
            '[random.train]\nwarmup_steps = {{ min = 0, max = 20 }}\n')
    plans = [load_sweep(sweep_file(tmp_path, body.format(seed=s), f"r{i}.toml")) for i, s in enumerate((7, 7, 8))]
    draws = [[c.overrides for c in p.combinations] for p in plans]
    assert draws[0] == draws[1] and draws[0] != draws[2]
    assert len(draws[0]) == 6 and len({json.dumps(d, sort_keys=True) for d in draws[0]}) == 6
    for combo in draws[0]:
        assert 1e-5 <= combo["train.learning_rate"] <= 1e-2
        assert combo["train.batch_size"] in (2, 4, 8)
        assert isinstance(combo["train.warmup_steps"], int) and 0 <= combo["train.warmup_steps"] <= 20
    assert plans[0].keys == ["train.learning_rate", "train.batch_size", "train.warmup_steps"]
    assert [c.config.train.batch_size for c in plans[0].combinations] == [d["train.batch_size"] for d in draws[0]]
    # log-uniform: the draws spread over the decades rather than crowding the top one
    assert min(math.log10(d["train.learning_rate"]) for d in draws[0]) < -3
    assert cli(["sweep", str(tmp_path / "r0.toml"), "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert "6 combinations" in listing and plans[0].combinations[5].folder in listing
    # a space smaller than the samples gives each combination once
    small = load_sweep(sweep_file(tmp_path, '[random]\nsamples = 10\n"train.batch_size" = [2, 4]\n', "s.toml"))
    assert sorted(c.overrides["train.batch_size"] for c in small.combinations) == [2, 4]


@pytest.mark.parametrize("body, fragments", [
    ('[grid]\n"train.learnin_rate" = [1e-4]\n', ["train.learnin_rate", "did you mean 'train.learning_rate'"]),
    ('[set]\n"model.colour" = 3\n[grid]\n"train.seed" = [1, 2]\n', ["[set]", "model.colour"]),
    ('[grid]\n"train.learning_rate" = [1e-3, 2.0]\n', ["combination 1", "train.learning_rate = 2.0"]),
    ('[grid]\n"train.batch_size" = 4\n', ["train.batch_size", "list"]),
    ('[random]\nsamples = 2\n"train.learning_rate" = { min = 0, max = 1e-3, log = true }\n',
     ["train.learning_rate", "min > 0"]),
    ('[grid]\n"train.seed" = [1]\n[random]\nsamples = 1\n', ["either"]),
    ('[random]\nsamples = 2\n"train.learning_rate" = { min = 1e-5, mx = 1e-3 }\n', ["unknown range key 'mx'"]),
    ('[set]\n"train.learning_rate" = 1e-3\n[grid]\n"train.learning_rate" = [1e-3]\n', ["both in [set]"]),
    ('grid_search = 1\n', ["unknown key 'grid_search'"]),
])
def test_a_bad_sweep_file_is_rejected_before_any_run(tmp_path: Path, base_toml: Path, monkeypatch, capsys,
                                                     body: str, fragments: list[str]) -> None:
    def no_training(*args, **kwargs):
        raise AssertionError("no run may start")

    monkeypatch.setattr(sweep_run, "train", no_training)
    path = sweep_file(tmp_path, body)
    out = tmp_path / "out"
    assert cli(["sweep", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err
    assert not out.exists()


def test_a_truncated_metrics_line_does_not_break_the_summary(tmp_path: Path, base_toml: Path) -> None:
    plan = load_sweep(sweep_file(tmp_path, '[grid]\n"train.learning_rate" = [1e-3, 2e-3]\n'))
    out = tmp_path / "out"
    state = open_state(plan, out)
    record = state.records[0]
    record.status, record.run_dir, record.seconds = "completed", "00-lr1e-3", 12.34
    run = out / record.run_dir
    run.mkdir()
    losses = [1.0, 0.3, 0.1, 0.03, 0.02, 0.01, 0.005]
    lines = [json.dumps({"step": i + 1, "epoch": 0, "time": 0.0, "kind": "train", "loss": v})
             for i, v in enumerate(losses)]
    lines += [json.dumps({"step": 3, "epoch": 0, "time": 0.0, "kind": "val", "val_loss": 0.2}),
              json.dumps({"step": 3, "epoch": 0, "time": 0.0, "kind": "val", "fid": 90.5, "kid_mean": 0.04,
                          "kid_std": 0.01, "n_generated": 64, "n_real": 12, "fid_meaningful": False, "note": ""}),
              json.dumps({"step": 6, "epoch": 0, "time": 0.0, "kind": "val", "val_loss": 0.05}),
              json.dumps({"step": 6, "epoch": 0, "time": 0.0, "kind": "val", "fid": 80.25, "kid_mean": 0.05,
                          "kid_std": None, "note": "one subset"}),
              json.dumps({"step": 7, "epoch": 0, "time": 0.0, "kind": "val", "val_loss": 0.07}),
              json.dumps({"step": 7, "epoch": 0, "time": 0.0, "kind": "sample", "fid": 1.0})]  # not a val row
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 8, "epoch": 0, "kind": "tr')
    rows, curves = write_summary(state)
    assert rows[0]["best_val_loss"] == 0.05 and rows[0]["final_val_loss"] == 0.07
    assert rows[0]["final_loss"] == pytest.approx(sum(losses[-5:]) / 5)
    assert rows[0]["steps"] == 7 and rows[0]["seconds"] == 12.3
    assert (rows[0]["best_fid"], rows[0]["final_fid"]) == (80.25, 80.25)
    assert (rows[0]["best_kid"], rows[0]["final_kid"], rows[0]["final_kid_std"]) == (0.04, 0.05, None)
    assert [v for _, v in curves[0].val] == [0.2, 0.05, 0.07], "FID/KID rows (no val_loss) are not loss points"
    assert rows[1]["status"] == "pending" and rows[1]["best_val_loss"] is None and rows[1]["best_fid"] is None
    with open(out / "summary.csv", newline="") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert [(r["best_fid"], r["best_kid"], r["final_kid_std"]) for r in csv_rows] == [("80.25", "0.04", ""),
                                                                                        ("", "", "")]
    # values over more than a decade get a log axis; the chart renders with one run or none
    assert y_axis([v for _, v in curves[0].train]).log and not y_axis([0.5, 0.9]).log
    img = render_overlay([Series("0: learning_rate=1e-3", curves[0].train, curves[0].val)], "t")
    assert img.size == (1200, 720)
    assert render_overlay([], "empty").size == (1200, 720)


def test_folder_names_are_short_and_sorted(tmp_path: Path) -> None:
    assert run_folder_name(3, 12, {"train.learning_rate": 3e-4, "train.batch_size": 16}) == "03-lr3e-4_bs16"
    assert run_folder_name(0, 2, {"model.block_channels": [16, 32], "sample.sampler": "dpm++/2m"}) \
        == "00-bc16x32_samplerdpm-2m"
    assert run_folder_name(120, 200, {}) == "120"
    with pytest.raises(UserError, match="base_config"):
        parse_sweep({"base_config": "missing.toml", "grid": {"train.seed": [1]}}, path=tmp_path / "s.toml")


def test_runs_that_compute_fid_and_kid_have_them_in_the_summary(tmp_path: Path, base_toml: Path) -> None:
    """A real sweep with FID/KID on (random Inception weights in the published layout): the columns are filled
    from the runs' metrics.jsonl and agree with the EvalResult events."""
    import torch

    from tests.fid_helpers import random_fid_state_dict

    weights = tmp_path / "inception.pth"
    torch.save(random_fid_state_dict(), weights)
    body = (f'[set]\n"eval.inception_weights" = "{weights.as_posix()}"\n"eval.fid_every_steps" = 2\n'
            '"eval.num_samples" = 4\n"eval.sampler_steps" = 2\n[grid]\n"train.learning_rate" = [1e-3]\n')
    plan = load_sweep(sweep_file(tmp_path, body))
    out = tmp_path / "out"
    events = drain(run_sweep(plan, out))
    fids = [e for e in events if isinstance(e, ev.EvalResult)]
    assert [e.step for e in fids] == [2, 4]
    with open(out / "summary.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["status"] == "completed" and row["best_val_loss"] != ""
    assert float(row["final_fid"]) == fids[-1].fid and float(row["best_fid"]) == min(e.fid for e in fids)
    assert float(row["final_kid"]) == fids[-1].kid_mean
    assert float(row["best_kid"]) == min(e.kid_mean for e in fids)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"][0]["final_fid"] == fids[-1].fid and summary["best"]["index"] == 0


def test_an_early_stopped_combination_counts_as_completed_and_the_sweep_goes_on(tmp_path: Path,
                                                                                 base_toml: Path) -> None:
    """Early stopping ends a run as planned: the combination is "completed" (its best checkpoint counts for the
    summary's best row), and the next combination runs."""
    body = ('[set]\n"train.early_stopping_patience" = 1\n"train.early_stopping_min_delta" = 10.0\n'
            '[grid]\n"train.learning_rate" = [1e-3, 2e-3]\n')
    out = tmp_path / "out"
    events = drain(run_sweep(load_sweep(sweep_file(tmp_path, body)), out_dir=out))
    finished = [e for e in events if isinstance(e, ev.Finished)]
    assert [e.reason for e in finished] == ["early_stopped", "early_stopped"], "validation at 2, stop at 4"
    assert statuses(out) == ["completed", "completed"]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["message"] for r in summary["rows"]] == ["early-stopped at step 4"] * 2
    assert summary["best"] is not None
