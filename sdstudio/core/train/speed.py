"""What makes a step fast without changing what it computes: torch.compile of the denoiser (``train.compile``,
regional by default, ``train.compile_mode``), a persistent compile cache (``train.compile_cache``), static or
dynamic shapes (``train.compile_dynamic``) and the attention kernel (``train.attention_backend``).

- Regional compilation: every module whose class a diffusers model lists in ``_repeated_blocks`` (the UNet's
  ``BasicTransformerBlock``, Flux's double and single blocks), plus the UNet's ``ResnetBlock2D``, is compiled in
  place (``nn.Module.compile``): one graph serves every block of the same shapes, so warm-up is a fraction of a
  whole-model compile, parameter names (checkpoints, LoRA keys) do not change, and peft/accelerate see the
  model they built. A model without such blocks (the pixel model) is compiled whole.
- Shapes: ``compile_dynamic = false`` compiles one graph per shape (each aspect-ratio bucket compiles once:
  before step 1 with ``train.compile_prewarm``, which the session does with a discarded forward and backward per
  bucket, else the first time it comes up; the recompile limit is raised so that buckets never fall back to eager
  silently);
  ``true`` marks batch and spatial sizes dynamic (one graph for all buckets, somewhat slower kernels).
- The compile cache: inductor's FX graph / kernel caches in ``<sdstudio cache>/compile`` so that a second run
  (another process) with the same shapes skips most of the warm-up.
- Attention: the SDPA kernel order inside the denoiser's forward (the backward uses the forward's kernel).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

log = logging.getLogger("sdstudio")

EXTRA_REPEATED_BLOCKS = ("ResnetBlock2D",)  # the UNet's convolution blocks, repeated like its transformer blocks
RECOMPILE_LIMIT = 64  # graphs per compiled block: shapes (buckets) x block widths; torch's default is 8

ATTENTION_ORDERS: dict[str, tuple[str, ...]] = {
    # FlashAttention-2 covers SD's head dims (40/64/80/160) in bf16/fp16; efficient takes fp32 and odd shapes;
    # cuDNN's fused kernel next; the math kernel always works
    "auto": ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"),
    "flash": ("FLASH_ATTENTION", "MATH"),
    "efficient": ("EFFICIENT_ATTENTION", "MATH"),
    "cudnn": ("CUDNN_ATTENTION", "MATH"),
    "math": ("MATH",),
}


# -- compile -------------------------------------------------------------------------------------------------
def compiler_available(device: torch.device) -> str | None:
    """None when torch.compile can run on ``device``, else why not (inductor needs a C compiler on a CPU)."""
    if device.type == "cpu" and not any(shutil.which(cc) for cc in ("cc", "gcc", "clang", "cl")):
        return "no C compiler found (inductor needs one on the CPU)"
    return None


def use_compile_cache(folder: Any) -> None:
    """Inductor's caches (FX graphs, kernels, autotuning) in ``folder``, kept across runs; an explicit
    TORCHINDUCTOR_CACHE_DIR in the environment wins."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder))
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    if hasattr(inductor_config, "autotune_local_cache"):
        inductor_config.autotune_local_cache = True


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks regional compilation compiles (see the module docstring), outermost first, none nested."""
    names = set(EXTRA_REPEATED_BLOCKS)
    for module in model.modules():
        names.update(getattr(module, "_repeated_blocks", None) or ())
    found: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():  # pre-order: a block is met before its children
        if id(module) in inside:
            continue
        if type(module).__name__ in names:
            found.append(module)
            inside.update(id(m) for m in module.modules())
    return found


def compile_model(model: Any, *, mode: str, dynamic: bool) -> tuple[Any, int]:
    """``model`` compiled as ``train.compile_mode`` says: (the model to call, number of regions compiled;
    0 = compiled whole). Regional compilation compiles in place and returns ``model`` itself."""
    import torch._dynamo.config as dynamo_config

    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, key):
            setattr(dynamo_config, key, max(int(getattr(dynamo_config, key)), RECOMPILE_LIMIT))
            break
    options: dict[str, Any] = {"dynamic": bool(dynamic)}
    if mode == "regional":
        blocks = repeated_blocks(model)
        if blocks:
            for block in blocks:
                block.compile(**options)
            log.info("torch.compile: %d repeated blocks compiled (regional, %s shapes)", len(blocks),
                     "dynamic" if dynamic else "static")
            return model, len(blocks)
        log.info("torch.compile: no repeated blocks in %s; compiling the whole model", type(model).__name__)
    return torch.compile(model, **options), 0


# -- attention -----------------------------------------------------------------------------------------------
def attention_backends(choice: str) -> list[Any] | None:
    """The SDPA backends of ``train.attention_backend`` in priority order; None for ``default`` (torch's own)."""
    if choice == "default":
        return None
    from torch.nn.attention import SDPBackend

    return [getattr(SDPBackend, name) for name in ATTENTION_ORDERS[choice] if hasattr(SDPBackend, name)]


@contextmanager
def attention_kernel(choice: str) -> Iterator[None]:
    """Inside: SDPA picks the first kernel of ``choice``'s order that supports the call's shapes and dtype."""
    backends = attention_backends(choice)
    if backends is None:
        yield
        return
    from torch.nn.attention import sdpa_kernel

    try:
        ctx = sdpa_kernel(backends, set_priority=True)
    except TypeError:  # torch without set_priority: the list is a set, torch keeps its own order
        ctx = sdpa_kernel(backends)
    with ctx:
        yield


class AttentionChoice:
    """``train.attention_backend`` for a training session: set when the session builds, restored when it closes.
    Process-wide (torch keeps the SDPA kernel switches globally), so gradient checkpointing's recomputation in
    the backward pass and the preview sampler use the same kernels as the training forward."""

    def __init__(self, choice: str) -> None:
        self.choice = choice
        self._ctx: Any = None

    def apply(self) -> AttentionChoice:
        if attention_backends(self.choice) is not None and self._ctx is None:
            self._ctx = attention_kernel(self.choice)
            self._ctx.__enter__()
        return self

    def restore(self) -> None:
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            ctx.__exit__(None, None, None)


__all__ = ["ATTENTION_ORDERS", "AttentionChoice", "attention_backends", "attention_kernel", "compile_model", "compiler_available",
           "repeated_blocks", "use_compile_cache"]
