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

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..family import ModelFileError
from ..split_files import (
    FLUX_ORIGINAL_MARKERS,
    TRANSFORMER_PREFIXES,
    Tensors,
    convert_with_scales,
    describe_keys,
    file_keys,
    load_transformer,
    take_fp8_scales,
)
from ..split_files import empty_model as _empty
from ..split_files import load_into as _load_into
from ..split_files import read_tensors as _read
from ..split_files import strip_prefix as _strip_prefix
from . import offline

_BFL_MARKERS = FLUX_ORIGINAL_MARKERS
_DIFFUSERS_MARKERS = ("transformer_blocks.0.attn.to_q.weight", "single_transformer_blocks.0.attn.to_q.weight")
_PREFIXES = TRANSFORMER_PREFIXES
VARIANT_FAMILIES = {"dev": "flux-dev", "schnell": "flux-schnell"}  # what a file holds -> its family


# -- what a file is (describe_keys, file_keys: ../split_files.py) ------------------------------------------
def transformer_file_variant(path: Path) -> str | None:
    """"dev" / "schnell" for a Flux transformer file (original or diffusers key names), None otherwise."""
    if path.suffix.lower() != ".safetensors":
        return None
    keys = [k for k in file_keys(path)]
    stripped = {next((k[len(p):] for p in _PREFIXES if k.startswith(p)), k) for k in keys}
    if any(k.startswith(("lora_", "transformer.transformer_blocks")) or ".lora_" in k for k in keys):
        return None
    if any(k.startswith("distilled_guidance_layer.") for k in stripped):  # a Chroma transformer
        return None
    if set(_BFL_MARKERS) <= stripped:
        return "dev" if "guidance_in.in_layer.weight" in stripped else "schnell"
    if set(_DIFFUSERS_MARKERS) <= stripped:
        return "dev" if "time_text_embed.guidance_embedder.linear_1.weight" in stripped else "schnell"
    return None


