"""The configs and tokenizers sdstudio ships for Flux.1, so split single files load with no network: the
published diffusers configs of black-forest-labs/FLUX.1-dev and FLUX.1-schnell (values written out here; they
hold no weights) and the tokenizers in ``resources/tokenizers/`` (CLIP-L: ``clip/``; T5: ``t5-v1_1-xxl/``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..sd.offline import clip_tokenizer as _bundled_clip_tokenizer
from ..sd.offline import tokenizers_dir

# FLUX.1-dev transformer/config.json; schnell differs in guidance_embeds only
TRANSFORMER_CONFIG: dict[str, Any] = {
    "_class_name": "FluxTransformer2DModel", "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True, "in_channels": 64, "joint_attention_dim": 4096, "num_attention_heads": 24,
    "num_layers": 19, "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768,
}
# vae/config.json (16 latent channels, no quant convs; Flux's shift and scale of the latents)
VAE_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 16, "layers_per_block": 2, "norm_num_groups": 32,
    "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False,
    "use_post_quant_conv": False, "force_upcast": True, "mid_block_add_attention": True,
}
# text_encoder/config.json: CLIP ViT-L/14 (its pooled output conditions Flux)
CLIP_L_CONFIG: dict[str, Any] = {
    "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu",
    "hidden_size": 768, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072,
    "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "num_attention_heads": 12, "num_hidden_layers": 12,
    "pad_token_id": 1, "projection_dim": 768, "vocab_size": 49408,
}
# text_encoder_2/config.json: the T5 v1.1 XXL encoder
T5_CONFIG: dict[str, Any] = {
    "d_ff": 10240, "d_kv": 64, "d_model": 4096, "decoder_start_token_id": 0, "dense_act_fn": "gelu_new",
    "dropout_rate": 0.1, "eos_token_id": 1, "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0,
    "is_encoder_decoder": True, "is_gated_act": True, "layer_norm_epsilon": 1e-06, "num_decoder_layers": 24,
    "num_heads": 64, "num_layers": 24, "output_past": True, "pad_token_id": 0,
    "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32, "tie_word_embeddings": False,
    "vocab_size": 32128,
}


def transformer_config(variant: str) -> dict[str, Any]:
    return {**TRANSFORMER_CONFIG, "guidance_embeds": variant == "dev"}


def t5_tokenizer_folder() -> Path:
    return tokenizers_dir() / "t5-v1_1-xxl"


def t5_tokenizer(config_folder: Path | None = None) -> Any:
    """The T5 tokenizer: a config folder's ``tokenizer_2/`` when it has one, else the bundled one."""
    from transformers import AutoTokenizer

    if config_folder is not None and (config_folder / "tokenizer_2").is_dir():
        return AutoTokenizer.from_pretrained(str(config_folder / "tokenizer_2"), local_files_only=True)
    return AutoTokenizer.from_pretrained(str(t5_tokenizer_folder()), local_files_only=True)


def clip_tokenizer(config_folder: Path | None = None) -> Any:
    """The CLIP-L tokenizer: a config folder's ``tokenizer/`` when it has one, else the bundled one."""
    from transformers import CLIPTokenizer

    if config_folder is not None and (config_folder / "tokenizer").is_dir():
        return CLIPTokenizer.from_pretrained(str(config_folder / "tokenizer"), local_files_only=True)
    return _bundled_clip_tokenizer("l")
