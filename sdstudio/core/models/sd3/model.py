"""The SD3 / SD3.5 model of a run: the MMDiT transformer with a peft LoRA (the frozen base in the weight dtype,
fp32 adapters), conditioned as StableDiffusion3Pipeline does: CLIP-L's and CLIP-G's penultimate hidden states
side by side (768 + 1280 = 2048 wide), zero-padded to T5's width and followed by T5's states in one sequence;
the pooled vector is both CLIPs' projected outputs (2048). 16-channel VAE latents with SD3's shift and scale.

The bundle is a Flux bundle with SD3's conditioning: latents, checkpoints (the transformer's peft adapters)
and caption encoding from cached features are the same."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...config import RunConfig
from ..family import ModelFamily
from ..flux.model import FluxBundle
from ..registry import get_family
from ..split_files import file_stamps
from ..transformer_parts import load_options, optional_path, prepare_transformer, weight_dtype
from .files import SD3Components, load_sd3_components

# peft target_modules (regexes) of the transformer LoRA, per lora.targets. attn2 is 3.5 medium's second
# (image-only) attention in its first 13 blocks.
_ATTN = r"attn2?\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
_FF = r"ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)"
LORA_TARGETS: dict[str, str] = {
    # q/k/v/out of the joint blocks' attention, image and text (context) streams: diffusers' SD3 LoRA default
    "attention": rf"^transformer_blocks\.\d+\.{_ATTN}$",
    # + both streams' MLPs
    "attention_ff": rf"^transformer_blocks\.\d+\.({_ATTN}|{_FF})$",
    # + the modulation linears: every linear layer of the joint blocks (sd-scripts' SD3 LoRA)
    "all": rf"^transformer_blocks\.\d+\.({_ATTN}|{_FF}|norm1\.linear|norm1_context\.linear)$",
}
DEFAULT_T5_LENGTH = 256  # StableDiffusion3Pipeline's max_sequence_length


class SD3Denoiser(nn.Module):
    """The transformer as forward(x_t [B, 16, H, W], t [B] in [0, 1], cond) -> velocity [B, 16, H, W];
    cond = {"states": [B, 77 + T5 tokens, 4096], "pooled": [B, 2048]}."""

    def __init__(self, transformer: nn.Module, weight_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.transformer = transformer
        self.weight_dtype = weight_dtype

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        dtype = self.weight_dtype
        out = self.transformer(hidden_states=noisy.to(dtype), timestep=(timesteps * 1000).to(dtype),
                               encoder_hidden_states=cond["states"].to(dtype),
                               pooled_projections=cond["pooled"].to(dtype), return_dict=False)[0]
        return out.to(noisy.dtype)


def _clip_features(encoder: Any, tokenizer: Any, captions: list[str], device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate hidden states, projected pooled output) of one CLIP, as the SD3 pipeline reads them."""
    ids = tokenizer(captions, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids.to(device)
    out = encoder(ids, output_hidden_states=True)
    return out.hidden_states[-2], out.text_embeds


class SD3Bundle(FluxBundle):
    components: SD3Components  # type: ignore[assignment]

    @property
    def model_family(self) -> ModelFamily:
        """The family with this model's variant facts (memory profile, export metadata)."""
        return get_family(self.family).for_variant(self.architecture["variant"])  # type: ignore[attr-defined]

    @torch.no_grad()
    def text_features(self, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Both CLIPs' states (side by side), T5's states and the pooled vector: what the text cache stores."""
        c = self.components
        l_states, l_pooled = _clip_features(c.text_encoder, c.tokenizer, captions, device)
        g_states, g_pooled = _clip_features(c.text_encoder_2, c.tokenizer_2, captions, device)
        t5_ids = c.tokenizer_3(captions, padding="max_length", truncation=True, max_length=self.t5_length,
                               return_tensors="pt").input_ids.to(device)
        t5 = c.text_encoder_3(t5_ids)[0]
        return {"clip": torch.cat([l_states, g_states], dim=-1), "t5": t5,
                "pooled": torch.cat([l_pooled, g_pooled], dim=-1)}

    def assemble(self, features: dict[str, torch.Tensor], device: torch.device, sizes: Any = None
                 ) -> dict[str, torch.Tensor]:
        clip, t5 = features["clip"].to(device, self.weight_dtype), features["t5"].to(device, self.weight_dtype)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"states": torch.cat([clip, t5], dim=-2), "pooled": features["pooled"].to(device, self.weight_dtype)}

    def text_encoder_identity(self) -> str:
        c = self.components
        names = ("text_encoder", "text_encoder_2", "text_encoder_3")
        parts = [str(self.weight_dtype), str(self.t5_length)]
        for name in names:
            parts.append(c.sources.get(name, ""))
            parts.append(json.dumps(getattr(c, name).config.to_dict(), sort_keys=True, default=str))
            parts += file_stamps(c.sources.get(name, ""))
        return f"text-sd3-{hashlib.sha256('|'.join(parts).encode()).hexdigest()[:16]}"


def load_components(config: RunConfig, device: torch.device | None = None) -> SD3Components:
    """The model's files; for a run on ``device`` the transformer loads as ``load_options`` says."""
    m = config.model
    return load_sd3_components(Path(m.path).expanduser(), config_folder=optional_path(m.config_folder),
                               vae_path=optional_path(m.vae_path), text_encoder_path=optional_path(m.text_encoder_path),
                               clip_g_path=optional_path(m.clip_g_path), t5_path=optional_path(m.text_encoder_2_path),
                               transformer_options=load_options(config, device) if device else None)


def make_bundle(comps: SD3Components, config: RunConfig, device: torch.device, *, lora: bool,
                denoiser_device: torch.device | None = None, full: bool = False) -> SD3Bundle:
    """The bundle around loaded components: frozen parts in the weight dtype, a seeded peft LoRA (fp32) when
    ``lora``, the whole transformer trainable in fp32 when ``full`` (a full fine-tune); the transformer on
    ``denoiser_device`` (default ``device``; the CPU when block swap places it)."""
    wdtype = weight_dtype(config, device)
    transformer = comps.transformer
    prepare_transformer(transformer, (comps.vae, comps.text_encoder, comps.text_encoder_2, comps.text_encoder_3),
                        config, device, wdtype, LORA_TARGETS[config.lora.targets], lora=lora,
                        full=full, denoiser_device=denoiser_device)
    t5_length = config.model.t5_max_length or DEFAULT_T5_LENGTH
    latent_down = 2 ** (len(comps.vae.config.block_out_channels) - 1)
    tc = transformer.config
    arch = {"family": "sd3", "variant": comps.variant, "base": str(Path(config.model.path).expanduser().resolve()),
            "sources": comps.sources, "lora": config.lora.model_dump() if lora else None,
            "prediction_type": "flow", "patch_size": int(tc.patch_size), "t5_max_length": t5_length,
            "inner_dim": int(tc.num_attention_heads) * int(tc.attention_head_dim), "num_layers": int(tc.num_layers),
            "dual_attention_layers": list(tc.dual_attention_layers or ())}
    bundle = SD3Bundle(family="sd3", trainable=SD3Denoiser(transformer, wdtype), save_modules={"transformer": transformer},
                       prediction_type="flow", in_channels=int(comps.vae.config.latent_channels),
                       sample_size=config.data.resolution // latent_down, architecture=arch, tokenizer=comps.tokenizer)
    bundle.components = comps
    bundle.weight_dtype = wdtype
    bundle.t5_length = t5_length
    bundle.lora = lora
    bundle.train_guidance = None  # real classifier-free guidance, no guidance input
    return bundle


def build_sd3_model(config: RunConfig, device: torch.device, *,
                    denoiser_device: torch.device | None = None) -> SD3Bundle:
    return make_bundle(load_components(config, device), config, device, lora=config.lora.enabled,
                       full=not config.lora.enabled, denoiser_device=denoiser_device)