def folder_variant(path: Path) -> str | None:
    """"dev" / "schnell" for a diffusers Flux folder (its transformer config says guidance_embeds)."""
    try:
        index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
        config = json.loads((path / "transformer" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if index.get("_class_name") != "FluxPipeline" or config.get("_class_name") != "FluxTransformer2DModel":
        return None
    return "dev" if config.get("guidance_embeds") else "schnell"


def model_variant(path: Path) -> str | None:
    return folder_variant(path) if path.is_dir() else transformer_file_variant(path)


# -- the original <-> diffusers transformer layout ---------------------------------------------------------
def _swap_halves(w: torch.Tensor) -> torch.Tensor:
    """final_layer.adaLN_modulation is (shift, scale) in the original, (scale, shift) in diffusers."""
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


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


def diffusers_to_bfl(state: Tensors) -> Tensors:
    """A diffusers FluxTransformer2DModel state dict in the original (Black Forest Labs) key names."""
    out: Tensors = {}
    src = dict(state)

    def take(original: str, diffusers: str) -> None:
        for suffix in ("weight", "bias"):
            o, d = _param(original, diffusers, suffix)
            if d in src:
                out[o] = src.pop(d)

    for o, d in _TOP:
        take(o, d)
    for suffix in ("weight", "bias"):
        if f"norm_out.linear.{suffix}" in src:
            out[f"final_layer.adaLN_modulation.1.{suffix}"] = _swap_halves(src.pop(f"norm_out.linear.{suffix}"))
    for i in range(_block_count(src, r"transformer_blocks\.(\d+)\.")):
        for o, d in _DOUBLE:
            take(f"double_blocks.{i}.{o}", f"transformer_blocks.{i}.{d}")
        for o, parts in DOUBLE_FUSED.items():
            for suffix in ("weight", "bias"):
                keys = [f"transformer_blocks.{i}.{p}.{suffix}" for p in parts]
                if all(k in src for k in keys):
                    out[f"double_blocks.{i}.{o}.{suffix}"] = torch.cat([src.pop(k) for k in keys])
    for i in range(_block_count(src, r"single_transformer_blocks\.(\d+)\.")):
        for o, d in _SINGLE:
            take(f"single_blocks.{i}.{o}", f"single_transformer_blocks.{i}.{d}")
        for o, parts in SINGLE_FUSED.items():
            for suffix in ("weight", "bias"):
                keys = [f"single_transformer_blocks.{i}.{p}.{suffix}" for p in parts]
                if all(k in src for k in keys):
                    out[f"single_blocks.{i}.{o}.{suffix}"] = torch.cat([src.pop(k) for k in keys])
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

    def take(original: str, diffusers: str) -> None:
        for suffix in ("weight", "bias"):
            o, d = _param(original, diffusers, suffix)
            if o in src:
                out[d] = src.pop(o)

    for o, d in _TOP:
        take(o, d)
    for suffix in ("weight", "bias"):
        if f"final_layer.adaLN_modulation.1.{suffix}" in src:
            out[f"norm_out.linear.{suffix}"] = _swap_halves(src.pop(f"final_layer.adaLN_modulation.1.{suffix}"))
    for i in range(_block_count(src, r"double_blocks\.(\d+)\.")):
        for o, d in _DOUBLE:
            take(f"double_blocks.{i}.{o}", f"transformer_blocks.{i}.{d}")
        for o, parts in DOUBLE_FUSED.items():
            for suffix in ("weight", "bias"):
                key = f"double_blocks.{i}.{o}.{suffix}"
                if key in src:
                    for p, t in zip(parts, src.pop(key).split([inner] * 3)):
                        out[f"transformer_blocks.{i}.{p}.{suffix}"] = t
    for i in range(_block_count(src, r"single_blocks\.(\d+)\.")):
        for o, d in _SINGLE:
            take(f"single_blocks.{i}.{o}", f"single_transformer_blocks.{i}.{d}")
        for o, parts in SINGLE_FUSED.items():
            for suffix in ("weight", "bias"):
                key = f"single_blocks.{i}.{o}.{suffix}"
                if key in src:
                    for p, t in zip(parts, src.pop(key).split([inner] * 3 + [mlp])):
                        out[f"single_transformer_blocks.{i}.{p}.{suffix}"] = t
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
    params = {k: v for k, v in config.items() if not k.startswith("_")}
    return load_transformer(FluxTransformer2DModel, params, state, "Flux transformer", path, dtype=dtype,
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
    from transformers import T5Config, T5EncoderModel

    config = (T5Config.from_pretrained(str(folder / subfolder)) if folder else T5Config(**offline.T5_CONFIG))
    model = _empty(T5EncoderModel, config)
    state = _read(path)
    if not any(k.startswith("encoder.block.") for k in state):
        raise ModelFileError(f"{key} {path}: this is {describe_keys(list(state))}, "
                             "not a T5 text encoder (t5xxl_fp16.safetensors)")
    if "shared.weight" not in state and "encoder.embed_tokens.weight" in state:
        state["shared.weight"] = state["encoder.embed_tokens.weight"]
    _load_into(model, state, "T5 text encoder", path, allowed_missing=("embed_tokens.weight",))
    model.tie_weights()
    return model


def load_vae_file(path: Path, folder: Path | None) -> Any:
    """ae.safetensors (original key names, with or without ``first_stage_model.``) or a diffusers VAE file."""
    from diffusers import AutoencoderKL

    config = (dict(AutoencoderKL.load_config(str(folder), subfolder="vae")) if folder else dict(offline.VAE_CONFIG))
    params = {k: v for k, v in config.items() if not k.startswith("_")}
    state = _read(path)
    state = {k.removeprefix("first_stage_model.").removeprefix("vae."): v for k, v in state.items()}
    if not any(k.startswith(("encoder.", "decoder.")) for k in state) or any(k.startswith("encoder.block.")
                                                                            for k in state):
        raise ModelFileError(f"model.vae_path {path}: this is {describe_keys(list(state))}, not a VAE (ae.safetensors)")
    if any(k.startswith("encoder.down.") for k in state):
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        state = convert_ldm_vae_checkpoint(state, params)
    model = _empty(AutoencoderKL, params)
    _load_into(model, state, "Flux VAE (16 latent channels)", path)
    return model


def load_flux_components(path: Path, *, config_folder: Path | None = None, vae_path: Path | None = None,
                         text_encoder_path: Path | None = None, text_encoder_2_path: Path | None = None,
                         transformer_options: dict[str, Any] | None = None) -> FluxComponents:
    """Everything of a Flux model, offline: a diffusers folder, or a transformer file with the separate
    text-encoder and VAE files (configs from ``config_folder`` or the ones sdstudio ships; a transformer file is
    loaded with ``transformer_options``: ``transformer_parts.load_options``)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    if not path.exists():
        raise ModelFileError(f"model.path {path}: no such file or folder")
    variant = model_variant(path)
    sources = {"transformer": str(path)}
    if path.is_dir():
        if variant is None:
            raise ModelFileError(f"model.path {path}: not a diffusers Flux folder (model_index.json says no "
                                 "FluxPipeline with a FluxTransformer2DModel)")
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        kw: dict[str, Any] = {"local_files_only": True}
        transformer = FluxTransformer2DModel.from_pretrained(str(path), subfolder="transformer", **kw)
        vae = AutoencoderKL.from_pretrained(str(path), subfolder="vae", **kw)
        te = CLIPTextModel.from_pretrained(str(path), subfolder="text_encoder", **kw)
        te2 = T5EncoderModel.from_pretrained(str(path), subfolder="text_encoder_2", **kw)
        tok = CLIPTokenizer.from_pretrained(str(path), subfolder="tokenizer", **kw)
        tok2 = T5TokenizerFast.from_pretrained(str(path), subfolder="tokenizer_2", **kw)
        sources.update(vae=str(path), text_encoder=str(path), text_encoder_2=str(path))
    else:
        if variant is None:
            keys = file_keys(path) if path.suffix.lower() == ".safetensors" else []
            looks = describe_keys(keys) if keys else "not a .safetensors file"
            raise ModelFileError(f"model.path {path}: this is {looks}, not a Flux transformer file "
                                 "(flux1-dev.safetensors / flux1-schnell.safetensors)")
        missing = [key for key, p in (("model.text_encoder_path", text_encoder_path),
                                      ("model.text_encoder_2_path", text_encoder_2_path),
                                      ("model.vae_path", vae_path)) if p is None]
        if missing:
            raise ModelFileError(f"model.path {path} is a single Flux transformer file: set {', '.join(f'`{k}`' for k in missing)} to "
                                 "the CLIP-L (clip_l.safetensors), T5-XXL (t5xxl_fp16.safetensors) and VAE "
                                 "(ae.safetensors) files")
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
