"""The SD3 / SD3.5 family on tiny-topology models: both file layouts, telling the variants apart, refusing wrong
files, the real-size key layouts (meta device), a LoRA that overfits through the real training loop (the preset,
caches on), previews / `sdstudio sample`, resume, and the exports: the default diffusers layout reloaded with
diffusers' own StableDiffusion3Pipeline.load_lora_weights, and kohya names checked on the real-size layout."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdstudio.core.config import RunConfig
from sdstudio.core.models.family import ModelFileError
from sdstudio.core.models.registry import family_of_lora, get_family, recognise_model
from sdstudio.core.models.sd3.files import diffusers_to_sd3, load_sd3_components, sd3_to_diffusers
from tests import transformer_helpers as th
from tests.tiny_sd3 import save_tiny_sd3, save_tiny_sd3_split, tiny_sd3_components
from tests.transformer_helpers import same_weights as _same


@pytest.fixture(scope="module")
def sd35(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sd3(tmp_path_factory.mktemp("sd3") / "large")


@pytest.fixture(scope="module")
def sd35_split(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return save_tiny_sd3_split(tmp_path_factory.mktemp("sd3-split"), tiny_sd3_components())


def _split_kwargs(split: dict[str, Path]) -> dict[str, Path]:
    return {"vae_path": split["vae"], "text_encoder_path": split["clip_l"], "clip_g_path": split["clip_g"],
            "t5_path": split["t5xxl"]}


def test_both_layouts_give_identical_weights(sd35: Path, sd35_split: dict[str, Path], tmp_path: Path) -> None:
    folder = load_sd3_components(sd35)
    split = load_sd3_components(sd35_split["sd3"], config_folder=sd35, **_split_kwargs(sd35_split))
    assert folder.variant == split.variant == "3.5-large"
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        _same(getattr(folder, name), getattr(split, name))
    # an fp8 e4m3fn transformer file loads straight into the model's dtype: the fp8 values, exactly
    fp8 = save_tiny_sd3_split(tmp_path / "fp8", tiny_sd3_components(), dtype=torch.float8_e4m3fn)["sd3"]
    with safe_open(str(fp8), "pt") as fh:
        assert fh.get_tensor("model.diffusion_model.x_embedder.proj.weight").dtype == torch.float8_e4m3fn
    loaded = load_sd3_components(fp8, config_folder=sd35, **_split_kwargs(sd35_split))
    want, got = folder.transformer.state_dict(), loaded.transformer.state_dict()
    assert all(torch.equal(got[k], want[k].to(torch.float8_e4m3fn).float()) for k in want)


@pytest.mark.parametrize("variant", ["3.5-medium", "3-medium"])
def test_variants_are_told_apart_by_their_keys(variant: str, tmp_path: Path) -> None:
    comps = tiny_sd3_components(variant=variant)
    split = save_tiny_sd3_split(tmp_path / "s", comps)
    assert recognise_model(split["sd3"]).name == "sd3"
    loaded = load_sd3_components(split["sd3"], config_folder=save_tiny_sd3(tmp_path / "f", variant=variant),
                                 **_split_kwargs(split))
    assert loaded.variant == variant
    _same(loaded.transformer, comps["transformer"])


def test_the_family_recognises_its_files_and_refuses_others(sd35: Path, sd35_split: dict[str, Path],
                                                            tmp_path: Path) -> None:
    assert recognise_model(sd35).name == "sd3" and recognise_model(sd35_split["sd3"]).name == "sd3"
    assert recognise_model(sd35_split["t5xxl"]) is None and recognise_model(sd35_split["vae"]) is None
    family = get_family("sd3")
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2),
               "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": torch.zeros(2)}, str(sdxl))
    flux = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2),
               "single_blocks.0.linear1.weight": torch.zeros(2, 2)}, str(flux))
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.zeros(1, 2)}, str(lora))
    base = {"model.family": "sd3", "lora.enabled": True, "model.config_folder": str(sd35),
            "model.vae_path": str(sd35_split["vae"]), "model.text_encoder_path": str(sd35_split["clip_l"]),
            "model.clip_g_path": str(sd35_split["clip_g"]), "model.text_encoder_2_path": str(sd35_split["t5xxl"])}
    for path, looks in ((sdxl, "Stable Diffusion"), (flux, "a Flux transformer"), (lora, "a LoRA"),
                        (sd35_split["t5xxl"], "a T5 text encoder"), (sd35_split["clip_l"], "a CLIP text encoder")):
        assert recognise_model(path) is None or recognise_model(path).name != "sd3"
        with pytest.raises(ModelFileError, match=looks):
            family.build(RunConfig().with_overrides({**base, "model.path": str(path)}), [])
    # a file in the wrong text-encoder slot, and missing ones named by their config keys
    with pytest.raises(ModelFileError, match="clip_g_path.*a T5 text encoder"):
        family.build(RunConfig().with_overrides({**base, "model.path": str(sd35_split["sd3"]),
                                                 "model.clip_g_path": str(sd35_split["t5xxl"])}), [])
    with pytest.raises(ModelFileError, match="text_encoder_path`, `model.clip_g_path`, `model.text_encoder_2_path`"):
        family.build(RunConfig().with_overrides({"model.family": "sd3", "lora.enabled": True,
                                                 "model.path": str(sd35_split["sd3"])}), [])


@functools.cache
def _meta_transformer(name: str) -> torch.nn.Module:
    """The real-size transformer on the meta device (its sin-cos position table is computed for real: built once)."""
    from accelerate import init_empty_weights
    from diffusers import SD3Transformer2DModel

    from sdstudio.core.models.sd3.offline import component_config

    config = component_config(None, name, "transformer")
    with init_empty_weights():
        return SD3Transformer2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})


@pytest.mark.parametrize(("variant", "params"), [("3.5-large", 8_056_600_000), ("3.5-medium", 2_243_000_000)])
def test_original_key_mapping_on_the_real_size_layouts(variant: str, params: int) -> None:
    """The shipped configs have the published sizes; our diffusers -> original mapping, read back by diffusers'
    converter, gives the model's keys and shapes, and the keys tell the variant."""
    from sdstudio.core.models.sd3.files import variant_of_keys

    model = _meta_transformer(variant)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=0.01)
    original = diffusers_to_sd3(model.state_dict())
    assert "joint_blocks.37.x_block.attn.qkv.weight" in original if variant == "3.5-large" else \
        "joint_blocks.12.x_block.attn2.qkv.weight" in original
    assert variant_of_keys([f"model.diffusion_model.{k}" for k in original]) == variant
    back = sd3_to_diffusers({k: v for k, v in original.items()})
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_original_key_mapping_round_trips_values() -> None:
    state = tiny_sd3_components(variant="3.5-medium")["transformer"].state_dict()
    back = sd3_to_diffusers(diffusers_to_sd3(state))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def _train_config(model: Path, data: Path, **overrides) -> RunConfig:
    return th.tiny_run_config("sd35-lora", model, data, **{"model.t5_max_length": 8, **overrides})


