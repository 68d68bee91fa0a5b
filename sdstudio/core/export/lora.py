"""LoRA exports: the kohya format (A1111, Forge, ComfyUI) and the diffusers/PEFT format
(`load_lora_weights`), both carrying the trained alpha so the strength is right everywhere."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import UserError
from ..lora_tools.names import ldm_module_name as _sdxl_module_name
from ..models.registry import get_family
from .metadata import cast, training_metadata, write_safetensors
from .source import ExportSource, lora_peft_state

_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


def text_module_path(module: str) -> str:
    """A CLIP text-encoder module path with the ``text_model.`` level every real LoRA file has: transformers 5
    flattened CLIPTextModel ("encoder.layers.0.self_attn.q_proj"), CLIPTextModelWithProjection keeps it."""
    return module if module.startswith("text_model.") else f"text_model.{module}"


def text_lora_states(source: ExportSource) -> dict[str, dict[str, torch.Tensor]]:
    """encoder name -> its PEFT-named adapter tensors, with the ``text_model.`` level; empty without a
    text-encoder LoRA."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name in source.text_encoders_trained:
        state = lora_peft_state(source, f"{name}.")
        out[name] = {text_module_path(k): v for k, v in state.items()}
    return out


def _kohya_pairs(state: dict[str, torch.Tensor], source: ExportSource, prefix: str, alpha: float,
                 rename: Callable[[str], str] | None = None) -> dict[str, torch.Tensor]:
    """PEFT adapter tensors -> kohya ``<prefix>_<module path with _>.lora_down/.lora_up.weight`` + ``.alpha``."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            raise UserError(f"kohya export: unexpected LoRA tensor {key!r} in {source.checkpoint}")
        module = rename(m["module"]) if rename is not None else m["module"]
        name = f"{prefix}_" + module.replace(".", "_")
        out[f"{name}.lora_{'down' if m['ab'] == 'A' else 'up'}.weight"] = tensor
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def kohya_state(source: ExportSource, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """kohya keys: lora_unet_<module path with _>.lora_down/.lora_up.weight and .alpha (the real alpha); a
    text-encoder LoRA as lora_te_text_model_... (SD1/SD2) or lora_te1_ / lora_te2_ (SDXL)."""
    lora = source.lora
    assert lora is not None
    layers = int(source.architecture.get("layers_per_block", 2))
    family = get_family(source.family)

    def unet_name(module: str) -> str:
        if not family.kohya_unet_ldm_names:
            return module
        if ".resnets." in module or module.startswith(("conv_", "time_", "add_")) or ".upsamplers." in module \
                or ".downsamplers." in module:
            raise UserError(f"kohya export of an {family.short_title} LoRA trained on convolution layers (lora.targets = 'all') "
                            "is not supported yet; export it in the diffusers format")
        return _sdxl_module_name(module, layers)

    out = _kohya_pairs(lora_peft_state(source), source, "lora_unet", lora["alpha"], unet_name)
    prefixes = family.kohya_text_prefixes
    for name, state in text_lora_states(source).items():
        out.update(_kohya_pairs(state, source, prefixes[name], lora["alpha"]))
    return cast(out, dtype)


def export_kohya_lora(source: ExportSource, path: Path, *, dtype: torch.dtype = torch.float16,
                      force: bool = False) -> Path:
    if source.lora is not None and source.lora.get("type", "lora") != "lora":
        from .lycoris import export_lycoris  # LoHa / LoKr / DoRA / OFT: LyCORIS keys

        return export_lycoris(source, path, dtype=dtype, force=force)
    tensors = kohya_state(source, dtype)
    meta = training_metadata(source, title=path.stem, lora=True)
    return write_safetensors(tensors, path, meta, force=force)


def adapter_config(lora: dict[str, Any], target_modules: list[str] | str | None = None, *,
                   family: str = "sd1") -> dict[str, Any]:
    """The peft LoraConfig of the run, as diffusers stores it so `load_lora_weights` restores alpha; the UNet's
    unless ``target_modules`` (a text encoder's, as model.json records them) is given."""
    from peft import LoraConfig

    targets = get_family(family).lora_targets[lora["targets"]] if target_modules is None else target_modules
    cfg = LoraConfig(r=int(lora["rank"]), lora_alpha=float(lora["alpha"]), lora_dropout=float(lora["dropout"]),
                     target_modules=targets, init_lora_weights="gaussian", use_dora=lora.get("type") == "dora")
    out = cfg.to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in out.items()}


def export_diffusers_lora(source: ExportSource, path: Path, *, dtype: torch.dtype = torch.float16,
                          force: bool = False) -> Path:
    """`pytorch_lora_weights.safetensors` style, written by diffusers' own `save_lora_weights` (so its
    loader reads it back as written), plus sdstudio's header metadata. A text-encoder LoRA goes in as
    ``text_encoder.text_model.…`` (+ ``text_encoder_2.…``) with its own adapter config."""
    from ..models.sd.model import text_lora_targets

    lora = source.lora
    assert lora is not None
    if lora.get("type", "lora") not in ("lora", "dora"):
        raise UserError(f"diffusers export: diffusers loads LoRA and DoRA adapters only, not this run's "
                        f"lora.type = {lora['type']!r}; export it as kohya (LyCORIS keys)")
    peft = cast(lora_peft_state(source), dtype)
    kwargs: dict[str, Any] = {"unet_lora_layers": peft,
                              "unet_lora_adapter_metadata": adapter_config(lora, family=source.family)}
    recorded = source.architecture.get("text_encoder_lora_targets") or {}
    for name, state in text_lora_states(source).items():
        kwargs[f"{name}_lora_layers"] = cast(state, dtype)
        targets = recorded.get(name) or text_lora_targets(lora["targets"])
        kwargs[f"{name}_lora_adapter_metadata"] = adapter_config(lora, targets)
    pipe_cls = get_family(source.family).pipeline_class()  # type: ignore[attr-defined]
    with tempfile.TemporaryDirectory(prefix="sdstudio-export-") as tmp:
        pipe_cls.save_lora_weights(tmp, **kwargs, safe_serialization=True, weight_name="lora.safetensors")
        with safe_open(str(Path(tmp) / "lora.safetensors"), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
            written_meta = dict(fh.metadata() or {})
    meta = {**training_metadata(source, title=path.stem, lora=True), **written_meta}
    return write_safetensors(tensors, path, meta, force=force)
