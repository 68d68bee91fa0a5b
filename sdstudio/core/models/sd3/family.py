"""The SD3 / SD3.5 family (model.family = "sd3"): Stable Diffusion 3 medium, 3.5 medium and 3.5 large. One
family, told apart by the files' keys (``files.variant_of_keys``); the variant decides the memory profile and
the export metadata (``for_variant``). Flow matching like Flux (``core/flow.py``) with SD3's fixed shift of 3,
real classifier-free guidance (no guidance input), three text encoders (CLIP-L, CLIP-G, T5-XXL)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from ..family import FlowDefaults, ModelFileError, SamplingDefaults
from ..transformer_family import TransformerFamily
from .model import LORA_TARGETS

_NO_FULL_EXPORT = ("an SD3 run exports its transformer as a single file (single-file: the LoRA merged in or the full "
                   "fine-tune's weights, original key names) or its LoRA (diffusers, the default, or kohya); a "
                   "diffusers folder is not written yet.")


@dataclass(frozen=True)
class Variant:
    title: str
    kohya_base_version: str  # ss_base_model_version as the ecosystem writes it
    modelspec_architecture: str  # sd-scripts: "stable-diffusion-3-" + its model type ("3-5-large", ...)
    activation_bytes_per_pixel: float  # not measured on a GPU yet: upper guesses (bf16, per latent pixel)


VARIANTS: dict[str, Variant] = {
    "3-medium": Variant("SD3 medium", "sd3_medium", "stable-diffusion-3-3-medium", 0.5e6),
    "3.5-medium": Variant("SD3.5 medium", "sd3.5_medium", "stable-diffusion-3-3-5-medium", 0.6e6),
    "3.5-large": Variant("SD3.5 large", "sd3.5_large", "stable-diffusion-3-3-5-large", 1.0e6),
}


class SD3Family(TransformerFamily):
    name = "sd3"
    title = "Stable Diffusion 3 / 3.5"
    short_title = "SD3.5"
    # SD3's scheduler: a fixed shift of 3 (flow.shift = "auto" trains with it too)
    flow = FlowDefaults(shift=3.0, dynamic=False)
    sampling = SamplingDefaults(sampler="euler", steps=28, guidance=4.5)
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")  # CLIP-L, CLIP-G, T5-XXL
    lora_targets = LORA_TARGETS  # type: ignore[assignment]  # peft regexes
    sampling_file_keys = ("model.text_encoder_path", "model.clip_g_path",
                          "model.text_encoder_2_path", "model.vae_path")
    default_lora_targets = "attention"
    config_name = "SD3"  # the config refusals' word for every variant
    # kohya names: lora_te1_ = CLIP-L, lora_te2_ = CLIP-G, lora_te3_ = T5 (as sd-scripts writes them for SD3)
    kohya_text_prefixes: ClassVar[Mapping[str, str]] = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2",
                                                        "text_encoder_3": "lora_te3"}
    activation_bytes_per_pixel = VARIANTS["3.5-large"].activation_bytes_per_pixel  # until the variant is known
    kohya_base_version = "sd3.5_large"
    modelspec_architecture = "stable-diffusion-3-3-5-large"
    lora_metadata_markers = ("sd3", "stable-diffusion-3")
    unsupported_exports: ClassVar[Mapping[str, str]] = {"diffusers-folder": _NO_FULL_EXPORT}
    export_writers: ClassVar[Mapping[str, str]] = {
        "single-file": "sdstudio.core.models.sd3.export:export_single_file",
        "kohya": "sdstudio.core.models.sd3.export:export_kohya_lora",
        "diffusers": "sdstudio.core.models.sd3.export:export_diffusers_lora"}
    file_reader = "sdstudio.core.models.sd3.files:model_variant"
    model_builder = "sdstudio.core.models.sd3.model:build_sd3_model"
    sampling_loader = "sdstudio.core.models.sd3.sampling:load_sd3_for_sampling"
    pipeline_class = "StableDiffusion3Pipeline"
    pipeline_components = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
                           "tokenizer_3", "transformer")

    def for_variant(self, variant: str) -> SD3Family:
        """This family with one variant's facts (title, memory profile, export metadata)."""
        return _variant_family(variant)


@functools.cache
def _variant_family(variant: str) -> SD3Family:
    if variant not in VARIANTS:
        raise ModelFileError(f"SD3: unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    v = VARIANTS[variant]
    cls = type(f"SD3Family_{variant.replace('-', '_').replace('.', '')}", (SD3Family,), {
        "title": v.title, "short_title": v.title, "kohya_base_version": v.kohya_base_version,
        "modelspec_architecture": v.modelspec_architecture,
        "activation_bytes_per_pixel": v.activation_bytes_per_pixel})
    return cls()
