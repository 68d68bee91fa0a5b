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
    from peft import LoraConfig

    lora = source.lora
    assert lora is not None
    scale = float(lora["alpha"]) / int(lora["rank"])
    state = {k: (v.float() * scale if ".lora_B." in k else v) for k, v in lora_peft_state(source, "transformer.").items()}
    cfg = LoraConfig(r=int(lora["rank"]), lora_alpha=float(lora["rank"]), target_modules=target_modules,
                     init_lora_weights="gaussian").to_dict()
    return state, {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}


def write_diffusers_lora(source: ExportSource, path: Path, pipeline_class: Any, target_modules: Any,
                         metadata: dict[str, str], *, dtype: torch.dtype, force: bool) -> Path:
    """The file ``pipeline_class.save_lora_weights`` writes, with ``metadata`` (ss_network_alpha = rank) added."""
    state, adapter = folded_peft_state(source, target_modules)
    with tempfile.TemporaryDirectory(prefix="sdstudio-export-") as tmp:
        pipeline_class.save_lora_weights(tmp, transformer_lora_layers=cast(state, dtype),
                                         transformer_lora_adapter_metadata=adapter, safe_serialization=True,
                                         weight_name="lora.safetensors")
        with safe_open(str(Path(tmp) / "lora.safetensors"), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open is no mapping
            written = dict(fh.metadata() or {})
    assert source.lora is not None
    meta = {**metadata, **written, "ss_network_alpha": str(int(source.lora["rank"]))}
    return write_safetensors(tensors, path, meta, force=force)
