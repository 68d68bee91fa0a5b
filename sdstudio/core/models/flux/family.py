"""The Flux.1 families: dev (guidance-distilled: a guidance input, trained with a fixed guidance value) and
schnell (timestep-distilled, no guidance input). One code base (``files.py``, ``model.py``, ``export.py``),
different data. Both train by flow matching (``core/flow.py``); SD3.5 and Chroma will be families of the same
shape (their own sub-packages, ``objective = "flow_matching"`` and their ``FlowDefaults``)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..family import FlowDefaults, ModelFamily, ModelFileError, SamplingDefaults
from .model import LORA_TARGETS

if TYPE_CHECKING:
    import torch

    from ...config import RunConfig
    from ...sampling.from_files import LoadedBaseModel
    from .model import FluxBundle

_NO_FOLDER_EXPORT = ("a Flux run exports its transformer as a single file (single-file: the original layout "
                     "ComfyUI and from_single_file load) or its LoRA (kohya, diffusers); a diffusers folder is not "
                     "written yet.")


@functools.lru_cache(maxsize=16)
def _variant(path: str, mtime_ns: int, size: int) -> str | None:
    from .files import model_variant

    return model_variant(Path(path))


class FluxFamily(ModelFamily):
    """What Flux.1 dev and schnell share: a flow-matching transformer on 16-channel latents, CLIP-L + T5."""

    variant: ClassVar[str]
    space = "latent"
    latent_downscale = 8
    objective = "flow_matching"
    default_prediction_type = "flow"
    text_encoders = ("text_encoder", "text_encoder_2")  # CLIP-L (pooled), T5-XXL (states)
    lora_targets = LORA_TARGETS  # type: ignore[assignment]  # peft regexes
    sampling_file_keys = ("model.text_encoder_path", "model.text_encoder_2_path", "model.vae_path")
    default_lora_targets = "attention_ff"
    # kohya names: lora_te1_ = CLIP-L, lora_te3_ = T5 (as sd-scripts writes them for Flux)
    kohya_text_prefixes: ClassVar[Mapping[str, str]] = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te3"}
    activation_bytes_per_pixel = 1.2e6  # not measured on a GPU yet: an upper guess (transformer, bf16)
    unsupported_exports: ClassVar[Mapping[str, str]] = {"diffusers-folder": _NO_FOLDER_EXPORT}
    export_writers: ClassVar[Mapping[str, str]] = {
        "single-file": "sdstudio.core.models.flux.export:export_single_file",
        "kohya": "sdstudio.core.models.flux.export:export_kohya_lora",
        "diffusers": "sdstudio.core.models.flux.export:export_diffusers_lora"}

    def recognise(self, path: Path) -> bool:
        if path.is_dir():
            if not (path / "transformer" / "config.json").is_file():
                return False
        elif path.suffix.lower() != ".safetensors":
            return False
        stat = path.stat()
        return _variant(str(path), stat.st_mtime_ns, stat.st_size) == self.variant

    def build(self, config: RunConfig, captions: list[str], *, tokenizer_file: Path | None = None,
              device: torch.device | None = None) -> FluxBundle:
        import torch

        from ...train.blockswap import build_placed
        from .model import build_flux_model

        device = device or torch.device("cpu")
        bundle = build_placed(config, device, lambda at: build_flux_model(config, device, denoiser_device=at))
        if bundle.family != self.name:
            raise ModelFileError(f"model.path {config.model.path}: a {bundle.model_family.title} model, but "
                                 f"model.family = {self.name!r}; set model.family = {bundle.family!r}")
        return bundle

    def config_problems(self, config: RunConfig) -> list[str]:
        problems = []
        if config.model.family != self.name:
            return problems
        if config.train.train_text_encoder:
            problems.append(f"train.train_text_encoder: {self.short_title} trains CLIP-L through a LoRA only "
                            "(lora.text_encoder); turn it off")
        if config.lora.enabled and config.lora.type == "dora" and "diffusers" in config.export.formats:
            problems.append(f"export.formats: diffusers loads no DoRA adapter for {self.short_title}; use 'kohya' "
                            "(LyCORIS keys, which ComfyUI and Forge load)")
        return problems

    def load_for_sampling(self, path: Path, device: torch.device, *, lora: Path | None = None,
                          config_folder: Path | None = None, prediction_type: str = "auto",
                          files: Mapping[str, Path] | None = None) -> LoadedBaseModel:
        from .sampling import load_flux_for_sampling

        return load_flux_for_sampling(self, path, device, lora=lora, config_folder=config_folder,
                                      files=files or {})

    def pipeline(self, bundle: Any) -> Any:
        """A diffusers FluxPipeline around the bundle's modules (shared, not copied)."""
        from diffusers import FluxPipeline

        c = bundle.components
        return FluxPipeline(scheduler=self.flow_scheduler(), vae=c.vae, text_encoder=c.text_encoder,
                            tokenizer=c.tokenizer, text_encoder_2=c.text_encoder_2, tokenizer_2=c.tokenizer_2,
                            transformer=c.transformer)

    def flow_scheduler(self) -> Any:
        from ...config import FlowConfig
        from ...flow import FlowSchedule

        assert self.flow is not None
        return FlowSchedule(FlowConfig(), self.flow).sampler()


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
