"""The Chroma family (lodestones' Chroma1-HD / Chroma1-Base): Flux.1-schnell pruned to 8.9B parameters and
de-distilled. Flux's blocks (19 double, 38 single) on Flux's 16-channel VAE latents, conditioned on T5-XXL only
(no CLIP, no guidance input), with the caption's padding masked in attention; per-block modulations come from
the approximator ("distilled_guidance_layer"). It samples with real classifier-free guidance and a negative
prompt. Loading, the bundle and sampling are in this package; the LoRA exports are Flux's writers (same block
names in both key layouts, ``flux/export.py``)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..family import FlowDefaults, ModelFamily, ModelFileError, SamplingDefaults
from ..flux.model import LORA_TARGETS

if TYPE_CHECKING:
    import torch

    from ...config import RunConfig
    from ...sampling.from_files import LoadedBaseModel
    from .model import ChromaBundle

_NO_FULL_EXPORT = ("a Chroma run exports its transformer as a single file (single-file: the LoRA merged in or the "
                   "full fine-tune's weights, original key names) or its LoRA (diffusers or kohya); a diffusers "
                   "folder is not written yet.")


@functools.lru_cache(maxsize=16)
def _is_chroma(path: str, mtime_ns: int, size: int) -> bool:
    from .files import is_chroma_model

    return is_chroma_model(Path(path))


class ChromaFamily(ModelFamily):
    name = "chroma"
    title = "Chroma"
    short_title = "Chroma"
    space = "latent"
    latent_downscale = 8
    objective = "flow_matching"
    default_prediction_type = "flow"
    text_encoders = ("text_encoder",)  # T5-XXL (per-token states and its attention mask)
    lora_targets = LORA_TARGETS  # type: ignore[assignment]  # peft regexes; "all" = "attention_ff" here
    sampling_file_keys = ("model.text_encoder_2_path", "model.text_encoder_path", "model.vae_path")
    default_lora_targets = "attention_ff"
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

    def recognise(self, path: Path) -> bool:
        if path.is_dir():
            if not (path / "transformer" / "config.json").is_file():
                return False
        elif path.suffix.lower() != ".safetensors":
            return False
        stat = path.stat()
        return _is_chroma(str(path), stat.st_mtime_ns, stat.st_size)

    def build(self, config: RunConfig, captions: list[str], *, tokenizer_file: Path | None = None,
              device: torch.device | None = None) -> ChromaBundle:
        import torch

        from .files import is_chroma_model
        from .model import build_chroma_model

        path = Path(config.model.path).expanduser()
        if path.exists() and not is_chroma_model(path):
            from ..registry import recognise_model

            other = recognise_model(path)
            if other is not None:
                raise ModelFileError(f"model.path {path}: a {other.title} model, but model.family = 'chroma'; "
                                     f"set model.family = {other.name!r}")
        from ...train.blockswap import build_placed

        device = device or torch.device("cpu")  # with block swap the transformer stays in CPU memory until it is set up
        return build_placed(config, device, lambda at: build_chroma_model(config, device, denoiser_device=at))

    def config_problems(self, config: RunConfig) -> list[str]:
        problems = []
        if config.model.family != self.name:
            return problems
        if config.lora.text_encoder or config.train.train_text_encoder:
            problems.append("lora.text_encoder / train.train_text_encoder: Chroma trains the transformer only for "
                            "now; turn them off")
        if config.lora.enabled and config.lora.type == "dora" and "diffusers" in config.export.formats:
            problems.append("export.formats: diffusers loads no DoRA adapter for Chroma; use 'kohya' (LyCORIS keys, "
                            "which ComfyUI and Forge load)")
        if config.model.text_encoder_path and config.model.text_encoder_2_path:
            problems.append("model.text_encoder_path: Chroma has one text encoder, T5-XXL (model.text_encoder_2_path; "
                            "no CLIP-L); clear model.text_encoder_path")
        return problems

    def load_for_sampling(self, path: Path, device: torch.device, *, lora: Path | None = None,
                          config_folder: Path | None = None, prediction_type: str = "auto",
                          files: Mapping[str, Path] | None = None) -> LoadedBaseModel:
        from .sampling import load_chroma_for_sampling

        return load_chroma_for_sampling(self, path, device, lora=lora, config_folder=config_folder,
                                        files=files or {})

    def pipeline(self, bundle: Any) -> Any:
        """A diffusers ChromaPipeline around the bundle's modules (shared, not copied)."""
        from diffusers import ChromaPipeline

        c = bundle.components
        return ChromaPipeline(scheduler=self.flow_scheduler(), vae=c.vae, text_encoder=c.text_encoder,
                              tokenizer=c.tokenizer, transformer=c.transformer)

    def flow_scheduler(self) -> Any:
        from ...config import FlowConfig
        from ...flow import FlowSchedule

        assert self.flow is not None
        return FlowSchedule(FlowConfig(), self.flow).sampler()
