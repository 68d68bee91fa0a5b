"""FID / KID during a run (the ``eval`` section of the config; the metric itself is ``core/metrics``).

- **When:** every ``eval.fid_every_steps`` steps, every ``eval.fid_every_epochs`` epochs, and at the end of a
  completed or early-stopped run (``eval.fid_at_end``), only when ``eval.inception_weights`` is set. Without
  the weights a schedule gets one warning and no number; a weights file that is set but wrong fails the run
  before training (``RunEvaluation`` loads it when the session is created).
- **Generated set:** ``eval.num_samples`` images from the validation captions (cycled), with fixed seeds
  derived from ``train.seed`` (``eval_seeds``), so every evaluation of a run draws the same set; sampler,
  guidance and negative prompt from ``sample.*``, ``eval.sampler_steps`` (or ``sample.steps``) steps,
  ``eval.batch_size`` images per batch, EMA weights swapped in and every global RNG restored afterwards (as
  for sample grids).
- **Real set:** the validation images as uint8 at the training resolution (no augmentation); their Inception
  features are computed at the first evaluation and kept for the rest of the run.
- Only the main process evaluates; the others go on to the next step (like sample grids), so there is no
  collective call in here that the other ranks would have to join.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import events as ev
from ..config import RunConfig
from ..metrics import (
    CONFIG_KEY,
    WEIGHTS_FILENAME,
    WEIGHTS_URL,
    FidEvaluator,
    InceptionWeightsError,
    compare_features,
    load_fid_inception,
)
from ..runs import MetricsWriter, metrics_row

if TYPE_CHECKING:
    from .session import TrainingSession

log = logging.getLogger("sdstudio")

# Seeds of the FID/KID images: far from the preview grid's small seeds; one block of 2**16 per train.seed
# (eval.num_samples <= 50000), so runs with different seeds draw different, non-overlapping sets.
_SEED_BASE = 1_000_000_007
_SEED_BLOCK = 1 << 16

OFF_WARNING = (f"FID/KID are off: eval.fid_every_steps / eval.fid_every_epochs is set but {CONFIG_KEY} is "
               f"empty. To enable them download {WEIGHTS_FILENAME} ({WEIGHTS_URL}, see docs/metrics.md) and "
               f"set {CONFIG_KEY} to its path; no FID/KID is estimated without it")
NO_VAL_WARNING = ("FID/KID skipped: the run has no validation images, which are the reference set; set "
                  "data.val_split above 0 or data.val_path")


def eval_seeds(train_seed: int, n: int) -> list[int]:
    """The seeds of the ``n`` FID/KID images of a run with ``train.seed`` = ``train_seed``."""
    base = _SEED_BASE + (train_seed % (1 << 31)) * _SEED_BLOCK
    return [base + i for i in range(n)]


def load_checked_inception(path: str) -> Any:
    """The FID Inception of ``eval.inception_weights``; errors (InceptionWeightsError) name the key."""
    try:
        return load_fid_inception(path)
    except InceptionWeightsError as exc:
        raise InceptionWeightsError(f"{CONFIG_KEY} = {path!r}: {exc}") from None


class RunEvaluation:
    """The FID/KID state of one run: the schedule, the Inception (main process), the cached real features."""

    def __init__(self, config: RunConfig, *, is_main: bool) -> None:
        self.cfg = config.eval
        self.train_seed = config.train.seed
        self.enabled = bool(self.cfg.inception_weights)
        self.warnings: list[str] = []
        self.inception: Any = None
        if self.enabled:
            # Every process checks the file, so a bad path fails all of them before training (none waits
            # for another that has already given up); only the main process keeps the network.
            net = load_checked_inception(self.cfg.inception_weights)
            self.inception = net if is_main else None
        elif self.cfg.fid_every_steps or self.cfg.fid_every_epochs:
            self.warnings.append(OFF_WARNING)
        self.last_step = -1  # of the last evaluation (or skip): not twice at one step
        self._evaluator: FidEvaluator | None = None
        self._real: np.ndarray | None = None
        self._captions: list[str] | None = None

    # -- schedule (the same answer on every process) ------------------------------------------------------
    def due_at_step(self, step: int) -> bool:
        return self.enabled and bool(self.cfg.fid_every_steps) and step % self.cfg.fid_every_steps == 0

    def due_at_epoch(self, epochs_done: int, step: int) -> bool:
        every = self.cfg.fid_every_epochs
        return self.enabled and bool(every) and epochs_done % every == 0 and self.last_step != step

    def due_at_end(self, step: int) -> bool:
        return self.enabled and self.cfg.fid_at_end and self.last_step != step

    def evaluated(self, step: int) -> None:
        self.last_step = step

    def data_warnings(self, n_val: int) -> list[str]:
        """Said once, after the data is prepared: FID/KID on but no reference set."""
        return [NO_VAL_WARNING] if self.enabled and n_val == 0 else []

    # -- computing ----------------------------------------------------------------------------------------
    def _features(self, s: TrainingSession) -> FidEvaluator:
        if self._evaluator is None:
            self._evaluator = FidEvaluator(self.inception, device=s.device, batch_size=self.cfg.batch_size)
        return self._evaluator

    @property
    def cached_real(self) -> np.ndarray | None:
        return self._real

    def real_features(self, s: TrainingSession) -> np.ndarray:
        """Inception features of the validation images (computed once per run, in batches)."""
        if self._real is None:
            data = s.batches.val_dataset  # int keys: no augmentation, the square training resolution
            feats = []
            bs = self.cfg.batch_size
            for start in range(0, len(data), bs):
                arrays = [data.prepared(i, None).array for i in range(start, min(start + bs, len(data)))]
                feats.append(self._features(s).features(np.stack(arrays)))
            self._real = np.concatenate(feats, axis=0)
        return self._real

    def captions(self, s: TrainingSession) -> list[str]:
        """The caption of each generated image: the validation captions, cycled."""
        if self._captions is None:
            data = s.batches.val_dataset
            val = [data.caption(i, None) for i in range(len(data))]
            self._captions = [val[i % len(val)] for i in range(self.cfg.num_samples)]
        return self._captions

    def generated_features(self, s: TrainingSession) -> Iterator[tuple[int, np.ndarray | None]]:
        """Generate the images batch by batch (never all held at once); yields (images done, None) after each
        batch and finally (n, features)."""
        n = self.cfg.num_samples
        pairs = list(zip(self.captions(s), eval_seeds(self.train_seed, n)))
        steps = self.cfg.sampler_steps or s.config.sample.steps
        feats = []
        with s.previews.sampling_model() as model:
            for start in range(0, n, self.cfg.batch_size):
                images = s.generate_pairs(model, pairs[start:start + self.cfg.batch_size], steps=steps)
                feats.append(self._features(s).features(images))
                yield min(start + self.cfg.batch_size, n), None
        yield n, np.concatenate(feats, axis=0)


def _fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def evaluate(s: TrainingSession, metrics: MetricsWriter | None,
             stop: Callable[[], bool] | None = None) -> Iterator[ev.Event]:
    """One FID/KID evaluation at the current step (main process; the others only note the step).

    ``stop``: asked after each generated batch; a stop request abandons the evaluation (no row is written)
    so a large eval.num_samples never holds a stop up for long."""
    e = s.evaluation
    e.evaluated(s.step)
    if not e.enabled or not s.is_main or not len(s.batches.val_dataset):
        return
    if stop is not None and stop():  # a stop asked for already: not worth the validation features
        return
    n = e.cfg.num_samples
    t0 = time.perf_counter()
    if e.cached_real is None:
        yield ev.Status("evaluating", f"FID/KID: features of {len(s.batches.val_dataset)} validation images")
    else:
        yield ev.Status("evaluating", f"FID/KID: generating {n} images")
    generated: np.ndarray | None = None
    try:
        real = e.real_features(s)
        batches = e.generated_features(s)
        try:
            for done, feats in batches:
                if feats is None:
                    yield ev.Status("evaluating", f"FID/KID: {done} of {n} images generated")
                else:
                    generated = feats
                if stop is not None and stop() and done < n:
                    text = f"FID/KID at step {s.step} abandoned after {done} of {n} images: stop requested"
                    log.info("%s", text)
                    yield ev.Warning(text)
                    return
        finally:
            batches.close()  # leaves the sampling context: weights (EMA) and RNG states restored now
    except torch.cuda.OutOfMemoryError as exc:
        # the weights and RNG states are already restored (sampling_model); training can go on
        torch.cuda.empty_cache()
        text = (f"FID/KID at step {s.step} skipped: out of GPU memory ({str(exc).splitlines()[0]}); lower "
                f"eval.batch_size (now {e.cfg.batch_size})")
        log.warning("%s", text)
        yield ev.Warning(text)
        yield ev.Status("training", "training")
        return
    assert generated is not None
    result = compare_features(generated, real, seed=e.train_seed)
    seconds = time.perf_counter() - t0
    fid, kid_mean, kid_std = result["fid"], result["kid_mean"], result["kid_std"]
    note = str(result.get("note") or "")
    log.info("FID/KID at step %d: FID %s%s, KID %s +- %s (%d generated vs %d validation images, %.1f s)%s",
             s.step, _fmt(fid, 3), "" if result["fid_meaningful"] else " (not meaningful)", _fmt(kid_mean, 5),
             _fmt(kid_std, 5), result["n_generated"], result["n_real"], seconds, f"; {note}" if note else "")
    if metrics:
        metrics.write(metrics_row("val", s.step, s.progress.epoch, fid=fid, kid_mean=kid_mean, kid_std=kid_std,
                                  n_generated=result["n_generated"], n_real=result["n_real"],
                                  fid_meaningful=result["fid_meaningful"], note=note,
                                  seconds=round(seconds, 2)))
    yield ev.EvalResult(s.step, s.progress.epoch, fid, kid_mean, kid_std, result["n_generated"], result["n_real"],
                        result["fid_meaningful"], note)
    yield ev.Status("training", "training")
