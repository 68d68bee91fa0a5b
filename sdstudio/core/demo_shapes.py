"""The bundled demo dataset (coloured shapes on white) and the classifier that scores samples against it.

The demo dataset is small enough to train a model from scratch on a CPU in minutes; the classifier turns
"does the sample match its prompt?" into numbers (`prompt_adherence`) that a test or the GUI can track.
Everything here is pure numpy + Pillow so it runs anywhere the core runs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUND: tuple[int, int, int] = (255, 255, 255)

COLOUR_CHANCE = 1 / len(COLOURS)
SHAPE_CHANCE = 1 / len(SHAPES)
BOTH_CHANCE = COLOUR_CHANCE * SHAPE_CHANCE

MIN_SCALE = 0.45  # shape extent as a fraction of the image side
MAX_SCALE = 0.80
COLOUR_JITTER = 12  # +- per channel, so the model sees a little colour variation
SUPERSAMPLE = 4  # draw at 4x and downsample with LANCZOS for anti-aliased edges

# Foreground = distance from the background colour above max(MIN_FG_DISTANCE, FG_RELATIVE * the 99th
# percentile). The relative part cuts at about half contrast, where a blurred outline really is.
MIN_FG_DISTANCE = 70.0
FG_RELATIVE = 0.5
MAX_BACKGROUND_NOISE = 64.0  # median border distance from the border colour; sigma-40 noise is ~62
MIN_FG_FRACTION = 0.03  # below this the image is treated as empty
MIN_SATURATION = 0.25  # a greyish foreground has no palette colour
REGION_MARGIN = 0.1  # shape moments use the blob grown by this fraction of the side (catches blurred edges)
# Clean values: |third cumulant| / area^1.5 is 0.017 for a triangle and 0 for a disc or square; fourth
# cumulant along the axes / along the diagonals is 2 for a square and 1 for a disc or triangle.
TRIANGLE_SKEW = 0.006
SQUARE_KURTOSIS_RATIO = 1.4

_WORD = re.compile(r"[a-z]+")


def caption_for(colour: str, shape: str) -> str:
    """The caption of one demo image, e.g. ``"a red circle on white"``."""
    return f"a {colour} {shape} on white"


def draw_shape(colour: str, shape: str, size: int, rng: np.random.Generator,
               background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """One filled `shape` in (jittered) `colour` on `background` (white), `size` x `size` RGB, random scale and
    position."""
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; expected one of {', '.join(COLOURS)}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")
    if size < 8:
        raise ValueError(f"image size {size} is too small to draw a recognisable shape; use 8 or more")

    side = size * SUPERSAMPLE
    extent = rng.uniform(MIN_SCALE, MAX_SCALE) * side
    width = extent
    height = extent * np.sqrt(3) / 2 if shape == "triangle" else extent  # equilateral triangle
    x0 = rng.uniform(0, side - width)
    y0 = rng.uniform(0, side - height)
    jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    fill = tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + jitter, 0, 255))

    canvas = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(canvas)
    box = (x0, y0, x0 + width, y0 + height)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x0 + width / 2, y0), (x0 + width, y0 + height), (x0, y0 + height)], fill=fill)
    return canvas.resize((size, size), Image.Resampling.LANCZOS)


def demo_file_stem(colour: str, shape: str, index: int) -> str:
    """File name (without suffix) of the `index`-th demo image of a class."""
    return f"{colour}_{shape}_{index:03d}"


def generate_demo_dataset(out_dir: Path, per_class: int = 24, size: int = 32, seed: int = 0) -> int:
    """Write `per_class` images per colour x shape with caption sidecars into `out_dir`; return the count.

    Byte-deterministic for a given seed: each image has its own generator seeded from (seed, class, index)
    and the PNGs carry no metadata.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    count = 0
    for colour_index, colour in enumerate(COLOURS):
        for shape_index, shape in enumerate(SHAPES):
            for k in range(per_class):
                rng = np.random.default_rng([seed, colour_index, shape_index, k])
                image = draw_shape(colour, shape, size, rng)
                stem = demo_file_stem(colour, shape, k)
                image.save(out_dir / f"{stem}.png", format="PNG")
                (out_dir / f"{stem}.txt").write_text(caption_for(colour, shape) + "\n", encoding="utf-8")
                count += 1
    return count


