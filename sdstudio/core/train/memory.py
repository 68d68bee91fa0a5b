"""Before a GPU run: will it fit? An estimate of weights, gradients, optimizer states and activations
against the free memory, with concrete advice when it will not fit."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import RunConfig
from ..models.bundle import ModelBundle
from ..models.registry import get_family

GIB = 1024 ** 3
# Activation memory per image per model-space pixel is a fact of each family (ModelFamily.
# activation_bytes_per_pixel, measured with plain diffusers blocks at bf16 on an H200, docs/gpu-benchmark.md).
# Gradient checkpointing keeps roughly a quarter.
CHECKPOINTING_FACTOR = 0.25
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adam": 8, "adamw8bit": 2, "paged_adamw8bit": 2, "rmsprop": 4, "sgd": 4,
                         "adafactor": 1}
# per parameter: prodigy keeps exp_avg, exp_avg_sq, s and the initial weights; schedule-free z and exp_avg_sq;
# lion one momentum; came a momentum plus factored rows/columns; ademamix two momenta and exp_avg_sq
OPTIMIZER_STATE_BYTES.update({"prodigy": 16, "adamw_schedulefree": 8, "lion": 4, "lion8bit": 1, "came": 5,
                              "ademamix": 12, "ademamix8bit": 3})
# train.offload_activations: what stays on the device of the activations saved for the backward pass (the
# tensors in flight while one layer computes; measured on the tiny models' steps, see tests/test_memory_levers.py)
OFFLOADED_ACTIVATIONS_FACTOR = 0.15
RESIDENT_SWAPPED_BLOCKS = 2  # block swap: the running block and the one being copied in
# A trained text encoder keeps its activations for the backward pass too. Per transformer layer and caption,
# at 16 bit: s*h*(34 + 5*a*s/h) bytes (s tokens, h width, a heads; Korthikanti et al. 2022, "Reducing
# activation recomputation in large transformer models"). 77 tokens: CLIP-L ~28 MB per caption, bigG ~0.13 GB.
TEXT_ACTIVATION_BYTES_PER_TOKEN_WIDTH = 34
TEXT_ACTIVATION_BYTES_PER_ATTENTION_SCORE = 5


@dataclass(frozen=True)
class MemoryEstimate:
    weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    def describe(self) -> str:
        return (f"about {self.total / GIB:.1f} GiB (weights {self.weights / GIB:.1f}, gradients "
                f"{self.gradients / GIB:.1f}, optimizer {self.optimizer / GIB:.1f}, activations "
                f"{self.activations / GIB:.1f})")


def _bytes(module: torch.nn.Module, trainable: bool) -> float:
    return float(sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad == trainable))


def trained_text_encoders(bundle: ModelBundle) -> list[torch.nn.Module]:
    """The text encoders that train with the denoiser (attributes of the trainable module; see models/sd/model.py)."""
    family = bundle.model_family
    if family.text_encoders_in_activations:  # a small text encoder, part of the measured per-pixel activations
        return []
    found = [getattr(bundle.trainable, name, None) for name in family.text_encoders]
    return [m for m in found if m is not None and any(p.requires_grad for p in m.parameters())]


def text_activation_bytes(text_encoder: torch.nn.Module) -> float:
    """Activations one caption leaves for the backward pass of a trained CLIP text encoder (16 bit)."""
    cfg = text_encoder.config
    s, h, a = cfg.max_position_embeddings, cfg.hidden_size, cfg.num_attention_heads
    per_layer = s * h * (TEXT_ACTIVATION_BYTES_PER_TOKEN_WIDTH
                         + TEXT_ACTIVATION_BYTES_PER_ATTENTION_SCORE * a * s / h)
    return float(per_layer * cfg.num_hidden_layers)


def estimate_memory(bundle: ModelBundle, config: RunConfig) -> MemoryEstimate:
    """Weights of every module (trainable in fp32, frozen in their dtype), gradients and optimizer states of the
    trainable parameters (a trained text encoder's, LoRA or full, included: they are parameters of
    ``bundle.trainable``), and activations per image: the UNet's, plus a trained text encoder's."""
    modules = [bundle.trainable, *bundle.frozen.values()]
    components = getattr(bundle, "components", None)
    if components is not None:
        names = ("vae", *bundle.model_family.text_encoders)
        modules += [m for m in (getattr(components, n, None) for n in names) if m is not None]
    seen: set[int] = set()
    trainable_numel = 0.0
    largest_trainable = 0.0
    weights = 0.0
    parked = _parked_modules(bundle, config)
    for module in modules:
        if id(module) in parked:
            continue
        for p in module.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            weights += p.numel() * p.element_size()
            if p.requires_grad:
                trainable_numel += p.numel()
                largest_trainable = max(largest_trainable, float(p.numel()))
    from ..models.quantize import linear_bytes

    weights += linear_bytes(bundle.trainable)  # model.quantize: the stored 8 / 4-bit weights (buffers)
    weights -= _swapped_bytes(bundle, config.train.blocks_to_swap)
    # train.fused_backward: each gradient is freed once its parameter is updated; the largest one is the peak
    gradients = (largest_trainable if config.train.fused_backward else trainable_numel) * 4
    optimizer = trainable_numel * OPTIMIZER_STATE_BYTES.get(config.train.optimizer, 8)
    if config.train.ema and not config.train.ema_on_cpu:
        optimizer += trainable_numel * 4  # the average lives beside the weights
    side = bundle.sample_size
    per_image = bundle.model_family.activation_bytes_per_pixel * side * side
    per_image += sum(text_activation_bytes(te) for te in trained_text_encoders(bundle))
    if config.train.mixed_precision == "no":
        per_image *= 2
    if config.train.gradient_checkpointing:
        per_image *= CHECKPOINTING_FACTOR
    if config.train.offload_activations:
        per_image *= OFFLOADED_ACTIVATIONS_FACTOR
    activations = per_image * config.train.batch_size
    return MemoryEstimate(weights, gradients, optimizer, activations)


def _parked_modules(bundle: ModelBundle, config: RunConfig) -> set[int]:
    """ids of the frozen encoders ``train.offload_frozen`` moves to CPU memory during training."""
    if not config.train.offload_frozen:
        return set()
    from .offload import frozen_encoders

    family = bundle.model_family
    parts = frozen_encoders(bundle, latents_cached=config.data.cache_latents and not family.pixel_space,
                            text_cached=config.data.cache_text_embeddings and family.text_embeddings_cacheable)
    return {id(m) for m in parts.values()}


def _swapped_bytes(bundle: ModelBundle, count: int) -> float:
    """Frozen bytes block swap keeps off the device: the ``count`` largest blocks less the resident ones."""
    if count <= 0:
        return 0.0
    from .blockswap import swappable_blocks

    sizes = sorted((sum(t.numel() * t.element_size() for t in [*b.parameters(), *b.buffers()] if not t.requires_grad)
                    for b in swappable_blocks(bundle.trainable)), reverse=True)[:count]
    return float(sum(sizes) - sum(sizes[:RESIDENT_SWAPPED_BLOCKS]))


def memory_advice(estimate: MemoryEstimate, free: float, config: RunConfig) -> str | None:
    """None when the run should fit in ``free`` bytes (with 10 % headroom), else what to change."""
    if estimate.total <= 0.9 * free:
        return None
    tips = []
    if config.train.batch_size > 1:
        tips.append(f"lower train.batch_size (now {config.train.batch_size}; use gradient_accumulation to keep "
                    "the effective batch)")
    if not config.train.gradient_checkpointing:
        tips.append("set train.gradient_checkpointing = true")
    if not config.data.cache_latents and not get_family(config.model.family).pixel_space:
        tips.append("set data.cache_latents = true (the VAE then runs once, before training)")
    if config.lora.enabled and config.model.quantize == "none":
        tips.append("set model.quantize = 'fp8' (or 'nf4') to store the frozen base weights in 8 (4) bits")
    if config.lora.enabled and not config.train.blocks_to_swap:
        tips.append("set train.blocks_to_swap (e.g. 4) to keep blocks in CPU memory")
    if not config.train.offload_frozen and (config.data.cache_latents or config.data.cache_text_embeddings):
        tips.append("set train.offload_frozen = true")
    if config.train.optimizer in ("adamw", "adam") and estimate.optimizer > 0.15 * estimate.total:
        tips.append("use train.optimizer = 'adamw8bit' (needs bitsandbytes)")
    if config.lora.enabled and config.lora.rank > 8:
        tips.append(f"lower lora.rank (now {config.lora.rank})")
    if config.data.resolution > 512:
        tips.append(f"lower data.resolution (now {config.data.resolution})")
    if config.train.mixed_precision == "no":
        tips.append("use train.mixed_precision = 'bf16'")
    return (f"this run needs {estimate.describe()} but the GPU has {free / GIB:.1f} GiB free; it will probably run "
            f"out of memory. Try: " + "; ".join(tips or ["a smaller model or a larger GPU"]))