@pytest.fixture(scope="module")
def trained(sd35: Path, four_images: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[float]]:
    """`sdstudio train --preset sd35-lora` on the tiny model (the preset's caches on: latents and CLIP / T5
    features come from the disk caches), made tiny and fast by --set."""
    import json

    from sdstudio.cli import main

    run = tmp_path_factory.mktemp("sd3-run") / "run"
    base = _train_config(sd35, four_images).to_dict()
    overrides = {"model.path": str(sd35), "data.resolution": 64, "data.val_split": 0.0, "train.batch_size": 4,
                 "train.max_steps": 30, "train.log_every": 1, "train.warmup_steps": 0, "train.lr_scheduler":
                 "constant", "train.device": "cpu", "train.mixed_precision": "no",
                 "train.gradient_checkpointing": False, "train.learning_rate": 3e-2, "sample.every_steps": 0,
                 "sample.at_end": True, "sample.steps": 2, "sample.seeds": [0], "checkpoint.every_steps": 30,
                 "model.t5_max_length": 8, "lora.rank": 4, "lora.alpha": 8.0, "export.formats": []}
    assert base["data"]["cache_latents"] is False  # _train_config turns them off; the preset has them on
    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    assert main(["train", "--preset", "sd35-lora", "--data", str(four_images), "--out", str(run), "--quiet", *sets]) == 0
    from sdstudio.core.runs.folder import load_run_config

    config = load_run_config(run)
    assert config.model.family == "sd3" and config.data.cache_text_embeddings and config.data.cache_latents
    assert config.flow.shift == "auto" and config.export.formats == []
    return run, th.logged_losses(run)


