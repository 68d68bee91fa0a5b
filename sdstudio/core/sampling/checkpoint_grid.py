"""Pick the best checkpoint: every (or every N-th) saved checkpoint of a run sampled with the same prompts and
seeds, one column per checkpoint, labelled with the step and the validation loss / KID the run measured there.

``sdstudio grid`` and the app's checkpoint grid view both call ``checkpoint_grid``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError
from ..metrics.memorisation import measure
from ..runs import RunFolder
from ..runs.checkpoints import verify_checkpoint
from ..train.memorisation import run_reference
from .from_run import load_trained

MIN_CELL = 96  # small images (a 16 px test model) are scaled up so the labels stay readable
LABEL_LINE = 14


@dataclass
class GridColumn:
    step: int
    checkpoint: Path
    val_loss: float | None = None
    kid: float | None = None
    fid: float | None = None
    memo_ratio: float | None = None  # distance to the nearest training image / the training set's own (0 = copy)
    diversity: float | None = None  # across seeds, per prompt

    def label(self) -> list[str]:
        lines = [f"step {self.step}"]
        if self.val_loss is not None:
            lines.append(f"val {self.val_loss:.4f}")
        if self.kid is not None:
            lines.append(f"KID {self.kid:.4f}")
        if self.memo_ratio is not None:
            lines.append(f"memo {self.memo_ratio:.2f}" + (" COPY" if self.copying else ""))
        return lines

    copy_threshold: float = 0.3

    @property
    def copying(self) -> bool:
        return self.memo_ratio is not None and self.memo_ratio < self.copy_threshold


@dataclass
class CheckpointGrid:
    """``images[column][row]``: uint8 HxWx3; rows are (prompt, seed) pairs, prompt-major."""

    columns: list[GridColumn]
    rows: list[tuple[str, int]]
    images: list[np.ndarray] = field(default_factory=list)  # one (rows, H, W, 3) array per column

    def column_images(self, index: int) -> np.ndarray:
        return self.images[index]

    def render(self) -> np.ndarray:
        """The labelled grid as one uint8 image (column headers: step, val loss, KID; row labels: prompt, seed)."""
        return render_grid(self)


def grid_checkpoints(run: Path, every: int = 1) -> list[Path]:
    """The run's checkpoints to show: every ``every``-th counting from the newest backwards (so the newest is
    always in), oldest first."""
    if every < 1:
        raise CheckpointError(f"every: {every} is not a positive number of checkpoints")
    folder = RunFolder(run)
    if not folder.is_run():
        raise CheckpointError(f"{run}: not an sdstudio run folder")
    found = folder.checkpoints()
    if not found:
        raise CheckpointError(f"{run}: the run has no saved checkpoint yet")
    return list(reversed(list(reversed(found))[::every]))


def _step_metrics(folder: RunFolder) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for row in folder.metrics_rows():
        if row.get("kind") != "val" or not isinstance(row.get("step"), int):
            continue
        entry = out.setdefault(int(row["step"]), {})
        for key in ("val_loss", "kid_mean", "fid"):
            value = row.get(key)
            if isinstance(value, (int, float)):
                entry[key] = float(value)
    return out


def checkpoint_grid(run: Path, prompts: Sequence[str], *, seeds: Sequence[int] = (0,), every: int = 1,
                    steps: int | None = None, guidance: float | None = None, use_ema: bool = True,
                    device: str = "auto", progress: Callable[[int, int], None] | None = None,
                    cancelled: Callable[[], bool] | None = None) -> CheckpointGrid:
    """Sample every ``every``-th checkpoint of ``run`` with each prompt at each seed (the same noise for every
    column, so columns differ only by the weights)."""
    if not prompts:
        raise CheckpointError("the checkpoint grid needs at least one prompt")
    folder = RunFolder(run)
    checkpoints = grid_checkpoints(run, every)
    metrics = _step_metrics(folder)
    config = folder.load_config()
    reference = run_reference(folder.path, config) if config.eval.memorisation else None
    rows = [(p, int(s)) for p in prompts for s in seeds]
    grid = CheckpointGrid([], rows)
    for i, path in enumerate(checkpoints):
        if cancelled is not None and cancelled():
            break
        info = verify_checkpoint(path, deep=False)  # load_trained verifies the hashes
        loaded = load_trained(path, use_ema=use_ema, device=device)
        images = loaded.generate(list(prompts), list(seeds), steps=steps, guidance=guidance)
        m = metrics.get(info.step, {})
        column = GridColumn(info.step, path, m.get("val_loss"), m.get("kid_mean"), m.get("fid"),
                            copy_threshold=config.eval.memorisation_threshold)
        if reference is not None:  # the same measure as the run's alarm, on this column's images
            numbers = measure(reference[1](images), len(prompts), reference[0],
                              copy_threshold=config.eval.memorisation_threshold)
            column.memo_ratio, column.diversity = numbers["memo_ratio"], numbers["diversity"]
        grid.columns.append(column)
        grid.images.append(images)
        del loaded
        if progress is not None:
            progress(i + 1, len(checkpoints))
    return grid


def render_grid(grid: CheckpointGrid) -> np.ndarray:
    from PIL import Image, ImageDraw

    if not grid.images:
        raise CheckpointError("the grid has no column to draw")
    h, w = grid.images[0].shape[1:3]
    scale = max(1, -(-MIN_CELL // max(h, w)))
    ch, cw = h * scale, w * scale
    pad = 4
    header = LABEL_LINE * max(3, max(len(c.label()) for c in grid.columns)) + pad
    left = 160
    width = left + len(grid.columns) * (cw + pad) + pad
    height = header + len(grid.rows) * (ch + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for c, column in enumerate(grid.columns):
        x = left + pad + c * (cw + pad)
        for k, line in enumerate(column.label()):
            draw.text((x, pad + k * LABEL_LINE), line, fill="black")
        for r in range(len(grid.rows)):
            cell = Image.fromarray(grid.images[c][r]).resize((cw, ch), Image.NEAREST)
            canvas.paste(cell, (x, header + r * (ch + pad)))
    for r, (prompt, seed) in enumerate(grid.rows):
        y = header + r * (ch + pad)
        text = prompt if len(prompt) <= 24 else prompt[:23] + "…"
        draw.text((pad, y), text, fill="black")
        draw.text((pad, y + LABEL_LINE), f"seed {seed}", fill="gray")
    return np.asarray(canvas)


def column_summary(grid: CheckpointGrid) -> list[dict[str, Any]]:
    """One dict per column (step, checkpoint, val_loss, kid, fid, memo_ratio, diversity, copying): what the CLI prints and the app lists."""
    return [{"step": c.step, "checkpoint": str(c.checkpoint), "val_loss": c.val_loss, "kid": c.kid, "fid": c.fid,
             "memo_ratio": c.memo_ratio, "diversity": c.diversity, "copying": c.copying} for c in grid.columns]
