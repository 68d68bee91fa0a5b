"""The compositional test: does a text-to-image model put caption words together in combinations it never saw?

Coloured shapes (the demo's four colours x three shapes) on a white or a black background, captioned like
"a red circle on black". Some colour-shape-background combinations are held out of the training set; every
pair of attributes of a held-out combination still appears in training (each held-out triple differs from a
seen one only by its background), so a model that learned each word can compose them.

Each attribute has its own classifier: background from the border's brightness, colour from the hue of the
shape's core, shape from blur-invariant moments (`demo_shapes.classify`, which measures against the actual
border colour, so it works on black as on white). `evaluate` samples a model for seen and held-out captions and
reports per-attribute accuracy and all-correct for each group. Pure numpy + Pillow apart from the optional
sampling callable, so a test runs it on hand-made image sets.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import demo_shapes

COLOURS: tuple[str, ...] = tuple(demo_shapes.COLOURS)
SHAPES: tuple[str, ...] = demo_shapes.SHAPES
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0)}
ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "background")

Combo = tuple[str, str, str]  # (colour, shape, background)

# One held-out background per (colour, shape) pair at most, spread so every colour, shape and background is
# held out somewhere: 6 of the 24 combinations (a quarter).
HELD_OUT: tuple[Combo, ...] = (
    ("red", "circle", "black"),
    ("red", "triangle", "white"),
    ("green", "square", "black"),
    ("blue", "triangle", "black"),
    ("blue", "circle", "white"),
    ("yellow", "square", "white"),
)

_WORD = re.compile(r"[a-z]+")


def all_combos() -> list[Combo]:
    return [(c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS]


def seen_combos(held_out: Sequence[Combo] = HELD_OUT) -> list[Combo]:
    return [combo for combo in all_combos() if combo not in set(held_out)]


def caption_for(colour: str, shape: str, background: str) -> str:
    """``"a red circle on black"``."""
    return f"a {colour} {shape} on {background}"


def parse_caption(caption: str) -> Combo | None:
    """(colour, shape, background) named by a caption, or None when one of them is missing."""
    words = _WORD.findall(caption.lower())
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((w for w in words if w in SHAPES), None)
    background = next((w for w in words if w in BACKGROUNDS), None)
    if colour is None or shape is None or background is None:
        return None
    return colour, shape, background


def draw(combo: Combo, size: int, rng: np.random.Generator) -> np.ndarray:
    """One image of a combination: uint8 (size, size, 3)."""
    colour, shape, background = combo
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; expected one of {', '.join(BACKGROUNDS)}")
    return np.asarray(demo_shapes.draw_shape(colour, shape, size, rng, background=BACKGROUNDS[background]))


def make_images(combos: Sequence[Combo], per_combo: int, size: int, seed: int = 0) -> tuple[np.ndarray, list[Combo]]:
    """``per_combo`` images of each combination (seeded per image) and their labels, combination-major."""
    images, labels = [], []
    for combo in combos:
        key = [all_combos().index(combo)]
        for k in range(per_combo):
            images.append(draw(combo, size, np.random.default_rng([seed, *key, k])))
            labels.append(combo)
    return np.stack(images), labels


def write_dataset(out_dir: Path, per_combo: int = 16, size: int = 32, seed: int = 0,
                  held_out: Sequence[Combo] = HELD_OUT) -> int:
    """The training set: ``per_combo`` PNGs with caption sidecars for every seen combination; returns the count.

    Byte-deterministic for a given seed (one generator per image, PNGs without metadata)."""
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    images, labels = make_images(seen_combos(held_out), per_combo, size, seed)
    counts: dict[Combo, int] = {}
    for image, combo in zip(images, labels):
        k = counts[combo] = counts.get(combo, -1) + 1
        stem = f"{'_'.join(combo)}_{k:03d}"
        Image.fromarray(image).save(out_dir / f"{stem}.png", format="PNG")
        (out_dir / f"{stem}.txt").write_text(caption_for(*combo) + "\n", encoding="utf-8")
    return len(images)


def classify_background(image: np.ndarray) -> str:
    """White or black: the median brightness of the one-pixel border."""
    rgb = np.asarray(image, dtype=np.float32)[..., :3]
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    return "white" if float(np.median(border.mean(axis=1))) >= 127.5 else "black"


def classify(image: np.ndarray) -> dict[str, str | None]:
    """Each attribute of one uint8 HxWx3 image; colour and shape are None when there is no clear shape."""
    colour, shape = demo_shapes.classify(np.ascontiguousarray(image[..., :3]))
    return {"colour": colour, "shape": shape, "background": classify_background(image)}


def _zero_scores() -> dict[str, float]:
    return {**{a: 0.0 for a in ATTRIBUTES}, "all": 0.0}


def score(images: Sequence[np.ndarray], labels: Sequence[Combo]) -> dict[str, float]:
    """Fraction of images whose colour / shape / background / all three match their label."""
    if len(images) != len(labels):
        raise ValueError(f"got {len(images)} images but {len(labels)} labels; they must pair up")
    if not len(images):
        return _zero_scores()
    hits = _zero_scores()
    for image, combo in zip(images, labels):
        got = classify(image)
        ok = [got[a] == want for a, want in zip(ATTRIBUTES, combo)]
        for a, good in zip(ATTRIBUTES, ok):
            hits[a] += good
        hits["all"] += all(ok)
    return {k: v / len(images) for k, v in hits.items()}


@dataclass
class CompositionalReport:
    """Per-attribute and all-correct accuracy on seen and on held-out combinations."""

    seen: dict[str, float]
    held_out: dict[str, float]
    samples_per_combo: int
    held_out_combos: list[Combo] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {"seen": self.seen, "held_out": self.held_out, "samples_per_combo": self.samples_per_combo,
                "held_out_combos": [caption_for(*c) for c in self.held_out_combos]}

    def table(self) -> str:
        head = "group     " + " ".join(f"{a:>10}" for a in (*ATTRIBUTES, "all"))
        rows = [f"{name:<9} " + " ".join(f"{scores[a]:>10.3f}" for a in (*ATTRIBUTES, "all"))
                for name, scores in (("seen", self.seen), ("held-out", self.held_out))]
        return "\n".join([head, *rows])


SampleFn = Callable[[list[str], list[int]], np.ndarray]


def evaluate(sample: SampleFn, *, samples_per_combo: int = 8, held_out: Sequence[Combo] = HELD_OUT,
             seed: int = 1000) -> CompositionalReport:
    """Sample every seen and held-out caption ``samples_per_combo`` times and score the images.

    ``sample(prompts, seeds)`` returns uint8 images prompt-major (every seed for the first prompt, ...), as
    `LoadedModel.generate` and `sampling.sampler.generate` do.
    """
    seeds = [seed + k for k in range(samples_per_combo)]
    groups = {}
    for name, combos in (("seen", seen_combos(held_out)), ("held_out", list(held_out))):
        images = sample([caption_for(*c) for c in combos], seeds)
        labels = [c for c in combos for _ in seeds]
        groups[name] = score(list(images), labels)
    return CompositionalReport(groups["seen"], groups["held_out"], samples_per_combo, list(held_out))
