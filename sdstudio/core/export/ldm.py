"""diffusers state dicts -> the original ("LDM" / "sgm") single-file layout that A1111, ComfyUI and Forge load.

Pure renames (plus the few reshapes the layout needs); no I/O. Derived from the published layouts and by
inverting what diffusers' own loader (``diffusers.loaders.single_file_utils``: ``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``) reads, so
``from_single_file`` gives back exactly the tensors that went in. Every input key must be mapped: a key this
module does not know raises instead of being dropped silently. docs/export-single-file.md has the rules.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SD2_OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

Tensors = dict[str, torch.Tensor]

_UNET_FIXED = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's text_time embedding
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# ResBlock sub-modules: diffusers ResnetBlock2D name -> LDM ResBlock name (Sequential indices included)
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
               "conv_shortcut": "nin_shortcut"}
# VAE mid-block attention: diffusers Attention (Linear layers) -> LDM AttnBlock (1x1 convs); the old
# diffusers names (query/key/value/proj_attn) are accepted too
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
                  "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
_VAE_FIXED = {"encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out", "quant_conv",
              "post_quant_conv"}

_DOWN_RESNET = re.compile(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)")
_DOWN_ATTENTION = re.compile(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)")
_DOWN_SAMPLER = re.compile(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)")
_MID_RESNET = re.compile(r"mid_block\.resnets\.(\d+)\.(\w+)\.(.+)")
_MID_ATTENTION = re.compile(r"mid_block\.attentions\.0\.(.+)")
_UP_RESNET = re.compile(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)")
_UP_ATTENTION = re.compile(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)")
_UP_SAMPLER = re.compile(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)")


class MappingError(ValueError):
    """A state dict holds keys (or a structure) the original layout cannot express."""


def _fail_unmapped(what: str, keys: list[str]) -> None:
    if keys:
        sample = ", ".join(sorted(keys)[:5])
        raise MappingError(f"{what}: {len(keys)} tensor(s) have no place in the original single-file layout "
                           f"(e.g. {sample}); this model is not a standard SD1.x / SD2.x / SDXL {what}")


def _resnet_inner(table: dict[str, str], module: str, rest: str, key: str) -> str:
    if module not in table:
        raise MappingError(f"{key}: unknown ResNet sub-module {module!r}")
    return f"{table[module]}.{rest}"


def _config_get(config: Mapping[str, Any] | Any, name: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor], unet_config: Mapping[str, Any] | Any) -> Tensors:
    """diffusers UNet2DConditionModel tensors -> ``model.diffusion_model.*`` in the original block layout.

    Each level has ``layers_per_block`` ResBlocks down and ``layers_per_block + 1`` up, so with
    ``n = layers_per_block + 1``: ``down_blocks.i.resnets.j`` -> ``input_blocks.{n*i+j+1}.0`` (attention ``.1``),
    the level's downsampler -> ``input_blocks.{n*(i+1)}.0.op``, ``up_blocks.i.resnets.j`` ->
    ``output_blocks.{n*i+j}.0`` (attention ``.1``), the upsampler rides in the level's last output block after
    the ResBlock and, when there is one, the attention (``.1.conv`` or ``.2.conv``).
    """
    per_block = _config_get(unet_config, "layers_per_block")
    if not isinstance(per_block, int):
        raise MappingError(f"UNet layers_per_block = {per_block!r}: the original layout (and diffusers' loader) "
                           "needs one number for every level")
    n = per_block + 1
    keys = list(state_dict)
    if any(k.startswith("mid_block.") for k in keys) and not any(k.startswith("mid_block.attentions.") for k in keys):
        # the loader reads middle_block.1 as an attention: a mid block without one would load shifted
        raise MappingError("UNet mid block without attention: not expressible in the original SD layout")
    up_with_attention = {int(m.group(1)) for k in keys if (m := _UP_ATTENTION.fullmatch(k))}
    out: Tensors = {}
    unmapped: list[str] = []

    def put(ldm_key: str, source_key: str) -> None:
        out[UNET_PREFIX + ldm_key] = state_dict[source_key]

    for key in keys:
        module, _, param = key.rpartition(".")
        if module in _UNET_FIXED:
            put(f"{_UNET_FIXED[module]}.{param}", key)
        elif m := _DOWN_RESNET.fullmatch(key):
            i, j = int(m.group(1)), int(m.group(2))
            if j >= per_block:
                raise MappingError(f"{key}: more ResNets in a down block than layers_per_block = {per_block}")
            put(f"input_blocks.{n * i + j + 1}.0.{_resnet_inner(_UNET_RESNET, m.group(3), m.group(4), key)}", key)
        elif m := _DOWN_ATTENTION.fullmatch(key):
            i, j = int(m.group(1)), int(m.group(2))
            put(f"input_blocks.{n * i + j + 1}.1.{m.group(3)}", key)
        elif m := _DOWN_SAMPLER.fullmatch(key):
            put(f"input_blocks.{n * (int(m.group(1)) + 1)}.0.op.{m.group(2)}", key)
        elif m := _MID_RESNET.fullmatch(key):
            put(f"middle_block.{2 * int(m.group(1))}.{_resnet_inner(_UNET_RESNET, m.group(2), m.group(3), key)}",
                key)
        elif m := _MID_ATTENTION.fullmatch(key):
            put(f"middle_block.1.{m.group(1)}", key)
        elif m := _UP_RESNET.fullmatch(key):
            i, j = int(m.group(1)), int(m.group(2))
            if j > per_block:
                raise MappingError(f"{key}: more ResNets in an up block than layers_per_block + 1 = {n}")
            put(f"output_blocks.{n * i + j}.0.{_resnet_inner(_UNET_RESNET, m.group(3), m.group(4), key)}", key)
        elif m := _UP_ATTENTION.fullmatch(key):
            i, j = int(m.group(1)), int(m.group(2))
            put(f"output_blocks.{n * i + j}.1.{m.group(3)}", key)
        elif m := _UP_SAMPLER.fullmatch(key):
            i = int(m.group(1))
            slot = 2 if i in up_with_attention else 1
            put(f"output_blocks.{n * i + per_block}.{slot}.conv.{m.group(2)}", key)
        else:
            unmapped.append(key)
    _fail_unmapped("UNet", unmapped)
    return out


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor]) -> Tensors:
    """diffusers AutoencoderKL tensors -> ``first_stage_model.*``.

    The decoder's up blocks are numbered the other way round in the original (``up_blocks.0`` is ``up.{n-1}``),
    and the mid-block attention's linear q/k/v/out weights become 1x1 conv weights ``[C, C, 1, 1]``.
    """
    up_indices = {int(m.group(1)) for k in state_dict if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))}
    n_up = max(up_indices) + 1 if up_indices else 0
    out: Tensors = {}
    unmapped: list[str] = []
    for key, tensor in state_dict.items():
        module, _, param = key.rpartition(".")
        ldm: str | None = None
        if module in _VAE_FIXED:
            ldm = key
        elif module in ("encoder.conv_norm_out", "decoder.conv_norm_out"):
            ldm = f"{module.split('.')[0]}.norm_out.{param}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)", key):
            inner = _resnet_inner(_VAE_RESNET, m.group(3), m.group(4), key)
            ldm = f"encoder.down.{m.group(1)}.block.{m.group(2)}.{inner}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            ldm = f"encoder.down.{m.group(1)}.downsample.conv.{m.group(2)}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)", key):
            inner = _resnet_inner(_VAE_RESNET, m.group(3), m.group(4), key)
            ldm = f"decoder.up.{n_up - 1 - int(m.group(1))}.block.{m.group(2)}.{inner}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            ldm = f"decoder.up.{n_up - 1 - int(m.group(1))}.upsample.conv.{m.group(2)}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(\w+)\.(.+)", key):
            inner = _resnet_inner(_VAE_RESNET, m.group(3), m.group(4), key)
            ldm = f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{inner}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
            if m.group(2) not in _VAE_ATTENTION:
                raise MappingError(f"{key}: unknown VAE attention sub-module {m.group(2)!r}")
            ldm = f"{m.group(1)}.mid.attn_1.{_VAE_ATTENTION[m.group(2)]}.{m.group(3)}"
            if m.group(2) != "group_norm" and m.group(3) == "weight" and tensor.ndim == 2:
                tensor = tensor.reshape(*tensor.shape, 1, 1)
        if ldm is None:
            unmapped.append(key)
        else:
            out[VAE_PREFIX + ldm] = tensor
    _fail_unmapped("VAE", unmapped)
    return out


def _with_text_model(key: str) -> str:
    """transformers >= 5 flattened CLIPTextModel (no ``text_model.`` level in its keys); put it back."""
    if key.startswith(("text_model.", "text_projection.")):
        return key
    return "text_model." + key


def clip_l_to_ldm(state_dict: Mapping[str, torch.Tensor], prefix: str = SD1_CLIP_PREFIX) -> Tensors:
    """HF CLIPTextModel tensors -> ``prefix + "text_model.*"`` (SD1's and SDXL's CLIP-L keep HF naming).

    ``position_ids`` (a buffer older transformers saved) is left out: loaders do not need it, and a float cast
    of it is a known source of broken checkpoints.
    """
    return {prefix + _with_text_model(k): v for k, v in state_dict.items() if not k.endswith("position_ids")}


_OPEN_CLIP_FIXED = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_HF_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")


def open_clip_to_ldm(state_dict: Mapping[str, torch.Tensor], prefix: str = SD2_OPEN_CLIP_PREFIX) -> Tensors:
    """HF CLIPTextModel(WithProjection) tensors -> OpenCLIP naming under ``prefix``.

    q/k/v projections are fused into ``attn.in_proj_weight`` / ``in_proj_bias`` (q, k, v stacked on dim 0),
    ``text_projection.weight`` ([proj, hidden], a Linear) becomes the OpenCLIP matrix ``text_projection``
    ([hidden, proj], used as ``x @ text_projection``).
    """
    sd = {_with_text_model(k): v for k, v in state_dict.items() if not k.endswith("position_ids")}
    out: Tensors = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unmapped: list[str] = []
    for key, tensor in sd.items():
        if key in _OPEN_CLIP_FIXED:
            out[prefix + _OPEN_CLIP_FIXED[key]] = tensor
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = tensor.T.contiguous()
        elif m := _HF_LAYER.fullmatch(key):
            layer, module, param = int(m.group(1)), m.group(2), m.group(3)
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((layer, param), {})[module[-6]] = tensor
            elif module in _OPEN_CLIP_LAYER:
                out[f"{prefix}transformer.resblocks.{layer}.{_OPEN_CLIP_LAYER[module]}.{param}"] = tensor
            else:
                unmapped.append(key)
        else:
            unmapped.append(key)
    _fail_unmapped("text encoder (OpenCLIP)", unmapped)
    for (layer, param), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise MappingError(f"text encoder layer {layer}: {param} of q/k/v incomplete ({sorted(parts)})")
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0)
    return out
