"""LoRA exports checked against a consumer no one here wrote: diffusers' `load_lora_weights` must change
the UNet output exactly as the trained peft model does, for the kohya file and the diffusers file alike,
with alpha != rank; key names match real SD1.5 / SDXL LoRAs; metadata reads back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sdstudio.cli import main
from sdstudio.core import events as ev
from sdstudio.core.export.api import export
from sdstudio.core.sampling.from_run import load_trained
from sdstudio.core.train.loop import train
from tests.sd_helpers import sd_config


def trained_lora_run(model: Path, data: Path, run: Path, preset: str) -> Path:
    cfg = sd_config(preset, model, data, **{"train.max_steps": 3, "train.learning_rate": 2e-2, "lora.rank": 4,
                                            "lora.alpha": 2.0, "lora.targets": "attention_ff"})
    events = list(train(cfg, run_dir=run))
    assert isinstance(events[-1], ev.Finished), events[-1]
    return run


def unet_output(unet: torch.nn.Module, sdxl: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    cross = unet.config.cross_attention_dim
    x = torch.randn(1, 4, 8, 8, generator=gen)
    states = torch.randn(1, 77, cross, generator=gen)
    added = None
    if sdxl:
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(1, pooled, generator=gen),
                 "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}
    with torch.no_grad():
        return unet(x, torch.tensor([500]), encoder_hidden_states=states, added_cond_kwargs=added).sample


def consumer_output(model_folder: Path, lora_file: Path, sdxl: bool) -> torch.Tensor:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    pipe = cls.from_pretrained(str(model_folder), local_files_only=True)
    pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    return unet_output(pipe.unet, sdxl)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_kohya_and_diffusers_files_load_with_the_trained_strength(family: str, tiny_sd1: Path, tiny_sdxl: Path,
                                                                  four_images: Path, tmp_path: Path) -> None:
    sdxl = family == "sdxl"
    model = tiny_sdxl if sdxl else tiny_sd1
    run = trained_lora_run(model, four_images, tmp_path / "run", "sdxl-lora" if sdxl else "sd15-lora")
    trained = unet_output(load_trained(run).bundle.components.unet, sdxl)
    from diffusers import UNet2DConditionModel

    base = unet_output(UNet2DConditionModel.from_pretrained(str(model), subfolder="unet"), sdxl)
    assert not torch.allclose(trained, base, atol=1e-4), "the LoRA must change the output for this test to mean much"

    kohya = export(run, "kohya", tmp_path / "kohya.safetensors", dtype=torch.float32)
    diff = export(run, "diffusers", tmp_path / "diffusers.safetensors", dtype=torch.float32)
    for path in (kohya, diff):
        out = consumer_output(model, path, sdxl)
        assert torch.allclose(out, trained, atol=1e-5, rtol=1e-4), f"{path.name}: {(out - trained).abs().max()}"

    with safe_open(str(kohya), "pt") as fh:
        keys = list(fh.keys())
        meta = fh.metadata()
        alphas = {fh.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    assert alphas == {2.0}, "alpha is the trained alpha, not the rank"
    if sdxl:
        assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
        assert not any("down_blocks" in k for k in keys), "one naming scheme per file"
        assert meta["ss_base_model_version"].startswith("sdxl_")
    else:
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
        assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    # a UNet-only LoRA (lora.text_encoder = false): kohya's flag says so and no lora_te* key is written
    assert meta["ss_network_train_unet_only"] == "True" and not any(k.startswith("lora_te") for k in keys)
    assert meta["modelspec.architecture"].endswith("/lora") and meta["modelspec.sai_model_spec"] == "1.0.0"
    assert json.loads(meta["sdstudio_config"])["lora"]["rank"] == 4
    assert json.loads(meta["ss_tag_frequency"]), "tag frequencies of the training captions"
    assert len(meta["sshs_model_hash"]) == 64 and meta["ss_steps"] == "3"


def test_export_refuses_overwrite_and_foreign_input(tiny_sd1: Path, four_images: Path, tmp_path: Path,
                                                    capsys) -> None:
    run = trained_lora_run(tiny_sd1, four_images, tmp_path / "run", "sd15-lora")
    out = tmp_path / "x.safetensors"
    assert main(["export", str(run), "--format", "kohya", "--out", str(out)]) == 0
    first = out.read_bytes()
    assert main(["export", str(run), "--format", "kohya", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and out.read_bytes() == first
    assert main(["export", str(run), "--format", "diffusers", "--out", str(out), "--force", "--dtype", "bf16"]) == 0
    assert main(["export", str(tmp_path), "--format", "kohya", "--out", str(tmp_path / "y.safetensors")]) == 2
    assert "neither a run folder" in capsys.readouterr().err
    assert main(["export", str(run), "--format", "kohya", "--out", str(tmp_path / "z.safetensors"), "--ema"]) == 2
    assert "without EMA" in capsys.readouterr().err
    assert not list(tmp_path.glob(".*.tmp")), "no temp files left behind"


def test_full_finetune_single_file_equals_diffusers_folder(tiny_sd1: Path, four_images: Path, tmp_path: Path) -> None:
    from sdstudio.core.models.sd.files import load_sd_components
    from sdstudio.core.train import state

    cfg = sd_config("sd15-full", tiny_sd1, four_images, **{"train.max_steps": 2, "train.learning_rate": 1e-2,
                                                            "train.ema": False, "train.gradient_checkpointing": False})
    run = tmp_path / "run"
    assert isinstance(list(train(cfg, run_dir=run))[-1], ev.Finished)
    single = export(run, "single-file", tmp_path / "model.safetensors", dtype=torch.float32)
    folder = export(run, "diffusers-folder", tmp_path / "folder", dtype=torch.float32)
    from_file = load_sd_components(single, family="sd1", config_folder=tiny_sd1)
    from_folder = load_sd_components(folder, family="sd1")
    trained = {k[len("unet."):]: v for k, v in state.load_weights(run / "checkpoints" / "step-00000002").items()}
    for name, tensor in from_file.unet.state_dict().items():
        assert torch.equal(tensor, from_folder.unet.state_dict()[name]), name
        assert torch.equal(tensor, trained[name]), name
    for a, b in zip(from_file.vae.state_dict().values(), from_folder.vae.state_dict().values()):
        assert torch.equal(a, b)
    with safe_open(str(single), "pt") as fh:
        meta = fh.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-v1" and "sdstudio_config" in meta


def test_lora_run_merged_into_a_single_file(tiny_sd1: Path, four_images: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    run = trained_lora_run(tiny_sd1, four_images, tmp_path / "run", "sd15-lora")
    trained = unet_output(load_trained(run).bundle.components.unet, sdxl=False)
    single = export(run, "single-file", tmp_path / "merged.safetensors", dtype=torch.float32)
    pipe = StableDiffusionPipeline.from_single_file(str(single), config=str(tiny_sd1), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)
    merged = unet_output(pipe.unet, sdxl=False)
    # Merging moves the LoRA's product into the weights, so fp32 rounding differs by ~1e-4 of the output's scale
    # (elementwise rtol fails on outputs near zero, depending on the CPU kernels' path); a wrong merge is off by
    # the LoRA's whole effect.
    assert (merged - trained).abs().max() <= 1e-4 * trained.abs().max()


def test_runs_export_automatically_at_the_end(tiny_sd1: Path, four_images: Path, tmp_path: Path) -> None:
    cfg = sd_config("sd15-lora", tiny_sd1, four_images, **{"train.max_steps": 2, "export.formats": ["kohya", "diffusers"],
                                                            "name": "mine"})
    events = list(train(cfg, run_dir=tmp_path / "run"))
    assert isinstance(events[-1], ev.Finished)
    names = sorted(p.name for p in (tmp_path / "run" / "exports").iterdir())
    assert names == ["mine-step00000002-diffusers.safetensors", "mine-step00000002-kohya.safetensors"]


def test_export_config_is_checked_against_the_run() -> None:
    from sdstudio.core.config import RunConfig
    from sdstudio.core.errors import ConfigError

    with pytest.raises(ConfigError, match="export a LoRA but this run trains none"):
        RunConfig().with_overrides({"export.formats": ["kohya"]})
    with pytest.raises(ConfigError, match="needs train.ema"):
        RunConfig().with_overrides({"export.ema": True})
