"""Block swap (``train.blocks_to_swap``): the frozen weights of N denoiser blocks live in (pinned) CPU memory and
are copied to the GPU just before the block runs, forward and backward, then dropped again.

- Which blocks: the children of the denoiser's block lists (``down_blocks``, ``up_blocks``, ``transformer_blocks``,
  ... any ``nn.ModuleList`` whose name ends in ``blocks``, plus a ``mid_block``), the N largest by weight bytes.
- When: a forward pre-hook loads a block (and evicts the other swapped blocks on the device), a backward pre-hook
  loads it again before its gradients are computed. On CUDA the next block's copy is started on a side stream
  (the one after in the forward pass, the one before in the backward pass) so it overlaps the compute.
- Only frozen tensors move (the base weights, quantized or not, and buffers); LoRA weights, their gradients and
  optimizer states stay on the device. This is why block swap is for LoRA runs (config check).
- The backward pass needs the weights the forward pass used, but those copies are gone by then: a saved-tensor
  hook replaces every saved tensor that *is* (a view of) a swapped weight by a reference to it, and the reference
  is resolved to the copy on the device when the backward pass unpacks it. Nothing else is saved differently,
  so the loss and gradients are bit-identical to a run without swapping.

Placement: a family builds its denoiser in CPU memory when blocks are swapped (``swap_before_placement``) and
``place_with_block_swap`` moves only the rest to the device, so the swapped blocks' weights never materialise on
the GPU (moving the whole model and then sending blocks back would need the whole model's memory once). With
several processes the swap is installed after accelerate's wrapping instead (DDP broadcasts every weight, from
the device, when it wraps the model), and on the CPU too (no device memory to keep free).

``offload``: where the swapped weights live between uses; ``device``: where they run. On a CPU-only machine both
are the CPU; each load then makes a fresh copy and each eviction drops it (``poison`` fills it with NaN first,
which the tests use to prove the backward pass never reads a dropped copy).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

log = logging.getLogger("sdstudio")
POISON_EVICTED = False  # tests: fill dropped device copies with NaN (proves the backward pass never reads one)


def swappable_blocks(model: nn.Module) -> list[nn.Module]:
    """The denoiser's blocks in execution order of their lists (down, mid, up / transformer lists)."""
    found: list[nn.Module] = []
    inside: set[int] = set()  # every module of a block already found (nested block lists stay inside theirs)
    for name, module in model.named_modules():
        if id(module) in inside:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.ModuleList) and leaf.endswith("blocks"):
            parts = list(module)
        elif leaf == "mid_block" and module is not None:
            parts = [module]
        else:
            continue
        for part in parts:
            if id(part) not in inside:
                inside.update(id(m) for m in part.modules())
                found.append(part)
    return found


def _frozen_slots(block: nn.Module) -> list[tuple[nn.Module, str, bool]]:
    """(module, name, is_parameter) of every frozen tensor of ``block``."""
    slots = []
    for module in block.modules():
        for name, p in module._parameters.items():
            if p is not None and not p.requires_grad:
                slots.append((module, name, True))
        for name, b in module._buffers.items():
            if b is not None:
                slots.append((module, name, False))
    return slots


def _get(slot: tuple[nn.Module, str, bool]) -> torch.Tensor:
    module, name, is_param = slot
    return module._parameters[name].data if is_param else module._buffers[name]  # type: ignore[union-attr]


def _set(slot: tuple[nn.Module, str, bool], value: torch.Tensor) -> None:
    module, name, is_param = slot
    if is_param:
        module._parameters[name].data = value  # type: ignore[union-attr]
    else:
        module._buffers[name] = value


def _nbytes(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError, TypeError):  # tensor subclasses (nf4)
        return t.numel() * t.element_size()


