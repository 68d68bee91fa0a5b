"""Reading the split single files of the transformer families (Flux, SD3, Chroma: a transformer file plus
separate text-encoder and VAE files, as ComfyUI and kohya users keep them): what a file looks like (for the
message that refuses a wrong one), reading it, and copying it into a model built without initialising its
weights. Moved here from ``flux/files.py`` so every family shares one copy; so are the steps of their component
loaders (``load_*_components``): a diffusers folder's parts, the T5 and VAE files, and the refusals of a wrong or
incomplete set of files."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .family import ModelFileError

Tensors = dict[str, torch.Tensor]

# keys only a Flux transformer in the original layout has (with or without ComfyUI's prefix)
FLUX_ORIGINAL_MARKERS = ("double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight")
TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
# ComfyUI's "scaled fp8" files: beside a float8 ``X.weight`` its scale ``X.scale_weight`` (newer files:
# ``X.weight_scale``); the real weight is weight.float() * scale. The activation scales and markers are only for
# ComfyUI's fp8 matmul and are dropped here (we compute in the weight dtype).
FP8_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
FP8_IGNORED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")
FP8_MARKER = "scaled_fp8"  # at the top level or under the model's prefix (model.diffusion_model.scaled_fp8)
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def describe_keys(keys: list[str]) -> str:
    """What a safetensors file with these keys looks like, for an error message."""
    ks = set(keys)
    if any(k.startswith("lora_") or ".lora_" in k or "lora_A" in k or "lora_down" in k for k in keys):
        return "a LoRA"
    if any(k.startswith(("model.diffusion_model.input_blocks", "conditioner.embedders")) for k in keys):
        return "a Stable Diffusion (SD1/SD2/SDXL) checkpoint"
    if any("joint_blocks." in k for k in keys):
        return "an SD3 transformer"
    if any(k.startswith(("encoder.block.", "shared.")) for k in keys):
        return "a T5 text encoder"
    if any("encoder.layers." in k and "self_attn" in k for k in keys):
        return "a CLIP text encoder"
    if any(k.startswith(("encoder.down.", "decoder.up.", "encoder.down_blocks", "decoder.up_blocks")) for k in keys):
        return "a VAE"
    if any("distilled_guidance_layer." in k for k in keys):  # Flux's blocks with Chroma's approximator
        return "a Chroma transformer"
    if ks & set(FLUX_ORIGINAL_MARKERS) or any(k.endswith(FLUX_ORIGINAL_MARKERS) for k in keys):
        return "a Flux transformer"
    return "not a model sdstudio knows"


def strip_prefix(state: Tensors, prefixes: tuple[str, ...] = TRANSFORMER_PREFIXES) -> Tensors:
    """The transformer's own key names (without ``model.diffusion_model.`` / ComfyUI's ``diffusion_model.``)."""
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in state):
            return {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def transformer_keys(keys: list[str]) -> set[str] | None:
    """A transformer file's keys without ComfyUI's / the original's prefix, None for a LoRA's keys."""
    if any(k.startswith(("lora_", "transformer.transformer_blocks")) or ".lora_" in k for k in keys):
        return None
    return {next((k[len(p):] for p in TRANSFORMER_PREFIXES if k.startswith(p)), k) for k in keys}


def swap_halves(w: torch.Tensor) -> torch.Tensor:
    """adaLN (shift, scale) of the original layouts <-> (scale, shift) of diffusers' norms."""
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def fuse_parts(src: Tensors, out: Tensors, fused: Mapping[str, tuple[str, ...]], block: str, original: str) -> None:
    """Stack the diffusers modules of one block (``block``: "transformer_blocks.3") that the original layout keeps
    as one tensor (``fused``: original module -> its diffusers modules, in order) under the original block name
    (``original``: "double_blocks.3"); weight and bias, where every part is there (taken out of ``src``)."""
    for name, parts in fused.items():
        for suffix in ("weight", "bias"):
            keys = [f"{block}.{p}.{suffix}" for p in parts]
            if all(k in src for k in keys):
                out[f"{original}.{name}.{suffix}"] = torch.cat([src.pop(k) for k in keys])


