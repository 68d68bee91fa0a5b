"""The Chroma family on tiny-topology models: both file layouts, recognising and refusing files, the real-size
key layout (meta device), the T5 padding mask in attention (gradient checkpointing included), a LoRA that
overfits through `sdstudio train` with the preset, resume, previews / `sdstudio sample` with real CFG, and the
exports reloaded by diffusers' own ChromaPipeline.load_lora_weights."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from sdstudio.core.config import RunConfig
from sdstudio.core.models.chroma.files import (
    diffusers_to_original,
    load_chroma_components,
    original_to_diffusers,
)
from sdstudio.core.models.chroma.offline import TRANSFORMER_CONFIG
from sdstudio.core.models.family import ModelFileError
from sdstudio.core.models.registry import family_of_lora, get_family, recognise_model
from tests import transformer_helpers as th
from tests.tiny_chroma import save_tiny_chroma, save_tiny_chroma_split, tiny_chroma_components
from tests.tiny_flux import save_tiny_flux_split, tiny_flux_components
from tests.transformer_helpers import same_weights as _same


@pytest.fixture(scope="module")
def chroma(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_chroma(tmp_path_factory.mktemp("chroma") / "hd")


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return save_tiny_chroma_split(tmp_path_factory.mktemp("chroma-split"), tiny_chroma_components())


def test_both_layouts_give_identical_weights(chroma: Path, split: dict[str, Path], tmp_path: Path) -> None:
    folder = load_chroma_components(chroma)
    files = load_chroma_components(split["chroma"], config_folder=chroma, vae_path=split["ae"],
                                   text_encoder_path=split["t5xxl"])
    for name in ("transformer", "vae", "text_encoder"):
        _same(getattr(folder, name), getattr(files, name))
    # an fp8 e4m3fn transformer file loads straight into the model's dtype: the fp8 values, exactly
    fp8 = save_tiny_chroma_split(tmp_path / "fp8", tiny_chroma_components(), dtype=torch.float8_e4m3fn)["chroma"]
    with safe_open(str(fp8), "pt") as fh:
        assert fh.get_tensor("img_in.weight").dtype == torch.float8_e4m3fn
        assert "distilled_guidance_layer.layers.0.in_layer.weight" in fh.keys()  # noqa: SIM118
    loaded = load_chroma_components(fp8, config_folder=chroma, vae_path=split["ae"], text_encoder_path=split["t5xxl"])
    want, got = folder.transformer.state_dict(), loaded.transformer.state_dict()
    assert all(torch.equal(got[k], want[k].to(torch.float8_e4m3fn).float()) for k in want)


def test_chroma_and_flux_files_are_told_apart_and_wrong_files_refused(chroma: Path, split: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    flux = save_tiny_flux_split(tmp_path / "flux", tiny_flux_components(guidance=False))
    assert recognise_model(chroma).name == "chroma" and recognise_model(split["chroma"]).name == "chroma"
    assert recognise_model(flux["flux1"]).name == "flux-schnell"  # Flux's blocks without the approximator
    base = {"lora.enabled": True, "data.resolution": 64}
    with pytest.raises(ModelFileError, match="a Chroma transformer, not a Flux transformer"):
        get_family("flux-schnell").build(RunConfig().with_overrides(
            {**base, "model.family": "flux-schnell", "model.path": str(split["chroma"]),
             "model.vae_path": str(split["ae"]), "model.text_encoder_path": str(flux["clip_l"]),
             "model.text_encoder_2_path": str(split["t5xxl"])}), [])
    chroma_cfg = {**base, "model.family": "chroma", "model.vae_path": str(split["ae"]),
                  "model.text_encoder_2_path": str(split["t5xxl"])}
    with pytest.raises(ModelFileError, match="a Flux.1 schnell model, but model.family = 'chroma'"):
        get_family("chroma").build(RunConfig().with_overrides({**chroma_cfg, "model.path": str(flux["flux1"])}), [])
    with pytest.raises(ModelFileError, match="this is a Flux transformer, not a Chroma transformer"):
        load_chroma_components(flux["flux1"], vae_path=split["ae"], text_encoder_path=split["t5xxl"])
    for path, looks in ((split["t5xxl"], "a T5 text encoder"), (split["ae"], "a VAE")):
        with pytest.raises(ModelFileError, match=f"this is {looks}, not a Chroma transformer"):
            get_family("chroma").build(RunConfig().with_overrides({**chroma_cfg, "model.path": str(path)}), [])
    with pytest.raises(ModelFileError, match="model.text_encoder_2_path"):
        load_chroma_components(split["chroma"], vae_path=split["ae"])
    with pytest.raises(ModelFileError, match="model.text_encoder_2_path .*a VAE, not a T5"):
        load_chroma_components(split["chroma"], config_folder=chroma, vae_path=split["ae"],
                               text_encoder_path=split["ae"])


def _real_size() -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    from accelerate import init_empty_weights
    from diffusers import ChromaTransformer2DModel

    with init_empty_weights():
        model = ChromaTransformer2DModel(**{k: v for k, v in TRANSFORMER_CONFIG.items() if not k.startswith("_")})
    return diffusers_to_original(model.state_dict()), model


def test_original_key_mapping_matches_diffusers_on_the_real_size_layout() -> None:
    """Our diffusers -> original mapping, read back by diffusers' own Chroma converter (real width only, so on
    the meta device), gives the model's keys and shapes; ours reads it back the same."""
    from diffusers.loaders.single_file_utils import convert_chroma_transformer_checkpoint_to_diffusers

    original, model = _real_size()
    assert "double_blocks.18.img_attn.qkv.weight" in original and "single_blocks.37.linear1.weight" in original
    assert "distilled_guidance_layer.layers.4.out_layer.weight" in original
    assert "distilled_guidance_layer.norms.4.scale" in original and "txt_in.weight" in original
    assert not any(k.startswith(("vector_in", "guidance_in", "time_in", "final_layer.adaLN")) or "_mod." in k
                   or "modulation" in k for k in original)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = convert_chroma_transformer_checkpoint_to_diffusers(dict(original))
    assert {k: tuple(v.shape) for k, v in theirs.items()} == want
    ours = original_to_diffusers(dict(original), TRANSFORMER_CONFIG)
    assert {k: tuple(v.shape) for k, v in ours.items()} == want
    assert 8.7e9 < sum(v.numel() for v in model.state_dict().values()) < 9.0e9  # "8.9B"


