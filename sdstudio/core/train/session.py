"""A training session: one run made of parts, each owning its state, which the loop calls in turn:

- ``progress`` (Progress) and ``early`` (EarlyStopping): where the run stands; advanced by the loop.
- ``batches`` (TrainingBatches): the data, epoch order and loader (``prepare_data``).
- ``caches`` (FeatureCaches): latent / text-embedding caches and a batch's conditioning.
- ``objective`` (DiffusionObjective / FlowMatchingObjective, as the family trains): the training and
  validation losses.
- ``steps`` (OptimizerStep): one guarded optimizer step (+ schedule, scaler, EMA update).
- ``previews`` (Previews): sample grids and FID/KID images under the EMA weights.
- ``evaluation`` (RunEvaluation): FID/KID during the run.
- ``memorisation`` (RunMemorisation): the memorisation / collapse alarm at each sample grid.

The session builds them (``build``), and does what spans them: checkpoints (save, resume, best)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from ..config import RunConfig, TrainConfig
from ..errors import ConfigError, DatasetError
from ..models.bundle import ModelBundle
from ..presets import config_to_toml
from ..runs import RunFolder
from ..runs.checkpoints import TOKENIZER
from . import state as ckpt_state
from .batches import TrainingBatches
from .caches import FeatureCaches
from .checkpoint import CheckpointInfo, prune_checkpoints, write_checkpoint
from .ema import EmaWeights
from .evaluation import RunEvaluation
from .image_loss import ImageLossTracker
from .memorisation import RunMemorisation
from .memory import estimate_memory, memory_advice
from .objective import make_objective, training_schedule
from .optim import LRSchedule, build_optimizer, optimizer_warnings, param_groups
from .previews import Previews
from .progress import EarlyStopping, Progress
from .setup import build_model, data_root, pick_device
from .step import LossFn, OptimizerStep, any_process
from .tensorboard_log import require_tensorboard
from .wandb_log import require_wandb

log = logging.getLogger("sdstudio")


class TrainingSession:
    def __init__(self, config: RunConfig, *, run_dir: Path | None, resume: bool) -> None:
        self.config = config
        self.run_dir = run_dir
        self.resume = resume
        cfg = config.train
        device = pick_device(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        precision = cfg.mixed_precision
        self.init_warnings: list[str] = optimizer_warnings(cfg)
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
        fsdp = fsdp_plugin(cfg, self.init_warnings)
        self.accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=precision,
                                       kwargs_handlers=handlers, **({"fsdp_plugin": fsdp} if fsdp else {}))
        self.device = self.accelerator.device
        if fsdp and self.accelerator.distributed_type.value != "FSDP":  # accelerate drops the plugin (CPU ranks)
            self.init_warnings.append(f"train.fsdp = true not used: accelerate runs these processes as "
                                      f"{self.accelerator.distributed_type.value} on the {self.device.type} (its FSDP "
                                      "needs GPUs), so every process holds the whole model")
        if self.device.type == "cuda":
            # TF32 matmuls/convolutions: what the fp32 parts of a step use on Ampere and newer
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.is_main = self.accelerator.is_main_process
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.data_root = data_root(config)
        self.progress = Progress()
        self.early = EarlyStopping(cfg)
        self.ready = False  # built: a checkpoint can be saved
        self._checkpoint: CheckpointInfo | None = None  # the one to resume from
        self._pending_warnings: list[str] = []
        # Checked before anything is built or written: a bad eval.inception_weights or a missing tensorboard
        # package is an input error at the start, not a failure at the first evaluation / log line.
        self.evaluation = RunEvaluation(config, is_main=self.is_main)
        self.init_warnings += self.evaluation.warnings
        self.memorisation = RunMemorisation(config, is_main=self.is_main, inception=self.evaluation.inception)
        if cfg.tensorboard and run_dir is not None:
            require_tensorboard()
        if cfg.wandb and run_dir is not None:
            require_wandb()

    # -- read-only views for callers holding the session (tests, benchmarks) ---------------------------------
    @property
    def step(self) -> int:
        return self.progress.step

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.steps.optimizer

    # -- building ---------------------------------------------------------------------------------------
    def prepare_data(self) -> list[str]:
        warnings: list[str] = []
        self.batches = TrainingBatches(self.config, world=self.world, rank=self.rank,
                                       pin_memory=self.device.type == "cuda", warn=warnings.append)
        self.progress.plan(self.config.train, self.batches.steps_per_epoch)
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
        train_records = self.batches.data.train
        captions = sorted({c for r in train_records for c in r.captions}) + list(cfg.sample.prompts)
        captions += [cfg.data.instance_prompt, cfg.sample.negative_prompt]
        captions += [self.batches.images.caption(i, None) for i in range(len(self.batches.images))]  # + trigger words
        if cfg.sample.prompts_file:
            from ..sampling.prompts_file import read_prompts_file

            captions += [t for spec in read_prompts_file(cfg.sample.prompts_file) for t in (spec.prompt, spec.negative or "")]
        self.bundle = build_model(cfg, captions, tokenizer_file=tokenizer_file, device=self.device)
        if cfg.train.gradient_checkpointing:
            for module in self.bundle.save_modules.values():
                # diffusers; transformers 5 (older transformers: the deprecated gradient_checkpointing_enable)
                for fn in ("enable_gradient_checkpointing", "activation_checkpointing_enable",
                           "gradient_checkpointing_enable"):
                    if hasattr(module, fn):
                        getattr(module, fn)()
                        break
        sched = training_schedule(cfg, self.bundle, self.device)  # the family's objective says which
        params = [p for p in self.bundle.trainable.parameters() if p.requires_grad]
        names = [n for n, p in self.bundle.trainable.named_parameters() if p.requires_grad]
        schedule = LRSchedule(cfg.train, self.progress.total_steps)
        self.block_swap = self.bundle.block_swap  # set up by the family: the swapped blocks stay off the device
        placed = [self.block_swap is None]  # else accelerate must not move the whole model to the device
        if cfg.train.fused_backward:  # one optimizer per parameter, stepped in the backward pass (fused_backward.py)
            if self.world > 1:
                raise ConfigError("train.fused_backward: true works in one process only (gradients of several "
                                  "processes are averaged after the backward pass); turn it off for this run")
            from .fused_backward import FusedBackwardOptimizer

            self.model = self.accelerator.prepare(self.bundle.trainable, device_placement=placed)
            optimizer = FusedBackwardOptimizer(_groups(self.bundle, params, cfg.train),
                                               lambda g: build_optimizer(g, cfg.train, device=self.device))
        else:
            optimizer = build_optimizer(_groups(self.bundle, params, cfg.train), cfg.train, device=self.device)
            self.model, optimizer = self.accelerator.prepare(self.bundle.trainable, optimizer,
                                                             device_placement=placed + [True])
        if cfg.train.blocks_to_swap and self.block_swap is None:  # CPU, several processes: after the wrapping
            from .blockswap import install_block_swap

            self.block_swap = install_block_swap(self.bundle.trainable, cfg.train.blocks_to_swap, device=self.device)
        self.compiled_regions = self._compile(cfg.train)  # train.compile*, train.attention_backend (speed.py)
        self.ema: EmaWeights | None = None
        if cfg.train.ema:
            self.ema = EmaWeights(params, names, decay=cfg.train.ema_decay,
                                  on_cpu=cfg.train.ema_on_cpu and self.device.type != "cpu", every=cfg.train.ema_every)
        step_class = OptimizerStep
        if cfg.train.fused_backward:
            from .fused_backward import FusedOptimizerStep

            step_class = FusedOptimizerStep
        self.steps = step_class(self.accelerator, self.model, optimizer, schedule, params, self.ema, cfg.train)
        self.caches = FeatureCaches(cfg, self.bundle, self.accelerator)
        self.objective = make_objective(cfg, self.bundle, sched, self.model, self.accelerator, self.caches,
                                        self.batches)
        if self.run_dir is not None and self.is_main:
            # per-image loss (image_loss.json): each loss compared with others at a comparable timestep
            self.objective.image_losses = self._image_loss_tracker(train_records, self.objective.image_loss_span())
        self.previews = Previews(cfg, self.bundle, sched, self.model, self.accelerator, self.ema,
                                 run_dir=self.run_dir, data_root=self.data_root, train_records=train_records,
                                 evaluation_weights=self.steps.evaluation_weights)
        self.frozen_parts = None  # FrozenParts once park_frozen ran
        self.ready = True

    def _compile(self, cfg: TrainConfig) -> int:
        from .speed import AttentionChoice, compile_model, compiler_available, use_compile_cache

        self.attention = AttentionChoice(cfg.attention_backend).apply()  # restored by close()
        self.compiled = False
        if not cfg.compile:
            return 0
        missing = compiler_available(self.device)
        if missing:
            log.warning("train.compile = true ignored: %s; training without compiling", missing)
            return 0
        if cfg.compile_cache:
            from ..paths import cache_dir

            use_compile_cache(cache_dir() / "compile")
        self.model, regions = compile_model(self.model, mode=cfg.compile_mode, dynamic=cfg.compile_dynamic)
        self.compiled = True
        return regions

    def park_frozen(self) -> None:
        """``train.offload_frozen``: the encoders whose work the complete caches hold go to CPU memory."""
        if not self.config.train.offload_frozen:
            return
        from .offload import FrozenParts, frozen_encoders

        latents = self.caches.feature_cache is not None
        text = self.caches.text_cache is not None
        parts = frozen_encoders(self.bundle, latents_cached=latents, text_cached=text)
        if not parts:
            log.warning("train.offload_frozen: nothing to move off the device (it needs data.cache_latents and/or "
                        "data.cache_text_embeddings, with frozen text encoders)")
            return
        self.frozen_parts = FrozenParts(self.device)
        self.frozen_parts.park(parts)
        self.caches.frozen_parts = self.previews.frozen_parts = self.frozen_parts

    def _image_loss_tracker(self, records: list[Any], span: float) -> ImageLossTracker:
        root = self.data_root.resolve()
        names = []
        for r in records:
            try:
                names.append(r.path.resolve().relative_to(root).as_posix())
            except ValueError:
                names.append(str(r.path))
        tracker = ImageLossTracker(names, span)
        if self.resume and self.run_dir is not None:
            previous = RunFolder(self.run_dir).read_image_loss()
            if previous is not None:
                tracker.load(previous)
        return tracker

    def write_image_loss(self) -> None:
        """image_loss.json: written with every checkpoint, so a resume continues from matching numbers."""
        tracker = getattr(self.objective, "image_losses", None) if self.ready else None
        if tracker is not None and self.run_dir is not None:
            tracker.write(RunFolder(self.run_dir).image_loss_file, self.step)

    def write_run_card(self) -> None:
        """run-card.json at the start of a new run (a resume keeps the card of the start)."""
        if not self.is_main or self.run_dir is None or self.resume:
            return
        from ..runs.card import build_card

        reg = self.batches.reg_dataset
        card = build_card(self.config, image_paths=[r.path for r in self.batches.data.train + self.batches.data.val],
                          device=self.device, reg_image_paths=[r.path for r in reg.records] if reg else None)
        RunFolder(self.run_dir).write_card(card)

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
        self.steps.load_state(state)
        if self.ema is not None and (info.path / ckpt_state.EMA_WEIGHTS).is_file():
            meta = info.manifest.get("ema_optimization_step")
            self.ema.load(ckpt_state.load_weights(info.path, ckpt_state.EMA_WEIGHTS),
                          int(meta) if meta is not None else info.step)
        self.early.load_state_dict(state.get("extra") or {})
        self.progress.restore(state["position"])
        ckpt_state.set_rng_state(state["rng"])
        log.info("resumed from %s (step %d, epoch %d)", info.path, self.step, self.progress.epoch)
        warnings, self._pending_warnings = list(self._pending_warnings), []
        return warnings + [f"resumed from {info.path.name} (step {self.step})"]

    # -- training (the loss and the step are methods here so that tests can wrap them) ---------------------
    def compute_loss(self, batch: dict[str, Any], micro: int) -> torch.Tensor:
        if self.config.train.offload_activations:  # what the backward pass needs waits in CPU memory
            with torch.autograd.graph.save_on_cpu(pin_memory=self.device.type == "cuda"):
                return self.objective.loss(batch, micro, self.step)
        return self.objective.loss(batch, micro, self.step)

    def optimizer_step(self, group: list[dict[str, Any]]) -> tuple[Any, Any, float]:
        """One optimizer step over a group of micro-batches: (loss, grad norm, lr); NaN loss = skipped. Loss and
        grad norm may be device tensors, not read yet (``OptimizerStep.lazy``): ``float()`` them when needed."""
        loss_fn: LossFn = self.compute_loss
        return self.steps.run(group, self.step, loss_fn)

    def prewarm_shapes(self) -> list[Any]:
        """``train.compile_prewarm``: the batch shapes (bucket sizes, None = the square resolution) to compile
        before the next step, in the order they come up; [] when nothing is to be pre-warmed (no compile, dynamic
        shapes, pre-warm off, torch.compile unavailable, no step left)."""
        cfg = self.config.train
        if not (getattr(self, "compiled", False) and cfg.compile_prewarm and not cfg.compile_dynamic):
            return []
        p = self.progress
        return self.batches.shapes_ahead(p.epoch, p.step_in_epoch, p.total_steps - p.step)

    def prewarm(self, size: Any) -> None:
        """One forward and backward pass of the compiled model on a micro-batch at bucket ``size``, as a step
        makes it (same objective, autocast, checkpointing: the same graphs), then nothing of it kept: gradients
        dropped, no optimizer step (train.fused_backward's hooks held back), no schedule or EMA update, the
        per-image loss and the recipe's terms not recorded, every random stream (Python, numpy, torch, CUDA) put
        back, so the run trains bit for bit as without it."""
        from .fused_backward import FusedBackwardOptimizer

        batch = self.batches.shape_batch(size)
        objective, fused = self.objective, self.steps.optimizer
        fused = fused if isinstance(fused, FusedBackwardOptimizer) else None
        tracker, objective.image_losses = objective.image_losses, None
        rng = ckpt_state.rng_state()
        if fused is not None:
            fused.enabled = False
        try:
            self.accelerator.backward(self.compute_loss(batch, 0))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # the warm-up time includes the device's work
        finally:
            self.steps.optimizer.zero_grad(set_to_none=True)
            for param in self.bundle.trainable.parameters():
                param.grad = None
            if fused is not None:
                fused.enabled = True
            objective.image_losses = tracker
            recipe = getattr(objective, "recipe", None)
            if recipe is not None:
                recipe.last.clear()
            ckpt_state.set_rng_state(rng)

    def agree(self, flag: bool) -> bool:
        """True when ``flag`` is set on any process (one tiny all-reduce with several processes)."""
        return any_process(self.accelerator, flag)

    # -- validation, sampling, checkpoints ----------------------------------------------------------------
    def validate(self) -> tuple[float, list[float]] | None:
        """Loss on the validation images at fixed timesteps with fixed noise: comparable across epochs."""
        with self.steps.evaluation_weights():
            return self.objective.validation_loss()

    def generate_pairs(self, model: torch.nn.Module, pairs: list[tuple[str, int]], *, steps: int) -> np.ndarray:
        """One batch of FID/KID images, one per (caption, seed) pair (call inside ``previews.sampling_model``)."""
        return self.previews.generate_pairs(model, pairs, steps=steps)

    def save_checkpoint(self) -> Path:
        assert self.run_dir is not None
        self.steps.settle()  # a NaN step not read yet fails the run here, before a checkpoint is written
        root = RunFolder(self.run_dir).checkpoints_dir
        pos = self.progress.position()
        toml = config_to_toml(self.config)
        ema = self.ema
        extra_state = {**self.early.state_dict(), **self.steps.extra_state()}

        def fill(folder: Path) -> None:
            ckpt_state.save_training_files(folder, self.bundle, optimizer=self.steps.optimizer,
                                           schedule=self.steps.schedule, scaler=self.accelerator.scaler,
                                           ema=ema.average if ema is not None else None,
                                           ema_names=ema.names if ema is not None else [],
                                           position=pos, config_toml=toml, extra_state=extra_state,
                                           save_optimizer=self.config.checkpoint.save_optimizer)

        extra = {"family": self.bundle.family, "step_in_epoch": pos.step_in_epoch,
                 "ema_optimization_step": ema.optimization_step if ema is not None else None}
        with self.steps.evaluation_weights():  # a schedule-free optimizer's averaged weights are the model
            path = write_checkpoint(root, pos.step, pos.epoch, fill, extra)
        self.progress.checkpointed()
        self.write_image_loss()
        best = self.best_checkpoint()
        prune_checkpoints(root, self.config.checkpoint.keep_last, protect={path} | ({best} if best else set()))
        log.info("checkpoint saved: %s", path)
        return path

    def close(self) -> None:
        attention = getattr(self, "attention", None)
        if attention is not None:
            attention.restore()
        if self.device.type == "cuda":  # free_memory runs a full gc.collect(): seconds of GIL in the app
            self.accelerator.free_memory()


def fsdp_plugin(cfg: TrainConfig, warnings: list[str]) -> Any:
    """``train.fsdp``: accelerate's FSDP plugin (full sharding of weights, gradients and optimizer states, the
    denoiser's blocks wrapped by size) when the run has several processes; one process has nothing to shard."""
    if not cfg.fsdp:
        return None
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        warnings.append("train.fsdp = true ignored: this run has one process, so there is nothing to shard (start "
                        "it with accelerate launch / torchrun on several GPUs)")
        return None
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(sharding_strategy="FULL_SHARD", auto_wrap_policy="size_based_wrap",
                                          min_num_params=1_000_000, use_orig_params=True,
                                          state_dict_type="FULL_STATE_DICT")


def _groups(bundle: ModelBundle, params: list[torch.nn.Parameter], cfg: TrainConfig) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: the text encoders' parameters at ``train.text_encoder_lr``."""
    te_lr = cfg.text_encoder_lr or cfg.learning_rate
    te_ids = {id(p) for name in ("text_encoder", "text_encoder_2")
              if (te := getattr(bundle.trainable, name, None)) is not None for p in te.parameters()}
    main = [p for p in params if id(p) not in te_ids]
    text = [p for p in params if id(p) in te_ids]
    return param_groups([("model", main, cfg.learning_rate), ("text_encoder", text, te_lr)])
