"""LoHa / LoKr / DoRA / OFT (lora.type) on Flux: each trains on a tiny Flux and resumes, and its LyCORIS export
(the names ComfyUI reads for Flux: ``lora_unet_<original module>``; ``lycoris_<diffusers module>`` for LoKr
parts of the fused q/k/v / linear1) reproduces the trained weights in the original layout and names modules
of the real-size layout (meta device)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sdstudio.core import events as ev
from sdstudio.core.models.flux.files import DOUBLE_FUSED, SINGLE_FUSED, diffusers_to_bfl
from sdstudio.core.train.loop import train
from tests.test_flux import _real_size_bfl, _train_config
from tests.tiny_flux import save_tiny_flux, tiny_flux_components
from tests.transformer_helpers import train_losses as _losses


@pytest.fixture(scope="module")
def flux_dev(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_flux(tmp_path_factory.mktemp("flux") / "dev")


def _merged_bfl(source) -> dict[str, torch.Tensor]:
    """The trained transformer with its adapters merged, in the original key names."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from sdstudio.core.export.lycoris import rebuilt_bundle

    transformer = rebuilt_bundle(source).components.transformer
    for module in transformer.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge(adapter_names=["default"])
    state = {k.replace(".base_layer.", "."): v for k, v in transformer.state_dict().items() if ".default" not in k}
    return diffusers_to_bfl(state)


def _apply(file: Path, base: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The base weights (original names) with every module of the file applied as ComfyUI applies it:
    ``lora_unet_X`` to the whole weight X, ``lycoris_<diffusers module>`` to its rows of the fused weight."""
    from sdstudio.core.lora_tools.files import read_adapter_file

    by_kohya = {"lora_unet_" + k[:-len(".weight")].replace(".", "_"): k for k in base if k.endswith(".weight")}
    sizes = {"attn.to_q": 0, "attn.to_k": 1, "attn.to_v": 2, "attn.add_q_proj": 0, "attn.add_k_proj": 1,
             "attn.add_v_proj": 2, "proj_mlp": 3}
    out = {k: v.clone().float() for k, v in base.items()}
    touched = set()
    for name, adapter in read_adapter_file(file).modules.items():
        if name.startswith("lora_unet_"):
            key = by_kohya[name]
            out[key] += adapter.delta(out[key])
        else:
            m = re.match(r"^lycoris_(transformer_blocks|single_transformer_blocks)_(\d+)_(.+)$", name)
            assert m, name
            double = m[1] == "transformer_blocks"
            part = next(p for p in sizes if p.replace(".", "_") == m[3])
            fused = DOUBLE_FUSED if double else SINGLE_FUSED
            original = next(o for o, parts in fused.items() if part in parts)
            key = f"{'double_blocks' if double else 'single_blocks'}.{m[2]}.{original}.weight"
            inner = out[key].shape[1]  # q, k, v are inner x inner; proj_mlp the rest of linear1
            rows = [inner if p != "proj_mlp" else out[key].shape[0] - 3 * inner for p in fused[original]]
            start = sum(rows[:fused[original].index(part)])
            n = rows[fused[original].index(part)]
            out[key][start:start + n] += adapter.delta(out[key][start:start + n])
        touched.add(key)
    return out, touched


@pytest.mark.parametrize("kind", ["loha", "lokr", "dora", "oft"])
def test_adapter_type_trains_resumes_and_exports_for_comfyui(kind: str, flux_dev: Path, four_images: Path,
                                                             tmp_path: Path) -> None:
    from sdstudio.core.export.api import export
    from sdstudio.core.export.source import load_export_source

    cfg = _train_config(flux_dev, four_images, **{"lora.type": kind, "data.resolution": 32, "train.max_steps": 2,
                                           "checkpoint.every_steps": 2, "train.learning_rate": 1e-2,
                                           "lora.oft_block_size": 8})
    first = _losses(cfg, tmp_path / "run")
    events = list(train(cfg.with_overrides({"train.max_steps": 3}), run_dir=tmp_path / "run", resume=True))
    assert isinstance(events[-1], ev.Finished) and events[-1].step == 3, events[-1]
    assert len(first) == 2
    with safe_open(str(tmp_path / "run" / "checkpoints" / "step-00000003" / "model.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    marker = {"loha": ".hada_w1_a", "lokr": ".lokr_w", "dora": ".lora_magnitude_vector", "oft": ".oft_R"}[kind]
    assert any(marker in k for k in keys), keys[:5]

    out = export(tmp_path / "run", "kohya", tmp_path / f"{kind}.safetensors", dtype=torch.float32)
    with safe_open(str(out), "pt") as fh:
        names = {k.split(".", 1)[0] for k in fh.keys()}  # noqa: SIM118
        meta = fh.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"])["algo"]
    assert "lora_unet_double_blocks_0_img_attn_qkv" in names or kind == "lokr"
    assert "lora_unet_double_blocks_0_img_mlp_0" in names and "lora_unet_single_blocks_0_linear2" in names
    # every module names a weight of the real-size original layout (ComfyUI's lora_unet_ map) or a split
    # diffusers module of the real-size transformer (its lycoris_ map)
    real_bfl, real = _real_size_bfl()
    kohya_real = {"lora_unet_" + k[:-len(".weight")].replace(".", "_") for k in real_bfl if k.endswith(".weight")}
    lycoris_real = {"lycoris_" + n.replace(".", "_") for n, _ in real.named_modules()}
    assert names <= kohya_real | lycoris_real, sorted(names - kohya_real - lycoris_real)
    if kind == "lokr":
        assert "lycoris_transformer_blocks_0_attn_to_q" in names and "lycoris_single_transformer_blocks_0_proj_mlp" in names
    # applied as ComfyUI applies it, the file gives the trained weights
    base = diffusers_to_bfl(tiny_flux_components()["transformer"].state_dict())
    applied, touched = _apply(out, base)
    trained = _merged_bfl(load_export_source(tmp_path / "run"))
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    assert changed and changed <= touched
    for key in base:
        assert torch.allclose(applied[key], trained[key].float(), atol=2e-5, rtol=1e-4), key