def _as_rgb_array(image: np.ndarray | Image.Image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(f"classify expects a uint8 image (0-255), got dtype {array.dtype}")
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"classify expects an HxWx3 (or HxWx4) image, got shape {array.shape}")
    return array[..., :3]


def _label_components(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels of `mask` (label = smallest flat index in the component; -1 outside)."""
    height, width = mask.shape
    outside = height * width
    labels = np.where(mask, np.arange(outside).reshape(height, width), outside)
    while True:
        padded = np.pad(labels, 1, constant_values=outside)
        spread = np.minimum.reduce(
            [labels, padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
        )
        spread = np.where(mask, spread, outside)
        # Pointer jumping: a label is a pixel index, and that pixel's label is at least as small.
        spread = np.append(spread.ravel(), outside)[spread]
        if np.array_equal(spread, labels):
            break
        labels = spread
    return np.where(mask, labels, -1)


def _main_blob(foreground: np.ndarray) -> np.ndarray:
    """The largest connected foreground blob, with its holes filled."""
    labels = _label_components(foreground)
    counts = np.bincount(labels[foreground])
    blob = labels == counts.argmax()
    background = _label_components(~blob)
    border = np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]])
    holes = ~blob & ~np.isin(background, border)
    return blob | holes


def _hue(rgb: np.ndarray) -> tuple[float, float]:
    """(hue in degrees, saturation) of one RGB colour."""
    r, g, b = (float(v) / 255 for v in rgb)
    high, low = max(r, g, b), min(r, g, b)
    if high <= 0 or high == low:
        return 0.0, 0.0
    delta = high - low
    if high == r:
        hue = ((g - b) / delta) % 6
    elif high == g:
        hue = (b - r) / delta + 2
    else:
        hue = (r - g) / delta + 4
    return hue * 60.0, delta / high


_PALETTE_HUES = {name: _hue(np.array(rgb))[0] for name, rgb in COLOURS.items()}


def _nearest_colour(rgb: np.ndarray) -> str | None:
    # Hue rather than RGB distance: a generated sample is often too dark, too pale or washed out, but
    # rarely the wrong hue when it means the right colour.
    hue, saturation = _hue(rgb)
    if saturation < MIN_SATURATION:
        return None

    def hue_distance(name: str) -> float:
        diff = abs(hue - _PALETTE_HUES[name]) % 360
        return min(diff, 360 - diff)

    return min(COLOURS, key=hue_distance)


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """`mask` grown by `steps` pixels (4-neighbourhood)."""
    for _ in range(steps):
        padded = np.pad(mask, 1)
        mask = mask | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    return mask


def _shape_weights(distance: np.ndarray, blob: np.ndarray, core: float) -> np.ndarray:
    """Soft foreground (0..1) around the blob: blur keeps its total mass, a hard mask would lose it."""
    region = _dilate(blob, max(3, round(REGION_MARGIN * max(blob.shape))))
    outside = distance[~region]
    floor = float(np.percentile(outside, 75)) if outside.size else 0.0
    weights = np.clip((distance - floor) / max(core - floor, 1.0), 0.0, 1.0)
    return np.where(region, weights, 0.0)


def _shape_of(weights: np.ndarray) -> str:
    """Circle, square or triangle from blur-invariant moments of the soft foreground.

    A Gaussian blur adds to the second cumulant of a shape's mass distribution but leaves the third and
    fourth alone, and the mass (area) is unchanged, so cumulants scaled by the area do not care how blurry
    a sample is. Triangles are skewed (third cumulant); squares are flat along their sides and peaked along
    their diagonals (fourth cumulant along the axes is twice that along the diagonals; a disc's is 1x).
    """
    area = float(weights.sum())
    ys, xs = np.indices(weights.shape, dtype=np.float64)
    x = xs - float((weights * xs).sum()) / area
    y = ys - float((weights * ys).sum()) / area

    def moment(u: np.ndarray, order: int) -> float:
        return float((weights * u**order).sum()) / area

    def kurtosis(u: np.ndarray) -> float:  # fourth cumulant; sign and ratio only, so no scaling
        return moment(u, 4) - 3 * moment(u, 2) ** 2

    skew = max(abs(moment(x, 3)), abs(moment(y, 3))) / area**1.5
    if skew > TRIANGLE_SKEW:
        return "triangle"
    along_axes = kurtosis(x) + kurtosis(y)
    along_diagonals = kurtosis((x + y) / np.sqrt(2)) + kurtosis((x - y) / np.sqrt(2))
    if along_diagonals < 0 and along_axes / along_diagonals > SQUARE_KURTOSIS_RATIO:
        return "square"
    return "circle"


def classify(image: np.ndarray | Image.Image) -> tuple[str | None, str | None]:
    """(colour, shape) of the main shape in an image, or (None, None) when there is no clear foreground.

    `image` is a uint8 HxWx3 array or a PIL image. Colour is None on its own when the foreground is grey.
    """
    rgb = _as_rgb_array(image).astype(np.float32)
    # Distance from the actual background (median border colour), not from pure white: generated samples
    # often come out off-white or a little dark overall.
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    background = np.median(border, axis=0)
    if np.median(np.linalg.norm(border - background, axis=1)) > MAX_BACKGROUND_NOISE:
        return None, None  # no plain background: noise or clutter, not a shape on a backdrop
    distance = np.linalg.norm(rgb - background, axis=2)
    threshold = max(MIN_FG_DISTANCE, FG_RELATIVE * float(np.percentile(distance, 99)))
    foreground = distance > threshold
    if foreground.mean() < MIN_FG_FRACTION:
        return None, None
    blob = _main_blob(foreground)
    if blob.mean() < MIN_FG_FRACTION:
        return None, None
    # Colour and contrast from the blob's core (its stronger half), not its edges, which blend into white.
    blob_distance = distance[blob]
    core = blob_distance >= np.median(blob_distance)
    colour = _nearest_colour(np.median(rgb[blob][core], axis=0))
    shape = _shape_of(_shape_weights(distance, blob, float(np.median(blob_distance[core]))))
    return colour, shape


def parse_prompt(prompt: str) -> tuple[str | None, str | None]:
    """The first palette colour word and the first shape word (or plural) in a prompt; None where absent."""
    words = _WORD.findall(prompt.lower())
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((w.removesuffix("s") for w in words if w.removesuffix("s") in SHAPES), None)
    return colour, shape


def prompt_adherence(images: Sequence[np.ndarray], prompts: Sequence[str]) -> dict[str, float]:
    """Fractions of images whose classified colour / shape / both match the words of their prompt.

    A prompt without a colour (shape) word counts as a miss for colour (shape), so scores stay comparable
    with the chance levels COLOUR_CHANCE, SHAPE_CHANCE and BOTH_CHANCE.
    """
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; they must pair up")
    if not images:
        return {"colour_acc": 0.0, "shape_acc": 0.0, "both_acc": 0.0}
    colour_hits = shape_hits = both_hits = 0
    for image, prompt in zip(images, prompts):
        want_colour, want_shape = parse_prompt(prompt)
        got_colour, got_shape = classify(image)
        colour_ok = want_colour is not None and got_colour == want_colour
        shape_ok = want_shape is not None and got_shape == want_shape
        colour_hits += colour_ok
        shape_hits += shape_ok
        both_hits += colour_ok and shape_ok
    n = len(images)
    return {"colour_acc": colour_hits / n, "shape_acc": shape_hits / n, "both_acc": both_hits / n}