def test_lora_overfits_a_tiny_batch(trained: tuple[Path, list[float]]) -> None:
    run, losses = trained
    # the preset's targets: q/k/v/out of both streams of the joint blocks, no MLP, nothing outside the blocks
    keys = th.overfit_lora_keys(run, losses, tuple(f"transformer_blocks.0.{part}" for part in (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
        "attn.add_v_proj", "attn.to_add_out")))
    assert not any(".ff." in k or ".ff_context." in k or k.startswith("transformer.proj_out") for k in keys)
    assert list((run / "samples").glob("*.png")), "the preview at the end was written"


def test_lora_targets_per_setting() -> None:
    from sdstudio.core.models.sd3.model import LORA_TARGETS

    names = [n for n, m in tiny_sd3_components(variant="3.5-medium")["transformer"].named_modules()
             if isinstance(m, torch.nn.Linear)]
    hit = {t: {n for n in names if re.fullmatch(LORA_TARGETS[t], n)} for t in LORA_TARGETS}
    assert "transformer_blocks.0.attn2.to_q" in hit["attention"]  # 3.5 medium's second attention
    assert "transformer_blocks.0.ff.net.2" in hit["attention_ff"] - hit["attention"]
    assert "transformer_blocks.1.norm1_context.linear" in hit["all"] - hit["attention_ff"]
    assert not any(n.startswith(("proj_out", "context_embedder", "time_text_embed")) for n in hit["all"])


