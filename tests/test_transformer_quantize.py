"""``model.quantize`` for the transformer families (Flux, SD3, Chroma): the frozen linears of the transformer's
blocks are stored in 8 / 4 bits under a trainable fp32 LoRA, the run trains, exports the same LoRA keys and
shapes as without quantization, an fp8 transformer file keeps its bytes, block swap is placed before the device
and the memory estimate counts the quantized storage. Tiny split single files, CPU."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sdstudio.core import events as ev
from sdstudio.core.config import RunConfig
from sdstudio.core.models.quantize import QuantizedLinear, quantize_tensor
from sdstudio.core.models.registry import get_family
from sdstudio.core.models.transformer_parts import block_lists
from sdstudio.core.presets import load_preset
from sdstudio.core.train.loop import train
from sdstudio.core.train.memory import estimate_memory


@dataclass(frozen=True)
class Case:
    preset: str
    save_folder: Callable[[Path], Path]
    save_split: Callable[..., dict[str, Path]]
    transformer: str  # the split's transformer file
    files: dict[str, str]  # config key -> split file
    to_diffusers: Callable[[dict[str, torch.Tensor], Path], dict[str, torch.Tensor]]


def _flux_names(state: dict[str, torch.Tensor], folder: Path) -> dict[str, torch.Tensor]:
    from diffusers import FluxTransformer2DModel

    from sdstudio.core.models.flux.files import bfl_to_diffusers

    return bfl_to_diffusers(state, dict(FluxTransformer2DModel.load_config(str(folder), subfolder="transformer")))


def _sd3_names(state: dict[str, torch.Tensor], folder: Path) -> dict[str, torch.Tensor]:
    from sdstudio.core.models.sd3.files import sd3_to_diffusers

    return sd3_to_diffusers(state)


def _chroma_names(state: dict[str, torch.Tensor], folder: Path) -> dict[str, torch.Tensor]:
    from diffusers import ChromaTransformer2DModel

    from sdstudio.core.models.chroma.files import original_to_diffusers

    return original_to_diffusers(state, dict(ChromaTransformer2DModel.load_config(str(folder), subfolder="transformer")))


def _cases() -> dict[str, Case]:
    from tests.tiny_chroma import save_tiny_chroma, save_tiny_chroma_split, tiny_chroma_components
    from tests.tiny_flux import save_tiny_flux, save_tiny_flux_split, tiny_flux_components
    from tests.tiny_sd3 import save_tiny_sd3, save_tiny_sd3_split, tiny_sd3_components

    return {
        "flux": Case("flux-lora", save_tiny_flux, lambda f, **kw: save_tiny_flux_split(f, tiny_flux_components(), **kw),
                     "flux1", {"model.vae_path": "ae", "model.text_encoder_path": "clip_l",
                               "model.text_encoder_2_path": "t5xxl"}, _flux_names),
        "sd3": Case("sd35-lora", save_tiny_sd3, lambda f, **kw: save_tiny_sd3_split(f, tiny_sd3_components(), **kw),
                    "sd3", {"model.vae_path": "vae", "model.text_encoder_path": "clip_l", "model.clip_g_path": "clip_g",
                            "model.text_encoder_2_path": "t5xxl"}, _sd3_names),
        "chroma": Case("chroma-lora", save_tiny_chroma,
                       lambda f, **kw: save_tiny_chroma_split(f, tiny_chroma_components(), **kw),
                       "chroma", {"model.vae_path": "ae", "model.text_encoder_2_path": "t5xxl"}, _chroma_names),
    }


CASES = _cases()


@pytest.fixture(scope="module", params=list(CASES))
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A family's tiny model: its diffusers folder (the configs) and split files in fp32 and in fp8 e4m3fn."""
    case = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    folder = case.save_folder(root / "folder")
    split = case.save_split(root / "split")
    fp8 = case.save_split(root / "fp8", dtype=torch.float8_e4m3fn)
    return {"name": request.param, "case": case, "folder": folder, "split": split, "fp8": fp8}


