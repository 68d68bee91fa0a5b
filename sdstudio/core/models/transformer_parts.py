"""What the transformer families (Flux, SD3, ...) do alike when a run's model is put together: the weight dtype
of the frozen parts, freezing the encoders, and the transformer's seeded peft LoRA (fp32 adapters on a frozen
base), ``model.quantize`` of its blocks' frozen linears, and how a run loads the transformer file. Moved here
from ``flux/model.py`` so every family shares one copy."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..config import RunConfig

log = logging.getLogger("sdstudio")


def weight_dtype(config: RunConfig, device: torch.device) -> torch.dtype:
    """The frozen weights' dtype: the mixed-precision dtype on a GPU, fp32 elsewhere."""
    if device.type != "cuda":
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.train.mixed_precision, torch.float32)


def optional_path(value: str) -> Path | None:
    return Path(value).expanduser() if value else None


def load_options(config: RunConfig, device: torch.device) -> dict[str, Any]:
    """How a run loads its transformer file (``split_files.load_transformer``): a LoRA run in the weight dtype
    (never the whole model in fp32 first), with ``model.quantize = 'fp8'`` keeping the file's fp8 matrices."""
    lora = config.lora.enabled
    return {"dtype": weight_dtype(config, device) if lora else torch.float32,
            "keep_fp8": lora and config.model.quantize == "fp8"}


def block_lists(transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The transformer's block lists (``transformer_blocks``, ``single_transformer_blocks``): where
    ``model.quantize`` stores the frozen linears (the input / output projections, embedders and Chroma's
    approximator, ~1 % of the weights, keep the weight dtype)."""
    return [(name, child) for name, child in transformer.named_children()
            if isinstance(child, torch.nn.ModuleList) and name.endswith("blocks")]


def quantize_blocks(transformer: torch.nn.Module, kind: str, stored_fp8: dict[str, torch.Tensor]) -> tuple[int, int]:
    """``model.quantize``: the frozen linears of the block lists (peft's base layers included) stored in 8 / 4
    bits; an fp8 file's matrices kept as stored. Returns (layers, of which kept from the file)."""
    from .quantize import quantize_frozen_linears

    count = kept = 0
    for name, blocks in block_lists(transformer):
        inner = {k[len(name) + 1:]: v for k, v in stored_fp8.items() if k.startswith(name + ".")}
        c, k = quantize_frozen_linears(blocks, kind, stored_fp8=inner)
        count, kept = count + c, kept + k
    return count, kept


def prepare_transformer(transformer: Any, frozen: Iterable[torch.nn.Module], config: RunConfig,
                        device: torch.device, dtype: torch.dtype, target_modules: Any, *, lora: bool,
                        full: bool = False, denoiser_device: torch.device | None = None) -> None:
    """Freeze the ``frozen`` encoders and the transformer in ``dtype`` on ``device``; with ``lora`` add the run's peft
    adapter (lora.type, seeded by train.seed) on ``target_modules``, its parameters fp32, and put the transformer in
    training mode; with ``full`` the whole transformer trains in fp32.
    The transformer goes to ``denoiser_device`` when given (the CPU while block swap places it).

    ``model.quantize`` (LoRA runs): the adapter is added first (peft wraps plain ``nn.Linear`` layers), then the
    frozen linears of the blocks, peft's base layers included, become ``QuantizedLinear``; all of it in CPU memory,
    so the full-precision base never reaches the device; then the transformer moves there (no dtype: the 8 / 4-bit
    storage, the fp32 scales and the fp32 LoRA stay as they are)."""
    from .quantize import take_stored_fp8, widen_placeholders

    for module in frozen:
        module.requires_grad_(False)
        module.eval()
        module.to(device, dtype=dtype)
    place = denoiser_device or device
    kind = config.model.quantize if lora else "none"
    stored = take_stored_fp8(transformer)
    transformer.requires_grad_(False)
    transformer.to(torch.device("cpu") if kind != "none" else place, dtype=dtype)
    blocks = {id(b) for _, b in block_lists(transformer)}
    for name, child in transformer.named_children():  # placeholders outside the blocks: not quantized
        if id(child) not in blocks:
            widen_placeholders(child, stored, dtype, prefix=name)
    if full and not lora:  # full fine-tune: every transformer weight trains, in fp32 (mixed precision autocasts)
        transformer.to(dtype=torch.float32)
        transformer.requires_grad_(True)
        transformer.train()
        return
    if not lora:
        transformer.eval()
        return
    from .adapters import peft_adapter_config

    torch.manual_seed(config.train.seed)
    # lora.type: LoRA, or LoHa / LoKr / DoRA / OFT (peft), on the same target layers
    transformer.add_adapter(peft_adapter_config(config.lora.model_dump(), target_modules))
    for p in transformer.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # trainable parameters are always fp32
    if kind != "none":
        count, kept = quantize_blocks(transformer, kind, stored)
        log.info("model.quantize = %r: %d linear layers of the transformer's blocks stored quantized%s", kind, count,
                 f" ({kept} keep the file's fp8 weights as they are)" if kept else "")
        transformer.to(place)
    transformer.train()
