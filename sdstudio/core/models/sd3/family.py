"""The SD3 / SD3.5 family (model.family = "sd3"): Stable Diffusion 3 medium, 3.5 medium and 3.5 large. One
family, told apart by the files' keys (``files.variant_of_keys``); the variant decides the memory profile and
the export metadata (``for_variant``). Flow matching like Flux (``core/flow.py``) with SD3's fixed shift of 3,
real classifier-free guidance (no guidance input), three text encoders (CLIP-L, CLIP-G, T5-XXL)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..family import FlowDefaults, ModelFamily, ModelFileError, SamplingDefaults
from .model import LORA_TARGETS

if TYPE_CHECKING:
    import torch

    from ...config import RunConfig
    from ...sampling.from_files import LoadedBaseModel
    from .model import SD3Bundle

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


@functools.lru_cache(maxsize=16)
def _variant(path: str, mtime_ns: int, size: int) -> str | None:
    from .files import model_variant

    return model_variant(Path(path))


class SD3Family(ModelFamily):
    name = "sd3"
    title = "Stable Diffusion 3 / 3.5"
    short_title = "SD3.5"
    space = "latent"
    latent_downscale = 8
    objective = "flow_matching"
    default_prediction_type = "flow"
    # SD3's scheduler: a fixed shift of 3 (flow.shift = "auto" trains with it too)
    flow = FlowDefaults(shift=3.0, dynamic=False)
    sampling = SamplingDefaults(sampler="euler", steps=28, guidance=4.5)
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")  # CLIP-L, CLIP-G, T5-XXL
    lora_targets = LORA_TARGETS  # type: ignore[assignment]  # peft regexes
    sampling_file_keys = ("model.text_encoder_path", "model.clip_g_path",
                          "model.text_encoder_2_path", "model.vae_path")
    default_lora_targets = "attention"
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

    def for_variant(self, variant: str) -> SD3Family:
        """This family with one variant's facts (title, memory profile, export metadata)."""
        return _variant_family(variant)

    def recognise(self, path: Path) -> bool:
        if path.is_dir():
            if not (path / "transformer" / "config.json").is_file():
                return False
        elif path.suffix.lower() != ".safetensors":
            return False
        stat = path.stat()
        return _variant(str(path), stat.st_mtime_ns, stat.st_size) is not None

    def build(self, config: RunConfig, captions: list[str], *, tokenizer_file: Path | None = None,
              device: torch.device | None = None) -> SD3Bundle:
        import torch

        from ...train.blockswap import build_placed
        from .model import build_sd3_model


        device = device or torch.device("cpu")  # with block swap the transformer stays in CPU memory until it is set up
        return build_placed(config, device, lambda at: build_sd3_model(config, device, denoiser_device=at))

    def config_problems(self, config: RunConfig) -> list[str]:
        problems: list[str] = []
        if config.model.family != self.name:
            return problems
        if config.lora.text_encoder or config.train.train_text_encoder:
            problems.append("lora.text_encoder / train.train_text_encoder: SD3 trains the transformer only for now; "
                            "turn them off")
        if config.lora.enabled and config.lora.type == "dora" and "diffusers" in config.export.formats:
            problems.append("export.formats: diffusers loads no DoRA adapter for SD3; use 'kohya' (LyCORIS keys, "
                            "which ComfyUI and Forge load)")
        return problems

    def load_for_sampling(self, path: Path, device: torch.device, *, lora: Path | None = None,
                          config_folder: Path | None = None, prediction_type: str = "auto",
                          files: Mapping[str, Path] | None = None) -> LoadedBaseModel:
        from .sampling import load_sd3_for_sampling

        return load_sd3_for_sampling(self, path, device, lora=lora, config_folder=config_folder,
                                     files=files or {})

    def pipeline(self, bundle: Any) -> Any:
        """A diffusers StableDiffusion3Pipeline around the bundle's modules (shared, not copied)."""
        from diffusers import StableDiffusion3Pipeline

        c = bundle.components
        return StableDiffusion3Pipeline(
            scheduler=self.flow_scheduler(), vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
            text_encoder_2=c.text_encoder_2, tokenizer_2=c.tokenizer_2, text_encoder_3=c.text_encoder_3,
            tokenizer_3=c.tokenizer_3, transformer=c.transformer)

    def flow_scheduler(self) -> Any:
        from ...config import FlowConfig
        from ...flow import FlowSchedule

        assert self.flow is not None
        return FlowSchedule(FlowConfig(), self.flow).sampler()


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
