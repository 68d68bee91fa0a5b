"""The optimizer step fused into the backward pass (``train.fused_backward``): one optimizer per parameter, run by
a post-accumulate-grad hook the moment that parameter's gradient is complete, which then frees the gradient. The
full set of gradients never exists at once (for a full fine-tune of SDXL that is 10 GB at fp32).

What this costs, and the config enforces: no gradient accumulation (the step happens during each backward) and no
clipping by the global norm (it is not known until the last gradient). The NaN/inf guard checks the loss before
the backward pass (a non-finite loss is skipped as without fusion); a finite loss whose gradient overflows stops
the run at that step (the weights moved during the backward pass, so it cannot be skipped); the reported
gradient norm is accumulated from each parameter's gradient as it goes by. Per-parameter AdamW with the same hyper-parameters does exactly the
arithmetic of one AdamW over all parameters, so the weights are the same as the plain path's (tested)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .step import NonFiniteLoss, OptimizerStep, any_process


class FusedBackwardOptimizer:
    """Looks like one optimizer to the rest of the session (``param_groups`` for the LR schedule, ``state_dict``
    for checkpoints, ``zero_grad`` / ``step`` as no-ops) but is one optimizer per parameter, stepped by hooks."""

    def __init__(self, groups: list[dict[str, Any]], make: Callable[[list[dict[str, Any]]], torch.optim.Optimizer]
                 ) -> None:
        self.optimizers: list[torch.optim.Optimizer] = []
        self.params: list[torch.nn.Parameter] = []
        for group in groups:
            for p in group["params"]:
                single = {k: v for k, v in group.items() if k != "params"}
                self.optimizers.append(make([{**single, "params": [p]}]))
                self.params.append(p)
        self.enabled = True
        self.grad_sq = torch.zeros(())
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(self.params)]

    def _hook(self, index: int) -> Callable[[torch.Tensor], None]:
        def step(p: torch.Tensor) -> None:
            if p.grad is None:
                return
            if self.grad_sq.device != p.grad.device:
                self.grad_sq = self.grad_sq.to(p.grad.device)
            self.grad_sq += p.grad.detach().float().pow(2).sum()
            if self.enabled:
                self.optimizers[index].step()
            p.grad = None  # the point: this gradient's memory is free now
        return step

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def state(self) -> dict[Any, Any]:
        return {p: s for opt in self.optimizers for p, s in opt.state.items()}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:  # the steps happened during the backward pass
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"fused_backward": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        parts = state.get("fused_backward")
        if parts is None or len(parts) != len(self.optimizers):
            from ..errors import CheckpointError

            raise CheckpointError("the checkpoint's optimizer state was saved without train.fused_backward (or for "
                                  "other parameters); resume with the setting the run was started with")
        for opt, part in zip(self.optimizers, parts):
            opt.load_state_dict(part)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class FusedOptimizerStep(OptimizerStep):
    """``OptimizerStep`` whose optimizer steps inside the backward pass (one micro-batch per step, no clipping)."""

    optimizer: FusedBackwardOptimizer  # type: ignore[assignment]

    def _accumulate_and_step(self, group: list[dict[str, Any]], step: int, loss_fn: Any,
                             lr: float) -> tuple[float, float, float]:
        assert len(group) == 1, "train.fused_backward needs train.gradient_accumulation = 1"
        fused = self.optimizer
        loss = loss_fn(group[0], 0)
        loss_value = float(loss.detach())
        if any_process(self.accelerator, not math.isfinite(loss_value)):  # checked before any weight moves
            self._skip_bad_step(step)
            return float("nan"), float("nan"), lr
        fused.grad_sq = torch.zeros((), device=self.accelerator.device)
        self.accelerator.backward(loss)  # each parameter is updated (and its gradient freed) in here
        norm_value = float(fused.grad_sq.sqrt())
        if any_process(self.accelerator, not math.isfinite(norm_value)):
            # a finite loss with an overflowing gradient: the weights that saw it moved already (NaN), so the step
            # cannot be skipped as the plain path skips it; stop now with the last good checkpoint
            raise NonFiniteLoss(self._nan_message(step) + "; train.fused_backward updated the weights during the "
                                "backward pass, so a step with a NaN/inf gradient cannot be skipped")
        if self.ema is not None:
            self.ema.update()
        return loss_value, norm_value, lr
