"""The training loop end to end on a tiny model: run folder, events, controls, exact resume, failures."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdstudio.core import events as ev
from sdstudio.core.config import RunConfig
from sdstudio.core.control import TrainingControl
from sdstudio.core.runs import read_metrics
from sdstudio.core.train.checkpoint import verify_checkpoint
from sdstudio.core.train.loop import train
from sdstudio.core.train.session import TrainingSession


def run_all(config, run_dir: Path, control: TrainingControl | None = None, resume: bool = False,
            on_event=None) -> list[ev.Event]:
    out = []
    for event in train(config, control, run_dir=run_dir, resume=resume):
        out.append(event)
        if on_event is not None:
            on_event(event)
    return out


def test_short_run_writes_the_run_folder(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config.with_overrides({"sample.every_steps": 3})
    run_dir = tmp_path / "run"
    events = run_all(cfg, run_dir)
    assert isinstance(events[-1], ev.Finished) and events[-1].reason == "completed", events[-1]
    assert isinstance(next(e for e in events if not isinstance(e, (ev.Status, ev.Warning))), ev.Started)
    steps = [e.step for e in events if isinstance(e, ev.StepMetrics)]
    assert steps == [1, 2, 3, 4, 5, 6]
    rows = read_metrics(run_dir / "metrics.jsonl")
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == steps
    assert all({"loss", "lr", "grad_norm", "img_per_s", "epoch", "time"} <= set(r) for r in train_rows)
    assert any(r["kind"] == "val" for r in rows), "validation loss is logged"
    grids = [e for e in events if isinstance(e, ev.SampleGrid)]
    assert [g.step for g in grids] == [3, 6]
    assert grids[0].image.dtype.name == "uint8" and grids[0].image.ndim == 3
    assert (run_dir / "samples" / "step-00000003.png").is_file()
    meta = json.loads((run_dir / "samples" / "step-00000003.json").read_text())
    assert meta["prompts"] == list(cfg.sample.prompts) and meta["seeds"] == [0, 1] and meta["step"] == 3
    for step in (3, 6):
        info = verify_checkpoint(run_dir / "checkpoints" / f"step-{step:08d}")
        assert info.step == step and "model.safetensors" in info.manifest["files"]
    assert (run_dir / "config.toml").is_file() and (run_dir / "run.log").is_file()
    assert not (run_dir / "lock").exists(), "the lock is released at the end"


def _weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step-{step:08d}" / "model.safetensors"))


def test_resume_continues_exactly(tiny_config, tmp_path: Path) -> None:
    """N steps straight == N/2, stop, resume, N/2: same losses and bit-identical weights."""
    cfg = tiny_config.with_overrides({"train.ema": True, "data.flip_p": 0.5, "data.caption_dropout": 0.3,
                                      "checkpoint.every_steps": 0, "train.max_steps": 8})
    straight = tmp_path / "straight"
    run_all(cfg, straight)
    split = tmp_path / "split"
    control = TrainingControl()

    def stop_at_4(event: ev.Event) -> None:
        if isinstance(event, ev.StepMetrics) and event.step == 4:
            control.request_stop()

    first = run_all(cfg, split, control, on_event=stop_at_4)
    assert isinstance(first[-1], ev.Finished) and first[-1].reason == "stopped" and first[-1].step == 4
    second = run_all(cfg, split, resume=True)
    assert isinstance(second[-1], ev.Finished) and second[-1].reason == "completed", second[-1]
    assert [e.step for e in second if isinstance(e, ev.StepMetrics)] == [5, 6, 7, 8]

    losses_a = {r["step"]: r["loss"] for r in read_metrics(straight / "metrics.jsonl") if r["kind"] == "train"}
    rows_b = [r for r in read_metrics(split / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in rows_b] == list(range(1, 9)), "no duplicated or missing steps after resume"
    assert {r["step"]: r["loss"] for r in rows_b} == losses_a
    wa, wb = _weights(straight, 8), _weights(split, 8)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ea = load_file(str(straight / "checkpoints" / "step-00000008" / "ema.safetensors"))
    eb = load_file(str(split / "checkpoints" / "step-00000008" / "ema.safetensors"))
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


def test_controls_sample_save_pause(tiny_config, tmp_path: Path) -> None:
    control = TrainingControl()
    seen_pause = threading.Event()

    def steer(event: ev.Event) -> None:
        if isinstance(event, ev.StepMetrics) and event.step == 1:
            control.request_sample()
            control.request_save()
            control.pause()
        if isinstance(event, ev.Status) and event.phase == "paused":
            seen_pause.set()
            threading.Timer(0.2, control.resume).start()  # the loop waits until then

    cfg = tiny_config.with_overrides({"checkpoint.every_steps": 0, "sample.at_end": False})
    events = run_all(cfg, tmp_path / "run", control, on_event=steer)
    assert isinstance(events[-1], ev.Finished) and events[-1].reason == "completed"
    assert seen_pause.is_set()
    assert any(isinstance(e, ev.SampleGrid) and e.step <= 2 for e in events)
    assert any(isinstance(e, ev.CheckpointSaved) and e.step <= 2 for e in events)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_config, tmp_path: Path, monkeypatch) -> None:
    original = TrainingSession.compute_loss

    def poisoned(self, batch, micro):
        loss = original(self, batch, micro)
        return loss * float("nan") if self.step + 1 == 5 else loss

    monkeypatch.setattr(TrainingSession, "compute_loss", poisoned)
    run_dir = tmp_path / "run"
    events = run_all(tiny_config, run_dir)
    failed = events[-1]
    assert isinstance(failed, ev.Failed) and failed.kind == "nan", failed
    assert "step 5" in failed.message and "learning rate" in failed.message
    assert failed.resumable_from == run_dir / "checkpoints" / "step-00000003"
    assert not (run_dir / "checkpoints" / "step-00000005").exists()

    skipping = tiny_config.with_overrides({"train.nan_skip_steps": 1})
    events = run_all(skipping, tmp_path / "run2")
    assert isinstance(events[-1], ev.Finished) and events[-1].reason == "completed"


def test_empty_folder_fails_before_the_model_and_leaves_nothing(tiny_config, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    run_dir = tmp_path / "run"
    events = run_all(tiny_config.with_overrides({"data.path": str(empty)}), run_dir)
    failed = events[-1]
    assert isinstance(failed, ev.Failed) and failed.kind == "input"
    assert str(empty) in failed.message and "no usable image" in failed.message
    assert not any(isinstance(e, ev.Status) and e.phase == "building" for e in events)
    assert not run_dir.exists()


def test_batch_larger_than_dataset_is_a_clear_error(tiny_config, tmp_path: Path) -> None:
    events = run_all(tiny_config.with_overrides({"train.batch_size": 64}), tmp_path / "run")
    assert isinstance(events[-1], ev.Failed) and events[-1].kind == "input"
    assert "train.batch_size" in events[-1].message


def test_existing_run_folder_is_not_overwritten(tiny_config, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "precious.txt").write_text("keep me")
    events = run_all(tiny_config, run_dir)
    assert isinstance(events[-1], ev.Failed) and "not empty" in events[-1].message
    assert (run_dir / "precious.txt").read_text() == "keep me"


def test_resume_skips_a_corrupt_newest_checkpoint(tiny_config, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_all(tiny_config.with_overrides({"train.max_steps": 6}), run_dir)
    newest = run_dir / "checkpoints" / "step-00000006" / "model.safetensors"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    longer = tiny_config.with_overrides({"train.max_steps": 7})
    events = run_all(longer, run_dir, resume=True)
    warnings = " ".join(e.text for e in events if isinstance(e, ev.Warning))
    assert "step-00000006" in warnings and "truncated" in warnings
    assert [e.step for e in events if isinstance(e, ev.StepMetrics)] == [4, 5, 6, 7]
    assert isinstance(events[-1], ev.Finished)


def test_a_locked_run_folder_is_refused(tiny_config, tmp_path: Path) -> None:
    import os

    run_dir = tmp_path / "run"
    run_all(tiny_config, run_dir)
    (run_dir / "lock").write_text(str(os.getppid()))  # a live process that is not us
    events = run_all(tiny_config.with_overrides({"train.max_steps": 7}), run_dir, resume=True)
    assert isinstance(events[-1], ev.Failed) and "another sdstudio process" in events[-1].message
    (run_dir / "lock").write_text("999999999")  # stale: no such process
    events = run_all(tiny_config.with_overrides({"train.max_steps": 7}), run_dir, resume=True)
    assert isinstance(events[-1], ev.Finished)


def test_early_stopping_on_a_plateau_keeps_the_best_checkpoint(tiny_config, tmp_path: Path, monkeypatch) -> None:
    """A synthetic plateau: the validation loss improves twice, then stays flat; patience 2 stops the run
    two validations later and the best checkpoint survives pruning (keep_last = 1)."""
    curve = iter([1.0, 0.8, 0.8, 0.81, 0.8, 0.8, 0.8, 0.8])

    monkeypatch.setattr(TrainingSession, "validate", lambda self: (next(curve), [0.0] * 10))
    cfg = tiny_config.with_overrides({"train.max_steps": 40, "train.val_every_steps": 2, "checkpoint.every_steps": 0,
                                      "checkpoint.keep_last": 1, "train.early_stopping_patience": 2,
                                      "train.early_stopping_min_delta": 0.01})
    run = tmp_path / "run"
    events = run_all(cfg, run)
    assert isinstance(events[-1], ev.Finished) and events[-1].reason == "early_stopped", events[-1]
    assert events[-1].step == 8, "validations at steps 2, 4 (best), 6, 8 -> stop"
    assert any(isinstance(e, ev.Warning) and "early stopping" in e.text for e in events)
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert best["step"] == 4 and best["val_loss"] == 0.8
    assert (run / "checkpoints" / "step-00000004").is_dir() and (run / "checkpoints" / "step-00000008").is_dir()
    from sdstudio.core.sampling.from_run import resolve_checkpoint

    assert resolve_checkpoint(run, best=True).name == "step-00000004"


def test_prompt_adherence_is_logged_on_the_demo_data(tmp_path: Path) -> None:
    from sdstudio.core.presets import load_preset
    from tests.conftest import TINY_OVERRIDES

    overrides = {k: v for k, v in TINY_OVERRIDES.items() if not k.startswith("data.")}
    cfg = load_preset("demo").with_overrides({**overrides, "train.max_steps": 1, "data.resolution": 16,
                                              "data.val_split": 0.0})
    events = run_all(cfg, tmp_path / "run")
    grid = next(e for e in events if isinstance(e, ev.SampleGrid))
    assert set(grid.scores) == {"colour_acc", "shape_acc", "both_acc"}
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "sample"]
    assert "both_acc" in rows[-1]


@pytest.mark.parametrize("ztsnr", [False, True])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "euler", "dpmpp_2m"])
def test_sampler_steps_up_to_the_schedule_length_stay_in_range(sampler: str, ztsnr: bool) -> None:
    """sample.steps may equal diffusion.num_timesteps: "leading" spacing would then start at t = T (out of
    range) or repeat timesteps (DPM++), and a count that does not divide T starts far below it; fewer steps
    are taken instead of crashing or sampling garbage."""
    from sdstudio.core.diffusion import sampling_scheduler, set_sampling_timesteps, training_scheduler

    cfg = RunConfig().diffusion.model_copy(update={"num_timesteps": 50, "zero_terminal_snr": ztsnr})
    train_sched = training_scheduler(cfg, pixel_space=True)
    for steps in (50, 49, 30, 10):
        sched = sampling_scheduler(train_sched, sampler)
        used = set_sampling_timesteps(sched, train_sched, steps)
        t = sched.timesteps.tolist()
        assert max(t) < 50 and min(t) >= 0 and len(set(t)) == len(t) == len(sched.timesteps)
        # sampling starts from (nearly) pure noise: 30 of 50 with leading spacing would start at t = 30
        assert max(t) >= 50 - 1.5 * 50 / used - 1, (steps, used, t)
        assert used >= steps * 0.8 and (used == steps or not ztsnr)


def test_resume_from_the_last_step_neither_repeats_rows_nor_reopens_a_finished_run(tiny_config,
                                                                                   tmp_path: Path) -> None:
    """A kill after the final checkpoint but before the run said it ended: resume finishes the run without
    writing the last step's validation or samples again. Resuming a run that had ended does nothing, says so and
    what to do instead, and writes nothing (resume is idempotent)."""
    from sdstudio.core.atomic import write_text_atomic

    cfg = tiny_config.with_overrides({"sample.at_end": True})
    run_dir = tmp_path / "run"
    events = run_all(cfg, run_dir)
    assert isinstance(events[-1], ev.Finished) and events[-1].reason == "completed"

    before = (run_dir / "metrics.jsonl").read_text()
    again = run_all(cfg, run_dir, resume=True)
    assert isinstance(again[-1], ev.Finished) and again[-1].reason == "completed" and again[-1].step == 6
    said = " ".join(e.text for e in again if isinstance(e, ev.Warning))
    assert "already completed at step 6 of 6" in said and "train.max_steps" in said
    assert not [e for e in again if isinstance(e, (ev.ValidationResult, ev.SampleGrid, ev.CheckpointSaved))]
    assert (run_dir / "metrics.jsonl").read_text() == before

    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    kept = [line for line in lines if json.loads(line).get("event") != "completed"]
    write_text_atomic(metrics, "\n".join(kept) + "\n")  # as if killed just before the final row
    resumed = run_all(cfg, run_dir, resume=True)
    assert isinstance(resumed[-1], ev.Finished) and resumed[-1].reason == "completed", resumed[-1]
    assert not [e for e in resumed if isinstance(e, (ev.ValidationResult, ev.SampleGrid))]
    last = [r for r in read_metrics(metrics) if r["step"] == 6]
    assert sum(r["kind"] == "val" for r in last) == 1 and sum(r["kind"] == "sample" for r in last) == 1
    assert sum(r.get("event") == "completed" for r in last) == 1


def test_skipped_files_are_kept_in_run_log(tiny_config, tiny_dataset: Path, tmp_path: Path) -> None:
    """What the user is warned about at the start (a broken file skipped) stays in run.log for later."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    (data / "broken.png").write_bytes(b"not an image")
    run_dir = tmp_path / "run"
    events = run_all(tiny_config.with_overrides({"data.path": str(data), "train.max_steps": 1}), run_dir)
    assert any(isinstance(e, ev.Warning) and "broken.png" in e.text for e in events)
    assert "broken.png" in (run_dir / "run.log").read_text()
