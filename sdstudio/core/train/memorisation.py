"""The memorisation and collapse alarm during a run (``eval.memorisation``; the numbers themselves are
``core/metrics/memorisation.py``).

- **When:** at every sample grid, from the grid's own images (prompts x ``sample.seeds``): no extra sampling.
- **Features:** ``eval.memorisation_features`` (pixels, the FID Inception of ``eval.inception_weights``, or a CLIP
  vision model of ``eval.memorisation_clip_model``). A model that is set but cannot be read fails the run
  before training, as a bad Inception file does.
- **Training images:** up to ``eval.memorisation_max_images`` of them (evenly spaced), at the training
  resolution without augmentation; their features are computed at the first grid and cached in the run folder
  (``memorisation-features.npz``, keyed by the feature kind and the images' names, sizes and times), so a
  resume does not compute them again.
- **Alarm:** each problem said once per run with the step it began (a Warning event, run.log, an ``event`` row
  ``memorisation`` / ``collapse`` in metrics.jsonl); on resume the earlier rows rebuild its state.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import RunConfig
from ..data.dataset import ImageCaptionDataset
from ..errors import UserError
from ..metrics import FidEvaluator
from ..metrics.memorisation import MemorisationAlarm, TrainingReference, measure, pixel_features
from ..runs import RunFolder

if TYPE_CHECKING:
    from .session import TrainingSession

log = logging.getLogger("sdstudio")


def feature_kind(cfg: Any) -> str:
    """The features ``eval.memorisation_features`` resolves to (``cfg``: the eval section)."""
    if cfg.memorisation_features != "auto":
        return str(cfg.memorisation_features)
    if cfg.memorisation_clip_model:
        return "clip"
    return "inception" if cfg.inception_weights else "pixels"


class RunMemorisation:
    """The alarm's state for one run; ``inception``: the run's FID network when it has one (shared)."""

    def __init__(self, config: RunConfig, *, is_main: bool, inception: Any = None) -> None:
        self.cfg = config.eval
        self.enabled = self.cfg.memorisation
        self.kind = feature_kind(self.cfg)
        self.alarm = MemorisationAlarm(self.cfg.memorisation_threshold, self.cfg.collapse_fraction)
        self._reference: TrainingReference | None = None
        self._extract: Any = None
        self._inception = inception
        if not self.enabled:
            return
        if not is_main:
            return
        if self.kind == "clip":
            from ..metrics.clip_features import ClipFeatures

            self._extract = ClipFeatures(self.cfg.memorisation_clip_model, batch_size=self.cfg.batch_size).features
        elif self.kind == "pixels":
            self._extract = pixel_features

    def features(self, s: TrainingSession, images: np.ndarray) -> np.ndarray:
        if self._extract is None:  # the Inception moves to the session's device when first used
            net = self._inception if self._inception is not None else s.evaluation.inception
            self._extract = FidEvaluator(net, device=s.device, batch_size=self.cfg.batch_size).features
        return np.asarray(self._extract(images))

    def replay(self, rows: list[dict[str, Any]]) -> None:
        """Resume: the alarm's state from the rows kept in metrics.jsonl."""
        self.alarm.replay(rows)

    # -- the training images' reference ----------------------------------------------------------------------
    def _chosen(self, records: list[Any]) -> list[int]:
        n = len(records)
        if n <= self.cfg.memorisation_max_images:
            return list(range(n))
        return sorted(set(np.linspace(0, n - 1, self.cfg.memorisation_max_images).astype(int).tolist()))

    def _cache_key(self, s: TrainingSession, records: list[Any], chosen: list[int]) -> str:
        parts: list[Any] = [self.kind, self.cfg.memorisation_clip_model, self.cfg.inception_weights,
                            s.config.data.resolution]
        for i in chosen:
            path = Path(records[i].path)
            try:
                stat = path.stat()
                parts.append([str(path), stat.st_size, stat.st_mtime_ns])
            except OSError:
                parts.append([str(path)])
        return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()

    def reference(self, s: TrainingSession) -> TrainingReference:
        if self._reference is not None:
            return self._reference
        records = list(s.batches.data.train)
        chosen = self._chosen(records)
        key = self._cache_key(s, records, chosen)
        cache = RunFolder(s.run_dir).memorisation_features_file if s.run_dir is not None else None
        feats = _read_cache(cache, key)
        if feats is None:
            data = ImageCaptionDataset(records, s.config, train=False)
            batch = max(1, self.cfg.batch_size)
            parts = []
            for start in range(0, len(chosen), batch):
                arrays = [data.prepared(i, None).array for i in chosen[start:start + batch]]
                parts.append(self.features(s, np.stack(arrays)))
            feats = np.concatenate(parts, axis=0)
            if cache is not None:
                _write_cache(cache, key, feats, self.kind)
        self._reference = TrainingReference.from_features(feats)
        self.alarm.train_diversity = self._reference.diversity
        return self._reference

    # -- one sample point ----------------------------------------------------------------------------------
    def observe(self, s: TrainingSession, images: np.ndarray | None, prompts: int,
                step: int) -> tuple[dict[str, Any], list[str]]:
        """The numbers of this grid (metrics.jsonl keys) and the warnings new at this step."""
        if not self.enabled or images is None or not len(images) or len(s.batches.data.train) < 2:
            return {}, []
        reference = self.reference(s)
        numbers = measure(self.features(s, images), prompts, reference,
                          copy_threshold=self.cfg.memorisation_threshold)
        return numbers, self.alarm.observe(step, numbers)


def _read_cache(path: Path | None, key: str) -> np.ndarray | None:
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) != key:
                return None
            return np.asarray(data["features"])
    except (OSError, KeyError, ValueError) as exc:
        log.warning("memorisation: the cached training features %s are unreadable (%s); computing them again",
                    path, exc)
        return None


def _write_cache(path: Path, key: str, features: np.ndarray, kind: str) -> None:
    from ..atomic import write_file_atomic

    def fill(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, key=np.array(key), kind=np.array(kind), features=features.astype(np.float32))

    try:
        write_file_atomic(path, fill)
    except OSError as exc:
        log.warning("memorisation: could not cache the training features in %s: %s", path, exc)


def run_reference(run_dir: Path, config: RunConfig, *, device: str = "cpu") -> tuple[TrainingReference, Any] | None:
    """The cached training features of a finished run and a function giving the same kind of features for new
    images (the checkpoint grid's memorisation score); None when the run has no cache (memorisation off, or
    no sample grid yet) or its features cannot be made again (a CLIP / Inception file gone)."""
    path = RunFolder(run_dir).memorisation_features_file
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            feats, kind = np.asarray(data["features"]), str(data["kind"])
        if kind == "pixels":
            extract: Any = pixel_features
        elif kind == "clip":
            from ..metrics.clip_features import ClipFeatures

            extract = ClipFeatures(config.eval.memorisation_clip_model, device=device).features
        else:
            from .evaluation import load_checked_inception

            net = load_checked_inception(config.eval.inception_weights)
            extract = FidEvaluator(net, device=device, batch_size=config.eval.batch_size).features
    except (OSError, KeyError, ValueError, UserError) as exc:
        log.warning("memorisation: no score for the grid (%s)", exc)
        return None
    return TrainingReference.from_features(feats), extract
