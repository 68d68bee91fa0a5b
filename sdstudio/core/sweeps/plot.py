"""``overlay.png``: the training-loss curves (smoothed) and validation-loss points of a sweep's runs on one
chart, drawn with Pillow (the core stays free of Qt and of plotting libraries)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..atomic import write_file_atomic
from ..runs import smooth_ema

WIDTH, HEIGHT = 1200, 720
SCALE = 2  # drawn at twice the size and scaled down: Pillow draws no antialiased lines
LEGEND_WIDTH = 330
MARGIN = {"left": 92, "top": 56, "right": LEGEND_WIDTH + 24, "bottom": 72}
# Tableau 10: distinct for the usual 2-10 runs; more runs get evenly spaced hues.
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]
Y_TICKS = 8
Colour = tuple[int, int, int]


@dataclass(frozen=True)
class Series:
    label: str
    train: Sequence[tuple[int, float]]
    val: Sequence[tuple[int, float]]


def colours(n: int) -> list[Colour]:
    if n <= len(PALETTE):
        return [_hex(c) for c in PALETTE[:n]]
    import colorsys

    out = []
    for i in range(n):
        light = 0.42 if i % 2 else 0.55  # alternate lightness so neighbouring hues stay apart
        r, g, b = colorsys.hls_to_rgb(i / n, light, 0.75)
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out


def _hex(text: str) -> Colour:
    return int(text[1:3], 16), int(text[3:5], 16), int(text[5:7], 16)


def _mix(colour: Colour, other: Colour, t: float) -> Colour:
    return tuple(round(a + (b - a) * t) for a, b in zip(colour, other))  # type: ignore[return-value]


def nice_step(span: float, target: int = 6) -> float:
    raw = span / max(1, target)
    power = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * power:
            return m * power
    return 10 * power


def linear_ticks(low: float, high: float, target: int = 6) -> list[float]:
    step = nice_step(high - low, target)
    first = math.ceil(low / step - 1e-9) * step
    return [round(first + i * step, 12) for i in range(int((high - first) / step + 1e-9) + 1)]


def log_ticks(low: float, high: float) -> list[float]:
    """Decades (every other one over many decades); with fewer than 4 decades in view also 2x and 5x."""
    lo, hi = math.floor(math.log10(low)), math.ceil(math.log10(high))
    stride = 1 if hi - lo <= 8 else 2

    def inside(mults: tuple[int, ...]) -> list[float]:
        ticks = [m * 10.0 ** e for e in range(lo, hi + 1, stride) for m in mults]
        return [t for t in ticks if low <= t * (1 + 1e-9) and t <= high * (1 + 1e-9)]

    decades = inside((1,))
    return decades if len(decades) >= 4 else inside((1, 2, 5))


def tick_label(value: float, step: float | None = None) -> str:
    """``value`` as a tick label; with the tick ``step`` of a linear axis, every label gets the same decimals."""
    if value == 0 and step is None:
        return "0"
    if step is not None and 1e-4 <= step < 1e5 and abs(value) < 1e5:
        power = math.floor(math.log10(step) + 1e-9)
        mantissa = step / 10 ** power
        decimals = max(0, -power + (1 if abs(mantissa - 2.5) < 1e-6 else 0))
        return f"{value:.{decimals}f}"
    if abs(value) < 1e-3 or abs(value) >= 1e5:
        mantissa, exponent = f"{value:.1e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        return f"{mantissa}e{int(exponent)}"
    return f"{value:.6g}"


@dataclass(frozen=True)
class YAxis:
    low: float
    high: float
    log: bool

    def frac(self, value: float) -> float:
        if self.log:
            return (math.log10(value) - math.log10(self.low)) / (math.log10(self.high) - math.log10(self.low))
        return (value - self.low) / (self.high - self.low)

    def ticks(self) -> list[float]:
        return log_ticks(self.low, self.high) if self.log else linear_ticks(self.low, self.high, Y_TICKS)

    def label(self, value: float) -> str:
        if self.log:
            return tick_label(value)
        return tick_label(value, nice_step(self.high - self.low, Y_TICKS))


def y_axis(values: Sequence[float]) -> YAxis:
    """Log scale when the positive values span more than one decade; 5% padding either side."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return YAxis(0.0, 1.0, False)
    low, high = min(finite), max(finite)
    if low > 0 and high / low > 10:
        pad = 0.04 * (math.log10(high) - math.log10(low))
        return YAxis(10 ** (math.log10(low) - pad), 10 ** (math.log10(high) + pad), True)
    if high - low < 1e-12:
        pad = abs(high) * 0.1 or 1.0
        return YAxis(low - pad, high + pad, False)
    pad = 0.05 * (high - low)
    return YAxis(max(0.0, low - pad) if low >= 0 else low - pad, high + pad, False)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size * SCALE)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: the small bitmap font
        return ImageFont.load_default()


def draw_overlay(series: Sequence[Series], path: Path, title: str, notes: Sequence[str] = ()) -> None:
    """Write the overlay chart to ``path`` (atomically); ``notes`` are extra legend lines (abbreviations)."""
    image = render_overlay(series, title, notes)
    write_file_atomic(path, lambda tmp: image.save(tmp, format="PNG"))