def _ptr(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


class _Swapped:
    """One swapped block: its frozen tensors' home copies and, while resident, their device copies."""

    def __init__(self, index: int, block: nn.Module, offload: torch.device, pin: bool) -> None:
        self.index, self.block = index, block
        self.slots = _frozen_slots(block)
        self.home = []
        for slot in self.slots:
            t = _get(slot).detach().to(offload)
            if pin:
                t = t.pin_memory()
            self.home.append(t)
            _set(slot, t)
        self.resident = False
        self.ready: torch.cuda.Event | None = None
        self.bytes = sum(_nbytes(t) for t in self.home)


class BlockSwapper:
    """Installs the hooks on ``blocks`` (see the module docstring); ``loads`` / ``evictions`` count the moves."""

    def __init__(self, blocks: list[nn.Module], *, device: torch.device, offload: torch.device | None = None,
                 poison: bool = False) -> None:
        self.device = device
        self.offload = offload or torch.device("cpu")
        self.poison = poison
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.blocks = [_Swapped(i, b, self.offload, pin=self.cuda) for i, b in enumerate(blocks)]
        self.loads = 0
        self.evictions = 0
        self._by_ptr: dict[int, tuple[_Swapped, int]] = {}
        self._handles: list[Any] = []
        for swapped in self.blocks:
            self._install(swapped)

    @property
    def swapped_bytes(self) -> int:
        return sum(b.bytes for b in self.blocks)

    # -- moves --------------------------------------------------------------------------------------------
    def _copy_in(self, b: _Swapped, non_blocking: bool) -> None:
        for k, (slot, home) in enumerate(zip(b.slots, b.home)):
            if self.cuda:
                t = home.to(self.device, non_blocking=non_blocking)
            else:  # CPU only: a fresh copy stands for the device copy (tensor subclasses, e.g. nf4, are shared)
                t = home.clone() if type(home) is torch.Tensor else home
            _set(slot, t)
            ptr = _ptr(t)
            if ptr is not None:
                self._by_ptr[ptr] = (b, k)
        b.resident = True
        self.loads += 1

    def load(self, b: _Swapped) -> None:
        if b.resident:
            if b.ready is not None:  # prefetched on the side stream: compute waits for the copy
                torch.cuda.current_stream(self.device).wait_event(b.ready)
                b.ready = None
            return
        self._copy_in(b, non_blocking=False)

    def prefetch(self, b: _Swapped) -> None:
        if b.resident or not self.cuda:
            return
        assert self.stream is not None
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self._copy_in(b, non_blocking=True)
            b.ready = torch.cuda.Event()
            b.ready.record(self.stream)
        for slot in b.slots:  # the copies are used on the compute stream: keep the allocator from reusing them
            _get(slot).record_stream(torch.cuda.current_stream(self.device))

    def evict(self, b: _Swapped) -> None:
        if not b.resident:
            return
        for slot, home in zip(b.slots, b.home):
            t = _get(slot)
            ptr = _ptr(t)
            if ptr is not None:
                self._by_ptr.pop(ptr, None)
            if self.poison and t.is_floating_point() and type(t) is torch.Tensor and t.element_size() > 1:
                t.fill_(float("nan"))
            _set(slot, home)
        b.resident = False
        b.ready = None
        self.evictions += 1

    def _activate(self, b: _Swapped, step: int) -> None:
        """Load ``b`` (and start loading its neighbour in direction ``step``), evicting the rest."""
        neighbour = b.index + step
        keep = {b.index, neighbour}
        for other in self.blocks:
            if other.index not in keep:
                self.evict(other)
        self.load(b)
        if 0 <= neighbour < len(self.blocks):
            self.prefetch(self.blocks[neighbour])

    def evict_all(self) -> None:
        for b in self.blocks:
            self.evict(b)

    # -- hooks --------------------------------------------------------------------------------------------
    def _pack(self, t: torch.Tensor) -> Any:
        ptr = _ptr(t)
        hit = self._by_ptr.get(ptr) if ptr is not None else None
        if hit is None:
            return t
        b, k = hit
        live = _get(b.slots[k])
        if type(t) is not torch.Tensor or type(live) is not torch.Tensor:
            return ("swapped-whole", b, k)
        return ("swapped", b, k, t.size(), t.stride(), t.storage_offset() - live.storage_offset(), t.dtype)

    def _unpack(self, packed: Any) -> torch.Tensor:
        if not (isinstance(packed, tuple) and packed and packed[0] in ("swapped", "swapped-whole")):
            return packed
        b = packed[1]
        self.load(b)  # normally loaded by the backward pre-hook already
        live = _get(b.slots[packed[2]])
        if packed[0] == "swapped-whole":
            return live
        _tag, _b, _k, size, stride, offset, dtype = packed
        view = live if live.dtype == dtype else live.view(dtype)
        return view.as_strided(size, stride, live.storage_offset() + offset)

    def _install(self, b: _Swapped) -> None:
        hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        entered: list[Any] = []

        def pre_forward(module: nn.Module, args: Any) -> None:
            self._activate(b, +1)
            if torch.is_grad_enabled():
                hooks.__enter__()
                entered.append(True)

        def pre_backward(grad: torch.Tensor) -> None:
            self._activate(b, -1)

        def post_forward(module: nn.Module, args: Any, output: Any) -> None:
            if entered:
                entered.pop()
                hooks.__exit__(None, None, None)
            # Before the block's backward pass: a hook on each output's gradient (the first to arrive loads the
            # block). Tensor hooks add no node to the graph, unlike module backward hooks, whose extra nodes
            # change the order in which gradients are summed (and so their last bits).
            for t in _tensors(output):
                if t.requires_grad:
                    t.register_hook(pre_backward)

        self._handles.append(b.block.register_forward_pre_hook(pre_forward))
        self._handles.append(b.block.register_forward_hook(post_forward, always_call=True))

    def remove(self) -> None:
        """Hooks off and every block back on the device (e.g. before an export of the whole model)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for b in self.blocks:
            self.load(b)
            b.home = [_get(slot) for slot in b.slots]


def _tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _tensors(item)]
    if isinstance(output, dict):
        return [t for item in output.values() for t in _tensors(item)]
    return [t for item in getattr(output, "__dict__", {}).values() for t in _tensors(item)]


def install_block_swap(model: nn.Module, count: int, *, device: torch.device, offload: torch.device | None = None,
                       poison: bool | None = None) -> BlockSwapper | None:
    """Swap the ``count`` largest blocks of ``model`` (0: nothing). Returns the swapper (its counters, bytes)."""
    if count <= 0:
        return None
    blocks = swappable_blocks(model)
    if not blocks:
        log.warning("train.blocks_to_swap = %d: this model has no block lists to swap; ignored", count)
        return None
    if count > len(blocks):
        log.warning("train.blocks_to_swap = %d but the model has %d blocks: swapping all of them", count, len(blocks))
    sizes = [sum(t.numel() * t.element_size() for t in list(blk.parameters()) + list(blk.buffers())
                 if not t.requires_grad) for blk in blocks]
    largest = sorted(sorted(range(len(blocks)), key=lambda i: -sizes[i])[:count])
    swapper = BlockSwapper([blocks[i] for i in largest], device=device, offload=offload,
                           poison=POISON_EVICTED if poison is None else poison)
    log.info("block swap: %d blocks (%.2f GiB) kept in CPU memory", len(largest), swapper.swapped_bytes / 2**30)
    return swapper


def swap_before_placement(config: Any, device: torch.device) -> int:
    """How many blocks the family swaps while building: ``train.blocks_to_swap`` of a one-process LoRA run on an
    accelerator, else 0 (on the CPU nothing is placed; the session installs the swap after wrapping the model, as
    for several processes; exports, which build on the CPU, get no hooks)."""
    if not config.lora.enabled or device.type == "cpu" or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return 0
    return int(config.train.blocks_to_swap)


def build_placed(config: Any, device: torch.device, build: Callable[[torch.device | None], Any]) -> Any:
    """A family's bundle built by ``build(denoiser_device)`` and placed on ``device``: with blocks to swap
    (``swap_before_placement``) the denoiser is built in CPU memory and ``place_with_block_swap`` moves the rest
    (the swapper becomes ``bundle.block_swap``); else ``build(None)`` puts it on ``device`` itself."""
    swap = swap_before_placement(config, device)
    bundle = build(torch.device("cpu") if swap else None)
    if swap:
        bundle.block_swap = place_with_block_swap(bundle.trainable, swap, device=device)
    return bundle


def place_with_block_swap(model: nn.Module, count: int, *, device: torch.device) -> BlockSwapper | None:
    """``model`` (in CPU memory) to ``device``, except the frozen tensors of its ``count`` swapped blocks, which
    stay in (pinned) CPU memory; returns the swapper (None: nothing swapped, the whole model moved)."""
    swapper = install_block_swap(model, count, device=device)
    if swapper is None:
        model.to(device)
        return None
    swapped = {(id(module), name) for b in swapper.blocks for module, name, _ in b.slots}
    with torch.no_grad():
        for module in model.modules():
            for name, p in module._parameters.items():
                if p is not None and (id(module), name) not in swapped and p.device != device:
                    moved = p.data.to(device)
                    if torch._has_compatible_shallow_copy_type(p.data, moved):  # as nn.Module.to does
                        p.data = moved
                    else:
                        module._parameters[name] = nn.Parameter(moved, requires_grad=p.requires_grad)
            for name, b in module._buffers.items():
                if b is not None and (id(module), name) not in swapped and b.device != device:
                    module._buffers[name] = b.to(device)
    return swapper
