"""The LoRA tools: merge several LoRA / LyCORIS files (into one LoRA, or into a base model), resize a LoRA's
rank by SVD, extract a LoRA from the difference of two models. Every output's header says what it was made
from (``sdstudio_tool``, ``sdstudio_sources`` with sha256 and weights)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ... import __version__
from ..checksums import sha256_file
from ..errors import UserError
from ..models.registry import family_of_lora, recognise_model
from .files import AdapterFile, ModuleAdapter, read_adapter_file, save_adapter_file
from .names import file_names
from .svd import low_rank


@dataclass
class ToolReport:
    """What a tool did, for the CLI's and the app's summary."""

    out: Path
    modules: int
    rank: int | None = None
    kept: float = 1.0  # ||kept|| / ||delta||, Frobenius, over every module
    error: float = 0.0  # ||delta - kept|| / ||delta||
    worst: float = 0.0  # the largest relative error of one module
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{self.out}: {self.modules} modules"
        if self.rank is not None:
            text += f", rank {self.rank}"
        if self.error > 0 or self.kept < 1.0:
            text += (f"; kept {100 * self.kept:.2f}% of the delta's Frobenius norm (relative error "
                     f"{100 * self.error:.3f}%, worst module {100 * self.worst:.3f}%)")
        return text


def _weighted_modules(component: str, module: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in module.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and getattr(m, "weight", None) is not None}


def model_parts(components: Any, family: str) -> dict[str, nn.Module]:
    """component name -> module (unet / text_encoder / text_encoder_2) of loaded SD components."""
    parts = {"unet": components.unet}
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(components, name, None) is not None:
            parts[name] = getattr(components, name)
    return parts


def apply_adapter_file(file: AdapterFile, parts: dict[str, nn.Module], *, family: str, layers_per_block: int = 2,
                       weight: float = 1.0, strict: bool = True) -> int:
    """Add ``weight`` x each module's delta to the matching weights of ``parts``; returns the modules applied.
    With ``strict`` a file module that matches no weight is a UserError (a LoRA for another model)."""
    used: set[str] = set()
    with torch.no_grad():
        for component, root in parts.items():
            for path, module in _weighted_modules(component, root).items():
                name = next((n for n in file_names(family, component, path, layers_per_block) if n in file.modules),
                            None)
                if name is None:
                    continue
                delta = file.modules[name].delta(module.weight)
                module.weight.add_((weight * delta).to(module.weight.dtype))
                used.add(name)
    unmatched = sorted(set(file.modules) - used)
    if unmatched and strict:
        raise UserError(f"{file.path}: {len(unmatched)} of its {len(file.modules)} modules fit no layer of this "
                        f"{family} model (e.g. {unmatched[0]}); is it a LoRA for another model?")
    return len(used)


def _sources(inputs: list[tuple[Path, float]]) -> str:
    return json.dumps([{"path": str(p), "name": p.name, "sha256": sha256_file(p) if p.is_file() else "",
                        "weight": w} for p, w in inputs])


def _tool_metadata(tool: str, sources: str, extra: dict[str, Any] | None = None,
                   base: dict[str, str] | None = None) -> dict[str, str]:
    meta: dict[str, Any] = {}
    for key in ("ss_base_model_version", "modelspec.architecture", "modelspec.sai_model_spec",
                "modelspec.prediction_type", "modelspec.resolution"):
        if base and key in base:
            meta[key] = base[key]
    meta.update({"sdstudio_tool": tool, "sdstudio_sources": sources, "sdstudio_version": __version__,
                 "modelspec.date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **(extra or {})})
    return {k: str(v) for k, v in meta.items()}


def _standalone_delta(adapter: ModuleAdapter) -> torch.Tensor:
    """A module's delta without the base weight (LoRA, LoHa, LoKr, full); DoRA and OFT need the base model."""
    t = adapter.tensors
    if adapter.kind == "lora":
        up, down = t["lora_up.weight"], t["lora_down.weight"]
        shape = torch.Size([up.shape[0], *down.shape[1:]]) if "lora_mid.weight" not in t else None
        if shape is None:
            raise UserError("Tucker (lora_mid) convolutions need --into BASE to be merged")
        return adapter.low_rank_delta(shape)
    if adapter.kind == "loha":
        if "hada_t1" in t:
            raise UserError("LoHa Tucker convolutions need --into BASE to be merged")
        return adapter.delta(torch.empty(t["hada_w1_a"].shape[0], t["hada_w1_b"].shape[1]))
    if adapter.kind == "lokr":
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t.get("lokr_w2")
        if w2 is None and "lokr_t2" not in t:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        if w2 is None:
            raise UserError("LoKr Tucker convolutions need --into BASE to be merged")
        shape = torch.Size([w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1], *w2.shape[2:]])
        return adapter.delta(torch.empty(shape))
    if adapter.kind == "full":
        return t["diff"].float()
    raise UserError(f"a {adapter.kind} module depends on the base model's weights; merge it with --into BASE")


