"""Recognising and loading Stable Diffusion base models, offline: a diffusers folder or a single
.safetensors/.ckpt file in the original (LDM) layout, with the config folders sdstudio ships."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..family import ModelFileError

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
UNET_PREFIX = "model.diffusion_model."  # the UNet's tensors in an original (LDM) single file


@dataclass(frozen=True)
class ModelFileInfo:
    kind: str  # "sd1" | "sd2" | "sdxl" | "lora" | "vae" | "unet" | "unknown"
    prediction_type: str | None  # "epsilon" | "v_prediction" | None when the file does not say
    zero_terminal_snr: bool
    metadata: dict[str, str]
    detail: str = ""


def _read_keys(path: Path) -> tuple[list[str], dict[str, str]]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                return list(fh.keys()), dict(fh.metadata() or {})
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad files
            raise ModelFileError(f"{path}: not a readable safetensors file ({exc}); a truncated or interrupted "
                                 "download? Download it again") from None
    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - pickle/zip errors of every kind
        raise ModelFileError(f"{path}: cannot be read as a PyTorch checkpoint ({str(exc).splitlines()[0]}); "
                             "a truncated download, or a pickle that needs code (use a .safetensors file)") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ModelFileError(f"{path}: holds a {type(data).__name__}, not a state dict")
    return [str(k) for k in data], {}


def classify_keys(keys: list[str]) -> tuple[str, str]:
    """(kind, detail) from state-dict key names alone."""
    ks = set(keys)
    has = lambda prefix: any(k.startswith(prefix) for k in ks)
    if has("lora_unet_") or has("lora_te") or any(".lora_A." in k or ".lora_down." in k for k in ks):
        return "lora", "a LoRA (load it on top of a base model instead)"
    if has("model.diffusion_model."):
        if has("conditioner.embedders.1."):
            return "sdxl", "SDXL"
        if has("cond_stage_model.model."):
            return "sd2", "SD 2.x (OpenCLIP text encoder)"
        if has("cond_stage_model.transformer."):
            return "sd1", "SD 1.x (CLIP-L text encoder)"
        return "unet", "a UNet without text encoder/VAE (not a complete checkpoint)"
    if has("encoder.down.") or has("first_stage_model.") or has("decoder.up."):
        return "vae", "a VAE (set it as model.vae_path instead)"
    if has("down_blocks.") and has("conv_in."):
        return "unet", "a diffusers UNet state dict (use the whole diffusers folder instead)"
    sample = ", ".join(sorted(ks)[:3]) if ks else "no tensors"
    return "unknown", f"not a Stable Diffusion checkpoint (keys such as {sample})"


def inspect_model_file(path: Path) -> ModelFileInfo:
    keys, meta = _read_keys(path)
    kind, detail = classify_keys(keys)
    pred = None
    if "v_pred" in keys:
        pred = "v_prediction"
    spec = meta.get("modelspec.prediction_type", "").lower()
    if spec in ("v", "v_prediction", "v-prediction"):
        pred = "v_prediction"
    elif spec in ("epsilon", "eps"):
        pred = "epsilon"
    return ModelFileInfo(kind, pred, "ztsnr" in keys, meta, detail)


def inspect_model_folder(path: Path) -> ModelFileInfo:
    index = path / "model_index.json"
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{path}: not a diffusers model folder (model_index.json: {exc})") from None
    cls = str(data.get("_class_name", ""))
    if "XL" in cls:
        kind = "sdxl"
    else:
        try:
            te = json.loads((path / "text_encoder" / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            te = {}
        # SD2's text encoder is OpenCLIP-H (1024 wide, gelu); SD1's is CLIP-L (quick_gelu)
        kind = "sd2" if int(te.get("hidden_size", 768)) == 1024 or te.get("hidden_act") == "gelu" else "sd1"
    pred = None
    try:
        sched = json.loads((path / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
        pred = sched.get("prediction_type")
        ztsnr = bool(sched.get("rescale_betas_zero_snr", False))
    except (OSError, ValueError):
        ztsnr = False
    return ModelFileInfo(kind, pred, ztsnr, {}, cls)


def inspect_model(path: Path) -> ModelFileInfo:
    if not path.exists():
        raise ModelFileError(f"model.path {path}: no such file or folder")
    if path.is_dir():
        return inspect_model_folder(path)
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise ModelFileError(f"model.path {path}: expected a .safetensors/.ckpt file or a diffusers folder")
    return inspect_model_file(path)


@dataclass
class SDComponents:
    family: str
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict[str, Any]
    prediction_type: str
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    zero_terminal_snr: bool = False  # the file says so (a `ztsnr` marker key or its scheduler config)


def load_sd_components(path: Path, *, family: str, config_folder: Path | None = None,
                       vae_path: Path | None = None, prediction_override: str = "auto") -> SDComponents:
    """Load UNet, VAE, text encoder(s) and tokenizer(s); never touches the network."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()  # sdstudio reports its own phases
    transformers_logging.disable_progress_bar()

    from ..registry import FAMILY_NAMES, get_family
    from .offline import config_folder as bundled_config_folder
    from .offline import config_folder_tokenizers

    info = inspect_model(path)
    if info.kind not in FAMILY_NAMES:
        raise ModelFileError(f"model.path {path}: this is {info.detail}, not a Stable Diffusion checkpoint")
    if info.kind != family:
        raise ModelFileError(f"model.path {path} is {info.kind} but model.family = {family!r}; set "
                             f"model.family = {info.kind!r} (or pick the matching preset)")
    pred = prediction_override if prediction_override != "auto" else (info.prediction_type or None)
    sd_family = get_family(family)
    pipe_cls = sd_family.pipeline_class()  # type: ignore[attr-defined]
    extra = {k: v for k, v in sd_family.pipeline_extras.items()  # type: ignore[attr-defined]
             if k in ("safety_checker", "requires_safety_checker")}
    try:
        if path.is_dir():
            pipe = pipe_cls.from_pretrained(str(path), local_files_only=True, **extra)
        else:
            folder = config_folder or bundled_config_folder(family, pred)
            pipe = pipe_cls.from_single_file(str(path), config=str(folder), local_files_only=True, **extra,
                                             **config_folder_tokenizers(folder))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelFileError(f"model.path {path}: could not be loaded as {family} ({str(exc).splitlines()[0]})") from None
    if vae_path is not None:
        from diffusers import AutoencoderKL

        try:
            vae = (AutoencoderKL.from_pretrained(str(vae_path), local_files_only=True) if vae_path.is_dir()
                   else AutoencoderKL.from_single_file(str(vae_path), config=str(_vae_config(pipe)),
                                                       local_files_only=True))
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ModelFileError(f"model.vae_path {vae_path}: could not be loaded as a VAE ({exc})") from None
        pipe.vae = vae
    sched_cfg = dict(pipe.scheduler.config)
    prediction = pred or sched_cfg.get("prediction_type", "epsilon")
    return SDComponents(family=family, unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder,
                        tokenizer=pipe.tokenizer, scheduler_config=sched_cfg, prediction_type=prediction,
                        text_encoder_2=getattr(pipe, "text_encoder_2", None),
                        tokenizer_2=getattr(pipe, "tokenizer_2", None),
                        zero_terminal_snr=info.zero_terminal_snr or bool(sched_cfg.get("rescale_betas_zero_snr")))


def stored_fp8_unet_weights(path: Path, unet_config: Any) -> dict[str, Any]:
    """The UNet weights a single .safetensors file stores in float8 e4m3fn (2-D: linear layers), by their
    diffusers names; {} for folders and files in other dtypes. Read from the file, not from the loaded UNet (which
    diffusers builds in fp32), so ``model.quantize = 'fp8'`` can keep them as they are."""
    if path.is_dir() or path.suffix.lower() != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        keys = [k for k in fh.keys() if k.startswith(UNET_PREFIX)]
        if not any(fh.get_slice(k).get_dtype() == "F8_E4M3" for k in keys):
            return {}
        state = {k: fh.get_tensor(k) for k in keys}
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from ..quantize import stored_fp8_weights

    return stored_fp8_weights(convert_ldm_unet_checkpoint(state, dict(unet_config)))


def _vae_config(pipe: Any) -> Path:
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="sdstudio-vae-"))
    pipe.vae.save_config(str(folder))
    return folder
