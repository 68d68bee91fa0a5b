"""FID/KID during training runs: the schedule, the metrics.jsonl rows and events, a fixed generated set and
cached real features (identical numbers for identical weights), warnings without weights or validation images,
and a bad weights file refused before training. The Inception is the real code path with randomly
initialised (He) weights saved in the published key layout, as tests/test_metrics_fid.py does."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sdstudio.core import events as ev
from sdstudio.core.metrics import FidEvaluator
from sdstudio.core.runs import read_metrics
from sdstudio.core.train import evaluation
from sdstudio.core.train.loop import train
from sdstudio.core.train.session import TrainingSession
from tests.fid_helpers import random_fid_state_dict

EVAL_KEYS = {"fid", "kid_mean", "kid_std", "n_generated", "n_real", "fid_meaningful", "note"}


@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(random_fid_state_dict(), path)
    return path


def run_all(config, run_dir: Path | None, resume: bool = False) -> list[ev.Event]:
    return list(train(config, run_dir=run_dir, resume=resume))


def eval_config(tiny_config, weights: Path | str, **extra):
    return tiny_config.with_overrides({"eval.inception_weights": str(weights), "eval.num_samples": 4,
                                       "eval.batch_size": 2, "eval.sampler_steps": 2, **extra})


def test_fid_kid_every_n_steps_are_events_and_val_rows(tiny_config, fid_weights: Path, tmp_path: Path,
                                                        monkeypatch) -> None:
    images_seen: list[int] = []
    pairs_seen: list[list[tuple[str, int]]] = []
    features, generate_pairs = FidEvaluator.features, TrainingSession.generate_pairs

    def spy_features(self, images):
        images_seen.append(len(images))
        return features(self, images)

    def spy_pairs(self, model, pairs, *, steps):
        pairs_seen.append(list(pairs))
        assert steps == 2 and not model.training
        return generate_pairs(self, model, pairs, steps=steps)

    monkeypatch.setattr(FidEvaluator, "features", spy_features)
    monkeypatch.setattr(TrainingSession, "generate_pairs", spy_pairs)
    # eval.memorisation off: its features come from the same Inception, and this test counts the FID images
    cfg = eval_config(tiny_config, fid_weights, **{"eval.fid_every_steps": 3, "eval.memorisation": False})
    run_dir = tmp_path / "run"
    events = run_all(cfg, run_dir)
    assert isinstance(events[-1], ev.Finished) and events[-1].reason == "completed", events[-1]
    results = [e for e in events if isinstance(e, ev.EvalResult)]
    assert [r.step for r in results] == [3, 6], "every 3 steps; the end (step 6) is not evaluated twice"
    n_val = results[0].n_real
    assert n_val >= 2
    for r in results:
        assert math.isfinite(r.fid) and r.fid > 0 and math.isfinite(r.kid_mean) and math.isfinite(r.kid_std)
        assert r.n_generated == 4 and r.n_real == n_val and r.fid_meaningful is False and "KID" in r.note
    assert any(isinstance(e, ev.Status) and e.phase == "evaluating" for e in events)
    assert not any(isinstance(e, ev.Warning) for e in events)

    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "val" and "fid" in r]
    assert [r["step"] for r in rows] == [3, 6]
    for row, result in zip(rows, results):
        assert EVAL_KEYS <= set(row) and "val_loss" not in row
        assert (row["fid"], row["kid_mean"], row["kid_std"]) == (result.fid, result.kid_mean, result.kid_std)
        assert (row["n_generated"], row["n_real"], row["note"]) == (4, n_val, result.note)
    assert "FID/KID at step 3" in (run_dir / "run.log").read_text()

    # the real features are computed once; the same captions and seeds at every evaluation, in batches of 2
    real_batches = [min(2, n_val - i) for i in range(0, n_val, 2)]
    assert images_seen == real_batches + [2, 2] + [2, 2]
    assert len(pairs_seen) == 4 and pairs_seen[:2] == pairs_seen[2:]
    pairs = pairs_seen[0] + pairs_seen[1]
    assert [s for _, s in pairs] == evaluation.eval_seeds(cfg.train.seed, 4)
    assert len({s for _, s in pairs}) == 4 and not {s for _, s in pairs} & set(cfg.sample.seeds)


def test_evaluation_does_not_change_training(tiny_config, fid_weights: Path, tmp_path: Path) -> None:
    """EMA swapped in and out, RNG states restored: the weights equal those of a run without FID/KID."""
    base = tiny_config.with_overrides({"train.ema": True, "train.max_steps": 4, "checkpoint.every_steps": 0})
    with_eval = eval_config(base, fid_weights, **{"eval.fid_every_steps": 2})
    plain, evaluated = tmp_path / "plain", tmp_path / "eval"
    run_all(base, plain)
    events = run_all(with_eval, evaluated)
    assert [e.step for e in events if isinstance(e, ev.EvalResult)] == [2, 4]
    from safetensors.torch import load_file

    name = "checkpoints/step-00000004/model.safetensors"
    a, b = load_file(str(plain / name)), load_file(str(evaluated / name))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[r["loss"] for r in read_metrics(d / "metrics.jsonl") if r["kind"] == "train"]
              for d in (plain, evaluated)]
    assert losses[0] == losses[1]


def test_identical_weights_give_identical_numbers(tiny_config, fid_weights: Path, tmp_path: Path) -> None:
    """Two runs of the same config, the second reading a .safetensors copy of the Inception weights: the same
    generated set, the same real features, the same FID/KID to the last bit."""
    from safetensors.torch import save_file

    copy = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in torch.load(fid_weights, weights_only=True).items()}, str(copy))
    overrides = {"train.max_steps": 3, "checkpoint.every_steps": 0, "eval.fid_every_steps": 0}
    first = run_all(eval_config(tiny_config, fid_weights, **overrides), tmp_path / "a")
    second = run_all(eval_config(tiny_config, copy, **overrides), None)  # no run folder: events only
    a = [e for e in first if isinstance(e, ev.EvalResult)]
    b = [e for e in second if isinstance(e, ev.EvalResult)]
    assert len(a) == len(b) == 1 and a[0].step == 3, "fid_at_end evaluates the completed run"
    assert (a[0].fid, a[0].kid_mean, a[0].n_real) == (b[0].fid, b[0].kid_mean, b[0].n_real)


def test_without_weights_a_schedule_warns_once_and_no_number_is_made(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config.with_overrides({"eval.fid_every_steps": 2, "eval.fid_every_epochs": 1})
    events = run_all(cfg, tmp_path / "run")
    assert isinstance(events[-1], ev.Finished)
    warnings = [e.text for e in events if isinstance(e, ev.Warning) and "FID" in e.text]
    assert len(warnings) == 1
    assert "eval.inception_weights" in warnings[0] and "pt_inception-2015-12-05" in warnings[0]
    assert not any(isinstance(e, ev.EvalResult) for e in events)
    assert not any("fid" in r or "kid_mean" in r for r in read_metrics(tmp_path / "run" / "metrics.jsonl"))
    # the default config (fid_at_end only, no weights) says nothing
    assert evaluation.RunEvaluation(tiny_config, is_main=True).warnings == []


def test_no_validation_images_warns_and_skips(tiny_config, fid_weights: Path, tmp_path: Path) -> None:
    cfg = eval_config(tiny_config, fid_weights, **{"data.val_split": 0.0, "eval.fid_every_steps": 3})
    events = run_all(cfg, tmp_path / "run")
    assert isinstance(events[-1], ev.Finished) and events[-1].reason == "completed"
    warnings = [e.text for e in events if isinstance(e, ev.Warning)]
    assert len([w for w in warnings if "no validation images" in w]) == 1
    assert not any(isinstance(e, ev.EvalResult) for e in events)


@pytest.mark.parametrize("kind", ["missing", "foreign"])
def test_a_bad_weights_file_fails_before_training(tiny_config, tmp_path: Path, kind: str) -> None:
    path = tmp_path / "weights.pth"
    if kind == "foreign":
        torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.weight": torch.zeros(10, 4)}, path)
    cfg = eval_config(tiny_config, path)
    run_dir = tmp_path / "run"
    events = run_all(cfg, run_dir)
    failed = events[-1]
    assert isinstance(failed, ev.Failed) and failed.kind == "input", failed
    assert "eval.inception_weights" in failed.message and str(path) in failed.message
    assert not any(isinstance(e, (ev.Started, ev.StepMetrics)) for e in events)
    assert not run_dir.exists(), "nothing is left behind"


def test_eval_seeds_are_fixed_and_apart_for_different_train_seeds() -> None:
    assert evaluation.eval_seeds(0, 3) == evaluation.eval_seeds(0, 3)
    assert not set(evaluation.eval_seeds(0, 50000)) & set(evaluation.eval_seeds(1, 50000))
    assert all(s < 2**63 for s in evaluation.eval_seeds(2**40, 10))


def test_real_features_are_the_validation_images_at_training_resolution(tiny_config, fid_weights: Path,
                                                                      monkeypatch) -> None:
    """The reference set is uint8 at data.resolution, unaugmented (flips and crops off for validation)."""
    shapes: list[tuple[int, ...]] = []
    features = FidEvaluator.features

    def spy(self, images):
        shapes.append(images.shape)
        assert images.dtype == np.uint8
        return features(self, images)

    monkeypatch.setattr(FidEvaluator, "features", spy)
    cfg = eval_config(tiny_config, fid_weights, **{"train.max_steps": 1, "data.flip_p": 1.0})
    events = run_all(cfg, None)
    assert [e.step for e in events if isinstance(e, ev.EvalResult)] == [1]
    assert all(s[1:] == (16, 16, 3) for s in shapes)


def test_out_of_memory_during_an_evaluation_skips_it_and_training_goes_on(tiny_config, fid_weights: Path,
                                                                         monkeypatch) -> None:
    generate_pairs = TrainingSession.generate_pairs
    calls = []

    def oom_once(self, model, pairs, *, steps):
        calls.append(self.step)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return generate_pairs(self, model, pairs, steps=steps)

    monkeypatch.setattr(TrainingSession, "generate_pairs", oom_once)
    cfg = eval_config(tiny_config, fid_weights, **{"train.ema": True, "eval.fid_every_steps": 3})
    events = run_all(cfg, None)
    assert isinstance(events[-1], ev.Finished) and events[-1].reason == "completed"
    warnings = [e.text for e in events if isinstance(e, ev.Warning) and "FID" in e.text]
    assert len(warnings) == 1 and "step 3" in warnings[0] and "eval.batch_size" in warnings[0]
    assert [e.step for e in events if isinstance(e, ev.EvalResult)] == [6]


def test_a_stop_request_abandons_a_running_evaluation(tiny_config, fid_weights: Path, tmp_path: Path) -> None:
    """A large eval.num_samples must not hold a stop up: the evaluation stops after the batch in progress, no
    FID/KID row is written, and the run ends "stopped" with its checkpoint."""
    from sdstudio.core.control import TrainingControl

    cfg = eval_config(tiny_config, fid_weights, **{"eval.fid_every_steps": 2, "eval.num_samples": 8,
                                                   "eval.batch_size": 1})
    control = TrainingControl()
    run_dir = tmp_path / "run"
    events = []
    for event in train(cfg, control, run_dir=run_dir):
        events.append(event)
        if isinstance(event, ev.Status) and event.phase == "evaluating" and "1 of 8" in event.text:
            control.request_stop()
    assert isinstance(events[-1], ev.Finished) and events[-1].reason == "stopped", events[-1]
    assert events[-1].step == 2
    assert not [e for e in events if isinstance(e, ev.EvalResult)]
    assert any(isinstance(e, ev.Warning) and "abandoned after 1 of 8" in e.text for e in events)
    assert not [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "val" and "fid" in r]
    assert (run_dir / "checkpoints" / "step-00000002").is_dir()
