"""Live training curves. Event slots only append to numpy buffers; a ~10 Hz timer pushes the buffers to
pyqtgraph once per tick (peak downsampling, clip to view), so 100,000+ points stay smooth."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QCheckBox, QHBoxLayout, QLabel, QVBoxLayout, QWidget

from sdstudio.core import events as ev
from sdstudio.core.runs import SMOOTHING

from ..widgets.range_follow import RangeFollower
from ..widgets.series import Series, SmoothedSeries

pg.setConfigOptions(background="w", foreground="#333", antialias=False)
REDRAW_MS = 100
COLORS = {"raw": (150, 180, 230), "smooth": (25, 85, 190), "val": (220, 90, 20), "lr": (40, 140, 60),
          "grad": (140, 60, 160), "speed": (90, 90, 90),
          "memo": (200, 30, 60), "diversity": (20, 150, 150)}


def live_curve(plot: pg.PlotItem, color: tuple[int, int, int], *, width: float = 1, name: str | None = None,
               symbol: str | None = None) -> pg.PlotDataItem:
    """A curve set up for large, growing data: peak downsampling, clipped to the view, thin pen."""
    curve = plot.plot(pen=pg.mkPen(color=color, width=width), name=name, symbol=symbol, symbolSize=5,
                      symbolBrush=color if symbol else None, symbolPen=None)
    curve.setDownsampling(auto=True, method="peak")
    curve.setClipToView(True)
    return curve


class PlotsPanel(QWidget):
    """Loss (raw, smoothed, validation), learning rate, gradient norm and throughput against steps."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.loss = Series()
        self.loss_smooth = SmoothedSeries(SMOOTHING)
        self.val_loss = Series()
        self.lr = Series()
        self.grad_norm = Series()
        self.speed = Series()
        self._dirty = False
        self.redraws = 0

        self.view = pg.GraphicsLayoutWidget()
        # Not x-linked: pyqtgraph links plots of different widths by pixel, which shifts their ranges.
        # No legend and no grid: both overlap the curves, so pyqtgraph would repaint them (tick text, grid
        # lines) on every redraw; the title names the curves in their colours instead.
        self.loss_plot = self._plot(
            "Loss: " + " · ".join(f"<span style='color:{_hex(COLORS[key])}'>{name}</span>" for key, name in
                                  (("raw", "per log step"), ("smooth", "smoothed"), ("val", "validation"))),
            0, 0, rowspan=4)
        self.lr_plot = self._plot("Learning rate", 0, 1)
        self.grad_plot = self._plot("Gradient norm", 1, 1)
        self.speed_plot = self._plot("Throughput (images/s)", 2, 1)
        # eval.memorisation: near 0 = samples copy training images; diversity across seeds (collapse)
        self.memo_plot = self._plot(
            "Samples: " + " · ".join(f"<span style='color:{_hex(COLORS[key])}'>{name}</span>" for key, name in
                                     (("memo", "copy ratio"), ("diversity", "diversity"))), 3, 1)
        self.memo_plot.setToolTip("Copy ratio: a sample's distance to its nearest training image over the training "
                                  "images' own nearest-neighbour distance (near 0: samples copy training images). "
                                  "Diversity: how much one prompt's samples differ across seeds (eval.memorisation)")
        self.memo_ratio = Series()
        self.diversity = Series()
        self.view.ci.layout.setColumnStretchFactor(0, 3)
        self.view.ci.layout.setColumnStretchFactor(1, 2)
        self.curves: dict[str, tuple[pg.PlotDataItem, Series]] = {
            "loss": (live_curve(self.loss_plot, COLORS["raw"], name="loss"), self.loss),
            "loss_smooth": (live_curve(self.loss_plot, COLORS["smooth"], width=2, name="smoothed"),
                            self.loss_smooth),
            "val_loss": (live_curve(self.loss_plot, COLORS["val"], width=2, name="validation", symbol="o"),
                         self.val_loss),
            "lr": (live_curve(self.lr_plot, COLORS["lr"]), self.lr),
            "grad_norm": (live_curve(self.grad_plot, COLORS["grad"]), self.grad_norm),
            "speed": (live_curve(self.speed_plot, COLORS["speed"]), self.speed),
            "memo_ratio": (live_curve(self.memo_plot, COLORS["memo"], width=2, symbol="o"), self.memo_ratio),
            "diversity": (live_curve(self.memo_plot, COLORS["diversity"], width=2, symbol="t"), self.diversity),
        }
        self.followers = {plot: RangeFollower(plot) for plot in (self.loss_plot, self.lr_plot, self.grad_plot,
                                                                 self.speed_plot, self.memo_plot)}
        self._plot_series: dict[pg.PlotItem, list[Series]] = {
            self.loss_plot: [self.loss, self.loss_smooth, self.val_loss], self.lr_plot: [self.lr],
            self.grad_plot: [self.grad_norm], self.speed_plot: [self.speed],
            self.memo_plot: [self.memo_ratio, self.diversity]}
        self.log_scale = QCheckBox("Log scale (loss, gradient norm)")
        self.log_scale.toggled.connect(self.set_log_scale)
        self.follow = QCheckBox("Follow the data")
        self.follow.setToolTip("Fit the views to the curves as they grow (zooming or panning a plot turns "
                               "this off)")
        self.follow.setChecked(True)
        self.follow.toggled.connect(self.set_following)
        for follower in self.followers.values():
            follower.plot.getViewBox().sigRangeChangedManually.connect(self._zoomed)
        self.points = QLabel("")
        self.eval_label = QLabel("")  # FID / KID of the newest evaluation (EvalResult), when the run has any
        self.eval_label.setObjectName("evalLabel")
        self.eval_label.setVisible(False)
        bar = QHBoxLayout()
        bar.addWidget(self.log_scale)
        bar.addWidget(self.follow)
        bar.addStretch(1)
        self.alarm_label = QLabel("")  # the memorisation / collapse alarm of the run, once raised
        self.alarm_label.setObjectName("memorisationAlarm")
        self.alarm_label.setStyleSheet("color: #b3261e; font-weight: bold;")
        self.alarm_label.setVisible(False)
        bar.addWidget(self.alarm_label)
        bar.addWidget(self.eval_label)
        bar.addWidget(self.points)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(bar)
        layout.addWidget(self.view, 1)
        self.timer = QTimer(self)
        self.timer.setInterval(REDRAW_MS)
        self.timer.timeout.connect(self.redraw)
        self.timer.start()

    def _plot(self, title: str, row: int, col: int, rowspan: int = 1) -> pg.PlotItem:
        plot = self.view.addPlot(row=row, col=col, rowspan=rowspan, title=title)
        plot.setLabel("bottom", "step")
        plot.setDownsampling(auto=True, mode="peak")
        plot.setClipToView(True)
        return plot

    # -- data in (GUI thread, cheap) -------------------------------------------------------------------------
    def add_event(self, event: ev.Event) -> None:
        if isinstance(event, ev.StepMetrics):
            step = float(event.step)
            self.loss.append(step, event.loss)
            self.loss_smooth.add(step, event.loss)
            self.lr.append(step, event.lr)
            self.grad_norm.append(step, event.grad_norm)
            self.speed.append(step, event.img_per_s)
            self._dirty = True
        elif isinstance(event, ev.ValidationResult):
            if _finite(event.val_loss):
                self.val_loss.append(float(event.step), event.val_loss)
                self._dirty = True
        elif isinstance(event, ev.MemorisationResult):
            self.add_memorisation(event.step, event.ratio, event.diversity)
            for text in event.alarms:
                self.show_alarm(text)
        elif isinstance(event, ev.EvalResult):
            self.show_eval(event.step, event.fid, event.kid_mean, event.kid_std, event.n_generated, event.n_real,
                           event.fid_meaningful, event.note)

    def add_memorisation(self, step: int, ratio: float | None, diversity: float | None) -> None:
        if _finite(ratio):
            self.memo_ratio.append(float(step), float(ratio))
        if _finite(diversity):
            self.diversity.append(float(step), float(diversity))
        self._dirty = True

    def show_alarm(self, text: str) -> None:
        """The alarm (copying / collapse, with the step it began) above the plots; the full text as tooltip."""
        head = text.split(" the samples")[0].split(";")[0]
        shown = [t for t in self.alarm_label.text().split("  ·  ") if t]
        if head not in shown:
            shown.append(head)
        self.alarm_label.setText("  ·  ".join(shown))
        tips = [t for t in self.alarm_label.toolTip().split("\n\n") if t]
        self.alarm_label.setToolTip("\n\n".join([*tips, text]))
        self.alarm_label.setVisible(True)

    def show_eval(self, step: int, fid: float | None, kid_mean: float | None, kid_std: float | None,
                  n_generated: int = 0, n_real: int = 0, fid_meaningful: bool = False, note: str = "") -> None:
        """The newest FID / KID as a line of text above the plots (the tooltip says how to read it)."""
        parts = []
        if _finite(fid):
            parts.append(f"FID {fid:.2f}" + ("" if fid_meaningful else " (indicative)"))
        if _finite(kid_mean):
            parts.append(f"KID {kid_mean:.4f}" + (f" ± {kid_std:.4f}" if _finite(kid_std) else ""))
        text = " · ".join(parts) if parts else "FID/KID not computed"
        self.eval_label.setText(f"step {step}: {text}")
        tip = [f"{n_generated} generated vs {n_real} validation images"] if n_generated or n_real else []
        if note:
            tip.append(note)
        self.eval_label.setToolTip("\n".join(tip))
        self.eval_label.setVisible(True)

    def load_rows(self, rows: Iterable[dict[str, Any]]) -> None:
        """Replace the curves with a run's metrics.jsonl rows (history of a resumed run)."""
        self.clear()
        rows = list(rows)
        train = [r for r in rows if r.get("kind") == "train" and _finite(r.get("loss"))]
        vals = [r for r in rows if r.get("kind") == "val" and _finite(r.get("val_loss"))]
        if train:
            steps = np.array([r["step"] for r in train], dtype=np.float64)
            self.loss.extend(steps, np.array([r["loss"] for r in train]))
            self.loss_smooth.rebuild(steps, np.array([r["loss"] for r in train]))
            for series, key in ((self.lr, "lr"), (self.grad_norm, "grad_norm"), (self.speed, "img_per_s")):
                series.extend(steps, np.array([float(r.get(key, np.nan)) for r in train]))
        if vals:
            self.val_loss.extend(np.array([r["step"] for r in vals], dtype=np.float64),
                                 np.array([r["val_loss"] for r in vals]))
        for r in rows:
            if r.get("kind") == "sample" and ("memo_ratio" in r or "diversity" in r):
                self.add_memorisation(int(r.get("step", 0)), r.get("memo_ratio"), r.get("diversity"))
            if r.get("kind") == "event" and r.get("event") in ("memorisation", "collapse") and r.get("text"):
                self.show_alarm(str(r["text"]))
        evals = [r for r in rows if r.get("kind") == "val" and ("fid" in r or "kid_mean" in r)]
        if evals:  # FID / KID rows are "val" rows without val_loss
            last = evals[-1]
            self.show_eval(int(last.get("step", 0)), last.get("fid"), last.get("kid_mean"), last.get("kid_std"),
                           int(last.get("n_generated") or 0), int(last.get("n_real") or 0),
                           bool(last.get("fid_meaningful")), str(last.get("note") or ""))
        self._dirty = True
        self.redraw()

    def truncate_after(self, step: int) -> None:
        for _curve, series in self.curves.values():
            series.truncate_after(float(step))
        self.loss_smooth.rebuild(self.loss.x.copy(), self.loss.y.copy())
        self._dirty = True

    def clear(self) -> None:
        for _curve, series in self.curves.values():
            series.clear()
        self.eval_label.setText("")
        self.eval_label.setVisible(False)
        self.alarm_label.setText("")
        self.alarm_label.setToolTip("")
        self.alarm_label.setVisible(False)
        for follower in self.followers.values():
            follower.follow(self.follow.isChecked())
        self._dirty = True

    def point_count(self) -> int:
        return len(self.loss)

    # -- drawing (timer) ------------------------------------------------------------------------------------
    def redraw(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        for curve, series in self.curves.values():
            curve.setData(series.x, series.y)
        for plot, follower in self.followers.items():
            follower.update([(series.x, series.y) for series in self._plot_series[plot]])
        self.redraws += 1
        self.points.setText(f"{len(self.loss):,} points")

    def set_log_scale(self, on: bool) -> None:
        self.log_scale.setChecked(on)
        for plot in (self.loss_plot, self.grad_plot):
            plot.setLogMode(x=False, y=on)
            self.followers[plot].follow(self.follow.isChecked())
        self._dirty = True
        self.redraw()

    def set_following(self, on: bool) -> None:
        for follower in self.followers.values():
            follower.follow(on)
        self._dirty = True
        self.redraw()

    def _zoomed(self, *_: object) -> None:
        self.follow.blockSignals(True)
        self.follow.setChecked(False)
        self.follow.blockSignals(False)


def _hex(color: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*color)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and bool(np.isfinite(value))
