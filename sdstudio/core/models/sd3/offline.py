"""The configs and tokenizers sdstudio ships for SD3 / SD3.5, so split single files load with no network: the
published diffusers configs of stabilityai/stable-diffusion-3.5-medium and -large as config folders (no weights)
in ``resources/models/sd35-medium`` / ``sd35-large``, and the one copy of each tokenizer in
``resources/tokenizers/`` (CLIP-L ``clip/``, CLIP-G ``clip-g/``, T5 ``t5-v1_1-xxl/``). SD3 medium (3.0) is the
3.5-medium folder without the 3.5 additions (q/k norms, the second attention of the first 13 blocks)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...paths import resources_dir
from ..sd.offline import clip_tokenizer as _bundled_clip_tokenizer
from ..sd.offline import load_clip_tokenizer, tokenizers_dir

# what a file holds -> the shipped config folder whose topology it has
VARIANT_FOLDERS = {"3-medium": "sd35-medium", "3.5-medium": "sd35-medium", "3.5-large": "sd35-large"}


def config_folder(variant: str) -> Path:
    return resources_dir() / "models" / VARIANT_FOLDERS[variant]


def component_config(folder: Path | None, variant: str, component: str) -> dict[str, Any]:
    """``<component>/config.json`` of ``folder`` (a user's config folder) or of the shipped one."""
    base = folder if folder is not None else config_folder(variant)
    config = json.loads((base / component / "config.json").read_text(encoding="utf-8"))
    if folder is None and component == "transformer" and variant == "3-medium":
        config.update(qk_norm=None, dual_attention_layers=[], pos_embed_max_size=192)
    return config


def t5_tokenizer(folder: Path | None = None) -> Any:
    """The T5 tokenizer: a config folder's ``tokenizer_3/`` when it has one, else the bundled one."""
    from transformers import AutoTokenizer

    source = folder / "tokenizer_3" if folder is not None and (folder / "tokenizer_3").is_dir() \
        else tokenizers_dir() / "t5-v1_1-xxl"
    return AutoTokenizer.from_pretrained(str(source), local_files_only=True)


def clip_tokenizers(folder: Path | None = None) -> tuple[Any, Any]:
    """(CLIP-L, CLIP-G) tokenizers: a config folder's ``tokenizer/`` / ``tokenizer_2/``, else the bundled ones."""
    out = []
    for sub, kind in (("tokenizer", "l"), ("tokenizer_2", "g")):
        if folder is not None and (folder / sub / "tokenizer_config.json").is_file():
            out.append(load_clip_tokenizer(folder / sub))
        else:
            out.append(_bundled_clip_tokenizer(kind))  # type: ignore[arg-type]
    return out[0], out[1]
