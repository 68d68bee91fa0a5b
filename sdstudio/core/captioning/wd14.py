"""WD14-format taggers (SmilingWolf's wd-*-tagger models and their kin) run with onnxruntime.

A tagger folder holds ``model.onnx`` and ``selected_tags.csv`` (columns ``tag_id,name,category,count``;
category 0 = general, 4 = character, 9 = rating). The preprocessing is the reference one of the models'
own demo (and of kohya's tag_images_by_wd14_tagger): alpha composited on white, padded to a square with
white, resized to the model's input size (448 for the v2/v3 models) with bicubic filtering, channels in
BGR order, float32 in 0..255 (no normalisation), NHWC. The model's output already is a sigmoid
probability per tag.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sdstudio.core.errors import UserError

GENERAL, CHARACTER, RATING = 0, 4, 9
DEFAULT_SIZE = 448
# Tags that are pictures made of underscores: replacing "_" by " " would break them (the reference demo
# keeps the same list).
KAOMOJIS = frozenset({"0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3",
                      "6_9", ">_o", "@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||"})
INSTALL_HINT = 'the tagger needs onnxruntime: pip install "sdstudio[tagger]"'


@dataclass(frozen=True)
class TagLabel:
    name: str
    category: int


@dataclass
class TaggerOptions:
    general_threshold: float = 0.35
    character_threshold: float = 0.85
    exclude: tuple[str, ...] = ()  # tags never written (compared with and without underscores)
    underscores_to_spaces: bool = True
    include_ratings: bool = False  # "general", "sensitive", ...: the top rating tag, last
    batch_size: int = 8
    providers: list[str] = field(default_factory=list)  # onnxruntime providers; [] = GPU when available


def read_selected_tags(path: Path) -> list[TagLabel]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            missing = {"name", "category"} - set(reader.fieldnames or [])
            if missing:
                raise UserError(f"{path} has no {', '.join(sorted(missing))} column: a WD14 tag list has the "
                                "header tag_id,name,category,count.")
            return [TagLabel(row["name"], int(row["category"])) for row in reader]
    except OSError as exc:
        raise UserError(f"{path} cannot be read ({exc.strerror or exc}).") from exc
    except ValueError as exc:
        raise UserError(f"{path}: a category is not a number ({exc}).") from exc


def prepare_image(image: Image.Image, size: int) -> np.ndarray:
    """One image as the model wants it: HxWx3 float32 BGR 0..255, white-padded square of ``size``."""
    if image.mode not in ("RGB", "RGBA"):
        has_alpha = "transparency" in image.info or image.mode in ("LA", "PA")
        image = image.convert("RGBA" if has_alpha else "RGB")
    if image.mode == "RGBA":
        canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
        canvas.alpha_composite(image)
        image = canvas.convert("RGB")
    side = max(image.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    if side != size:
        square = square.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(square, dtype=np.float32)[:, :, ::-1]


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise UserError(INSTALL_HINT) from exc
    return onnxruntime


def _default_providers(ort: Any) -> list[str]:
    available = ort.get_available_providers()
    preferred = ["CUDAExecutionProvider", "ROCMExecutionProvider", "CoreMLExecutionProvider",
                 "DmlExecutionProvider"]
    return [p for p in preferred if p in available] + ["CPUExecutionProvider"]


class WD14Tagger:
    """Tags images with a WD14-format ONNX model; ``label`` returns comma-separated tags, best first."""

    tag_style = True

    def __init__(self, folder: Path | str, options: TaggerOptions | None = None) -> None:
        self.folder = Path(folder).expanduser().absolute()
        self.options = options or TaggerOptions()
        model, tags = self.folder / "model.onnx", self.folder / "selected_tags.csv"
        for need in (model, tags):
            if not need.is_file():
                raise UserError(f"tagger folder {self.folder} has no {need.name}: a WD14 tagger folder holds "
                                "model.onnx and selected_tags.csv (e.g. SmilingWolf/wd-vit-tagger-v3).")
        ort = _import_onnxruntime()
        self.labels = read_selected_tags(tags)
        providers = self.options.providers or _default_providers(ort)
        try:
            self.session = ort.InferenceSession(str(model), providers=providers)
        except Exception as exc:  # onnxruntime raises its own types for a bad file
            raise UserError(f"{model} cannot be loaded by onnxruntime ({exc}).") from exc
        shape = self.session.get_inputs()[0].shape  # [batch, height, width, 3]
        self.input_name = self.session.get_inputs()[0].name
        self.size = shape[1] if isinstance(shape[1], int) else DEFAULT_SIZE
        fixed_batch = shape[0] if isinstance(shape[0], int) else 0
        self.batch_size = fixed_batch or max(1, self.options.batch_size)
        outputs = self.session.get_outputs()[0].shape
        if isinstance(outputs[-1], int) and outputs[-1] != len(self.labels):
            raise UserError(f"{model} predicts {outputs[-1]} tags but {tags} lists {len(self.labels)}: the "
                            "two files come from different models.")
        excluded = set(self.options.exclude)
        self._excluded = excluded | {t.replace(" ", "_") for t in excluded}

    def settings(self) -> dict[str, Any]:
        o = self.options
        return {"tagger": str(self.folder), "general_threshold": o.general_threshold,
                "character_threshold": o.character_threshold, "exclude": sorted(o.exclude),
                "underscores_to_spaces": o.underscores_to_spaces, "include_ratings": o.include_ratings}

    def _name(self, tag: str) -> str:
        if self.options.underscores_to_spaces and tag not in KAOMOJIS:
            return tag.replace("_", " ")
        return tag

    def tags_from_scores(self, scores: np.ndarray) -> list[str]:
        """Character tags, then general tags, each by descending score above its threshold."""
        o = self.options
        picked: dict[int, list[tuple[float, str]]] = {GENERAL: [], CHARACTER: [], RATING: []}
        for label, score in zip(self.labels, scores.tolist(), strict=False):
            if label.name in self._excluded or label.category not in picked:
                continue
            threshold = {GENERAL: o.general_threshold, CHARACTER: o.character_threshold}.get(label.category)
            if threshold is None or score > threshold:
                picked[label.category].append((score, label.name))
        out = [name for _s, name in sorted(picked[CHARACTER], key=lambda p: -p[0])]
        out += [name for _s, name in sorted(picked[GENERAL], key=lambda p: -p[0])]
        if o.include_ratings and picked[RATING]:
            out.append(max(picked[RATING])[1])
        return [self._name(t) for t in out]

    def scores(self, images: list[Image.Image]) -> np.ndarray:
        batch = np.stack([prepare_image(im, self.size) for im in images])
        (probs,) = self.session.run(None, {self.input_name: batch})[:1]
        return np.asarray(probs, dtype=np.float32)

    def label(self, images: list[Image.Image]) -> list[str]:
        return [", ".join(self.tags_from_scores(row)) for row in self.scores(images)]
