"""Flux.1 files as users have them, loaded offline: the hub's diffusers folder (model_index.json +
transformer/ vae/ text_encoder/ text_encoder_2/ tokenizer/ tokenizer_2/), or the split single files of ComfyUI
and kohya users: the transformer (``flux1-dev.safetensors``, original Black Forest Labs key names, bf16 or fp8
e4m3fn), ``clip_l.safetensors``, ``t5xxl_fp16.safetensors`` / ``t5xxl_fp8_e4m3fn.safetensors`` and
``ae.safetensors`` (model.text_encoder_path / model.text_encoder_2_path / model.vae_path).

The original key layout is converted here in both directions (``bfl_to_diffusers`` / ``diffusers_to_bfl``):
diffusers' own converter hard-codes the real model's width (3072), so it cannot read test-sized models;
``tests/test_flux.py`` checks ours against it on the real-size layout (meta device) and by round trip.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..family import ModelFileError
from ..split_files import (
    FLUX_ORIGINAL_MARKERS,
    Tensors,
    convert_with_scales,
    describe_keys,
    file_keys,
    folder_configs,
    fuse_parts,
    load_folder_parts,
    load_t5,
    load_transformer,
    load_vae,
    model_params,
    not_a_folder,
    not_a_transformer_file,
    require_model_path,
    require_part_files,
    swap_halves,
    take_fp8_scales,
    transformer_keys,
)
from ..split_files import empty_model as _empty
from ..split_files import load_into as _load_into
from ..split_files import read_tensors as _read
from ..split_files import strip_prefix as _strip_prefix
from . import offline

_DIFFUSERS_MARKERS = ("transformer_blocks.0.attn.to_q.weight", "single_transformer_blocks.0.attn.to_q.weight")
VARIANT_FAMILIES = {"dev": "flux-dev", "schnell": "flux-schnell"}  # what a file holds -> its family


# -- what a file is (describe_keys, file_keys: ../split_files.py) ------------------------------------------
def transformer_file_variant(path: Path) -> str | None:
    """"dev" / "schnell" for a Flux transformer file (original or diffusers key names), None otherwise."""
    if path.suffix.lower() != ".safetensors":
        return None
    stripped = transformer_keys(file_keys(path))  # None: a LoRA
    if stripped is None or any(k.startswith("distilled_guidance_layer.") for k in stripped):  # a Chroma transformer
        return None
    if set(FLUX_ORIGINAL_MARKERS) <= stripped:
        return "dev" if "guidance_in.in_layer.weight" in stripped else "schnell"
    if set(_DIFFUSERS_MARKERS) <= stripped:
        return "dev" if "time_text_embed.guidance_embedder.linear_1.weight" in stripped else "schnell"
    return None


def folder_variant(path: Path) -> str | None:
    """"dev" / "schnell" for a diffusers Flux folder (its transformer config says guidance_embeds)."""
    pipeline, config = folder_configs(path) or ("", {})
    if pipeline != "FluxPipeline" or config.get("_class_name") != "FluxTransformer2DModel":
        return None
    return "dev" if config.get("guidance_embeds") else "schnell"


def model_variant(path: Path) -> str | None:
    return folder_variant(path) if path.is_dir() else transformer_file_variant(path)


# -- the original <-> diffusers transformer layout ---------------------------------------------------------
# (final_layer.adaLN_modulation is (shift, scale) in the original, (scale, shift) in diffusers: swap_halves)
# (original module, diffusers module) pairs that are one tensor each
_TOP = [("img_in", "x_embedder"), ("txt_in", "context_embedder"),
        ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
        ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
        ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
        ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
        ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
        ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
        ("final_layer.linear", "proj_out")]
_DOUBLE = [("img_mod.lin", "norm1.linear"), ("txt_mod.lin", "norm1_context.linear"),
           ("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out"),
           ("img_attn.norm.query_norm", "attn.norm_q"), ("img_attn.norm.key_norm", "attn.norm_k"),
           ("txt_attn.norm.query_norm", "attn.norm_added_q"), ("txt_attn.norm.key_norm", "attn.norm_added_k"),
           ("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"),
           ("txt_mlp.0", "ff_context.net.0.proj"), ("txt_mlp.2", "ff_context.net.2")]
_SINGLE = [("linear2", "proj_out"), ("modulation.lin", "norm.linear"),
           ("norm.query_norm", "attn.norm_q"), ("norm.key_norm", "attn.norm_k")]
# fused original tensors: original module -> the diffusers modules stacked in it (in order)
DOUBLE_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
# original module name of every (unfused) diffusers module inside a block, for LoRA key names
DOUBLE_NAMES = {d: o for o, d in _DOUBLE}
SINGLE_NAMES = {d: o for o, d in _SINGLE}


def _param(original: str, diffusers: str, suffix: str) -> tuple[str, str]:
    """Norm weights are ``.scale`` in the original (RMSNorm), ``.weight`` in diffusers."""
    return (f"{original}.scale" if original.endswith("_norm") and suffix == "weight" else f"{original}.{suffix}",
            f"{diffusers}.{suffix}")


def _block_count(state: Tensors, pattern: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


# (original block list, diffusers block list, their unfused modules, their fused tensors)
_BLOCKS = [("double_blocks", "transformer_blocks", _DOUBLE, DOUBLE_FUSED),
           ("single_blocks", "single_transformer_blocks", _SINGLE, SINGLE_FUSED)]


def _rename(src: Tensors, out: Tensors, pairs: list[tuple[str, str]], *, to_original: bool) -> None:
    """Move the weight and bias of each (original, diffusers) module pair from ``src`` to ``out``, renamed."""
    for original, diffusers in pairs:
        for suffix in ("weight", "bias"):
            o, d = _param(original, diffusers, suffix)
            old, new = (d, o) if to_original else (o, d)
            if old in src:
                out[new] = src.pop(old)


def diffusers_to_bfl(state: Tensors) -> Tensors:
    """A diffusers FluxTransformer2DModel state dict in the original (Black Forest Labs) key names."""
    out: Tensors = {}
    src = dict(state)
    _rename(src, out, _TOP, to_original=True)
    for suffix in ("weight", "bias"):
        if f"norm_out.linear.{suffix}" in src:
            out[f"final_layer.adaLN_modulation.1.{suffix}"] = swap_halves(src.pop(f"norm_out.linear.{suffix}"))
    for ours, theirs, pairs, fused in _BLOCKS:
        for i in range(_block_count(src, rf"{theirs}\.(\d+)\.")):
            _rename(src, out, [(f"{ours}.{i}.{o}", f"{theirs}.{i}.{d}") for o, d in pairs], to_original=True)
            fuse_parts(src, out, fused, f"{theirs}.{i}", f"{ours}.{i}")
    if src:
        raise ModelFileError(f"Flux transformer: no original-layout name for {sorted(src)[:5]}")
    return out


def bfl_to_diffusers(state: Tensors, config: dict[str, Any]) -> Tensors:
    """The original key names -> a diffusers FluxTransformer2DModel state dict (``config``: its config, for the
    widths of the fused tensors)."""
    src = _strip_prefix(dict(state))
    inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    mlp = int(inner * float(config.get("mlp_ratio", 4.0)))
    out: Tensors = {}
    _rename(src, out, _TOP, to_original=False)
    for suffix in ("weight", "bias"):
        if f"final_layer.adaLN_modulation.1.{suffix}" in src:
            out[f"norm_out.linear.{suffix}"] = swap_halves(src.pop(f"final_layer.adaLN_modulation.1.{suffix}"))
    for ours, theirs, pairs, fused in _BLOCKS:
        for i in range(_block_count(src, rf"{ours}\.(\d+)\.")):
            _rename(src, out, [(f"{ours}.{i}.{o}", f"{theirs}.{i}.{d}") for o, d in pairs], to_original=False)
            for o, parts in fused.items():
                widths = ([inner] * 3 + [mlp])[:len(parts)]  # q, k, v (and the single blocks' MLP input)
                for suffix in ("weight", "bias"):
                    key = f"{ours}.{i}.{o}.{suffix}"
                    if key in src:
                        for p, t in zip(parts, src.pop(key).split(widths)):
                            out[f"{theirs}.{i}.{p}.{suffix}"] = t
    if src:
        raise ModelFileError(f"Flux transformer: unknown original-layout keys {sorted(src)[:5]}")
    return out


# -- loading ------------------------------------------------------------------------------------------------
@dataclass
class FluxComponents:
    transformer: Any
    vae: Any
    text_encoder: Any  # CLIP-L (pooled output)
    text_encoder_2: Any  # T5-XXL encoder
    tokenizer: Any
    tokenizer_2: Any
    variant: str  # "dev" / "schnell"
    sources: dict[str, str]  # component -> the file or folder it came from (cache identities)


def load_transformer_file(path: Path, config: dict[str, Any], dtype: torch.dtype = torch.float32, *,
                          keep_fp8: bool = False) -> Any:
    """A Flux transformer file (original or diffusers key names, any float dtype incl. fp8) as a
    FluxTransformer2DModel in ``dtype`` (``keep_fp8``: see ``split_files.load_transformer``)."""
    from diffusers import FluxTransformer2DModel

    state = _strip_prefix(_read(path))
    variant = transformer_file_variant(path)
    if variant is None:
        raise ModelFileError(f"model.path {path}: this is {describe_keys(list(state))}, not a Flux transformer")
    state, scales = take_fp8_scales(state, path)  # ComfyUI's scaled fp8 files
    if any(k.startswith("double_blocks.") for k in state):
        state, scales = convert_with_scales(state, scales, lambda s: bfl_to_diffusers(s, config))
    return load_transformer(FluxTransformer2DModel, model_params(config), state, "Flux transformer", path, dtype=dtype,
                            keep_fp8=keep_fp8, scales=scales)


def load_clip_file(path: Path, folder: Path | None) -> Any:
    """clip_l.safetensors (transformers key names, with or without ``text_model.``) as a CLIPTextModel."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = (CLIPTextConfig.from_pretrained(str(folder / "text_encoder")) if folder
              else CLIPTextConfig(**offline.CLIP_L_CONFIG))
    model = _empty(CLIPTextModel, config)
    state = _read(path)
    prefixed = any(k.startswith("text_model.") for k in model.state_dict())
    if not prefixed:
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    if not any("encoder.layers.0.self_attn" in k for k in state):
        raise ModelFileError(f"model.text_encoder_path {path}: this is {describe_keys(list(state))}, "
                             "not a CLIP-L text encoder (clip_l.safetensors)")
    _load_into(model, state, "CLIP-L text encoder", path, allowed_missing=("position_ids",))
    return model