def test_original_key_mapping_round_trips_values() -> None:
    comps = tiny_chroma_components()
    state = comps["transformer"].state_dict()
    back = original_to_diffusers(diffusers_to_original(state), dict(comps["transformer"].config))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_padding_tokens_are_masked_in_attention_with_and_without_checkpointing(chroma: Path) -> None:
    """Chroma's mask: the caption's tokens and one padding token are attended, the rest is not: changing the
    states of later padding tokens changes nothing, changing the first padding token does. Training with
    gradient checkpointing sees the same model (diffusers drops the mask in checkpointed single blocks)."""
    bundle = get_family("chroma").build(RunConfig().with_overrides(
        {"model.family": "chroma", "model.path": str(chroma), "lora.enabled": True, "data.resolution": 64,
         "model.t5_max_length": 16}), [])
    cond = bundle.encode_captions(["a red circle", "a blue square on a green field"], th.CPU)
    mask = cond["mask"]
    assert mask.dtype == torch.bool and mask.shape == (2, 16)
    lengths = bundle.components.tokenizer(["a red circle", "a blue square on a green field"]).input_ids
    for row, ids in enumerate(lengths):  # the caption (with its EOS) + exactly one padding token
        assert mask[row].sum() == len(ids) + 1 and mask[row, : len(ids) + 1].all()
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.7])
    model = bundle.trainable
    model.eval()
    with torch.no_grad():
        want = model(x, t, cond)
        later = dict(cond, states=torch.where(mask[..., None], cond["states"], cond["states"] + 5.0))
        first_pad = cond["states"].clone()
        first_pad[0, len(lengths[0])] += 5.0
        assert torch.equal(model(x, t, later), want)
        assert (model(x, t, dict(cond, states=first_pad))[0] - want[0]).abs().max() > 1e-4
        unmasked = {k: v for k, v in cond.items() if k != "mask"}
        assert (model(x, t, unmasked) - want).abs().max() > 1e-4  # the mask matters
    model.train()
    bundle.components.transformer.enable_gradient_checkpointing()
    try:
        got = model(x, t, later)  # grad enabled: the checkpointed path
    finally:
        bundle.components.transformer.disable_gradient_checkpointing()
    assert torch.allclose(got, want, atol=1e-6)


