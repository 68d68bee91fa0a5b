"""The facts of the from-scratch (pixel) family and the hooks that build and load its models."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from ..family import ModelFamily, ModelFileError, SamplingDefaults

if TYPE_CHECKING:
    import torch

    from ...config import RunConfig
    from ...sampling.from_files import LoadedBaseModel
    from ..bundle import ModelBundle

_NO_LORA = ("LoRA formats export a LoRA but this run trains none: a from-scratch (pixel) model has no LoRA; "
            "export it as a diffusers folder (diffusers-folder).")


class PixelFamily(ModelFamily):
    name = "pixel"
    title = "from-scratch (pixel) model"
    short_title = "from-scratch pixel"
    fine_tunes_base_model = False

    space = "pixel"
    latent_downscale = 1
    objective = "diffusion"
    base_model_decides_prediction = False  # the run's diffusion settings are the model's
    text_encoders_in_activations = True  # its small text encoder is part of the measured activations
    text_embeddings_cacheable = False  # its text encoder always trains with the UNet
    supports_lora = False
    no_lora_reason = "A from-scratch (pixel) model has no LoRA."

    sampling = SamplingDefaults(sampler="ddim", steps=25, guidance=3.0)
    activation_bytes_per_pixel = 0.02e6

    unsupported_exports: ClassVar[dict[str, str]] = {
        "kohya": _NO_LORA,
        "diffusers": _NO_LORA,
        "single-file": "A from-scratch (pixel) model has no Stable Diffusion single-file layout that A1111 / "
                       "ComfyUI could load; export it as a diffusers folder (diffusers-folder).",
    }
    export_writers: ClassVar[dict[str, str]] = {"diffusers-folder": "pixel_folder:export_pixel_folder"}
    kohya_base_version = "sdstudio_pixel"
    modelspec_architecture = "sdstudio-pixel"
    lora_metadata_markers = ("sdstudio_pixel", "sdstudio-pixel")

    def recognise(self, path: Path) -> bool:
        from ...export.pixel_folder import is_pixel_folder

        return path.is_dir() and is_pixel_folder(path)

    def build(self, config: RunConfig, captions: list[str], *, tokenizer_file: Path | None = None,
              device: torch.device | None = None) -> ModelBundle:
        from .model import build_pixel_model

        return build_pixel_model(config, captions, tokenizer_file=tokenizer_file)

    def load_for_sampling(self, path: Path, device: torch.device, *, lora: Path | None = None,
                          config_folder: Path | None = None, prediction_type: str = "auto",
                          files: Mapping[str, Path] | None = None) -> LoadedBaseModel:
        from ...sampling.from_files import LoraFileError, load_pixel_export

        if lora is not None:
            raise LoraFileError(f"lora {lora}: LoRAs apply to Stable Diffusion models; {path} is a from-scratch "
                                "(pixel) model. Drop the `lora`")
        if prediction_type != "auto":
            raise ModelFileError(f"prediction_type {prediction_type}: a from-scratch (pixel) export carries its "
                                 "own settings (sdstudio.json); leave `prediction_type` at auto")
        return load_pixel_export(path, device, self)

    def config_problems(self, config: RunConfig) -> list[str]:
        m = config.model
        problems = []
        if m.conditional:
            heads = [c for c, a in zip(m.block_channels, m.attention_levels) if a and c % m.attention_head_dim]
            if heads:
                problems.append(f"model.attention_head_dim: {m.attention_head_dim} does not divide the "
                                f"attention levels' channels {heads}")
        side, levels = config.data.resolution, len(m.block_channels)
        if side % (2 ** (levels - 1)):
            problems.append(f"data.resolution: {side} must be divisible by {2 ** (levels - 1)} for {levels} "
                            "UNet levels")
        return problems
