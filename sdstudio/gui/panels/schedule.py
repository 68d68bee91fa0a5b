"""The forward diffusion made visible: one dataset image noised at chosen timesteps with the current
schedule, the schedule's alpha-bar and SNR curves, how often training draws each timestep
(loss.timestep_*), and the learning rate over the run (train.lr_scheduler). Updates when the settings change."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyqtgraph as pg
import torch
from PIL import Image, ImageOps
from PySide6.QtCore import QRect, Qt, QTimer
from PySide6.QtGui import QColor, QImage, QPainter
from PySide6.QtWidgets import QHBoxLayout, QLabel, QLineEdit, QVBoxLayout, QWidget

from sdstudio.core.config import DiffusionConfig, LossConfig, TrainConfig
from sdstudio.core.data.images import load_image_rgb
from sdstudio.core.diffusion import snr_curve, training_scheduler
from sdstudio.core.errors import UserError
from sdstudio.core.timesteps import density
from sdstudio.core.train.optim import LRSchedule
from sdstudio.core.train.recipe import read_schedule_snapshot

from ..widgets.image_view import ImageView, array_to_qimage

FRACTIONS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
TILE = 128
LABEL_H = 36


def default_timesteps(num_timesteps: int) -> list[int]:
    return sorted({round(f * (num_timesteps - 1)) for f in FRACTIONS})


def parse_timesteps(text: str, num_timesteps: int) -> tuple[list[int], str]:
    """Timesteps from 'auto' or '0, 250, 999'; out-of-range values are clipped with a note."""
    if not text.strip() or text.strip().lower() == "auto":
        return default_timesteps(num_timesteps), ""
    try:
        values = [int(float(part)) for part in text.replace(";", ",").split(",") if part.strip()]
    except ValueError:
        return default_timesteps(num_timesteps), f"{text!r}: write timesteps separated by commas, e.g. 0, 250, 999"
    clipped = sorted({min(max(v, 0), num_timesteps - 1) for v in values})
    note = "" if clipped == sorted(set(values)) else f"timesteps clipped to 0…{num_timesteps - 1}"
    return clipped or default_timesteps(num_timesteps), note


def prepare_image(path: Path, resolution: int) -> np.ndarray:
    """The image as the model sees it: centre-cropped square at the training resolution (at most 256 px)."""
    side = max(8, min(resolution, 256))
    img = load_image_rgb(path)
    img = ImageOps.fit(img, (side, side), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def noised_tiles(image: np.ndarray, config: DiffusionConfig, timesteps: list[int], seed: int = 0) -> list[np.ndarray]:
    """``image`` noised at each timestep with the config's training schedule (same noise for all)."""
    sched = training_scheduler(config, pixel_space=True)
    x = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float().div(127.5).sub(1.0)[None]
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    batch = x.expand(len(timesteps), -1, -1, -1)
    noisy = sched.add_noise(batch, noise.expand_as(batch), torch.tensor(timesteps, dtype=torch.long))
    out = noisy.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [np.ascontiguousarray(tile) for tile in out]


def schedule_curves(config: DiffusionConfig) -> tuple[np.ndarray, np.ndarray]:
    """(alpha-bar, log10 SNR) per timestep."""
    sched = training_scheduler(config, pixel_space=True)
    alpha_bar = sched.alphas_cumprod.double().numpy()
    snr = snr_curve(sched).numpy()
    return alpha_bar, np.log10(np.clip(snr, 1e-12, None))


def timestep_frequencies(loss: LossConfig, diffusion: DiffusionConfig, bins: int = 100) -> tuple[np.ndarray,
                                                                                              np.ndarray]:
    """(timestep at each bin's centre, share of training draws per bin) for loss.timestep_* within
    [timestep_min, timestep_max): what training draws, estimated from seeded samples."""
    t_max = loss.timestep_max or diffusion.num_timesteps
    t_min = min(loss.timestep_min, t_max - 1)
    bins = max(1, min(bins, t_max - t_min))
    shares = density(loss.timestep_distribution, bins=bins, logit_mean=loss.timestep_logit_mean,
                     logit_std=loss.timestep_logit_std, mode_scale=loss.timestep_mode_scale,
                     shift=loss.timestep_shift).numpy()
    centres = t_min + (np.arange(bins) + 0.5) * (t_max - t_min) / bins
    return centres, shares


