"""Tiny Chroma-topology models for tests (CPU, seconds, no downloads): a ChromaTransformer2DModel with one double
and one single block (width 32) and a two-layer approximator, plus the tiny Flux VAE and T5 of tiny_flux.py
(Chroma uses Flux's VAE and T5-XXL). ``save_tiny_chroma`` writes the hub's diffusers layout,
``save_tiny_chroma_split`` the split single files (transformer in the original key names, t5xxl, ae)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.tiny_flux import T5_WIDTH, tiny_flux_components


def tiny_chroma_components(seed: int = 0) -> dict[str, Any]:
    from diffusers import ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    flux = tiny_flux_components(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        transformer = ChromaTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=T5_WIDTH, axes_dims_rope=(4, 6, 6),
            approximator_num_channels=16, approximator_hidden_dim=32, approximator_layers=2)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return {"transformer": transformer, "vae": flux["vae"], "text_encoder": flux["text_encoder_2"],
            "tokenizer": flux["tokenizer_2"], "scheduler": scheduler}


def save_tiny_chroma(folder: Path, seed: int = 0) -> Path:
    from diffusers import ChromaPipeline

    ChromaPipeline(**tiny_chroma_components(seed)).save_pretrained(str(folder), safe_serialization=True)
    return folder


def save_tiny_chroma_split(folder: Path, components: dict[str, Any], *, dtype: torch.dtype = torch.float32
                           ) -> dict[str, Path]:
    """The split single files of a tiny Chroma: transformer (original key names, in ``dtype``), t5xxl, ae."""
    from safetensors.torch import save_file

    from sdstudio.core.export.ldm import VAE_PREFIX, vae_to_ldm
    from sdstudio.core.models.chroma.files import diffusers_to_original

    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / f"{name}.safetensors" for name in ("chroma", "t5xxl", "ae")}
    original = diffusers_to_original(components["transformer"].state_dict())
    save_file({k: v.to(dtype).contiguous() for k, v in original.items()}, str(paths["chroma"]))
    t5 = {k: v.contiguous() for k, v in components["text_encoder"].state_dict().items()
          if k != "encoder.embed_tokens.weight"}
    save_file(t5, str(paths["t5xxl"]))
    ae = {k.removeprefix(VAE_PREFIX): v.contiguous() for k, v in vae_to_ldm(components["vae"].state_dict()).items()}
    save_file(ae, str(paths["ae"]))
    return paths