def render_overlay(series: Sequence[Series], title: str, notes: Sequence[str] = ()) -> Image.Image:
    s = SCALE
    img = Image.new("RGB", (WIDTH * s, HEIGHT * s), "white")
    d = ImageDraw.Draw(img)
    f_small, f_text, f_title = _font(12), _font(13), _font(16)
    x0, y0 = MARGIN["left"] * s, MARGIN["top"] * s
    x1, y1 = (WIDTH - MARGIN["right"]) * s, (HEIGHT - MARGIN["bottom"]) * s
    d.text(((x0 + x1) // 2, 18 * s), title, fill="black", font=f_title, anchor="mt")

    smoothed = [smooth_ema([v for _, v in run.train]).tolist() for run in series]
    all_values = [v for run in series for _, v in run.train] + [v for run in series for _, v in run.val]
    axis = y_axis(all_values)
    xmax = max([st for run in series for st, _ in (*run.train, *run.val)] or [1])
    xmax = max(xmax, 1)

    def px(step: float) -> float:
        return x0 + (x1 - x0) * step / xmax

    def py(value: float) -> float:
        return y1 - (y1 - y0) * axis.frac(min(max(value, axis.low), axis.high))

    grid, axis_colour = (232, 232, 232), (60, 60, 60)
    for tick in axis.ticks():
        y = py(tick)
        d.line([(x0, y), (x1, y)], fill=grid, width=s)
        d.line([(x0 - 6 * s, y), (x0, y)], fill=axis_colour, width=s)
        d.text((x0 - 9 * s, y), axis.label(tick), fill="black", font=f_small, anchor="rm")
    for tick in linear_ticks(0, xmax):
        x = px(tick)  # steps: whole numbers unless the run is a few steps long
        d.line([(x, y0), (x, y1)], fill=grid, width=s)
        d.line([(x, y1), (x, y1 + 6 * s)], fill=axis_colour, width=s)
        d.text((x, y1 + 9 * s), tick_label(tick), fill="black", font=f_small, anchor="mt")
    d.rectangle([x0, y0, x1, y1], outline=axis_colour, width=s)
    d.text(((x0 + x1) // 2, y1 + 34 * s), "step", fill="black", font=f_text, anchor="mt")
    _vertical_text(img, "loss (log scale)" if axis.log else "loss", f_text, (22 * s, (y0 + y1) // 2))

    cols = colours(len(series))
    faint = len(series) <= 6  # raw curves help with a few runs and only clutter many
    for run, values, colour in zip(series, smoothed, cols):
        steps = [st for st, _ in run.train]
        if faint and len(steps) > 1:
            d.line([(px(a), py(b)) for a, b in run.train], fill=_mix(colour, (255, 255, 255), 0.72), width=s)
        if len(steps) > 1:
            d.line([(px(a), py(b)) for a, b in zip(steps, values)], fill=colour, width=2 * s + 1, joint="curve")
    for run, colour in zip(series, cols):
        for step, value in run.val:
            _dot(d, px(step), py(value), colour, 4.5 * s)
    if not all_values:
        d.text(((x0 + x1) // 2, (y0 + y1) // 2), "no metrics yet", fill=(120, 120, 120), font=f_text,
               anchor="mm")
    _legend(d, series, cols, notes, (x1 + 24 * s, y0), f_text, f_small)
    return img.resize((WIDTH, HEIGHT), Image.Resampling.LANCZOS)


def _dot(d: ImageDraw.ImageDraw, x: float, y: float, colour: Colour, r: float) -> None:
    d.ellipse([x - r, y - r, x + r, y + r], fill=colour, outline=_mix(colour, (0, 0, 0), 0.45), width=SCALE)


def _vertical_text(img: Image.Image, text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
                   centre: tuple[int, int]) -> None:
    left, top, right, bottom = font.getbbox(text)
    label = Image.new("RGBA", (right - left + 4, bottom - top + 4), (255, 255, 255, 0))
    ImageDraw.Draw(label).text((2 - left, 2 - top), text, fill="black", font=font)
    label = label.rotate(90, expand=True)
    img.paste(label, (centre[0] - label.width // 2, centre[1] - label.height // 2), label)


def _legend(d: ImageDraw.ImageDraw, series: Sequence[Series], cols: list[Colour], notes: Sequence[str],
            origin: tuple[int, int],
            font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
            small: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> None:
    s = SCALE
    x, y = origin
    width = (LEGEND_WIDTH - 20) * s
    row = 21 * s
    grey = (90, 90, 90)
    d.line([(x, y + 8 * s), (x + 26 * s, y + 8 * s)], fill=grey, width=2 * s + 1)
    d.text((x + 34 * s, y + 8 * s), "training loss (smoothed)", fill=grey, font=small, anchor="lm")
    y += 18 * s
    _dot(d, x + 13 * s, y + 8 * s, (150, 150, 150), 4.5 * s)
    d.text((x + 34 * s, y + 8 * s), "validation loss", fill=grey, font=small, anchor="lm")
    y += 18 * s
    for note in notes:
        d.text((x, y + 8 * s), _fit(note, small, width), fill=grey, font=small, anchor="lm")
        y += 16 * s
    y += 10 * s
    bottom = (HEIGHT - 20) * s
    fit = max(1, (bottom - y) // row)
    shown = list(zip(series, cols))
    more = 0
    if len(shown) > fit:
        more = len(shown) - (fit - 1)
        shown = shown[: fit - 1]
    for run, colour in shown:
        d.line([(x, y + 9 * s), (x + 26 * s, y + 9 * s)], fill=colour, width=3 * s)
        _dot(d, x + 13 * s, y + 9 * s, colour, 4 * s)
        d.text((x + 34 * s, y + 9 * s), _fit(run.label, font, width - 34 * s), fill="black", font=font, anchor="lm")
        y += row
    if more:
        d.text((x + 34 * s, y + 9 * s), f"... and {more} more (see summary.csv)", fill=grey, font=small,
               anchor="lm")


def _fit(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> str:
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."
