"""The weights a checkpoint keeps of a fine-tune, for every family that trains adapters or whole modules of a
base model (SD, Flux and the families built on Flux's bundle): ``<prefix>.<key>`` for each trained module
(``unet`` / ``transformer``, ``text_encoder``, ``text_encoder_2``), the peft adapter tensors of an adapter run
(LoRA and the LyCORIS kinds alike), the whole state dict of a full fine-tune. Loading names what does not fit:
a module the checkpoint has but the run does not train (or the other way round), adapter keys of other ranks
or targets, a full state dict of another model."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError


def trained_state(modules: dict[str, nn.Module], *, lora: bool) -> dict[str, torch.Tensor]:
    """``<prefix>.<key>`` -> tensor on the CPU, contiguous (what safetensors writes)."""
    if lora:
        from peft.utils import get_peft_model_state_dict
    out: dict[str, torch.Tensor] = {}
    for prefix, module in modules.items():
        state = get_peft_model_state_dict(module) if lora else module.state_dict()
        out.update({f"{prefix}.{k}": v.detach().to("cpu").contiguous() for k, v in state.items()})
    return out


def load_trained_state(modules: dict[str, nn.Module], weights: dict[str, torch.Tensor], source: Path, *,
                       lora: bool, title: str, hint: str) -> None:
    """``weights`` (as ``trained_state`` wrote them) into ``modules``; ``hint`` names the settings whose change
    explains a module too many or too few (e.g. "was lora.text_encoder changed?")."""
    stray = sorted({k.split(".", 1)[0] for k in weights} - set(modules))
    if stray:
        raise CheckpointError(f"{source}: the checkpoint holds weights for {', '.join(stray)} that this {title} "
                              f"run does not train; {hint}")
    if lora:
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    for prefix, module in modules.items():
        sub = {k[len(prefix) + 1:]: v for k, v in weights.items() if k.startswith(f"{prefix}.")}
        if not sub:
            raise CheckpointError(f"{source}: no {prefix} weights in the checkpoint, but this {title} run trains "
                                  f"the {prefix}; {hint}")
        if lora:
            expected = set(get_peft_model_state_dict(module))
            try:
                result = set_peft_model_state_dict(module, sub)
            except RuntimeError as exc:  # another rank: torch's size mismatch, one line per tensor
                lines = str(exc).splitlines()
                raise CheckpointError(f"{source}: the adapter weights do not fit this model's {prefix} "
                                      f"({(lines[1] if len(lines) > 1 else lines[0]).strip()}); were lora.rank / "
                                      "lora.targets / lora.type changed?") from None
            misfit = list(getattr(result, "unexpected_keys", [])) + sorted(expected - set(sub))
            if misfit:
                raise CheckpointError(f"{source}: the adapter weights do not fit this model's {prefix} "
                                      f"({misfit[:3]}); were lora.rank / lora.targets / lora.type changed?")
            continue
        try:
            module.load_state_dict(sub, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{source}: the weights do not fit this model's {prefix} "
                                  f"({str(exc).splitlines()[0]})") from None