def planned_steps(train: TrainConfig, images_per_epoch: int | None) -> tuple[int, str]:
    """The run's optimizer steps (train.max_steps, or the epochs over the dataset) and a note when guessed."""
    if train.max_steps:
        return train.max_steps, ""
    per_step = train.batch_size * train.gradient_accumulation
    if images_per_epoch:
        return max(1, train.epochs * max(1, images_per_epoch // per_step)), ""
    return max(1, train.epochs * 100), "steps guessed (100 per epoch) until a dataset is open"


def lr_curve(train: TrainConfig, total_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(step 1..total, learning rate at that step) from train.lr_scheduler, as training applies it (the
    reduce_on_plateau drops depend on validations and are not shown)."""
    factors = np.asarray(LRSchedule(train, total_steps).curve(), dtype=np.float64)
    return np.arange(1, len(factors) + 1, dtype=np.float64), factors * train.learning_rate


def tile_strip(tiles: list[np.ndarray], labels: list[str]) -> QImage:
    """Tiles side by side, upscaled without blur, each with its label underneath."""
    gap = 6
    strip = QImage(len(tiles) * (TILE + gap) - gap, TILE + LABEL_H, QImage.Format.Format_RGB32)
    strip.fill(QColor("white"))
    painter = QPainter(strip)
    painter.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, False)
    for i, (tile, label) in enumerate(zip(tiles, labels, strict=True)):
        x = i * (TILE + gap)
        painter.drawImage(QRect(x, 0, TILE, TILE), array_to_qimage(tile))
        painter.setPen(QColor("#333"))
        painter.drawText(QRect(x, TILE, TILE, LABEL_H), Qt.AlignmentFlag.AlignCenter, label)
    painter.end()
    return strip


class SchedulePanel(QWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._config = DiffusionConfig()
        self._loss = LossConfig()
        self._train = TrainConfig()
        self._images_per_epoch: int | None = None
        self._resolution = 32
        self._image_path: Path | None = None
        self._key: tuple[object, ...] | None = None
        self.timesteps = QLineEdit("auto")
        self.timesteps.setToolTip("Timesteps to show, separated by commas (auto: evenly from 0 to the last)")
        self.timesteps.textChanged.connect(self.schedule_update)
        self.note = QLabel("")
        self.strip = ImageView(placeholder="Open a dataset to see one of its images noised.")
        self.strip.setMinimumHeight(TILE + LABEL_H)
        self.curves = pg.GraphicsLayoutWidget()
        self.alpha_plot = self.curves.addPlot(row=0, col=0, title="ᾱ (signal kept) per timestep")
        self.snr_plot = self.curves.addPlot(row=0, col=1, title="log₁₀ SNR per timestep")
        for plot in (self.alpha_plot, self.snr_plot):
            plot.showGrid(x=True, y=True, alpha=0.25)
            plot.setLabel("bottom", "timestep")
        self.timestep_plot = self.curves.addPlot(row=1, col=0, title="training timesteps drawn (share)")
        self.lr_plot = self.curves.addPlot(row=1, col=1, title="learning rate per step")
        self.timestep_plot.setLabel("bottom", "timestep")
        self.lr_plot.setLabel("bottom", "step")
        for plot in (self.alpha_plot, self.snr_plot, self.timestep_plot, self.lr_plot):
            plot.showGrid(x=True, y=True, alpha=0.25)
        self.alpha_curve = self.alpha_plot.plot(pen=pg.mkPen((25, 85, 190), width=2))
        self.snr_curve = self.snr_plot.plot(pen=pg.mkPen((220, 90, 20), width=2))
        self.timestep_curve = self.timestep_plot.plot(pen=pg.mkPen((40, 150, 70), width=2))
        self.lr_curve = self.lr_plot.plot(pen=pg.mkPen((150, 60, 170), width=2))
        self.lr_note = ""
        # diffusion.learned_schedule: the curve a run has learned so far, over the configured one
        self.learned_alpha = self.alpha_plot.plot(pen=pg.mkPen((200, 30, 30), width=2, style=Qt.PenStyle.DashLine))
        self.learned_snr = self.snr_plot.plot(pen=pg.mkPen((200, 30, 30), width=2, style=Qt.PenStyle.DashLine))
        self.learned_step: int | None = None
        self.learned_run: Path | None = None  # the past run whose curve is shown (None: the live run's or none)
        self.summary = QLabel("")
        self.summary.setWordWrap(True)
        row = QHBoxLayout()
        row.addWidget(QLabel("Timesteps:"))
        row.addWidget(self.timesteps, 1)
        row.addWidget(self.note)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(QLabel("<b>Forward diffusion</b>: what the model is shown at each timestep "
                                "(the reverse shows in the samples)"))
        layout.addLayout(row)
        layout.addWidget(self.strip, 2)
        layout.addWidget(self.summary)
        layout.addWidget(self.curves, 3)
        self._debounce = QTimer(self)
        self._debounce.setSingleShot(True)
        self._debounce.setInterval(150)
        self._debounce.timeout.connect(self.update_now)

    def set_inputs(self, config: DiffusionConfig | None = None, *, resolution: int | None = None,
                   image: Path | None = None, loss: LossConfig | None = None, train: TrainConfig | None = None,
                   images_per_epoch: int | None = None) -> None:
        if config is not None:
            self._config = config
        if loss is not None:
            self._loss = loss
        if train is not None:
            self._train = train
        if images_per_epoch is not None:
            self._images_per_epoch = images_per_epoch
        if resolution is not None:
            self._resolution = resolution
        if image is not None:
            self._image_path = image
        self.schedule_update()

    def show_learned(self, step: int, timesteps: list[int], log10_snr: list[float]) -> None:
        """A run's learned schedule (dashed, red) over the configured one; called at each logged step."""
        t = np.asarray(timesteps, dtype=np.float64)
        log_snr = np.asarray(log10_snr, dtype=np.float64)
        self.learned_step = step
        self.learned_run = None
        self.learned_snr.setData(t, log_snr)
        self.learned_alpha.setData(t, 1.0 / (1.0 + np.power(10.0, -log_snr)))
        self.snr_plot.setTitle(f"log₁₀ SNR per timestep (dashed: learned, step {step})")
        self.alpha_plot.setTitle(f"ᾱ (signal kept) per timestep (dashed: learned, step {step})")

    def show_run_schedule(self, run_dir: Path | None) -> None:
        """The learned schedule of a run selected in the Runs tab (its noise_schedule.json), until the live run
        sends its own; a run without one clears a past run's curve (never the live run's)."""
        snapshot = read_schedule_snapshot(run_dir) if run_dir is not None else None
        if snapshot is None:
            if self.learned_run is not None:
                self.clear_learned()
            return
        self.show_learned(snapshot.step, snapshot.timesteps, snapshot.log10_snr)
        self.learned_run = Path(run_dir)
        name = Path(run_dir).name
        self.snr_plot.setTitle(f"log₁₀ SNR (dashed: learned by {name}, step {snapshot.step})")  # short: the plot is narrow
        self.alpha_plot.setTitle(f"ᾱ (dashed: learned by {name}, step {snapshot.step})")

    def clear_learned(self) -> None:
        self.learned_run = None
        self.learned_step = None
        self.learned_snr.setData([], [])
        self.learned_alpha.setData([], [])
        self.snr_plot.setTitle("log₁₀ SNR per timestep")
        self.alpha_plot.setTitle("ᾱ (signal kept) per timestep")

    def schedule_update(self) -> None:
        self._debounce.start()

    def update_now(self) -> None:
        cfg = self._config
        timesteps, note = parse_timesteps(self.timesteps.text(), cfg.num_timesteps)
        key = (cfg.model_dump_json(), self._loss.model_dump_json(), self._train.model_dump_json(),
               self._images_per_epoch, self._resolution, self._image_path, tuple(timesteps))
        if key == self._key:
            return
        self._key = key
        self.note.setText(note)
        self.timestep_curve.setData(*timestep_frequencies(self._loss, cfg))
        total, self.lr_note = planned_steps(self._train, self._images_per_epoch)
        self.lr_curve.setData(*lr_curve(self._train, total))
        self.lr_plot.setTitle(f"learning rate per step ({self._train.lr_scheduler}"
                              f"{'; ' + self.lr_note if self.lr_note else ''})")
        alpha_bar, log_snr = schedule_curves(cfg)
        steps = np.arange(len(alpha_bar), dtype=np.float64)
        self.alpha_curve.setData(steps, alpha_bar)
        self.snr_curve.setData(steps, log_snr)
        last = alpha_bar[-1]
        self.summary.setText(f"{cfg.schedule} schedule, {cfg.num_timesteps} steps, {cfg.prediction_type} "
                             f"prediction{', zero terminal SNR' if cfg.zero_terminal_snr else ''}: ᾱ at the last "
                             f"step = {last:.2e} (SNR {last / max(1 - last, 1e-12):.2e}); half the signal is "
                             f"gone by t = {int(np.argmax(alpha_bar < 0.5))}.")
        if self._image_path is None:
            return
        try:
            image = prepare_image(self._image_path, self._resolution)
        except (UserError, OSError, ValueError) as exc:
            self.strip.set_image(None)
            self.strip.set_placeholder(f"Cannot show {self._image_path.name}: {exc}")
            return
        tiles = noised_tiles(image, cfg, timesteps)
        labels = [f"t = {t}\nᾱ = {alpha_bar[t]:.2f}" if not math.isnan(alpha_bar[t]) else f"t = {t}"
                  for t in timesteps]
        self.strip.set_image(tile_strip(tiles, labels))
