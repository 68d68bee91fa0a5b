"""LoHa / LoKr / DoRA / OFT (lora.type) on Chroma and SD3 / SD3.5: each trains a tiny model, and its kohya export
(LyCORIS keys in the original layout's names, as ComfyUI and Forge read them: ``lora_unet_<original module>``,
``lycoris_<diffusers module>`` for LoKr parts of a fused q/k/v / linear1) names only modules of the real-size
layout (meta device) and, applied as ComfyUI applies it, gives the trained weights. A diffusers export of these
kinds is refused with a sentence."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sdstudio.core.config import RunConfig
from sdstudio.core.errors import ConfigError, UserError
from sdstudio.core.models.fused_lycoris import Block
from sdstudio.core.models.registry import get_family
from tests.test_chroma_family import _config as _chroma_config
from tests.test_chroma_family import _real_size as _chroma_real_size
from tests.test_sd3_family import _meta_transformer
from tests.test_sd3_family import _train_config as _sd3_config
from tests.transformer_helpers import train_losses as _losses

KINDS = ["loha", "lokr", "dora", "oft"]


@pytest.fixture(scope="module")
def chroma(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_chroma import save_tiny_chroma

    return save_tiny_chroma(tmp_path_factory.mktemp("chroma") / "hd")


@pytest.fixture(scope="module")
def sd35(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_sd3 import save_tiny_sd3

    return save_tiny_sd3(tmp_path_factory.mktemp("sd3") / "medium", variant="3.5-medium")


def _diffusers_refused(family: str, cfg: RunConfig) -> bool:
    """A diffusers export of the kind is refused before training (the config, or the family for DoRA)."""
    try:
        cfg = cfg.with_overrides({"export.formats": ["diffusers"]})
    except ConfigError as exc:
        return "diffusers" in str(exc)
    return any("diffusers loads no" in p for p in get_family(family).config_problems(cfg))


def _slices(diffusers: Mapping[str, torch.Tensor], layout: Callable[[str], Block | None]
            ) -> dict[str, tuple[str, int, int]]:
    """ComfyUI's ``lycoris_<diffusers module>`` map for the fused weights: name -> (original key, first row,
    rows), from the diffusers weights' shapes (as comfy.utils.flux_to_diffusers / mmdit_to_diffusers give it)."""
    out = {}
    for key in diffusers:
        block = layout(key)
        if block is None or not key.endswith(".weight"):
            continue
        rest = key[len(block.path) + 1:-len(".weight")]
        for original, parts in block.fused.items():
            if rest in parts:
                start = sum(diffusers[f"{block.path}.{p}.weight"].shape[0] for p in parts[:parts.index(rest)])
                original_key = f"{block.original.replace('_blocks_', '_blocks.')}.{original}.weight"
                out[f"lycoris_{block.path}_{rest}".replace(".", "_")] = (original_key, start, diffusers[key].shape[0])
    return out


def _apply(file: Path, base: dict[str, torch.Tensor], slices: dict[str, tuple[str, int, int]]
           ) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The base weights (original names) with every module of the file applied as ComfyUI applies it."""
    from sdstudio.core.lora_tools.files import read_adapter_file

    by_kohya = {"lora_unet_" + k[:-len(".weight")].replace(".", "_"): k for k in base if k.endswith(".weight")}
    out = {k: v.clone().float() for k, v in base.items()}
    touched = set()
    for name, adapter in read_adapter_file(file).modules.items():
        if name.startswith("lora_unet_"):
            key = by_kohya[name]
            out[key] += adapter.delta(out[key])
        else:
            key, start, n = slices[name]
            out[key][start:start + n] += adapter.delta(out[key][start:start + n])
        touched.add(key)
    return out, touched


def _merged(run: Path) -> dict[str, torch.Tensor]:
    """The trained transformer with its adapters merged (diffusers names)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from sdstudio.core.export.lycoris import rebuilt_bundle
    from sdstudio.core.export.source import load_export_source

    transformer = rebuilt_bundle(load_export_source(run)).components.transformer
    for module in transformer.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge(adapter_names=["default"])
    return {k.replace(".base_layer.", "."): v for k, v in transformer.state_dict().items() if ".default" not in k}


def _check_export(run: Path, tmp_path: Path, kind: str, base_diffusers: dict[str, torch.Tensor],
                  to_original: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
                  slices: dict[str, tuple[str, int, int]], real_original: Mapping[str, torch.Tensor],
                  real_model: torch.nn.Module) -> tuple[set[str], dict[str, str]]:
    from sdstudio.core.export.api import export

    with pytest.raises(UserError, match=f"diffusers loads no {kind} adapter"):
        export(run, "diffusers", tmp_path / "no.safetensors", dtype=torch.float32)
    out = export(run, "kohya", tmp_path / f"{kind}.safetensors", dtype=torch.float32)
    with safe_open(str(out), "pt") as fh:
        names = {k.split(".", 1)[0] for k in fh.keys()}  # noqa: SIM118
        meta = fh.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"])["sdstudio_type"] == kind
    # every module names a weight of the real-size original layout (ComfyUI's lora_unet_ map) or a split
    # diffusers module of the real-size transformer (its lycoris_ map)
    kohya_real = {"lora_unet_" + k[:-len(".weight")].replace(".", "_") for k in real_original if k.endswith(".weight")}
    lycoris_real = {"lycoris_" + n.replace(".", "_") for n, _ in real_model.named_modules()}
    assert names <= kohya_real | lycoris_real, sorted(names - kohya_real - lycoris_real)
    # applied as ComfyUI applies it, the file gives the trained weights
    base = to_original(base_diffusers)
    applied, touched = _apply(out, base, slices)
    trained = to_original(_merged(run))
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    assert changed and changed <= touched
    for key in base:
        assert torch.allclose(applied[key], trained[key].float(), atol=2e-5, rtol=1e-4), key
    return names, meta


