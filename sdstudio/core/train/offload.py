"""Frozen parts leave the GPU (``train.offload_frozen``): once the latent cache is complete the VAE is not needed
for training, nor are frozen text encoders once the text-embedding cache is; they are moved to CPU memory and come
back to the device only while something needs them (previews, FID images, a caption not cached yet)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..models.bundle import ModelBundle

log = logging.getLogger("sdstudio")


def frozen_encoders(bundle: ModelBundle, *, latents_cached: bool, text_cached: bool) -> dict[str, nn.Module]:
    """name -> frozen module whose work a complete cache already holds (VAE; text encoders that do not train)."""
    components = getattr(bundle, "components", None)
    if components is None:
        return {}
    out: dict[str, nn.Module] = {}
    vae = getattr(components, "vae", None)
    if latents_cached and vae is not None:
        out["vae"] = vae
    if text_cached:
        for name in bundle.model_family.text_encoders:
            module = getattr(components, name, None)
            if module is not None and not any(p.requires_grad for p in module.parameters()):
                out[name] = module
    return out


class FrozenParts:
    """Parks modules in CPU memory (``park``) and brings them back for the duration of ``on_device``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.parked: dict[str, nn.Module] = {}
        self.moves = 0  # how often parts went back and forth (tests, logs)

    def park(self, modules: dict[str, nn.Module]) -> None:
        for name, module in modules.items():
            if name not in self.parked:
                module.to("cpu")
                self.parked[name] = module
                self.moves += 1
        if modules:
            log.info("frozen parts moved to CPU memory: %s", ", ".join(sorted(modules)))
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    @contextmanager
    def on_device(self) -> Iterator[None]:
        if not self.parked:
            yield
            return
        for module in self.parked.values():
            module.to(self.device)
        self.moves += 1
        parked, self.parked = self.parked, {}
        try:
            yield
        finally:
            self.parked = parked
            for module in parked.values():
                module.to("cpu")

