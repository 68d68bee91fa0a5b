"""Flux full fine-tune (lora.enabled = false) and the single-file transformer export: the whole transformer
trains, checkpoints and resumes; its single file (original key names, a LoRA run merged in) loads back to the
trained weights / outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sdstudio.core import events as ev
from sdstudio.core.train.loop import train
from tests.test_flux import _train_config
from tests.tiny_flux import save_tiny_flux
from tests.transformer_helpers import train_losses as _losses


@pytest.fixture(scope="module")
def flux_dev(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_flux(tmp_path_factory.mktemp("flux") / "dev")


def _from_single_file(path: Path, flux_dev: Path):
    """The exported file loaded as a model. diffusers' from_single_file converter hard-codes the real width
    (3072), so a tiny file is read by sdstudio's loader of split files; that diffusers' converter reads our
    original-name layout at real size is tests/test_flux.py's meta-device test (the same mapping)."""
    import json

    from sdstudio.core.models.flux.files import load_transformer_file

    config = json.loads((flux_dev / "transformer" / "config.json").read_text())
    return load_transformer_file(path, config, torch.float32)


def test_full_fine_tune_trains_resumes_and_exports_a_single_file(flux_dev: Path, four_images: Path,
                                                                  tmp_path: Path) -> None:
    from diffusers import FluxTransformer2DModel

    from sdstudio.core.export.api import export
    from sdstudio.core.export.source import load_export_source
    from sdstudio.core.models.flux.export import trained_transformer

    cfg = _train_config(flux_dev, four_images, **{"lora.enabled": False, "data.resolution": 32, "train.max_steps": 2,
                                           "checkpoint.every_steps": 2, "train.learning_rate": 1e-3})
    run = tmp_path / "run"
    _losses(cfg, run)
    events = list(train(cfg.with_overrides({"train.max_steps": 3}), run_dir=run, resume=True))
    assert isinstance(events[-1], ev.Finished) and events[-1].step == 3
    base = FluxTransformer2DModel.from_pretrained(str(flux_dev), subfolder="transformer").state_dict()
    with safe_open(str(run / "checkpoints" / "step-00000003" / "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
        ckpt = {k: fh.get_tensor(k) for k in keys}
    assert keys == {f"transformer.{k}" for k in base}, "the whole transformer, no adapter"
    assert not torch.equal(ckpt["transformer.transformer_blocks.0.attn.to_q.weight"],
                           base["transformer_blocks.0.attn.to_q.weight"]), "it trained"

    out = export(run, "single-file", tmp_path / "flux-ft.safetensors", dtype=torch.float32)
    with safe_open(str(out), "pt") as fh:
        file_keys, meta = set(fh.keys()), fh.metadata()
    assert "double_blocks.0.img_attn.qkv.weight" in file_keys and "single_blocks.0.linear1.weight" in file_keys
    assert not any(k.startswith(("transformer_blocks", "model.")) for k in file_keys)
    assert meta["modelspec.architecture"] == "flux-1-dev"
    back = _from_single_file(out, flux_dev).state_dict()
    want = trained_transformer(load_export_source(run)).state_dict()
    assert back.keys() == want.keys()
    assert all(torch.equal(back[k], want[k]) for k in want), "identical weights"
    assert all(torch.equal(back[k], ckpt[f"transformer.{k}"]) for k in want)


@pytest.mark.parametrize("kind", ["lora", "loha"])
def test_a_lora_merged_into_a_single_file_gives_the_trained_outputs(kind: str, flux_dev: Path, four_images: Path,
                                                                    tmp_path: Path) -> None:
    from diffusers import FluxTransformer2DModel

    from sdstudio.core.export.api import export
    from sdstudio.core.models.flux.model import FluxDenoiser
    from sdstudio.core.sampling.from_run import load_trained

    cfg = _train_config(flux_dev, four_images, **{"lora.type": kind, "data.resolution": 32, "train.max_steps": 2,
                                           "train.learning_rate": 3e-2})
    run = tmp_path / "run"
    _losses(cfg, run)
    out = export(run, "single-file", tmp_path / "merged.safetensors", dtype=torch.float32)
    trained = load_trained(run, use_ema=False, device="cpu").bundle
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 16, 4, 4, generator=gen), torch.tensor([0.3, 0.8])
    cond = trained.encode_captions(["a red circle", "a blue square"], torch.device("cpu"))
    with torch.no_grad():
        want = trained.trainable(x, t, cond)
        got = FluxDenoiser(_from_single_file(out, flux_dev))(x, t, cond)
        base = FluxDenoiser(FluxTransformer2DModel.from_pretrained(str(flux_dev), subfolder="transformer"))(x, t, cond)
    scale = want.abs().max()
    assert (got - want).abs().max() < 1e-4 * scale, (got - want).abs().max()
    assert (base - want).abs().max() > 1e-3 * scale, "the LoRA matters"
