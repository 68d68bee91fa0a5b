"""An SD single file stored in fp8 (e4m3fn, as the ``*_fp8_e4m3fn.safetensors`` checkpoints users share) under
``model.quantize = 'fp8'``: the UNet's linear layers keep the file's fp8 weights bit for bit (scale 1), instead of
the weights being widened and quantized again with per-row scales (a second rounding)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdstudio.core.models.quantize import QuantizedLinear, quantize_tensor
from sdstudio.core.models.sd.files import UNET_PREFIX, stored_fp8_unet_weights
from sdstudio.core.models.sd.model import build_sd_model
from tests.sd_helpers import losses, sd_config


@pytest.fixture(scope="module")
def fp8_file(tiny_sd1: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD1 model (the same weights as the tiny_sd1 folder) as one original-layout file whose UNet
    matrices are float8 e4m3fn."""
    from sdstudio.core.export.single_file import ldm_state_dict
    from tests.tiny_models import tiny_sd1_components

    tensors = ldm_state_dict(tiny_sd1_components(), family="sd1")
    out = {k: (v.to(torch.float8_e4m3fn) if k.startswith(UNET_PREFIX) and v.ndim == 2 else v).contiguous()
           for k, v in tensors.items()}
    path = tmp_path_factory.mktemp("fp8") / "tiny_sd1_fp8_e4m3fn.safetensors"
    save_file(out, str(path))
    return path


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def test_fp8_file_weights_are_kept_bit_for_bit(fp8_file: Path, tiny_sd1: Path, four_images: Path) -> None:
    cfg = sd_config("sd15-lora", fp8_file, four_images,
                    **{"model.quantize": "fp8", "model.config_folder": str(tiny_sd1)})
    bundle = build_sd_model(cfg, torch.device("cpu"))
    unet = bundle.save_modules["unet"]
    stored = stored_fp8_unet_weights(fp8_file, unet.config)
    raw = {k: v for k, v in load_file(str(fp8_file)).items() if v.dtype == torch.float8_e4m3fn}
    assert len(stored) == len(raw) > 0  # every fp8 matrix of the file found under its diffusers name
    layers = {name.replace(".base_layer", ""): m for name, m in unet.named_modules() if isinstance(m, QuantizedLinear)}
    assert layers.keys() == {k.removesuffix(".weight") for k in stored}
    requantized_differs = 0
    for name, layer in layers.items():
        weight = stored[name + ".weight"]
        assert layer.stored.dtype == torch.float8_e4m3fn
        assert torch.equal(_bits(layer.stored), _bits(weight)), name
        assert torch.equal(layer.scale, torch.ones_like(layer.scale))
        assert torch.equal(layer.weight, weight.float())  # computes with exactly the file's values
        again, scale = quantize_tensor(weight.float(), "fp8")  # what quantizing the widened weight would give
        requantized_differs += not torch.equal((again.float() * scale), weight.float())
    assert requantized_differs > 0, "the test would not see a second rounding"
    assert all(p.dtype == torch.float32 for p in bundle.trainable.parameters() if p.requires_grad)


def test_fp8_file_trains_under_a_lora(fp8_file: Path, tiny_sd1: Path, four_images: Path, tmp_path: Path) -> None:
    cfg = sd_config("sd15-lora", fp8_file, four_images, **{"model.quantize": "fp8",
                    "model.config_folder": str(tiny_sd1), "train.max_steps": 2})
    got = losses(cfg, tmp_path / "run")
    assert len(got) == 2 and all(torch.isfinite(torch.tensor(got)))


def test_folders_and_full_precision_files_have_nothing_stored_in_fp8(tiny_sd1: Path, fp8_file: Path,
                                                                       tmp_path: Path) -> None:
    unet_config = {"in_channels": 4}  # not read when there is nothing in fp8
    assert stored_fp8_unet_weights(tiny_sd1, unet_config) == {}
    plain = tmp_path / "plain.safetensors"
    save_file({k: v.float() if v.is_floating_point() else v for k, v in load_file(str(fp8_file)).items()},
              str(plain))
    assert stored_fp8_unet_weights(plain, unet_config) == {}
