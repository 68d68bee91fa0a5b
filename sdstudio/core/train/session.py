"""A training session: the state of one run (accelerator, data, model, optimizer, schedule, EMA,
position) and the operations the loop performs on it (a step, validation, a sample grid, a checkpoint)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader

from ..config import RunConfig
from ..data.buckets import plan_from_config
from ..data.cached import resolve_features
from ..data.dataset import EpochOrder, ImageCaptionDataset, SampleKey, collate
from ..data.scan import scan_dataset
from ..data.verify import verify_prepared
from ..diffusion import diffusion_loss, sample_noise, target_for, training_scheduler
from ..errors import DatasetError
from ..presets import config_to_toml
from ..runs import RunFolder
from ..runs.checkpoints import TOKENIZER
from . import state as ckpt_state
from .caches import FeatureCachingMixin
from .checkpoint import CheckpointInfo, prune_checkpoints, write_checkpoint
from .evaluation import RunEvaluation
from .memory import estimate_memory, memory_advice
from .optim import LRSchedule, build_optimizer, param_groups
from .previews import SamplingMixin
from .setup import PreparedData, build_model, data_root, pick_device, prepare_data
from .tensorboard_log import require_tensorboard

log = logging.getLogger("sdstudio")
VAL_BUCKETS = 10


class NonFiniteLoss(Exception):
    """More NaN/inf steps in a row than train.nan_skip_steps allows (the loop reports it as a failed run)."""


def _concat(a: Any, b: Any) -> Any:
    return torch.cat([a, b]) if isinstance(a, torch.Tensor) else list(a) + list(b)


class _KeySource:
    """The batch sampler the DataLoader iterates: this rank's slice of each global batch."""

    def __init__(self, order: EpochOrder, batch: int, rank: int) -> None:
        self.order, self.batch, self.rank = order, batch, rank
        self.epoch, self.start = 0, 0

    def __iter__(self) -> Iterator[list[SampleKey]]:
        for keys in self.order.batches(self.epoch, self.start):
            yield keys[self.rank * self.batch:(self.rank + 1) * self.batch]

    def __len__(self) -> int:
        return self.order.batches_per_epoch - self.start


