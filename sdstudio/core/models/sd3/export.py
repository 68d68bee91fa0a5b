"""SD3 / SD3.5 LoRA exports.

- **diffusers** (the default: ``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``, written by
  StableDiffusion3Pipeline.save_lora_weights): diffusers reads no other SD3 LoRA layout, and ComfyUI loads this
  one fully too. alpha / rank is folded into lora_B and alpha = rank is recorded, since ComfyUI never reads the
  adapter metadata (reference/formats.md): both apply the trained strength.
- **kohya** (sd-scripts' names, for sd-scripts / ComfyUI / Forge users; diffusers cannot read it):
  ``lora_unet_joint_blocks_0_x_block_attn_qkv``, ``..._context_block_attn_proj``, ``..._x_block_mlp_fc1``,
  ``..._x_block_attn2_qkv`` (3.5 medium), each ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``. The
  original layout fuses q/k/v: the LoRAs trained on diffusers' split layers are stacked into one LoRA of the fused
  weight (downs concatenated, ups block-diagonal, the up weights carrying the factor that keeps alpha / rank the
  trained scale), as for Flux. A LoHa / LoKr / DoRA / OFT run (lora.type) is written here with LyCORIS keys in
  the same names (``ss_network_module = lycoris.kohya``; ``core/models/fused_lycoris.py`` stacks each kind).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ...errors import UserError
from ...export.metadata import cast, training_metadata, write_safetensors
from ...export.source import ExportSource, lora_peft_state
from ...export.transformer_lora import write_diffusers_lora
from ...lora_tools.files import ModuleAdapter
from ..fused_lora import peft_pairs, stack_loras
from ..fused_lycoris import Block, BlockLayout, fused_lycoris_modules, lycoris_network_metadata
from .files import BLOCK_NAMES, FUSED

_BLOCK = re.compile(r"^transformer_blocks\.(?P<i>\d+)\.(?P<rest>.+)$")


def kohya_state(source: ExportSource, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The run's transformer LoRA in sd-scripts' SD3 key names (fused q/k/v stacked, the real alpha)."""
    lora = source.lora
    assert lora is not None
    alpha = float(lora["alpha"])
    inner = int(source.architecture.get("inner_dim", 2432))
    last = int(source.architecture.get("num_layers", 0)) - 1
    out: dict[str, torch.Tensor] = {}

    def put(name: str, down: torch.Tensor, up: torch.Tensor) -> None:
        out[f"lora_unet_{name}.lora_down.weight"] = down
        out[f"lora_unet_{name}.lora_up.weight"] = up
        out[f"lora_unet_{name}.alpha"] = torch.tensor(alpha)

    blocks: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    for module, pair in peft_pairs(lora_peft_state(source, "transformer."), "SD3 kohya export").items():
        m = _BLOCK.match(module)
        if m is None:
            raise UserError(f"SD3 kohya export: the LoRA module {module!r} is outside the joint blocks")
        blocks.setdefault(int(m["i"]), {})[m["rest"]] = pair
    for i, modules in sorted(blocks.items()):
        done: set[str] = set()
        for original, parts in FUSED.items():
            present = [modules.get(p) for p in parts]
            if not any(present):
                continue
            n = sum(1 for p in present if p is not None)
            down, up, _ = stack_loras(present, [inner] * len(parts), scale=float(n))  # alpha/(n r) * n up
            put(f"joint_blocks_{i}_{original.replace('.', '_')}", down, up)
            done.update(p for p in parts if p in modules)
        for rest, pair in modules.items():
            if rest in done:
                continue
            if rest not in BLOCK_NAMES:
                raise UserError(f"SD3 kohya export: no original-layout name for transformer_blocks.{i}.{rest}")
            up = pair["B"]
            if i == last and rest == "norm1_context.linear":  # original (shift, scale) = diffusers' halves swapped
                up = torch.cat(list(reversed(up.chunk(2, dim=0))))
            put(f"joint_blocks_{i}_{BLOCK_NAMES[rest].replace('.', '_')}", pair["A"], up)
    return cast(out, dtype)


def _metadata(source: ExportSource, path: Path) -> dict[str, str]:
    from ..registry import get_family

    family = get_family(source.family).for_variant(source.architecture.get("variant", "3.5-large"))  # type: ignore[attr-defined]
    meta = training_metadata(source, title=path.stem, lora=True)
    meta.pop("modelspec.prediction_type", None)  # flow matching: no epsilon / v
    meta["ss_base_model_version"] = family.kohya_base_version
    meta["modelspec.architecture"] = f"{family.modelspec_architecture}/lora"
    meta["ss_network_module"] = "networks.lora_sd3"
    return meta


