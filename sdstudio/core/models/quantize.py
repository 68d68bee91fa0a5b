"""Quantized frozen base weights under a LoRA (``model.quantize``): every frozen ``nn.Linear`` of the denoiser
(the base layers peft wraps included) becomes a ``QuantizedLinear`` that stores its weight in 8 or 4 bits and
computes in the activations' dtype (bf16 on a GPU, fp32 on the CPU).

- ``fp8``: float8 e4m3fn storage with one fp32 scale per output row (absmax / 448); torch's own dtype, any device.
- ``int8``: symmetric int8 with one fp32 scale per output row (absmax / 127), the scheme of torchao's and
  bitsandbytes' int8 weight-only modes, in a few lines here so it runs (and is tested) on every device.
- ``nf4``: QLoRA's 4-bit NormalFloat with double-quantized block scales, through torchao's ``NF4Tensor``
  (extra ``sdstudio[quant]``).

A single file that already stores its weights in float8 e4m3fn (the ``*_fp8_e4m3fn.safetensors`` checkpoints)
keeps them as they are under ``fp8``: the file's tensor becomes the stored weight with a scale of 1, so the
weights trained under the LoRA are exactly the file's, not the file's dequantized and quantized again with other
scales (a second rounding). ``stored_fp8`` in ``quantize_frozen_linears`` names them. ComfyUI's "scaled fp8"
files store a scale beside each such weight (``X.scale_weight``, read by ``split_files.take_fp8_scales``): the
file's tensor is kept the same way, with the file's scale (one per output row; a per-tensor scale repeated) in place
of 1, so the layer computes weight * scale exactly as the file means it.

The matmul runs in a custom autograd function that saves the *stored* (quantized) weight for the backward pass,
never a dequantized copy: otherwise every layer's full-precision weight would stay alive from the forward to the
backward pass and the memory won back would be lost again. The trainable LoRA weights stay fp32; checkpoints
and exports hold only them, so their keys are the same as without quantization.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

QUANTIZE_CHOICES = ("none", "fp8", "int8", "nf4")
FP8_MAX = 448.0  # largest finite float8_e4m3fn
NF4_BLOCK = 64  # weights per 4-bit block (QLoRA's)
NF4_SCALER_BLOCK = 256  # block scales per double-quantized scale
SCALE_SUFFIX = ".scale_weight"  # a kept fp8 weight's scale in ``stored_fp8`` (ComfyUI's name), beside ``.weight``


def _require_torchao() -> Any:
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
    except ImportError:
        raise ConfigError("model.quantize = 'nf4' needs torchao: pip install 'sdstudio[quant]'") from None
    return to_nf4


def quantize_tensor(weight: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(stored, scale): ``weight`` (out, in) in ``kind``'s storage; ``scale`` is per output row (empty for nf4)."""
    w = weight.detach().float()
    if kind == "nf4":
        to_nf4 = _require_torchao()
        if w.numel() % NF4_BLOCK:
            return quantize_tensor(weight, "int8")  # not a whole number of 4-bit blocks (odd, tiny layers): int8
        # the block scales are quantized in groups of NF4_SCALER_BLOCK (fewer when the layer has fewer blocks)
        scaler_block = math.gcd(w.numel() // NF4_BLOCK, NF4_SCALER_BLOCK)
        return to_nf4(w, block_size=NF4_BLOCK, scaler_block_size=scaler_block), torch.empty(0)
    absmax = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    if kind == "fp8":
        scale = absmax / FP8_MAX
        return (w / scale).to(torch.float8_e4m3fn), scale
    if kind == "int8":
        scale = absmax / 127.0
        return torch.round(w / scale).clamp(-127, 127).to(torch.int8), scale
    raise ConfigError(f"model.quantize = {kind!r} is not known (allowed: {', '.join(QUANTIZE_CHOICES)})")


def dequantize(stored: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if stored.dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.int8):
        return (stored.to(torch.float32) * scale).to(dtype)
    return stored.to(dtype)  # NF4Tensor: torchao dequantizes


class _QuantizedMatmul(torch.autograd.Function):
    """y = x W^T with W dequantized on the fly; the backward pass re-dequantizes the saved stored weight."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, stored: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(stored, scale)
        ctx.x_dtype = x.dtype
        return x @ dequantize(stored, scale, x.dtype).t()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        stored, scale = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return grad @ dequantize(stored, scale, grad.dtype), None, None


class QuantizedLinear(nn.Module):
    """A frozen linear layer whose weight is stored quantized (buffers ``stored`` and ``scale``); the bias (small)
    keeps the weight dtype."""

    def __init__(self, linear: nn.Linear, kind: str, stored_fp8: torch.Tensor | None = None,
                 stored_scale: torch.Tensor | None = None) -> None:
        """``stored_fp8``: the weight as a file stores it in float8 e4m3fn, kept as is, with ``stored_scale`` (a
        scaled fp8 file's scale, one per output row) or 1."""
        super().__init__()
        self.in_features, self.out_features, self.kind = linear.in_features, linear.out_features, kind
        if stored_fp8 is not None:
            stored = stored_fp8
            scale = (torch.ones(linear.out_features, 1) if stored_scale is None
                     else stored_scale.float().reshape(-1, 1).expand(linear.out_features, 1).contiguous())
        else:
            stored, scale = quantize_tensor(linear.weight, kind)
        device = linear.weight.device
        self.register_buffer("stored", stored.to(device))
        self.register_buffer("scale", scale.to(device))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.compute_dtype = linear.weight.dtype

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (for code that reads ``layer.weight``, e.g. its dtype; not used by forward)."""
        return dequantize(self.stored, self.scale, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _QuantizedMatmul.apply(x, self.stored, self.scale)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, quantize={self.kind}"


def quantize_frozen_linears(module: nn.Module, kind: str,
                            stored_fp8: Mapping[str, torch.Tensor] | None = None) -> tuple[int, int]:
    """Replace every frozen ``nn.Linear`` inside ``module`` (peft's base layers included) by a QuantizedLinear;
    returns (how many, how many kept the file's fp8 weight). Trainable linears (LoRA's A/B) are left as they are.

    ``stored_fp8``: for ``fp8``, weights a file stores in float8 e4m3fn by their state-dict names in ``module``
    (``down_blocks.0....to_q.weight``); those layers keep them as they are, with the file's scale where it has one
    (``...to_q.scale_weight``: ``SCALE_SUFFIX``)."""
    if kind == "none":
        return 0, 0
    if kind == "nf4":
        _require_torchao()
    files = stored_fp8 if kind == "fp8" and stored_fp8 else {}
    count = kept = 0
    for prefix, parent in list(module.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and not any(p.requires_grad for p in child.parameters()):
                path = (f"{prefix}.{name}" if prefix else name).replace(".base_layer", "")
                weight, scale = files.get(path + ".weight"), files.get(path + SCALE_SUFFIX)
                if weight is not None and (weight.dtype != torch.float8_e4m3fn or weight.shape != child.weight.shape):
                    weight = None
                if weight is not None:
                    weight = weight.to(child.weight.device)
                    scale = None if scale is None else scale.to(child.weight.device)
                    kept += 1
                setattr(parent, name, QuantizedLinear(child, kind, stored_fp8=weight, stored_scale=scale))
                count += 1
    return count, kept


def stored_fp8_weights(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The float8 e4m3fn matrices (2-D: linear layers' weights) of a file's state dict, by the same names."""
    return {k: v for k, v in state.items() if v.dtype == torch.float8_e4m3fn and v.ndim == 2}


_STORED_FP8 = "_sdstudio_stored_fp8"  # attribute of a loaded model: its file's fp8 matrices (see below)


def fp8_placeholder(shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A weight of ``shape`` and ``dtype`` that takes one element of memory (stride 0): what a linear layer
    holds until ``quantize_frozen_linears`` gives it the file's fp8 weight. Never computed with."""
    return torch.zeros((), dtype=dtype).expand(*shape)


def is_placeholder(t: torch.Tensor) -> bool:
    return t.numel() > 1 and all(s == 0 for s in t.stride())


def remember_stored_fp8(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Keep a file's fp8 matrices (state-dict names of ``model``; a scaled file's scales beside them, named with
    ``SCALE_SUFFIX``) with the model until it is quantized."""
    setattr(model, _STORED_FP8, weights)


def take_stored_fp8(model: nn.Module) -> dict[str, torch.Tensor]:
    """The fp8 matrices remembered on ``model`` (and forgotten there): for ``quantize_frozen_linears`` and
    ``widen_placeholders``."""
    return model.__dict__.pop(_STORED_FP8, None) or {}


def widen_placeholders(module: nn.Module, stored: Mapping[str, torch.Tensor], dtype: torch.dtype,
                       prefix: str = "") -> int:
    """Give every placeholder weight in ``module`` (named ``prefix`` in ``stored``) its stored fp8 tensor widened to
    ``dtype`` (layers that are not quantized: the fp8 values exactly, in a wider dtype; times the file's scale where
    it has one, as ``dequantize`` computes it); returns how many."""
    count = 0
    for name, m in module.named_modules():
        w = getattr(m, "weight", None)
        if type(m) is nn.Linear and isinstance(w, nn.Parameter) and is_placeholder(w):
            key = ".".join(part for part in (prefix, name, "weight") if part).replace(".base_layer", "")
            if key not in stored:
                raise RuntimeError(f"{key}: a placeholder weight without its file tensor")
            scale = stored.get(key.removesuffix(".weight") + SCALE_SUFFIX)
            weight = stored[key].to(w.device)
            weight = weight.to(dtype) if scale is None else dequantize(weight, scale.to(w.device), dtype)
            m.weight = nn.Parameter(weight, requires_grad=False)
            count += 1
    return count


def linear_bytes(module: nn.Module) -> float:
    """Bytes of the quantized storage in ``module`` (for the memory estimate)."""
    total = 0.0
    for m in module.modules():
        if isinstance(m, QuantizedLinear):
            for t in (m.stored, m.scale, m.bias):
                if t is not None:
                    total += _storage_bytes(t)
    return total


def _storage_bytes(t: torch.Tensor) -> float:
    inner = [getattr(t, name) for name in ("quantized_data", "quantized_scalers", "quantization_factor",
                                           "scaler_mean", "nf4") if isinstance(getattr(t, name, None), torch.Tensor)]
    if inner:
        return float(sum(x.numel() * x.element_size() for x in inner))
    return float(t.numel() * t.element_size())

