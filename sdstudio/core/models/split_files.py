"""Reading the split single files of the transformer families (Flux, SD3, Chroma: a transformer file plus
separate text-encoder and VAE files, as ComfyUI and kohya users keep them): what a file looks like (for the
message that refuses a wrong one), reading it, and copying it into a model built without initialising its
weights. Moved here from ``flux/files.py`` so every family shares one copy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .family import ModelFileError

Tensors = dict[str, torch.Tensor]

# keys only a Flux transformer in the original layout has (with or without ComfyUI's prefix)
FLUX_ORIGINAL_MARKERS = ("double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight")
TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def describe_keys(keys: list[str]) -> str:
    """What a safetensors file with these keys looks like, for an error message."""
    ks = set(keys)
    if any(k.startswith("lora_") or ".lora_" in k or "lora_A" in k or "lora_down" in k for k in keys):
        return "a LoRA"
    if any(k.startswith(("model.diffusion_model.input_blocks", "conditioner.embedders")) for k in keys):
        return "a Stable Diffusion (SD1/SD2/SDXL) checkpoint"
    if any("joint_blocks." in k for k in keys):
        return "an SD3 transformer"
    if any(k.startswith(("encoder.block.", "shared.")) for k in keys):
        return "a T5 text encoder"
    if any("encoder.layers." in k and "self_attn" in k for k in keys):
        return "a CLIP text encoder"
    if any(k.startswith(("encoder.down.", "decoder.up.", "encoder.down_blocks", "decoder.up_blocks")) for k in keys):
        return "a VAE"
    if any("distilled_guidance_layer." in k for k in keys):  # Flux's blocks with Chroma's approximator
        return "a Chroma transformer"
    if ks & set(FLUX_ORIGINAL_MARKERS) or any(k.endswith(FLUX_ORIGINAL_MARKERS) for k in keys):
        return "a Flux transformer"
    return "not a model sdstudio knows"


def strip_prefix(state: Tensors, prefixes: tuple[str, ...] = TRANSFORMER_PREFIXES) -> Tensors:
    """The transformer's own key names (without ``model.diffusion_model.`` / ComfyUI's ``diffusion_model.``)."""
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in state):
            return {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def file_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return list(fh.keys())
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad files
        raise ModelFileError(f"{path}: not a readable safetensors file ({exc})") from None


def read_tensors(path: Path) -> Tensors:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001
        raise ModelFileError(f"{path}: not a readable safetensors file ({exc})") from None


def load_into(module: torch.nn.Module, state: Tensors, what: str, path: Path,
              allowed_missing: tuple[str, ...] = ()) -> None:
    """Copy ``state`` into ``module`` (cast to its dtype: an fp8 file goes straight to the module's dtype)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith(allowed_missing)]
    wrong = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or wrong:
        looks = describe_keys(list(state))
        detail = f"missing {missing[:3]}" if missing else f"shape of {wrong[:3]} differs"
        raise ModelFileError(f"{path}: does not fit the {what} ({detail}); it looks like {looks}")
    # extra tensors (text projections, position ids) are not used
    with torch.no_grad():
        for k, v in state.items():
            if k in own:
                own[k].copy_(v.to(own[k].dtype))


def empty_model(cls: Any, config: Any) -> Any:
    """A model built without initialising its weights (they are all loaded next)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = cls(**config) if isinstance(config, dict) else cls(config)
    return model.to_empty(device="cpu")


def file_stamps(source: str) -> list[str]:
    """Path, size and modification time of a source file (or every .safetensors of a folder): part of a cache
    identity, so a replaced file is encoded anew."""
    if not source:
        return []
    path = Path(source)
    files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
    return [f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.exists()]
