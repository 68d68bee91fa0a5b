"""SD3 / SD3.5 files as users have them, loaded offline: the hub's diffusers folder (model_index.json +
transformer/ vae/ text_encoder/ (CLIP-L) text_encoder_2/ (CLIP-G) text_encoder_3/ (T5) and their tokenizers), or
the split single files of ComfyUI and kohya users: the transformer (``sd3.5_large.safetensors``, original key
names ``model.diffusion_model.joint_blocks...``, bf16 or fp8 e4m3fn) plus ``clip_l.safetensors``
(model.text_encoder_path), ``clip_g.safetensors`` (model.clip_g_path), ``t5xxl_fp16.safetensors``
(model.text_encoder_2_path, as for Flux) and a VAE file (model.vae_path; or the one inside an all-in-one file).

Which model a file holds is read from its keys, as sd-scripts does: q/k norms (``ln_q``) mean 3.5; 3.5 medium
has a second attention (``x_block.attn2``) in its first blocks, large has none; neither is SD3 medium (3.0).
Original -> diffusers names: diffusers' own converter (it reads the widths from the tensors); diffusers ->
original (``diffusers_to_sd3``, for tests and the kohya export's names) is ours, checked against it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..family import ModelFileError
from ..split_files import (
    Tensors,
    convert_with_scales,
    describe_keys,
    empty_model,
    file_keys,
    folder_configs,
    fuse_parts,
    load_folder_parts,
    load_into,
    load_t5,
    load_transformer,
    load_vae,
    model_params,
    not_a_folder,
    not_a_transformer_file,
    read_tensors,
    require_model_path,
    require_part_files,
    strip_prefix,
    swap_halves,
    take_fp8_scales,
    transformer_keys,
)
from . import offline

_PREFIX = "model.diffusion_model."
_ORIGINAL_MARKERS = ("joint_blocks.0.x_block.attn.qkv.weight", "joint_blocks.0.context_block.attn.qkv.weight")
_DIFFUSERS_MARKERS = ("transformer_blocks.0.attn.add_q_proj.weight", "pos_embed.proj.weight")

# (original, diffusers) module pairs, one tensor each (RMSNorm ``ln_q`` = diffusers ``norm_q``)
TOP = [("x_embedder.proj", "pos_embed.proj"), ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
       ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
       ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
       ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"), ("context_embedder", "context_embedder"),
       ("final_layer.linear", "proj_out")]
BLOCK = [("x_block.attn.proj", "attn.to_out.0"), ("context_block.attn.proj", "attn.to_add_out"),
         ("x_block.attn2.proj", "attn2.to_out.0"),
         ("x_block.attn.ln_q", "attn.norm_q"), ("x_block.attn.ln_k", "attn.norm_k"),
         ("context_block.attn.ln_q", "attn.norm_added_q"), ("context_block.attn.ln_k", "attn.norm_added_k"),
         ("x_block.attn2.ln_q", "attn2.norm_q"), ("x_block.attn2.ln_k", "attn2.norm_k"),
         ("x_block.adaLN_modulation.1", "norm1.linear"), ("context_block.adaLN_modulation.1", "norm1_context.linear"),
         ("x_block.mlp.fc1", "ff.net.0.proj"), ("x_block.mlp.fc2", "ff.net.2"),
         ("context_block.mlp.fc1", "ff_context.net.0.proj"), ("context_block.mlp.fc2", "ff_context.net.2")]
# fused original q/k/v -> the diffusers modules stacked in it (in order)
FUSED = {"x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
         "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
         "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v")}
BLOCK_NAMES = {d: o for o, d in BLOCK}  # diffusers module in a block -> original (unfused) module


# -- what a file is -----------------------------------------------------------------------------------------
def variant_of_keys(keys: list[str] | set[str]) -> str | None:
    """"3-medium" / "3.5-medium" / "3.5-large" for an SD3 transformer's keys (either naming), else None."""
    stripped = transformer_keys(keys)
    if stripped is None:  # a LoRA
        return None
    if set(_ORIGINAL_MARKERS) <= stripped:
        if not any(".attn.ln_q." in k for k in stripped):
            return "3-medium"
        return "3.5-medium" if any(".x_block.attn2." in k for k in stripped) else "3.5-large"
    if set(_DIFFUSERS_MARKERS) <= stripped:
        if not any(".attn.norm_q." in k for k in stripped):
            return "3-medium"
        return "3.5-medium" if any(".attn2." in k for k in stripped) else "3.5-large"
    return None


def config_variant(config: dict[str, Any]) -> str:
    """The variant a transformer config describes (the same rule as ``variant_of_keys``)."""
    if not config.get("qk_norm"):
        return "3-medium"
    return "3.5-medium" if config.get("dual_attention_layers") else "3.5-large"


