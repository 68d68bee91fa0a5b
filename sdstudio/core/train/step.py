"""One optimizer step with its guards: the micro-batches' forward and backward (gradient sync on the last
only), clipping, the NaN/inf check agreed by every process, then the optimizer, the learning-rate schedule
and the EMA; a CUDA out-of-memory error may skip the batch (``train.oom_skip_batches``)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from accelerate import Accelerator

from ..config import TrainConfig
from .ema import EmaWeights
from .optim import LRSchedule, evaluation_weights, restore_training_point, training_mode, training_point

log = logging.getLogger("sdstudio")

TRAINING_POINT = "schedule_free_y"
SETTLE_EVERY = 256  # steps taken without a sync whose NaN/inf flags may wait unread
LossFn = Callable[[dict[str, Any], int], torch.Tensor]  # (batch, micro-batch index) -> loss


class NonFiniteLoss(Exception):
    """More NaN/inf steps than ``train.nan_skip_steps``: the run fails with advice."""


def any_process(accelerator: Accelerator, flag: bool) -> bool:
    """True when ``flag`` is set on any process (one tiny all-reduce with several processes)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


class OptimizerStep:
    """``params``: the trainable parameters (clipped, averaged); ``model``: the prepared (maybe compiled) model
    whose gradient sync is held back on all but the last micro-batch."""

    def __init__(self, accelerator: Accelerator, model: Any, optimizer: torch.optim.Optimizer, schedule: LRSchedule,
                 params: list[torch.nn.Parameter], ema: EmaWeights | None, train: TrainConfig) -> None:
        self.accelerator, self.model, self.params, self.ema, self.train = accelerator, model, params, ema, train
        self.optimizer, self.schedule = optimizer, schedule
        self.bad_steps = 0
        self.oom_skips = 0
        self._pending: list[tuple[int, torch.Tensor]] = []  # (step, non-finite flag) not read yet (``settle``)
        training_mode(optimizer)

    def extra_state(self) -> dict[str, Any]:
        """What a checkpoint keeps beside the optimizer's own state: a schedule-free optimizer's training point
        (the saved weights are its averaged x)."""
        point = training_point(self.optimizer)
        return {TRAINING_POINT: point} if point else {}

    def evaluation_weights(self) -> AbstractContextManager[None]:
        """Inside: the weights to validate, sample and save (a schedule-free optimizer's average, x); the
        training point y afterwards (bit-identical on both sides of a resume: the checkpoint holds x)."""
        return evaluation_weights(self.optimizer)

    def run(self, group: list[dict[str, Any]], step: int, loss_fn: LossFn) -> tuple[Any, Any, float]:
        """Optimizer step ``step`` (0-based) over a group of micro-batches: (loss, grad norm, lr); NaN loss =
        skipped. Loss and grad norm are floats, or float64 0-d device tensors on the ``lazy`` path (read them
        at the logging interval, after ``settle``)."""
        lr = self.schedule.apply(self.optimizer, step)
        try:
            return self._accumulate_and_step(group, step, loss_fn, lr)
        except torch.cuda.OutOfMemoryError:
            if self.oom_skips >= self.train.oom_skip_batches:
                raise
            self.oom_skips += 1
            self.optimizer.zero_grad(set_to_none=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.warning("CUDA out of memory at step %d: batch skipped (%d of %d allowed by train.oom_skip_batches)",
                        step + 1, self.oom_skips, self.train.oom_skip_batches)
            return float("nan"), float("nan"), lr

    def _accumulate_and_step(self, group: list[dict[str, Any]], step: int, loss_fn: LossFn,
                             lr: float) -> tuple[Any, Any, float]:
        total = torch.zeros((), device=self.accelerator.device)
        several = self.accelerator.num_processes > 1
        for i, batch in enumerate(group):
            last = i == len(group) - 1
            ctx = self.accelerator.no_sync(self.model) if several and not last else nullcontext()
            with ctx:
                loss = loss_fn(batch, i)
                self.accelerator.backward(loss / len(group))
            total += loss.detach()
        max_norm = self.train.max_grad_norm or float("inf")
        grad_norm = self.accelerator.clip_grad_norm_(self.params, max_norm)
        if self.lazy:
            return self._step_without_sync(total / len(group), grad_norm, step, lr)
        # One host sync per step: the loss and gradient norm are read together, and checked before the
        # optimizer touches the weights (a NaN/inf batch leaves them as they were).
        loss_value, norm_value = (float(v) for v in torch.stack([total / len(group), grad_norm.float()]).tolist())
        bad = not math.isfinite(loss_value) or (self._grads_must_be_finite and not math.isfinite(norm_value))
        if any_process(self.accelerator, bad):  # some rank saw NaN/inf
            self.optimizer.zero_grad(set_to_none=True)
            self._skip_bad_step(step)
            return float("nan"), float("nan"), lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        return loss_value, norm_value, lr

    @property
    def _grads_must_be_finite(self) -> bool:
        """A finite loss can still give an inf/NaN gradient (an overflow in the backward pass): clipping then
        multiplies every gradient by 0 or NaN, and the optimizer would write NaN into the weights one step before
        the loss shows it. Such a step is skipped like a NaN loss, except under fp16's loss scaler, which skips
        those steps itself and lowers its scale (an inf gradient is routine there)."""
        return self.accelerator.scaler is None

    @property
    def lazy(self) -> bool:
        """Whether a step runs without any host sync: the NaN/inf guard on the device (the fused optimizer skips
        its update when ``found_inf`` is set, as under a GradScaler), the loss and grad norm returned as tensors
        and their flags read by ``settle``. Needs a fused Adam(W)/SGD, no loss scaler (fp16), no EMA (its update
        would see a skipped step); otherwise each step reads the loss once (the sync path). Several processes
        agree without a message of their own: a rank's NaN/inf loss makes its gradients non-finite, the
        all-reduce carries them to every rank, so every rank's gradient norm, and flag, is non-finite too."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        return (self.accelerator.scaler is None and self.ema is None
                and bool(getattr(inner, "_step_supports_amp_scaling", False))
                and bool(getattr(inner, "defaults", {}).get("fused")))

    def _step_without_sync(self, loss: torch.Tensor, grad_norm: torch.Tensor, step: int,
                           lr: float) -> tuple[Any, Any, float]:
        bad = ~(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm.detach()))  # no loss scaler here
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        inner.found_inf = bad.float()  # the fused kernel leaves weights, moments and step count as they were
        try:
            self.optimizer.step()
        finally:
            del inner.found_inf
        self.optimizer.zero_grad(set_to_none=True)
        self._pending.append((step, bad))
        if len(self._pending) >= SETTLE_EVERY:  # a bound on what waits, even with a huge train.log_every
            self.settle()
        nan = torch.full((), float("nan"), device=loss.device, dtype=torch.float64)
        return (torch.where(bad, nan, loss.detach().double()), torch.where(bad, nan, grad_norm.detach().double()),
                lr)

    def settle(self) -> None:
        """Reads the NaN/inf flags of the steps taken without a sync (one host sync for all of them): warns
        about the skipped ones and raises ``NonFiniteLoss`` past ``train.nan_skip_steps``, as the sync path does
        at the step itself. The loop calls it before each metrics row and checkpoint."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        flags = torch.stack([bad for _, bad in pending]).tolist()
        for (step, _), bad in zip(pending, flags, strict=True):
            if not bad:
                continue
            self._skip_bad_step(step)

    def _skip_bad_step(self, step: int) -> None:
        """Counts a NaN/inf step (0-based ``step``) as skipped, or raises ``NonFiniteLoss`` past
        ``train.nan_skip_steps``: the one rule of every step path (sync, device-side, fused backward)."""
        self.bad_steps += 1
        if self.bad_steps > self.train.nan_skip_steps:
            raise NonFiniteLoss(self._nan_message(step))
        log.warning("non-finite loss or gradient at step %d skipped (%d of %d allowed)", step + 1,
                    self.bad_steps, self.train.nan_skip_steps)

    def _nan_message(self, step: int) -> str:
        t = self.train
        return (f"the loss or its gradients became NaN/inf at step {step + 1}; the last good checkpoint is kept. "
                "Usual causes: "
                f"a learning rate too high (train.learning_rate = {t.learning_rate:g}: try 3-10x lower), fp16 "
                f"mixed precision (train.mixed_precision = {t.mixed_precision!r}: try bf16 or no), a VAE in "
                "fp16 (SDXL), or no gradient clipping (train.max_grad_norm)")

    def observe_validation(self, val_loss: float) -> None:
        """``reduce_on_plateau`` lowers the learning rate after validations without improvement."""
        self.schedule.observe(val_loss)

    def load_state(self, state: dict[str, Any]) -> None:
        """The optimizer (when the checkpoint kept it), schedule and loss scaler of a checkpoint's training state."""
        if state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        training_mode(self.optimizer)  # a schedule-free optimizer was saved in evaluation mode
        # ... and its exact training point beside the averaged weights (the checkpoint's model)
        restore_training_point(self.optimizer, (state.get("extra") or {}).get(TRAINING_POINT) or [])
        self.schedule.load_state_dict(state["schedule"])
        if state.get("scaler") is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
