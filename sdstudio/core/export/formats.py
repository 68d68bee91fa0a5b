"""Every export format in one table, and the one dtype map: the config, `sdstudio export`, the app's export
dialog and ``api.export`` all read these. Whether a format fits a run is asked of its model family
(``ModelFamily.unsupported_exports``) and of the run's training mode (LoRA or full fine-tune)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from ..models.family import ModelFamily

_LORA_ONLY = ("LoRA formats export a LoRA but this run trains none: it trains the full model, not a LoRA "
              "(lora.enabled = false); export it as a single file or a diffusers folder.")


@dataclass(frozen=True)
class ExportFormat:
    name: str  # export.formats, --format
    label: str  # what the app's dialog shows
    folder: bool  # a folder (else one .safetensors file)
    writer: str  # "module:function" in core/export/, unless the family names its own (export_writers, full path)
    lora_only: bool = False  # only a LoRA run has something to write
    merges_lora: bool = False  # a LoRA run is merged into its base model

    @property
    def suffix(self) -> str:
        """What the output's name ends with ("" for a folder)."""
        return "" if self.folder else ".safetensors"


EXPORT_FORMATS: dict[str, ExportFormat] = {f.name: f for f in (
    ExportFormat("kohya", "kohya LoRA (.safetensors for A1111, Forge, ComfyUI)", folder=False,
                 writer="lora:export_kohya_lora", lora_only=True),
    ExportFormat("diffusers", "diffusers LoRA (.safetensors for diffusers' load_lora_weights)", folder=False,
                 writer="lora:export_diffusers_lora", lora_only=True),
    ExportFormat("single-file", "single file (.safetensors in the original layout for A1111, ComfyUI)",
                 folder=False, writer="full_model:export_single_file", merges_lora=True),
    ExportFormat("diffusers-folder", "diffusers folder (a pipeline folder for from_pretrained)", folder=True,
                 writer="full_model:export_diffusers_folder", merges_lora=True),
)}
FORMAT_NAMES: tuple[str, ...] = tuple(EXPORT_FORMATS)

# export.dtype, --dtype and the dialog's choices, first the default
DTYPE_NAMES: tuple[str, ...] = ("fp16", "bf16", "fp32")


def torch_dtype(name: str) -> torch.dtype:
    """"fp16" / "bf16" / "fp32" -> the torch dtype."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def get_format(name: str) -> ExportFormat:
    from ..errors import UserError

    try:
        return EXPORT_FORMATS[name]
    except KeyError:
        raise UserError(f"--format {name}: unknown; use {', '.join(FORMAT_NAMES)}") from None


def export_problem(fmt: str, family: ModelFamily, lora: bool) -> str:
    """Why ``fmt`` does not fit a run of ``family`` (a LoRA run when ``lora``), as a sentence; "" when it does."""
    found = get_format(fmt)
    if fmt in family.unsupported_exports:
        return family.unsupported_exports[fmt]
    return _LORA_ONLY if found.lora_only and not lora else ""


def writer_for(fmt: str, family: ModelFamily) -> Callable[..., Any]:
    """The function that writes ``fmt`` for ``family``: ``writer(source, out, *, dtype, force) -> Path``."""
    spec = family.export_writers.get(fmt) or get_format(fmt).writer
    module, _, function = spec.partition(":")
    # a family's own writer is named by its full module path ("sdstudio.core.models.flux.export:...")
    module = module if module.startswith("sdstudio.") else f"{__package__}.{module}"
    return getattr(importlib.import_module(module), function)
