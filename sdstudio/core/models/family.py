"""What a model family is: its facts as class attributes, plus a few small hooks.

Everything outside ``core/models/`` asks a family (found through ``registry.get_family``) instead of testing
its name: the CLI, the app, config validation, the memory estimate, sampling and the exports. A new family is
a sub-package of ``core/models/`` with one ``ModelFamily`` subclass, listed in ``registry._PLUGINS``
(docs/models.md, "Adding a family"). Facts are data so that families differ in values, not in branches.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from ..errors import UserError

if TYPE_CHECKING:
    import torch

    from ..config import RunConfig
    from ..sampling.from_files import LoadedBaseModel
    from .bundle import ModelBundle


class ModelFileError(UserError):
    """A model path that is missing, corrupt or not a model of a known family."""


@dataclass(frozen=True)
class SamplingDefaults:
    """What a preview / `sdstudio sample` uses when nothing says otherwise (the presets' [sample] values)."""

    sampler: str = "ddim"
    steps: int = 25
    guidance: float = 7.0
    negative_prompt: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler, "steps": self.steps, "guidance": self.guidance,
                "negative_prompt": self.negative_prompt}


@dataclass(frozen=True)
class SingleFileTextEncoder:
    """One text encoder in the original single-file layout: which component, which converter
    (``export/ldm.py``: "clip_l" or "open_clip") and the key prefix it gets."""

    component: str
    converter: Literal["clip_l", "open_clip"]
    prefix: str


@dataclass(frozen=True)
class FlowDefaults:
    """A flow-matching family's schedule, as its base model's scheduler config says (core/flow.py): the shift
    its pipelines sample with, and train with under ``flow.shift = "auto"``."""

    shift: float = 1.0  # the fixed (SD3) shift; 1.0 = none
    dynamic: bool = False  # Flux dev: the shift follows the image size (exp of base_shift .. max_shift)
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_seq_len: int = 256
    max_seq_len: int = 4096


class ModelFamily:
    """One model family. Subclasses set the facts; the hooks at the bottom load and build its models."""

    # -- who it is ------------------------------------------------------------------------------------------
    name: ClassVar[str]  # model.family in a config
    title: ClassVar[str]  # for people: "Stable Diffusion 1.x"
    short_title: ClassVar[str]  # in one-line summaries: "SD 1.x"
    fine_tunes_base_model: ClassVar[bool] = True  # needs model.path (False: built from the config)

    # -- how it trains --------------------------------------------------------------------------------------
    space: ClassVar[Literal["pixel", "latent"]] = "latent"  # what the denoiser sees
    latent_downscale: ClassVar[int] = 8  # image side / model-space side
    # "diffusion": DDPM noise schedule, predicts epsilon / v / sample. "flow_matching" (Flux, SD3): rectified
    # flow, predicts the velocity (core/flow.py), with the schedule in ``flow``.
    objective: ClassVar[Literal["diffusion", "flow_matching"]] = "diffusion"
    default_prediction_type: ClassVar[str] = "epsilon"
    flow: ClassVar[FlowDefaults | None] = None  # the schedule of a flow-matching family
    # True: the base model decides prediction type / zero terminal SNR (``ModelBundle.diffusion_for``);
    # False: the run's own diffusion settings apply (a model trained from scratch)
    base_model_decides_prediction: ClassVar[bool] = True
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)  # component names
    text_encoders_in_activations: ClassVar[bool] = False  # a trained text encoder is inside the measured
    #                                                       per-pixel activations (small ones, pixel family)
    text_embeddings_cacheable: ClassVar[bool] = True  # data.cache_text_embeddings applies (frozen encoders)
    clip_skip_applies: ClassVar[bool] = False  # model.clip_skip picks an earlier CLIP layer (SD1/SD2)
    long_captions: ClassVar[bool] = False  # data.max_token_length > 75: CLIP chunks of 75 tokens, concatenated
    supports_lora: ClassVar[bool] = True
    no_lora_reason: ClassVar[str] = ""  # why not, for people, when supports_lora is False
    lora_targets: ClassVar[Mapping[str, list[str]]] = {}  # lora.targets -> peft target_modules
    default_lora_targets: ClassVar[str] = "attention"
    # the VAE overflows in fp16 (NaN latents): it stays fp32 unless bf16 was asked for
    vae_needs_fp32_for_fp16: ClassVar[bool] = False

    # -- previews and memory --------------------------------------------------------------------------------
    sampling: ClassVar[SamplingDefaults] = SamplingDefaults()
    # config keys of the separate part files `sdstudio sample --model` takes beside a model file (split single
    # files: "model.vae_path", "model.text_encoder_path", ...); a key not listed is refused with a sentence
    sampling_file_keys: ClassVar[tuple[str, ...]] = ()
    # activation bytes per image per model-space pixel (reference/performance.md; see train/memory.py)
    activation_bytes_per_pixel: ClassVar[float] = 0.3e6

    # -- exports --------------------------------------------------------------------------------------------
    # format name -> why this family cannot be exported so (a sentence for people); absent = supported
    unsupported_exports: ClassVar[Mapping[str, str]] = {}
    # format name -> "module:function" when this family writes the format its own way
    export_writers: ClassVar[Mapping[str, str]] = {}
    kohya_base_version: ClassVar[str] = ""  # ss_base_model_version
    modelspec_architecture: ClassVar[str] = ""  # modelspec.architecture (without "/lora")
    # how a LoRA file's metadata names this family: (ss_base_model_version prefix, modelspec.architecture part)
    lora_metadata_markers: ClassVar[tuple[str, str]] = ("", "")
    # kohya LoRA key prefixes of the text encoders
    kohya_text_prefixes: ClassVar[Mapping[str, str]] = {"text_encoder": "lora_te"}
    kohya_unet_ldm_names: ClassVar[bool] = False  # kohya names UNet modules in the original (LDM) layout
    single_file_text_encoders: ClassVar[tuple[SingleFileTextEncoder, ...]] = ()
    unet_addition_embed_type: ClassVar[str | None] = None  # what the UNet config says (SDXL: "text_time")

    @property
    def pixel_space(self) -> bool:
        """The denoiser works on pixels (no VAE, no latent cache)."""
        return self.space == "pixel"

    # -- small hooks ----------------------------------------------------------------------------------------
    def base_model_version(self, prediction_type: str) -> str:
        """ss_base_model_version of an export (SD2 names its v-prediction variant)."""
        return self.kohya_base_version or self.name

    def recognise(self, path: Path) -> bool:
        """Is ``path`` (an existing file or folder) a model of this family? Cheap: headers and configs only."""
        return False

    def build(self, config: RunConfig, captions: list[str], *, tokenizer_file: Path | None = None,
              device: torch.device | None = None) -> ModelBundle:
        """The bundle of a run: the trainable module, the frozen parts, caption encoding and saving."""
        raise NotImplementedError

    def load_for_sampling(self, path: Path, device: torch.device, *, lora: Path | None = None,
                          config_folder: Path | None = None, prediction_type: str = "auto",
                          files: Mapping[str, Path] | None = None) -> LoadedBaseModel:
        """A model file or folder of this family, ready for `sdstudio sample --model`. ``files``: part files
        by config key (``sampling_file_keys``; checked by ``sampling/from_files.load_model``)."""
        raise NotImplementedError

    def config_problems(self, config: RunConfig) -> list[str]:
        """What this family needs of a config beyond the field types (one line per problem)."""
        return []

    def __repr__(self) -> str:
        return f"<ModelFamily {self.name}>"
