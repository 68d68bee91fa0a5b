"""Weights & Biases logging of a run (``train.wandb``): the same metrics.jsonl rows TensorBoard gets, and the
sample grids, main process only. ``train.wandb_mode = "offline"`` (the default) writes W&B's files into
``RUN_DIR/wandb`` without any network (upload later with ``wandb sync RUN_DIR/wandb/offline-run-*``).
A resumed run continues the same W&B run (its id is kept in ``RUN_DIR/wandb/run-id``); rows of the steps after
the checkpoint are logged again (W&B keeps the last value of a repeated step)."""

from __future__ import annotations

import logging
import math
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np

from ..config import RunConfig
from ..errors import UserError

log = logging.getLogger("sdstudio")

WANDB_DIR = "wandb"
RUN_ID_FILE = "run-id"
INSTALL_HINT = "pip install 'sdstudio[wandb]'"
_TAGS: dict[str, dict[str, str]] = {
    "train": {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "img_per_s": "train/img_per_s"},
    "val": {"val_loss": "val/loss", "fid": "eval/fid", "kid_mean": "eval/kid_mean", "kid_std": "eval/kid_std"},
}


def require_wandb() -> None:
    try:
        import wandb  # noqa: F401
    except ImportError as exc:
        raise UserError(f"train.wandb = true needs the wandb package ({exc}); install it with {INSTALL_HINT}, or "
                        "set train.wandb = false") from None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class WandbLog:
    def __init__(self, config: RunConfig, run_dir: Path, *, resumed: bool) -> None:
        import wandb

        self.dir = run_dir / WANDB_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        id_file = self.dir / RUN_ID_FILE
        run_id = id_file.read_text(encoding="utf-8").strip() if resumed and id_file.is_file() else None
        if not run_id:
            run_id = secrets.token_hex(4)  # W&B ids: lower-case letters and digits
            id_file.write_text(run_id, encoding="utf-8")
        os.environ.setdefault("WANDB_SILENT", "true")
        self._run: Any = wandb.init(project=config.train.wandb_project, name=config.name or run_dir.name,
                                    id=run_id, resume="allow", dir=str(run_dir), mode=config.train.wandb_mode,
                                    config=config.to_dict(), reinit="finish_previous")
        self._wandb = wandb

    def row(self, row: dict[str, Any]) -> None:
        tags = _TAGS.get(str(row.get("kind")))
        step = row.get("step")
        if tags is None or not isinstance(step, int):
            return
        values = {tag: float(row[key]) for key, tag in tags.items() if _finite(row.get(key))}
        if values:
            self._guard(lambda: self._run.log(values, step=step))

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        self._guard(lambda: self._run.log({tag: self._wandb.Image(image)}, step=step))

    def _guard(self, fn: Any) -> None:
        if self._run is None:
            return
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - W&B is a mirror; metrics.jsonl has the numbers
            log.warning("W&B logging stopped: %s (metrics.jsonl is unaffected)", exc)
            self.close()

    def close(self) -> None:
        run, self._run = self._run, None
        if run is not None:
            try:
                run.finish()
            except Exception as exc:  # noqa: BLE001
                log.warning("could not finish the W&B run: %s", exc)


def open_wandb(config: RunConfig, run_dir: Path | None, *, is_main: bool, resumed: bool) -> WandbLog | None:
    if not config.train.wandb or run_dir is None or not is_main:
        return None
    require_wandb()
    try:
        return WandbLog(config, run_dir, resumed=resumed)
    except Exception as exc:  # noqa: BLE001 - a mirror that cannot start must not stop the training
        log.warning("W&B logging could not start (%s); training goes on, metrics.jsonl has every number", exc)
        return None


class Mirrors:
    """Several metric mirrors (TensorBoard, W&B) behind the one ``row`` / ``image`` / ``close`` the loop calls."""

    def __init__(self, *mirrors: Any) -> None:
        self.mirrors = [m for m in mirrors if m is not None]

    def row(self, row: dict[str, Any]) -> None:
        for m in self.mirrors:
            m.row(row)

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        for m in self.mirrors:
            m.image(tag, step, image)

    def close(self) -> None:
        for m in self.mirrors:
            m.close()


def with_wandb(tensorboard: Any, config: RunConfig, run_dir: Path | None, *, is_main: bool,
               resumed: bool) -> Any:
    """The loop's mirror: TensorBoard alone (or None) when W&B is off, else both."""
    wandb_log = open_wandb(config, run_dir, is_main=is_main, resumed=resumed)
    if wandb_log is None:
        return tensorboard
    return Mirrors(tensorboard, wandb_log)
