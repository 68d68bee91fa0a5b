"""CLIP-L LoRA for Flux (lora.text_encoder): CLIP-L trains through its LoRA (the text-embedding cache is refused
as for SD), checkpoints and resumes hold it, the kohya export names it lora_te1_text_model_encoder_layers_...
and the diffusers export text_encoder.text_model...; diffusers' load_lora_weights reproduces the trained
transformer and CLIP-L outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sdstudio.core import events as ev
from sdstudio.core.config import RunConfig
from sdstudio.core.train.loop import train
from tests.test_flux import _train_config
from tests.tiny_flux import save_tiny_flux
from tests.transformer_helpers import train_losses as _losses


@pytest.fixture(scope="module")
def flux_dev(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_flux(tmp_path_factory.mktemp("flux") / "dev")


def test_the_text_cache_is_refused_with_a_clip_lora(flux_dev: Path, four_images: Path) -> None:
    with pytest.raises(Exception, match="cache_text_embeddings"):
        _train_config(flux_dev, four_images, **{"lora.text_encoder": True, "data.cache_text_embeddings": True})
    with pytest.raises(Exception, match="train.train_text_encoder"):
        RunConfig().with_overrides({"model.family": "flux-dev", "model.path": str(flux_dev),
                                    "train.train_text_encoder": True, "lora.enabled": False})


def test_clip_lora_trains_resumes_and_exports_in_both_formats(flux_dev: Path, four_images: Path,
                                                              tmp_path: Path) -> None:
    from diffusers import FluxPipeline

    from sdstudio.core.export.api import export
    from sdstudio.core.models.flux.model import FluxDenoiser
    from sdstudio.core.sampling.from_run import load_trained

    cfg = _train_config(flux_dev, four_images, **{"lora.text_encoder": True, "data.resolution": 32,
                                                  "train.max_steps": 2, "checkpoint.every_steps": 2,
                                                  "train.learning_rate": 3e-2})
    run = tmp_path / "run"
    _losses(cfg, run)
    events = list(train(cfg.with_overrides({"train.max_steps": 4}), run_dir=run, resume=True))
    assert isinstance(events[-1], ev.Finished) and events[-1].step == 4
    with safe_open(str(run / "checkpoints" / "step-00000004" / "model.safetensors"), "pt") as fh:
        text_b = [fh.get_tensor(k) for k in fh.keys() if k.startswith("text_encoder.") and ".lora_B." in k]  # noqa: SIM118
    assert text_b and any(t.abs().max() > 0 for t in text_b), "CLIP-L's LoRA trained (lora_B starts at zero)"

    kohya = export(run, "kohya", tmp_path / "kohya.safetensors", dtype=torch.float32)
    with safe_open(str(kohya), "pt") as fh:
        kkeys = set(fh.keys())
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in kkeys
    assert "lora_te1_text_model_encoder_layers_0_self_attn_out_proj.alpha" in kkeys
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in kkeys
    diffusers_file = export(run, "diffusers", tmp_path / "lora.safetensors", dtype=torch.float32)
    with safe_open(str(diffusers_file), "pt") as fh:
        dkeys = set(fh.keys())
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in dkeys
    assert all(k.startswith(("transformer.", "text_encoder.text_model.")) for k in dkeys)

    trained = load_trained(run, use_ema=False, device="cpu").bundle
    pipe = FluxPipeline.from_pretrained(str(flux_dev), local_files_only=True)
    pipe.load_lora_weights(str(tmp_path), weight_name="lora.safetensors")
    base = FluxPipeline.from_pretrained(str(flux_dev), local_files_only=True)
    ids = trained.clip_ids(["a red circle", "a blue square"], torch.device("cpu"))
    with torch.no_grad():
        want_pooled = trained.components.text_encoder(ids).pooler_output
        got_pooled = pipe.text_encoder(ids).pooler_output
        base_pooled = base.text_encoder(ids).pooler_output
    assert torch.allclose(got_pooled, want_pooled, atol=1e-5), (got_pooled - want_pooled).abs().max()
    assert (base_pooled - want_pooled).abs().max() > 1e-3, "the CLIP-L LoRA matters"
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 16, 4, 4, generator=gen), torch.tensor([0.3, 0.8])
    cond = trained.encode_captions(["a red circle", "a blue square"], torch.device("cpu"))
    with torch.no_grad():
        want = trained.trainable(x, t, cond)
        got = FluxDenoiser(pipe.transformer)(x, t, {**cond, "pooled": got_pooled})
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_checkpoints_must_match_the_text_encoder_and_adapter_settings(flux_dev: Path, four_images: Path) -> None:
    """A Flux checkpoint loads only into a bundle that trains the same modules with the same adapters: a CLIP-L
    LoRA the run does not train, a missing one, another rank or another adapter type each name the setting."""
    from sdstudio.core.errors import CheckpointError
    from sdstudio.core.models.flux.model import build_flux_model

    cpu = torch.device("cpu")
    cfg = _train_config(flux_dev, four_images, **{"lora.text_encoder": True, "data.resolution": 32})
    state = build_flux_model(cfg, cpu).trainable_state()
    transformer_only = {k: v for k, v in state.items() if k.startswith("transformer.")}
    assert transformer_only and len(transformer_only) < len(state)
    plain = cfg.with_overrides({"lora.text_encoder": False})
    build_flux_model(plain, cpu).load_trainable_state(transformer_only, Path("old"))
    with pytest.raises(CheckpointError, match="text_encoder that this Flux.* run does not train; was lora.text_encoder"):
        build_flux_model(plain, cpu).load_trainable_state(state, Path("x"))
    with pytest.raises(CheckpointError, match="no text_encoder weights"):
        build_flux_model(cfg, cpu).load_trainable_state(transformer_only, Path("x"))
    with pytest.raises(CheckpointError, match="do not fit this model's transformer.*lora.rank"):
        build_flux_model(plain.with_overrides({"lora.rank": 8}), cpu).load_trainable_state(transformer_only,
                                                                                          Path("x"))
    with pytest.raises(CheckpointError, match="do not fit this model's transformer"):
        build_flux_model(plain.with_overrides({"lora.type": "loha"}), cpu).load_trainable_state(transformer_only,
                                                                                               Path("x"))
    again = build_flux_model(cfg, cpu)
    again.load_trainable_state(state, Path("x"))
    restored = again.trainable_state()
    assert restored.keys() == state.keys() and all(torch.equal(v, restored[k]) for k, v in state.items())
