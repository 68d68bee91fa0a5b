"""Chroma files as users have them, loaded offline: the hub's diffusers folder (model_index.json says
ChromaPipeline: transformer/ vae/ text_encoder/ (T5) tokenizer/), or the split single files ComfyUI users keep:
the transformer (``Chroma1-HD.safetensors``, original key names, bf16 or fp8 e4m3fn), the T5-XXL file
(``t5xxl_fp16.safetensors``; model.text_encoder_2_path, as for Flux) and Flux's ``ae.safetensors``
(model.vae_path).

Chroma's original layout is Flux's minus the modulation linears (``img_mod`` / ``txt_mod`` / ``modulation``,
``final_layer.adaLN_modulation``), CLIP's ``vector_in`` and ``time_in`` / ``guidance_in``, plus the
approximator ``distilled_guidance_layer.*`` that makes every modulation from the timestep. The blocks are
mapped by Flux's own tables (``flux/files.py``); only the approximator's names are added here. diffusers'
converter hard-codes the real width, so ``tests/test_chroma_family.py`` checks ours against it on the
real-size layout (meta device) and by round trip on a tiny model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import split_files
from ..flux import files as flux_files
from ..flux.files import load_t5_file, load_vae_file
from ..split_files import (
    Tensors,
    convert_with_scales,
    file_keys,
    folder_configs,
    load_transformer,
    model_params,
    read_tensors,
    strip_prefix,
    take_fp8_scales,
    transformer_keys,
)
from . import offline

APPROXIMATOR = "distilled_guidance_layer."
# keys every Chroma transformer has in the original layout (Flux's blocks + the approximator) and in diffusers'
_ORIGINAL_MARKERS = ("double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight",
                     "distilled_guidance_layer.in_proj.weight")
_DIFFUSERS_MARKERS = ("transformer_blocks.0.attn.to_q.weight", "single_transformer_blocks.0.attn.to_q.weight",
                      "distilled_guidance_layer.in_proj.weight")
# approximator parameter names, each way (in_proj / out_proj are named alike in both layouts)
_TO_DIFFUSERS = [(r"^layers\.(\d+)\.in_layer\.", r"layers.\1.linear_1."),
                 (r"^layers\.(\d+)\.out_layer\.", r"layers.\1.linear_2."), (r"^norms\.(\d+)\.scale$", r"norms.\1.weight")]
_TO_ORIGINAL = [(r"^layers\.(\d+)\.linear_1\.", r"layers.\1.in_layer."),
                (r"^layers\.(\d+)\.linear_2\.", r"layers.\1.out_layer."), (r"^norms\.(\d+)\.weight$", r"norms.\1.scale")]


# -- what a file is -----------------------------------------------------------------------------------------
def is_chroma_transformer_file(path: Path) -> bool:
    """A Chroma transformer file (original or diffusers key names, with or without ComfyUI's prefix)?"""
    if path.suffix.lower() != ".safetensors":
        return False
    stripped = transformer_keys(file_keys(path))  # None: a LoRA
    return stripped is not None and (set(_ORIGINAL_MARKERS) <= stripped or set(_DIFFUSERS_MARKERS) <= stripped)


def is_chroma_folder(path: Path) -> bool:
    """A diffusers Chroma folder (ChromaPipeline with a ChromaTransformer2DModel)?"""
    pipeline, config = folder_configs(path) or ("", {})
    return pipeline == "ChromaPipeline" and config.get("_class_name") == "ChromaTransformer2DModel"


def is_chroma_model(path: Path) -> bool:
    return is_chroma_folder(path) if path.is_dir() else is_chroma_transformer_file(path)


# -- the original <-> diffusers transformer layout ---------------------------------------------------------
def _rename_approximator(state: Tensors, to_diffusers: bool) -> Tensors:
    rules = _TO_DIFFUSERS if to_diffusers else _TO_ORIGINAL
    out: Tensors = {}
    for key, tensor in state.items():
        rest = key[len(APPROXIMATOR):]
        for pattern, repl in rules:
            rest = re.sub(pattern, repl, rest)
        out[APPROXIMATOR + rest] = tensor
    return out


def diffusers_to_original(state: Tensors) -> Tensors:
    """A diffusers ChromaTransformer2DModel state dict in the original (Chroma / ComfyUI) key names."""
    approx = {k: v for k, v in state.items() if k.startswith(APPROXIMATOR)}
    rest = {k: v for k, v in state.items() if not k.startswith(APPROXIMATOR)}
    return {**_rename_approximator(approx, to_diffusers=False), **flux_files.diffusers_to_bfl(rest)}


def original_to_diffusers(state: Tensors, config: dict[str, Any]) -> Tensors:
    """The original key names -> a diffusers ChromaTransformer2DModel state dict (``config``: its config, for
    the widths of the fused q/k/v and linear1 tensors)."""
    src = strip_prefix(dict(state))
    approx = {k: v for k, v in src.items() if k.startswith(APPROXIMATOR)}
    rest = {k: v for k, v in src.items() if not k.startswith(APPROXIMATOR)}
    return {**_rename_approximator(approx, to_diffusers=True), **flux_files.bfl_to_diffusers(rest, config)}


# -- loading ------------------------------------------------------------------------------------------------
@dataclass
class ChromaComponents:
    transformer: Any
    vae: Any
    text_encoder: Any  # T5-XXL encoder (Chroma has no CLIP)
    tokenizer: Any
    sources: dict[str, str]  # component -> the file or folder it came from (cache identities)
    text_encoder_2: Any = None  # none (the memory estimate reads Flux's component names)


def load_transformer_file(path: Path, config: dict[str, Any], dtype: torch.dtype = torch.float32, *,
                          keep_fp8: bool = False) -> Any:
    """A Chroma transformer file (original or diffusers key names, any float dtype incl. fp8) as a
    ChromaTransformer2DModel in ``dtype`` (``keep_fp8``: see ``split_files.load_transformer``)."""
    from diffusers import ChromaTransformer2DModel

    if not is_chroma_transformer_file(path):
        raise split_files.not_a_transformer_file(path, "a Chroma", "Chroma1-HD.safetensors / Chroma1-Base.safetensors")
    state = strip_prefix(read_tensors(path))
    state, scales = take_fp8_scales(state, path)  # ComfyUI's scaled fp8 files
    if any(k.startswith("double_blocks.") for k in state):
        state, scales = convert_with_scales(state, scales, lambda s: original_to_diffusers(s, config))
    return load_transformer(ChromaTransformer2DModel, model_params(config), state, "Chroma transformer", path,
                            dtype=dtype, keep_fp8=keep_fp8, scales=scales)


def _t5_tokenizer(config_folder: Path | None) -> Any:
    """A Chroma config folder's ``tokenizer/`` (T5) when it has one, else the bundled T5 tokenizer."""
    if config_folder is not None and (config_folder / "tokenizer").is_dir():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(config_folder / "tokenizer"), local_files_only=True)
    return offline.t5_tokenizer(None)


