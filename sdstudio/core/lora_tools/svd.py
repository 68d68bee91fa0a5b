"""Low-rank approximation of weight deltas by SVD, with the rank chosen as kohya's resize_lora does: a fixed
rank, every singular value above max / X (``sv_ratio``), or the fewest keeping a fraction F of the Frobenius
norm (``sv_fro``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError


@dataclass
class LowRank:
    up: torch.Tensor  # (out, r) or (out, r, 1, 1)
    down: torch.Tensor  # (r, in) or (r, in, k, k)
    rank: int
    kept: float  # ||approximation|| / ||delta|| (Frobenius), 1.0 when exact
    error: float  # ||delta - approximation|| / ||delta||


def choose_rank(s: torch.Tensor, *, rank: int | None = None, sv_ratio: float | None = None,
                sv_fro: float | None = None) -> int:
    """How many singular values (``s``, descending) to keep; at least 1."""
    full = int(s.numel())
    if rank is not None:
        if rank < 1:
            raise UserError(f"--rank {rank}: must be at least 1")
        return min(rank, full)
    if sv_ratio is not None:
        if sv_ratio <= 1.0:
            raise UserError(f"--sv-ratio {sv_ratio}: must be above 1 (keep singular values above max / ratio)")
        return max(1, int((s >= s[0] / sv_ratio).sum()))
    if sv_fro is not None:
        if not 0.0 < sv_fro <= 1.0:
            raise UserError(f"--sv-fro {sv_fro}: must be in (0, 1] (the fraction of the Frobenius norm kept)")
        energy = torch.cumsum(s.double() ** 2, 0) / (s.double() ** 2).sum().clamp_min(1e-30)
        return max(1, min(full, int((energy.sqrt() < sv_fro).sum()) + 1))
    raise UserError("give one of --rank, --sv-ratio, --sv-fro")


def low_rank(delta: torch.Tensor, **how: float | None) -> LowRank:
    """Split ``delta`` (out, in) or (out, in, k, k) into up @ down of the chosen rank."""
    flat = delta.float().reshape(delta.shape[0], -1)
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    r = choose_rank(s, **how)  # type: ignore[arg-type]
    up, down = u[:, :r] * s[:r], vh[:r]
    total = float(s.norm()) or 1.0
    kept = float(s[:r].norm()) / total
    error = float(s[r:].norm()) / total if r < s.numel() else 0.0
    if delta.dim() == 4:
        up = up.reshape(delta.shape[0], r, 1, 1)
        down = down.reshape(r, *delta.shape[1:])
    return LowRank(up.contiguous(), down.contiguous(), r, kept, error)
