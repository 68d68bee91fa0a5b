"""Inception weights for tests: the real FID network's key layout with random (He) weights, so the real
loading and feature code runs without the published file (never downloaded in tests)."""

from __future__ import annotations

import math

import torch

from sdstudio.core.metrics import FidInceptionV3
from sdstudio.core.metrics.inception import ConvUnit


def random_fid_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """He-initialised weights with random batch-norm statistics (features neither vanish nor explode)."""
    gen = torch.Generator().manual_seed(seed)
    model = FidInceptionV3()
    for unit in model.modules():
        if isinstance(unit, ConvUnit):
            w = unit.conv.weight
            w.data = torch.randn(w.shape, generator=gen) * math.sqrt(2.0 / w[0].numel())
            n = unit.bn.num_features
            unit.bn.weight.data = 1 + 0.1 * torch.randn(n, generator=gen)
            unit.bn.bias.data = 0.1 * torch.randn(n, generator=gen)
            unit.bn.running_mean.data = 0.1 * torch.randn(n, generator=gen)
            unit.bn.running_var.data = 0.5 + torch.rand(n, generator=gen)
    # Like the published file (saved by an old torch): no num_batches_tracked entries.
    return {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
