"""Tiny Flux.1-topology models for tests (CPU, seconds, no downloads): a FluxTransformer2DModel with one double
and one single block (width 32), a four-level 16-channel AutoencoderKL with Flux's shift and scale, the tiny
CLIP-L of tiny_models.py and a two-layer T5 encoder over the real T5 vocabulary (the bundled tokenizer).

``save_tiny_flux`` writes the hub's diffusers layout; ``save_tiny_flux_split`` the split single files of ComfyUI
and kohya users (transformer in the original key names, clip_l, t5xxl, ae)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.tiny_models import TINY_TEXT_HIDDEN, tiny_text_config, tiny_tokenizer

T5_WIDTH = 32


def tiny_flux_components(seed: int = 0, guidance: bool = True) -> dict[str, Any]:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    from sdstudio.core.models.flux.offline import t5_tokenizer

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=T5_WIDTH, pooled_projection_dim=TINY_TEXT_HIDDEN,
            guidance_embeds=guidance, axes_dims_rope=(4, 6, 6))
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 16, 32, 32),
                            layers_per_block=1, norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.3611, shift_factor=0.1159,
                            use_quant_conv=False, use_post_quant_conv=False, sample_size=64)
        text_encoder = CLIPTextModel(tiny_text_config())
        text_encoder_2 = T5EncoderModel(T5Config(vocab_size=32128, d_model=T5_WIDTH, d_kv=8, d_ff=64, num_layers=2,
                                                 num_heads=4, feed_forward_proj="gated-gelu", is_gated_act=True,
                                                 dense_act_fn="gelu_new", relative_attention_num_buckets=8))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=guidance, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder, "tokenizer": tiny_tokenizer(),
            "text_encoder_2": text_encoder_2, "tokenizer_2": t5_tokenizer(), "scheduler": scheduler}


def save_tiny_flux(folder: Path, seed: int = 0, guidance: bool = True) -> Path:
    from diffusers import FluxPipeline

    FluxPipeline(**tiny_flux_components(seed, guidance)).save_pretrained(str(folder), safe_serialization=True)
    return folder


def save_tiny_flux_split(folder: Path, components: dict[str, Any], *, dtype: torch.dtype = torch.float32
                         ) -> dict[str, Path]:
    """The split single files of a tiny Flux: transformer (original key names, in ``dtype``), clip_l,
    t5xxl and ae (original VAE names), as users keep them."""
    from safetensors.torch import save_file

    from sdstudio.core.export.ldm import VAE_PREFIX, vae_to_ldm
    from sdstudio.core.models.flux.files import diffusers_to_bfl

    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / f"{name}.safetensors" for name in ("flux1", "clip_l", "t5xxl", "ae")}
    bfl = diffusers_to_bfl(components["transformer"].state_dict())
    save_file({k: v.to(dtype).contiguous() for k, v in bfl.items()}, str(paths["flux1"]))
    clip = {("text_model." + k if not k.startswith("text_model.") else k): v.contiguous()
            for k, v in components["text_encoder"].state_dict().items()}
    save_file(clip, str(paths["clip_l"]))
    t5 = {k: v.contiguous() for k, v in components["text_encoder_2"].state_dict().items()
          if k != "encoder.embed_tokens.weight"}
    save_file(t5, str(paths["t5xxl"]))
    ae = {k.removeprefix(VAE_PREFIX): v.contiguous() for k, v in vae_to_ldm(components["vae"].state_dict()).items()}
    save_file(ae, str(paths["ae"]))
    return paths
