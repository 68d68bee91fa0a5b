"""The exponential moving average of the trainable weights (``train.ema``): updated after each optimizer
step, swapped in for sampling, saved with checkpoints. diffusers' EMAModel does the averaging."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers.training_utils import EMAModel


class EmaWeights:
    """``params``: the trainable parameters (``names``: theirs, the keys of ema.safetensors). ``on_cpu``: the
    average lives on the CPU (``train.ema_on_cpu`` on a GPU), updated from a CPU copy of the weights."""

    def __init__(self, params: list[torch.nn.Parameter], names: list[str], *, decay: float, on_cpu: bool) -> None:
        self.params, self.names = params, names
        tracked = [p.detach().to("cpu").requires_grad_(True) if on_cpu else p for p in params]
        self.average = EMAModel(tracked, decay=decay, foreach=not on_cpu)

    @property
    def optimization_step(self) -> int:
        return int(self.average.optimization_step)

    def update(self) -> None:
        if self.average.foreach:
            self.average.step(self.params)
        else:
            self.average.step([p.detach().to("cpu").requires_grad_(True) for p in self.params])

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The average in the live parameters for the duration; the raw weights are back afterwards."""
        self.average.store(self.params)
        self.average.copy_to(self.params)
        try:
            yield
        finally:
            self.average.restore(self.params)

    def load(self, shadow: dict[str, torch.Tensor], optimization_step: int) -> None:
        """From a checkpoint's ema.safetensors (keyed by parameter name)."""
        for name, s_param in zip(self.names, self.average.shadow_params):
            s_param.data.copy_(shadow[name].to(s_param.device))
        self.average.optimization_step = optimization_step