def _to_lora(delta: torch.Tensor, **how: Any) -> tuple[ModuleAdapter, Any]:
    lr = low_rank(delta, **how)
    return ModuleAdapter("lora", {"lora_down.weight": lr.down, "lora_up.weight": lr.up}, float(lr.rank)), lr


def _fill_report(report: ToolReport, results: list[tuple[torch.Tensor, Any]]) -> ToolReport:
    total = sum(float(d.float().norm()) ** 2 for d, _ in results) or 1.0
    lost = sum((lr.error * float(d.float().norm())) ** 2 for d, lr in results)
    report.error = (lost / total) ** 0.5
    report.kept = (max(0.0, 1.0 - report.error ** 2)) ** 0.5
    report.worst = max((lr.error for _, lr in results), default=0.0)
    ranks = {lr.rank for _, lr in results}
    report.rank = max(ranks) if ranks else None
    return report


def merge_loras(inputs: list[tuple[Path, float]], out: Path, *, rank: int | None = None, into: Path | None = None,
                dtype: torch.dtype = torch.float16, force: bool = False) -> ToolReport:
    """Several LoRA / LyCORIS files with weights -> one LoRA (ranks concatenated exactly, or SVD to ``rank``), or
    merged into the base model ``into`` (written in its own form: one file or a diffusers folder)."""
    if not inputs:
        raise UserError("lora merge: give at least one LoRA file")
    files = [(read_adapter_file(p), w) for p, w in inputs]
    sources = _sources(inputs)
    if into is not None:
        return _merge_into_base(files, into, out, sources, dtype=dtype, force=force)
    merged: dict[str, ModuleAdapter] = {}
    report = ToolReport(Path(out), 0)
    plain = all(f.kinds == {"lora"} and not any("lora_mid.weight" in m.tensors for m in f.modules.values())
                for f, _ in files)
    if rank is None and plain:  # exact: concatenate the (weighted, scaled) pairs, alpha = the total rank
        names = sorted({n for f, _ in files for n in f.modules})
        for name in names:
            ups, downs = [], []
            for f, w in files:
                m = f.modules.get(name)
                if m is not None:
                    ups.append(m.tensors["lora_up.weight"].float() * (w * m.scale()))
                    downs.append(m.tensors["lora_down.weight"].float())
            if len({d.shape[1:] for d in downs}) > 1:
                raise UserError(f"lora merge: the files disagree on the shape of {name}; merge with --rank R")
            r = sum(d.shape[0] for d in downs)
            merged[name] = ModuleAdapter("lora", {"lora_down.weight": torch.cat(downs, 0),
                                                  "lora_up.weight": torch.cat(ups, 1)}, float(r))
        report.rank = max((int(m.rank or 0) for m in merged.values()), default=0)
        report.notes.append("ranks concatenated: the merge is exact")
    else:
        if rank is None:
            raise UserError("lora merge: these files are not all plain LoRAs (LyCORIS kinds or Tucker "
                            "convolutions), so they cannot be concatenated; give --rank R (SVD) or --into BASE")
        deltas: dict[str, torch.Tensor] = {}
        for f, w in files:
            for name, m in f.modules.items():
                d = _standalone_delta(m) * w
                if name in deltas and deltas[name].shape != d.shape:
                    raise UserError(f"lora merge: the files disagree on the shape of {name}")
                deltas[name] = deltas[name] + d if name in deltas else d
        results = []
        for name, d in sorted(deltas.items()):
            merged[name], lr = _to_lora(d, rank=rank)
            results.append((d, lr))
        _fill_report(report, results)
    report.modules = len(merged)
    base_meta = files[0][0].metadata
    ranks = sorted({int(m.rank or 0) for m in merged.values()})
    meta = _tool_metadata("lora merge", sources, {"ss_network_module": "networks.lora",
                                                  "ss_network_dim": ranks[-1] if ranks else 0,
                                                  "ss_network_alpha": ranks[-1] if ranks else 0,
                                                  "sdstudio_merge": "svd" if rank else "concatenate"}, base_meta)
    save_adapter_file(merged, Path(out), meta, dtype=dtype, force=force)
    return report


