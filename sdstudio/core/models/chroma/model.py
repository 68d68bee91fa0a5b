"""The Chroma model of a run: the transformer with a peft LoRA (the frozen base in the weight dtype, fp32
adapters) on Flux's packed 2x2 latent patches and position ids (``flux/model.py``), conditioned on T5 states
only, with T5's attention mask kept: Chroma was trained with the caption's padding masked in the transformer's
attention except the first pad token, and its T5 encodes with the tokenizer's mask (as lodestones' trainer,
ComfyUI and diffusers' ChromaPipeline since diffusers PR 12508).

The mask is passed as a boolean (keep = True): ChromaPipeline passes it in the prompt's float dtype, which
SDPA adds to the scores instead of masking (diffusers issues 12116 / 13619). And diffusers' gradient
checkpointing calls Chroma's single blocks without the mask, so training with train.gradient_checkpointing
would see a different model than sampling; ``ChromaDenoiser`` hands the mask to those calls."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...config import RunConfig
from ..flux.model import LORA_TARGETS, FluxBundle, _file_stamps, _weight_dtype, image_ids, pack, unpack
from ..registry import get_family
from ..transformer_parts import load_options, prepare_transformer
from . import offline
from .files import ChromaComponents, load_chroma_components

# the transformer blocks' linear layers as Flux's (Chroma's blocks have no modulation linears, so "all" = the
# attention and MLP layers); the approximator (distilled_guidance_layer) is never a default target
__all__ = ["LORA_TARGETS", "ChromaBundle", "ChromaDenoiser", "build_chroma_model", "make_bundle"]


def transformer_mask(tokenizer_mask: torch.Tensor) -> torch.Tensor:
    """Chroma's text mask from the tokenizer's: the caption's tokens and the first padding token (its EOS is
    the last caption token; T5 pads on the right)."""
    lengths = tokenizer_mask.sum(dim=1, keepdim=True)
    positions = torch.arange(tokenizer_mask.shape[1], device=tokenizer_mask.device).unsqueeze(0)
    return (positions <= lengths).to(torch.float32)


def _with_mask(fn: Callable[..., Any], mask: torch.Tensor) -> Callable[..., Any]:
    """diffusers' checkpointing call of a block, with the attention mask the single blocks are not given."""
    from diffusers.models.transformers.transformer_chroma import ChromaSingleTransformerBlock

    def call(block: nn.Module, *args: Any) -> Any:
        if isinstance(block, ChromaSingleTransformerBlock) and len(args) == 3:
            args = (*args, mask)
        return fn(block, *args)

    return call


