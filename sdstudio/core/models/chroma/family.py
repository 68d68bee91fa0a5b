"""The Chroma family (lodestones' Chroma1-HD / Chroma1-Base): Flux.1-schnell pruned to 8.9B parameters and
de-distilled. Flux's blocks (19 double, 38 single) on Flux's 16-channel VAE latents, conditioned on T5-XXL only
(no CLIP, no guidance input), with the caption's padding masked in attention; per-block modulations come from
the approximator ("distilled_guidance_layer"). It samples with real classifier-free guidance and a negative
prompt. Loading, the bundle and sampling are in this package; the LoRA exports are Flux's writers (same block
names in both key layouts, ``flux/export.py``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

from ..family import FlowDefaults, SamplingDefaults
from ..flux.model import LORA_TARGETS
from ..transformer_family import TransformerFamily

if TYPE_CHECKING:
    from ...config import RunConfig

_NO_FULL_EXPORT = ("a Chroma run exports its transformer as a single file (single-file: the LoRA merged in or the "
                   "full fine-tune's weights, original key names) or its LoRA (diffusers or kohya); a diffusers "
                   "folder is not written yet.")


class ChromaFamily(TransformerFamily):
    name = "chroma"
    title = "Chroma"
    short_title = "Chroma"
    text_encoders = ("text_encoder",)  # T5-XXL (per-token states and its attention mask)
    lora_targets = LORA_TARGETS  # type: ignore[assignment]  # peft regexes; "all" = "attention_ff" here
    sampling_file_keys = ("model.text_encoder_2_path", "model.text_encoder_path", "model.vae_path")
    kohya_text_prefixes: ClassVar[Mapping[str, str]] = {"text_encoder": "lora_te3"}  # T5, as sd-scripts names it
    # Flux's transformer minus ~25 % of its parameters (no modulation linears): not measured on a GPU yet, so
    # Flux's upper guess (the activations are the same blocks at the same width)
    activation_bytes_per_pixel = 1.2e6
    # ChromaPipeline computes Flux's resolution-dependent shift (calculate_shift, 0.5 .. 1.15 over 256 .. 4096
    # image tokens) for every sampling run; training with flow.shift = "auto" uses the same
    flow = FlowDefaults(shift=3.0, dynamic=True, base_shift=0.5, max_shift=1.15)
    # Chroma1-HD's card and the peers: ~26-40 Euler steps at CFG ~4 with a negative prompt
    sampling = SamplingDefaults(sampler="euler", steps=30, guidance=4.0,
                                negative_prompt="low quality, ugly, unfinished, out of focus, deformed, blurry")
    unsupported_exports: ClassVar[Mapping[str, str]] = {"diffusers-folder": _NO_FULL_EXPORT}
    # Flux's writers: Chroma's blocks have Flux's module names in both layouts (diffusers / original)
    export_writers: ClassVar[Mapping[str, str]] = {
        "single-file": "sdstudio.core.models.chroma.export:export_single_file",
        "kohya": "sdstudio.core.models.flux.export:export_kohya_lora",
        "diffusers": "sdstudio.core.models.flux.export:export_diffusers_lora"}
    # as kohya sd-scripts writes Chroma LoRAs (library/sai_model_spec.py, flux_utils.MODEL_VERSION_CHROMA)
    kohya_base_version = "chroma"
    modelspec_architecture = "chroma"
    original_implementation = "https://huggingface.co/lodestones/Chroma"
    lora_metadata_markers = ("chroma", "chroma")
    file_reader = "sdstudio.core.models.chroma.files:is_chroma_model"
    model_builder = "sdstudio.core.models.chroma.model:build_chroma_model"
    sampling_loader = "sdstudio.core.models.chroma.sampling:load_chroma_for_sampling"
    pipeline_class = "ChromaPipeline"
    pipeline_components = ("vae", "text_encoder", "tokenizer", "transformer")
    # a Flux file would only get "not a Chroma transformer file" from the loader: refused by its family's name first
    refuses_other_families_first = True

    def config_problems(self, config: RunConfig) -> list[str]:
        problems = super().config_problems(config)
        if config.model.family == self.name and config.model.text_encoder_path and config.model.text_encoder_2_path:
            problems.append("model.text_encoder_path: Chroma has one text encoder, T5-XXL (model.text_encoder_2_path; "
                            "no CLIP-L); clear model.text_encoder_path")
        return problems