def folder_variant(path: Path) -> str | None:
    pipeline, config = folder_configs(path) or ("", {})
    if pipeline != "StableDiffusion3Pipeline" or config.get("_class_name") != "SD3Transformer2DModel":
        return None
    return config_variant(config)


def model_variant(path: Path) -> str | None:
    if path.is_dir():
        return folder_variant(path)
    if path.suffix.lower() != ".safetensors":
        return None
    return variant_of_keys(file_keys(path))


# -- diffusers -> original names ------------------------------------------------------------------------------
def diffusers_to_sd3(state: Tensors) -> Tensors:
    """A diffusers SD3Transformer2DModel state dict in the original (MMDiT) key names, without a prefix."""
    src, out = dict(state), {}
    blocks = {int(m.group(1)) for k in src if (m := re.match(r"transformer_blocks\.(\d+)\.", k))}
    last = max(blocks) if blocks else -1
    if "pos_embed.pos_embed" in src:
        out["pos_embed"] = src.pop("pos_embed.pos_embed")

    def take(original: str, diffusers: str, swap: bool = False) -> None:
        for suffix in ("weight", "bias"):
            if f"{diffusers}.{suffix}" in src:
                t = src.pop(f"{diffusers}.{suffix}")
                out[f"{original}.{suffix}"] = swap_halves(t) if swap else t

    for o, d in TOP:
        take(o, d)
    take("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True)
    for i in sorted(blocks):
        for o, d in BLOCK:
            take(f"joint_blocks.{i}.{o}", f"transformer_blocks.{i}.{d}",
                 swap=i == last and d == "norm1_context.linear")
        fuse_parts(src, out, FUSED, f"transformer_blocks.{i}", f"joint_blocks.{i}")
    if src:
        raise ModelFileError(f"SD3 transformer: no original-layout name for {sorted(src)[:5]}")
    return out


def sd3_to_diffusers(state: Tensors) -> Tensors:
    """The original key names (with or without ``model.diffusion_model.``) -> diffusers', by diffusers' converter."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    return convert_sd3_transformer_checkpoint_to_diffusers(dict(strip_prefix(state)))


# -- loading ------------------------------------------------------------------------------------------------
@dataclass
class SD3Components:
    transformer: Any
    vae: Any
    text_encoder: Any  # CLIP-L with projection
    text_encoder_2: Any  # CLIP-G (OpenCLIP bigG) with projection
    text_encoder_3: Any  # T5-XXL encoder
    tokenizer: Any
    tokenizer_2: Any
    tokenizer_3: Any
    variant: str  # "3-medium" / "3.5-medium" / "3.5-large"
    sources: dict[str, str]  # component -> the file or folder it came from (cache identities)


def _transformer_part(state: Tensors) -> Tensors:
    """The transformer's tensors of a file (an all-in-one file also holds the VAE / text encoders)."""
    if any(k.startswith(_PREFIX) for k in state):
        return {k[len(_PREFIX):]: v for k, v in state.items() if k.startswith(_PREFIX)}
    return strip_prefix(state)


def load_transformer_file(path: Path, config: dict[str, Any], dtype: torch.dtype = torch.float32, *,
                          keep_fp8: bool = False) -> Any:
    """An SD3 transformer file (original or diffusers key names, any float dtype incl. fp8) as an
    SD3Transformer2DModel in ``dtype`` (``keep_fp8``: see ``split_files.load_transformer``)."""
    from diffusers import SD3Transformer2DModel

    state = _transformer_part(read_tensors(path))
    if variant_of_keys(list(state)) is None:
        raise ModelFileError(f"model.path {path}: this is {describe_keys(list(state))}, not an SD3 transformer")
    state, scales = take_fp8_scales(state, path)  # ComfyUI's scaled fp8 files
    if any(k.startswith("joint_blocks.") for k in state):
        state, scales = convert_with_scales(state, scales, sd3_to_diffusers)
    return load_transformer(SD3Transformer2DModel, model_params(config), state, "SD3 transformer", path, dtype=dtype,
                            keep_fp8=keep_fp8, scales=scales)


def load_clip_file(path: Path, config: dict[str, Any], key: str, what: str) -> Any:
    """clip_l / clip_g.safetensors (transformers key names, with or without ``text_model.``) as a
    CLIPTextModelWithProjection; a file without ``text_projection`` gets the identity, as ComfyUI does."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    model = empty_model(CLIPTextModelWithProjection, CLIPTextConfig(**config))
    state = read_tensors(path)
    if not any("encoder.layers.0.self_attn" in k for k in state):
        raise ModelFileError(f"{key} {path}: this is {describe_keys(list(state))}, not a {what} text encoder")
    own = model.state_dict()
    prefixed = any(k.startswith("text_model.") for k in own)
    state = {(("text_model." + k) if prefixed and not k.startswith(("text_model.", "text_projection"))
              else (k if prefixed else k.removeprefix("text_model."))): v for k, v in state.items()}
    if "text_projection.weight" not in state and "text_projection.weight" in own:
        state["text_projection.weight"] = torch.eye(*own["text_projection.weight"].shape)
    load_into(model, state, f"{what} text encoder", path, allowed_missing=("position_ids",))
    return model


def load_t5_file(path: Path, config: dict[str, Any]) -> Any:
    """t5xxl_fp16 / t5xxl_fp8_e4m3fn.safetensors (transformers key names) as a T5EncoderModel."""
    from transformers import T5Config

    return load_t5(path, T5Config(**config), "model.text_encoder_2_path")


def load_vae_file(path: Path, config: dict[str, Any]) -> Any:
    """A VAE file (original key names, with or without ``first_stage_model.``; or diffusers names), or the VAE
    inside an all-in-one SD3 file."""
    state = read_tensors(path)
    if any(k.startswith("first_stage_model.") for k in state):
        state = {k[len("first_stage_model."):]: v for k, v in state.items() if k.startswith("first_stage_model.")}
    state = {k.removeprefix("vae."): v for k, v in state.items()}
    return load_vae(path, state, model_params(config), "SD3 VAE (16 latent channels)")


def _has_vae(path: Path) -> bool:
    return any(k.startswith("first_stage_model.") for k in file_keys(path))


def load_sd3_components(path: Path, *, config_folder: Path | None = None, vae_path: Path | None = None,
                        text_encoder_path: Path | None = None, clip_g_path: Path | None = None,
                        t5_path: Path | None = None, transformer_options: dict[str, Any] | None = None) -> SD3Components:
    """Everything of an SD3 model, offline: a diffusers folder, or a transformer file (an all-in-one file holds
    its VAE) with the CLIP-L, CLIP-G and T5 files; ``config_folder`` and ``transformer_options`` as for Flux
    (``flux/files.load_flux_components``)."""
    require_model_path(path)
    variant = model_variant(path)
    sources = {"transformer": str(path)}
    if path.is_dir():
        if variant is None:
            raise not_a_folder(path, "SD3", "StableDiffusion3Pipeline", "an SD3Transformer2DModel")
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, T5EncoderModel

        transformer, vae, te, te2, te3 = load_folder_parts(path, {
            "transformer": SD3Transformer2DModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModelWithProjection,
            "text_encoder_2": CLIPTextModelWithProjection, "text_encoder_3": T5EncoderModel})
        tok, tok2 = offline.clip_tokenizers(path)
        tok3 = offline.t5_tokenizer(path)
        sources.update(vae=str(path), text_encoder=str(path), text_encoder_2=str(path), text_encoder_3=str(path))
    else:
        if variant is None:
            raise not_a_transformer_file(path, "an SD3", "sd3.5_medium.safetensors / sd3.5_large.safetensors")
        # an all-in-one file holds its VAE
        require_part_files(path, "SD3", {"model.text_encoder_path": text_encoder_path, "model.clip_g_path": clip_g_path,
                                         "model.text_encoder_2_path": t5_path,
                                         "model.vae_path": vae_path or (path if _has_vae(path) else None)},
                           "the CLIP-L (clip_l.safetensors), CLIP-G (clip_g.safetensors), T5-XXL "
                           "(t5xxl_fp16.safetensors) and VAE files")
        assert text_encoder_path and clip_g_path and t5_path

        def cfg(component: str) -> dict[str, Any]:
            return offline.component_config(config_folder, variant, component)  # type: ignore[arg-type]

        transformer = load_transformer_file(path, cfg("transformer"), **(transformer_options or {}))
        te = load_clip_file(text_encoder_path, cfg("text_encoder"), "model.text_encoder_path", "CLIP-L")
        te2 = load_clip_file(clip_g_path, cfg("text_encoder_2"), "model.clip_g_path", "CLIP-G")
        te3 = load_t5_file(t5_path, cfg("text_encoder_3"))
        tok, tok2 = offline.clip_tokenizers(config_folder)
        tok3 = offline.t5_tokenizer(config_folder)
        sources.update(text_encoder=str(text_encoder_path), text_encoder_2=str(clip_g_path),
                       text_encoder_3=str(t5_path))
        vae = load_vae_file(vae_path or path, cfg("vae"))
        sources["vae"] = str(vae_path or path)
    if path.is_dir() and vae_path is not None:
        vae = load_vae_file(vae_path, offline.component_config(path, variant, "vae"))
        sources["vae"] = str(vae_path)
    return SD3Components(transformer, vae, te, te2, te3, tok, tok2, tok3, variant, sources)
