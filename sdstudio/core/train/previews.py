"""Images from a training session: preview grids, the FID/KID images, and the demo's prompt adherence, all
made with the live modules (no second pipeline) under the EMA weights when EMA is on, with every global RNG
restored afterwards."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from .. import paths
from ..atomic import write_file_atomic, write_text_atomic
from ..config import RunConfig
from ..data.scan import ImageRecord
from ..demo_shapes import parse_prompt, prompt_adherence
from ..models.bundle import ModelBundle
from ..runs import RunFolder
from ..sampling.prompts_file import PromptSpec, read_prompts_file
from ..sampling.sampler import generate, generate_pairs, make_grid, preserved_rng_state, stack_padded
from .ema import EmaWeights

log = logging.getLogger("sdstudio")


def default_prompts(bundle: ModelBundle, records: list[ImageRecord]) -> list[str]:
    """Without ``sample.prompts``: the first four distinct training captions (one empty prompt without text)."""
    if bundle.tokenizer is None:
        return [""]
    seen = sorted({r.captions[0] for r in records if r.captions})
    return seen[:4] or [""]


class Previews:
    """``model``: the prepared training model (unwrapped for sampling); ``sched``: its noise schedule;
    ``run_dir``: where grids go (None: nowhere); ``data_root``: the data folder (demo prompt adherence)."""

    def __init__(self, config: RunConfig, bundle: ModelBundle, sched: Any, model: Any, accelerator: Accelerator,
                 ema: EmaWeights | None, *, run_dir: Path | None, data_root: Path,
                 train_records: list[ImageRecord],
                 evaluation_weights: Callable[[], AbstractContextManager[None]] = nullcontext) -> None:
        self.config, self.bundle, self.sched, self.model, self.accelerator = config, bundle, sched, model, accelerator
        self.ema, self.run_dir, self.data_root = ema, run_dir, data_root
        self.device = accelerator.device
        self.specs = [PromptSpec(p) for p in config.sample.prompts]
        if config.sample.prompts_file:  # kohya's format: per-prompt negative, size, steps, guidance, seed
            self.specs += read_prompts_file(config.sample.prompts_file)
            for spec in self.specs:
                if spec.ignored:
                    log.warning("sample.prompts_file: %s ignored for prompt %r", ", ".join(spec.ignored), spec.prompt)
        if not self.specs:
            self.specs = [PromptSpec(p) for p in default_prompts(bundle, train_records)]
        self.prompts = [spec.prompt for spec in self.specs]
        self.last_images: np.ndarray | None = None  # of the last grid
        self.evaluation_weights = evaluation_weights  # the optimizer's (schedule-free: its averaged weights)
        self.frozen_parts: Any = None  # FrozenParts (train.offload_frozen): back on the device while sampling

    def prompt_adherence(self) -> dict[str, float]:
        """On the bundled demo data: how often the last grid shows each prompt's colour and shape."""
        images = self.last_images
        if images is None or self.data_root.resolve() != paths.demo_dataset_dir().resolve():
            return {}
        if not all(None not in parse_prompt(p) for p in self.prompts):
            return {}
        labels = [p for p in self.prompts for _ in self.config.sample.seeds]
        return prompt_adherence(list(images), labels)

    @contextmanager
    def sampling_model(self) -> Iterator[torch.nn.Module]:
        """The unwrapped model in eval mode with the EMA weights swapped in (when EMA is on); every global RNG
        and the raw weights are restored afterwards, so sampling never changes the training run."""
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        parts = self.frozen_parts.on_device() if self.frozen_parts is not None else nullcontext()
        with preserved_rng_state(), self.evaluation_weights(), \
                (self.ema.swapped_in() if self.ema is not None else nullcontext()), parts:
            model.eval()
            try:
                yield model
            finally:
                model.train(was_training)

    def _autocast_dtype(self) -> torch.dtype | None:
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.accelerator.mixed_precision)

    def sample_images(self, prompts: list[str], seeds: list[int]) -> np.ndarray:
        cfg = self.config.sample
        with self.sampling_model() as model:
            return generate(self.bundle, model, self.sched, prompts, seeds, steps=cfg.steps,
                            guidance=cfg.guidance, sampler=cfg.sampler, negative_prompt=cfg.negative_prompt,
                            device=self.device, autocast_dtype=self._autocast_dtype())

    @torch.no_grad()
    def generate_pairs(self, model: torch.nn.Module, pairs: list[tuple[str, int]], *,
                       steps: int) -> np.ndarray:
        """One batch of images, one per (caption, seed) pair, with the sampler, guidance and negative prompt
        of ``sample.*`` (call inside ``sampling_model``): uint8 (N, H, W, 3)."""
        cfg = self.config.sample
        return generate_pairs(self.bundle, model, self.sched, pairs, steps, cfg.guidance, cfg.sampler,
                               cfg.negative_prompt, self.device, self._autocast_dtype())

    def sample_rows(self, seeds: list[int]) -> np.ndarray:
        """One row of images per prompt, one per seed; a prompt of the prompts file samples with its own
        negative prompt, size, steps, guidance, sampler and seeds (``--d`` D: seeds D, D+1, ...); rows of
        other sizes are centred on white at the largest size."""
        if not any(spec.settings() for spec in self.specs):
            return self.sample_images(self.prompts, seeds)
        cfg = self.config.sample
        rows = []
        with self.sampling_model() as model:
            for spec in self.specs:
                row_seeds = [spec.seed + k for k in range(len(seeds))] if spec.seed is not None else seeds
                size = None
                if spec.width is not None or spec.height is not None:
                    side = self.bundle.sample_size * self.bundle.model_family.latent_downscale
                    size = (spec.width or side, spec.height or side)
                rows.append(generate(
                    self.bundle, model, self.sched, [spec.prompt], row_seeds, steps=spec.steps or cfg.steps,
                    guidance=cfg.guidance if spec.guidance is None else spec.guidance,
                    sampler=spec.sampler or cfg.sampler,
                    negative_prompt=cfg.negative_prompt if spec.negative is None else spec.negative,
                    device=self.device, autocast_dtype=self._autocast_dtype(), size=size))
        return stack_padded(rows)

    def grid(self, step: int, epoch: int) -> tuple[np.ndarray, Path | None]:
        """The preview grid of ``step`` (one row per prompt, one column per seed) and where it was saved
        (None without a run folder or when it could not be written: a warning, training goes on)."""
        seeds = list(self.config.sample.seeds)
        images = self.sample_rows(seeds)
        self.last_images = images
        grid = make_grid(images, rows=len(self.prompts))
        if self.run_dir is None:
            return grid, None
        from PIL import Image

        path = RunFolder(self.run_dir).sample_grid(step)
        try:
            write_file_atomic(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))
            write_text_atomic(path.with_suffix(".json"), json.dumps(
                {"step": step, "epoch": epoch, "prompts": self.prompts, "seeds": seeds,
                 "sampler": self.config.sample.sampler, "steps": self.config.sample.steps,
                 "guidance": self.config.sample.guidance, "ema": self.ema is not None,
                 "prompt_settings": [spec.settings() for spec in self.specs]}, indent=1))
        except OSError as exc:
            log.warning("could not save the sample grid %s: %s (training goes on)", path, exc)
            return grid, None
        return grid, path

