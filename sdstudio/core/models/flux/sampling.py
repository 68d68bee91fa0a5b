"""`sdstudio sample --model` for Flux: a diffusers Flux folder (or a transformer file with its text encoders
and VAE in a config folder's layout), with an optional LoRA (kohya or diffusers names) applied by diffusers'
own FluxPipeline.load_lora_weights."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ...config import RunConfig
from ...errors import ConfigError
from ...flow import FlowSchedule
from ...sampling.from_files import (
    LoadedBaseModel,
    LoraFileError,
    _first_reason,
    _lora_modules_in_file,
    cast_module,
)
from ..family import ModelFamily, ModelFileError
from ..registry import family_of_lora
from .model import make_bundle


def sampling_config(family: ModelFamily, path: Path, config_folder: Path | None,
                    files: Mapping[str, Path]) -> RunConfig:
    """The config a transformer family's model is loaded with for sampling: the model (a diffusers folder, or a
    transformer file with its part ``files`` by config key: model.vae_path, model.text_encoder_path, ...), as a
    run with these keys loads it (the family's split-file loader names a missing one)."""
    overrides: dict[str, Any] = {"model.family": family.name, "model.path": str(path), "train.device": "cpu",
                                 "train.mixed_precision": "no", "lora.enabled": True, "data.resolution": 1024}
    if config_folder is not None:
        overrides["model.config_folder"] = str(config_folder)
    overrides.update({key: str(part) for key, part in files.items()})
    try:
        return RunConfig().with_overrides(overrides)
    except ConfigError as exc:
        raise ModelFileError(f"model.path {path}: {exc}") from None


def load_flux_for_sampling(family: ModelFamily, path: Path, device: torch.device, *, lora: Path | None,
                           config_folder: Path | None, files: Mapping[str, Path]) -> LoadedBaseModel:
    from .model import load_components

    config = sampling_config(family, path, config_folder, files)
    bundle = make_bundle(load_components(config), config, torch.device("cpu"), lora=False)
    modules = apply_flux_lora(family, bundle, lora, path) if lora is not None else 0
    bundle.train_guidance = family.sampling.guidance if bundle.train_guidance is not None else None
    return ready_for_sampling(family, bundle, config, path, device, lora, modules)


def ready_for_sampling(family: ModelFamily, bundle: Any, config: RunConfig, path: Path, device: torch.device,
                       lora: Path | None, modules: int, defaults: Mapping[str, Any] | None = None) -> LoadedBaseModel:
    """A transformer family's bundle, loaded for sampling (its LoRA applied), made a ``LoadedBaseModel``: the
    transformer, the text encoders and the VAE on ``device`` in bf16 on a GPU (fp32 elsewhere), in eval mode, the
    model's native size from its VAE config; ``defaults``: the preview defaults (the family's when None)."""
    wdtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    c = bundle.components
    for module in (c.transformer, *(getattr(c, name) for name in family.text_encoders), c.vae):
        cast_module(module, device, wdtype).eval()
    bundle.weight_dtype = wdtype
    bundle.trainable.weight_dtype = wdtype
    bundle.trainable.eval()
    down = 2 ** (len(c.vae.config.block_out_channels) - 1)
    bundle.sample_size = int(c.vae.config.sample_size) // down  # the model's native size (1024 px)
    assert family.flow is not None
    return LoadedBaseModel(bundle, FlowSchedule(config.flow, family.flow), device, path, family.name,
                           dict(defaults) if defaults is not None else family.sampling.as_dict(), lora, modules,
                           autocast_dtype=wdtype if wdtype != torch.float32 else None)


def apply_flux_lora(family: ModelFamily, bundle: Any, lora: Path, model: Path) -> int:
    """Load a Flux LoRA file onto the bundle's transformer with diffusers' own loader; the patched modules."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors import safe_open

    if not lora.is_file() or lora.suffix.lower() != ".safetensors":
        raise LoraFileError(f"lora {lora}: expected a .safetensors LoRA file")
    with safe_open(str(lora), framework="pt") as fh:
        keys = list(fh.keys())
        meta = dict(fh.metadata() or {})
    claimed = family_of_lora(meta)
    if claimed is not None and claimed.objective != family.objective:  # a dev LoRA on schnell is fine
        raise LoraFileError(f"lora {lora}: a LoRA for {claimed.title} models, but {model} is {family.title}")
    from diffusers.utils import logging as diffusers_logging

    pipe = family.pipeline(bundle)  # type: ignore[attr-defined]
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="sdstudio")
    except Exception as exc:  # noqa: BLE001 - diffusers / peft raise many kinds for a LoRA that does not fit
        raise LoraFileError(f"lora {lora}: does not fit the {family.title} model {model} ({_first_reason(exc)})") \
            from None
    finally:
        diffusers_logging.set_verbosity(level)
    patched = sum(1 for sub in bundle.components.transformer.modules() if isinstance(sub, BaseTunerLayer))
    if patched == 0:
        raise LoraFileError(f"lora {lora}: none of its {_lora_modules_in_file(keys)} modules matches a layer of "
                            f"{model}; is it a LoRA for another model family?")
    return patched
