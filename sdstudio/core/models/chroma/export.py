"""Chroma's merged export: ``single-file``, the transformer (a LoRA merged in) in the original key names, as
``Chroma1-HD.safetensors`` is shared (Flux's block names through ``flux/files.py``'s tables plus Chroma's
approximator, ``files.diffusers_to_original``). Its LoRA exports are Flux's writers (``family.py``)."""

from __future__ import annotations

from pathlib import Path

import torch

from ...export.source import ExportSource


def export_single_file(source: ExportSource, path: Path, *, dtype: torch.dtype = torch.float16,
                       force: bool = False) -> Path:
    """What ComfyUI's diffusion-model loader, diffusers' ``ChromaTransformer2DModel.from_single_file`` and
    sdstudio's own ``model.path`` read (the run's adapter merged by the generic merge Flux's export uses)."""
    from ..flux.export import write_merged_transformer
    from .files import diffusers_to_original

    return write_merged_transformer(source, path, diffusers_to_original,
                                    implementation="https://huggingface.co/lodestones/Chroma", dtype=dtype,
                                    force=force)
