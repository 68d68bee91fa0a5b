"""Auto-ranging for live plots that changes the view in steps, not on every redraw.

pyqtgraph's auto-range refits the view whenever data is added, which regenerates every axis (tick layout,
text) on every frame: ~20 ms per redraw for four plots, more while the training thread competes for the
GIL. Here the view only changes when the data leaves it (or shrinks to a small part of it), with headroom,
so most redraws repaint the curves alone. A manual zoom or pan stops following until ``follow(True)``.
"""

from __future__ import annotations

import math

import numpy as np
import pyqtgraph as pg

HEADROOM_X = 1.25  # the x range ends this much beyond the last step
MARGIN_Y = 0.08  # fraction of the data's span added above and below
SHRINK_BELOW = 0.4  # refit y when the data fills less than this fraction of the view


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k that is >= value."""
    if value <= 0:
        return 1.0
    exponent = math.floor(math.log10(value))
    for mantissa in (1.0, 2.0, 2.5, 5.0, 10.0):
        candidate = mantissa * 10**exponent
        if candidate >= value:
            return candidate
    return 10.0 ** (exponent + 1)


class RangeFollower:
    def __init__(self, plot: pg.PlotItem) -> None:
        self.plot = plot
        self.following = True
        self._force = True
        self.changes = 0  # how often the view was refitted (tests, diagnostics)
        self._setting = False
        plot.disableAutoRange()
        plot.hideButtons()  # pyqtgraph's "A" button would bring back per-frame auto-range
        plot.getViewBox().sigRangeChangedManually.connect(self._manual)

    def _manual(self, *_: object) -> None:
        if not self._setting:
            self.following = False

    def follow(self, on: bool = True) -> None:
        self.following = on
        self._force = on

    def update(self, series: list[tuple[np.ndarray, np.ndarray]], *, force: bool = False) -> None:
        """Refit the view to the data of ``series`` [(x, y), ...] when it no longer fits (or ``force``)."""
        if not self.following:
            return
        force = force or self._force
        xs = [x for x, _ in series if len(x)]
        if not xs:
            return
        log_y = bool(self.plot.getAxis("left").logMode)
        ys = []
        for _, y in series:
            if not len(y):
                continue
            y = y[np.isfinite(y)]
            if log_y:
                y = np.log10(y[y > 0])
            if len(y):
                ys.append(y)
        x_lo = float(min(x[0] for x in xs))
        x_hi = float(max(x[-1] for x in xs))
        (vx0, vx1), (vy0, vy1) = self.plot.getViewBox().viewRange()
        new_x = None
        if force or x_hi > vx1 or x_lo < vx0 or vx1 > 4 * max(x_hi, 1.0) * HEADROOM_X:
            new_x = (min(0.0, x_lo), nice_ceiling(max(x_hi, 1.0) * HEADROOM_X))
        new_y = None
        if ys:
            y_lo = float(min(float(y.min()) for y in ys))
            y_hi = float(max(float(y.max()) for y in ys))
            span = (y_hi - y_lo) or (abs(y_hi) * 0.1) or 1.0
            target = (y_lo - MARGIN_Y * span, y_hi + MARGIN_Y * span)
            if force or y_lo < vy0 or y_hi > vy1 or (target[1] - target[0]) < SHRINK_BELOW * (vy1 - vy0):
                new_y = target
        if new_x is None and new_y is None:
            return
        self._setting = True
        try:
            if new_x is not None:
                self.plot.setXRange(*new_x, padding=0)
            if new_y is not None:
                self.plot.setYRange(*new_y, padding=0)
        finally:
            self._setting = False
        self._force = False
        self.changes += 1
