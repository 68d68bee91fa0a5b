"""Growable numpy buffers for live curves: appends are O(1) amortised (capacity doubles), views are free."""

from __future__ import annotations

import numpy as np

from sdstudio.core.runs import SMOOTHING, EmaSmoother


class Series:
    """x/y float64 columns that grow by doubling; ``x``/``y`` are views of the filled part."""

    def __init__(self, capacity: int = 256) -> None:
        self._x = np.empty(max(1, capacity), dtype=np.float64)
        self._y = np.empty(max(1, capacity), dtype=np.float64)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    @property
    def capacity(self) -> int:
        return len(self._x)

    @property
    def x(self) -> np.ndarray:
        return self._x[: self._n]

    @property
    def y(self) -> np.ndarray:
        return self._y[: self._n]

    def _grow(self, needed: int) -> None:
        capacity = self.capacity
        while capacity < needed:
            capacity *= 2
        if capacity != self.capacity:
            for name in ("_x", "_y"):
                old = getattr(self, name)
                new = np.empty(capacity, dtype=np.float64)
                new[: self._n] = old[: self._n]
                setattr(self, name, new)

    def append(self, x: float, y: float) -> None:
        if self._n == self.capacity:
            self._grow(self._n + 1)
        self._x[self._n] = x
        self._y[self._n] = y
        self._n += 1

    def extend(self, xs: np.ndarray, ys: np.ndarray) -> None:
        xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
        end = self._n + len(xs)
        self._grow(end)
        self._x[self._n:end] = xs
        self._y[self._n:end] = ys
        self._n = end

    def truncate_after(self, x: float) -> None:
        """Drop points with x beyond ``x`` (a resumed run repeats the steps after its checkpoint)."""
        keep = int(np.searchsorted(self.x, x, side="right"))
        self._n = min(self._n, keep)

    def clear(self) -> None:
        self._n = 0


class SmoothedSeries(Series):
    """The appended values smoothed as every curve of a run is (``sdstudio.core.runs.EmaSmoother``, which
    ``smooth_ema`` applies to whole curves: a debiased EMA like TensorBoard's); non-finite values are left out."""

    def __init__(self, weight: float = SMOOTHING, capacity: int = 256) -> None:
        super().__init__(capacity)
        self.weight = weight
        self._ema = EmaSmoother(weight)

    def add(self, x: float, value: float) -> None:
        if not np.isfinite(value):
            return
        self.append(x, self._ema.add(value))

    def clear(self) -> None:
        super().clear()
        self._ema.reset()

    def rebuild(self, xs: np.ndarray, values: np.ndarray) -> None:
        """Smooth a whole curve again (a run's history loaded, or cut back on resume); the live average
        carries on from its end."""
        self.clear()
        for x, value in zip(xs, values, strict=True):
            self.add(float(x), float(value))