def load_model(path: Path) -> tuple[str, Any]:
    """A base model file or folder -> (family name, its components on the CPU in fp32)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{path}: no such model file or folder")
    family = recognise_model(path)
    if family is None or not family.supports_lora:
        raise UserError(f"{path}: not a model sdstudio recognises as a Stable Diffusion base model")
    loaded = family.load_for_sampling(path, torch.device("cpu"))
    return family.name, loaded.bundle.components  # type: ignore[attr-defined]


def _merge_into_base(files: list[tuple[AdapterFile, float]], base: Path, out: Path, sources: str, *,
                     dtype: torch.dtype, force: bool) -> ToolReport:
    from ..export.full_model import check_folder_target
    from ..models.registry import get_family

    family, comps = load_model(base)
    for f, _ in files:
        claimed = family_of_lora(f.metadata)
        if claimed is not None and claimed.name != family:
            raise UserError(f"{f.path}: a LoRA for {claimed.name} models, but --into {base} is {family}")
    parts = model_parts(comps, family)
    layers = int(comps.unet.config.layers_per_block)
    applied = sum(apply_adapter_file(f, parts, family=family, layers_per_block=layers, weight=w) for f, w in files)
    meta = _tool_metadata("lora merge --into", sources, {"sdstudio_base": str(base)})
    out = Path(out).expanduser()
    if Path(base).is_dir():
        from diffusers import DDPMScheduler

        from ..atomic import write_folder_atomic

        check_folder_target(out, force)
        for module in (comps.unet, comps.vae, comps.text_encoder, comps.text_encoder_2):
            if module is not None:
                module.to(dtype)
        pipe = get_family(family).pipeline(comps, DDPMScheduler.from_config(comps.scheduler_config))  # type: ignore[attr-defined]

        def fill(tmp: Path) -> None:
            pipe.save_pretrained(str(tmp), safe_serialization=True)
            (tmp / "sdstudio_merge.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")

        write_folder_atomic(out, fill)
    else:
        from ..export.single_file import write_single_file

        write_single_file(comps, out, family=family, dtype=dtype, metadata=meta, force=force,
                          v_prediction=comps.prediction_type == "v_prediction")
    return ToolReport(out, applied, notes=[f"merged into {base}"])


def resize_lora(path: Path, out: Path, *, rank: int | None = None, sv_ratio: float | None = None,
                sv_fro: float | None = None, dtype: torch.dtype = torch.float16, force: bool = False) -> ToolReport:
    """SVD rank reduction of every module (a LoRA, or a LyCORIS file whose modules stand alone: LoHa / LoKr
    become LoRA); the output's alpha equals its rank (scale 1, the strength folded into the weights)."""
    if [rank, sv_ratio, sv_fro].count(None) != 2:
        raise UserError("lora resize: give exactly one of --rank, --sv-ratio, --sv-fro")
    file = read_adapter_file(path)
    modules: dict[str, ModuleAdapter] = {}
    results = []
    for name, m in sorted(file.modules.items()):
        d = _standalone_delta(m)
        modules[name], lr = _to_lora(d, rank=rank, sv_ratio=sv_ratio, sv_fro=sv_fro)
        results.append((d, lr))
    report = _fill_report(ToolReport(Path(out), len(modules)), results)
    ranks = sorted({lr.rank for _, lr in results})
    meta = _tool_metadata("lora resize", _sources([(Path(path), 1.0)]), {
        "ss_network_module": "networks.lora", "ss_network_dim": ranks[-1], "ss_network_alpha": ranks[-1],
        "sdstudio_resize": json.dumps({"rank": rank, "sv_ratio": sv_ratio, "sv_fro": sv_fro,
                                       "relative_error": report.error, "kept": report.kept})}, file.metadata)
    save_adapter_file(modules, Path(out), meta, dtype=dtype, force=force)
    return report


