"""One entry point for every export format (the CLI, the app and the run's auto-export call it)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from ..models.registry import get_family
from .formats import export_problem, writer_for
from .source import load_export_source


def export(source_path: Path, fmt: str, out: Path, *, dtype: torch.dtype = torch.float16, use_ema: bool = False,
           force: bool = False, best: bool = False) -> Path:
    source = load_export_source(source_path, use_ema=use_ema, best=best)
    family = get_family(source.family)
    problem = export_problem(fmt, family, lora=source.lora is not None)
    if problem:
        raise UserError(f"{source.checkpoint}: cannot export as {fmt}. {problem}")
    return writer_for(fmt, family)(source, out, dtype=dtype, force=force)