def _config(model: Path, data: Path, **overrides) -> RunConfig:
    return th.tiny_run_config("chroma-lora", model, data, **{"train.learning_rate": 3e-2, **overrides})


@pytest.fixture(scope="module")
def trained(chroma: Path, four_images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`sdstudio train --preset chroma-lora` on the tiny model (caches on, gradient checkpointing on, as the
    preset has them), with a preview at the end and the preset's default export."""
    from sdstudio.cli import main

    run = tmp_path_factory.mktemp("chroma-run") / "run"
    sets = {"model.path": str(chroma), "data.resolution": 64, "data.val_split": 0.0, "data.caption_dropout": 0.0,
            "train.batch_size": 4, "train.max_steps": 30, "train.log_every": 1, "train.warmup_steps": 0,
            "train.lr_scheduler": "constant", "train.device": "cpu", "train.mixed_precision": "no",
            "train.learning_rate": 3e-2, "sample.every_steps": 0, "sample.at_end": True, "sample.steps": 2,
            "sample.seeds": [0], "checkpoint.every_steps": 30, "model.t5_max_length": 16, "lora.rank": 4,
            "lora.alpha": 8.0, "flow.shift": "none"}
    argv = ["train", "--preset", "chroma-lora", "--data", str(four_images), "--out", str(run)]
    for key, value in sets.items():
        argv += ["--set", f"{key}={value!r}" if isinstance(value, str) else f"{key}={str(value).lower()}"
                 if isinstance(value, bool) else f"{key}={value}"]
    assert main(argv) == 0
    return run


def test_lora_overfits_a_tiny_batch_through_the_cli(trained: Path) -> None:
    losses = th.logged_losses(trained)
    assert len(losses) == 30
    keys = th.overfit_lora_keys(trained, losses, th.FLUX_BLOCK_PARTS)
    assert not any("distilled_guidance_layer" in k or k.startswith(("transformer.proj_out", "transformer.x_embedder"))
                   for k in keys)
    assert list((trained / "samples").glob("*.png")), "the preview at the end was written"
    # the preset's caches are complete before training: T5 and the VAE left the device (train.offload_frozen)
    assert "frozen parts moved to CPU memory: text_encoder, vae" in (trained / "run.log").read_text()
    exported = list((trained / "exports").glob("*.safetensors"))
    assert exported, "the preset's default export (diffusers) was written"


def test_cached_text_trains_as_encoding_and_resume_is_exact(chroma: Path, four_images: Path, tmp_path: Path) -> None:
    """T5 states + mask from the disk cache train exactly as encoding every step; 4 steps straight equal
    2 + resume + 2."""
    th.caches_match_and_resume_is_exact(_config(chroma, four_images, **{"train.max_steps": 4}), tmp_path)


def test_diffusers_export_loads_in_chromapipeline_and_matches_the_trained_model(trained: Path, chroma: Path,
                                                                                tmp_path: Path) -> None:
    from diffusers import ChromaPipeline

    from sdstudio.core.models.chroma.model import ChromaDenoiser

    out = th.export_loras(trained, "chroma", tmp_path, kohya=False)
    meta, family = out.meta, out.family
    assert meta["modelspec.architecture"] == "chroma/lora" and meta["ss_base_model_version"] == "chroma"
    assert meta["modelspec.implementation"] == "https://huggingface.co/lodestones/Chroma"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4"  # alpha folded into lora_B
    assert family_of_lora(meta) is family
    check = th.lora_in_pipeline(trained, chroma, ChromaPipeline, ChromaDenoiser, tmp_path)
    scale = check.want.abs().max()
    assert (check.got - check.want).abs().max() <= 1e-4 * scale, (check.got - check.want).abs().max()
    assert (check.base - check.want).abs().max() > 1e-2  # the LoRA matters


def test_kohya_export_names_the_real_size_layout_and_diffusers_reads_it_at_strength() -> None:
    """The kohya export of a LoRA over the real-size Chroma layout: every key names an original weight with
    matching shapes (what ComfyUI maps as lora_unet_<original name>), and diffusers' kohya converter (which
    ChromaPipeline uses) reads back exactly the trained per-module updates, alpha / rank included."""
    import re

    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    from sdstudio.core.models.flux.export import kohya_state

    rank, alpha = 2, 5.0
    original, model = _real_size()
    gen = torch.Generator().manual_seed(0)
    weights, shapes = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and re.fullmatch(get_family("chroma").lora_targets["attention_ff"],
                                                                name):
            shapes[name] = module.in_features
            weights[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=gen) * 0.1
            weights[f"transformer.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=gen) * 0.1
    source = SimpleNamespace(lora={"rank": rank, "alpha": alpha, "targets": "attention_ff", "dropout": 0.0},
                             architecture={"inner_dim": 3072}, weights=weights, checkpoint=Path("x"))
    kohya = kohya_state(source, torch.float32)  # type: ignore[arg-type]
    modules = {k.rsplit(".", 2)[0] for k in kohya}
    originals = {"lora_unet_" + k[: -len(".weight")].replace(".", "_"): k for k, v in original.items()
                 if k.endswith(".weight") and v.ndim == 2}
    assert modules <= set(originals), sorted(modules - set(originals))[:5]
    assert len(modules) == 19 * 8 + 38 * 2
    for module in modules:
        out_f, in_f = original[originals[module]].shape
        assert kohya[f"{module}.lora_down.weight"].shape[1] == in_f and kohya[f"{module}.lora_up.weight"].shape[0] == out_f
    converted = _convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in kohya.items()})
    probe = torch.Generator().manual_seed(3)
    for name, in_f in shapes.items():
        v = torch.randn(in_f, generator=probe)
        a, b = weights[f"transformer.{name}.lora_A.weight"], weights[f"transformer.{name}.lora_B.weight"]
        ca, cb = converted[f"transformer.{name}.lora_A.weight"], converted[f"transformer.{name}.lora_B.weight"]
        assert torch.allclose(cb @ (ca @ v), (alpha / rank) * (b @ (a @ v)), atol=1e-4, rtol=1e-4), name


