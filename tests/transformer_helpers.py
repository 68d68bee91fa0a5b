"""What the transformer families' tests (test_flux.py, test_sd3_family.py, test_chroma_family.py) do alike: the
tiny run's config, its losses, the trained checkpoint's LoRA keys, the exported LoRAs and their check in the
family's diffusers pipeline, and sampling a model folder with the exported LoRA. Each test keeps what is its
family's own (the preset, the key names, the metadata values, the defaults)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors import safe_open

from sdstudio.core import events as ev
from sdstudio.core.config import RunConfig
from sdstudio.core.models.registry import get_family
from sdstudio.core.presets import load_preset
from sdstudio.core.train.loop import train

CPU = torch.device("cpu")
# a LoRA on attention + MLP: one module of each kind in the first double and single block (Flux's and Chroma's)
FLUX_BLOCK_PARTS = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj",
                    "transformer_blocks.0.attn.to_add_out", "transformer_blocks.0.ff.net.2",
                    "transformer_blocks.0.ff_context.net.0.proj", "single_transformer_blocks.0.attn.to_v",
                    "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.proj_out")


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])][:3]


def tiny_run_config(preset: str, model: Path, data: Path, **overrides: Any) -> RunConfig:
    """``preset`` made tiny and fast on the CPU: 30 steps of 4 images at 64 px, a rank-4 LoRA, no caches, no
    previews, checkpoints or exports (``overrides`` win; dotted config keys)."""
    base = {"model.path": str(model), "data.path": str(data), "data.resolution": 64, "data.val_split": 0.0,
            "data.caption_dropout": 0.0, "data.cache_latents": False, "data.cache_text_embeddings": False,
            "train.batch_size": 4, "train.max_steps": 30, "train.log_every": 1, "train.warmup_steps": 0,
            "train.lr_scheduler": "constant", "train.device": "cpu", "train.mixed_precision": "no",
            "train.optimizer": "adamw", "train.gradient_checkpointing": False, "train.learning_rate": 1e-2,
            "sample.every_steps": 0, "sample.every_epochs": 0, "sample.at_end": False, "sample.steps": 2,
            "sample.seeds": [0], "checkpoint.every_steps": 0, "model.t5_max_length": 16, "lora.rank": 4,
            "lora.alpha": 8.0, "export.formats": []}
    return load_preset(preset).with_overrides({**base, **overrides})


def train_losses(config: RunConfig, run_dir: Path, **kw: Any) -> list[float]:
    """Train ``config`` to the end in-process; the step losses."""
    events = list(train(config, run_dir=run_dir, **kw))
    assert isinstance(events[-1], ev.Finished), events[-1]
    return [e.loss for e in events if isinstance(e, ev.StepMetrics)]


def caches_match_and_resume_is_exact(config: RunConfig, tmp_path: Path) -> None:
    """``config`` (4 steps, no caches) trains to the same losses with the latent and text caches on, and 2 steps +
    resume + 2 equal 4 straight (the flow timesteps and noise are seeded by step)."""
    plain = train_losses(config, tmp_path / "plain")
    cached_cfg = config.with_overrides({"data.cache_latents": True, "data.cache_text_embeddings": True})
    cached = train_losses(cached_cfg, tmp_path / "cached")
    assert cached == pytest.approx(plain, rel=1e-4, abs=1e-5)
    first = train_losses(cached_cfg.with_overrides({"train.max_steps": 2, "checkpoint.every_steps": 2}),
                         tmp_path / "resumed")
    rest = train_losses(cached_cfg.with_overrides({"checkpoint.every_steps": 2}), tmp_path / "resumed", resume=True)
    assert first + rest == pytest.approx(cached, rel=1e-5, abs=1e-6)


def logged_losses(run: Path) -> list[float]:
    """The train losses a run folder's metrics.jsonl holds (a run trained through the CLI)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in rows if r.get("kind") == "train" and "loss" in r]


