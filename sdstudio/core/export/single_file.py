"""One ``.safetensors`` with UNet, VAE and text encoder(s) in the original layout (A1111 / ComfyUI / Forge /
diffusers ``from_single_file``), written atomically."""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..atomic import write_file_atomic
from ..checksums import safetensors_data_sha256
from ..errors import UserError
from ..models.registry import FAMILY_NAMES, families, get_family
from .ldm import (
    Tensors,
    clip_l_to_ldm,
    open_clip_to_ldm,
    unet_to_ldm,
    vae_to_ldm,
)

# Patched in place once the tensor bytes are on disk: same length as a sha256 hex digest, so the header
# keeps its size and the data offsets stay valid.
_HASH_PLACEHOLDER = "0" * 64
HASH_KEYS = ("sshs_model_hash", "sdstudio_tensor_sha256")


def _part(components: Mapping[str, Any] | Any, name: str) -> Any:
    if isinstance(components, Mapping):
        return components.get(name)
    return getattr(components, name, None)


def ldm_state_dict(components: Mapping[str, Any] | Any, *, family: str) -> Tensors:
    """All tensors of a pipeline's UNet, VAE and text encoder(s), named as in the original single file.

    components: a dict or an object (e.g. SDComponents) with ``unet``, ``vae`` and the family's text encoders
    (``text_encoder``, and for SDXL ``text_encoder_2``); the modules themselves (the UNet's config is needed).
    """
    spec = get_family(family) if family in FAMILY_NAMES else None
    if spec is None or not spec.single_file_text_encoders:
        with_layout = [f.name for f in families() if f.single_file_text_encoders]
        raise UserError(f"single-file export: model family {family!r} has no original layout; expected one of "
                        f"{', '.join(with_layout)} (export a from-scratch model as diffusers-folder)")
    needed = ["unet", "vae", *(te.component for te in spec.single_file_text_encoders)]
    missing = [name for name in needed if _part(components, name) is None]
    if missing:
        raise UserError(f"single-file export of a {family} model needs {', '.join(missing)}")
    unet = _part(components, "unet")
    addition = _part(unet.config, "addition_embed_type")
    if addition != spec.unet_addition_embed_type:
        raise UserError(f"single-file export: family {family!r} does not match the UNet "
                        f"(addition_embed_type = {addition!r}; {family} UNets have "
                        f"{spec.unet_addition_embed_type!r})")
    tensors: Tensors = {}
    tensors.update(unet_to_ldm(unet.state_dict(), unet.config))
    tensors.update(vae_to_ldm(_part(components, "vae").state_dict()))
    for te in spec.single_file_text_encoders:
        convert = clip_l_to_ldm if te.converter == "clip_l" else open_clip_to_ldm
        tensors.update(convert(_part(components, te.component).state_dict(), te.prefix))
    return tensors


def _prepare(tensors: Tensors, dtype: torch.dtype) -> Tensors:
    """CPU, contiguous, floating tensors in dtype (integer buffers keep theirs), nothing sharing memory."""
    out: Tensors = {}
    seen: set[int] = set()
    for key, tensor in tensors.items():
        t = tensor.detach()
        t = t.to(device="cpu", dtype=dtype) if t.is_floating_point() else t.to("cpu")
        t = t.contiguous()
        storage = t.untyped_storage().data_ptr()
        if t.numel() and storage in seen:  # safetensors refuses tensors sharing storage (tied weights, views)
            t = t.clone()
            storage = t.untyped_storage().data_ptr()
        seen.add(storage)
        out[key] = t
    return out


def _patch_hash(path: Path, digest: str) -> None:
    with open(path, "r+b") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        header = fh.read(header_len)
        placeholder = f'"{_HASH_PLACEHOLDER}"'.encode()
        if header.count(placeholder) != len(HASH_KEYS):
            raise RuntimeError(f"{path}: hash placeholder not found exactly {len(HASH_KEYS)} times in the header")
        fh.seek(8)
        fh.write(header.replace(placeholder, f'"{digest}"'.encode()))
        fh.flush()
        os.fsync(fh.fileno())


def write_ldm_safetensors(tensors: Tensors, path: Path, *, metadata: Mapping[str, str] | None = None,
                          force: bool = False) -> Path:
    """Write tensors to path atomically: a temp name in the same folder, then ``os.replace``.

    The sha256 of the tensor bytes (what UIs show as the model hash) goes into the header as
    ``sshs_model_hash`` / ``sdstudio_tensor_sha256``, computed from the written file so a multi-GB model is
    never serialised twice in memory.
    """
    path = Path(path)
    if path.exists() and not force:
        raise UserError(f"{path}: exists already; choose another `out` or pass `force` to overwrite it")
    from safetensors.torch import save_file

    meta = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
    meta.update({key: _HASH_PLACEHOLDER for key in HASH_KEYS})

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata=meta)
        _patch_hash(tmp, safetensors_data_sha256(tmp))

    try:
        write_file_atomic(path, write)
    except OSError as exc:
        raise UserError(f"{path}: could not write the export ({exc.strerror or exc}); nothing was written "
                        "under that name (is the disk full?)") from None
    return path


def write_single_file(components: Mapping[str, Any] | Any, path: Path, *, family: str,
                      dtype: torch.dtype = torch.float16, metadata: Mapping[str, str] | None = None,
                      force: bool = False, v_prediction: bool = False, zero_terminal_snr: bool = False) -> Path:
    """Write a full SD1.x / SD2.x / SDXL checkpoint in the original layout as one ``.safetensors``.

    v_prediction / zero_terminal_snr add the empty marker tensors ``v_pred`` / ``ztsnr`` that ComfyUI (and
    sdstudio's own loader) read; the original layout has no other place for them. diffusers ignores them: pass
    the prediction type to ``from_single_file`` through the config folder's scheduler.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"{path}: a single-file export is written as .safetensors; give the path that suffix")
    if path.exists() and not force:  # checked before the (slow, memory-hungry) conversion as well
        raise UserError(f"{path}: exists already; choose another `out` or pass `force` to overwrite it")
    tensors = _prepare(ldm_state_dict(components, family=family), dtype)
    if v_prediction:
        tensors["v_pred"] = torch.empty(0)
    if zero_terminal_snr:
        tensors["ztsnr"] = torch.empty(0)
    return write_ldm_safetensors(tensors, path, metadata=metadata, force=force)