def test_sample_a_chroma_folder_with_real_cfg_and_the_exported_lora(trained: Path, chroma: Path,
                                                                     tmp_path: Path) -> None:
    sampled = th.sample_with_exported_lora(trained, chroma, "chroma", tmp_path, steps=30, guidance=4.0)
    # real classifier-free guidance: the negative prompt changes the image too (the guidance scale: above)
    assert (sampled.plain.generate(["a red circle"], [0], steps=3, negative_prompt="blue") != sampled.image).any()


def test_config_checks_and_text_length(chroma: Path) -> None:
    family = get_family("chroma")
    base = {"model.family": "chroma", "lora.enabled": True, "model.path": str(chroma), "data.resolution": 64}
    default = family.build(RunConfig().with_overrides(base), [])
    assert default.encode_captions(["x"], th.CPU)["states"].shape[1] == 512  # ChromaPipeline's length
    assert "guidance" not in default.encode_captions(["x"], th.CPU)  # no guidance input
    # the memory estimate counts the transformer, T5 and VAE weights and Chroma's activation profile
    from sdstudio.core.train.memory import estimate_memory

    c = default.components
    numel = sum(p.numel() for m in (c.transformer, c.text_encoder, c.vae) for p in m.parameters())
    est = estimate_memory(default, RunConfig().with_overrides(base))
    assert est.weights >= 4 * numel and est.activations >= family.activation_bytes_per_pixel * 8 * 8 * 0.25
    full = family.build(RunConfig().with_overrides({**base, "lora.enabled": False}), [])  # a full fine-tune
    params = list(full.components.transformer.parameters())
    assert not full.lora and all(p.requires_grad and p.dtype == torch.float32 for p in params)
    with pytest.raises(Exception, match="multiple of 16"):
        RunConfig().with_overrides({**base, "data.resolution": 72})
    with pytest.raises(Exception, match="flow.weighting"):
        RunConfig().with_overrides({**base, "loss.min_snr_gamma": 5.0})
    with pytest.raises(Exception, match="no CLIP-L"):  # a Flux config's CLIP file is not silently ignored
        RunConfig().with_overrides({**base, "model.text_encoder_path": "clip_l.safetensors",
                                    "model.text_encoder_2_path": "t5xxl_fp16.safetensors"})
