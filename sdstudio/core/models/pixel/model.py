"""The from-scratch family: a diffusers UNet in pixel space, conditioned on captions through a tiny
CLIP text encoder (trained with it) and a word-level tokenizer built from the dataset's captions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.models import activations as _activations
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from ...config import RunConfig
from ..bundle import ModelBundle
from .recipe_parts import attach_learned_schedule, output_channels
from .text import conditioning_unet_kwargs, encode_tokens, text_config_extras, unet_caption_inputs

# diffusers knows silu/relu/gelu/mish; LeakyReLU is registered so configs naming it build and reload.
_activations.ACT2CLS.setdefault("leaky_relu", nn.LeakyReLU)

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")


def build_word_tokenizer(captions: list[str], max_length: int) -> PreTrainedTokenizerFast:
    """A lower-case word-level tokenizer whose vocabulary is every word of ``captions`` (sorted)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    pre = pre_tokenizers.Whitespace()
    norm = normalizers.Lowercase()
    words: set[str] = set()
    for caption in captions:
        for word, _ in pre.pre_tokenize_str(norm.normalize_str(caption)):
            words.add(word)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in sorted(words):
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = norm
    tok.pre_tokenizer = pre
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>", eos_token="<eos>", model_max_length=max_length)


def unet_kwargs(config: RunConfig) -> dict[str, Any]:
    m = config.model
    chans = tuple(m.block_channels)
    attn = tuple(m.attention_levels)
    common: dict[str, Any] = dict(sample_size=config.data.resolution, in_channels=3,
                                  out_channels=output_channels(config, 3), block_out_channels=chans, layers_per_block=m.layers_per_block,
                                  act_fn=m.activation, norm_num_groups=m.norm_groups)
    if m.conditional:
        heads = tuple(max(1, c // m.attention_head_dim) for c in chans)
        return conditioning_unet_kwargs(config, dict(
            common, down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
            up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
            mid_block_type="UNetMidBlock2DCrossAttn" if attn[-1] else None,
            cross_attention_dim=m.text_width, attention_head_dim=heads, dropout=m.dropout))
    return dict(common, down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
                up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
                attention_head_dim=m.attention_head_dim, dropout=m.dropout)


def text_config(config: RunConfig, vocab_size: int) -> dict[str, Any]:
    m = config.model
    return dict(vocab_size=vocab_size, hidden_size=m.text_width, intermediate_size=4 * m.text_width,
                num_hidden_layers=m.text_layers, num_attention_heads=m.text_heads,
                max_position_embeddings=m.max_caption_tokens, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                hidden_act="gelu", dropout=0.0, **text_config_extras(config))


def apply_init(module: nn.Module, kind: str, std: float) -> None:
    """Re-initialise conv/linear weights ("default" keeps PyTorch's own)."""
    if kind == "default":
        return
    for sub in module.modules():
        if isinstance(sub, (nn.Conv2d, nn.Linear)):
            if kind == "normal":
                nn.init.normal_(sub.weight, 0.0, std)
            elif kind == "xavier":
                nn.init.xavier_uniform_(sub.weight)
            elif kind == "kaiming":
                nn.init.kaiming_normal_(sub.weight, nonlinearity="relu")
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)


class PixelDenoiser(nn.Module):
    """UNet (+ its text encoder) as one module: forward(noisy, t, cond) -> prediction."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module | None) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.text_encoder is None:
            return self.unet(noisy, timesteps).sample
        states = encode_tokens(self.text_encoder, cond["input_ids"], cond["attention_mask"])
        return self.unet(noisy, timesteps, **unet_caption_inputs(self.unet, states, cond["attention_mask"])).sample


class PixelBundle(ModelBundle):
    def encode_captions(self, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        if self.tokenizer is None:
            return {}
        enc = self.tokenizer(captions, padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}

    def save_extra(self, folder: Path) -> None:
        (folder / "model.json").write_text(json.dumps(self.architecture, indent=1), encoding="utf-8")
        if self.tokenizer is not None:
            self.tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))


def build_pixel_model(config: RunConfig, captions: list[str], *, tokenizer_file: Path | None = None) -> PixelBundle:
    """A new model from the config (seeded), or the skeleton to load a checkpoint into.

    ``tokenizer_file``: reuse a saved vocabulary (resume, sampling) instead of building one.
    """
    m = config.model
    torch.manual_seed(config.train.seed)
    tokenizer = None
    text_encoder = None
    if m.conditional:
        if tokenizer_file is not None:
            from tokenizers import Tokenizer
            tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(tokenizer_file)),
                                                pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                                eos_token="<eos>", model_max_length=m.max_caption_tokens)
        else:
            tokenizer = build_word_tokenizer(captions, m.max_caption_tokens)
        tcfg = text_config(config, len(tokenizer))
        text_encoder = CLIPTextModel(CLIPTextConfig(**tcfg))
        ukw = unet_kwargs(config)
        unet: nn.Module = UNet2DConditionModel(**ukw)
    else:
        tcfg = {}
        ukw = unet_kwargs(config)
        unet = UNet2DModel(**ukw)
    apply_init(unet, m.init, m.init_std)
    if text_encoder is not None:
        apply_init(text_encoder, m.init, m.init_std)
    trainable = PixelDenoiser(unet, text_encoder)
    save_modules: dict[str, nn.Module] = {"unet": unet}
    if text_encoder is not None:
        save_modules["text_encoder"] = text_encoder
    attach_learned_schedule(trainable, save_modules, config)
    arch = {"family": "pixel", "unet_class": type(unet).__name__,
            "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in ukw.items()}, "text_encoder": tcfg}
    return PixelBundle(family="pixel", trainable=trainable, save_modules=save_modules,
                       prediction_type=config.diffusion.prediction_type, in_channels=3,
                       sample_size=config.data.resolution, architecture=arch, tokenizer=tokenizer)
