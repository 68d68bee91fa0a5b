"""TensorBoard event files of a run (``train.tensorboard``): ``RUN_DIR/tensorboard``, main process only.

The loop's metrics.jsonl rows are mirrored as scalars (``TensorBoardLog.row``), sample grids are added as
images (``TensorBoardLog.image``). A resumed run appends to the same folder with ``purge_step`` = the
checkpoint's step + 1: TensorBoard hides the events the interrupted session wrote after its checkpoint (the
same rows metrics.jsonl drops), so every series stays one curve without repeated steps.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError

log = logging.getLogger("sdstudio")

TENSORBOARD_DIR = "tensorboard"
INSTALL_HINT = "pip install 'sdstudio[tensorboard]'"
FLUSH_SECS = 15

# metrics.jsonl row kind -> {row key: TensorBoard tag}
_TAGS: dict[str, dict[str, str]] = {
    "train": {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
              "img_per_s": "train/img_per_s"},
    "val": {"val_loss": "val/loss", "fid": "eval/fid", "kid_mean": "eval/kid_mean",
            "kid_std": "eval/kid_std"},
}


def require_tensorboard() -> None:
    """Raise a UserError with the install command when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as exc:
        raise UserError(f"train.tensorboard = true needs the tensorboard package ({exc}); install it with "
                        f"{INSTALL_HINT}, or set train.tensorboard = false") from None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class TensorBoardLog:
    """A SummaryWriter on ``RUN_DIR/tensorboard``; writing problems are logged once, never fatal."""

    def __init__(self, run_dir: Path, *, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.dir = run_dir / TENSORBOARD_DIR
        self._writer: Any = SummaryWriter(log_dir=str(self.dir), purge_step=purge_step, flush_secs=FLUSH_SECS)

    def row(self, row: dict[str, Any]) -> None:
        """Mirror one metrics.jsonl row: train loss/lr/grad_norm/img_per_s, val loss and its timestep buckets
        (val/loss_t0 = the lowest timesteps), FID/KID; other kinds and non-finite values are skipped."""
        tags = _TAGS.get(str(row.get("kind")))
        step = row.get("step")
        if tags is None or not isinstance(step, int):
            return
        values = {tag: row[key] for key, tag in tags.items() if _finite(row.get(key))}
        buckets = row.get("val_buckets")
        if isinstance(buckets, list):
            values.update({f"val/loss_t{i}": v for i, v in enumerate(buckets) if _finite(v)})
        self._guard(lambda: [self._writer.add_scalar(tag, float(v), step) for tag, v in values.items()])

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        """An HxWx3 uint8 image (a sample grid)."""
        self._guard(lambda: self._writer.add_image(tag, image, step, dataformats="HWC"))

    def _guard(self, fn: Any) -> None:
        if self._writer is None:
            return
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - TensorBoard is a convenience; metrics.jsonl has the numbers
            log.warning("TensorBoard logging stopped: %s (metrics.jsonl is unaffected)", exc)
            self.close()

    def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception as exc:  # noqa: BLE001
                log.warning("could not close the TensorBoard writer: %s", exc)


def open_tensorboard(enabled: bool, run_dir: Path | None, *, is_main: bool,
                     resumed_step: int | None) -> TensorBoardLog | None:
    """The run's TensorBoardLog, or None (off, no run folder, or not the main process)."""
    if not enabled or run_dir is None or not is_main:
        return None
    return TensorBoardLog(run_dir, purge_step=None if resumed_step is None else resumed_step + 1)