def _peft_lora(targets: str, rank: int, variant: str) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]]]:
    from sdstudio.core.models.sd3.model import LORA_TARGETS

    gen = torch.Generator().manual_seed(0)
    weights, shapes = {}, {}
    for name, module in _meta_transformer(variant).named_modules():
        if isinstance(module, torch.nn.Linear) and re.fullmatch(LORA_TARGETS[targets], name):
            shapes[name] = (module.out_features, module.in_features)
            weights[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=gen) * 0.1
            weights[f"transformer.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=gen) * 0.1
    return weights, shapes


@pytest.mark.parametrize(("variant", "targets"), [("3.5-large", "all"), ("3.5-medium", "attention")])
def test_kohya_names_on_the_real_size_layout(variant: str, targets: str) -> None:
    """Every kohya key names an original SD3 weight (``lora_unet_`` + its name, as ComfyUI maps them) with
    matching shapes, and the fused q/k/v LoRA applies exactly the trained per-module updates (alpha / rank)."""
    from sdstudio.core.models.sd3.export import kohya_state
    from sdstudio.core.models.sd3.files import FUSED

    rank, alpha = 2, 5.0
    weights, shapes = _peft_lora(targets, rank, variant)
    model = _meta_transformer(variant)
    inner = model.config.num_attention_heads * model.config.attention_head_dim
    source = SimpleNamespace(lora={"rank": rank, "alpha": alpha, "targets": targets, "dropout": 0.0},
                             architecture={"inner_dim": inner}, weights=weights, checkpoint=Path("x"))
    kohya = kohya_state(source, torch.float32)  # type: ignore[arg-type]
    original = diffusers_to_sd3(model.state_dict())
    originals = {"lora_unet_" + k[: -len(".weight")].replace(".", "_"): k for k, v in original.items()
                 if k.endswith(".weight") and v.ndim == 2}
    modules = {k.rsplit(".", 2)[0] for k in kohya}
    assert modules <= set(originals), sorted(modules - set(originals))[:5]
    for module in modules:
        out_f, in_f = original[originals[module]].shape
        down, up = kohya[f"{module}.lora_down.weight"], kohya[f"{module}.lora_up.weight"]
        assert down.shape[1] == in_f and up.shape[0] == out_f and up.shape[1] == down.shape[0], module
        assert float(kohya[f"{module}.alpha"]) == alpha
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv" in modules
    assert "lora_unet_joint_blocks_0_context_block_attn_proj" in modules
    if variant == "3.5-medium":
        assert "lora_unet_joint_blocks_12_x_block_attn2_qkv" in modules
    else:
        assert "lora_unet_joint_blocks_37_x_block_mlp_fc2" in modules
        assert "lora_unet_joint_blocks_37_context_block_adaLN_modulation_1" in modules
    # the fused LoRA's update of each q/k/v slice is the trained one (alpha / rank, one probe vector)
    fused_of = {f"{p}": (o, j) for o, parts in FUSED.items() for j, p in enumerate(parts)}
    probe = torch.Generator().manual_seed(3)
    for name, (out_f, in_f) in shapes.items():
        i, rest = re.match(r"transformer_blocks\.(\d+)\.(.+)", name).groups()
        if rest not in fused_of:
            continue
        fused, j = fused_of[rest]
        key = f"lora_unet_joint_blocks_{i}_{fused.replace('.', '_')}"
        v = torch.randn(in_f, generator=probe)
        a, b = weights[f"transformer.{name}.lora_A.weight"], weights[f"transformer.{name}.lora_B.weight"]
        down, up = kohya[f"{key}.lora_down.weight"], kohya[f"{key}.lora_up.weight"]
        got = (alpha / down.shape[0]) * (up @ (down @ v))[j * out_f:(j + 1) * out_f]
        assert torch.allclose(got, (alpha / rank) * (b @ (a @ v)), atol=1e-4, rtol=1e-4), name


def test_exports_load_with_diffusers_and_match_the_trained_model(trained: tuple[Path, list[float]], sd35: Path,
                                                                  tmp_path: Path) -> None:
    from diffusers import StableDiffusion3Pipeline

    from sdstudio.core.models.sd3.model import SD3Denoiser

    run, _ = trained
    out = th.export_loras(run, "sd3", tmp_path)
    meta, kmeta, kkeys = out.meta, out.kmeta, out.kkeys
    assert meta["modelspec.architecture"] == "stable-diffusion-3-3-5-large/lora"
    assert meta["ss_base_model_version"] == "sd3.5_large" and meta["ss_network_alpha"] == "4"
    assert "modelspec.prediction_type" not in meta and meta["ss_network_module"] == "networks.lora_sd3"
    assert family_of_lora(meta).name == "sd3"
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight" in kkeys
    assert "lora_unet_joint_blocks_0_context_block_attn_proj.alpha" in kkeys
    assert kmeta["ss_network_alpha"] == "8.0" and kmeta["ss_network_dim"] == "4"

    check = th.lora_in_pipeline(run, sd35, StableDiffusion3Pipeline, SD3Denoiser, tmp_path)
    # the conditioning is what the diffusers pipeline computes from the prompts
    states, _, pooled, _ = check.pipe.encode_prompt(["a red circle", "a blue square"], None, None,
                                                    do_classifier_free_guidance=False, max_sequence_length=8)
    assert torch.allclose(states, check.cond["states"], atol=1e-5)
    assert torch.allclose(pooled, check.cond["pooled"], atol=1e-5)
    assert torch.allclose(check.got, check.want, atol=1e-5), (check.got - check.want).abs().max()
    assert (check.base - check.want).abs().max() > 1e-2  # the LoRA matters


def test_sample_an_sd3_folder_with_the_exported_lora(trained: tuple[Path, list[float]], sd35: Path,
                                                      tmp_path: Path) -> None:
    from sdstudio.core.export.formats import writer_for
    from sdstudio.core.sampling.from_files import LoraFileError, load_model

    # real classifier-free guidance: the guidance scale changes the image
    sampled = th.sample_with_exported_lora(trained[0], sd35, "sd3", tmp_path, steps=28, guidance=4.5)
    source, lora = sampled.source, sampled.lora
    kohya = writer_for("kohya", get_family("sd3"))(source, tmp_path / "k.safetensors", dtype=torch.float32)
    with pytest.raises(LoraFileError, match="kohya names"):
        load_model(sd35, lora=kohya, device="cpu")
    from sdstudio.cli import main

    out = tmp_path / "cli"
    assert main(["sample", "--model", str(sd35), "--lora", str(lora), "--prompt", "a red circle", "--n", "1",
                 "--steps", "2", "--out", str(out)]) == 0
    assert list(out.glob("*.png"))


def test_config_keys_of_the_text_conditioning(sd35: Path) -> None:
    """model.t5_max_length sets the T5 part of the sequence (77 CLIP tokens first; SD3's default 256);
    a full fine-tune builds the whole transformer trainable in fp32; DDPM-only settings are refused by the config."""
    family = get_family("sd3")
    base = {"model.family": "sd3", "lora.enabled": True, "model.path": str(sd35), "data.resolution": 64}
    short = family.build(RunConfig().with_overrides({**base, "model.t5_max_length": 8}), [])
    cond = short.encode_captions(["a red circle"], torch.device("cpu"))
    assert cond["states"].shape == (1, 77 + 8, 96) and cond["pooled"].shape == (1, 32 + 48)
    assert "guidance" not in cond  # real CFG: no guidance input
    default = family.build(RunConfig().with_overrides(base), [])
    assert default.encode_captions(["x"], torch.device("cpu"))["states"].shape[1] == 77 + 256
    full = family.build(RunConfig().with_overrides({**base, "lora.enabled": False}), [])  # a full fine-tune
    params = list(full.components.transformer.parameters())
    assert not full.lora and all(p.requires_grad and p.dtype == torch.float32 for p in params)
    with pytest.raises(Exception, match="multiple of 16"):
        RunConfig().with_overrides({**base, "data.resolution": 72})
    with pytest.raises(Exception, match="flow.weighting"):
        RunConfig().with_overrides({**base, "loss.min_snr_gamma": 5.0})
    # LyCORIS kinds train (tests/test_transformer_adapters.py); diffusers cannot load them, kohya (LyCORIS keys) can
    RunConfig().with_overrides({**base, "lora.type": "loha", "export.formats": ["kohya"]})
    with pytest.raises(Exception, match="diffusers"):
        RunConfig().with_overrides({**base, "lora.type": "dora", "export.formats": ["diffusers"]})


def test_memory_profile_follows_the_variant(sd35: Path, tmp_path: Path) -> None:
    """The memory estimate counts all three text encoders and uses the variant's activation profile."""
    from sdstudio.core.train.memory import estimate_memory

    family = get_family("sd3")
    base = {"model.family": "sd3", "lora.enabled": True, "data.resolution": 64, "train.mixed_precision": "bf16"}
    large = family.build(RunConfig().with_overrides({**base, "model.path": str(sd35)}), [])
    medium_path = save_tiny_sd3(tmp_path / "medium", variant="3.5-medium")
    medium = family.build(RunConfig().with_overrides({**base, "model.path": str(medium_path)}), [])
    assert large.model_family.title == "SD3.5 large" and medium.model_family.title == "SD3.5 medium"
    cfg = RunConfig().with_overrides({**base, "model.path": str(sd35)})
    est_l, est_m = estimate_memory(large, cfg), estimate_memory(medium, cfg)
    assert est_l.activations > est_m.activations
    t5_bytes = sum(p.numel() * p.element_size() for p in large.components.text_encoder_3.parameters())
    parked = estimate_memory(large, cfg.with_overrides({"train.offload_frozen": True, "data.cache_latents": True,
                                                        "data.cache_text_embeddings": True}))
    assert est_l.weights - parked.weights >= t5_bytes  # T5 counted, and parked once the text cache is complete


@pytest.mark.slow
def test_caches_give_the_same_losses_and_resume_is_exact(sd35: Path, four_images: Path, tmp_path: Path) -> None:
    """Latents and CLIP / T5 features from the disk caches train exactly as encoding every step; 4 steps
    straight equal 2 + resume + 2."""
    th.caches_match_and_resume_is_exact(_train_config(sd35, four_images, **{"train.max_steps": 4}), tmp_path)
