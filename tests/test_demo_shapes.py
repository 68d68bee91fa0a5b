"""The demo dataset generator and the colour/shape classifier that scores samples against prompts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sdstudio.core import demo_shapes

DEMO_DIR = Path(__file__).parents[1] / "resources" / "demo"
N_CLASSES = len(demo_shapes.COLOURS) * len(demo_shapes.SHAPES)


def _load_dataset(folder: Path) -> tuple[list[np.ndarray], list[str]]:
    images, captions = [], []
    for png in sorted(folder.glob("*.png")):
        images.append(np.asarray(Image.open(png).convert("RGB")))
        captions.append(png.with_suffix(".txt").read_text(encoding="utf-8").strip())
    return images, captions


def _blur_and_noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(1.5))).astype(np.float64)
    return np.clip(blurred + rng.normal(0, 20, blurred.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def fresh_dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[np.ndarray], list[str]]:
    folder = tmp_path_factory.mktemp("demo")
    assert demo_shapes.generate_demo_dataset(folder, per_class=12, size=32, seed=7) == 12 * N_CLASSES
    return _load_dataset(folder)


def test_generated_files_are_named_captioned_and_sized(tmp_path: Path) -> None:
    count = demo_shapes.generate_demo_dataset(tmp_path, per_class=2, size=24, seed=3)
    assert count == 2 * N_CLASSES
    assert len(list(tmp_path.glob("*.png"))) == count
    caption = (tmp_path / "red_circle_001.txt").read_bytes()
    assert caption == b"a red circle on white\n"
    with Image.open(tmp_path / "yellow_triangle_000.png") as image:
        assert image.mode == "RGB" and image.size == (24, 24)


def test_generation_is_byte_deterministic(tmp_path: Path) -> None:
    first, second, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for folder, seed in ((first, 11), (second, 11), (other, 12)):
        demo_shapes.generate_demo_dataset(folder, per_class=2, size=32, seed=seed)
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    assert all((first / n).read_bytes() == (second / n).read_bytes() for n in names)
    pngs = [n for n in names if n.endswith(".png")]
    assert any((first / n).read_bytes() != (other / n).read_bytes() for n in pngs)


def test_classifier_is_accurate_on_fresh_images(fresh_dataset: tuple[list[np.ndarray], list[str]]) -> None:
    scores = demo_shapes.prompt_adherence(*fresh_dataset)
    assert scores["colour_acc"] >= 0.97 and scores["shape_acc"] >= 0.97, scores


def test_classifier_is_accurate_on_bundled_demo() -> None:
    images, captions = _load_dataset(DEMO_DIR)
    assert len(images) == 24 * N_CLASSES, f"expected the bundled demo in {DEMO_DIR}"
    scores = demo_shapes.prompt_adherence(images, captions)
    assert scores["colour_acc"] >= 0.97 and scores["shape_acc"] >= 0.97, scores


def test_classifier_survives_blur_and_noise(fresh_dataset: tuple[list[np.ndarray], list[str]]) -> None:
    images, captions = fresh_dataset
    rng = np.random.default_rng(0)
    degraded = [_blur_and_noise(image, rng) for image in images]
    scores = demo_shapes.prompt_adherence(degraded, captions)
    assert scores["colour_acc"] >= 0.9 and scores["shape_acc"] >= 0.9, scores


def test_blank_image_has_no_shape() -> None:
    assert demo_shapes.classify(np.full((32, 32, 3), 255, dtype=np.uint8)) == (None, None)
    assert demo_shapes.classify(Image.new("RGB", (32, 32), "white")) == (None, None)


def test_a_speck_is_not_a_shape() -> None:
    image = np.full((32, 32, 3), 255, dtype=np.uint8)
    image[10:12, 10:12] = demo_shapes.COLOURS["red"]
    assert demo_shapes.classify(image) == (None, None)


def test_noise_does_not_score_above_chance() -> None:
    rng = np.random.default_rng(1)
    noise = [rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8) for _ in range(60)]
    prompts = [
        demo_shapes.caption_for(colour, shape)
        for colour in demo_shapes.COLOURS
        for shape in demo_shapes.SHAPES
    ] * 5
    assert demo_shapes.prompt_adherence(noise, prompts)["both_acc"] < 0.3


def test_chance_levels() -> None:
    assert demo_shapes.COLOUR_CHANCE == pytest.approx(0.25)
    assert demo_shapes.SHAPE_CHANCE == pytest.approx(1 / 3)
    assert demo_shapes.BOTH_CHANCE == pytest.approx(1 / 12)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a red circle on white", ("red", "circle")),
        ("A Yellow TRIANGLE, on white", ("yellow", "triangle")),
        ("square, blue", ("blue", "square")),
        ("a green thing", ("green", None)),
        ("a circle", (None, "circle")),
        ("reddish squares", (None, "square")),
        ("bluetriangle", (None, None)),
        ("", (None, None)),
    ],
)
def test_parse_prompt(prompt: str, expected: tuple[str | None, str | None]) -> None:
    assert demo_shapes.parse_prompt(prompt) == expected


def test_prompt_adherence_counts_matches_and_misses() -> None:
    rng = np.random.default_rng(2)
    red_circle = np.asarray(demo_shapes.draw_shape("red", "circle", 32, rng))
    scores = demo_shapes.prompt_adherence(
        [red_circle] * 4, ["a red circle", "a red square", "a blue circle", "a circle"]
    )
    assert scores == {"colour_acc": 0.5, "shape_acc": 0.75, "both_acc": 0.25}
    with pytest.raises(ValueError, match="pair up"):
        demo_shapes.prompt_adherence([red_circle], [])


def test_draw_shape_rejects_unknown_names() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown colour 'purple'"):
        demo_shapes.draw_shape("purple", "circle", 32, rng)
    with pytest.raises(ValueError, match="unknown shape 'star'"):
        demo_shapes.draw_shape("red", "star", 32, rng)