def folder_configs(path: Path) -> tuple[str, dict[str, Any]] | None:
    """A diffusers folder's pipeline class (model_index.json) and its transformer's config; None when unreadable."""
    try:
        index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
        config = json.loads((path / "transformer" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return index.get("_class_name"), config


def model_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers config without its ``_class_name`` / ``_diffusers_version`` entries: the model's arguments."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def file_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return list(fh.keys())
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad files
        raise ModelFileError(f"{path}: not a readable safetensors file ({exc})") from None


def read_tensors(path: Path) -> Tensors:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001
        raise ModelFileError(f"{path}: not a readable safetensors file ({exc})") from None


def take_fp8_scales(state: Tensors, path: Path) -> tuple[Tensors, Tensors]:
    """(``state`` without the scale and marker keys of a ComfyUI scaled-fp8 file, the scales by their weights'
    keys, each an fp32 column of one scale per output row (a per-tensor scale repeated): the form quantize.py
    keeps). A file without scales comes back as it is. A scale that does not fit its weight (no float8 weight
    beside it, or neither one value nor one per row) is refused naming the file and the key."""
    if not any(k.endswith(FP8_SCALE_SUFFIXES + FP8_IGNORED_SUFFIXES) or k.rsplit(".", 1)[-1] == FP8_MARKER
               for k in state):
        return state, {}
    out: Tensors = {}
    scales: Tensors = {}
    for key, value in state.items():
        if key.rsplit(".", 1)[-1] == FP8_MARKER or key.endswith(FP8_IGNORED_SUFFIXES):
            continue
        if not key.endswith(FP8_SCALE_SUFFIXES):
            out[key] = value
            continue
        weight_key = key.rsplit(".", 1)[0] + ".weight"
        weight = state.get(weight_key)
        if weight is None or weight.dtype not in _FP8_DTYPES or weight.ndim != 2:
            what = "no weight" if weight is None else f"a {weight.dtype} weight of shape {tuple(weight.shape)}"
            raise ModelFileError(f"{path}: {key} scales {weight_key}, but the file has {what} there (only float8 "
                                 "matrices of linear layers are scaled in ComfyUI's scaled fp8 files)")
        rows = weight.shape[0]
        if value.numel() not in (1, rows) or not value.is_floating_point():
            raise ModelFileError(f"{path}: {key} has shape {tuple(value.shape)} ({value.dtype}), which does not "
                                 f"scale {weight_key} of shape {tuple(weight.shape)} (one scale, or one per "
                                 f"output row: {rows})")
        scales[weight_key] = value.detach().float().reshape(-1, 1).expand(rows, 1).contiguous()
    return out, scales


def convert_with_scales(state: Tensors, scales: Tensors, convert: Callable[[Tensors], Tensors]) -> tuple[Tensors,
                                                                                                          Tensors]:
    """``convert`` (a family's original -> diffusers layout) applied to ``state`` and to its fp8 ``scales``
    (``take_fp8_scales``) alike: the scales go through the same conversion as zero-memory views of their weights'
    shape (a fused q/k/v split by rows splits its scale column the same way, a row swap swaps it), every other
    tensor as a ``meta`` stand-in."""
    if not scales:
        return convert(state), {}
    proxies = {k: (scales[k].expand(v.shape) if k in scales else torch.empty_like(v, device="meta"))
               for k, v in state.items()}
    converted = {k: v[:, :1].contiguous() for k, v in convert(proxies).items() if v.device.type != "meta"}
    return convert(state), converted


def dequantize_scaled(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """A file's tensor in ``dtype``; a scaled fp8 weight as weight * scale (computed in fp32 one tensor at a time,
    as ``quantize.dequantize`` does for a kept one)."""
    from .quantize import dequantize

    if scale is None:
        return weight.to(dtype) if weight.is_floating_point() else weight
    return dequantize(weight, scale.to(weight.device), dtype)


def _check_fits(own: Tensors, state: Tensors, what: str, path: Path, allowed_missing: tuple[str, ...] = ()) -> None:
    missing = [k for k in own if k not in state and not k.endswith(allowed_missing)]
    wrong = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or wrong:
        looks = describe_keys(list(state))
        detail = f"missing {missing[:3]}" if missing else f"shape of {wrong[:3]} differs"
        raise ModelFileError(f"{path}: does not fit the {what} ({detail}); it looks like {looks}")


def load_into(module: torch.nn.Module, state: Tensors, what: str, path: Path,
              allowed_missing: tuple[str, ...] = ()) -> None:
    """Copy ``state`` into ``module`` (cast to its dtype: an fp8 file goes straight to the module's dtype)."""
    own = module.state_dict()
    state, scales = take_fp8_scales(state, path)  # ComfyUI's scaled fp8 text encoders (t5xxl_fp8_e4m3fn_scaled)
    _check_fits(own, state, what, path, allowed_missing)
    # extra tensors (text projections, position ids) are not used
    with torch.no_grad():
        for k, v in state.items():
            if k in own:
                own[k].copy_(dequantize_scaled(v, scales.get(k), own[k].dtype))


def load_transformer(cls: Any, config: dict[str, Any], state: Tensors, what: str, path: Path, *,
                     dtype: torch.dtype = torch.float32, keep_fp8: bool = False,
                     scales: Tensors | None = None) -> Any:
    """A transformer built without memory for its weights (``meta``) and given the file's tensors one by one,
    each cast to ``dtype`` as it is assigned: the model never exists in fp32 beside the file (as with
    ``empty_model`` + ``load_into``) unless ``dtype`` is fp32.

    ``keep_fp8`` (``model.quantize = 'fp8'`` under a LoRA): the file's float8 e4m3fn weight matrices of linear
    layers are not widened at all: their layers get a placeholder of the right shape and dtype that takes no
    memory (``quantize.fp8_placeholder``) and the file's tensors are remembered on the model
    (``quantize.remember_stored_fp8``), for the quantization to keep as they are.

    ``scales``: a ComfyUI scaled-fp8 file's weight scales by the model's weight names (``take_fp8_scales``, through
    ``convert_with_scales``): without ``keep_fp8`` each such weight is dequantized (weight * scale) into ``dtype``
    as it is assigned; with it the kept fp8 tensor is remembered with its scale (``quantize.SCALE_SUFFIX``)."""
    from accelerate import init_empty_weights

    from .quantize import SCALE_SUFFIX, fp8_placeholder, remember_stored_fp8, stored_fp8_weights

    with init_empty_weights():  # parameters on meta; buffers (position tables) are built as usual
        model = cls(**config)
    own = model.state_dict()
    _check_fits(own, state, what, path)
    linears = {f"{name}.weight" for name, m in model.named_modules() if type(m) is torch.nn.Linear}
    scales = scales or {}
    kept = {k: v for k, v in stored_fp8_weights(state).items() if k in linears} if keep_fp8 else {}
    cast = {k: (fp8_placeholder(v.shape, dtype) if k in kept else dequantize_scaled(v, scales.get(k), dtype))
            for k, v in state.items() if k in own}
    model.load_state_dict(cast, strict=False, assign=True)
    if kept:
        kept.update({k.removesuffix(".weight") + SCALE_SUFFIX: s for k, s in scales.items() if k in kept})
        remember_stored_fp8(model, kept)
    return model


def empty_model(cls: Any, config: Any) -> Any:
    """A model built without initialising its weights (they are all loaded next). Its buffers are built as
    usual: CLIP's ``position_ids`` are not in every file (non-persistent in transformers 5), and ``to_empty`` would
    leave them uninitialised (garbage positions, an index error in the embedding)."""
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on meta, buffers real
        model = cls(**config) if isinstance(config, dict) else cls(config)
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and p.device.type == "meta":
                module._parameters[name] = torch.nn.Parameter(torch.empty_like(p, device="cpu"),
                                                              requires_grad=p.requires_grad)
    return model


def file_stamps(source: str) -> list[str]:
    """Path, size and modification time of a source file (or every .safetensors of a folder): part of a cache
    identity, so a replaced file is encoded anew."""
    if not source:
        return []
    path = Path(source)
    files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
    return [f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.exists()]


# -- the steps of a family's component loader ----------------------------------------------------------------
def require_model_path(path: Path) -> None:
    if not path.exists():
        raise ModelFileError(f"model.path {path}: no such file or folder")


def not_a_folder(path: Path, what: str, pipeline: str, transformer: str) -> ModelFileError:
    """``what``: "Flux"; ``transformer`` with its article ("a FluxTransformer2DModel")."""
    return ModelFileError(f"model.path {path}: not a diffusers {what} folder (model_index.json says no {pipeline} "
                          f"with {transformer})")


def not_a_transformer_file(path: Path, what: str, examples: str) -> ModelFileError:
    """The refusal of a model.path file that is not ``what`` ("a Flux") transformer (``examples``: its names)."""
    keys = file_keys(path) if path.suffix.lower() == ".safetensors" else []
    looks = describe_keys(keys) if keys else "not a .safetensors file"
    return ModelFileError(f"model.path {path}: this is {looks}, not {what} transformer file ({examples})")


def require_part_files(path: Path, what: str, parts: Mapping[str, Path | None], files: str) -> None:
    """A single transformer file needs its part files (config key -> the file, None when unset): refuse naming
    the keys still unset."""
    missing = [key for key, part in parts.items() if part is None]
    if missing:
        raise ModelFileError(f"model.path {path} is a single {what} transformer file: set "
                             f"{', '.join(f'`{k}`' for k in missing)} to {files}")


def load_folder_parts(path: Path, parts: Mapping[str, Any]) -> list[Any]:
    """The parts of a diffusers folder (subfolder -> its class), offline, in order."""
    return [cls.from_pretrained(str(path), subfolder=name, local_files_only=True) for name, cls in parts.items()]


def load_t5(path: Path, config: Any, key: str) -> Any:
    """t5xxl_fp16 / t5xxl_fp8_e4m3fn.safetensors (transformers key names) as a T5EncoderModel of ``config`` (a
    T5Config); ``key``: the config key that named the file."""
    from transformers import T5EncoderModel

    model = empty_model(T5EncoderModel, config)
    state = read_tensors(path)
    if not any(k.startswith("encoder.block.") for k in state):
        raise ModelFileError(f"{key} {path}: this is {describe_keys(list(state))}, "
                             "not a T5 text encoder (t5xxl_fp16.safetensors)")
    if "shared.weight" not in state and "encoder.embed_tokens.weight" in state:
        state["shared.weight"] = state["encoder.embed_tokens.weight"]
    load_into(model, state, "T5 text encoder", path, allowed_missing=("embed_tokens.weight",))
    model.tie_weights()
    return model


def load_vae(path: Path, state: Tensors, params: dict[str, Any], what: str, names: str = "") -> Any:
    """A VAE's tensors (original or diffusers key names, without a prefix) as an AutoencoderKL of ``params``;
    ``what``: the VAE for an error message, ``names``: its usual file name there (" (ae.safetensors)")."""
    from diffusers import AutoencoderKL

    if not any(k.startswith(("encoder.", "decoder.")) for k in state) or any(k.startswith("encoder.block.")
                                                                            for k in state):
        raise ModelFileError(f"model.vae_path {path}: this is {describe_keys(list(state))}, not a VAE{names}")
    if any(k.startswith("encoder.down.") for k in state):
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        state = convert_ldm_vae_checkpoint(state, params)
    model = empty_model(AutoencoderKL, params)
    load_into(model, state, what, path)
    return model
