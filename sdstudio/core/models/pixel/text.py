"""How the from-scratch model reads its caption: the text encoder's attention mask, the pooled caption added to the
timestep embedding, and where the UNet cross-attends to the caption.

Three choices, each a config key (docs/benchmarks.md measures them on the compositional test):

- ``model.text_causal``: CLIP's text encoder is causal (each token sees only the tokens before it), which suits a
  pretrained CLIP read at its end-of-text token but leaves the early words of a caption ("a red circle on
  black") blind to the later ones. Off, the same CLIPTextModel weights run with a padding-only mask, so every
  word sees the whole caption. The choice is stored in the text encoder's config (``sdstudio_bidirectional``),
  so a saved or exported encoder keeps it.
- ``model.text_pooled_to_time``: the masked mean of the caption's token states, projected by the UNet's
  ``class_embedding`` (diffusers' ``class_embed_type="projection"``) and added to the timestep embedding, as
  SDXL adds its pooled text: every ResNet block, at every resolution, is told the whole caption.
- ``model.cross_attention_everywhere``: levels that ``model.attention_levels`` leaves without attention get a
  cross-attention-only transformer (diffusers' ``only_cross_attention``: no self-attention, so it stays cheap at
  the highest resolution), so the caption reaches every level of the UNet.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from ...config import RunConfig

BIDIRECTIONAL_FLAG = "sdstudio_bidirectional"


def text_config_extras(config: RunConfig) -> dict[str, Any]:
    """Entries added to the text encoder's config (empty for today's causal encoder, so old runs load as before)."""
    return {} if config.model.text_causal else {BIDIRECTIONAL_FLAG: True}


def is_bidirectional(text_encoder: nn.Module) -> bool:
    return bool(getattr(getattr(text_encoder, "config", None), BIDIRECTIONAL_FLAG, False))


def padding_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive (batch, 1, 1, tokens) mask: 0 where a token is real, the dtype's minimum on padding."""
    keep = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - keep) * torch.finfo(dtype).min


def encode_tokens(text_encoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The caption's token states (batch, tokens, width): CLIP's own forward, or, for a bidirectional encoder,
    the same modules with a padding-only mask."""
    if not is_bidirectional(text_encoder):
        return text_encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
    model = getattr(text_encoder, "text_model", text_encoder)  # transformers 4 nests the modules one deeper
    hidden = model.embeddings(input_ids=input_ids)
    hidden = model.encoder(inputs_embeds=hidden, attention_mask=padding_mask(attention_mask, hidden.dtype))
    return model.final_layer_norm(hidden.last_hidden_state)


def pooled_caption(states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the real (unpadded) tokens' states: (batch, width)."""
    weights = attention_mask.to(states.dtype).unsqueeze(-1)
    return (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def unet_caption_inputs(unet: nn.Module, states: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, Any]:
    """Keyword arguments for a UNet2DConditionModel call: the token states, their mask and, when the UNet has a
    projection class embedding (``model.text_pooled_to_time``), the pooled caption as its class labels."""
    kwargs: dict[str, Any] = {"encoder_hidden_states": states, "encoder_attention_mask": attention_mask}
    if getattr(unet.config, "class_embed_type", None) == "projection":
        kwargs["class_labels"] = pooled_caption(states, attention_mask)
    return kwargs


def conditioning_unet_kwargs(config: RunConfig, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The conditional UNet's keyword arguments with the caption-placement options applied."""
    m = config.model
    out = dict(kwargs)
    if m.text_pooled_to_time:
        out.update(class_embed_type="projection", projection_class_embeddings_input_dim=m.text_width)
    if m.cross_attention_everywhere and not all(m.attention_levels):
        levels = tuple(m.attention_levels)
        chans = tuple(m.block_channels)
        out["down_block_types"] = tuple("CrossAttnDownBlock2D" for _ in levels)
        out["up_block_types"] = tuple("CrossAttnUpBlock2D" for _ in levels)
        out["only_cross_attention"] = tuple(not a for a in levels)
        # heads of attention_head_dim channels; a level whose channels it does not divide gets one head
        out["attention_head_dim"] = tuple(max(1, c // m.attention_head_dim) if c % m.attention_head_dim == 0
                                          else 1 for c in chans)
        if out.get("mid_block_type") is None:
            out["mid_block_type"] = "UNetMidBlock2DCrossAttn"
    return out
