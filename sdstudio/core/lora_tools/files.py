"""Reading LoRA / LyCORIS files from any trainer (kohya and LyCORIS keys, diffusers / PEFT keys) into per-module
adapters that rebuild their weight delta the way A1111, Forge and ComfyUI apply them.

Formulas per kind (scale = alpha / rank where the file has an alpha, else 1):
- lora: up @ down; dora: LoRA plus ``dora_scale`` (the weight's norm rescaled: per input column when the scale's
  shape is (1, in), per output row when it is (out, 1, ...); per output row of W + delta for peft's
  ``lora_magnitude_vector``); loha: (w1_a @ w1_b) * (w2_a @ w2_b) (Tucker cores t1 / t2 for convolutions);
  lokr: kron(w1, w2), scaled only when one side is a low-rank pair (its rank is the divisor); full: ``diff``;
  oft: LyCORIS' ``oft_blocks``, a Cayley rotation of blocks of output rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError

# LyCORIS tensor names (after the module name) -> the kind of adapter they make
_KIND_OF = {"lora_down.weight": "lora", "hada_w1_a": "loha", "lokr_w1": "lokr", "lokr_w1_a": "lokr",
            "lokr_w2": "lokr", "lokr_w2_a": "lokr", "diff": "full", "oft_blocks": "oft", "oft_diag": "oft"}
# diffusers / PEFT tensor names -> the kohya names used here
_PEFT_TO_KOHYA = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
                  "lora_magnitude_vector": "magnitude", "lora_magnitude_vector.weight": "magnitude"}


@dataclass
class ModuleAdapter:
    """One module's adapter in a file: its tensors (LyCORIS names), alpha (None when the file has none)."""

    kind: str  # lora | dora | loha | lokr | full | oft
    tensors: dict[str, torch.Tensor]
    alpha: float | None = None

    @property
    def rank(self) -> int | None:
        t = self.tensors
        if "lora_down.weight" in t:
            return int(t["lora_down.weight"].shape[0])
        if "hada_w1_b" in t:
            return int(t["hada_w1_b"].shape[0])
        for key in ("lokr_w2_b", "lokr_w1_b"):
            if key in t:
                return int(t[key].shape[0])
        return None

    def scale(self) -> float:
        if self.kind == "lokr":
            rank = self.rank  # only a low-rank pair takes alpha / rank (as A1111 and ComfyUI read it)
            return self.alpha / rank if (self.alpha is not None and rank) else 1.0
        rank = self.rank
        return self.alpha / rank if (self.alpha is not None and rank) else 1.0

    def low_rank_delta(self, shape: torch.Size) -> torch.Tensor:
        """The LoRA part (up @ down * scale), reshaped to the weight's shape."""
        up = self.tensors["lora_up.weight"].float()
        down = self.tensors["lora_down.weight"].float()
        if "lora_mid.weight" in self.tensors:  # Tucker-decomposed convolution (LoCon)
            mid = self.tensors["lora_mid.weight"].float()
            delta = torch.einsum("m n w h, i m, n j -> i j w h", mid, up.flatten(1), down.flatten(1))
        else:
            delta = up.flatten(1) @ down.flatten(1)
        return delta.reshape(shape) * self.scale()

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        """What this adapter adds to ``weight`` (float32, the weight's shape)."""
        w = weight.float()
        t = {k: v.float() for k, v in self.tensors.items()}
        if self.kind == "full":
            return t["diff"].reshape(w.shape)
        if self.kind == "lora":
            return self.low_rank_delta(w.shape)
        if self.kind == "dora":
            return _dora_weight(w, self.low_rank_delta(w.shape), t) - w
        if self.kind == "loha":
            if "hada_t1" in t:
                m1 = torch.einsum("i j k l, j r, i p -> p r k l", t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"])
                m2 = torch.einsum("i j k l, j r, i p -> p r k l", t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"])
            else:
                m1, m2 = t["hada_w1_a"] @ t["hada_w1_b"], t["hada_w2_a"] @ t["hada_w2_b"]
            return (m1 * m2).reshape(w.shape) * self.scale()
        if self.kind == "lokr":
            w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
            if "lokr_w2" in t:
                w2 = t["lokr_w2"]
            elif "lokr_t2" in t:
                w2 = torch.einsum("i j k l, j r, i p -> p r k l", t["lokr_t2"], t["lokr_w2_b"], t["lokr_w2_a"])
            else:
                w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
            if w2.dim() == 4:
                w1 = w1.unsqueeze(2).unsqueeze(2)
            return torch.kron(w1, w2).reshape(w.shape) * self.scale()
        if self.kind == "oft":
            return _oft_weight(w, t.get("oft_blocks", t.get("oft_diag")), self.alpha) - w
        raise UserError(f"a LoRA module of kind {self.kind!r} cannot be applied")


def _dora_weight(w: torch.Tensor, delta: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    merged = w + delta
    if "magnitude" in t:  # peft / diffusers: per output row of W + delta
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1)
        return merged * (t["magnitude"].flatten() / norm).reshape(-1, *[1] * (w.dim() - 1))
    scale = t["dora_scale"]
    if scale.shape[0] == w.shape[0] and w.shape[0] != 1:  # output axis: ComfyUI divides by the base weight's norm
        norm = w.reshape(w.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1)) + torch.finfo(w.dtype).eps
        return merged * (scale.reshape(norm.shape) / norm)
    norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
    norm = norm.reshape(merged.shape[1], *[1] * (w.dim() - 1)).transpose(0, 1)
    return merged * (scale / norm)


def _oft_weight(w: torch.Tensor, blocks: torch.Tensor, constraint: float | None) -> torch.Tensor:
    n, b, _ = blocks.shape
    q = blocks - blocks.transpose(1, 2)
    if constraint and constraint > 0:
        norm = q.norm() + 1e-8
        if norm > constraint:
            q = q * constraint / norm
    eye = torch.eye(b, dtype=q.dtype)
    r = (eye + q) @ torch.linalg.inv(eye - q)
    rotated = torch.einsum("k n m, k n ... -> k m ...", r, w.reshape(n, b, *w.shape[1:]))
    return rotated.reshape(w.shape)


@dataclass
class AdapterFile:
    """A LoRA / LyCORIS file: module name (as the file names it) -> adapter, the header, its layout."""

    path: Path
    modules: dict[str, ModuleAdapter]
    metadata: dict[str, str] = field(default_factory=dict)
    layout: str = "kohya"  # kohya | diffusers

    @property
    def kinds(self) -> set[str]:
        return {m.kind for m in self.modules.values()}

    def ranks(self) -> set[int]:
        return {r for m in self.modules.values() if (r := m.rank) is not None}

    def alphas(self) -> set[float]:
        return {m.alpha for m in self.modules.values() if m.alpha is not None}


def _diffusers_alphas(metadata: dict[str, str]) -> dict[str, float]:
    """component -> lora_alpha from the ``lora_adapter_metadata`` header diffusers writes."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    out: dict[str, float] = {}
    for key, value in data.items():
        if isinstance(value, dict) and "lora_alpha" in value:
            out[key] = float(value["lora_alpha"])
        elif key.endswith(".lora_alpha"):
            out[key.rsplit(".", 1)[0]] = float(value)
    return out


def read_adapter_file(path: Path) -> AdapterFile:
    """Parse a kohya / LyCORIS / diffusers LoRA file; a UserError names the file when it is none of these."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{path}: no such LoRA file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - a safe_open handle
            metadata = dict(fh.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad files
        raise UserError(f"{path}: not a readable .safetensors file ({exc})") from None
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    diffusers = any(".lora_A." in k or k.endswith(".lora_A.weight") for k in tensors)
    for key, tensor in tensors.items():
        if diffusers:
            for peft_name, kohya_name in _PEFT_TO_KOHYA.items():
                if key.endswith("." + peft_name):
                    grouped.setdefault(key[: -len(peft_name) - 1], {})[kohya_name] = tensor
                    break
            continue
        module, _, name = key.partition(".")
        if name:
            grouped.setdefault(module, {})[name] = tensor
    alphas = _diffusers_alphas(metadata) if diffusers else {}
    modules: dict[str, ModuleAdapter] = {}
    for module, parts in grouped.items():
        alpha_t = parts.pop("alpha", None)
        kind = next((_KIND_OF[n] for n in parts if n in _KIND_OF), None)
        if kind is None:
            continue  # bias-only or unknown tensors: nothing a consumer applies either
        if kind == "lora" and ("dora_scale" in parts or "magnitude" in parts):
            kind = "dora"
        alpha = float(alpha_t.float().item()) if alpha_t is not None else None
        if diffusers:
            alpha = alphas.get(module.split(".", 1)[0])
        modules[module] = ModuleAdapter(kind, parts, alpha)
    if not modules:
        raise UserError(f"{path}: no LoRA / LyCORIS tensors found (expected lora_down / lora_A / hada_ / lokr_ "
                        "keys); is it a full model?")
    return AdapterFile(path, modules, metadata, "diffusers" if diffusers else "kohya")


def save_adapter_file(modules: dict[str, ModuleAdapter], path: Path, metadata: dict[str, str], *,
                      dtype: torch.dtype = torch.float16, force: bool = False) -> Path:
    """Write modules in kohya / LyCORIS keys (``<module>.<tensor>`` and ``<module>.alpha``)."""
    from ..atomic import write_bytes_atomic

    path = Path(path).expanduser()
    if path.exists() and not force:
        raise UserError(f"{path}: exists already; choose another --out or pass --force")
    from safetensors.torch import save

    out: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        for key, tensor in module.tensors.items():
            out[f"{name}.{key}"] = tensor.detach().to(dtype).contiguous()
        if module.alpha is not None:
            out[f"{name}.alpha"] = torch.tensor(float(module.alpha))
    write_bytes_atomic(path, save(out, metadata={k: str(v) for k, v in metadata.items()}))
    return path


def describe(file: AdapterFile) -> dict[str, Any]:
    """What a file holds, for messages and metadata."""
    return {"kinds": sorted(file.kinds), "ranks": sorted(file.ranks()), "alphas": sorted(file.alphas()),
            "modules": len(file.modules), "layout": file.layout}
