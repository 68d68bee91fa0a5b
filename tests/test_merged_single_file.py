"""`sdstudio export --format single-file` of SD3 and Chroma LoRA runs: the transformer with the LoRA merged in,
in the original key names the shared files have; read back by the family's own split-file loader it holds the
merged weights exactly and reproduces the trained model's output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sdstudio.core import events as ev
from sdstudio.core.models.registry import get_family, recognise_model
from sdstudio.core.train.loop import train
from tests.tiny_chroma import save_tiny_chroma
from tests.tiny_sd3 import save_tiny_sd3


def _config(family: str, model: Path, data: Path):
    if family == "sd3":
        from tests.test_sd3_family import _train_config
    else:
        from tests.test_chroma_family import _config as _train_config
    return _train_config(model, data, **{"data.resolution": 32, "train.max_steps": 2, "train.learning_rate": 3e-2})


@pytest.mark.parametrize("family", ["sd3", "chroma"])
def test_a_lora_merged_into_a_single_file_round_trips(family: str, four_images: Path, tmp_path: Path) -> None:
    from sdstudio.core.export.api import export
    from sdstudio.core.export.source import load_export_source
    from sdstudio.core.models.flux.export import trained_transformer
    from sdstudio.core.sampling.from_run import load_trained

    if family == "sd3":
        from sdstudio.core.models.sd3.files import load_transformer_file
        from sdstudio.core.models.sd3.model import SD3Denoiser as Denoiser

        model = save_tiny_sd3(tmp_path / "base")
        marker, arch = "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "stable-diffusion-3"
    else:
        from sdstudio.core.models.chroma.files import load_transformer_file
        from sdstudio.core.models.chroma.model import ChromaDenoiser as Denoiser

        model = save_tiny_chroma(tmp_path / "base")
        marker, arch = "double_blocks.0.img_attn.qkv.weight", "chroma"
    assert "single-file" not in get_family(family).unsupported_exports  # listed in the formats table
    run = tmp_path / "run"
    events = list(train(_config(family, model, four_images), run_dir=run))
    assert isinstance(events[-1], ev.Finished), events[-1]

    out = export(run, "single-file", tmp_path / "merged.safetensors", dtype=torch.float32)
    with safe_open(str(out), "pt") as fh:
        keys, meta = set(fh.keys()), fh.metadata()
    assert marker in keys and not any("lora" in k or k.startswith("transformer_blocks") for k in keys)
    assert meta["modelspec.architecture"].startswith(arch), meta["modelspec.architecture"]
    assert recognise_model(out).name == family  # sdstudio takes it as a model.path again

    config = json.loads((model / "transformer" / "config.json").read_text())
    back = load_transformer_file(out, config, torch.float32)
    want = trained_transformer(load_export_source(run)).state_dict()
    got = back.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), "identical merged weights"

    trained = load_trained(run, use_ema=False, device="cpu").bundle
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 16, 4, 4, generator=gen), torch.tensor([0.3, 0.8])
    cond = trained.encode_captions(["a red circle", "a blue square"], torch.device("cpu"))
    base = load_transformer_file(out, config, torch.float32)
    base.load_state_dict(type(back).from_pretrained(str(model), subfolder="transformer").state_dict())
    with torch.no_grad():
        expected = trained.trainable(x, t, cond)
        result = Denoiser(back)(x, t, cond)
        untrained = Denoiser(base)(x, t, cond)
    scale = expected.abs().max()
    assert (result - expected).abs().max() < 1e-4 * scale, (result - expected).abs().max()
    assert (untrained - expected).abs().max() > 1e-3 * scale, "the LoRA matters"