def load_t5_file(path: Path, folder: Path | None, subfolder: str = "text_encoder_2",
                 key: str = "model.text_encoder_2_path") -> Any:
    """t5xxl_fp16 / t5xxl_fp8_e4m3fn.safetensors (transformers key names) as a T5EncoderModel (its config from
    ``folder / subfolder``: Flux's T5 is text_encoder_2, Chroma's text_encoder)."""
    from transformers import T5Config

    config = (T5Config.from_pretrained(str(folder / subfolder)) if folder else T5Config(**offline.T5_CONFIG))
    return load_t5(path, config, key)


def load_vae_file(path: Path, folder: Path | None) -> Any:
    """ae.safetensors (original key names, with or without ``first_stage_model.``) or a diffusers VAE file."""
    from diffusers import AutoencoderKL

    config = (dict(AutoencoderKL.load_config(str(folder), subfolder="vae")) if folder else dict(offline.VAE_CONFIG))
    state = {k.removeprefix("first_stage_model.").removeprefix("vae."): v for k, v in _read(path).items()}
    return load_vae(path, state, model_params(config), "Flux VAE (16 latent channels)", " (ae.safetensors)")


def load_flux_components(path: Path, *, config_folder: Path | None = None, vae_path: Path | None = None,
                         text_encoder_path: Path | None = None, text_encoder_2_path: Path | None = None,
                         transformer_options: dict[str, Any] | None = None) -> FluxComponents:
    """Everything of a Flux model, offline: a diffusers folder, or a transformer file with the separate
    text-encoder and VAE files (configs from ``config_folder`` or the ones sdstudio ships; a transformer file is
    loaded with ``transformer_options``: ``transformer_parts.load_options``)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    require_model_path(path)
    variant = model_variant(path)
    sources = {"transformer": str(path)}
    if path.is_dir():
        if variant is None:
            raise not_a_folder(path, "Flux", "FluxPipeline", "a FluxTransformer2DModel")
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        transformer, vae, te, te2, tok, tok2 = load_folder_parts(path, {
            "transformer": FluxTransformer2DModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
            "text_encoder_2": T5EncoderModel, "tokenizer": CLIPTokenizer, "tokenizer_2": T5TokenizerFast})
        sources.update(vae=str(path), text_encoder=str(path), text_encoder_2=str(path))
    else:
        if variant is None:
            raise not_a_transformer_file(path, "a Flux", "flux1-dev.safetensors / flux1-schnell.safetensors")
        require_part_files(path, "Flux", {"model.text_encoder_path": text_encoder_path,
                                          "model.text_encoder_2_path": text_encoder_2_path, "model.vae_path": vae_path},
                           "the CLIP-L (clip_l.safetensors), T5-XXL (t5xxl_fp16.safetensors) and VAE (ae.safetensors) "
                           "files")
        assert text_encoder_path and text_encoder_2_path and vae_path
        tconfig = (dict(FluxTransformer2DModel.load_config(str(config_folder), subfolder="transformer"))
                   if config_folder else offline.transformer_config(variant))
        transformer = load_transformer_file(path, tconfig, **(transformer_options or {}))
        te = load_clip_file(text_encoder_path, config_folder)
        te2 = load_t5_file(text_encoder_2_path, config_folder)
        tok, tok2 = offline.clip_tokenizer(config_folder), offline.t5_tokenizer(config_folder)
        sources.update(text_encoder=str(text_encoder_path), text_encoder_2=str(text_encoder_2_path))
        vae = None
    if vae_path is not None:
        vae = load_vae_file(vae_path, config_folder if not path.is_dir() else path)
        sources["vae"] = str(vae_path)
    return FluxComponents(transformer, vae, te, te2, tok, tok2, variant, sources)
