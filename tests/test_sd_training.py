"""Stable Diffusion fine-tuning on tiny models in the real topologies (no downloads): loading, refusing
foreign files, LoRA and full fine-tune learning, v-prediction, SDXL conditioning, the CLI preset."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdstudio.core import events as ev
from sdstudio.core.models.sd.files import ModelFileError, inspect_model, load_sd_components
from sdstudio.core.train.loop import train
from tests.sd_helpers import losses, sd_config


def test_detects_families_and_refuses_foreign_files(tiny_sd1: Path, tiny_sdxl: Path, tmp_path: Path) -> None:
    assert inspect_model(tiny_sd1).kind == "sd1"
    assert inspect_model(tiny_sdxl).kind == "sdxl"
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 4)}, str(lora))
    with pytest.raises(ModelFileError, match="LoRA"):
        load_sd_components(lora, family="sd1")
    random_file = tmp_path / "random.safetensors"
    save_file({"weight": torch.zeros(2)}, str(random_file))
    with pytest.raises(ModelFileError, match="not a Stable Diffusion checkpoint"):
        load_sd_components(random_file, family="sd1")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((tiny_sd1 / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()[:5000])
    with pytest.raises(ModelFileError, match="truncated"):
        load_sd_components(truncated, family="sd1")
    with pytest.raises(ModelFileError, match="model.family = 'sdxl'"):
        load_sd_components(tiny_sd1, family="sdxl")
    with pytest.raises(ModelFileError, match="no such file"):
        load_sd_components(tmp_path / "missing.safetensors", family="sd1")


def _falls(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values[:5]), statistics.mean(values[-5:])


def test_lora_overfits_a_tiny_batch_and_only_adapters_are_saved(tiny_sd1: Path, four_images: Path,
                                                                 tmp_path: Path) -> None:
    cfg = sd_config("sd15-lora", tiny_sd1, four_images, **{"train.learning_rate": 1e-2, "lora.rank": 4,
                                                            "lora.alpha": 8.0, "lora.targets": "all",
                                                            "train.max_steps": 40})
    first, last = _falls(losses(cfg, tmp_path / "run"))
    assert last < 0.75 * first, (first, last)  # measured: ~0.90 -> ~0.58
    from safetensors import safe_open

    with safe_open(str(tmp_path / "run" / "checkpoints" / "step-00000040" / "model.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    assert keys and all("lora" in k for k in keys), keys[:5]
    arch = json.loads((tmp_path / "run" / "checkpoints" / "step-00000040" / "model.json").read_text())
    assert arch["lora"]["rank"] == 4 and arch["lora"]["alpha"] == 8.0


def test_full_finetune_overfits(tiny_sd1: Path, four_images: Path, tmp_path: Path) -> None:
    cfg = sd_config("sd15-full", tiny_sd1, four_images, **{"train.learning_rate": 1e-3, "train.ema": False,
                                                            "train.gradient_checkpointing": False})
    first, last = _falls(losses(cfg, tmp_path / "run"))
    assert last < 0.5 * first, (first, last)  # measured: ~0.90 -> ~0.25 in 30 steps


def test_v_prediction_is_detected_and_trained(tiny_sd1_v: Path, four_images: Path, tmp_path: Path) -> None:
    cfg = sd_config("sd15-lora", tiny_sd1_v, four_images, **{"train.max_steps": 3})
    events = list(train(cfg, run_dir=tmp_path / "run"))
    assert isinstance(events[-1], ev.Finished)
    from sdstudio.core.sampling.from_run import load_trained

    loaded = load_trained(tmp_path / "run")
    assert loaded.bundle.prediction_type == "v_prediction"
    assert loaded.scheduler.config.prediction_type == "v_prediction"


def test_sdxl_lora_trains_and_samples(tiny_sdxl: Path, four_images: Path, tmp_path: Path) -> None:
    cfg = sd_config("sdxl-lora", tiny_sdxl, four_images, **{"train.max_steps": 3, "sample.at_end": True,
                                                             "sample.prompts": ["a red circle"]})
    events = list(train(cfg, run_dir=tmp_path / "run"))
    assert isinstance(events[-1], ev.Finished), events[-1]
    grid = next(e for e in events if isinstance(e, ev.SampleGrid))
    assert grid.image.shape[0] == 64 + 4 and grid.image.dtype.name == "uint8"
    assert all(torch.isfinite(torch.tensor(e.loss)) for e in events if isinstance(e, ev.StepMetrics))


def test_sd15_lora_preset_from_the_cli(tiny_sd1: Path, four_images: Path, tmp_path: Path, capsys) -> None:
    from sdstudio.cli import main

    run = tmp_path / "run"
    code = main(["train", "--preset", "sd15-lora", "--data", str(four_images), "--out", str(run), "--quiet",
                 "--set", f"model.path={tiny_sd1}", "--set", "data.resolution=64", "--set", "train.max_steps=2",
                 "--set", "train.batch_size=2", "--set", "sample.every_steps=0", "--set", "sample.steps=2",
                 "--set", "sample.seeds=[0]"])
    assert code == 0, capsys.readouterr().err
    assert "ignored on the CPU" in capsys.readouterr().err
    out = tmp_path / "samples"
    assert main(["sample", "--run", str(run), "--prompt", "a red circle", "--n", "1", "--steps", "2",
                 "--out", str(out)]) == 0
    assert (out / "grid.png").is_file()


def test_latent_cache_gives_the_same_loss_and_is_reused(tiny_sd1: Path, four_images: Path, tmp_path: Path) -> None:
    plain = sd_config("sd15-lora", tiny_sd1, four_images, **{"train.max_steps": 2})
    cached = plain.with_overrides({"data.cache_latents": True})
    without = losses(plain, tmp_path / "plain")
    events = list(train(cached, run_dir=tmp_path / "cached"))
    assert isinstance(events[-1], ev.Finished), events[-1]
    progress = [e for e in events if isinstance(e, ev.Progress) and e.what == "caching latents"]
    assert progress and progress[-1].done == progress[-1].total == 4
    with_cache = [e.loss for e in events if isinstance(e, ev.StepMetrics)]
    assert with_cache == pytest.approx(without, rel=1e-4, abs=1e-5)
    again = list(train(cached, run_dir=tmp_path / "cached-again"))
    assert not [e for e in again if isinstance(e, ev.Progress)], "a second run reuses every cached latent"
    assert [e.loss for e in again if isinstance(e, ev.StepMetrics)] == pytest.approx(with_cache, rel=1e-5)


@pytest.mark.parametrize("model_fixture", ["tiny_sd1", "tiny_sdxl"])
def test_text_embedding_cache_gives_the_same_loss(model_fixture: str, request, four_images: Path,
                                                  tmp_path: Path) -> None:
    model = request.getfixturevalue(model_fixture)
    preset = "sdxl-lora" if model_fixture == "tiny_sdxl" else "sd15-lora"
    plain = sd_config(preset, model, four_images, **{"train.max_steps": 2, "data.caption_dropout": 0.5})
    cached = plain.with_overrides({"data.cache_text_embeddings": True, "data.cache_latents": True})
    without = losses(plain, tmp_path / "plain")
    events = list(train(cached, run_dir=tmp_path / "cached"))
    assert isinstance(events[-1], ev.Finished), events[-1]
    text_progress = [e for e in events if isinstance(e, ev.Progress) and e.what == "caching text embeddings"]
    assert text_progress and text_progress[-1].total == 5, "4 captions + the empty caption of dropout"
    assert [e.loss for e in events if isinstance(e, ev.StepMetrics)] == pytest.approx(without, rel=1e-4, abs=1e-5)


def test_dreambooth_prior_loss(tiny_sd1: Path, four_images: Path, class_images: Path, tmp_path: Path) -> None:
    plain = sd_config("sd15-lora", tiny_sd1, four_images, **{"train.max_steps": 3, "data.instance_prompt": "sks"})
    with_reg = plain.with_overrides({"data.reg_path": str(class_images), "data.class_prompt": "a shape"})
    base = losses(plain, tmp_path / "plain")
    zero = losses(with_reg.with_overrides({"loss.prior_loss_weight": 0.0}), tmp_path / "zero")
    # weight 0: the class images ride along in the forward but do not change the instance loss
    assert zero == pytest.approx(base, rel=1e-4, abs=1e-6)
    weighted = losses(with_reg, tmp_path / "weighted")
    assert weighted[0] > base[0], "the first step's loss includes the prior term"


def test_zero_terminal_snr_marker_is_applied(tiny_sd1: Path, four_images: Path, tmp_path: Path) -> None:
    """A single file with ComfyUI's `ztsnr` marker key trains and samples with a rescaled schedule."""
    from sdstudio.core.export.single_file import write_single_file
    from sdstudio.core.sampling.from_run import load_trained
    from tests.tiny_models import tiny_sd1_components

    single = write_single_file(tiny_sd1_components(), tmp_path / "ztsnr.safetensors", family="sd1",
                               dtype=torch.float32, zero_terminal_snr=True, v_prediction=True)
    assert inspect_model(single).zero_terminal_snr and inspect_model(single).prediction_type == "v_prediction"
    cfg = sd_config("sd15-lora", single, four_images, **{"train.max_steps": 1, "model.config_folder": str(tiny_sd1)})
    assert isinstance(list(train(cfg, run_dir=tmp_path / "run"))[-1], ev.Finished)
    loaded = load_trained(tmp_path / "run")
    assert loaded.scheduler.config.rescale_betas_zero_snr and float(loaded.scheduler.alphas_cumprod[-1]) < 1e-6
    assert loaded.scheduler.config.prediction_type == "v_prediction"
