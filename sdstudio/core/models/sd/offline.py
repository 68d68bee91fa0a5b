"""The bundled, weightless Stable Diffusion config folders and CLIP tokenizers (no network needed).

``resources/models/<name>/`` are diffusers-format folders with configs only, for
``from_single_file(path, config=config_folder(...), tokenizer=..., local_files_only=True)``. CLIP's BPE files
(vocab.json, merges.txt, 1.4 MB together) exist once, in ``resources/tokenizers/clip/``: every other tokenizer
folder (``tokenizers/clip-g/``, ``models/<name>/tokenizer*/``) holds only its tokenizer_config.json and
special_tokens_map.json (the pad token is what differs), so load those with ``load_clip_tokenizer`` or pass
``config_folder_tokenizers(folder)`` to diffusers. docs/models.md says where they come from;
scripts/make_*.py regenerate them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from sdstudio.core.errors import UserError
from sdstudio.core.paths import resources_dir

# family -> bundled folder; SD2 has two published variants that differ in more than the prediction type
# (768 px v-prediction with fp32-upcast attention vs 512 px epsilon), so its prediction picks the folder.
_SD2_BY_PREDICTION = {"v_prediction": "sd21-768-v", "epsilon": "sd2-base"}
_FOLDERS = {"sd1": "sd15", "sdxl": "sdxl-base"}
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def models_dir() -> Path:
    return resources_dir() / "models"


def tokenizers_dir() -> Path:
    return resources_dir() / "tokenizers"


def config_folder(family: str, prediction: str | None = None) -> Path:
    """The bundled config folder for a Stable Diffusion family ("sd1", "sd2", "sdxl").

    ``prediction`` (None when the checkpoint does not say) only chooses between the SD2 variants: SD2 files
    are v-prediction (SD2.1 768) unless known to be epsilon (SD2.1-base 512). For SD1 and SDXL the folder's
    scheduler is epsilon; a v-prediction checkpoint of those families needs the caller to override the
    scheduler's ``prediction_type``.
    """
    if prediction is not None and prediction not in PREDICTION_TYPES:
        raise UserError(f"prediction type {prediction!r} is not one of {', '.join(PREDICTION_TYPES)}")
    if family == "sd2":
        name = _SD2_BY_PREDICTION.get(prediction or "v_prediction", "sd21-768-v")
    elif family in _FOLDERS:
        name = _FOLDERS[family]
    else:
        raise UserError(f"no bundled config for model family {family!r}; expected one of sd1, sd2, sdxl")
    folder = models_dir() / name
    if not (folder / "model_index.json").is_file():
        raise UserError(f"the bundled model config {folder} is missing; reinstall sdstudio or run "
                        "scripts/make_model_configs.py in a source checkout")
    return folder


def clip_tokenizer_folder(kind: Literal["l", "g"] = "l") -> Path:
    """Folder of the CLIP tokenizer: "l" (CLIP ViT-L, pads with EOS) or "g" (OpenCLIP H/bigG, pads with "!")."""
    names = {"l": "clip", "g": "clip-g"}
    if kind not in names:
        raise ValueError(f"kind must be 'l' or 'g', not {kind!r}")
    return tokenizers_dir() / names[kind]


def clip_bpe_files() -> tuple[Path, Path]:
    """(vocab.json, merges.txt): the one copy of CLIP's BPE, shared by every bundled tokenizer."""
    folder = clip_tokenizer_folder("l")
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        raise UserError(f"the bundled CLIP tokenizer {folder} is missing; reinstall sdstudio or run "
                        "scripts/make_clip_tokenizer.py in a source checkout")
    return vocab, merges


def load_clip_tokenizer(folder: Path):  # -> transformers.CLIPTokenizer
    """A CLIP tokenizer from a folder of tokenizer_config.json / special_tokens_map.json, with the shared BPE
    files (a folder that has its own vocab.json, such as a user's config folder, is loaded as it is)."""
    from transformers import CLIPTokenizer

    if (folder / "vocab.json").is_file():
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    vocab, merges = clip_bpe_files()
    return CLIPTokenizer.from_pretrained(folder, vocab_file=str(vocab), merges_file=str(merges),
                                         local_files_only=True)


def clip_tokenizer(kind: Literal["l", "g"] = "l"):  # -> transformers.CLIPTokenizer
    """The bundled CLIP tokenizer: "l" for SD1.x / SDXL ``tokenizer``, "g" for SD2.x / SDXL ``tokenizer_2``."""
    clip_bpe_files()  # a clear message if the resources are missing
    return load_clip_tokenizer(clip_tokenizer_folder(kind))


def config_folder_tokenizers(folder: Path) -> dict[str, object]:
    """``{"tokenizer": ..., "tokenizer_2": ...}`` for the tokenizer subfolders of a diffusers config folder,
    to pass to ``from_single_file(..., config=folder)``: the bundled folders have no BPE files of their own,
    so diffusers could not load their tokenizers by itself."""
    return {name: load_clip_tokenizer(folder / name) for name in ("tokenizer", "tokenizer_2")
            if (folder / name / "tokenizer_config.json").is_file()}
