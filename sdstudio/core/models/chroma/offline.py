"""The configs sdstudio ships for Chroma, so split single files load with no network: the published diffusers
config of lodestones/Chroma1-HD's transformer (values written out here; they hold no weights). Chroma shares
Flux's VAE (16 latent channels, its shift and scale) and T5-XXL encoder, so those configs and the bundled T5
tokenizer (``resources/tokenizers/t5-v1_1-xxl/``) come from ``flux/offline.py``."""

from __future__ import annotations

from typing import Any

from ..flux.offline import T5_CONFIG, VAE_CONFIG, t5_tokenizer, t5_tokenizer_folder

__all__ = ["T5_CONFIG", "TRANSFORMER_CONFIG", "VAE_CONFIG", "t5_tokenizer", "t5_tokenizer_folder"]

# Chroma1-HD transformer/config.json (ChromaTransformer2DModel; Chroma1-Base is the same topology): Flux.1's
# 19 double + 38 single blocks at width 3072, without CLIP (no pooled projection) and without per-block
# modulation linears: the approximator ("distilled_guidance_layer", 5 layers of width 5120) makes every
# block's shift / scale / gate from the timestep.
TRANSFORMER_CONFIG: dict[str, Any] = {
    "_class_name": "ChromaTransformer2DModel", "approximator_hidden_dim": 5120, "approximator_layers": 5,
    "approximator_num_channels": 64, "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56], "in_channels": 64,
    "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38,
    "out_channels": None, "patch_size": 1,
}
# the pipeline's caption length (ChromaPipeline: max_sequence_length = 512)
DEFAULT_T5_LENGTH = 512