def overfit_lora_keys(run: Path, losses: list[float], parts: tuple[str, ...]) -> list[str]:
    """The tiny batch was learned (the last 5 losses' mean under 85 % of the first 5's) and step 30's checkpoint
    holds only the transformer's LoRA, on every module of ``parts``; its keys."""
    first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
    assert last < 0.85 * first, (first, last)
    with safe_open(str(run / "checkpoints" / "step-00000030" / "model.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    assert keys and all(k.startswith("transformer.") and ".lora_" in k for k in keys)
    for part in parts:
        assert f"transformer.{part}.lora_A.weight" in keys, part
    return keys


def export_loras(run: Path, family: str, tmp_path: Path, *, kohya: bool = True) -> SimpleNamespace:
    """The run's diffusers LoRA (fp32, ``tmp_path / "lora.safetensors"``, every key the transformer's) and kohya
    LoRA (fp16): ``source``, ``family``, ``meta`` (the diffusers file's metadata), ``kmeta`` / ``kkeys`` (the
    kohya file's metadata and keys)."""
    from sdstudio.core.export.formats import writer_for
    from sdstudio.core.export.source import load_export_source

    source = load_export_source(run)
    fam = get_family(family)
    path = writer_for("diffusers", fam)(source, tmp_path / "lora.safetensors", dtype=torch.float32)
    with safe_open(str(path), "pt") as fh:
        meta, keys = fh.metadata(), list(fh.keys())
    assert keys and all(k.startswith("transformer.") for k in keys)
    out = SimpleNamespace(source=source, family=fam, meta=meta, kmeta=None, kkeys=[])
    if kohya:
        kpath = writer_for("kohya", fam)(source, tmp_path / "kohya.safetensors", dtype=torch.float16)
        with safe_open(str(kpath), "pt") as fh:
            out.kmeta, out.kkeys = fh.metadata(), list(fh.keys())
    return out


def lora_in_pipeline(run: Path, folder: Path, pipeline_cls: Any, denoiser_cls: Any, lora_dir: Path) -> SimpleNamespace:
    """The trained run's denoiser (``want``) against the family's diffusers pipeline of ``folder`` with the exported
    ``lora_dir / "lora.safetensors"`` loaded (``got``) and without it (``base``), on the same seeded noisy
    latents and the run's conditioning (``cond``) of two captions; ``pipe``: the pipeline with the LoRA."""
    from sdstudio.core.sampling.from_run import load_trained

    trained_model = load_trained(run, use_ema=False, device="cpu")
    pipe = pipeline_cls.from_pretrained(str(folder), local_files_only=True)
    pipe.load_lora_weights(str(lora_dir), weight_name="lora.safetensors")
    x, t = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0.3, 0.8])
    cond = trained_model.bundle.encode_captions(["a red circle", "a blue square"], CPU)
    with torch.no_grad():
        want = trained_model.bundle.trainable(x, t, cond)
        got = denoiser_cls(pipe.transformer)(x, t, cond)
        base = denoiser_cls(pipeline_cls.from_pretrained(str(folder), local_files_only=True).transformer)(x, t, cond)
    return SimpleNamespace(want=want, got=got, base=base, pipe=pipe, cond=cond)


def sample_with_exported_lora(run: Path, folder: Path, family: str, tmp_path: Path, *, steps: int,
                              guidance: float) -> SimpleNamespace:
    """`sdstudio sample` of a model folder with and without the run's exported diffusers LoRA (3 steps): the
    family's preview defaults (``steps``, ``guidance``), the model's native size (its VAE config's sample_size), the
    LoRA and the guidance scale each change the image. Returns ``source``, ``lora``, ``plain`` (the model without
    the LoRA) and ``image`` (its image of "a red circle", seed 0)."""
    from sdstudio.core.export.formats import writer_for
    from sdstudio.core.export.source import load_export_source
    from sdstudio.core.sampling.from_files import load_model

    source = load_export_source(run)
    lora = writer_for("diffusers", get_family(family))(source, tmp_path / "l.safetensors", dtype=torch.float32)
    plain = load_model(folder, device="cpu")
    assert plain.kind == family and plain.defaults["steps"] == steps and plain.defaults["guidance"] == guidance
    a = plain.generate(["a red circle"], [0], steps=3)
    with_lora = load_model(folder, lora=lora, device="cpu")
    assert with_lora.lora_modules > 0
    b = with_lora.generate(["a red circle"], [0], steps=3)
    assert a.shape == b.shape == (1, 64, 64, 3)
    assert (a != b).any()
    assert not (plain.generate(["a red circle"], [0], steps=3, guidance=1.0) == a).all()  # guidance matters
    return SimpleNamespace(source=source, lora=lora, plain=plain, image=a)
