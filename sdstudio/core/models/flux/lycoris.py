"""LyCORIS exports of Flux (and Chroma: Flux's blocks) LoHa / LoKr / DoRA / OFT runs, in the names ComfyUI (and
Forge, whose Flux loader is ComfyUI's) reads for Flux: ``lora_unet_<original module>``
(``lora_unet_double_blocks_0_img_attn_proj.hada_w1_a``), with ``ss_network_module = lycoris.kohya``.

The original layout fuses q/k/v (and a single block's MLP input into ``linear1``); the adapters trained on
diffusers' split layers are stacked per kind by ``core/models/fused_lycoris.py`` (LoKr parts of a fused module
as ComfyUI's ``lycoris_<diffusers module>`` slice names), with Flux's name table (``files.py``).
diffusers loads none of these for Flux (it has no LyCORIS loader), so they are kohya-only.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ...errors import UserError
from ...export.lycoris import _tuner_layers, module_adapter, rebuilt_bundle
from ...export.metadata import training_metadata
from ...export.source import ExportSource
from ...lora_tools.files import ModuleAdapter, save_adapter_file
from ...lora_tools.names import text_module_path
from ..fused_lycoris import Block, fused_lycoris_modules, lycoris_network_metadata
from ..registry import get_family
from .files import DOUBLE_FUSED, DOUBLE_NAMES, SINGLE_FUSED, SINGLE_NAMES

_BLOCK = re.compile(r"^(?P<kind>transformer_blocks|single_transformer_blocks)\.(?P<i>\d+)\.")


def _flux_block(path: str) -> Block | None:
    m = _BLOCK.match(path)
    if m is None:
        return None
    if m["kind"] == "transformer_blocks":
        return Block(f"transformer_blocks.{m['i']}", f"double_blocks_{m['i']}", DOUBLE_NAMES, DOUBLE_FUSED)
    return Block(f"single_transformer_blocks.{m['i']}", f"single_blocks_{m['i']}", SINGLE_NAMES, SINGLE_FUSED)


def lycoris_modules(transformer: nn.Module, kind: str) -> dict[str, ModuleAdapter]:
    """File module name -> adapter for every adapted layer of a peft-wrapped Flux transformer."""
    return fused_lycoris_modules(transformer, kind, _flux_block, "Flux LyCORIS export")


def export_lycoris_flux(source: ExportSource, path: Path, *, dtype: torch.dtype = torch.float16,
                        force: bool = False) -> Path:
    """The run's LoHa / LoKr / DoRA / OFT adapter as a LyCORIS file ComfyUI loads for Flux (or Chroma, whose
    family names its implementation)."""
    lora = source.lora
    assert lora is not None
    if path.exists() and not force:
        raise UserError(f"{path}: exists already; choose another `out` or pass `force` to overwrite it")
    bundle = rebuilt_bundle(source)
    modules = lycoris_modules(bundle.components.transformer, lora["type"])
    if bundle.train_text:  # CLIP-L's adapter: lora_te1_text_model_... as in kohya's files
        for module_path, layer in _tuner_layers(bundle.components.text_encoder).items():
            modules["lora_te1_" + text_module_path(module_path).replace(".", "_")] = module_adapter(lora["type"], layer)
    meta = training_metadata(source, title=path.stem, lora=True)
    meta.pop("modelspec.prediction_type", None)  # flow matching: no epsilon / v
    meta["modelspec.implementation"] = getattr(get_family(source.family), "original_implementation",
                                               "https://github.com/black-forest-labs/flux")
    meta.update(lycoris_network_metadata(lora, text_encoder=bool(bundle.train_text)))
    return save_adapter_file(modules, path, meta, dtype=dtype, force=force)
