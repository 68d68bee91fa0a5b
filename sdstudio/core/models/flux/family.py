"""The Flux.1 families: dev (guidance-distilled: a guidance input, trained with a fixed guidance value) and
schnell (timestep-distilled, no guidance input). One code base (``files.py``, ``model.py``, ``export.py``),
different data. Both train by flow matching (``core/flow.py``); SD3.5 and Chroma are families of the same
shape (their own sub-packages, each a ``transformer_family.TransformerFamily`` with its ``FlowDefaults``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from ..family import FlowDefaults, SamplingDefaults
from ..transformer_family import TransformerFamily
from .model import LORA_TARGETS

_NO_FOLDER_EXPORT = ("a Flux run exports its transformer as a single file (single-file: the original layout "
                     "ComfyUI and from_single_file load) or its LoRA (kohya, diffusers); a diffusers folder is not "
                     "written yet.")


class FluxFamily(TransformerFamily):
    """What Flux.1 dev and schnell share: a flow-matching transformer on 16-channel latents, CLIP-L + T5."""

    variant: ClassVar[str]
    text_encoders = ("text_encoder", "text_encoder_2")  # CLIP-L (pooled), T5-XXL (states)
    lora_targets = LORA_TARGETS  # type: ignore[assignment]  # peft regexes
    sampling_file_keys = ("model.text_encoder_path", "model.text_encoder_2_path", "model.vae_path")
    # kohya names: lora_te1_ = CLIP-L, lora_te3_ = T5 (as sd-scripts writes them for Flux)
    kohya_text_prefixes: ClassVar[Mapping[str, str]] = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te3"}
    text_encoder_lora = True  # CLIP-L through lora.text_encoder
    unsupported_exports: ClassVar[Mapping[str, str]] = {"diffusers-folder": _NO_FOLDER_EXPORT}
    export_writers: ClassVar[Mapping[str, str]] = {
        "single-file": "sdstudio.core.models.flux.export:export_single_file",
        "kohya": "sdstudio.core.models.flux.export:export_kohya_lora",
        "diffusers": "sdstudio.core.models.flux.export:export_diffusers_lora"}
    file_reader = "sdstudio.core.models.flux.files:model_variant"
    model_builder = "sdstudio.core.models.flux.model:build_flux_model"
    sampling_loader = "sdstudio.core.models.flux.sampling:load_flux_for_sampling"
    pipeline_class = "FluxPipeline"
    pipeline_components = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer")

    def _matches(self, found: Any) -> bool:
        return found == self.variant  # a dev file is not schnell's


class FluxDevFamily(FluxFamily):
    name = "flux-dev"
    variant = "dev"
    title = "Flux.1 dev"
    short_title = "Flux.1 dev"
    # FLUX.1-dev's scheduler: the shift follows the image size (exp(0.5) at 256 px .. exp(1.15) at 1024 px)
    flow = FlowDefaults(shift=3.0, dynamic=True, base_shift=0.5, max_shift=1.15)
    sampling = SamplingDefaults(sampler="euler", steps=28, guidance=3.5)
    kohya_base_version = "flux1"
    modelspec_architecture = "flux-1-dev"
    lora_metadata_markers = ("flux1", "flux-1-dev")


class FluxSchnellFamily(FluxFamily):
    name = "flux-schnell"
    variant = "schnell"
    title = "Flux.1 schnell"
    short_title = "Flux.1 schnell"
    flow = FlowDefaults(shift=1.0, dynamic=False)  # FLUX.1-schnell's scheduler: no shift
    sampling = SamplingDefaults(sampler="euler", steps=4, guidance=0.0)
    kohya_base_version = "flux1_schnell"
    modelspec_architecture = "flux-1-schnell"
    lora_metadata_markers = ("flux1_schnell", "flux-1-schnell")
