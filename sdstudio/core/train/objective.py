"""What the model is trained on: the diffusion loss of a micro-batch (with DreamBooth's prior preservation)
and the validation loss at fixed timesteps with fixed noise."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from ..config import RunConfig
from ..data.dataset import collate
from ..diffusion import (
    diffusion_loss,
    diffusion_loss_per_sample,
    mask_to_model_space,
    sample_noise,
    target_for,
    training_scheduler,
    training_timesteps,
)
from ..learned_schedule import learned_schedule_of, refresh_scheduler, sync_scheduler
from ..models.bundle import ModelBundle
from ..vlb import split_learned_variance
from .batches import TrainingBatches
from .caches import FeatureCaches
from .image_loss import ImageLossTracker
from .recipe import TrainingRecipe

VAL_BUCKETS = 10
log = logging.getLogger("sdstudio")


def _concat(a: Any, b: Any) -> Any:
    return torch.cat([a, b]) if isinstance(a, torch.Tensor) else list(a) + list(b)


def loss_mask(config: RunConfig, batch: dict[str, Any], clean: torch.Tensor) -> torch.Tensor | None:
    """Masked training (loss.masked): the batch's masks at the size of ``clean`` (the model-space samples the
    loss compares; None: no mask, full loss)."""
    masks = batch.get("masks")
    if not config.loss.masked or masks is None:
        return None
    return mask_to_model_space(masks.to(clean.device), tuple(clean.shape[-2:]))


class DiffusionObjective:
    """``model``: the prepared training model; ``sched``: the training noise schedule; ``caches``: where a
    batch's latents and conditioning come from; ``batches``: the class images and the validation set."""

    def __init__(self, config: RunConfig, bundle: ModelBundle, sched: Any, model: Any, accelerator: Accelerator,
                 caches: FeatureCaches, batches: TrainingBatches) -> None:
        self.config, self.bundle, self.sched, self.model, self.accelerator = config, bundle, sched, model, accelerator
        self.caches, self.batches = caches, batches
        self.device = accelerator.device
        self.rank = accelerator.process_index
        self.image_losses: ImageLossTracker | None = None  # the per-image loss, when tracked
        # learned variance, contrastive caption term, learned schedule (each off unless configured)
        self.recipe = TrainingRecipe(config, model, sched)

    def image_loss_span(self) -> float:
        """What the timesteps passed to ``image_losses`` run up to (its buckets split [0, span))."""
        return float(self.sched.config.num_train_timesteps)

    @staticmethod
    def schedule(config: RunConfig, bundle: ModelBundle, device: torch.device) -> Any:
        """The training noise schedule (a DDPMScheduler) as the base model needs it."""
        diffusion = bundle.diffusion_for(config.diffusion)
        if diffusion.zero_terminal_snr and not config.diffusion.zero_terminal_snr:
            log.info("the base model is a zero-terminal-SNR model: training with a rescaled schedule")
        sched = training_scheduler(diffusion, pixel_space=bundle.model_family.pixel_space)
        sched.alphas_cumprod = sched.alphas_cumprod.to(device)
        learned = learned_schedule_of(bundle.trainable)
        if learned is not None:  # diffusion.learned_schedule: what the model has learned so far
            learned.set_base(sched.alphas_cumprod)
            with torch.no_grad():
                sync_scheduler(sched, learned.alphas_cumprod())
        return sched

    def _noise_generator(self, step: int, micro: int) -> torch.Generator:
        # Seeded from (seed, step, micro-batch, rank): exact after a resume with no state to save.
        gen = torch.Generator(device=self.device)
        gen.manual_seed((self.config.train.seed * 1_000_003 + step) * 4099 + micro * 131 + self.rank)
        return gen

    def loss(self, batch: dict[str, Any], micro: int, step: int) -> torch.Tensor:
        """The loss of micro-batch ``micro`` of optimizer step ``step`` (0-based)."""
        clean = self.caches.clean_latents(batch)
        gen = self._noise_generator(step, micro)
        self.recipe.begin()
        noisy, target, t = self._noised(clean, gen, learn=True)
        reg = self.batches.class_batch(step, micro, len(batch["captions"]))
        mask = self._loss_mask(batch, clean)
        with self.accelerator.autocast():  # a text encoder that trains runs under autocast too
            cond = self.caches.condition(batch) if reg is None or self.config.loss.contrastive_weight else None
        extra = {"clean": clean, "noisy": noisy, "t": t, "target": target, "cond": cond,
                 "captions": list(batch["captions"])}
        if reg is None:
            pred = self.model(noisy, t, cond)  # the prepared forward runs under autocast (see make_objective)
            return self._instance_loss(batch, pred, target, t, mask, extra)
        # DreamBooth prior preservation: instance and class images in one forward, losses weighted apart
        reg_clean = self.bundle.to_model_space(reg["pixels"].to(self.device))
        reg_noisy, reg_target, reg_t = self._noised(reg_clean, gen)
        both = {k: _concat(batch[k], reg[k]) for k in ("captions", "original_size", "crop_top_left", "target_size")
                if k in batch and k in reg}
        n = clean.shape[0]
        if reg_clean.shape[2:] == clean.shape[2:]:
            with self.accelerator.autocast():  # (the text encoder)
                cond_both = self.caches.condition(both)
            pred = self.model(torch.cat([noisy, reg_noisy]), torch.cat([t, reg_t]), cond_both)
            pred, reg_pred = pred[:n], pred[n:]
        else:  # a non-square bucket: class images are square, so two forwards, in one autocast region on purpose:
            # autocast's cache of 16-bit weight copies lasts to the end of the outermost region, so the second
            # forward reuses the first one's (a full fine-tune casts each fp32 weight once, not twice)
            with self.accelerator.autocast():
                pred = self.model(noisy, t, self.caches.condition(batch) if cond is None else cond)
                reg_pred = self.model(reg_noisy, reg_t, self.caches.condition(reg))
        reg_pred, _ = split_learned_variance(reg_pred, reg_clean.shape[1])
        loss = self._instance_loss(batch, pred, target, t, mask, extra)
        prior = diffusion_loss(reg_pred, reg_target, reg_t, self.sched, self.config.loss,
                               self._loss_mask(reg, reg_clean))
        return loss + self.config.loss.prior_loss_weight * prior

    def _loss_mask(self, batch: dict[str, Any], clean: torch.Tensor) -> torch.Tensor | None:
        return loss_mask(self.config, batch, clean)

    def _instance_loss(self, batch: dict[str, Any], pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor,
                       mask: torch.Tensor | None, extra: dict[str, Any] | None = None) -> torch.Tensor:
        """The training loss of the batch's images (the mean of the per-sample losses the tracker records),
        plus the recipe's terms (``extra``: the micro-batch's clean, noisy, t, target, cond, captions)."""
        pred, v = split_learned_variance(pred, target.shape[1])
        per_sample = diffusion_loss_per_sample(pred, target, t, self.sched, self.config.loss, mask)
        if self.image_losses is not None and "indices" in batch:
            self.image_losses.observe(batch["indices"], t, per_sample.detach())
        if extra is None:
            return per_sample.mean()
        return per_sample.mean() + self.recipe.terms(pred=pred, v=v, per_sample=per_sample, **extra)

    def _noised(self, clean: torch.Tensor, gen: torch.Generator, *,
                learn: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy input, target, timesteps) for clean samples, drawn from ``gen`` in a fixed order (``learn``:
        a learned schedule learns through this input)."""
        tmin, tmax = self.config.resolved_timestep_range()
        t = training_timesteps(clean.shape[0], self.config.loss, tmin, tmax, gen, self.device)
        noise, model_noise = sample_noise(clean, self.config.loss, gen)
        learned = self.recipe.noised(clean, noise, model_noise, t, learn=learn)
        if learned is not None:
            return learned[0], learned[1], t
        return self.sched.add_noise(clean, model_noise, t), target_for(self.sched, clean, noise, t), t

    @torch.no_grad()
    def validation_loss(self) -> tuple[float, list[float]] | None:
        """Loss on the validation images at fixed timesteps with fixed noise: comparable across epochs.
        (mean, one per timestep bucket); None without validation images."""
        val = self.batches.val_dataset
        if not len(val):
            return None
        model = self.accelerator.unwrap_model(self.model)
        refresh_scheduler(self.sched, model)  # a learned schedule: as it is after the last step
        was_training = model.training
        model.eval()
        tmin, tmax = self.config.resolved_timestep_range()
        edges = np.linspace(tmin, tmax, VAL_BUCKETS + 1)
        ts = [int((edges[k] + edges[k + 1]) / 2) for k in range(VAL_BUCKETS)]
        sums = [0.0] * VAL_BUCKETS
        bs = max(1, self.config.train.batch_size)
        try:
            for start in range(0, len(val), bs):
                items = [val[i] for i in range(start, min(start + bs, len(val)))]
                batch = collate(items)
                clean = self.bundle.to_model_space(batch["pixels"].to(self.device))
                cond = self.bundle.encode_batch(batch, self.device)
                for k, tk in enumerate(ts):
                    gen = torch.Generator().manual_seed(self.config.data.val_seed * 7919 + start * 101 + k)
                    noise = torch.randn(clean.shape, generator=gen).to(self.device, clean.dtype)
                    t = torch.full((clean.shape[0],), tk, device=self.device, dtype=torch.long)
                    noisy = self.sched.add_noise(clean, noise, t)
                    with self.accelerator.autocast():
                        pred = model(noisy, t, cond)
                    pred, _ = split_learned_variance(pred, clean.shape[1])
                    target = target_for(self.sched, clean, noise, t)
                    per = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none")
                    sums[k] += float(per.mean(dim=(1, 2, 3)).sum())
        finally:
            model.train(was_training)
        per_bucket = [s / len(val) for s in sums]
        return float(np.mean(per_bucket)), per_bucket


def _objectives() -> dict[str, Any]:
    """ModelFamily.objective -> the class that trains it (its ``schedule`` makes the run's schedule)."""
    from .flow_objective import FlowMatchingObjective

    return {"diffusion": DiffusionObjective, "flow_matching": FlowMatchingObjective}


def training_schedule(config: RunConfig, bundle: ModelBundle, device: torch.device) -> Any:
    """What the run trains and samples with: a DDPM schedule, or a flow-matching ``FlowSchedule``."""
    return _objectives()[bundle.model_family.objective].schedule(config, bundle, device)


def make_objective(config: RunConfig, bundle: ModelBundle, sched: Any, model: Any, accelerator: Accelerator,
                   caches: FeatureCaches, batches: TrainingBatches) -> Any:
    """The objective the bundle's family trains (``ModelFamily.objective``).

    Autocast: with mixed precision, ``accelerator.prepare`` made the model's forward run under autocast (and
    return fp32 outputs, the cast the loss needs anyway); the objectives call it without entering autocast again,
    and enter autocast themselves only for what runs outside that forward (text encoding). peft's adapter layers
    of the prepared model then need not cast their inputs to their fp32 weights' dtype (autocast does it): off,
    except in the text encoders, which previews and validation also run outside autocast."""
    if config.lora.enabled and accelerator.native_amp:
        from ..models.adapters import skip_adapter_input_casts

        encoders = bundle.text_encoders().values() if hasattr(bundle, "text_encoders") else ()
        n = skip_adapter_input_casts(bundle.trainable, keep=encoders)
        log.debug("autocast: %d adapter layers run without peft's input cast", n)
    return _objectives()[bundle.model_family.objective](config, bundle, sched, model, accelerator, caches, batches)