@pytest.mark.parametrize("kind", KINDS)
def test_chroma_adapter_type_trains_and_exports_for_comfyui(kind: str, chroma: Path, four_images: Path,
                                                            tmp_path: Path) -> None:
    from sdstudio.core.models.chroma.files import diffusers_to_original
    from sdstudio.core.models.flux.lycoris import _flux_block
    from tests.tiny_chroma import tiny_chroma_components

    cfg = _chroma_config(chroma, four_images, **{"lora.type": kind, "data.resolution": 32, "train.max_steps": 2,
                                          "train.learning_rate": 1e-2, "lora.oft_block_size": 8})
    assert get_family("chroma").config_problems(cfg) == []
    assert _diffusers_refused("chroma", cfg)
    assert len(_losses(cfg, tmp_path / "run")) == 2
    real_original, real = _chroma_real_size()
    base = tiny_chroma_components()["transformer"].state_dict()
    slices = _slices(base, _flux_block)
    names, meta = _check_export(tmp_path / "run", tmp_path, kind, base, diffusers_to_original, slices,
                                real_original, real)
    assert meta["modelspec.implementation"] == "https://huggingface.co/lodestones/Chroma"
    assert "lora_unet_double_blocks_0_img_mlp_0" in names and "lora_unet_single_blocks_0_linear2" in names
    if kind == "lokr":
        assert "lycoris_transformer_blocks_0_attn_to_q" in names
    else:
        assert "lora_unet_double_blocks_0_img_attn_qkv" in names and "lora_unet_single_blocks_0_linear1" in names


@pytest.mark.parametrize("kind", KINDS)
def test_sd3_adapter_type_trains_and_exports_for_comfyui(kind: str, sd35: Path, four_images: Path,
                                                         tmp_path: Path) -> None:
    """SD3.5 medium (its second attention, attn2, fuses q/k/v as well), every linear of the joint blocks
    (lora.targets = 'all': the last block's context adaLN has its halves swapped in the original layout)."""
    from sdstudio.core.models.sd3.export import _sd3_block
    from sdstudio.core.models.sd3.files import diffusers_to_sd3
    from tests.tiny_sd3 import tiny_sd3_components

    cfg = _sd3_config(sd35, four_images, **{"lora.type": kind, "data.resolution": 32, "train.max_steps": 2,
                                     "lora.targets": "all", "lora.oft_block_size": 8})
    assert get_family("sd3").config_problems(cfg) == []
    assert _diffusers_refused("sd3", cfg)
    assert len(_losses(cfg, tmp_path / "run")) == 2
    real = _meta_transformer("3.5-medium")
    base = tiny_sd3_components(variant="3.5-medium")["transformer"].state_dict()
    names, meta = _check_export(tmp_path / "run", tmp_path, kind, base, diffusers_to_sd3,
                                _slices(base, _sd3_block(1)), diffusers_to_sd3(real.state_dict()), real)
    assert meta["ss_base_model_version"] == "sd3.5_medium"
    assert "lora_unet_joint_blocks_0_x_block_mlp_fc1" in names and "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1" in names
    if kind == "lokr":
        assert {"lycoris_transformer_blocks_0_attn_to_q", "lycoris_transformer_blocks_0_attn2_to_v"} <= names
    else:
        assert {"lora_unet_joint_blocks_0_x_block_attn_qkv", "lora_unet_joint_blocks_0_x_block_attn2_qkv",
                "lora_unet_joint_blocks_0_context_block_attn_qkv"} <= names


def test_sd3_kohya_lora_of_every_linear_reproduces_the_trained_weights(sd35: Path, four_images: Path,
                                                                       tmp_path: Path) -> None:
    """A plain LoRA with lora.targets = 'all': the kohya file applied as ComfyUI applies it gives the trained
    weights, the last block's context adaLN (halves swapped in the original layout) included."""
    from sdstudio.core.export.api import export
    from sdstudio.core.models.sd3.files import diffusers_to_sd3
    from tests.tiny_sd3 import tiny_sd3_components

    cfg = _sd3_config(sd35, four_images, **{"data.resolution": 32, "train.max_steps": 2, "lora.targets": "all"})
    _losses(cfg, tmp_path / "run")
    out = export(tmp_path / "run", "kohya", tmp_path / "lora.safetensors", dtype=torch.float32)
    base = diffusers_to_sd3(tiny_sd3_components(variant="3.5-medium")["transformer"].state_dict())
    applied, touched = _apply(out, base, {})
    trained = diffusers_to_sd3(_merged(tmp_path / "run"))
    assert "joint_blocks.1.context_block.adaLN_modulation.1.weight" in touched
    for key in base:
        assert torch.allclose(applied[key], trained[key].float(), atol=2e-5, rtol=1e-4), key
