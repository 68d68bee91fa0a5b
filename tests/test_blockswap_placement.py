"""Block swap is set up before the model reaches the device: the swapped blocks' frozen weights never
materialise there. The device is simulated by ``meta`` (tensors with shapes and no memory): a dispatch mode
adds up every allocation on it during the build, an upper bound of the peak of 'device' bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sdstudio.core.models.registry import get_family
from sdstudio.core.models.sd import model as sd_model
from sdstudio.core.models.sd.files import load_sd_components
from sdstudio.core.train.blockswap import BlockSwapper
from tests.sd_helpers import sd_config

META = torch.device("meta")


class DeviceAllocations(TorchDispatchMode):
    """Bytes ever allocated on the meta 'device': outputs of ops that return new memory (no alias of an input,
    so views, detach and in-place ops do not count). Their sum bounds the device's peak from above."""

    def __init__(self) -> None:
        super().__init__()
        self.allocated = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for ret, t in zip(func._schema.returns, outs):
            if ret.alias_info is None and isinstance(t, torch.Tensor) and t.device.type == "meta":
                self.allocated += t.numel() * t.element_size()
        return out


def _loaded_first(monkeypatch: pytest.MonkeyPatch, model: Path) -> None:
    """Load the files before counting: diffusers' loading builds its empty modules on ``meta`` itself."""
    comps = load_sd_components(model, family="sd1")
    monkeypatch.setattr(sd_model, "load_sd_components", lambda *args, **kwargs: comps)


def _device_bytes(module: torch.nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type == "meta")


def _frozen_block_bytes(swapper: BlockSwapper) -> int:
    return sum(t.numel() * t.element_size() for b in swapper.blocks for t in b.home)


def test_swapped_blocks_never_reach_the_device(tiny_sd1: Path, four_images: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _loaded_first(monkeypatch, tiny_sd1)
    cfg = sd_config("sd15-lora", tiny_sd1, four_images, **{"train.blocks_to_swap": 3})
    family = get_family(cfg.model.family)
    with DeviceAllocations() as seen:
        bundle = family.build(cfg, [""], device=META)
    swapper = bundle.block_swap
    assert isinstance(swapper, BlockSwapper) and len(swapper.blocks) == 3
    swapped = _frozen_block_bytes(swapper)
    assert swapped > 0
    assert all(t.device.type == "cpu" for b in swapper.blocks for t in b.home)
    # everything else is on the device: the LoRA weights inside the swapped blocks too
    assert all(p.device == META for p in bundle.trainable.parameters() if p.requires_grad)
    on_device = _device_bytes(bundle.trainable)
    assert on_device > 0
    frozen_parts = sum(_device_bytes(m) for m in (bundle.components.vae, bundle.components.text_encoder))
    # nothing was ever allocated on the device beyond what stays there (and small temporaries of the LoRA's
    # initialisation): so at no moment did it hold the swapped blocks
    assert seen.allocated < on_device + frozen_parts + swapped / 4


def test_without_swap_the_whole_unet_is_allocated_on_the_device(tiny_sd1: Path, four_images: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The counting can see a materialised UNet: without block swap every UNet weight is allocated on the device
    (as it was for swapped runs before, whose blocks were sent back after the whole model got there)."""
    _loaded_first(monkeypatch, tiny_sd1)
    cfg = sd_config("sd15-lora", tiny_sd1, four_images)
    with DeviceAllocations() as seen:
        bundle = get_family(cfg.model.family).build(cfg, [""], device=META)
    assert bundle.block_swap is None
    frozen_parts = sum(_device_bytes(m) for m in (bundle.components.vae, bundle.components.text_encoder))
    assert seen.allocated >= _device_bytes(bundle.trainable) + frozen_parts
