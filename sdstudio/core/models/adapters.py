"""The peft adapter of a LoRA run, whatever its kind (lora.type): LoRA, LoHa, LoKr, DoRA or OFT.

peft implements all five on any torch module (UNet, transformer, text encoders) with one state-dict convention,
so checkpoints, resume and EMA treat them alike; lycoris-lora would add a second injection mechanism beside the
peft one diffusers and the sampling path already use.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

ADAPTER_TYPES = ("lora", "loha", "lokr", "dora", "oft")
# the parameter names each kind's peft layers hold (what get_peft_model_state_dict returns, adapter name removed)
ADAPTER_PARAMS = ("lora_A", "lora_B", "lora_magnitude_vector", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b",
                  "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
                  "lokr_t2", "oft_R")

# a CLIP text encoder's LoRA layers per lora.targets (every family with a CLIP encoder: SD1/SD2/SDXL, Flux's CLIP-L)
TEXT_LORA_TARGETS = {
    "attention": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "attention_ff": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "all": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}


def text_lora_targets(targets: str, layers: int | None = None) -> list[str] | str:
    """peft ``target_modules`` of a text-encoder LoRA; ``layers``: only the first N encoder layers (a regex)."""
    names = TEXT_LORA_TARGETS[targets]
    if layers is None:
        return list(names)
    index = "|".join(str(i) for i in range(layers))
    return rf".*encoder\.layers\.({index})\.(self_attn|mlp)\.({'|'.join(names)})"


def peft_adapter_config(lora: dict[str, Any], target_modules: list[str] | str,
                        rank_pattern: dict[str, int] | None = None) -> Any:
    """The peft config of a run's adapter (``lora`` = the run's ``lora`` section as a dict). Every kind starts
    as the identity (the base model's output at step 0)."""
    kind = lora.get("type", "lora")
    rank, alpha = int(lora["rank"]), float(lora["alpha"])
    dropout = float(lora.get("dropout", 0.0))
    if kind in ("lora", "dora"):
        from peft import LoraConfig

        return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                          target_modules=target_modules, use_dora=kind == "dora", rank_pattern=rank_pattern or {})
    if kind == "loha":
        from peft import LoHaConfig

        return LoHaConfig(r=rank, alpha=alpha, module_dropout=dropout, target_modules=target_modules,
                          rank_pattern=rank_pattern or {})
    if kind == "lokr":
        from peft import LoKrConfig

        return LoKrConfig(r=rank, alpha=alpha, module_dropout=dropout, target_modules=target_modules,
                          decompose_factor=int(lora.get("factor", -1)),
                          decompose_both=bool(lora.get("decompose_both", False)), rank_pattern=rank_pattern or {})
    if kind == "oft":
        from peft import OFTConfig

        # the exact Cayley transform (not peft's Neumann-series approximation): exports reproduce it exactly
        return OFTConfig(r=0, oft_block_size=int(lora.get("oft_block_size", 32)), module_dropout=dropout,
                         target_modules=target_modules, use_cayley_neumann=False)
    raise ValueError(f"lora.type {kind!r}: unknown; use one of {', '.join(ADAPTER_TYPES)}")


def skip_adapter_input_casts(module: nn.Module, keep: Iterable[nn.Module] = ()) -> int:
    """Under autocast, turn off the cast of each input to the adapter weights' dtype that peft's layers make
    (``cast_input_dtype_enabled``, the switch ``peft.helpers.disable_input_dtype_casting`` flips): with fp32
    adapter weights on a 16-bit base model, every LoRA layer casts its bf16 input up to fp32 and autocast casts
    it straight back down for the matmul, two copies of the activation per layer, forward and backward. Only for
    modules whose every forward runs under autocast (autocast casts input and weight itself); the adapter weights
    stay fp32 (the optimizer's masters, what checkpoints and exports store). ``keep``: modules (e.g. text encoders
    that previews also run outside autocast) whose adapter layers keep peft's cast. Returns the layers changed
    (a peft without the switch ignores it and keeps casting)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    kept = {id(m) for part in keep for m in part.modules()}
    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer) and id(m) not in kept]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    return len(layers)
