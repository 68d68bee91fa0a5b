"""Images from a training session: preview grids, the FID/KID images, and the demo's prompt adherence, all
made with the live modules (no second pipeline) under the EMA weights when EMA is on, with every global RNG
restored afterwards. A mixin of TrainingSession, which owns the state it uses."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import paths
from ..atomic import write_text_atomic
from ..demo_shapes import parse_prompt, prompt_adherence
from ..runs import RunFolder
from ..sampling.sampler import generate, generate_pairs, make_grid, preserved_rng_state

log = logging.getLogger("sdstudio")


class SamplingMixin:
    config: Any
    bundle: Any
    device: torch.device
    data: Any
    data_root: Path
    run_dir: Path | None
    accelerator: Any
    model: Any
    ema: Any
    trainable_params: list[torch.nn.Parameter]
    sched: Any
    sample_prompts: list[str]
    step: int
    epoch: int

    def _default_prompts(self) -> list[str]:
        if self.bundle.tokenizer is None:
            return [""]
        seen = sorted({r.captions[0] for r in self.data.train if r.captions})
        return seen[:4] or [""]

    def prompt_adherence(self) -> dict[str, float]:
        """On the bundled demo data: how often the last grid shows each prompt's colour and shape."""
        images = getattr(self, "last_sample_images", None)
        if images is None or self.data_root.resolve() != paths.demo_dataset_dir().resolve():
            return {}
        if not all(None not in parse_prompt(p) for p in self.sample_prompts):
            return {}
        labels = [p for p in self.sample_prompts for _ in self.config.sample.seeds]
        return prompt_adherence(list(images), labels)

    @contextmanager
    def sampling_model(self) -> Iterator[torch.nn.Module]:
        """The unwrapped model in eval mode with the EMA weights swapped in (when EMA is on); every global RNG
        and the raw weights are restored afterwards, so sampling never changes the training run."""
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        with preserved_rng_state():
            if self.ema is not None:
                self.ema.store(self.trainable_params)
                self.ema.copy_to(self.trainable_params)
            model.eval()
            try:
                yield model
            finally:
                model.train(was_training)
                if self.ema is not None:
                    self.ema.restore(self.trainable_params)

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

    def sample_grid(self) -> tuple[np.ndarray, Path | None]:
        seeds = list(self.config.sample.seeds)
        images = self.sample_images(self.sample_prompts, seeds)
        self.last_sample_images = images
        grid = make_grid(images, rows=len(self.sample_prompts))
        if self.run_dir is None:
            return grid, None
        from PIL import Image

        path = RunFolder(self.run_dir).sample_grid(self.step)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(grid).save(tmp, format="PNG")
            tmp.replace(path)
            write_text_atomic(path.with_suffix(".json"), json.dumps(
                {"step": self.step, "epoch": self.epoch, "prompts": self.sample_prompts, "seeds": seeds,
                 "sampler": self.config.sample.sampler, "steps": self.config.sample.steps,
                 "guidance": self.config.sample.guidance, "ema": self.ema is not None}, indent=1))
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.warning("could not save the sample grid %s: %s (training goes on)", path, exc)
            return grid, None
        return grid, path

