"""The facts of the Stable Diffusion families and the hooks they share (one class each: SD1.x, SD2.x, SDXL).

They share their code (``files.py``, ``model.py``); what differs between them is the data below."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..family import ModelFamily, SamplingDefaults, SingleFileTextEncoder

if TYPE_CHECKING:
    import torch

    from ...config import RunConfig
    from ...sampling.from_files import LoadedBaseModel
    from .model import SDBundle

# peft target_modules of the UNet LoRA, per lora.targets
LORA_TARGETS: dict[str, list[str]] = {
    "attention": ["to_q", "to_k", "to_v", "to_out.0"],
    "attention_ff": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"],
    "all": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1", "conv2",
            "conv_shortcut", "time_emb_proj", "conv"],
}
# the original (LDM / sgm) single-file key prefixes of the text encoders
_SD1_CLIP = SingleFileTextEncoder("text_encoder", "clip_l", "cond_stage_model.transformer.")
_SD2_OPEN_CLIP = SingleFileTextEncoder("text_encoder", "open_clip", "cond_stage_model.model.")
_SDXL_CLIP_L = SingleFileTextEncoder("text_encoder", "clip_l", "conditioner.embedders.0.transformer.")
_SDXL_OPEN_CLIP = SingleFileTextEncoder("text_encoder_2", "open_clip", "conditioner.embedders.1.model.")


@functools.lru_cache(maxsize=16)
def _inspected_kind(path: str, mtime_ns: int, size: int) -> str:
    """What a model file or folder is ("sd1", "lora", "unknown", ...); cached, since every SD family asks."""
    from .files import inspect_model_file, inspect_model_folder

    p = Path(path)
    return (inspect_model_folder(p) if p.is_dir() else inspect_model_file(p)).kind


class StableDiffusionFamily(ModelFamily):
    """What SD1.x, SD2.x and SDXL share: a latent UNet with CLIP text encoder(s), fine-tuned from a base model."""

    space = "latent"
    sampling_file_keys = ("model.vae_path",)  # a separate VAE; the file holds the rest
    latent_downscale = 8
    objective = "diffusion"
    default_prediction_type = "epsilon"
    lora_targets = LORA_TARGETS
    default_lora_targets = "attention"
    sampling = SamplingDefaults(sampler="dpmpp_2m", steps=25, guidance=7.0)
    long_captions = True
    pipeline_class_name: ClassVar[str] = "StableDiffusionPipeline"
    # what the diffusers pipeline of this family is built with besides the models
    pipeline_extras: ClassVar[Mapping[str, Any]] = {"safety_checker": None, "feature_extractor": None,
                                                    "requires_safety_checker": False}

    def recognise(self, path: Path) -> bool:
        if path.is_dir():
            import json

            try:
                index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return False
            if not str(index.get("_class_name", "")).startswith("StableDiffusion") or "unet" not in index:
                return False
        else:
            from .files import SINGLE_FILE_SUFFIXES

            if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
                return False
        stat = path.stat()
        return _inspected_kind(str(path), stat.st_mtime_ns, stat.st_size) == self.name

    def build(self, config: RunConfig, captions: list[str], *, tokenizer_file: Path | None = None,
              device: torch.device | None = None) -> SDBundle:
        import torch

        from ...train.blockswap import build_placed
        from .model import build_sd_model

        device = device or torch.device("cpu")  # with block swap the UNet stays in CPU memory until it is set up
        return build_placed(config, device, lambda at: build_sd_model(config, device, denoiser_device=at))

    def load_for_sampling(self, path: Path, device: torch.device, *, lora: Path | None = None,
                          config_folder: Path | None = None, prediction_type: str = "auto",
                          files: Mapping[str, Path] | None = None) -> LoadedBaseModel:
        from ...sampling.from_files import load_sd_base

        return load_sd_base(path, self.name, device, lora=lora, config_folder=config_folder,
                            prediction_type=prediction_type, vae_path=(files or {}).get("model.vae_path"))

    def pipeline_class(self) -> Any:
        """The diffusers pipeline class (``save_lora_weights``, ``from_single_file``)."""
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def pipeline(self, components: Any, scheduler: Any) -> Any:
        """A diffusers pipeline around loaded modules (shared, not copied)."""
        parts = {"vae": components.vae, "unet": components.unet, "scheduler": scheduler}
        for index, name in enumerate(self.text_encoders):
            suffix = "" if index == 0 else f"_{index + 1}"
            parts[name] = getattr(components, name)
            parts[f"tokenizer{suffix}"] = getattr(components, f"tokenizer{suffix}")
        return self.pipeline_class()(**parts, **self.pipeline_extras)


class SD1Family(StableDiffusionFamily):
    name = "sd1"
    title = "Stable Diffusion 1.x"
    short_title = "SD 1.x"
    activation_bytes_per_pixel = 0.26e6  # SD1.5 512 px: ~1.07 GiB per image (64x64 latents), bf16, H200
    kohya_base_version = "sd_v1"
    modelspec_architecture = "stable-diffusion-v1"
    lora_metadata_markers = ("sd_v1", "stable-diffusion-v1")
    single_file_text_encoders = (_SD1_CLIP,)
    clip_skip_applies = True


class SD2Family(StableDiffusionFamily):
    name = "sd2"
    title = "Stable Diffusion 2.x"
    short_title = "SD 2.x"
    activation_bytes_per_pixel = 0.28e6
    kohya_base_version = "sd_v2"
    modelspec_architecture = "stable-diffusion-v2-768-v"
    lora_metadata_markers = ("sd_v2", "stable-diffusion-v2")
    single_file_text_encoders = (_SD2_OPEN_CLIP,)
    clip_skip_applies = True

    def base_model_version(self, prediction_type: str) -> str:
        # kohya tells the 768 px v-prediction SD2.x from the 512 px epsilon one
        return self.kohya_base_version + ("_768_v" if prediction_type == "v_prediction" else "")


class SDXLFamily(StableDiffusionFamily):
    name = "sdxl"
    title = "SDXL"
    short_title = "SDXL"
    text_encoders = ("text_encoder", "text_encoder_2")
    vae_needs_fp32_for_fp16 = True
    sampling = SamplingDefaults(sampler="dpmpp_2m", steps=25, guidance=6.0)
    activation_bytes_per_pixel = 0.45e6  # SDXL 1024 px: ~7.3 GiB per image (128x128 latents), bf16, H200
    kohya_base_version = "sdxl_base_v1-0"
    modelspec_architecture = "stable-diffusion-xl-v1-base"
    lora_metadata_markers = ("sdxl", "stable-diffusion-xl")
    # kohya's SDXL LoRA: CLIP-L = te1, OpenCLIP bigG = te2, UNet modules by their original-layout names
    kohya_text_prefixes: ClassVar[Mapping[str, str]] = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    kohya_unet_ldm_names = True
    single_file_text_encoders = (_SDXL_CLIP_L, _SDXL_OPEN_CLIP)
    unet_addition_embed_type = "text_time"
    pipeline_class_name = "StableDiffusionXLPipeline"
    pipeline_extras: ClassVar[Mapping[str, Any]] = {"add_watermarker": False}
