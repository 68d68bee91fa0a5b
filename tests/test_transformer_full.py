"""Full fine-tune (lora.enabled = false) of SD3 / SD3.5 and Chroma, as tests/test_flux_full.py checks Flux: the
whole transformer trains (every weight moves, the loss stays finite), checkpoints and resumes exactly (2 + 2 steps
== 4 steps), its single file (original key names) loads back through the family's own split-file loader to the
trained weights, and a LoRA export of the run is refused with a sentence."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from sdstudio.core import events as ev
from sdstudio.core.errors import UserError
from sdstudio.core.train.loop import train


def _sd3(folder: Path) -> dict[str, Any]:
    from diffusers import SD3Transformer2DModel

    from sdstudio.core.models.sd3.files import load_transformer_file
    from tests.test_sd3_family import _train_config
    from tests.tiny_sd3 import save_tiny_sd3

    return {"model": save_tiny_sd3(folder / "large"), "config": _train_config, "cls": SD3Transformer2DModel,
            "load": load_transformer_file, "original_key": "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",
            "trained_key": "transformer_blocks.0.attn.to_q.weight"}


def _chroma(folder: Path) -> dict[str, Any]:
    from diffusers import ChromaTransformer2DModel

    from sdstudio.core.models.chroma.files import load_transformer_file
    from tests.test_chroma_family import _config
    from tests.tiny_chroma import save_tiny_chroma

    return {"model": save_tiny_chroma(folder / "hd"), "config": _config, "cls": ChromaTransformer2DModel,
            "load": load_transformer_file, "original_key": "double_blocks.0.img_attn.qkv.weight",
            "trained_key": "transformer_blocks.0.attn.to_q.weight"}


@pytest.fixture(scope="module", params=["sd3", "chroma"])
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    make = {"sd3": _sd3, "chroma": _chroma}[request.param]
    return {"name": request.param, **make(tmp_path_factory.mktemp(request.param))}


def _run(config: Any, run_dir: Path, **kw: Any) -> list[float]:
    events = list(train(config, run_dir=run_dir, **kw))
    assert isinstance(events[-1], ev.Finished), events[-1]
    return [e.loss for e in events if isinstance(e, ev.StepMetrics)]


def _checkpoint(run: Path, step: int) -> dict[str, torch.Tensor]:
    with safe_open(str(run / "checkpoints" / f"step-{step:08d}" / "model.safetensors"), "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open is not a dict)


@pytest.fixture(scope="module")
def full_run(family: dict[str, Any], four_images: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[Path, list[float], list[float]]:
    """A full fine-tune of 2 steps + resume to 4 (checkpoints every 2), and the same 4 steps straight."""
    cfg = family["config"](family["model"], four_images, **{
        "lora.enabled": False, "data.resolution": 32, "train.max_steps": 4, "checkpoint.every_steps": 2,
        "train.learning_rate": 1e-3, "train.optimizer": "adamw", "train.batch_size": 2})
    root = tmp_path_factory.mktemp(f"{family['name']}-full")
    straight = _run(cfg, root / "straight")
    run = root / "run"
    first = _run(cfg.with_overrides({"train.max_steps": 2}), run)
    rest = _run(cfg, run, resume=True)
    return run, straight, first + rest


def test_full_fine_tune_trains_every_weight_and_resumes_exactly(family: dict[str, Any],
                                                                full_run: tuple[Path, list[float], list[float]]
                                                                ) -> None:
    run, straight, resumed = full_run
    assert len(straight) == 4 and all(math.isfinite(x) for x in straight), straight
    assert resumed == pytest.approx(straight, rel=1e-5, abs=1e-6), "2 + resume + 2 steps == 4 steps"
    base_model = family["cls"].from_pretrained(str(family["model"]), subfolder="transformer")
    base = base_model.state_dict()
    ckpt = _checkpoint(run, 4)
    assert set(ckpt) == {f"transformer.{k}" for k in base}, "the whole transformer, no adapter"
    unchanged = [name for name, _ in base_model.named_parameters()
                 if torch.equal(ckpt[f"transformer.{name}"], base[name])]
    assert not unchanged, f"every transformer weight trains; these did not: {unchanged[:5]}"
    assert all(v.dtype == torch.float32 for v in ckpt.values()), "a full fine-tune trains in fp32"
    again = _checkpoint(run.parent / "straight", 4)
    worst = max((again[k] - ckpt[k]).abs().max().item() for k in ckpt)
    assert worst < 1e-5, f"resumed weights differ from the straight run's by {worst}"


def test_single_file_export_reloads_to_the_trained_weights(family: dict[str, Any],
                                                           full_run: tuple[Path, list[float], list[float]],
                                                           tmp_path: Path) -> None:
    from sdstudio.core.export.api import export

    run = full_run[0]
    out = export(run, "single-file", tmp_path / "full.safetensors", dtype=torch.float32)
    with safe_open(str(out), "pt") as fh:
        keys, meta = set(fh.keys()), fh.metadata()
    assert family["original_key"] in keys, "the original key names"
    assert not any(k.startswith(("transformer_blocks", "transformer.")) for k in keys)
    assert meta.get("modelspec.architecture")
    config = json.loads((family["model"] / "transformer" / "config.json").read_text())
    back = family["load"](out, config, torch.float32).state_dict()
    ckpt = _checkpoint(run, 4)
    assert {f"transformer.{k}" for k in back} == set(ckpt)
    assert all(torch.equal(back[k], ckpt[f"transformer.{k}"]) for k in back), "identical weights"
    base = family["cls"].from_pretrained(str(family["model"]), subfolder="transformer").state_dict()
    key = family["trained_key"]
    assert not torch.equal(back[key], base[key]), "the trained weights, not the base"


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_a_lora_export_of_a_full_run_is_refused(fmt: str, full_run: tuple[Path, list[float], list[float]],
                                                tmp_path: Path) -> None:
    from sdstudio.core.export.api import export

    out = tmp_path / f"{fmt}.safetensors"
    with pytest.raises(UserError, match=r"trains the full model, not a LoRA \(lora.enabled = false\)"):
        export(full_run[0], fmt, out, dtype=torch.float32)
    assert not out.exists()


def test_a_full_run_samples_with_its_trained_transformer(family: dict[str, Any],
                                                         full_run: tuple[Path, list[float], list[float]]) -> None:
    """`sdstudio sample --run` / previews load a full run's checkpoint: the whole trained transformer."""
    from sdstudio.core.sampling.from_run import load_trained

    bundle = load_trained(full_run[0], use_ema=False, device="cpu").bundle
    assert bundle.lora is False
    state = bundle.components.transformer.state_dict()
    ckpt = _checkpoint(full_run[0], 4)
    assert all(torch.equal(state[k].float(), ckpt[f"transformer.{k}"]) for k in state)
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, bundle.in_channels, 4, 4, generator=gen), torch.tensor([0.5])
    with torch.no_grad():
        out = bundle.trainable(x, t, bundle.encode_captions(["a red circle"], torch.device("cpu")))
    assert out.shape == x.shape and torch.isfinite(out).all()
