"""`sdstudio sample --model` for Chroma: a diffusers Chroma folder (or a transformer file with its T5 and VAE in
a config folder's layout), with an optional LoRA (kohya or diffusers names) applied by diffusers' own
ChromaPipeline.load_lora_weights (Flux's loader: ``flux/sampling.apply_flux_lora``); real classifier-free
guidance with the negative prompt (``sampling/sampler.flow_pairs``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ...flow import FlowSchedule
from ...sampling.from_files import LoadedBaseModel, cast_module
from ..family import ModelFamily
from ..flux.sampling import apply_flux_lora, sampling_config
from .model import load_components, make_bundle


def load_chroma_for_sampling(family: ModelFamily, path: Path, device: torch.device, *, lora: Path | None,
                             config_folder: Path | None, files: Mapping[str, Path]) -> LoadedBaseModel:
    config = sampling_config(family, path, config_folder, files)
    bundle = make_bundle(load_components(config), config, torch.device("cpu"), lora=False)
    modules = apply_flux_lora(family, bundle, lora, path) if lora is not None else 0
    wdtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    c = bundle.components
    for module in (c.transformer, c.text_encoder, c.vae):
        cast_module(module, device, wdtype).eval()
    bundle.weight_dtype = wdtype
    bundle.trainable.weight_dtype = wdtype  # type: ignore[assignment]
    bundle.trainable.eval()
    down = 2 ** (len(c.vae.config.block_out_channels) - 1)
    bundle.sample_size = int(c.vae.config.sample_size) // down  # the VAE config's native size (1024 px)
    assert family.flow is not None
    return LoadedBaseModel(bundle, FlowSchedule(config.flow, family.flow), device, path, family.name,
                           family.sampling.as_dict(), lora, modules,
                           autocast_dtype=wdtype if wdtype != torch.float32 else None)
