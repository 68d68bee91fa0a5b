"""Flux LoRA exports.

- **kohya** (sd-scripts' names; ComfyUI, Forge and diffusers load them): ``lora_unet_double_blocks_0_img_attn_qkv``,
  ``..._img_attn_proj``, ``..._img_mlp_0``, ``..._img_mod_lin``, ``lora_unet_single_blocks_0_linear1`` /
  ``_linear2`` / ``_modulation_lin``, each ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``. The original
  layout fuses q/k/v (and a single block's MLP input into ``linear1``); the LoRAs trained on diffusers' split
  layers are stacked into one LoRA of the fused weight: downs concatenated, ups block-diagonal (sd-scripts'
  split-qkv files are written so). Its rank is the sum of the parts' ranks, so the up weights carry the factor
  that keeps alpha / rank exactly the trained scale: every consumer applies the trained strength.
- **diffusers** (``transformer.<module>.lora_A/B.weight``, written by FluxPipeline.save_lora_weights): alpha /
  rank is folded into lora_B and alpha = rank is recorded, since ComfyUI never reads the adapter metadata
  (reference/formats.md). This is the default: diffusers and ComfyUI load all of it at the same strength.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ...errors import UserError
from ...export.metadata import cast, training_metadata, write_safetensors
from ...export.source import ExportSource, lora_peft_state
from ...export.transformer_lora import write_diffusers_lora
from ..fused_lora import peft_pairs as _pairs
from ..fused_lora import stack_loras as _stack
from ..registry import get_family
from ..split_files import Tensors
from .files import DOUBLE_FUSED, DOUBLE_NAMES, SINGLE_FUSED, SINGLE_NAMES

_BLOCK = re.compile(r"^(?P<kind>transformer_blocks|single_transformer_blocks)\.(?P<i>\d+)\.(?P<rest>.+)$")


def kohya_state(source: ExportSource, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The run's transformer LoRA in sd-scripts' Flux key names (fused q/k/v stacked, the real alpha)."""
    lora = source.lora
    assert lora is not None
    alpha, rank = float(lora["alpha"]), int(lora["rank"])
    pairs = _pairs(lora_peft_state(source, "transformer."))
    out: dict[str, torch.Tensor] = {}

    def put(name: str, down: torch.Tensor, up: torch.Tensor) -> None:
        out[f"lora_unet_{name}.lora_down.weight"] = down
        out[f"lora_unet_{name}.lora_up.weight"] = up
        out[f"lora_unet_{name}.alpha"] = torch.tensor(alpha)

    blocks: dict[tuple[str, int], dict[str, dict[str, torch.Tensor]]] = {}
    for module, pair in pairs.items():
        m = _BLOCK.match(module)
        if m is None:
            raise UserError(f"Flux kohya export: the LoRA module {module!r} is outside the transformer blocks")
        blocks.setdefault((m["kind"], int(m["i"])), {})[m["rest"]] = pair
    for (kind, i), modules in sorted(blocks.items()):
        double = kind == "transformer_blocks"
        prefix = f"double_blocks_{i}" if double else f"single_blocks_{i}"
        names, fused = (DOUBLE_NAMES, DOUBLE_FUSED) if double else (SINGLE_NAMES, SINGLE_FUSED)
        done: set[str] = set()
        for original, parts in fused.items():
            present = [modules.get(p) for p in parts]
            if not any(present):
                continue
            outs = [_out_features(source, kind, p, modules.get(p)) for p in parts]
            n = sum(1 for p in present if p is not None)
            down, up, _ = _stack(present, outs, scale=float(n))  # alpha / (n r) * (n up) = alpha / r * up
            put(f"{prefix}_{original.replace('.', '_')}", down, up)
            done.update(p for p in parts if p in modules)
        for rest, pair in modules.items():
            if rest in done:
                continue
            if rest not in names:
                raise UserError(f"Flux kohya export: no original-layout name for {kind}.{i}.{rest}")
            put(f"{prefix}_{names[rest].replace('.', '_')}", pair["A"], pair["B"])
    del rank
    out.update(_kohya_text_pairs(source))
    return cast(out, dtype)


def _kohya_text_pairs(source: ExportSource) -> dict[str, torch.Tensor]:
    """CLIP-L's LoRA (lora.text_encoder) as ``lora_te1_text_model_encoder_layers_...`` with the real alpha."""
    from ...export.lora import _kohya_pairs, text_lora_states
    from ..registry import get_family

    assert source.lora is not None
    out: dict[str, torch.Tensor] = {}
    if not getattr(source, "text_encoders_trained", ()):  # no CLIP-L LoRA (or a source that knows of none)
        return out
    for name, state in text_lora_states(source).items():
        out.update(_kohya_pairs(state, source, get_family(source.family).kohya_text_prefixes[name], source.lora["alpha"]))
    return out


def _out_features(source: ExportSource, kind: str, part: str, pair: dict[str, torch.Tensor] | None) -> int:
    """Rows of a part of a fused weight: from its LoRA when trained, else from the model's widths."""
    if pair is not None:
        return int(pair["B"].shape[0])
    arch = source.architecture
    inner = int(arch.get("inner_dim", 3072))
    return int(inner * 4) if part == "proj_mlp" else inner


