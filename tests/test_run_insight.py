"""Run cards + rerun, per-image loss, the checkpoint x prompt grid (issue 18)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from sdstudio.cli import main
from sdstudio.core import events as ev
from sdstudio.core.runs import RunFolder
from sdstudio.core.train.loop import train


def run_to_end(config, run: Path) -> list[ev.Event]:
    events = list(train(config, run_dir=run))
    assert isinstance(events[-1], ev.Finished), events[-1]
    return events


def _numbers(run: Path) -> list[tuple]:
    return [(r["kind"], r["step"], r.get("loss"), r.get("val_loss")) for r in RunFolder(run).metrics_rows()
            if r["kind"] in ("train", "val")]


# -- run cards and rerun ------------------------------------------------------------------------------------
def test_run_card_and_rerun_reproduce_the_metrics_bit_for_bit(tiny_config, tmp_path: Path, capsys) -> None:
    original = tmp_path / "original"
    run_to_end(tiny_config, original)
    card = json.loads((original / "run-card.json").read_text())
    assert card["config"] == tiny_config.to_dict()
    files = card["dataset"]["files"]
    assert any(name.endswith(".png") for name in files) and any(name.endswith(".txt") for name in files)
    first = min(files)
    assert not Path(first).is_absolute()
    assert len(files[first]["sha256"]) == 64 and files[first]["size"] > 0
    assert card["versions"]["torch"] and card["versions"]["sdstudio"]
    assert card["device"]["type"] == "cpu" and card["seeds"]["train"] == tiny_config.train.seed
    assert isinstance(card["command"], list)

    again = tmp_path / "again"
    assert main(["rerun", str(original), "--out", str(again), "--quiet"]) == 0
    said = capsys.readouterr().err
    assert "bit for bit" in said and "differs" not in said
    assert _numbers(again) == _numbers(original)  # exactly equal floats
    assert len(_numbers(original)) >= 6


def test_rerun_says_what_differs_in_the_dataset(tiny_config, tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    config = tiny_config.with_overrides({"data.path": str(data), "train.max_steps": 1, "checkpoint.every_steps": 0})
    run_to_end(config, tmp_path / "run")
    victim = min(data.glob("*.txt"))
    victim.write_text("something else entirely")
    assert main(["rerun", str(tmp_path / "run" / "run-card.json"), "--out", str(tmp_path / "again"), "--strict"]) == 2
    err = capsys.readouterr().err
    assert "1 changed" in err and victim.name in err
    assert not (tmp_path / "again").exists()


def test_export_metadata_carries_the_card_summary(tiny_config, tmp_path: Path) -> None:
    from sdstudio.core.export.metadata import training_metadata
    from sdstudio.core.export.source import load_export_source

    run_to_end(tiny_config, tmp_path / "run")
    source = load_export_source(tmp_path / "run")
    meta = training_metadata(source, title="x", lora=False)
    summary = json.loads(meta["sdstudio_run_card"])
    card = RunFolder(tmp_path / "run").read_card()
    assert summary["dataset_files"] == len(card["dataset"]["files"]) and len(summary["dataset_sha256"]) == 64
    assert summary["seeds"]["train"] == tiny_config.train.seed


# -- per-image loss -----------------------------------------------------------------------------------------
def _solid_dataset(folder: Path) -> Path:
    """6 solid red images captioned "red", and one captioned "red" that shows a blue-and-white checkerboard
    (a file whose caption does not describe it)."""
    folder.mkdir()
    for n in range(6):
        Image.new("RGB", (16, 16), (230, 20 + 3 * n, 20)).save(folder / f"img{n:02d}.png")
        (folder / f"img{n:02d}.txt").write_text("red")
    checker = (np.indices((16, 16)).sum(axis=0) % 2).astype(bool)
    pixels = np.where(checker[..., None], np.array([20, 20, 230], np.uint8), np.array([255, 255, 255], np.uint8))
    Image.fromarray(pixels.astype(np.uint8)).save(folder / "wrong.png")
    (folder / "wrong.txt").write_text("red")
    return folder


def test_a_mislabeled_image_ranks_among_the_worst(tiny_config, tmp_path: Path) -> None:
    from sdstudio.core.train.image_loss import ranked

    data = _solid_dataset(tmp_path / "solid")
    config = tiny_config.with_overrides({"data.path": str(data), "data.val_split": 0.0, "train.max_steps": 60,
                                         "train.learning_rate": 5e-3, "checkpoint.every_steps": 0,
                                         "data.flip_p": 0.0, "train.log_every": 20})
    run_to_end(config, tmp_path / "run")
    data_json = json.loads((tmp_path / "run" / "image_loss.json").read_text())
    assert set(data_json) >= {"images", "outliers"}
    assert len(data_json["images"]) == 7
    assert all(v["n"] > 0 and v["loss"] > 0 for v in data_json["images"].values())
    worst = [name for name, _score, _n in ranked(data_json)]
    assert worst[0] == "wrong.png", worst
    assert data_json["outliers"] == ["wrong.png"]
    assert 0.8 < sorted(v["loss"] for v in data_json["images"].values())[3] < 1.2  # the median image is ~1.0


def test_outliers_rule() -> None:
    from sdstudio.core.train.image_loss import find_outliers

    images = {f"{i}.png": {"loss": 1.0 + 0.01 * i, "n": 5} for i in range(8)}
    assert find_outliers(images) == []
    images["bad.png"] = {"loss": 2.5, "n": 5}
    images["rare.png"] = {"loss": 9.0, "n": 1}  # seen once: not judged
    assert find_outliers(images) == ["bad.png"]


def test_per_sample_loss_keeps_the_training_loss() -> None:
    import torch

    from sdstudio.core.config import RunConfig
    from sdstudio.core.diffusion import diffusion_loss, diffusion_loss_per_sample, training_scheduler

    cfg = RunConfig().with_overrides({"loss.min_snr_gamma": 5.0})
    sched = training_scheduler(cfg.diffusion, pixel_space=True)
    pred, target = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([5, 100, 500, 900])
    per = diffusion_loss_per_sample(pred, target, t, sched, cfg.loss)
    assert per.shape == (4,)
    assert torch.equal(per.mean(), diffusion_loss(pred, target, t, sched, cfg.loss))


# -- checkpoint x prompt grid -------------------------------------------------------------------------------
def test_grid_has_one_column_per_checkpoint(tiny_config, tmp_path: Path) -> None:
    from sdstudio.core.sampling.checkpoint_grid import checkpoint_grid

    config = tiny_config.with_overrides({"checkpoint.every_steps": 2, "train.val_every_steps": 2})
    run_to_end(config, tmp_path / "run")
    checkpoints = RunFolder(tmp_path / "run").checkpoints()
    assert len(checkpoints) == 3
    grid = checkpoint_grid(tmp_path / "run", ["a red circle on white", "a blue square on white"], seeds=[0, 1],
                           steps=2, device="cpu")
    assert [c.step for c in grid.columns] == [2, 4, 6]
    assert all(c.val_loss is not None for c in grid.columns)
    assert len(grid.images) == 3 and grid.images[0].shape[0] == 4  # 2 prompts x 2 seeds
    every2 = checkpoint_grid(tmp_path / "run", ["a red circle on white"], every=2, steps=2, device="cpu")
    assert [c.step for c in every2.columns] == [2, 6]
    image = grid.render()
    assert image.ndim == 3 and image.shape[1] > image.shape[0]

    out = tmp_path / "grid.png"
    assert main(["grid", str(tmp_path / "run"), "--prompt", "a red circle on white", "--steps", "2",
                 "--device", "cpu", "--out", str(out)]) == 0
    assert np.asarray(Image.open(out)).shape[2] == 3


def test_grid_of_a_run_without_checkpoints_is_refused(tmp_path: Path, capsys) -> None:
    (tmp_path / "run").mkdir()
    assert main(["grid", str(tmp_path / "run"), "--prompt", "x", "--out", str(tmp_path / "g.png")]) == 2
    assert "not an sdstudio run folder" in capsys.readouterr().err
