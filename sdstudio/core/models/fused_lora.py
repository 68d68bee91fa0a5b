"""LoRAs of split layers written as one LoRA of the fused weight they are parts of (the original layouts of
Flux and SD3 fuse q/k/v into one ``qkv`` weight; diffusers splits them): downs concatenated, ups
block-diagonal. Moved here from ``flux/export.py`` so every transformer family shares one copy."""

from __future__ import annotations

import re

import torch

from ..errors import UserError

_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


def peft_pairs(state: dict[str, torch.Tensor], what: str = "LoRA export") -> dict[str, dict[str, torch.Tensor]]:
    """module -> {"A": down, "B": up} from PEFT-named tensors."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            raise UserError(f"{what}: unexpected LoRA tensor {key!r}")
        out.setdefault(m["module"], {})[m["ab"]] = tensor
    return out


def stack_loras(parts: list[dict[str, torch.Tensor] | None], outs: list[int], scale: float
                ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One LoRA of a fused weight from the LoRAs of its parts (None: a part without a LoRA, zero rows):
    down = the parts' downs concatenated, up = block-diagonal, times ``scale`` (the parts' alpha / rank over the
    stacked alpha / rank). Returns (down, up, rank)."""
    downs = [p["A"].float() for p in parts if p is not None]
    rank = sum(d.shape[0] for d in downs)
    up = torch.zeros(sum(outs), rank)
    row = col = 0
    for part, n in zip(parts, outs):
        if part is not None:
            r = part["A"].shape[0]
            up[row:row + n, col:col + r] = part["B"].float()
            col += r
        row += n
    return torch.cat(downs), up * scale, rank
