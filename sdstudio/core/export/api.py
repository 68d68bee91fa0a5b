"""One entry point for every export format (the CLI, the app and the run's auto-export call it)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from .source import load_export_source


def export(source_path: Path, fmt: str, out: Path, *, dtype: torch.dtype = torch.float16, use_ema: bool = False,
           force: bool = False, best: bool = False) -> Path:
    source = load_export_source(source_path, use_ema=use_ema, best=best)
    if fmt in ("kohya", "diffusers"):
        if source.family == "pixel":
            raise UserError(f"{source.checkpoint}: a from-scratch (pixel) model has no LoRA; export it as "
                            "diffusers-folder")
        from .lora import export_diffusers_lora, export_kohya_lora

        writer = export_kohya_lora if fmt == "kohya" else export_diffusers_lora
        return writer(source, out, dtype=dtype, force=force)
    if fmt in ("single-file", "diffusers-folder") and source.family == "pixel":
        if fmt == "single-file":
            raise UserError(f"{source.checkpoint}: a from-scratch (pixel) model has no single-file layout that "
                            "A1111 / ComfyUI could load; export it as diffusers-folder")
        from .pixel_folder import export_pixel_folder

        return export_pixel_folder(source, out, dtype=dtype, force=force)
    if fmt in ("single-file", "diffusers-folder"):
        from .full_model import export_diffusers_folder, export_single_file

        writer = export_single_file if fmt == "single-file" else export_diffusers_folder
        return writer(source, out, dtype=dtype, force=force)
    raise UserError(f"--format {fmt}: unknown; use kohya, diffusers, single-file or diffusers-folder")
