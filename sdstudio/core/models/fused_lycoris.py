"""LyCORIS adapters (LoHa / LoKr / DoRA / OFT) of split diffusers layers written in a transformer family's
original layout, whose q/k/v (Flux: also a single block's MLP input) are one fused weight: the layout is a
family's name table (``BlockLayout``), the stacking is shared (Flux and SD3 use it; ``fused_lora.py`` is the
plain-LoRA counterpart). Each fused module is written as one adapter whose effect on each row block equals the
trained part's:
- LoHa: rows stack exactly (the Hadamard product is elementwise): ``hada_w*_a`` block-diagonal, ``hada_w*_b``
  concatenated, alpha times the number of parts (alpha / rank unchanged).
- DoRA: the LoRA stacks as in the kohya LoRA export, the output-axis ``dora_scale`` concatenates (a part without
  an adapter gets its base rows' norm: the identity).
- OFT (written as LyCORIS' ``.diff``, see ``core/export/lycoris.py``): the differences concatenate.
- LoKr: a Kronecker product does not stack, so each part of a fused module is written under ComfyUI's
  ``lycoris_<diffusers module>`` name (SimpleTuner's LyCORIS names), which ComfyUI applies to that part's rows of
  the fused weight (it maps them for Flux and SD3); the unfused modules keep their ``lora_unet_`` names.
A module whose original weight has its row halves swapped (SD3's last ``context_block.adaLN_modulation``:
(shift, scale) against diffusers' (scale, shift)) is written as the exact trained difference, swapped."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..export.lycoris import _merged_delta, _tuner_layers, module_adapter
from ..lora_tools.files import ModuleAdapter


@dataclass(frozen=True)
class Block:
    """Where a peft module sits: its block's diffusers path (``transformer_blocks.3``), the block's original
    kohya prefix (``joint_blocks_3``), the diffusers -> original names of its unfused modules and the fused
    original modules -> their diffusers parts (in row order)."""

    path: str
    original: str
    names: Mapping[str, str]
    fused: Mapping[str, tuple[str, ...]]
    swapped: frozenset[str] = field(default_factory=frozenset)  # modules whose original rows are swapped halves


BlockLayout = Callable[[str], Block | None]  # peft module path -> its block (None: outside the blocks)


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


def stack_adapters(kind: str, parts: list[ModuleAdapter | None], bases: list[torch.Tensor], what: str
                   ) -> ModuleAdapter:
    """One adapter of a fused weight whose row blocks are ``parts`` (None: a part without an adapter)."""
    rows = [int(b.shape[0]) for b in bases]
    present = [p for p in parts if p is not None]
    if kind == "oft":
        diffs = [p.tensors["diff"] if p is not None else torch.zeros_like(b) for p, b in zip(parts, bases)]
        return ModuleAdapter("full", {"diff": torch.cat(diffs)})
    scales = {round(p.scale(), 12) for p in present}
    if len(scales) != 1:
        raise UserError(f"{what}: the parts of a fused module were trained with different scales")
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
    raise UserError(f"{what}: lora.type {kind!r} cannot be stacked into a fused module")


def _base_weight(module: nn.Module) -> torch.Tensor:
    return (module.get_base_layer() if hasattr(module, "get_base_layer") else module).weight.detach().float()


def fused_lycoris_modules(transformer: nn.Module, kind: str, layout: BlockLayout, what: str
                          ) -> dict[str, ModuleAdapter]:
    """File module name -> adapter for every adapted layer of a peft-wrapped transformer, in the original
    layout's kohya names (``lora_unet_<original>``; ``lycoris_<diffusers module>`` for a LoKr part)."""
    blocks: dict[str, tuple[Block, dict[str, Any]]] = {}
    for path, layer in _tuner_layers(transformer).items():
        block = layout(path)
        if block is None:
            raise UserError(f"{what}: the adapted module {path!r} is outside the transformer blocks")
        blocks.setdefault(block.path, (block, {}))[1][path[len(block.path) + 1:]] = layer
    out: dict[str, ModuleAdapter] = {}
    for _, (block, modules) in sorted(blocks.items()):
        done: set[str] = set()
        for original, part_names in block.fused.items():
            if not any(p in modules for p in part_names):
                continue
            done.update(part_names)
            if kind == "lokr":  # no fused form: each part under its diffusers name (a slice in ComfyUI)
                for p in part_names:
                    if p in modules:
                        out[f"lycoris_{block.path}_{p}".replace(".", "_")] = module_adapter(kind, modules[p])
                continue
            parts = [module_adapter(kind, modules[p]) if p in modules else None for p in part_names]
            bases = [_base_weight(transformer.get_submodule(f"{block.path}.{p}")) for p in part_names]
            out[f"lora_unet_{block.original}_{original}".replace(".", "_")] = stack_adapters(kind, parts, bases,
                                                                                            what)
        for rest, layer in modules.items():
            if rest in done:
                continue
            if rest not in block.names:
                raise UserError(f"{what}: no original-layout name for {block.path}.{rest}")
            name = f"lora_unet_{block.original}_{block.names[rest]}".replace(".", "_")
            if rest in block.swapped:  # the exact difference, its row halves in the original order
                first, second = _merged_delta(layer).chunk(2, dim=0)
                out[name] = ModuleAdapter("full", {"diff": torch.cat([second, first])})
            else:
                out[name] = module_adapter(kind, layer)
    return out


def lycoris_network_metadata(lora: Mapping[str, Any], *, text_encoder: bool) -> dict[str, str]:
    """``ss_network_module`` / ``ss_network_args`` of a LyCORIS file (as LyCORIS' kohya wrapper writes them)."""
    algo = {"loha": "loha", "lokr": "lokr", "dora": "lora", "oft": "full"}[lora["type"]]
    args: dict[str, Any] = {"algo": algo, "targets": lora["targets"], "dropout": lora["dropout"],
                            "text_encoder": text_encoder, "sdstudio_type": lora["type"]}
    if lora["type"] == "dora":
        args.update(dora_wd=True, wd_on_output=True)
    if lora["type"] == "lokr":
        args.update(factor=lora.get("factor", -1), decompose_both=lora.get("decompose_both", False))
    if lora["type"] == "oft":
        args["oft_block_size"] = lora.get("oft_block_size", 32)
    return {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(args)}
