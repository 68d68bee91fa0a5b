"""The Flux.1 families on tiny-topology models: both file layouts, refusing wrong files, the real-size key
layout (meta device), a LoRA that overfits through the real training loop, previews / `sdstudio sample`, and
the kohya and diffusers exports (the latter reloaded with diffusers' own load_lora_weights)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdstudio.core import events as ev
from sdstudio.core.config import RunConfig
from sdstudio.core.models.family import ModelFileError
from sdstudio.core.models.flux.files import bfl_to_diffusers, diffusers_to_bfl, load_flux_components
from sdstudio.core.models.flux.offline import TRANSFORMER_CONFIG
from sdstudio.core.models.registry import get_family, recognise_model
from sdstudio.core.presets import load_preset
from sdstudio.core.train.loop import train
from tests.tiny_flux import save_tiny_flux, save_tiny_flux_split, tiny_flux_components


@pytest.fixture(scope="module")
def flux_dev(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_flux(tmp_path_factory.mktemp("flux") / "dev")


@pytest.fixture(scope="module")
def flux_split(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return save_tiny_flux_split(tmp_path_factory.mktemp("flux-split"), tiny_flux_components())


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])][:3]


def test_both_layouts_give_identical_weights(flux_dev: Path, flux_split: dict[str, Path], tmp_path: Path) -> None:
    folder = load_flux_components(flux_dev)
    split = load_flux_components(flux_split["flux1"], config_folder=flux_dev, vae_path=flux_split["ae"],
                                 text_encoder_path=flux_split["clip_l"], text_encoder_2_path=flux_split["t5xxl"])
    assert folder.variant == split.variant == "dev"
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        _same(getattr(folder, name), getattr(split, name))
    # an fp8 e4m3fn transformer file loads straight into the model's dtype: the fp8 values, exactly
    fp8 = save_tiny_flux_split(tmp_path / "fp8", tiny_flux_components(), dtype=torch.float8_e4m3fn)["flux1"]
    with safe_open(str(fp8), "pt") as fh:
        assert fh.get_tensor("img_in.weight").dtype == torch.float8_e4m3fn
    loaded = load_flux_components(fp8, config_folder=flux_dev, vae_path=flux_split["ae"],
                                  text_encoder_path=flux_split["clip_l"], text_encoder_2_path=flux_split["t5xxl"])
    want = folder.transformer.state_dict()
    got = loaded.transformer.state_dict()
    assert all(torch.equal(got[k], want[k].to(torch.float8_e4m3fn).float()) for k in want)


def test_families_recognise_their_files(flux_dev: Path, flux_split: dict[str, Path], tmp_path: Path) -> None:
    assert recognise_model(flux_dev).name == "flux-dev"
    assert recognise_model(flux_split["flux1"]).name == "flux-dev"
    schnell = save_tiny_flux_split(tmp_path / "s", tiny_flux_components(guidance=False))["flux1"]
    assert recognise_model(schnell).name == "flux-schnell"
    assert recognise_model(flux_split["t5xxl"]) is None and recognise_model(flux_split["ae"]) is None


def _split_config(model: Path, split: dict[str, Path], config_folder: Path, **more) -> RunConfig:
    return RunConfig().with_overrides({"model.family": "flux-dev", "lora.enabled": True, "model.path": str(model),
                                       "model.config_folder": str(config_folder), "model.vae_path": str(split["ae"]),
                                       "model.text_encoder_path": str(split["clip_l"]),
                                       "model.text_encoder_2_path": str(split["t5xxl"]), **more})


def test_wrong_files_are_refused_with_what_they_look_like(flux_dev: Path, flux_split: dict[str, Path],
                                                          tmp_path: Path) -> None:
    family = get_family("flux-dev")
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2),
               "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": torch.zeros(2)}, str(sdxl))
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(1, 2)}, str(lora))
    for path, looks in ((sdxl, "Stable Diffusion"), (lora, "a LoRA"), (flux_split["t5xxl"], "a T5 text encoder"),
                        (flux_split["clip_l"], "a CLIP text encoder"), (flux_split["ae"], "a VAE")):
        with pytest.raises(ModelFileError, match=looks):
            family.build(_split_config(path, flux_split, flux_dev), [])
    # a file in the wrong text-encoder slot
    with pytest.raises(ModelFileError, match="text_encoder_2_path.*a CLIP text encoder"):
        family.build(_split_config(flux_split["flux1"], {**flux_split, "t5xxl": flux_split["clip_l"]}, flux_dev), [])
    with pytest.raises(ModelFileError, match="text_encoder_path, model.text_encoder_2_path"):
        family.build(RunConfig().with_overrides({"model.family": "flux-dev", "lora.enabled": True,
                                                 "model.path": str(flux_split["flux1"])}), [])
    with pytest.raises(ModelFileError, match="model.family = 'flux-dev'"):
        get_family("flux-schnell").build(RunConfig().with_overrides(
            {"model.family": "flux-schnell", "lora.enabled": True, "model.path": str(flux_dev)}), [])


def _real_size_bfl() -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        model = FluxTransformer2DModel(**{k: v for k, v in TRANSFORMER_CONFIG.items() if not k.startswith("_")})
    return diffusers_to_bfl(model.state_dict()), model


def test_original_key_mapping_matches_diffusers_on_the_real_size_layout() -> None:
    """Our diffusers -> original mapping, read back by diffusers' own converter (which hard-codes the real
    width, so only the real-size layout on the meta device), gives the model's keys and shapes; ours reads it
    back the same."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    bfl, model = _real_size_bfl()
    assert "double_blocks.18.img_attn.qkv.weight" in bfl and "single_blocks.37.linear1.weight" in bfl
    assert "guidance_in.in_layer.weight" in bfl and "final_layer.adaLN_modulation.1.weight" in bfl
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert {k: tuple(v.shape) for k, v in theirs.items()} == want
    ours = bfl_to_diffusers(dict(bfl), TRANSFORMER_CONFIG)
    assert {k: tuple(v.shape) for k, v in ours.items()} == want
    assert sum(v.numel() for v in model.state_dict().values()) == 11_901_408_320  # FLUX.1-dev's parameters


def test_original_key_mapping_round_trips_values() -> None:
    comps = tiny_flux_components()
    state = comps["transformer"].state_dict()
    back = bfl_to_diffusers(diffusers_to_bfl(state), dict(comps["transformer"].config))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    # the final norm's (scale, shift) halves are swapped into the original (shift, scale)
    bfl = diffusers_to_bfl(state)
    assert torch.equal(bfl["final_layer.adaLN_modulation.1.weight"][:32], state["norm_out.linear.weight"][32:])
