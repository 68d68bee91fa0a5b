"""The diffusers-layout LoRA file of a transformer family (Flux, SD3, ...): PEFT names under ``transformer.``,
written by the family's diffusers pipeline's own ``save_lora_weights``, with alpha / rank folded into lora_B and
alpha = rank recorded, since ComfyUI never reads the adapter metadata (reference/formats.md): every consumer
applies the trained strength."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .metadata import cast, write_safetensors
from .source import ExportSource, lora_peft_state


def folded_peft_state(source: ExportSource, target_modules: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """PEFT tensors with alpha / rank folded into lora_B, and the adapter config with alpha = rank."""
    assert source.lora is not None
    return fold_alpha(lora_peft_state(source, "transformer."), source.lora, target_modules)


def fold_alpha(state: dict[str, torch.Tensor], lora: dict[str, Any], target_modules: Any
               ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``state`` (PEFT names) with alpha / rank folded into lora_B, and an adapter config with alpha = rank."""
    from peft import LoraConfig

    scale = float(lora["alpha"]) / int(lora["rank"])
    folded = {k: (v.float() * scale if ".lora_B." in k else v) for k, v in state.items()}
    cfg = LoraConfig(r=int(lora["rank"]), lora_alpha=float(lora["rank"]), target_modules=target_modules,
                     init_lora_weights="gaussian").to_dict()
    return folded, {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}


def write_diffusers_lora(source: ExportSource, path: Path, pipeline_class: Any, target_modules: Any,
                         metadata: dict[str, str], *, dtype: torch.dtype, force: bool,
                         extra_layers: dict[str, Any] | None = None) -> Path:
    """The file ``pipeline_class.save_lora_weights`` writes, with ``metadata`` (ss_network_alpha = rank) added;
    ``extra_layers``: further save_lora_weights arguments (e.g. a text encoder's LoRA and its adapter metadata)."""
    state, adapter = folded_peft_state(source, target_modules)
    extra = {k: (cast(v, dtype) if k.endswith("_lora_layers") else v) for k, v in (extra_layers or {}).items()}
    with tempfile.TemporaryDirectory(prefix="sdstudio-export-") as tmp:
        pipeline_class.save_lora_weights(tmp, transformer_lora_layers=cast(state, dtype),
                                         transformer_lora_adapter_metadata=adapter, safe_serialization=True,
                                         weight_name="lora.safetensors", **extra)
        with safe_open(str(Path(tmp) / "lora.safetensors"), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open is no mapping
            written = dict(fh.metadata() or {})
    assert source.lora is not None
    meta = {**metadata, **written, "ss_network_alpha": str(int(source.lora["rank"]))}
    return write_safetensors(tensors, path, meta, force=force)