class TrainingSession(FeatureCachingMixin, SamplingMixin):
    def __init__(self, config: RunConfig, *, run_dir: Path | None, resume: bool) -> None:
        self.config = config
        self.run_dir = run_dir
        self.resume = resume
        cfg = config.train
        device = pick_device(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        precision = cfg.mixed_precision
        self.init_warnings: list[str] = []
        if device.type == "cpu" and precision != "no":
            # sd-training.md: fp32 throughout on a CPU (bf16 autocast there is slow and changes numerics)
            self.init_warnings.append(f"train.mixed_precision = {precision!r} ignored on the CPU: training in fp32")
            precision = "no"
        handlers = []
        if config.eval.inception_weights:
            # FID/KID images are made on the main process only; the other ranks wait for it at the next
            # collective. torch's default (10 min NCCL) would end a long evaluation of thousands of images.
            from datetime import timedelta

            from accelerate.utils import InitProcessGroupKwargs

            handlers.append(InitProcessGroupKwargs(timeout=timedelta(hours=6)))
        self.accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=precision,
                                       kwargs_handlers=handlers)
        self.device = self.accelerator.device
        if self.device.type == "cuda":
            # TF32 matmuls/convolutions: what the fp32 parts of a step use on Ampere and newer
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.is_main = self.accelerator.is_main_process
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.accum = cfg.gradient_accumulation
        self.global_batch = cfg.batch_size * self.world * self.accum
        self.data_root = data_root(config)
        self.step = self.epoch = self.step_in_epoch = 0
        self.last_val_step = self.last_sample_step = self.last_checkpoint_step = -1
        self.bad_steps = 0
        self.best_val = float("inf")
        self.best_step = -1
        self.bad_vals = 0
        self.early_stop = False
        self.oom_skips = 0
        self.ready = False
        self.started = False
        self._checkpoint: CheckpointInfo | None = None
        self.ema: EMAModel | None = None
        self._pending_warnings: list[str] = []
        self.cache_warnings: list[str] = []
        self.feature_cache: Any = None
        self.text_cache: Any = None
        self._text_memo: dict[str, dict[str, torch.Tensor]] = {}
        # Checked before anything is built or written: a bad eval.inception_weights or a missing tensorboard
        # package is an input error at the start, not a failure at the first evaluation / log line.
        self.evaluation = RunEvaluation(config, is_main=self.is_main)
        self.init_warnings += self.evaluation.warnings
        if cfg.tensorboard and run_dir is not None:
            require_tensorboard()
        self.tensorboard: Any = None  # a TensorBoardLog while the loop runs (main process, train.tensorboard)

    # -- building ---------------------------------------------------------------------------------------
    def prepare_data(self) -> list[str]:
        warnings: list[str] = []
        self.data: PreparedData = prepare_data(self.config, warnings.append)
        cfg = self.config

        verify_prepared(self.data, cfg, warnings.append)  # a truncated file: one warning, not a failed run
        self.buckets = plan_from_config(self.data.train, cfg.data, cfg.train.batch_size * self.world)
        self.order = EpochOrder(self.data.train, cfg.train.batch_size * self.world, cfg.train.seed,
                                buckets=self.buckets.sizes if self.buckets else None)
        self.steps_per_epoch = self.order.batches_per_epoch // self.accum
        if self.steps_per_epoch < 1:
            raise DatasetError(f"train.gradient_accumulation: {self.accum} batches of {cfg.train.batch_size * self.world}"
                               f" images per step need more than the {len(self.order.expanded)} images of an epoch; "
                               "lower train.gradient_accumulation or train.batch_size")
        t = cfg.train
        self.total_steps = t.max_steps if t.max_steps > 0 else t.epochs * self.steps_per_epoch
        self.dataset = ImageCaptionDataset(self.data.train, cfg, train=True)
        self.reg_dataset: ImageCaptionDataset | None = None
        if cfg.data.reg_path:
            reg = scan_dataset(Path(cfg.data.reg_path).expanduser(), resolution=cfg.data.resolution,
                               instance_prompt=cfg.data.class_prompt or None)
            if not reg.records:
                raise DatasetError(f"data.reg_path {cfg.data.reg_path}: no usable class image; fix the folder or "
                                   "leave data.reg_path empty")
            self.reg_dataset = ImageCaptionDataset(reg.records, cfg, train=True)
            log.info("DreamBooth: %d class images, prior loss weight %g", len(reg.records),
                     cfg.loss.prior_loss_weight)
        self.val_dataset = ImageCaptionDataset(self.data.val, cfg, train=False)
        self.keys = _KeySource(self.order, cfg.train.batch_size, self.rank)
        workers = cfg.data.num_workers
        self.loader = DataLoader(self.dataset, batch_sampler=self.keys, collate_fn=collate, num_workers=workers,
                                 pin_memory=self.device.type == "cuda", persistent_workers=workers > 0)
        if self.dataset.aug.describe():
            log.info("per-step augmentations: %s", ", ".join(self.dataset.aug.describe()))
        if self.buckets:
            log.info("aspect-ratio buckets (%d images per epoch left over):\n%s", self.order.images_dropped_per_epoch,
                     "\n".join(self.buckets.describe(self.data.train)))
        return warnings

    def build(self) -> None:
        cfg = self.config
        tokenizer_file = None
        if self.resume:
            if self.run_dir is None:
                raise DatasetError("resume needs a run folder")
            self._checkpoint = RunFolder(self.run_dir).newest_valid_checkpoint(self._warn_later)
            candidate = self._checkpoint.path / TOKENIZER
            tokenizer_file = candidate if candidate.is_file() else None
        captions = sorted({c for r in self.data.train for c in r.captions}) + list(cfg.sample.prompts)
        captions += [cfg.data.instance_prompt, cfg.sample.negative_prompt]
        self.bundle = build_model(cfg, captions, tokenizer_file=tokenizer_file, device=self.device)
        if cfg.train.gradient_checkpointing:
            for module in self.bundle.save_modules.values():
                # diffusers; transformers 5 (older transformers: the deprecated gradient_checkpointing_enable)
                for fn in ("enable_gradient_checkpointing", "activation_checkpointing_enable",
                           "gradient_checkpointing_enable"):
                    if hasattr(module, fn):
                        getattr(module, fn)()
                        break
        diffusion = self.bundle.diffusion_for(cfg.diffusion)
        if diffusion.zero_terminal_snr and not cfg.diffusion.zero_terminal_snr:
            log.info("the base model is a zero-terminal-SNR model: training with a rescaled schedule")
        self.sched = training_scheduler(diffusion, pixel_space=self.bundle.family == "pixel")
        self.sched.alphas_cumprod = self.sched.alphas_cumprod.to(self.device)
        self.trainable_params = [p for p in self.bundle.trainable.parameters() if p.requires_grad]
        self.param_names = [n for n, p in self.bundle.trainable.named_parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self._groups(), cfg.train, device=self.device)
        self.schedule = LRSchedule(cfg.train, self.total_steps)
        self.model, self.optimizer = self.accelerator.prepare(self.bundle.trainable, self.optimizer)
        if cfg.train.compile:
            self.model = torch.compile(self.model)
        if cfg.train.ema:
            on_cpu = cfg.train.ema_on_cpu and self.device.type != "cpu"
            params = [p.detach().to("cpu").requires_grad_(True) if on_cpu else p for p in self.trainable_params]
            self.ema = EMAModel(params, decay=cfg.train.ema_decay, foreach=not on_cpu)
        self.sample_prompts = list(cfg.sample.prompts) or self._default_prompts()
        self.ready = True

    def observe_validation(self, val_loss: float) -> bool:
        """Track the best validation loss; True when this one improved on it (early stopping counts the rest)."""
        t = self.config.train
        if val_loss < self.best_val - t.early_stopping_min_delta:
            self.best_val, self.best_step, self.bad_vals = val_loss, self.step, 0
            return True
        self.bad_vals += 1
        if t.early_stopping_patience and self.bad_vals >= t.early_stopping_patience:
            self.early_stop = True
        return False

    def mark_best(self, val_loss: float) -> None:
        assert self.run_dir is not None
        RunFolder(self.run_dir).mark_best(self.step, val_loss)

    def best_checkpoint(self) -> Path | None:
        if self.run_dir is None:
            return None
        return RunFolder(self.run_dir).best_checkpoint()

    def check_memory(self) -> str | None:
        """On a GPU: the estimated need against the free memory; advice when it will not fit."""
        if self.device.type != "cuda":
            return None
        estimate = estimate_memory(self.bundle, self.config)
        free, _total = torch.cuda.mem_get_info(self.device)
        log.info("GPU memory: %s; %.1f GiB free", estimate.describe(), free / 2**30)
        return memory_advice(estimate, free, self.config)

    def _groups(self) -> list[dict[str, Any]]:
        cfg = self.config.train
        te_lr = cfg.text_encoder_lr or cfg.learning_rate
        te_ids = {id(p) for name in ("text_encoder", "text_encoder_2")
                  if (te := getattr(self.bundle.trainable, name, None)) is not None for p in te.parameters()}
        main = [p for p in self.trainable_params if id(p) not in te_ids]
        text = [p for p in self.trainable_params if id(p) in te_ids]
        return param_groups([("model", main, cfg.learning_rate), ("text_encoder", text, te_lr)])

    def _warn_later(self, text: str) -> None:
        log.warning("%s", text)
        self._pending_warnings.append(text)

    # -- resume -----------------------------------------------------------------------------------------
    def load_latest(self) -> list[str]:
        info = self._checkpoint
        assert info is not None
        weights = ckpt_state.load_weights(info.path)
        ckpt_state.load_model_state(self.bundle, weights, info.path)
        state = ckpt_state.load_training_state(info.path)
        if state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if state.get("scaler") is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and (info.path / ckpt_state.EMA_WEIGHTS).is_file():
            shadow = ckpt_state.load_weights(info.path, ckpt_state.EMA_WEIGHTS)
            for name, s_param in zip(self.param_names, self.ema.shadow_params):
                s_param.data.copy_(shadow[name].to(s_param.device))
            meta = info.manifest.get("ema_optimization_step")
            self.ema.optimization_step = int(meta) if meta is not None else info.step
        early = state.get("extra") or {}
        self.best_val = float(early.get("best_val", float("inf")))
        self.best_step = int(early.get("best_step", -1))
        self.bad_vals = int(early.get("bad_vals", 0))
        pos = state["position"]
        self.step, self.epoch, self.step_in_epoch = int(pos["step"]), int(pos["epoch"]), int(pos["step_in_epoch"])
        self.last_checkpoint_step = self.step
        ckpt_state.set_rng_state(state["rng"])
        log.info("resumed from %s (step %d, epoch %d)", info.path, self.step, self.epoch)
        warnings, self._pending_warnings = list(self._pending_warnings), []
        return warnings + [f"resumed from {info.path.name} (step {self.step})"]

    # -- training ---------------------------------------------------------------------------------------
    def batch_groups(self) -> Iterator[list[dict[str, Any]]]:
        """The rest of the current epoch as groups of ``gradient_accumulation`` batches."""
        self.keys.epoch = self.epoch
        self.keys.start = self.step_in_epoch * self.accum
        group: list[dict[str, Any]] = []
        remaining = self.steps_per_epoch - self.step_in_epoch
        for batch in self.loader:
            group.append(batch)
            if len(group) == self.accum:
                yield group
                group = []
                remaining -= 1
                if remaining <= 0:
                    return

    def _noise_generator(self, micro: int) -> torch.Generator:
        # Seeded from (seed, step, micro-batch, rank): exact after a resume with no state to save.
        gen = torch.Generator(device=self.device)
        gen.manual_seed((self.config.train.seed * 1_000_003 + self.step) * 4099 + micro * 131 + self.rank)
        return gen

    def compute_loss(self, batch: dict[str, Any], micro: int) -> torch.Tensor:
        if "features" in batch:
            clean = resolve_features(batch, self._encode_latents, self.feature_cache)["latents"].to(self.device)
        else:
            clean = self.bundle.to_model_space(batch["pixels"].to(self.device, non_blocking=True))
        gen = self._noise_generator(micro)
        noisy, target, t = self._noised(clean, gen)
        reg = self._reg_batch(micro, len(batch["captions"])) if self.reg_dataset is not None else None
        if reg is None:
            with self.accelerator.autocast():
                pred = self.model(noisy, t, self._condition(batch))
            return diffusion_loss(pred, target, t, self.sched, self.config.loss)
        # DreamBooth prior preservation: instance and class images in one forward, losses weighted apart
        reg_clean = self.bundle.to_model_space(reg["pixels"].to(self.device))
        reg_noisy, reg_target, reg_t = self._noised(reg_clean, gen)
        both = {k: _concat(batch[k], reg[k]) for k in ("captions", "original_size", "crop_top_left", "target_size")
                if k in batch and k in reg}
        n = clean.shape[0]
        with self.accelerator.autocast():
            if reg_clean.shape[2:] == clean.shape[2:]:
                pred = self.model(torch.cat([noisy, reg_noisy]), torch.cat([t, reg_t]), self._condition(both))
                pred, reg_pred = pred[:n], pred[n:]
            else:  # a non-square bucket: class images are square, so two forwards
                pred = self.model(noisy, t, self._condition(batch))
                reg_pred = self.model(reg_noisy, reg_t, self._condition(reg))
        loss = diffusion_loss(pred, target, t, self.sched, self.config.loss)
        prior = diffusion_loss(reg_pred, reg_target, reg_t, self.sched, self.config.loss)
        return loss + self.config.loss.prior_loss_weight * prior

    def _noised(self, clean: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy input, target, timesteps) for clean samples, drawn from ``gen`` in a fixed order."""
        tmin, tmax = self.config.resolved_timestep_range()
        t = torch.randint(tmin, tmax, (clean.shape[0],), generator=gen, device=self.device)
        noise, model_noise = sample_noise(clean, self.config.loss, gen)
        return self.sched.add_noise(clean, model_noise, t), target_for(self.sched, clean, noise, t), t

    def _reg_batch(self, micro: int, size: int) -> dict[str, Any]:
        """Class images for this micro-batch: a seeded walk through the class set (exact after resume)."""
        n = len(self.reg_dataset)
        first = ((self.step * self.accum + micro) * self.world + self.rank) * size
        keys = []
        for g in range(first, first + size):
            cycle, pos = divmod(g, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.train.seed * 7 + cycle))
            keys.append(SampleKey(int(perm[pos]), cycle, g))
        return collate([self.reg_dataset[k] for k in keys])

    def optimizer_step(self, group: list[dict[str, Any]]) -> tuple[float, float, float]:
        """One optimizer step over a group of micro-batches: (loss, grad norm, lr); NaN loss = skipped."""
        lr = self.schedule.apply(self.optimizer, self.step)
        try:
            return self._accumulate_and_step(group, lr)
        except torch.cuda.OutOfMemoryError:
            if self.oom_skips >= self.config.train.oom_skip_batches:
                raise
            self.oom_skips += 1
            self.optimizer.zero_grad(set_to_none=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.warning("CUDA out of memory at step %d: batch skipped (%d of %d allowed by train.oom_skip_batches)",
                        self.step + 1, self.oom_skips, self.config.train.oom_skip_batches)
            return float("nan"), float("nan"), lr

    def _accumulate_and_step(self, group: list[dict[str, Any]], lr: float) -> tuple[float, float, float]:
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(group):
            last = i == len(group) - 1
            ctx = nullcontext() if last or self.world == 1 else self.accelerator.no_sync(self.model)
            with ctx:
                loss = self.compute_loss(batch, i)
                self.accelerator.backward(loss / len(group))
            total += loss.detach()
        max_norm = self.config.train.max_grad_norm or float("inf")
        grad_norm = self.accelerator.clip_grad_norm_(self.trainable_params, max_norm)
        # One host sync per step: the loss and gradient norm are read together, and checked before the
        # optimizer touches the weights (a NaN/inf batch leaves them as they were).
        loss_value, norm_value = (float(v) for v in torch.stack([total / len(group), grad_norm.float()]).tolist())
        if self.agree(not math.isfinite(loss_value)):  # some rank saw NaN/inf
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_steps += 1
            if self.bad_steps > self.config.train.nan_skip_steps:
                raise NonFiniteLoss(self._nan_message())
            log.warning("non-finite loss at step %d skipped (%d of %d allowed)", self.step + 1,
                        self.bad_steps, self.config.train.nan_skip_steps)
            return float("nan"), float("nan"), lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            if self.ema.foreach:
                self.ema.step(self.trainable_params)
            else:
                self.ema.step([p.detach().to("cpu").requires_grad_(True) for p in self.trainable_params])
        return loss_value, norm_value, lr

    def _nan_message(self) -> str:
        t = self.config.train
        return (f"the loss became NaN/inf at step {self.step + 1}; the last good checkpoint is kept. Usual causes: "
                f"a learning rate too high (train.learning_rate = {t.learning_rate:g}: try 3-10x lower), fp16 "
                f"mixed precision (train.mixed_precision = {t.mixed_precision!r}: try bf16 or no), a VAE in "
                "fp16 (SDXL), or no gradient clipping (train.max_grad_norm)")

    def agree(self, flag: bool) -> bool:
        """True when ``flag`` is set on any process (one tiny all-reduce with several processes)."""
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.accelerator.reduce(t, reduction="sum").item() > 0)

    # -- validation, sampling, checkpoints ----------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> tuple[float, list[float]] | None:
        """Loss on the validation images at fixed timesteps with fixed noise: comparable across epochs."""
        if not len(self.val_dataset):
            return None
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        tmin, tmax = self.config.resolved_timestep_range()
        edges = np.linspace(tmin, tmax, VAL_BUCKETS + 1)
        ts = [int((edges[k] + edges[k + 1]) / 2) for k in range(VAL_BUCKETS)]
        sums = [0.0] * VAL_BUCKETS
        bs = max(1, self.config.train.batch_size)
        try:
            for start in range(0, len(self.val_dataset), bs):
                items = [self.val_dataset[i] for i in range(start, min(start + bs, len(self.val_dataset)))]
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
                    target = target_for(self.sched, clean, noise, t)
                    per = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none")
                    sums[k] += float(per.mean(dim=(1, 2, 3)).sum())
        finally:
            model.train(was_training)
        per_bucket = [s / len(self.val_dataset) for s in sums]
        return float(np.mean(per_bucket)), per_bucket

    def save_checkpoint(self) -> Path:
        assert self.run_dir is not None
        root = RunFolder(self.run_dir).checkpoints_dir
        pos = ckpt_state.Position(self.step, self.epoch, self.step_in_epoch)
        toml = config_to_toml(self.config)

        def fill(folder: Path) -> None:
            ckpt_state.save_training_files(folder, self.bundle, optimizer=self.optimizer, schedule=self.schedule,
                                           scaler=self.accelerator.scaler, ema=self.ema, ema_names=self.param_names,
                                           position=pos, config_toml=toml,
                                           extra_state={"best_val": self.best_val, "best_step": self.best_step,
                                                        "bad_vals": self.bad_vals},
                                           save_optimizer=self.config.checkpoint.save_optimizer)

        extra = {"family": self.bundle.family, "step_in_epoch": self.step_in_epoch,
                 "ema_optimization_step": self.ema.optimization_step if self.ema is not None else None}
        path = write_checkpoint(root, self.step, self.epoch, fill, extra)
        self.last_checkpoint_step = self.step
        best = self.best_checkpoint()
        prune_checkpoints(root, self.config.checkpoint.keep_last, protect={path} | ({best} if best else set()))
        log.info("checkpoint saved: %s", path)
        return path

    def close(self) -> None:
        if self.device.type == "cuda":  # free_memory runs a full gc.collect(): seconds of GIL in the app
            self.accelerator.free_memory()