def _metadata(source: ExportSource, path: Path) -> dict[str, str]:
    meta = training_metadata(source, title=path.stem, lora=True)
    meta.pop("modelspec.prediction_type", None)  # flow matching: no epsilon / v
    # a family built on Flux's blocks (Chroma) exports through these writers and names its own implementation
    meta["modelspec.implementation"] = getattr(get_family(source.family), "original_implementation",
                                               "https://github.com/black-forest-labs/flux")
    meta["ss_network_module"] = "networks.lora_flux"
    return meta


def export_kohya_lora(source: ExportSource, path: Path, *, dtype: torch.dtype = torch.float16,
                      force: bool = False) -> Path:
    if source.lora is not None and source.lora.get("type", "lora") != "lora":
        from .lycoris import export_lycoris_flux  # LoHa / LoKr / DoRA / OFT: LyCORIS keys

        return export_lycoris_flux(source, path, dtype=dtype, force=force)
    return write_safetensors(kohya_state(source, dtype), path, _metadata(source, path), force=force)


def diffusers_text_state(source: ExportSource) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """CLIP-L's LoRA (``text_model.`` module paths) with alpha / rank folded in, and its adapter config; None
    without one."""
    from ...export.lora import text_lora_states
    from ...export.transformer_lora import fold_alpha
    from ..adapters import text_lora_targets

    lora = source.lora
    assert lora is not None
    states = text_lora_states(source)
    if "text_encoder" not in states:
        return None
    targets = (source.architecture.get("text_encoder_lora_targets") or {}).get("text_encoder") \
        or text_lora_targets(lora["targets"])
    return fold_alpha(states["text_encoder"], lora, targets)


def export_diffusers_lora(source: ExportSource, path: Path, *, dtype: torch.dtype = torch.float16,
                          force: bool = False) -> Path:
    from diffusers import FluxPipeline

    from .model import LORA_TARGETS

    kind = (source.lora or {}).get("type", "lora")
    if kind != "lora":
        raise UserError(f"diffusers export: diffusers loads no {kind} adapter for Flux; export it as kohya "
                        "(LyCORIS keys, which ComfyUI and Forge load)")
    assert source.lora is not None
    extra: dict[str, Any] = {}
    text = diffusers_text_state(source)
    if text is not None:  # CLIP-L's LoRA: text_encoder.text_model.… (what ComfyUI maps as well)
        extra = {"text_encoder_lora_layers": text[0], "text_encoder_lora_adapter_metadata": text[1]}
    return write_diffusers_lora(source, path, FluxPipeline, LORA_TARGETS[source.lora["targets"]],
                                _metadata(source, path), dtype=dtype, force=force, extra_layers=extra)


def trained_transformer(source: ExportSource) -> Any:
    """The run's transformer on the CPU in fp32: a full fine-tune's weights, or the base with the LoRA merged."""
    from ...export.full_model import _merge_lora
    from ...export.lycoris import rebuilt_bundle

    bundle = rebuilt_bundle(source)
    transformer = bundle.components.transformer
    if bundle.lora:
        _merge_lora(transformer)
    return transformer.to(torch.float32).eval()


def export_single_file(source: ExportSource, path: Path, *, dtype: torch.dtype = torch.float16,
                       force: bool = False) -> Path:
    """The transformer as one .safetensors in the original (Black Forest Labs) key names, as
    ``flux1-dev.safetensors`` is shared: what ComfyUI's diffusion-model loader and diffusers'
    ``FluxTransformer2DModel.from_single_file`` read. A LoRA run is merged into it (any LyCORIS kind)."""
    from .files import diffusers_to_bfl

    return write_merged_transformer(source, path, diffusers_to_bfl,
                                    implementation="https://github.com/black-forest-labs/flux", dtype=dtype,
                                    force=force)


def write_merged_transformer(source: ExportSource, path: Path, to_original: Callable[[Tensors], Tensors], *,
                             implementation: str, prefix: str = "", dtype: torch.dtype = torch.float16,
                             force: bool = False) -> Path:
    """The single-file export of a transformer family (Flux, SD3, Chroma): the run's transformer (a LoRA merged
    in, any LyCORIS kind) renamed by ``to_original`` to the key names its original file has (``prefix`` before
    each, as that file has it), with the training metadata."""
    if path.exists() and not force:
        raise UserError(f"{path}: exists already; choose another `out` or pass `force` to overwrite it")
    if source.text_encoders_trained:
        title = get_family(source.family).short_title
        raise UserError(f"single-file export of a {title} run that trained a text encoder's LoRA: the file holds "
                        "the transformer only, so that training would be lost; export the LoRA (kohya) instead")
    state = to_original(trained_transformer(source).state_dict())
    meta = training_metadata(source, title=path.stem, lora=False)
    meta.pop("modelspec.prediction_type", None)
    meta["modelspec.implementation"] = implementation
    return write_safetensors(cast({prefix + k: v for k, v in state.items()}, dtype), path, meta, force=force)


def lora_rank(source: ExportSource) -> int:
    assert source.lora is not None
    return int(source.lora["rank"])
