"""LyCORIS exports of Flux LoHa / LoKr / DoRA / OFT runs, in the names ComfyUI (and Forge, whose Flux loader is
ComfyUI's) reads for Flux: ``lora_unet_<original module>`` (``lora_unet_double_blocks_0_img_attn_proj.hada_w1_a``),
with ``ss_network_module = lycoris.kohya``.

The original layout fuses q/k/v (and a single block's MLP input into ``linear1``); the adapters were trained on
diffusers' split layers (peft), so each fused module is written as one adapter whose effect on each row block
equals the trained part's:
- LoHa: rows stack exactly (the Hadamard product is elementwise): ``hada_w*_a`` block-diagonal, ``hada_w*_b``
  concatenated, alpha times the number of parts (alpha / rank unchanged).
- DoRA: the LoRA stacks as in the kohya LoRA export, the output-axis ``dora_scale`` concatenates (a part without
  an adapter gets its base rows' norm: the identity).
- OFT (written as LyCORIS' ``.diff``, see ``core/export/lycoris.py``): the differences concatenate.
- LoKr: a Kronecker product does not stack, so each part of a fused module is written under ComfyUI's
  ``lycoris_<diffusers module>`` name (SimpleTuner's LyCORIS names), which ComfyUI applies to that part's rows of
  the fused weight; the unfused modules keep their ``lora_unet_`` names.
diffusers loads none of these for Flux (it has no LyCORIS loader), so they are kohya-only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import UserError
from ...export.lycoris import _tuner_layers, module_adapter, rebuilt_bundle
from ...export.metadata import training_metadata
from ...export.source import ExportSource
from ...lora_tools.files import ModuleAdapter, save_adapter_file
from ...lora_tools.names import text_module_path
from .files import DOUBLE_FUSED, DOUBLE_NAMES, SINGLE_FUSED, SINGLE_NAMES

_BLOCK = re.compile(r"^(?P<kind>transformer_blocks|single_transformer_blocks)\.(?P<i>\d+)\.(?P<rest>.+)$")


def _block_diag_rows(parts: list[torch.Tensor | None], rows: list[int]) -> torch.Tensor:
    """Row blocks of the parts (zeros for a missing part), each part in its own column block."""
    width = sum(p.shape[1] for p in parts if p is not None)
    out = torch.zeros(sum(rows), width)
    row = col = 0
    for part, n in zip(parts, rows):
        if part is not None:
            out[row:row + n, col:col + part.shape[1]] = part
            col += part.shape[1]
        row += n
    return out


def _stack(kind: str, parts: list[ModuleAdapter | None], bases: list[torch.Tensor]) -> ModuleAdapter:
    """One adapter of a fused weight whose row blocks are ``parts`` (None: a part without an adapter)."""
    rows = [int(b.shape[0]) for b in bases]
    present = [p for p in parts if p is not None]
    if kind == "oft":
        diffs = [p.tensors["diff"] if p is not None else torch.zeros_like(b) for p, b in zip(parts, bases)]
        return ModuleAdapter("full", {"diff": torch.cat(diffs)})
    scales = {round(p.scale(), 12) for p in present}
    if len(scales) != 1:
        raise UserError("Flux LyCORIS export: the parts of a fused module were trained with different scales")
    if kind == "loha":
        t: dict[str, torch.Tensor] = {}
        for w in ("w1", "w2"):
            t[f"hada_{w}_a"] = _block_diag_rows([p.tensors[f"hada_{w}_a"] if p else None for p in parts], rows)
            t[f"hada_{w}_b"] = torch.cat([p.tensors[f"hada_{w}_b"] for p in present])
        rank = int(t["hada_w1_b"].shape[0])
        return ModuleAdapter("loha", t, present[0].scale() * rank)
    if kind == "dora":
        up = _block_diag_rows([p.tensors["lora_up.weight"] if p else None for p in parts], rows)
        down = torch.cat([p.tensors["lora_down.weight"] for p in present])
        eps = torch.finfo(torch.float32).eps
        scale = [p.tensors["dora_scale"].flatten() if p is not None else b.float().norm(dim=1) + eps
                 for p, b in zip(parts, bases)]
        return ModuleAdapter("dora", {"lora_down.weight": down, "lora_up.weight": up,
                                      "dora_scale": torch.cat(scale).reshape(-1, 1)},
                             present[0].scale() * int(down.shape[0]))
    raise UserError(f"Flux LyCORIS export: lora.type {kind!r} cannot be stacked into a fused module")


def lycoris_modules(transformer: nn.Module, kind: str) -> dict[str, ModuleAdapter]:
    """File module name -> adapter for every adapted layer of a peft-wrapped Flux transformer."""
    layers = _tuner_layers(transformer)
    blocks: dict[tuple[str, int], dict[str, Any]] = {}
    for path, layer in layers.items():
        m = _BLOCK.match(path)
        if m is None:
            raise UserError(f"Flux LyCORIS export: the adapted module {path!r} is outside the transformer blocks")
        blocks.setdefault((m["kind"], int(m["i"])), {})[m["rest"]] = layer
    out: dict[str, ModuleAdapter] = {}
    for (block_kind, i), modules in sorted(blocks.items()):
        double = block_kind == "transformer_blocks"
        prefix = f"double_blocks_{i}" if double else f"single_blocks_{i}"
        names, fused = (DOUBLE_NAMES, DOUBLE_FUSED) if double else (SINGLE_NAMES, SINGLE_FUSED)
        done: set[str] = set()
        for original, part_names in fused.items():
            if not any(p in modules for p in part_names):
                continue
            done.update(part_names)
            if kind == "lokr":  # no fused form: each part under its diffusers name (a slice in ComfyUI)
                for p in part_names:
                    if p in modules:
                        out[f"lycoris_{block_kind}_{i}_{p.replace('.', '_')}"] = module_adapter(kind, modules[p])
                continue
            parts = [module_adapter(kind, modules[p]) if p in modules else None for p in part_names]
            bases = [transformer.get_submodule(f"{block_kind}.{i}.{p}") for p in part_names]
            weights = [(b.get_base_layer() if hasattr(b, "get_base_layer") else b).weight.detach().float()
                       for b in bases]
            out[f"lora_unet_{prefix}_{original.replace('.', '_')}"] = _stack(kind, parts, weights)
        for rest, layer in modules.items():
            if rest in done:
                continue
            if rest not in names:
                raise UserError(f"Flux LyCORIS export: no original-layout name for {block_kind}.{i}.{rest}")
            out[f"lora_unet_{prefix}_{names[rest].replace('.', '_')}"] = module_adapter(kind, layer)
    return out


def export_lycoris_flux(source: ExportSource, path: Path, *, dtype: torch.dtype = torch.float16,
                        force: bool = False) -> Path:
    """The run's LoHa / LoKr / DoRA / OFT adapter as a LyCORIS file ComfyUI loads for Flux."""
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
    meta["modelspec.implementation"] = "https://github.com/black-forest-labs/flux"
    algo = {"loha": "loha", "lokr": "lokr", "dora": "lora", "oft": "full"}[lora["type"]]
    args: dict[str, Any] = {"algo": algo, "targets": lora["targets"], "dropout": lora["dropout"],
                            "text_encoder": bool(bundle.train_text), "sdstudio_type": lora["type"]}
    if lora["type"] == "dora":
        args.update(dora_wd=True, wd_on_output=True)
    if lora["type"] == "lokr":
        args.update(factor=lora.get("factor", -1), decompose_both=lora.get("decompose_both", False))
    if lora["type"] == "oft":
        args["oft_block_size"] = lora.get("oft_block_size", 32)
    meta.update({"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(args)})
    return save_adapter_file(modules, path, meta, dtype=dtype, force=force)
