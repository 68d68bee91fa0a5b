"""Tiny SD3 / SD3.5-topology models for tests (CPU, seconds, no downloads): an SD3Transformer2DModel with two
joint blocks (width 32, q/k RMS norms; "3.5-medium" adds the second attention to block 0, "3-medium" has no
norms), a four-level 16-channel AutoencoderKL with SD3's shift and scale, two tiny CLIPs with projections of
different widths (CLIP-L 32, CLIP-G 48) and a two-layer T5 encoder (width 96) over the real T5 vocabulary.

``save_tiny_sd3`` writes the hub's diffusers layout; ``save_tiny_sd3_split`` the split single files of ComfyUI
and kohya users (transformer in the original key names under model.diffusion_model., clip_l, clip_g, t5xxl, VAE)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.tiny_models import tiny_text_config, tiny_tokenizer

CLIP_L, CLIP_G, T5_WIDTH = 32, 48, 96


def tiny_sd3_components(seed: int = 0, variant: str = "3.5-large") -> dict[str, Any]:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from sdstudio.core.models.sd3.offline import t5_tokenizer

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=T5_WIDTH, caption_projection_dim=32,
            pooled_projection_dim=CLIP_L + CLIP_G, pos_embed_max_size=16,
            qk_norm=None if variant == "3-medium" else "rms_norm",
            dual_attention_layers=(0,) if variant == "3.5-medium" else ())
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 16, 32, 32),
                            layers_per_block=1, norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=1.5305, shift_factor=0.0609,
                            use_quant_conv=False, use_post_quant_conv=False, sample_size=64)
        text_encoder = CLIPTextModelWithProjection(tiny_text_config(CLIP_L, CLIP_L))
        text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(CLIP_G, CLIP_G))
        text_encoder_3 = T5EncoderModel(T5Config(vocab_size=32128, d_model=T5_WIDTH, d_kv=16, d_ff=64, num_layers=2,
                                                 num_heads=4, feed_forward_proj="gated-gelu", is_gated_act=True,
                                                 dense_act_fn="gelu_new", relative_attention_num_buckets=8))
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder, "tokenizer": tiny_tokenizer("l"),
            "text_encoder_2": text_encoder_2, "tokenizer_2": tiny_tokenizer("g"), "text_encoder_3": text_encoder_3,
            "tokenizer_3": t5_tokenizer(), "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0)}


def save_tiny_sd3(folder: Path, seed: int = 0, variant: str = "3.5-large") -> Path:
    from diffusers import StableDiffusion3Pipeline

    StableDiffusion3Pipeline(**tiny_sd3_components(seed, variant)).save_pretrained(str(folder), safe_serialization=True)
    return folder


def save_tiny_sd3_split(folder: Path, components: dict[str, Any], *, dtype: torch.dtype = torch.float32
                        ) -> dict[str, Path]:
    """The split single files of a tiny SD3: transformer (original key names with ComfyUI's / SAI's prefix, in
    ``dtype``), clip_l, clip_g, t5xxl and the VAE (original VAE names), as users keep them."""
    from safetensors.torch import save_file

    from sdstudio.core.export.ldm import VAE_PREFIX, vae_to_ldm
    from sdstudio.core.models.sd3.files import diffusers_to_sd3

    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / f"{name}.safetensors" for name in ("sd3", "clip_l", "clip_g", "t5xxl", "vae")}
    original = diffusers_to_sd3(components["transformer"].state_dict())
    save_file({f"model.diffusion_model.{k}": v.to(dtype).contiguous() for k, v in original.items()},
              str(paths["sd3"]))
    for name, key in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2")):
        save_file({(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v.contiguous()
                   for k, v in components[key].state_dict().items()}, str(paths[name]))
    save_file({k: v.contiguous() for k, v in components["text_encoder_3"].state_dict().items()
               if k != "encoder.embed_tokens.weight"}, str(paths["t5xxl"]))
    ae = {k.removeprefix(VAE_PREFIX): v.contiguous() for k, v in vae_to_ldm(components["vae"].state_dict()).items()}
    save_file(ae, str(paths["vae"]))
    return paths