def export_kohya_lora(source: ExportSource, path: Path, *, dtype: torch.dtype = torch.float16,
                      force: bool = False) -> Path:
    if source.lora is not None and source.lora.get("type", "lora") != "lora":
        return export_lycoris_sd3(source, path, dtype=dtype, force=force)
    return write_safetensors(kohya_state(source, dtype), path, _metadata(source, path), force=force)


def _sd3_block(last: int) -> BlockLayout:
    """SD3's name table as a ``fused_lycoris`` layout; the last block's context adaLN has its halves swapped."""
    def block(path: str) -> Block | None:
        m = _BLOCK.match(path)
        if m is None:
            return None
        i = int(m["i"])
        return Block(f"transformer_blocks.{i}", f"joint_blocks_{i}", BLOCK_NAMES, FUSED,
                     frozenset({"norm1_context.linear"}) if i == last else frozenset())
    return block


def lycoris_modules(transformer: nn.Module, kind: str) -> dict[str, ModuleAdapter]:
    """File module name -> adapter for every adapted layer of a peft-wrapped SD3 transformer: LyCORIS keys in
    sd-scripts' SD3 names (``lora_unet_joint_blocks_0_x_block_attn_qkv.hada_w1_a``), which ComfyUI maps onto its
    MMDiT weights; a LoKr part of a fused q/k/v as ``lycoris_transformer_blocks_0_attn_to_q`` (ComfyUI's SD3
    slice names). Stacking per kind: ``core/models/fused_lycoris.py``."""
    last = int(transformer.config.num_layers) - 1
    return fused_lycoris_modules(transformer, kind, _sd3_block(last), "SD3 LyCORIS export")


def export_lycoris_sd3(source: ExportSource, path: Path, *, dtype: torch.dtype = torch.float16,
                       force: bool = False) -> Path:
    """The run's LoHa / LoKr / DoRA / OFT adapter as a LyCORIS file ComfyUI and Forge load for SD3 / SD3.5
    (diffusers has no LyCORIS loader for SD3)."""
    from ...export.lycoris import rebuilt_bundle
    from ...lora_tools.files import save_adapter_file

    lora = source.lora
    assert lora is not None
    if path.exists() and not force:
        raise UserError(f"{path}: exists already; choose another `out` or pass `force` to overwrite it")
    modules = lycoris_modules(rebuilt_bundle(source).components.transformer, lora["type"])
    meta = _metadata(source, path)
    meta.update(lycoris_network_metadata(lora, text_encoder=False))
    return save_adapter_file(modules, path, meta, dtype=dtype, force=force)


def export_diffusers_lora(source: ExportSource, path: Path, *, dtype: torch.dtype = torch.float16,
                          force: bool = False) -> Path:
    from diffusers import StableDiffusion3Pipeline

    from .model import LORA_TARGETS

    kind = (source.lora or {}).get("type", "lora")
    if kind != "lora":
        raise UserError(f"diffusers export: diffusers loads no {kind} adapter for SD3; export it as kohya "
                        "(LyCORIS keys, which ComfyUI and Forge load)")
    assert source.lora is not None
    return write_diffusers_lora(source, path, StableDiffusion3Pipeline, LORA_TARGETS[source.lora["targets"]],
                                _metadata(source, path), dtype=dtype, force=force)


def export_single_file(source: ExportSource, path: Path, *, dtype: torch.dtype = torch.float16,
                       force: bool = False) -> Path:
    """The transformer as one .safetensors in the original (MMDiT) key names under ``model.diffusion_model.``,
    as Stability AI's ``sd3.5_large.safetensors`` holds it (without its text encoders and VAE, which stay the
    base model's files): what ComfyUI's diffusion-model loader, diffusers' ``SD3Transformer2DModel.from_single_file``
    and sdstudio's own ``model.path`` read. A LoRA run is merged into it."""
    from ..flux.export import write_merged_transformer
    from .files import diffusers_to_sd3

    return write_merged_transformer(source, path, diffusers_to_sd3, prefix="model.diffusion_model.",
                                    implementation="https://github.com/Stability-AI/sd3.5", dtype=dtype,
                                    force=force)