def _config(model: dict[str, Any], data: Path, files: str = "split", **overrides: Any) -> RunConfig:
    case: Case = model["case"]
    paths = model[files]
    base = {"model.path": str(paths[case.transformer]), "model.config_folder": str(model["folder"]),
            **{k: str(paths[v]) for k, v in case.files.items()},
            "data.path": str(data), "data.resolution": 32, "data.val_split": 0.0, "data.caption_dropout": 0.0,
            "data.cache_latents": False, "data.cache_text_embeddings": False, "train.batch_size": 2,
            "train.max_steps": 3, "train.log_every": 1, "train.warmup_steps": 0, "train.lr_scheduler": "constant",
            "train.device": "cpu", "train.mixed_precision": "no", "train.optimizer": "adamw",
            "train.gradient_checkpointing": False, "train.learning_rate": 1e-2, "sample.every_steps": 0,
            "sample.every_epochs": 0, "sample.at_end": False, "checkpoint.every_steps": 3,
            "model.t5_max_length": 8, "lora.rank": 4, "lora.alpha": 4.0, "lora.targets": "attention_ff",
            "export.formats": []}
    return load_preset(case.preset).with_overrides({**base, **overrides})


def _build(config: RunConfig) -> Any:
    return get_family(config.model.family).build(config, [""], device=torch.device("cpu"))


def _block_linears(transformer: torch.nn.Module) -> tuple[list[QuantizedLinear], list[torch.nn.Linear]]:
    """(quantized, plain frozen) linear layers inside the transformer's block lists."""
    quantized, plain = [], []
    for _, blocks in block_lists(transformer):
        for m in blocks.modules():
            if isinstance(m, QuantizedLinear):
                quantized.append(m)
            elif type(m) is torch.nn.Linear and not m.weight.requires_grad:
                plain.append(m)
    return quantized, plain


def _nf4_or_skip(kind: str) -> None:
    if kind == "nf4":
        pytest.importorskip("torchao", reason="nf4 needs torchao (sdstudio[quant])")


@pytest.mark.parametrize("kind", ["fp8", "int8", "nf4"])
def test_quantized_base_under_a_trainable_lora(model: dict[str, Any], four_images: Path, kind: str) -> None:
    _nf4_or_skip(kind)
    bundle = _build(_config(model, four_images, **{"model.quantize": kind}))
    transformer = bundle.save_modules["transformer"]
    quantized, plain = _block_linears(transformer)
    assert quantized and not plain  # every frozen linear of the blocks is stored quantized
    assert {q.kind for q in quantized} == {kind}
    wrapped = [n for n, m in transformer.named_modules() if n.endswith(".base_layer")]
    assert wrapped and all(isinstance(transformer.get_submodule(n), QuantizedLinear) for n in wrapped)
    lora = [p for n, p in transformer.named_parameters() if p.requires_grad]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    assert all(".lora_" in n for n, p in transformer.named_parameters() if p.requires_grad)
    # outside the blocks (input / output projections, embedders) the weights keep the weight dtype
    outside = [m for n, m in transformer.named_modules() if type(m) is torch.nn.Linear
               and not any(n.startswith(b + ".") for b, _ in block_lists(transformer))]
    assert outside and all(m.weight.dtype == torch.float32 for m in outside)


def _run(config: RunConfig, run_dir: Path) -> tuple[list[float], dict[str, torch.Tensor]]:
    events = list(train(config, run_dir=run_dir))
    assert isinstance(events[-1], ev.Finished), events[-1]
    losses = [e.loss for e in events if isinstance(e, ev.StepMetrics)]
    weights = load_file(str(run_dir / "checkpoints" / "step-00000003" / "model.safetensors"))
    return losses, weights


