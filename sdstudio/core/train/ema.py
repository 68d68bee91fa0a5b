"""The exponential moving average of the trainable weights (``train.ema``): updated after optimizer steps,
swapped in for sampling, saved with checkpoints. diffusers' EMAModel holds the average (its decay warm-up,
store / copy_to / restore, the checkpoint's shadow parameters).

Two memory levers (issue 13):

- ``train.ema_every = N``: the average is updated every N optimizer steps, with the decay of the N steps in
  between multiplied together (``decay**N`` once the warm-up is over), as if the weights had stayed where they
  are now for those N steps. The difference to the per-step average is of the order of how far the weights
  move in N steps times ``1 - decay`` (tests/test_ema_lean.py states the tolerance). Which steps a window
  spans is derived from the step numbers, so a resume continues the same windows.
- ``train.ema_on_cpu``: the average lives in CPU memory. At each update the weights are copied with
  ``non_blocking`` copies into pinned CPU buffers (one set, reused), and the averaging runs on the CPU in a
  background thread once the copies are done (a CUDA event), so the GPU does not wait for it; the next update
  or any read of the average (sampling, validation, a checkpoint) waits for the previous one first.

A read of the average (``average``, ``swapped_in``: previews, validation, checkpoints) waits for a background
update and sees the average as of the last full window (at most N-1 steps behind). Windows end at multiples of
N, never at a read, so a run stopped and resumed at any step averages exactly as one run straight through.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import torch
from diffusers.training_utils import EMAModel


class EmaWeights:
    """``params``: the trainable parameters (``names``: theirs, the keys of ema.safetensors). ``on_cpu``: the
    average lives on the CPU (``train.ema_on_cpu`` on a GPU); ``every``: ``train.ema_every``."""

    def __init__(self, params: list[torch.nn.Parameter], names: list[str], *, decay: float, on_cpu: bool,
                 every: int = 1) -> None:
        self.params, self.names = params, names
        self.on_cpu, self.every = on_cpu, max(1, int(every))
        tracked = [p.detach().to("cpu").requires_grad_(True) if on_cpu else p for p in params]
        self._ema = EMAModel(tracked, decay=decay, foreach=not on_cpu)
        self.bytes_copied = 0  # device -> CPU bytes moved for the average (tests, benchmarks)
        self._buffers: list[torch.Tensor] | None = None  # pinned CPU copies of the weights (on_cpu)
        self._pool: ThreadPoolExecutor | None = None
        self._job: Future[None] | None = None

    @property
    def optimization_step(self) -> int:
        return int(self._ema.optimization_step)

    @property
    def average(self) -> EMAModel:
        """The average as of the last full window, a background update waited for."""
        self.flush()
        return self._ema

    def update(self) -> None:
        """After an optimizer step: count it; average the weights in when a window of ``every`` steps is full."""
        if self.every == 1 and not self.on_cpu:
            self._ema.step(self.params)  # diffusers' own per-step update, on the device
            return
        self._ema.optimization_step += 1
        if self.optimization_step % self.every == 0:
            self._apply()

    def flush(self) -> None:
        """Wait for a background update (``on_cpu``)."""
        self._wait()

    def _window_decay(self) -> float:
        """The product of the per-step decays of the window's steps (``decay**every`` after the warm-up)."""
        end = self.optimization_step
        return math.prod(self._ema.get_decay(s) for s in range(end - self.every + 1, end + 1))

    def _apply(self) -> None:
        decay = self._window_decay()
        shadow = self._ema.shadow_params
        if not self.on_cpu:
            with torch.no_grad():
                torch._foreach_sub_(shadow, torch._foreach_sub(shadow, [p.detach() for p in self.params]),
                                    alpha=1 - decay)
            return
        self._wait()  # the buffers are free again, the average is current
        if self._buffers is None:
            pin = any(p.device.type == "cuda" for p in self.params)
            self._buffers = [torch.empty(p.shape, dtype=p.dtype, pin_memory=pin) for p in self.params]
        ready = None
        with torch.no_grad():
            for buf, p in zip(self._buffers, self.params):
                buf.copy_(p.detach(), non_blocking=True)
                self.bytes_copied += p.numel() * p.element_size()
        if any(p.device.type == "cuda" for p in self.params):
            ready = torch.cuda.Event()
            ready.record()
        buffers = self._buffers

        def average_in() -> None:
            if ready is not None:
                ready.synchronize()  # the copies have landed
            with torch.no_grad():
                torch._foreach_sub_(shadow, torch._foreach_sub(shadow, buffers), alpha=1 - decay)

        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdstudio-ema")
        self._job = self._pool.submit(average_in)

    def _wait(self) -> None:
        if self._job is not None:
            job, self._job = self._job, None
            job.result()  # re-raises what went wrong in the thread

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The average in the live parameters for the duration; the raw weights are back afterwards."""
        average = self.average
        average.store(self.params)
        average.copy_to(self.params)
        try:
            yield
        finally:
            average.restore(self.params)

    def load(self, shadow: dict[str, torch.Tensor], optimization_step: int) -> None:
        """From a checkpoint's ema.safetensors (keyed by parameter name)."""
        self._wait()
        for name, s_param in zip(self.names, self._ema.shadow_params):
            s_param.data.copy_(shadow[name].to(s_param.device))
        self._ema.optimization_step = optimization_step

    def close(self) -> None:
        self._wait()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