def load_chroma_components(path: Path, *, config_folder: Path | None = None, vae_path: Path | None = None,
                           text_encoder_path: Path | None = None,
                           transformer_options: dict[str, Any] | None = None) -> ChromaComponents:
    """Everything of a Chroma model, offline: a diffusers folder, or a transformer file with the separate T5
    and VAE files (configs from ``config_folder``, a Chroma diffusers folder, or the ones sdstudio ships; a
    transformer file is loaded with ``transformer_options``: ``transformer_parts.load_options``)."""
    from diffusers import AutoencoderKL, ChromaTransformer2DModel

    split_files.require_model_path(path)
    sources = {"transformer": str(path)}
    vae = None
    if path.is_dir():
        if not is_chroma_folder(path):
            raise split_files.not_a_folder(path, "Chroma", "ChromaPipeline", "a ChromaTransformer2DModel")
        from transformers import T5EncoderModel, T5TokenizerFast

        transformer, vae, te, tok = split_files.load_folder_parts(path, {
            "transformer": ChromaTransformer2DModel, "vae": AutoencoderKL, "text_encoder": T5EncoderModel,
            "tokenizer": T5TokenizerFast})
        sources.update(vae=str(path), text_encoder=str(path))
    else:
        split_files.require_part_files(path, "Chroma", {"model.text_encoder_2_path": text_encoder_path,
                                                        "model.vae_path": vae_path},
                                       "the T5-XXL (t5xxl_fp16.safetensors) and VAE (Flux's ae.safetensors) files")
        assert text_encoder_path is not None
        tconfig = (dict(ChromaTransformer2DModel.load_config(str(config_folder), subfolder="transformer"))
                   if config_folder else dict(offline.TRANSFORMER_CONFIG))
        transformer = load_transformer_file(path, tconfig, **(transformer_options or {}))
        te = load_t5_file(text_encoder_path, config_folder, subfolder="text_encoder", key="model.text_encoder_2_path")
        tok = _t5_tokenizer(config_folder)
        sources["text_encoder"] = str(text_encoder_path)
    if vae_path is not None:
        vae = load_vae_file(vae_path, config_folder if not path.is_dir() else path)
        sources["vae"] = str(vae_path)
    return ChromaComponents(transformer, vae, te, tok, sources)
