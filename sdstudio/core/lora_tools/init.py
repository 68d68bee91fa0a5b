"""``lora.init_from``: start a run's peft adapter from a LoRA / LyCORIS file of any trainer. The file decides
the adapter's kind, rank (per module where it varies), alpha and layers; its tensors are copied into the
fresh peft layers so the model at step 0 is the base model with the file applied."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from .files import AdapterFile, ModuleAdapter, read_adapter_file
from .names import file_names


@dataclass
class InitPlan:
    file: AdapterFile
    kind: str  # lora | dora | loha | lokr
    rank: int
    alpha: float
    # component -> module path -> the file's module name
    modules: dict[str, dict[str, str]] = field(default_factory=dict)
    rank_pattern: dict[str, dict[str, int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    factor: int = -1

    def targets(self, component: str) -> list[str]:
        return sorted(self.modules.get(component, {}))

    def lora_section(self, lora: dict[str, Any]) -> dict[str, Any]:
        """The run's lora section with what the file says (what model.json and the exports record)."""
        return {**lora, "type": self.kind, "rank": self.rank, "alpha": self.alpha, "factor": self.factor}


def plan_init(path: str, lora: dict[str, Any], parts: dict[str, nn.Module], *, family: str,
              layers_per_block: int) -> InitPlan:
    file = read_adapter_file(path)
    kinds = file.kinds
    if len(kinds) != 1 or next(iter(kinds)) not in ("lora", "dora", "loha", "lokr"):
        raise UserError(f"lora.init_from {path}: holds {', '.join(sorted(kinds))} modules; a run can start from "
                        "a file of one kind: LoRA, DoRA, LoHa or LoKr")
    kind = next(iter(kinds))
    alphas = file.alphas()
    if len(alphas) > 1:
        raise UserError(f"lora.init_from {path}: its modules have different alphas ({sorted(alphas)[:4]}); a run "
                        "starts from a file with one alpha")
    plan_modules: dict[str, dict[str, str]] = {}
    used: set[str] = set()
    ranks: dict[str, dict[str, int]] = {}
    for component, root in parts.items():
        for mpath, module in root.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            name = next((n for n in file_names(family, component, mpath, layers_per_block) if n in file.modules),
                        None)
            if name is None:
                continue
            plan_modules.setdefault(component, {})[mpath] = name
            ranks.setdefault(component, {})[mpath] = file.modules[name].rank or 0
            used.add(name)
    unmatched = sorted(set(file.modules) - used)
    if unmatched:
        raise UserError(f"lora.init_from {path}: {len(unmatched)} of its {len(file.modules)} modules fit no layer "
                        f"of this {family} model (e.g. {unmatched[0]}); is it a LoRA for another model?")
    all_ranks = [r for per in ranks.values() for r in per.values() if r]
    rank = max(set(all_ranks), key=all_ranks.count) if all_ranks else int(lora["rank"])
    alpha = next(iter(alphas)) if alphas else float(rank)  # no alpha in the file: scale 1
    plan = InitPlan(file, kind, rank, alpha, plan_modules,
                    {c: {m: r for m, r in per.items() if r and r != rank} for c, per in ranks.items()})
    if kind == "lokr":
        w1 = next(m.tensors.get("lokr_w1", m.tensors.get("lokr_w1_a")) for m in file.modules.values())
        plan.factor = int(w1.shape[0])
    for key, value in (("type", kind), ("rank", rank), ("alpha", alpha)):
        if lora.get(key) != value:
            plan.notes.append(f"lora.{key} = {lora.get(key)!r} replaced by the file's {value!r}")
    if ("text_encoder" in plan_modules or "text_encoder_2" in plan_modules) and not lora.get("text_encoder"):
        raise UserError(f"lora.init_from {path}: the file has text-encoder modules; set lora.text_encoder = "
                            "true to continue training them (or use a UNet-only file)")
    return plan


def _copy(param: torch.Tensor, value: torch.Tensor, where: str) -> None:
    if param.numel() != value.numel():
        raise UserError(f"lora.init_from: {where} has {tuple(value.shape)} in the file but the adapter expects "
                        f"{tuple(param.shape)}; for LoKr set lora.factor / lora.decompose_both as the file was made")
    with torch.no_grad():
        param.copy_(value.reshape(param.shape).to(param.dtype))


def load_plan(plan: InitPlan, parts: dict[str, nn.Module]) -> int:
    """Copy the file's tensors into the peft layers of ``parts`` (adapter "default"); returns modules loaded."""
    count = 0
    for component, modules in plan.modules.items():
        root = parts[component]
        for mpath, name in modules.items():
            layer = root.get_submodule(mpath)
            _load_layer(layer, plan.file.modules[name], plan.kind, f"{name}")
            count += 1
    return count


def _load_layer(layer: Any, adapter: ModuleAdapter, kind: str, where: str) -> None:
    a, t = "default", adapter.tensors
    if kind in ("lora", "dora"):
        _copy(layer.lora_A[a].weight, t["lora_down.weight"], f"{where}.lora_down")
        _copy(layer.lora_B[a].weight, t["lora_up.weight"], f"{where}.lora_up")
        if kind == "dora":
            base = layer.get_base_layer().weight.detach().float()
            magnitude = _peft_magnitude(adapter, base, where)
            _copy(layer.lora_magnitude_vector[a].weight, magnitude, f"{where}.dora_scale")
        return
    for n, value in t.items():
        holder = getattr(layer, n, None)
        if holder is None or a not in holder:
            raise UserError(f"lora.init_from: {where}.{n} has no place in this run's {kind} adapter (its "
                            "factorisation differs); set lora.factor / lora.decompose_both as the file was made")
        _copy(holder[a], value, f"{where}.{n}")


def _peft_magnitude(adapter: ModuleAdapter, base: torch.Tensor, where: str) -> torch.Tensor:
    """peft's per-row magnitude that gives the same weight as the file's DoRA module."""
    t = adapter.tensors
    if "magnitude" in t:
        return t["magnitude"].float().flatten()
    scale = t["dora_scale"].float()
    if not (scale.shape[0] == base.shape[0] and base.shape[0] != 1):
        raise UserError(f"lora.init_from: {where} is an input-axis DoRA module (dora_scale of shape "
                        f"{tuple(scale.shape)}); peft's DoRA scales output rows, so it cannot start from it")
    merged = base + adapter.low_rank_delta(base.shape)
    base_norm = base.reshape(base.shape[0], -1).norm(dim=1) + torch.finfo(torch.float32).eps
    return scale.flatten() * merged.reshape(merged.shape[0], -1).norm(dim=1) / base_norm
