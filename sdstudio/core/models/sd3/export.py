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
  trained scale), as for Flux.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ...errors import UserError
from ...export.metadata import cast, training_metadata, write_safetensors
from ...export.source import ExportSource, lora_peft_state
from ...export.transformer_lora import write_diffusers_lora
from ..fused_lora import peft_pairs, stack_loras
from .files import BLOCK_NAMES, FUSED

_BLOCK = re.compile(r"^transformer_blocks\.(?P<i>\d+)\.(?P<rest>.+)$")


def kohya_state(source: ExportSource, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The run's transformer LoRA in sd-scripts' SD3 key names (fused q/k/v stacked, the real alpha)."""
    lora = source.lora
    assert lora is not None
    alpha = float(lora["alpha"])
    inner = int(source.architecture.get("inner_dim", 2432))
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
            put(f"joint_blocks_{i}_{BLOCK_NAMES[rest].replace('.', '_')}", pair["A"], pair["B"])
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
    return write_safetensors(kohya_state(source, dtype), path, _metadata(source, path), force=force)


def export_diffusers_lora(source: ExportSource, path: Path, *, dtype: torch.dtype = torch.float16,
                          force: bool = False) -> Path:
    from diffusers import StableDiffusion3Pipeline

    from .model import LORA_TARGETS

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
