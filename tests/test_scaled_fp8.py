"""ComfyUI's "scaled fp8" transformer files (``flux1-dev-fp8-scaled``, ``sd3.5_large_fp8_scaled``, Chroma's
``*_fp8_scaled``): beside each float8 e4m3fn matrix ``X.weight`` a float32 ``X.scale_weight`` (the real weight is
weight * scale), an ``X.scale_input`` and a ``scaled_fp8`` marker. They are recognised as their family, load
dequantized once into the weight dtype, keep their bytes and scale under ``model.quantize = 'fp8'``, and a LoRA
trains on them with the same export keys as on an unscaled file. Tiny split single files, CPU."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdstudio.core.models.family import ModelFileError
from sdstudio.core.models.quantize import QuantizedLinear
from sdstudio.core.models.registry import recognise_model
from sdstudio.core.models.split_files import convert_with_scales, take_fp8_scales
from tests.test_transformer_quantize import CASES, Case, _block_linears, _build, _config, _exports, _run

FP8 = torch.float8_e4m3fn
PREFIX = "model.diffusion_model."


def write_scaled_fp8(src: Path, dst: Path) -> Path:
    """``src`` (a transformer file in original key names, fp32) as ComfyUI writes a scaled fp8 file: every linear
    matrix in e4m3fn with a per-tensor fp32 ``scale_weight`` (0-d or shape (1,), both seen in the wild; scales
    deliberately far apart from layer to layer, so a scale given to the wrong layer shows), ``scale_input`` = 1,
    and the ``scaled_fp8`` marker (under the model prefix when the file has one)."""
    raw = load_file(str(src))
    prefix = PREFIX if any(k.startswith(PREFIX) for k in raw) else ""
    out: dict[str, torch.Tensor] = {}
    for i, (key, value) in enumerate(sorted(raw.items())):
        if key.endswith(".weight") and value.ndim == 2:
            layer = key.removesuffix(".weight")
            scale = value.abs().amax().float().clamp_min(1e-12) / 448.0 * 2.0 ** (i % 5)
            out[key] = (value.float() / scale).to(FP8)
            out[layer + ".scale_weight"] = scale.reshape(()) if i % 2 else scale.reshape(1)
            out[layer + ".scale_input"] = torch.ones(())
        else:
            out[key] = value.contiguous()
    out[prefix + "scaled_fp8"] = torch.empty(0, dtype=FP8)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dst))
    return dst


def _without_scales(raw: dict[str, torch.Tensor], dequantize: bool) -> dict[str, torch.Tensor]:
    """A scaled file's tensors without its scale / marker keys: the fp8 matrices as stored, or times their scale
    in fp32 (the reference, converted by the family's own layout conversion, independent of the scale plumbing)."""
    out = {}
    for key, value in raw.items():
        if key.endswith((".scale_weight", ".scale_input", "scaled_fp8")):
            continue
        scale = raw.get(key.removesuffix(".weight") + ".scale_weight")
        out[key] = value.float() * scale.float() if dequantize and scale is not None else value
    return {k.removeprefix(PREFIX): v for k, v in out.items()}


def _load_transformer_file(name: str) -> Any:
    if name == "flux":
        from sdstudio.core.models.flux.files import load_transformer_file
    elif name == "sd3":
        from sdstudio.core.models.sd3.files import load_transformer_file
    else:
        from sdstudio.core.models.chroma.files import load_transformer_file
    return load_transformer_file


def _transformer_config(name: str, folder: Path) -> dict[str, Any]:
    from diffusers import ChromaTransformer2DModel, FluxTransformer2DModel, SD3Transformer2DModel

    cls = {"flux": FluxTransformer2DModel, "sd3": SD3Transformer2DModel, "chroma": ChromaTransformer2DModel}[name]
    return dict(cls.load_config(str(folder), subfolder="transformer"))


@pytest.fixture(scope="module", params=list(CASES))
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A family's tiny model: its diffusers folder (configs), its split files in fp32 and the same files with
    the transformer as a scaled fp8 file."""
    case: Case = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    folder = case.save_folder(root / "folder")
    split = case.save_split(root / "split")
    scaled = dict(split)
    scaled[case.transformer] = write_scaled_fp8(split[case.transformer],
                                                root / "scaled" / f"{case.transformer}_fp8_scaled.safetensors")
    return {"name": request.param, "case": case, "folder": folder, "split": split, "scaled": scaled}


def test_a_scaled_file_is_recognised_as_its_family(model: dict[str, Any]) -> None:
    case: Case = model["case"]
    plain = recognise_model(model["split"][case.transformer])
    scaled = recognise_model(model["scaled"][case.transformer])
    assert plain is not None and scaled is not None and scaled.name == plain.name


def test_a_scaled_file_loads_as_weight_times_scale(model: dict[str, Any]) -> None:
    """Without quantization every scaled matrix is fp8 * scale (exactly, in fp32; within fp8 rounding of the
    original weights); the scale / marker keys are consumed, none left over."""
    name, case, folder = model["name"], model["case"], model["folder"]
    path = model["scaled"][case.transformer]
    raw = load_file(str(path))
    kept, scales = take_fp8_scales(raw, path)
    assert scales and not any(k.endswith((".scale_weight", ".scale_input", "scaled_fp8")) for k in kept)
    config = _transformer_config(name, folder)
    loaded = _load_transformer_file(name)(path, config, dtype=torch.float32).state_dict()
    reference = case.to_diffusers(_without_scales(raw, dequantize=True), folder)
    original = case.to_diffusers({k.removeprefix(PREFIX): v for k, v in
                                  load_file(str(model["split"][case.transformer])).items()}, folder)
    assert loaded.keys() == reference.keys()
    stored = case.to_diffusers(_without_scales(raw, dequantize=False), folder)
    scaled_keys = [k for k, v in stored.items() if v.dtype == FP8]
    assert len(scaled_keys) > 10
    for key in scaled_keys:
        assert torch.equal(loaded[key], reference[key]), key
        # fp8 e4m3fn: 3 mantissa bits (half an ulp = 2**-4 relative), subnormal steps of 2**-9 times the scale
        # (at most absmax / 448 * 16 here)
        w = original[key]
        assert torch.all((loaded[key] - w).abs() <= 2.0 ** -4 * w.abs() + w.abs().max() / 448 * 16 * 2.0 ** -9), key
    for key in loaded.keys() - set(scaled_keys):
        assert torch.equal(loaded[key], reference[key].float()), key
    # and in bf16 (a GPU run's weight dtype): the same product, rounded once
    bf16 = _load_transformer_file(name)(path, config, dtype=torch.bfloat16).state_dict()
    for key in scaled_keys:
        assert torch.equal(bf16[key], reference[key].to(torch.bfloat16)), key


def test_quantize_fp8_keeps_the_bytes_and_the_scale(model: dict[str, Any], four_images: Path) -> None:
    """``model.quantize = 'fp8'``: each block linear stores the file's fp8 tensor bit for bit with the file's scale
    (per-tensor, shared by the rows of a fused q/k/v), and computes with fp8 * scale."""
    case: Case = model["case"]
    raw = load_file(str(model["scaled"][case.transformer]))
    stored = case.to_diffusers(_without_scales(raw, dequantize=False), model["folder"])
    reference = case.to_diffusers(_without_scales(raw, dequantize=True), model["folder"])
    transformer = _build(_config(model, four_images, files="scaled", **{"model.quantize": "fp8"})
                         ).save_modules["transformer"]
    quantized, plain = _block_linears(transformer)
    assert quantized and not plain
    layers = {n.replace(".base_layer", ""): m for n, m in transformer.named_modules() if isinstance(m, QuantizedLinear)}
    torch.manual_seed(0)
    for name, layer in layers.items():
        weight = stored[name + ".weight"]
        assert layer.stored.dtype == FP8
        assert torch.equal(layer.stored.view(torch.uint8), weight.view(torch.uint8)), name
        assert layer.scale.shape == (layer.out_features, 1) and torch.all(layer.scale == layer.scale[0]), name
        assert torch.equal(layer.weight, reference[name + ".weight"]), name
        x = torch.randn(3, layer.in_features)
        expected = torch.nn.functional.linear(x, reference[name + ".weight"], layer.bias)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    # the linears outside the blocks (not quantized) hold fp8 * scale, no placeholder left
    outside = [n for n, m in transformer.named_modules() if type(m) is torch.nn.Linear and n + ".weight" in stored
               and stored[n + ".weight"].dtype == FP8]
    assert outside
    for name in outside:
        assert torch.equal(transformer.get_submodule(name).weight, reference[name + ".weight"]), name
    assert all(s != 0 for p in transformer.parameters() if p.numel() > 1 for s in p.stride())


@pytest.fixture(scope="module")
def plain_run(model: dict[str, Any], four_images: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A LoRA run on the unscaled fp32 file: its losses and the keys / shapes of its exports."""
    run = tmp_path_factory.mktemp("plain") / "run"
    config = _config(model, four_images)
    losses, _ = _run(config, run)
    return {"losses": losses, "exports": _exports(run, config.model.family, tmp_path_factory.mktemp("export"))}


@pytest.mark.parametrize("kind", ["none", "fp8"])
def test_a_lora_trains_on_a_scaled_file_and_exports_the_same_keys(model: dict[str, Any], four_images: Path,
                                                                   plain_run: dict[str, Any], tmp_path: Path,
                                                                   kind: str) -> None:
    if kind == "none" and model["name"] != "flux":
        pytest.skip("the dequantized load of every family is checked above; one family trains on it")
    config = _config(model, four_images, files="scaled", **{"model.quantize": kind})
    losses, weights = _run(config, tmp_path / "run")
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    # the same model up to fp8 rounding: the losses stay close to the unscaled file's (a dropped scale would not)
    for s, p in zip(losses, plain_run["losses"]):
        assert abs(s - p) <= 0.05 * abs(p) + 1e-3, (losses, plain_run["losses"])
    assert all(v.dtype == torch.float32 for v in weights.values())
    assert _exports(tmp_path / "run", config.model.family, tmp_path / "export") == plain_run["exports"]


def test_a_scale_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    fp8 = torch.randn(6, 4).to(FP8)
    path = tmp_path / "broken.safetensors"
    with pytest.raises(ModelFileError, match=r"broken\.safetensors.*blocks\.0\.lin\.scale_weight.*\(6, 4\)"):
        take_fp8_scales({"blocks.0.lin.weight": fp8, "blocks.0.lin.scale_weight": torch.ones(4)}, path)
    with pytest.raises(ModelFileError, match=r"broken\.safetensors.*blocks\.0\.lin\.scale_weight.*float32 weight"):
        take_fp8_scales({"blocks.0.lin.weight": torch.ones(6, 4), "blocks.0.lin.scale_weight": torch.ones(())}, path)
    with pytest.raises(ModelFileError, match=r"blocks\.1\.lin\.scale_weight.*no weight"):
        take_fp8_scales({"blocks.1.lin.scale_weight": torch.ones(())}, path)
    # a per-row scale is taken as it is
    _, scales = take_fp8_scales({"blocks.0.lin.weight": fp8, "blocks.0.lin.scale_weight": torch.arange(6.0)}, path)
    assert torch.equal(scales["blocks.0.lin.weight"], torch.arange(6.0).reshape(6, 1))


def test_scales_follow_a_row_split_and_a_row_swap() -> None:
    """``convert_with_scales``: a fused tensor split by rows gives each part its rows of the scale column; a
    swap of the halves swaps them; other tensors are left out of the scales."""
    state = {"qkv.weight": torch.zeros(6, 2).to(FP8), "mod.weight": torch.zeros(4, 2).to(FP8),
             "norm.scale": torch.ones(2)}
    _, scales = take_fp8_scales({**state, "qkv.scale_weight": torch.arange(6.0),
                                 "mod.scale_weight": torch.arange(4.0), "scaled_fp8": torch.empty(0, dtype=FP8)},
                                Path("x.safetensors"))

    def convert(s: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        q, k, v = s["qkv.weight"].split([2, 2, 2])
        a, b = s["mod.weight"].chunk(2)
        return {"q.weight": q, "k.weight": k, "v.weight": v, "mod.weight": torch.cat([b, a]), "norm.weight": s["norm.scale"]}

    converted, moved = convert_with_scales(state, scales, convert)
    assert converted.keys() == {"q.weight", "k.weight", "v.weight", "mod.weight", "norm.weight"}
    assert moved.keys() == {"q.weight", "k.weight", "v.weight", "mod.weight"}
    assert moved["k.weight"].flatten().tolist() == [2.0, 3.0]
    assert moved["mod.weight"].flatten().tolist() == [2.0, 3.0, 0.0, 1.0]


def test_a_scaled_t5_file_loads_as_weight_times_scale(tmp_path: Path) -> None:
    """ComfyUI's ``t5xxl_fp8_e4m3fn_scaled.safetensors`` (the text encoder beside these transformers): its matrices
    load as fp8 * scale too (before, the scales were dropped as extra tensors and the raw fp8 values loaded)."""
    from sdstudio.core.models.flux.files import load_t5_file
    from tests.tiny_flux import save_tiny_flux, save_tiny_flux_split, tiny_flux_components

    folder = save_tiny_flux(tmp_path / "folder")
    t5 = save_tiny_flux_split(tmp_path / "split", tiny_flux_components())["t5xxl"]
    scaled = write_scaled_fp8(t5, tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors")
    raw = load_file(str(scaled))
    loaded = load_t5_file(scaled, folder).state_dict()
    reference = _without_scales(raw, dequantize=True)
    matrices = [k for k, v in raw.items() if v.dtype == FP8 and v.ndim == 2]
    assert matrices
    for key in matrices:
        assert torch.equal(loaded[key], reference[key]), key
