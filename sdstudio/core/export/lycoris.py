"""LyCORIS-key exports of LoHa / LoKr / DoRA / OFT runs, the files A1111, Forge and ComfyUI load
(``ss_network_module = lycoris.kohya``), module names as in kohya's LoRA files.

The run is rebuilt (base model + the checkpoint's peft adapters) so each module's tensors can be written in the
form those tools apply exactly as peft trained them:
- LoHa: peft's ``hada_*`` tensors and alpha as they are (the same formula).
- LoKr: ``lokr_w1`` / ``lokr_w2`` (or their ``_a`` / ``_b`` pairs); the consumers scale by alpha / rank only when a
  side is a low-rank pair, so with two full factors alpha / rank is folded into ``lokr_w1``.
- DoRA: ``lora_down`` / ``lora_up`` / ``alpha`` + ``dora_scale`` of shape (out, 1, ...): ComfyUI's output-axis
  form divides by the base weight's row norm, peft by the norm of W + delta, so the magnitude is written
  pre-multiplied by their ratio (exact in ComfyUI; A1111 reads only the input-axis form of older LyCORIS).
- OFT: peft rotates the input features, LyCORIS' ``oft_blocks`` the output rows; no block form reproduces one
  with the other, so an OFT run is written as LyCORIS' full-difference module (``<module>.diff``, which A1111,
  Forge and ComfyUI all add as is).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..lora_tools.files import ModuleAdapter, save_adapter_file
from ..lora_tools.names import file_names
from ..models.registry import get_family
from .metadata import training_metadata
from .source import ExportSource


def _tuner_layers(module: nn.Module) -> dict[str, Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: m for name, m in module.named_modules() if isinstance(m, BaseTunerLayer)}


def _merged_delta(layer: Any) -> torch.Tensor:
    """What peft's merge adds to the base weight (exactly the trained forward for every kind)."""
    base = layer.get_base_layer()
    before = base.weight.detach().clone()
    layer.merge(adapter_names=["default"])
    delta = base.weight.detach().float() - before.float()
    layer.unmerge()
    return delta


def module_adapter(kind: str, layer: Any) -> ModuleAdapter:
    """One peft layer of a run as the LyCORIS tensors that reproduce it."""
    a = "default"
    base_w = layer.get_base_layer().weight.detach().float()
    if kind == "loha":
        tensors = {n: getattr(layer, n)[a].detach().float() for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a",
                                                                      "hada_w2_b")}
        for n in ("hada_t1", "hada_t2"):
            if a in getattr(layer, n, {}):
                tensors[n] = getattr(layer, n)[a].detach().float()
        return ModuleAdapter("loha", tensors, float(layer.scaling[a]) * int(layer.r[a]))
    if kind == "lokr":
        tensors = {}
        for n in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"):
            if a in getattr(layer, n, {}):
                tensors[n] = getattr(layer, n)[a].detach().float()
        rank, scale = int(layer.r[a]), float(layer.scaling[a])
        adapter = ModuleAdapter("lokr", tensors, scale * rank)
        if adapter.rank is None:  # two full factors: consumers apply scale 1, so fold peft's alpha / rank in
            tensors["lokr_w1"] = tensors["lokr_w1"] * scale
            adapter.alpha = float(rank)
        if adapter.delta(base_w).shape != base_w.shape:
            raise UserError("LoKr export: a factor's shape does not fit its layer")
        return adapter
    if kind == "dora":
        down, up = layer.lora_A[a].weight.detach().float(), layer.lora_B[a].weight.detach().float()
        rank, scale = int(layer.r[a]), float(layer.scaling[a])
        adapter = ModuleAdapter("dora", {"lora_down.weight": down, "lora_up.weight": up}, scale * rank)
        merged = base_w + adapter.low_rank_delta(base_w.shape)
        magnitude = layer.lora_magnitude_vector[a].weight.detach().float().flatten()
        flat = (-1, *[1] * (base_w.dim() - 1))
        base_norm = base_w.reshape(base_w.shape[0], -1).norm(dim=1) + torch.finfo(torch.float32).eps
        merged_norm = merged.reshape(merged.shape[0], -1).norm(dim=1)
        adapter.tensors["dora_scale"] = (magnitude * base_norm / merged_norm).reshape(flat)
        return adapter
    if kind == "oft":
        return ModuleAdapter("full", {"diff": _merged_delta(layer)})
    raise UserError(f"lora.type {kind!r}: no LyCORIS export (plain LoRA runs use the kohya LoRA writer)")


def lycoris_modules(bundle: Any, source: ExportSource) -> dict[str, ModuleAdapter]:
    """kohya module name -> adapter, for the UNet and any trained text encoder."""
    kind = source.lora["type"] if source.lora else "lora"
    layers = int(source.architecture.get("layers_per_block", 2))
    parts: dict[str, nn.Module] = {"unet": bundle.components.unet}
    if getattr(bundle, "train_text", False):
        parts.update(bundle.text_encoders())
    out: dict[str, ModuleAdapter] = {}
    for component, module in parts.items():
        for path, layer in _tuner_layers(module).items():
            name = file_names(source.family, component, path, layers)[0]
            if name.startswith(("unet.", "text_encoder")):
                raise UserError(f"kohya export: no kohya name for {component} module {path!r} (convolution layers "
                                "of an SDXL LoRA are not supported yet); train with lora.targets = 'attention_ff'")
            out[name] = module_adapter(kind, layer)
    return out


def rebuilt_bundle(source: ExportSource) -> Any:
    """The run's model on the CPU in fp32 with the checkpoint's adapters loaded (not merged)."""
    config = source.config.with_overrides({"train.mixed_precision": "no", "train.device": "cpu"})
    bundle = get_family(source.family).build(config, [], device=torch.device("cpu"))
    bundle.load_trainable_state(source.weights, source.checkpoint)
    return bundle


def export_lycoris(source: ExportSource, path: Path, *, dtype: torch.dtype = torch.float16,
                   force: bool = False) -> Path:
    lora = source.lora
    assert lora is not None
    if path.exists() and not force:
        raise UserError(f"{path}: exists already; choose another `out` or pass `force` to overwrite it")
    modules = lycoris_modules(rebuilt_bundle(source), source)
    meta = training_metadata(source, title=path.stem, lora=True)
    algo = {"loha": "loha", "lokr": "lokr", "dora": "lora", "oft": "full"}[lora["type"]]
    args: dict[str, Any] = {"algo": algo, "targets": lora["targets"], "dropout": lora["dropout"],
                            "text_encoder": bool(source.text_encoders_trained), "sdstudio_type": lora["type"]}
    if lora["type"] == "dora":
        args["dora_wd"] = True
        args["wd_on_output"] = True
    if lora["type"] == "lokr":
        args.update(factor=lora.get("factor", -1), decompose_both=lora.get("decompose_both", False))
    if lora["type"] == "oft":
        args["oft_block_size"] = lora.get("oft_block_size", 32)
    meta.update({"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(args)})
    return save_adapter_file(modules, path, meta, dtype=dtype, force=force)