class ChromaDenoiser(nn.Module):
    """The transformer as forward(x_t [B, C, H, W], t [B] in [0, 1], cond) -> velocity [B, C, H, W];
    cond = {"states": T5 states [B, T, D], "mask": [B, T] bool, True = attended}."""

    def __init__(self, transformer: nn.Module, weight_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.transformer = transformer
        self.weight_dtype = weight_dtype

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        b, _, h, w = noisy.shape
        dtype = self.weight_dtype
        states = cond["states"].to(dtype)
        tokens = pack(noisy).to(dtype)
        text_mask = cond.get("mask")
        mask = None
        if text_mask is not None:
            mask = torch.cat([text_mask.to(noisy.device, torch.bool),
                              torch.ones(b, tokens.shape[1], device=noisy.device, dtype=torch.bool)], dim=1)
        transformer = self.transformer
        checkpointing = bool(getattr(transformer, "gradient_checkpointing", False)) and mask is not None
        if checkpointing:
            plain = transformer._gradient_checkpointing_func
            transformer._gradient_checkpointing_func = _with_mask(plain, mask)
        try:
            out = transformer(
                hidden_states=tokens, timestep=timesteps.to(dtype), encoder_hidden_states=states,
                txt_ids=torch.zeros(states.shape[1], 3, device=noisy.device, dtype=dtype),
                img_ids=image_ids(h, w, noisy.device, dtype), attention_mask=mask, return_dict=False)[0]
        finally:
            if checkpointing:
                transformer._gradient_checkpointing_func = plain
        return unpack(out, h, w).to(noisy.dtype)


class ChromaBundle(FluxBundle):
    """As Flux's bundle (latents, checkpoints) with Chroma's conditioning: T5 states + the attention mask."""

    components: ChromaComponents  # type: ignore[assignment]

    @torch.no_grad()
    def text_features(self, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """T5 per-token states (encoded with the tokenizer's mask) and Chroma's transformer mask: what the
        text-embedding cache stores."""
        c = self.components
        tokens = c.tokenizer(captions, padding="max_length", truncation=True, max_length=self.t5_length,
                             return_tensors="pt")
        ids, tok_mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        states = c.text_encoder(ids, attention_mask=tok_mask, output_hidden_states=False)[0]
        return {"states": states, "mask": transformer_mask(tok_mask)}

    def assemble(self, features: dict[str, torch.Tensor], device: torch.device, sizes: Any = None
                 ) -> dict[str, torch.Tensor]:
        return {"states": features["states"].to(device, self.weight_dtype),
                "mask": features["mask"].to(device) > 0.5}

    def text_encoder_identity(self) -> str:
        c = self.components
        source = c.sources.get("text_encoder", "")
        parts = ["chroma-masked", source, str(self.weight_dtype), str(self.t5_length),
                 json.dumps(c.text_encoder.config.to_dict(), sort_keys=True, default=str), *_file_stamps(source)]
        return f"text-chroma-{hashlib.sha256('|'.join(parts).encode()).hexdigest()[:16]}"


def _path(value: str) -> Path | None:
    return Path(value).expanduser() if value else None


def load_components(config: RunConfig, device: torch.device | None = None) -> ChromaComponents:
    """The model's files; the T5 file is model.text_encoder_2_path as for Flux (model.text_encoder_path is
    taken when only it is set: Chroma has no CLIP). For a run on ``device`` the transformer loads as
    ``load_options`` says."""
    m = config.model
    return load_chroma_components(Path(m.path).expanduser(), config_folder=_path(m.config_folder),
                                  vae_path=_path(m.vae_path),
                                  text_encoder_path=_path(m.text_encoder_2_path or m.text_encoder_path),
                                  transformer_options=load_options(config, device) if device else None)


def make_bundle(comps: ChromaComponents, config: RunConfig, device: torch.device, *, lora: bool,
                denoiser_device: torch.device | None = None, full: bool = False) -> ChromaBundle:
    """The bundle around loaded components: frozen parts in the weight dtype, a seeded peft LoRA (fp32) when
    ``lora``, the whole transformer trainable in fp32 when ``full`` (a full fine-tune); the transformer on
    ``denoiser_device`` (default ``device``; the CPU when block swap places it)."""
    family = get_family("chroma")
    wdtype = _weight_dtype(config, device)
    transformer = comps.transformer
    prepare_transformer(transformer, (comps.vae, comps.text_encoder), config, device, wdtype,
                        LORA_TARGETS[config.lora.targets], lora=lora, full=full,
                        denoiser_device=denoiser_device)
    t5_length = config.model.t5_max_length or offline.DEFAULT_T5_LENGTH
    latent_down = 2 ** (len(comps.vae.config.block_out_channels) - 1)
    tc = transformer.config
    arch = {"family": family.name, "base": str(Path(config.model.path).expanduser().resolve()),
            "sources": comps.sources, "lora": config.lora.model_dump() if lora else None,
            "prediction_type": "flow", "patch_size": 2, "t5_max_length": t5_length, "guidance_embeds": False,
            "inner_dim": int(tc.num_attention_heads) * int(tc.attention_head_dim),
            "num_layers": int(tc.num_layers), "num_single_layers": int(tc.num_single_layers)}
    bundle = ChromaBundle(family=family.name, trainable=ChromaDenoiser(transformer, wdtype),
                          save_modules={"transformer": transformer}, prediction_type="flow",
                          in_channels=int(comps.vae.config.latent_channels),
                          sample_size=config.data.resolution // latent_down, architecture=arch,
                          tokenizer=comps.tokenizer)
    bundle.components = comps
    bundle.weight_dtype = wdtype
    bundle.t5_length = t5_length
    bundle.lora = lora
    bundle.train_guidance = None
    return bundle


def build_chroma_model(config: RunConfig, device: torch.device, *,
                       denoiser_device: torch.device | None = None) -> ChromaBundle:
    return make_bundle(load_components(config, device), config, device, lora=config.lora.enabled,
                       full=not config.lora.enabled, denoiser_device=denoiser_device)
