"""Full-model exports of a Stable Diffusion run: a single file in the original (LDM) layout for A1111 /
ComfyUI / `from_single_file`, or a diffusers pipeline folder. A LoRA run is merged into its base model (a
text-encoder LoRA into the text encoder(s)); a full fine-tune that trained the text encoder(s) carries them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..atomic import write_folder_atomic
from ..errors import UserError
from ..models.registry import get_family
from .metadata import training_metadata
from .source import ExportSource


def _merge_lora(unet: torch.nn.Module) -> None:
    """Fold every peft LoRA layer into its base weight and put the base layer back in its place."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(unet.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = unet.get_submodule(parent_name) if parent_name else unet
            setattr(parent, child, module.get_base_layer())


def trained_components(source: ExportSource) -> Any:
    """The base model with the run's trained weights (LoRAs merged, text encoders' too), on the CPU, fp32."""
    config = source.config.with_overrides({"train.mixed_precision": "no"})
    bundle = get_family(source.family).build(config, [], device=torch.device("cpu"))
    bundle.load_trainable_state(source.weights, source.checkpoint)
    comps = bundle.components  # type: ignore[attr-defined]
    if bundle.lora:  # type: ignore[attr-defined]
        _merge_lora(comps.unet)
        if bundle.train_text:  # type: ignore[attr-defined]  # a text-encoder LoRA is folded in the same way
            for module in bundle.text_encoders().values():  # type: ignore[attr-defined]
                _merge_lora(module)
    # a full fine-tune with train.train_text_encoder loaded the trained encoder weights into these modules
    for module in (comps.unet, comps.vae, comps.text_encoder, comps.text_encoder_2):
        if module is not None:
            module.to(torch.float32).eval()
    return comps


def export_single_file(source: ExportSource, path: Path, *, dtype: torch.dtype = torch.float16,
                       force: bool = False) -> Path:
    from .single_file import write_single_file

    if path.exists() and not force:
        raise UserError(f"{path}: exists already; choose another `out` or pass `force` to overwrite it")
    comps = trained_components(source)
    meta = training_metadata(source, title=path.stem, lora=False)
    pred = source.architecture.get("prediction_type", "epsilon")
    return write_single_file(comps, path, family=source.family, dtype=dtype, metadata=meta, force=force,
                             v_prediction=pred == "v_prediction")


def check_folder_target(folder: Path, force: bool) -> None:
    """Where a diffusers-folder export may go: a new or empty folder, or (with ``force``) an earlier export.
    ``force`` never replaces a folder that is not a pipeline folder (it may hold the user's other files)."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: is a file; a diffusers-folder export needs a folder as `out`")
    if not folder.exists() or not any(folder.iterdir()):
        return
    if not force:
        raise UserError(f"{folder}: exists and is not empty; choose another `out` or pass `force`")
    if not (folder / "model_index.json").is_file():
        raise UserError(f"{folder}: not replaced even with `force`: it is not a diffusers pipeline folder (no "
                        "model_index.json) and may hold other files; choose a new or empty folder as `out`")


def export_diffusers_folder(source: ExportSource, folder: Path, *, dtype: torch.dtype = torch.float16,
                            force: bool = False) -> Path:
    """A complete pipeline folder (`from_pretrained`), written next to its final place and renamed."""
    from diffusers import DDPMScheduler

    check_folder_target(folder, force)
    comps = trained_components(source)
    sched = DDPMScheduler.from_config(comps.scheduler_config)
    for module in (comps.unet, comps.vae, comps.text_encoder, comps.text_encoder_2):
        if module is not None:
            module.to(dtype)
    pipe = get_family(source.family).pipeline(comps, sched)  # type: ignore[attr-defined]
    try:
        return write_folder_atomic(folder, lambda tmp: pipe.save_pretrained(str(tmp), safe_serialization=True))
    except OSError as exc:
        raise UserError(f"{folder}: could not write the export ({exc.strerror or exc}); nothing was written") from None
