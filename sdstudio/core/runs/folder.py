"""A run folder as one object: where each of its files lies (contract.md "Run directory"), its checkpoints
(the newest valid, the best by validation loss), samples, metrics, lock, log and config snapshot.

Everything that reads or writes a run (the loop, exports, sampling, sweeps, the CLI and the app) asks a
``RunFolder`` rather than spelling the layout out."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from .. import paths
from ..atomic import write_text_atomic
from ..config import RunConfig
from ..errors import CheckpointError, RunDirError
from ..presets import config_to_toml, load_config_file
from .checkpoints import (
    CheckpointInfo,
    checkpoint_name,
    is_checkpoint_dir,
    list_checkpoints,
    newest_valid_checkpoint,
    verify_checkpoint,
)
from .lock import LOCK_FILE, RunLock, held_by_live_process
from .metrics import RunCurves, curves_from_rows, read_metrics, truncate_metrics_after

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
LOG_FILE = "run.log"
CHECKPOINTS_DIR = "checkpoints"
SAMPLES_DIR = "samples"
EXPORTS_DIR = "exports"
BEST_FILE = "best.json"  # in checkpoints/: {"step", "checkpoint", "val_loss"} of the best by validation loss
CARD_FILE = "run-card.json"  # written at the start: config, dataset manifest, versions, device (card.py)
IMAGE_LOSS_FILE = "image_loss.json"  # per-image loss (core/train/image_loss.py)
MEMORISATION_FEATURES_FILE = "memorisation-features.npz"  # training images' features (core/train/memorisation.py)


class RunFolder:
    """One run's folder. Cheap to make (nothing is read until asked); ``path`` need not exist yet."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunFolder) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    # -- where things lie ---------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def log_file(self) -> Path:
        return self.path / LOG_FILE

    @property
    def lock_file(self) -> Path:
        return self.path / LOCK_FILE

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    @property
    def samples_dir(self) -> Path:
        return self.path / SAMPLES_DIR

    @property
    def exports_dir(self) -> Path:
        return self.path / EXPORTS_DIR

    @property
    def best_file(self) -> Path:
        return self.checkpoints_dir / BEST_FILE

    @property
    def card_file(self) -> Path:
        return self.path / CARD_FILE

    @property
    def image_loss_file(self) -> Path:
        return self.path / IMAGE_LOSS_FILE

    @property
    def memorisation_features_file(self) -> Path:
        return self.path / MEMORISATION_FEATURES_FILE

    def checkpoint_dir(self, step: int) -> Path:
        """``checkpoints/step-00000120`` (whether or not it exists)."""
        return self.checkpoints_dir / checkpoint_name(step)

    def sample_grid(self, step: int) -> Path:
        """``samples/step-00000120.png``; its prompts and seeds lie next to it in ``.json``."""
        return self.samples_dir / f"{checkpoint_name(step)}.png"

    def sample_grids(self) -> list[Path]:
        """The sample grids written so far, oldest first."""
        return sorted(self.samples_dir.glob("step-*.png"))

    def export_path(self, name: str, tag: str, fmt: str, suffix: str) -> Path:
        """``exports/<name>-<tag>-<format><suffix>`` (the suffix is the format table's: empty for a folder)."""
        return self.exports_dir / f"{name}-{tag}-{fmt}{suffix}"

    # -- the folder itself --------------------------------------------------------------------------------
    def is_run(self) -> bool:
        return self.config_file.is_file()

    def create(self) -> RunFolder:
        """Create a fresh run folder; an existing non-empty folder is refused (a run is continued with resume instead)."""
        if self.path.exists() and any(self.path.iterdir()):
            hint = " (it is a run: continue it with `resume`)" if self.is_run() else ""
            raise RunDirError(f"{self.path}: folder exists and is not empty{hint}; choose another `out`")
        try:
            for folder in (self.path, self.samples_dir, self.checkpoints_dir, self.exports_dir):
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(f"{self.path}: cannot create the run folder ({exc.strerror}); choose another `out`") \
                from None
        return self

    def save_config(self, config: RunConfig) -> None:
        write_text_atomic(self.config_file, config_to_toml(config))

    def load_config(self) -> RunConfig:
        if not self.is_run():
            raise RunDirError(f"{self.path}: not an sdstudio run folder (no {CONFIG_FILE})")
        return load_config_file(self.config_file)

    def lock(self) -> RunLock:
        return RunLock(self.path)

    def is_locked_by_live_process(self) -> bool:
        """A lock file whose writer still runs (a crashed run leaves a stale lock: that run is interrupted)."""
        return held_by_live_process(self.lock_file)

    # -- checkpoints ----------------------------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        """The run's complete checkpoints (with a manifest; not yet verified), oldest first."""
        return [p for p in list_checkpoints(self.checkpoints_dir) if is_checkpoint_dir(p)]

    def has_checkpoint(self) -> bool:
        return bool(self.checkpoints())

    def newest_valid_checkpoint(self, warn: Callable[[str], None] | None = None) -> CheckpointInfo:
        """The newest checkpoint that verifies (corrupt newer ones are reported through ``warn``); raises
        CheckpointError when there is none."""
        return newest_valid_checkpoint(self.checkpoints_dir, warn)

    def newest_valid_checkpoint_or_none(self) -> Path | None:
        """The folder of the newest valid checkpoint, or None (what a failure report offers to resume from)."""
        try:
            return self.newest_valid_checkpoint().path
        except CheckpointError:
            return None

    def best_checkpoint(self) -> Path | None:
        """The checkpoint marked best by validation loss (checkpoints/best.json), if it still exists."""
        try:
            data = json.loads(self.best_file.read_text(encoding="utf-8"))
            path = self.checkpoints_dir / str(data["checkpoint"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return path if path.is_dir() else None

    def mark_best(self, step: int, val_loss: float) -> None:
        """Record the checkpoint of ``step`` as the best by validation loss (kept whatever keep_last says)."""
        write_text_atomic(self.best_file, json.dumps(
            {"step": step, "checkpoint": checkpoint_name(step), "val_loss": val_loss}))

    # -- run card, per-image loss ---------------------------------------------------------------------------
    def write_card(self, card: dict[str, Any]) -> None:
        write_text_atomic(self.card_file, json.dumps(card, indent=1, sort_keys=True))

    def read_card(self) -> dict[str, Any]:
        from .card import read_card

        return read_card(self.card_file)

    def read_image_loss(self) -> dict[str, Any] | None:
        """image_loss.json as written (``{"images": {...}, "outliers": [...]}``), or None when absent/unreadable."""
        try:
            data = json.loads(self.image_loss_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and isinstance(data.get("images"), dict) else None

    # -- metrics --------------------------------------------------------------------------------------------
    def metrics_rows(self) -> list[dict[str, Any]]:
        return read_metrics(self.metrics_file)

    def curves(self) -> RunCurves:
        return curves_from_rows(self.metrics_rows())

    def truncate_metrics_after(self, step: int) -> None:
        truncate_metrics_after(self.metrics_file, step)

    def open_log(self) -> logging.Handler:
        return open_run_log(self.path)


# -- a run or a checkpoint --------------------------------------------------------------------------------
def run_of_checkpoint(checkpoint: Path) -> RunFolder | None:
    """The run a checkpoint folder belongs to (``RUN/checkpoints/step-N``); None for one standing alone."""
    return RunFolder(checkpoint.parent.parent) if checkpoint.parent.name == CHECKPOINTS_DIR else None


def resolve_checkpoint(run_or_checkpoint: Path, checkpoint: Path | None = None, *, best: bool = False) -> Path:
    """A checkpoint folder: the one given, the best by validation loss, or the newest valid one of a run."""
    if checkpoint is not None:
        return verify_checkpoint(checkpoint).path
    run = RunFolder(run_or_checkpoint)
    if best:
        found = run.best_checkpoint() if run.is_run() else None
        if found is None:
            raise CheckpointError(f"{run_or_checkpoint}: no checkpoint marked best (the run needs validation "
                                  "and checkpoint.keep_best or early stopping)")
        return verify_checkpoint(found).path
    if is_checkpoint_dir(run_or_checkpoint):  # a checkpoint folder (it has a config.toml too)
        return verify_checkpoint(run_or_checkpoint).path
    if run.is_run():
        return run.newest_valid_checkpoint().path
    raise CheckpointError(f"{run_or_checkpoint}: neither a run folder nor an sdstudio checkpoint folder")


# -- runs in general --------------------------------------------------------------------------------------
def default_run_dir(preset: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = paths.runs_dir() / f"{stamp}-{preset or 'custom'}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def is_run_dir(path: Path) -> bool:
    return RunFolder(path).is_run()


def prepare_new_run_dir(path: Path) -> Path:
    """Create a fresh run folder; an existing non-empty folder is refused (a run is continued with resume instead)."""
    return RunFolder(path).create().path


def save_run_config(run_dir: Path, config: RunConfig) -> None:
    RunFolder(run_dir).save_config(config)


def load_run_config(run_dir: Path) -> RunConfig:
    return RunFolder(run_dir).load_config()


def list_runs(root: Path | None = None) -> list[Path]:
    root = root or paths.runs_dir()
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and is_run_dir(p)), reverse=True)


def open_run_log(run_dir: Path) -> logging.Handler:
    """Attach a file handler for the ``sdstudio`` logger writing run.log; the caller removes it."""
    handler = logging.FileHandler(run_dir / LOG_FILE, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.setLevel(logging.INFO)
    logger = logging.getLogger("sdstudio")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return handler


def close_run_log(handler: logging.Handler) -> None:
    logging.getLogger("sdstudio").removeHandler(handler)
    handler.close()
