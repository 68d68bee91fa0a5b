"""The memorisation and collapse alarm (issue 18): its numbers and its logic on synthetic features, CLIP features
from a tiny random CLIP, and the alarm through the real training loop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sdstudio.core import events as ev
from sdstudio.core.metrics.memorisation import (
    MemorisationAlarm,
    TrainingReference,
    measure,
    normalise,
    pixel_features,
    seed_diversity,
    training_nn_distances,
)
from sdstudio.core.runs import RunFolder
from sdstudio.core.train.loop import train
from tests.test_eval_run import fid_weights  # noqa: F401 - the fixture


def _train_features(n: int = 8, dim: int = 64, seed: int = 0) -> np.ndarray:
    return normalise(np.random.default_rng(seed).normal(size=(n, dim)))


# -- the numbers -----------------------------------------------------------------------------------------
def test_copies_of_training_images_have_a_small_ratio_and_fresh_ones_do_not() -> None:
    train_f = _train_features()
    ref = TrainingReference.from_features(train_f)
    assert 1.2 < ref.nn_median < 1.5  # random 64-d unit vectors: about sqrt(2) apart
    rng = np.random.default_rng(1)
    copies = train_f[[0, 1, 2, 3, 4, 5, 6, 7]] + 0.02 * rng.normal(size=(8, 64))
    fresh = rng.normal(size=(8, 64))
    copied = measure(copies, 2, ref, copy_threshold=0.3)
    healthy = measure(fresh, 2, ref, copy_threshold=0.3)
    assert copied["memo_ratio"] < 0.15 and copied["memo_copies"] == 1.0
    assert healthy["memo_ratio"] > 0.8 and healthy["memo_copies"] == 0.0
    assert copied["diversity"] > 1.0  # different training images at each seed: diverse, only copied


def test_training_duplicates_do_not_define_the_nearest_neighbour_scale() -> None:
    train_f = _train_features(4)
    with_dupes = np.concatenate([train_f, train_f[:2]])
    assert np.allclose(np.sort(training_nn_distances(normalise(with_dupes)))[:2],
                       np.sort(training_nn_distances(train_f))[:2])


def test_seed_diversity_is_per_prompt() -> None:
    a, b = _train_features(2)
    same_per_prompt = np.stack([a, a, b, b])  # each prompt one look, the prompts differ
    assert seed_diversity(same_per_prompt, 2) == pytest.approx(0.0, abs=1e-6)
    assert seed_diversity(np.stack([a, b, a, b]), 2) > 1.0
    assert seed_diversity(np.stack([a, b]), 2) is None  # one seed: no diversity to measure
    with pytest.raises(ValueError):
        seed_diversity(np.stack([a, b, a]), 2)


def test_pixel_features_ignore_brightness_and_see_content() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(40, 200, size=(1, 16, 16, 3)).astype(np.uint8)
    brighter = (img.astype(int) + 30).clip(0, 255).astype(np.uint8)
    other = rng.integers(40, 200, size=(1, 16, 16, 3)).astype(np.uint8)
    f = pixel_features(np.concatenate([img, brighter, other]))
    assert f.shape == (3, 32 * 32 * 3) and np.allclose(np.linalg.norm(f, axis=1), 1.0, atol=1e-5)
    assert np.linalg.norm(f[0] - f[1]) < 0.01 and np.linalg.norm(f[0] - f[2]) > 0.5


# -- the alarm's logic -----------------------------------------------------------------------------------
def test_copy_alarm_is_said_once_with_the_step_it_began() -> None:
    alarm = MemorisationAlarm(copy_threshold=0.3, collapse_fraction=0.25)
    assert alarm.observe(100, {"memo_ratio": 1.1, "diversity": 1.3}) == []
    assert alarm.observe(200, {"memo_ratio": 0.5, "diversity": 1.2}) == []
    said = alarm.observe(300, {"memo_ratio": 0.1, "diversity": 1.2})
    assert len(said) == 1 and "from step 300" in said[0] and "eval.memorisation_threshold" in said[0]
    assert alarm.observe(400, {"memo_ratio": 0.05, "diversity": 1.2}) == []
    assert alarm.alarms() == {"memorisation": 300, "collapse": None}


def test_collapse_alarm_against_the_smaller_of_the_first_value_and_the_training_diversity() -> None:
    alarm = MemorisationAlarm(copy_threshold=0.3, collapse_fraction=0.25, train_diversity=0.8)
    assert alarm.observe(10, {"memo_ratio": 1.0, "diversity": 1.4}) == []  # noise at first: very diverse
    assert alarm.observe(20, {"memo_ratio": 1.0, "diversity": 0.5}) == []  # pictures: less diverse than noise
    assert alarm.diversity_reference() == 0.8
    said = alarm.observe(30, {"memo_ratio": 1.0, "diversity": 0.1})
    assert len(said) == 1 and said[0].startswith("collapse: from step 30")
    assert alarm.observe(40, {"memo_ratio": 1.0, "diversity": 0.05}) == []


def test_the_alarm_state_is_rebuilt_from_metrics_rows() -> None:
    rows = [{"kind": "sample", "step": 10, "memo_ratio": 1.0, "diversity": 1.0},
            {"kind": "sample", "step": 20, "memo_ratio": 0.1, "diversity": 1.0},
            {"kind": "event", "step": 20, "event": "memorisation", "began": 20}]
    alarm = MemorisationAlarm(copy_threshold=0.3, collapse_fraction=0.25)
    alarm.replay(rows)
    assert alarm.copying_since == 20 and alarm.first_diversity == 1.0
    assert alarm.observe(30, {"memo_ratio": 0.1, "diversity": 1.0}) == []  # said before the resume


# -- CLIP features ---------------------------------------------------------------------------------------
def test_clip_features_from_a_tiny_random_clip(tmp_path: Path) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from sdstudio.core.errors import UserError
    from sdstudio.core.metrics.clip_features import ClipFeatures

    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=12)
    CLIPVisionModelWithProjection(config).save_pretrained(tmp_path / "clip")
    feats = ClipFeatures(tmp_path / "clip").features(np.zeros((3, 16, 16, 3), np.uint8) + 100)
    assert feats.shape == (3, 12) and np.isfinite(feats).all()
    with pytest.raises(UserError, match="eval.memorisation_clip_model"):
        ClipFeatures(tmp_path)


# -- through the training loop ---------------------------------------------------------------------------
def _memo_config(tiny_config, four: Path, steps: int, every: int):
    return tiny_config.with_overrides({
        "data.path": str(four), "data.val_split": 0.0, "train.max_steps": steps, "train.log_every": steps,
        "sample.every_steps": every, "sample.prompts": [""], "sample.seeds": [0, 1, 2, 3], "sample.guidance": 1.0,
        "checkpoint.every_steps": 0})


def _copying_sampler(monkeypatch, train_images: np.ndarray, from_step: int) -> None:
    """A deterministic stand-in for sampling: noise before ``from_step``, the training images from then on."""
    from sdstudio.core.train import previews

    def sample_rows(self, seeds):
        step = self._memo_test_step
        if step < from_step:
            rng = np.random.default_rng(step)
            return rng.integers(0, 256, size=(len(seeds), 16, 16, 3), dtype=np.uint8)
        return train_images[[k % len(train_images) for k in range(len(seeds))]]

    original_grid = previews.Previews.grid

    def grid(self, step, epoch):
        self._memo_test_step = step
        return original_grid(self, step, epoch)

    monkeypatch.setattr(previews.Previews, "sample_rows", sample_rows)
    monkeypatch.setattr(previews.Previews, "grid", grid)


def _training_images(config) -> np.ndarray:
    from sdstudio.core.data.dataset import ImageCaptionDataset
    from sdstudio.core.data.scan import scan_dataset

    records = scan_dataset(Path(config.data.path)).records
    data = ImageCaptionDataset(records, config, train=False)
    return np.stack([data.prepared(i, None).array for i in range(len(data))])


def test_the_loop_raises_the_alarm_once_when_samples_copy_and_keeps_it_over_a_resume(
        tiny_config, four_images: Path, tmp_path: Path, monkeypatch) -> None:
    config = _memo_config(tiny_config, four_images, steps=4, every=1)
    _copying_sampler(monkeypatch, _training_images(config), from_step=3)
    run = tmp_path / "run"
    events = list(train(config, run_dir=run))
    assert isinstance(events[-1], ev.Finished)
    results = [e for e in events if isinstance(e, ev.MemorisationResult)]
    assert [r.step for r in results] == [1, 2, 3, 4]
    assert all(r.ratio > 0.8 for r in results[:2]) and all(r.ratio < 0.05 for r in results[2:])
    warnings = [e.text for e in events if isinstance(e, ev.Warning) and e.text.startswith("memorisation")]
    assert len(warnings) == 1 and "from step 3" in warnings[0]
    rows = RunFolder(run).metrics_rows()
    assert [r["step"] for r in rows if r["kind"] == "event" and r.get("event") == "memorisation"] == [3]
    assert all("memo_ratio" in r and "diversity" in r for r in rows if r["kind"] == "sample")
    assert RunFolder(run).memorisation_features_file.is_file()

    # a resume that goes on copying does not say it again
    more = config.with_overrides({"train.max_steps": 6, "checkpoint.every_steps": 0})
    from sdstudio.core.presets import config_to_toml

    (run / "config.toml").write_text(config_to_toml(more))
    again = list(train(more, run_dir=run, resume=True))
    assert isinstance(again[-1], ev.Finished)
    assert [e.step for e in again if isinstance(e, ev.MemorisationResult)] == [5, 6]
    assert not [e for e in again if isinstance(e, ev.Warning) and e.text.startswith("memorisation")]


def test_a_healthy_run_raises_no_alarm_and_the_key_turns_it_off(tiny_config, four_images: Path, tmp_path: Path,
                                                                 monkeypatch) -> None:
    config = _memo_config(tiny_config, four_images, steps=2, every=1)
    _copying_sampler(monkeypatch, _training_images(config), from_step=10**6)  # always fresh images
    events = list(train(config, run_dir=tmp_path / "healthy"))
    assert len([e for e in events if isinstance(e, ev.MemorisationResult)]) == 2
    assert not [e for e in events if isinstance(e, ev.Warning) and e.text.startswith(("memorisation", "collapse"))]

    off = config.with_overrides({"eval.memorisation": False})
    events = list(train(off, run_dir=tmp_path / "off"))
    assert isinstance(events[-1], ev.Finished)
    assert not [e for e in events if isinstance(e, ev.MemorisationResult)]
    rows = RunFolder(tmp_path / "off").metrics_rows()
    assert not any("memo_ratio" in r for r in rows)


def test_features_without_their_model_are_refused_by_the_config(tiny_config) -> None:
    from sdstudio.core.errors import ConfigError

    with pytest.raises(ConfigError, match="eval.inception_weights"):
        tiny_config.with_overrides({"eval.memorisation_features": "inception"})
    with pytest.raises(ConfigError, match="eval.memorisation_clip_model"):
        tiny_config.with_overrides({"eval.memorisation_features": "clip"})
    tiny_config.with_overrides({"eval.memorisation_features": "clip", "eval.memorisation": False})  # off: fine


@pytest.mark.slow
def test_a_tiny_model_trained_to_memorise_four_images_raises_the_alarm(tiny_config, four_images: Path,
                                                                        tmp_path: Path) -> None:
    """Real training, no stand-in (~15 s on a free CPU core): a sample-predicting (x0) model conditioned on the
    four captions learns to reproduce its four images; its early samples are not copies (no alarm), those of the
    memorised model are, and the alarm is said once with the step it began."""
    captions = [p.read_text(encoding="utf-8").strip() for p in sorted(four_images.glob("*.txt"))]
    config = _memo_config(tiny_config, four_images, steps=300, every=50).with_overrides(
        {"train.learning_rate": 3e-3, "train.threads": 1, "diffusion.prediction_type": "sample",
         "sample.prompts": captions, "sample.seeds": [0, 1], "sample.steps": 10})
    events = list(train(config, run_dir=tmp_path / "run"))
    assert isinstance(events[-1], ev.Finished)
    results = [e for e in events if isinstance(e, ev.MemorisationResult)]
    ratios = [round(r.ratio, 3) for r in results]
    assert len(results) == 6 and ratios[0] > 0.3 and ratios[-1] < 0.3, ratios
    warnings = [e.text for e in events if isinstance(e, ev.Warning) and e.text.startswith("memorisation")]
    assert len(warnings) == 1, warnings
    began = next(r.step for r in results if r.alarms and r.alarms[0].startswith("memorisation"))
    assert began > results[0].step and f"from step {began}" in warnings[0]
    assert all(r.ratio >= 0.3 for r in results if r.step < began)


# -- the checkpoint grid's memorisation score per column --------------------------------------------------
def test_grid_columns_carry_the_memorisation_score_and_mark_copies(tiny_config, four_images: Path,
                                                                    tmp_path: Path, monkeypatch) -> None:
    from sdstudio.core.sampling import checkpoint_grid as cg

    config = _memo_config(tiny_config, four_images, steps=4, every=0).with_overrides(
        {"checkpoint.every_steps": 2, "sample.at_end": True})
    run = tmp_path / "run"
    assert isinstance(list(train(config, run_dir=run))[-1], ev.Finished)
    grid = cg.checkpoint_grid(run, [""], seeds=[0, 1], steps=2, device="cpu")
    assert [c.step for c in grid.columns] == [2, 4]
    assert all(c.memo_ratio is not None and c.diversity is not None for c in grid.columns)
    assert all(not c.copying for c in grid.columns)  # 4 steps of training: noise, nothing copied

    train_images = _training_images(config)
    real_load = cg.load_trained

    class Copier:
        def __init__(self, loaded):
            self.loaded = loaded

        def generate(self, prompts, seeds, **_):
            return train_images[[k % len(train_images) for k in range(len(prompts) * len(seeds))]]

    monkeypatch.setattr(cg, "load_trained", lambda *a, **k: Copier(real_load(*a, **k)))
    copied = cg.checkpoint_grid(run, [""], seeds=[0, 1], every=1, device="cpu")
    assert all(c.copying and c.memo_ratio < 0.05 for c in copied.columns)
    assert "COPY" in " ".join(copied.columns[0].label())
    summary = cg.column_summary(copied)
    assert summary[0]["copying"] is True and summary[0]["memo_ratio"] < 0.05
    assert copied.render().shape[0] > 0


def test_the_cli_says_the_alarm_once_with_its_step(tiny_config, four_images: Path, tmp_path: Path, monkeypatch,
                                                   capsys) -> None:
    from sdstudio.cli import main
    from sdstudio.core.presets import config_to_toml

    config = _memo_config(tiny_config, four_images, steps=4, every=1)
    _copying_sampler(monkeypatch, _training_images(config), from_step=2)
    path = tmp_path / "memo.toml"
    path.write_text(config_to_toml(config), encoding="utf-8")
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert err.count("memorisation: from step 2 the samples reproduce training images") == 1, err
    assert "step 1: memorisation: copy ratio" in err


def test_auto_features_are_the_fid_inception_when_its_weights_are_set(tiny_config, fid_weights: Path,  # noqa: F811
                                                                      tmp_path: Path) -> None:
    config = tiny_config.with_overrides({"eval.inception_weights": str(fid_weights), "eval.fid_at_end": False,
                                         "train.max_steps": 2, "checkpoint.every_steps": 0})
    events = list(train(config, run_dir=tmp_path / "run"))
    result = next(e for e in events if isinstance(e, ev.MemorisationResult))
    assert result.features == "inception" and np.isfinite(result.ratio) and np.isfinite(result.diversity)
    with np.load(RunFolder(tmp_path / "run").memorisation_features_file) as data:
        assert str(data["kind"]) == "inception" and data["features"].shape[1] == 2048