def _exports(run_dir: Path, family_name: str, out: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    from sdstudio.core.export.formats import writer_for
    from sdstudio.core.export.source import load_export_source

    source = load_export_source(run_dir)
    family = get_family(family_name)
    shapes = {}
    for fmt in ("kohya", "diffusers"):
        path = writer_for(fmt, family)(source, out / f"{fmt}.safetensors", dtype=torch.float32)
        with safe_open(str(path), "pt") as fh:
            shapes[fmt] = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118
    return shapes


@pytest.fixture(scope="module")
def plain_run(model: dict[str, Any], four_images: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    run = tmp_path_factory.mktemp("plain") / "run"
    config = _config(model, four_images)
    losses, weights = _run(config, run)
    return {"losses": losses, "weights": weights,
            "exports": _exports(run, config.model.family, tmp_path_factory.mktemp("plain-export")),
            "initial": {k: v for k, v in _build(config).trainable_state().items()}}


@pytest.mark.parametrize("kind", ["fp8", "int8", "nf4"])
def test_a_quantized_run_trains_and_exports_the_same_lora(model: dict[str, Any], four_images: Path, kind: str,
                                                          plain_run: dict[str, Any], tmp_path: Path) -> None:
    _nf4_or_skip(kind)
    config = _config(model, four_images, **{"model.quantize": kind})
    assert {k: v for k, v in _build(config).trainable_state().items()}.keys() == plain_run["initial"].keys()
    for k, v in _build(config).trainable_state().items():  # the same seeded LoRA initialisation
        assert torch.equal(v, plain_run["initial"][k]), k
    losses, weights = _run(config, tmp_path / "run")
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    # close to the unquantized run's losses (the same batches and noise; only the base weights are rounded)
    for q, p in zip(losses, plain_run["losses"]):
        assert abs(q - p) <= 0.05 * abs(p) + 1e-3, (losses, plain_run["losses"])
    assert weights.keys() == plain_run["weights"].keys()
    changed = [k for k, v in weights.items() if not torch.equal(v, plain_run["initial"][k])]
    assert changed and all(v.dtype == torch.float32 for v in weights.values())
    assert _exports(tmp_path / "run", config.model.family, tmp_path) == plain_run["exports"]


def test_an_fp8_file_keeps_its_bytes(model: dict[str, Any], four_images: Path, tmp_path: Path) -> None:
    case: Case = model["case"]
    bundle = _build(_config(model, four_images, files="fp8", **{"model.quantize": "fp8"}))
    transformer = bundle.save_modules["transformer"]
    raw = load_file(str(model["fp8"][case.transformer]))
    raw = {k.removeprefix("model.diffusion_model."): v for k, v in raw.items()}
    stored = {k: v for k, v in case.to_diffusers(raw, model["folder"]).items()
              if v.dtype == torch.float8_e4m3fn and v.ndim == 2}
    quantized, plain = _block_linears(transformer)
    assert quantized and not plain
    layers = {n.replace(".base_layer", ""): m for n, m in transformer.named_modules() if isinstance(m, QuantizedLinear)}
    requantized_differs = 0
    for name, layer in layers.items():
        weight = stored[name + ".weight"]
        assert layer.stored.dtype == torch.float8_e4m3fn
        assert torch.equal(layer.stored.view(torch.uint8), weight.view(torch.uint8)), name
        assert torch.equal(layer.scale, torch.ones_like(layer.scale))
        again, scale = quantize_tensor(weight.float(), "fp8")
        requantized_differs += not torch.equal(again.float() * scale, weight.float())
    assert requantized_differs > 0, "the test would not see a second rounding"
    # the linears outside the blocks hold the file's fp8 values widened (exactly), no placeholder left
    for name, m in transformer.named_modules():
        if type(m) is torch.nn.Linear and name + ".weight" in stored:
            assert torch.equal(m.weight, stored[name + ".weight"].float()), name
    assert all(s != 0 for p in transformer.parameters() if p.numel() > 1 for s in p.stride())
    # and the run trains on it
    losses, _ = _run(_config(model, four_images, files="fp8", **{"model.quantize": "fp8"}), tmp_path / "run")
    assert all(math.isfinite(x) for x in losses)


def test_the_memory_estimate_counts_the_quantized_base(model: dict[str, Any], four_images: Path) -> None:
    sizes = {}
    for kind in ("none", "fp8", "int8"):
        config = _config(model, four_images, **{"model.quantize": kind})
        sizes[kind] = estimate_memory(_build(config), config).weights
    assert sizes["int8"] < sizes["none"] and sizes["fp8"] < sizes["none"]
    transformer_linears = sum(m.weight.numel() for _, b in block_lists(
        _build(_config(model, four_images)).save_modules["transformer"]) for m in b.modules()
        if type(m) is torch.nn.Linear and not m.weight.requires_grad)
    # fp32 (4 bytes) -> 1 byte per weight, plus per-row scales
    assert sizes["none"] - sizes["fp8"] > 2.5 * transformer_linears


def test_block_swap_is_placed_before_the_device(model: dict[str, Any], four_images: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """As for the SD family (tests/test_blockswap_placement.py, ``meta`` standing for the device): the swapped
    blocks, here with their int8 storage, never materialise on the device."""
    import importlib

    from sdstudio.core.train.blockswap import BlockSwapper
    from tests.test_blockswap_placement import META, DeviceAllocations

    config = _config(model, four_images, **{"model.quantize": "int8", "train.blocks_to_swap": 2})
    family = get_family(config.model.family)
    package = importlib.import_module(type(family).__module__.rsplit(".", 1)[0] + ".model")
    comps = package.load_components(config)  # loading builds on meta itself: done before counting
    monkeypatch.setattr(package, "load_components", lambda *args, **kwargs: comps)
    with DeviceAllocations() as seen:
        bundle = family.build(config, [""], device=META)
    swapper = bundle.block_swap
    assert isinstance(swapper, BlockSwapper) and len(swapper.blocks) == 2
    homes = [t for b in swapper.blocks for t in b.home]
    assert all(t.device.type == "cpu" for t in homes) and any(t.dtype == torch.int8 for t in homes)
    swapped = sum(t.numel() * t.element_size() for t in homes)
    assert all(p.device == META for p in bundle.trainable.parameters() if p.requires_grad)

    def on_meta(module: torch.nn.Module) -> int:
        return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()]
                   if t.device == META)

    stays = on_meta(bundle.trainable) + sum(on_meta(m) for m in (getattr(bundle.components, n, None)
                                            for n in ("vae", *family.text_encoders)) if m is not None)
    assert swapped > 0 and seen.allocated < stays + swapped / 4


def test_the_full_precision_base_never_reaches_the_device(model: dict[str, Any], four_images: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Quantized in CPU memory, then placed: the device gets the 8-bit storage, never the blocks' fp32 weights."""
    import importlib

    from tests.test_blockswap_placement import META, DeviceAllocations

    config = _config(model, four_images, **{"model.quantize": "int8"})
    family = get_family(config.model.family)
    package = importlib.import_module(type(family).__module__.rsplit(".", 1)[0] + ".model")
    comps = package.load_components(config)
    full = sum(m.weight.numel() * 4 for _, b in block_lists(comps.transformer) for m in b.modules()
               if type(m) is torch.nn.Linear)
    monkeypatch.setattr(package, "load_components", lambda *args, **kwargs: comps)
    with DeviceAllocations() as seen:
        bundle = family.build(config, [""], device=META)
    quantized, _ = _block_linears(bundle.save_modules["transformer"])
    assert quantized and all(q.stored.device == META for q in quantized)
    others = sum(t.numel() * t.element_size() for m in (getattr(bundle.components, n, None)
                 for n in ("vae", *family.text_encoders)) if m is not None for t in [*m.parameters(), *m.buffers()])
    rest = sum(t.numel() * t.element_size() for t in [*bundle.trainable.parameters(), *bundle.trainable.buffers()])
    assert rest < others + full / 2  # sanity: the model on the device is much smaller than its fp32 blocks
    assert seen.allocated < others + rest + full / 8  # nothing near the fp32 blocks was ever allocated there


def test_fit_sees_the_smaller_quantized_base(model: dict[str, Any], four_images: Path) -> None:
    """`sdstudio fit`'s trials (on the CPU: the memory estimate of the trial's model) peak lower with an fp8 base."""
    from sdstudio.core.train.fit import Trial, run_trial

    config = _config(model, four_images, **{"checkpoint.every_steps": 0})
    trials = [Trial("as configured", {}), Trial("+ fp8 base", {"model.quantize": "fp8"})]
    for trial in trials:
        run_trial(config, trial, budget=1e12, device=torch.device("cpu"), steps=1)
    plain, fp8 = (t.peak_bytes for t in trials)
    assert plain is not None and fp8 is not None and fp8 < plain, [t.row() for t in trials]


@pytest.mark.slow
def test_a_quantized_swapped_run_resumes_bit_exactly(model: dict[str, Any], four_images: Path, tmp_path: Path) -> None:
    """An fp8 file kept as stored, with block swap: a run stopped after 2 steps and resumed gives the straight
    run's losses exactly (the quantized base is rebuilt from the file the same way)."""
    config = _config(model, four_images, files="fp8", **{"model.quantize": "fp8", "train.blocks_to_swap": 2,
                                                          "train.max_steps": 4, "checkpoint.every_steps": 2})
    straight = [e.loss for e in train(config, run_dir=tmp_path / "straight") if isinstance(e, ev.StepMetrics)]
    half = [e.loss for e in train(config.with_overrides({"train.max_steps": 2}), run_dir=tmp_path / "resumed")
            if isinstance(e, ev.StepMetrics)]
    events = list(train(config, run_dir=tmp_path / "resumed", resume=True))
    assert isinstance(events[-1], ev.Finished), events[-1]
    assert len(straight) == 4 and half + [e.loss for e in events if isinstance(e, ev.StepMetrics)] == straight
