"""The flow-matching loss of a micro-batch (Flux, SD3: ``core/flow.py``), with DreamBooth's prior
preservation, and the validation loss at fixed timesteps with fixed noise. The model is called as
``model(x_t, t, cond)`` with t in [0, 1] and predicts the velocity ``noise - x0``."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from ..config import RunConfig
from ..data.dataset import collate
from ..diffusion import sample_noise
from ..flow import (
    FlowSchedule,
    flow_loss,
    flow_loss_per_sample,
    noised,
    sample_sigmas,
    validation_sigmas,
    velocity,
)
from ..models.bundle import ModelBundle
from .batches import TrainingBatches
from .caches import FeatureCaches
from .image_loss import ImageLossTracker
from .objective import loss_mask

VAL_BUCKETS = 10


def _concat(a: Any, b: Any) -> Any:
    return torch.cat([a, b]) if isinstance(a, torch.Tensor) else list(a) + list(b)


def image_tokens(clean: torch.Tensor, bundle: ModelBundle) -> int:
    """How many tokens the model sees for one image (Flux: 2x2 latent patches): what the resolution shift uses."""
    patch = int(bundle.architecture.get("patch_size", 2))
    return (clean.shape[-2] // patch) * (clean.shape[-1] // patch)


class FlowMatchingObjective:
    """As ``DiffusionObjective``, for a flow-matching family; ``sched`` is the run's ``FlowSchedule``."""

    def __init__(self, config: RunConfig, bundle: ModelBundle, sched: FlowSchedule, model: Any,
                 accelerator: Accelerator, caches: FeatureCaches, batches: TrainingBatches) -> None:
        self.config, self.bundle, self.sched, self.model, self.accelerator = config, bundle, sched, model, accelerator
        self.caches, self.batches = caches, batches
        self.device = accelerator.device
        self.rank = accelerator.process_index
        self.image_losses: ImageLossTracker | None = None  # the per-image loss, when tracked

    @staticmethod
    def image_loss_span() -> float:
        """Flow timesteps are fractions: the per-image loss buckets split [0, 1)."""
        return 1.0

    @staticmethod
    def schedule(config: RunConfig, bundle: ModelBundle, device: torch.device) -> FlowSchedule:
        family = bundle.model_family
        assert family.flow is not None, f"{family.name} trains by flow matching but states no schedule"
        return FlowSchedule(config.flow, family.flow)

    def _noise_generator(self, step: int, micro: int) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed((self.config.train.seed * 1_000_003 + step) * 4099 + micro * 131 + self.rank)
        return gen

    def noised(self, clean: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, target velocity, t) for clean samples, drawn from ``gen`` in a fixed order."""
        shift = self.sched.training_shift(image_tokens(clean, self.bundle))
        sigmas = sample_sigmas(clean.shape[0], self.config.flow, shift, gen, self.device)
        noise, model_noise = sample_noise(clean, self.config.loss, gen)
        return noised(clean, model_noise, sigmas), velocity(clean, noise), sigmas

    def _loss(self, pred: torch.Tensor, target: torch.Tensor, sigmas: torch.Tensor,
              mask: torch.Tensor | None = None) -> torch.Tensor:
        return flow_loss(pred, target, sigmas, self.config.loss, self.config.flow, mask)

    def _instance_loss(self, batch: dict[str, Any], pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor,
                       mask: torch.Tensor | None) -> torch.Tensor:
        """The training loss of the batch's images: the mean of the per-sample losses the tracker records.
        The mask is at the latents' size: the velocity is compared unpacked, so each latent cell of a 2x2
        patch (one Flux token) keeps its own weight."""
        per_sample = flow_loss_per_sample(pred, target, t, self.config.loss, self.config.flow, mask)
        if self.image_losses is not None and "indices" in batch:
            self.image_losses.observe(batch["indices"], t, per_sample)
        return per_sample.mean()

    def loss(self, batch: dict[str, Any], micro: int, step: int) -> torch.Tensor:
        clean = self.caches.clean_latents(batch)
        gen = self._noise_generator(step, micro)
        noisy, target, t = self.noised(clean, gen)
        mask = loss_mask(self.config, batch, clean)
        reg = self.batches.class_batch(step, micro, len(batch["captions"]))
        if reg is None:
            with self.accelerator.autocast():  # the text encoders (the model's forward enters autocast itself)
                cond = self.caches.condition(batch)
            pred = self.model(noisy, t, cond)
            return self._instance_loss(batch, pred, target, t, mask)
        reg_clean = self.bundle.to_model_space(reg["pixels"].to(self.device))
        reg_noisy, reg_target, reg_t = self.noised(reg_clean, gen)
        with self.accelerator.autocast():  # two forwards: one region, so they share autocast's weight casts
            pred = self.model(noisy, t, self.caches.condition(batch))
            reg_pred = self.model(reg_noisy, reg_t, self.caches.condition(reg))
        prior = self._loss(reg_pred, reg_target, reg_t, loss_mask(self.config, reg, reg_clean))
        return self._instance_loss(batch, pred, target, t, mask) + self.config.loss.prior_loss_weight * prior

    @torch.no_grad()
    def validation_loss(self) -> tuple[float, list[float]] | None:
        """Loss on the validation images at fixed (unshifted) timesteps with fixed noise."""
        val = self.batches.val_dataset
        if not len(val):
            return None
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        ts = validation_sigmas(VAL_BUCKETS)
        sums = [0.0] * VAL_BUCKETS
        bs = max(1, self.config.train.batch_size)
        try:
            for start in range(0, len(val), bs):
                batch = collate([val[i] for i in range(start, min(start + bs, len(val)))])
                clean = self.bundle.to_model_space(batch["pixels"].to(self.device))
                cond = self.bundle.encode_batch(batch, self.device)
                for k, tk in enumerate(ts):
                    gen = torch.Generator().manual_seed(self.config.data.val_seed * 7919 + start * 101 + k)
                    noise = torch.randn(clean.shape, generator=gen).to(self.device, clean.dtype)
                    t = torch.full((clean.shape[0],), tk, device=self.device)
                    with self.accelerator.autocast():
                        pred = model(noised(clean, noise, t), t, cond)
                    per = torch.nn.functional.mse_loss(pred.float(), velocity(clean, noise).float(), reduction="none")
                    sums[k] += float(per.mean(dim=tuple(range(1, per.ndim))).sum())
        finally:
            model.train(was_training)
        per_bucket = [s / len(val) for s in sums]
        return float(np.mean(per_bucket)), per_bucket
