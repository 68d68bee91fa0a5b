"""The Flux.1 families on tiny-topology models: both file layouts, refusing wrong files, the real-size key
layout (meta device), a LoRA that overfits through the real training loop, previews / `sdstudio sample`, and
the kohya and diffusers exports (the latter reloaded with diffusers' own load_lora_weights)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdstudio.core.config import RunConfig
from sdstudio.core.models.family import ModelFileError
from sdstudio.core.models.flux.files import bfl_to_diffusers, diffusers_to_bfl, load_flux_components
from sdstudio.core.models.flux.offline import TRANSFORMER_CONFIG
from sdstudio.core.models.registry import get_family, recognise_model
from tests import transformer_helpers as th
from tests.tiny_flux import save_tiny_flux, save_tiny_flux_split, tiny_flux_components
from tests.transformer_helpers import same_weights as _same
from tests.transformer_helpers import train_losses as _losses


@pytest.fixture(scope="module")
def flux_dev(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_flux(tmp_path_factory.mktemp("flux") / "dev")


@pytest.fixture(scope="module")
def flux_split(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return save_tiny_flux_split(tmp_path_factory.mktemp("flux-split"), tiny_flux_components())


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
    with pytest.raises(ModelFileError, match="text_encoder_path`, `model.text_encoder_2_path`"):
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


def _train_config(model: Path, data: Path, **overrides) -> RunConfig:
    return th.tiny_run_config("flux-lora", model, data, **overrides)


@pytest.fixture(scope="module")
def trained(flux_dev: Path, four_images: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[float]]:
    run = tmp_path_factory.mktemp("flux-run") / "run"
    # the caches on: latents and T5 / CLIP features come from the disk caches, as in the presets
    cfg = _train_config(flux_dev, four_images, **{"sample.at_end": True, "checkpoint.every_steps": 30,
                                                  "flow.shift": "none", "train.learning_rate": 3e-2,
                                                  "data.cache_latents": True, "data.cache_text_embeddings": True})
    return run, _losses(cfg, run)


def test_lora_overfits_a_tiny_batch(trained: tuple[Path, list[float]]) -> None:
    run, losses = trained
    # measured ~1.36 -> ~1.07 (a learning rate of 0 stays at ~1.36): the velocity's noise part is not
    # learnable from a random tiny transformer through LoRA in 30 steps, the images' part is.
    # The default targets: attention + MLP of the double and single blocks
    keys = th.overfit_lora_keys(run, losses, th.FLUX_BLOCK_PARTS)
    assert not any(k.startswith(("transformer.proj_out", "transformer.norm_out", "transformer.x_embedder"))
                   for k in keys)
    assert list((run / "samples").glob("*.png")), "the preview at the end was written"


def _peft_lora(targets: str, rank: int, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]]]:
    """A random PEFT-named LoRA over the real-size Flux transformer's targets ("transformer.<module>.lora_A...")
    and each module's (out, in)."""
    import re

    from sdstudio.core.models.flux.model import LORA_TARGETS

    _, model = _real_size_bfl()
    gen = torch.Generator().manual_seed(seed)
    weights, shapes = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and re.fullmatch(LORA_TARGETS[targets], name):
            shapes[name] = (module.out_features, module.in_features)
            weights[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=gen) * 0.1
            weights[f"transformer.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=gen) * 0.1
    return weights, shapes


@pytest.mark.parametrize("targets", ["attention_ff", "attention"])
def test_kohya_names_and_strength_on_the_real_size_layout(targets: str) -> None:
    """The kohya export of a LoRA over the real-size layout: every key names an original Flux weight with
    matching shapes (sd-scripts' names), and diffusers' own kohya-Flux converter reads back exactly the
    trained per-module updates (alpha / rank included), fused q/k/v and linear1 stacks too."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    from sdstudio.core.models.flux.export import kohya_state

    rank, alpha = 2, 5.0
    weights, shapes = _peft_lora(targets, rank)
    source = SimpleNamespace(lora={"rank": rank, "alpha": alpha, "targets": targets, "dropout": 0.0},
                             architecture={"inner_dim": 3072}, weights=weights, checkpoint=Path("x"))
    kohya = kohya_state(source, torch.float32)  # type: ignore[arg-type]
    bfl, _ = _real_size_bfl()
    modules = {k.rsplit(".", 2)[0] for k in kohya}
    originals = {"lora_unet_" + k[: -len(".weight")].replace(".", "_"): k for k, v in bfl.items()
                 if k.endswith(".weight") and v.ndim == 2}
    assert modules <= set(originals), sorted(modules - set(originals))[:5]
    for module in modules:
        out_f, in_f = bfl[originals[module]].shape
        down, up = kohya[f"{module}.lora_down.weight"], kohya[f"{module}.lora_up.weight"]
        assert down.shape[1] == in_f and up.shape[0] == out_f and up.shape[1] == down.shape[0], module
        assert float(kohya[f"{module}.alpha"]) == alpha
    per_double = 8 if targets == "attention_ff" else 4  # qkv, proj (x2) + mlp.0, mlp.2 (x2)
    per_single = 2 if targets == "attention_ff" else 1  # linear1 (+ linear2)
    assert len(modules) == 19 * per_double + 38 * per_single
    assert "lora_unet_double_blocks_0_img_attn_qkv" in modules and "lora_unet_single_blocks_37_linear1" in modules
    # what diffusers makes of the file: the trained update of every module, at the trained strength
    converted = _convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in kohya.items()})
    probe = torch.Generator().manual_seed(3)
    for name, (_, in_f) in shapes.items():
        v = torch.randn(in_f, generator=probe)
        a, b = weights[f"transformer.{name}.lora_A.weight"], weights[f"transformer.{name}.lora_B.weight"]
        want = (alpha / rank) * (b @ (a @ v))
        ca, cb = converted[f"transformer.{name}.lora_A.weight"], converted[f"transformer.{name}.lora_B.weight"]
        assert torch.allclose(cb @ (ca @ v), want, atol=1e-4, rtol=1e-4), name


def test_exports_load_with_diffusers_and_match_the_trained_model(trained: tuple[Path, list[float]], flux_dev: Path,
                                                                  tmp_path: Path) -> None:
    from diffusers import FluxPipeline

    from sdstudio.core.models.flux.model import FluxDenoiser

    run, _ = trained
    out = th.export_loras(run, "flux-dev", tmp_path)
    meta, kmeta, kkeys = out.meta, out.kmeta, out.kkeys
    assert meta["modelspec.architecture"] == "flux-1-dev/lora" and meta["ss_base_model_version"] == "flux1"
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in kkeys
    assert "lora_unet_single_blocks_0_linear1.alpha" in kkeys
    assert kmeta["ss_network_alpha"] == "8.0" and kmeta["ss_network_dim"] == "4"
    assert kmeta["modelspec.architecture"] == "flux-1-dev/lora" and "modelspec.prediction_type" not in kmeta

    check = th.lora_in_pipeline(run, flux_dev, FluxPipeline, FluxDenoiser, tmp_path)
    assert torch.allclose(check.got, check.want, atol=1e-5), (check.got - check.want).abs().max()
    assert (check.base - check.want).abs().max() > 1e-2  # the LoRA matters


def test_sample_a_flux_folder_with_the_exported_lora(trained: tuple[Path, list[float]], flux_dev: Path,
                                                     tmp_path: Path) -> None:
    # guidance is an input of a dev model: changing it changes the image
    th.sample_with_exported_lora(trained[0], flux_dev, "flux-dev", tmp_path, steps=28, guidance=3.5)


def test_config_keys_of_the_text_conditioning(flux_dev: Path) -> None:
    """model.t5_max_length sets the T5 sequence; flow.guidance is what a dev model is fed while training
    (and changes its prediction); lora.enabled = false builds a fully trainable transformer."""
    family = get_family("flux-dev")
    base = {"model.family": "flux-dev", "lora.enabled": True, "model.path": str(flux_dev), "data.resolution": 64}
    short = family.build(RunConfig().with_overrides({**base, "model.t5_max_length": 8}), [])
    cond = short.encode_captions(["a red circle"], torch.device("cpu"))
    assert cond["states"].shape[1] == 8 and cond["pooled"].shape == (1, 32)
    assert short.text_features(["x"], torch.device("cpu"))["states"].shape[1] == 8
    default = family.build(RunConfig().with_overrides(base), [])
    assert default.encode_captions(["x"], torch.device("cpu"))["states"].shape[1] == 512  # dev's default
    guided = family.build(RunConfig().with_overrides({**base, "model.t5_max_length": 8, "flow.guidance": 4.0}), [])
    cond4 = guided.encode_captions(["a red circle"], torch.device("cpu"))
    assert float(cond["guidance"][0]) == 1.0 and float(cond4["guidance"][0]) == 4.0
    x, t = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0.5])
    with torch.no_grad():
        assert (short.trainable(x, t, cond) - guided.trainable(x, t, cond4)).abs().max() > 1e-4
    full = family.build(RunConfig().with_overrides({**base, "lora.enabled": False}), [])  # a full fine-tune
    assert all(p.requires_grad for p in full.components.transformer.parameters())
    with pytest.raises(Exception, match="multiple of 16"):
        RunConfig().with_overrides({**base, "data.resolution": 72})
    with pytest.raises(Exception, match="flow.weighting"):
        RunConfig().with_overrides({**base, "loss.min_snr_gamma": 5.0})


def test_caches_give_the_same_losses_and_resume_is_exact(flux_dev: Path, four_images: Path, tmp_path: Path) -> None:
    """Latents and T5 / CLIP features from the disk caches train exactly as encoding every step; 4 steps
    straight equal 2 + resume + 2 (the flow timesteps and noise are seeded by step)."""
    th.caches_match_and_resume_is_exact(_train_config(flux_dev, four_images, **{"train.max_steps": 4}), tmp_path)