def _extractable(path: str, module: nn.Module, component: str) -> bool:
    if component != "unet":
        return isinstance(module, nn.Linear)
    return ".attentions." in f".{path}" and (isinstance(module, nn.Linear) or
                                             (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)))


def extract_lora(base: Path, tuned: Path, out: Path, *, rank: int, min_diff: float = 1e-6,
                 text_encoder: bool = True, dtype: torch.dtype = torch.float16, force: bool = False) -> ToolReport:
    """A LoRA of rank ``rank`` from tuned - base over the UNet's attention / feed-forward layers (and the text
    encoders' linear layers), kohya keys; modules whose largest change is below ``min_diff`` are left out."""
    fam_a, a = load_model(base)
    fam_b, b = load_model(tuned)
    if fam_a != fam_b:
        raise UserError(f"lora extract: --base is {fam_a} but --tuned is {fam_b}; both must be the same family")
    layers = int(a.unet.config.layers_per_block)
    parts_a, parts_b = model_parts(a, fam_a), model_parts(b, fam_b)
    if not text_encoder:
        parts_a, parts_b = {"unet": parts_a["unet"]}, {"unet": parts_b["unet"]}
    modules: dict[str, ModuleAdapter] = {}
    results = []
    for component, root in parts_a.items():
        other = dict(parts_b[component].named_modules())
        for path, module in _weighted_modules(component, root).items():
            if not _extractable(path, module, component) or path not in other:
                continue
            d = other[path].weight.detach().float() - module.weight.detach().float()
            if float(d.abs().max()) < min_diff:
                continue
            name = file_names(fam_a, component, path, layers)[0]
            if name.startswith(("unet.", "text_encoder")):
                continue  # no kohya name (an SDXL layer outside the LDM mapping)
            modules[name], lr = _to_lora(d, rank=rank)
            results.append((d, lr))
    if not modules:
        raise UserError(f"lora extract: {tuned} does not differ from {base} in any attention / text-encoder layer "
                        f"(above {min_diff}); nothing to extract")
    report = _fill_report(ToolReport(Path(out), len(modules)), results)
    from ..models.registry import get_family

    fam = get_family(fam_a)
    meta = _tool_metadata("lora extract", _sources([(Path(base), 0.0), (Path(tuned), 1.0)]), {
        "ss_network_module": "networks.lora", "ss_network_dim": rank, "ss_network_alpha": rank,
        "ss_base_model_version": fam.base_model_version(a.prediction_type),
        "modelspec.architecture": (fam.modelspec_architecture or fam.name) + "/lora",
        "sdstudio_extract": json.dumps({"base": str(base), "tuned": str(tuned), "rank": rank,
                                        "relative_error": report.error})})
    save_adapter_file(modules, Path(out), meta, dtype=dtype, force=force)
    return report
