"""Text-encoder training for SD1 / SDXL on tiny models: a peft LoRA on the text encoder(s) (lora.text_encoder)
and a full fine-tune of them (train.train_text_encoder). The adapters train at train.text_encoder_lr and leave
the UNet LoRA as it was; the loss falls; resume is exact; the kohya file has the real lora_te_ / lora_te1_ /
lora_te2_ names and alpha, and both LoRA files change the text encoders of diffusers' own pipeline exactly as
training did; a full fine-tune's single file carries the trained text encoder(s)."""

from __future__ import annotations

import re
import statistics
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sdstudio.core import events as ev
from sdstudio.core.control import TrainingControl
from sdstudio.core.errors import CheckpointError
from sdstudio.core.export.api import export
from sdstudio.core.models.sd.model import build_sd_model
from sdstudio.core.runs import read_metrics
from sdstudio.core.sampling.from_run import load_trained
from sdstudio.core.train.loop import train
from tests.sd_helpers import losses, sd_config

CPU = torch.device("cpu")
PROMPTS = ["a red circle on white", "a blue square"]


def te_lora_config(model: Path, data: Path, sdxl: bool = False, **overrides):
    base = {"train.max_steps": 3, "train.learning_rate": 2e-2, "lora.rank": 4, "lora.alpha": 2.0,
            "lora.targets": "attention_ff", "lora.text_encoder": True}
    return sd_config("sdxl-lora" if sdxl else "sd15-lora", model, data, **{**base, **overrides})


def run_to_end(config, run: Path) -> list[ev.Event]:
    events = list(train(config, run_dir=run))
    assert isinstance(events[-1], ev.Finished), events[-1]
    return events


def checkpoint_weights(run: Path, step: int, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step-{step:08d}" / name))


def part(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1:]: v for k, v in weights.items() if k.startswith(f"{prefix}.")}


def text_outputs(bundle_or_pipe, ids: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Last hidden states (+ SDXL's second encoder's projected pooled output) for token ids."""
    te2 = getattr(bundle_or_pipe, "text_encoder_2", None)
    with torch.no_grad():
        out = [bundle_or_pipe.text_encoder(ids["input_ids"])[0]]
        if te2 is not None:
            out.append(te2(ids["input_ids_2"])[0])
    return out


def base_pipeline(model: Path, sdxl: bool):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    return cls.from_pretrained(str(model), local_files_only=True)


# -- the LoRA trains at its own learning rate, the UNet LoRA is untouched -------------------------------------
def test_text_encoder_lora_trains_at_its_learning_rate(tiny_sd1: Path, four_images: Path, tmp_path: Path) -> None:
    from peft.utils import get_peft_model_state_dict

    from sdstudio.core.train.session import TrainingSession

    cfg = te_lora_config(tiny_sd1, four_images, **{"train.learning_rate": 1e-3, "train.text_encoder_lr": 1e-4,
                                                   "train.max_steps": 1, "train.max_grad_norm": 0.0})
    plain = cfg.with_overrides({"lora.text_encoder": False})

    # the UNet LoRA is initialised exactly as without a text-encoder LoRA; the adapters are fp32 and trainable
    with_te, without = build_sd_model(cfg, CPU), build_sd_model(plain, CPU)
    unet_a = get_peft_model_state_dict(with_te.components.unet)
    unet_b = get_peft_model_state_dict(without.components.unet)
    assert unet_a.keys() == unet_b.keys() and all(torch.equal(unet_a[k], unet_b[k]) for k in unet_a)
    trainable = {n: p for n, p in with_te.trainable.named_parameters() if p.requires_grad}
    te_names = [n for n in trainable if n.startswith("text_encoder.")]
    assert te_names and all(".lora_A.default." in n or ".lora_B.default." in n for n in te_names)
    assert all(trainable[n].dtype == torch.float32 for n in te_names)
    targets = {n.split(".lora_")[0].rsplit(".", 1)[1] for n in te_names}
    assert targets == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    assert not any(p.requires_grad for n, p in with_te.trainable.named_parameters() if ".lora_" not in n)
    assert not [n for n, p in without.trainable.named_parameters() if n.startswith("text_encoder")]
    te_init = get_peft_model_state_dict(with_te.components.text_encoder)

    # the optimizer's text-encoder group holds exactly the text-encoder adapters, at train.text_encoder_lr
    session = TrainingSession(cfg, run_dir=None, resume=False)
    session.prepare_data()
    session.build()
    groups = {g["name"]: g for g in session.optimizer.param_groups}
    assert groups["text_encoder"]["base_lr"] == 1e-4 and groups["model"]["base_lr"] == 1e-3
    te_ids = {id(p) for n, p in session.bundle.trainable.named_parameters()
              if n.startswith("text_encoder.") and p.requires_grad}
    assert {id(p) for p in groups["text_encoder"]["params"]} == te_ids
    assert not te_ids & {id(p) for p in groups["model"]["params"]}

    # One Adam step from lora_B = 0 moves every lora_B element by (almost exactly) its group's learning rate
    run_to_end(cfg, tmp_path / "run")
    weights = checkpoint_weights(tmp_path / "run", 1)
    te, unet = part(weights, "text_encoder"), part(weights, "unet")
    assert te.keys() == te_init.keys() and unet.keys() == unet_b.keys()
    te_b = torch.cat([v.flatten() for k, v in te.items() if ".lora_B." in k]).abs()
    unet_b_max = max(float(v.abs().max()) for k, v in unet.items() if ".lora_B." in k)
    assert float(te_b.max()) == pytest.approx(1e-4, rel=1e-3) and unet_b_max == pytest.approx(1e-3, rel=1e-3)
    assert float((te_b > 0).float().mean()) > 0.9, "every text-encoder adapter got a gradient"


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_text_encoder_lora_changes_and_every_adapter_learns(family: str, tiny_sd1: Path, tiny_sdxl: Path,
                                                            four_images: Path, tmp_path: Path) -> None:
    from peft.utils import get_peft_model_state_dict

    sdxl = family == "sdxl"
    cfg = te_lora_config(tiny_sdxl if sdxl else tiny_sd1, four_images, sdxl)
    init = build_sd_model(cfg, CPU)
    run_to_end(cfg, tmp_path / "run")
    weights = checkpoint_weights(tmp_path / "run", 3)
    for name, module in init.text_encoders().items():
        before, after = get_peft_model_state_dict(module), part(weights, name)
        assert before.keys() == after.keys() and before
        for key in after:
            assert not torch.equal(before[key], after[key]), f"{name}.{key} did not train"
        layers = {int(m.group(1)) for k in after if (m := re.search(r"layers\.(\d+)\.", k))}
        if sdxl and name == "text_encoder":
            # SDXL uses the first encoder's penultimate states: its last layer never reaches the loss, so it
            # gets no adapter (no parameter without a gradient under DDP), as kohya's sdxl_train freezes it
            assert layers == {0, 1, 2, 3}
        else:
            assert layers == {0, 1, 2, 3, 4}
    assert set(k.split(".")[0] for k in weights) == ({"unet", "text_encoder", "text_encoder_2"} if sdxl
                                                     else {"unet", "text_encoder"})


def test_loss_falls_with_a_text_encoder_lora(tiny_sd1: Path, four_images: Path, tmp_path: Path) -> None:
    cfg = te_lora_config(tiny_sd1, four_images, **{"train.learning_rate": 1e-2, "lora.alpha": 8.0,
                                                   "lora.targets": "all", "train.max_steps": 30})
    values = losses(cfg, tmp_path / "run")
    first, last = statistics.mean(values[:5]), statistics.mean(values[-5:])
    assert last < 0.75 * first, (first, last)  # measured: ~0.93 -> ~0.43


def test_resume_with_a_text_encoder_lora_is_exact(tiny_sd1: Path, four_images: Path, tmp_path: Path) -> None:
    """4 steps straight == 2, stop, resume, 2: same losses, bit-identical adapters and EMA (text encoder too)."""
    cfg = te_lora_config(tiny_sd1, four_images, **{"train.max_steps": 4, "train.ema": True,
                                                   "data.caption_dropout": 0.3, "train.text_encoder_lr": 5e-3})
    run_to_end(cfg, tmp_path / "straight")
    control = TrainingControl()
    split = tmp_path / "split"
    first = []
    for event in train(cfg, control, run_dir=split):
        first.append(event)
        if isinstance(event, ev.StepMetrics) and event.step == 2:
            control.request_stop()
    assert isinstance(first[-1], ev.Finished) and first[-1].reason == "stopped"
    second = list(train(cfg, run_dir=split, resume=True))
    assert isinstance(second[-1], ev.Finished) and second[-1].reason == "completed", second[-1]

    def train_losses(run: Path) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"}

    assert train_losses(split) == train_losses(tmp_path / "straight")
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = checkpoint_weights(tmp_path / "straight", 4, name), checkpoint_weights(split, 4, name)
        assert a.keys() == b.keys() and any(k.startswith("text_encoder.") for k in a), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
    ema = checkpoint_weights(split, 4, "ema.safetensors")
    key = "text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert key in ema, "EMA tracks the text-encoder adapters"
    # --ema exports the EMA of the text-encoder adapters too
    kohya = export(split, "kohya", tmp_path / "ema.safetensors", dtype=torch.float32, use_ema=True)
    with safe_open(str(kohya), "pt") as fh:
        down = fh.get_tensor("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight")
    assert torch.equal(down, ema[key])


def test_checkpoints_must_match_the_text_encoder_setting(tiny_sd1: Path, four_images: Path) -> None:
    cfg = te_lora_config(tiny_sd1, four_images)
    with_te = build_sd_model(cfg, CPU)
    state = with_te.trainable_state()
    unet_only = {k: v for k, v in state.items() if k.startswith("unet.")}
    plain = build_sd_model(cfg.with_overrides({"lora.text_encoder": False}), CPU)
    plain.load_trainable_state(unet_only, Path("old"))  # a checkpoint from before text-encoder training
    with pytest.raises(CheckpointError, match="text_encoder"):
        plain.load_trainable_state(state, Path("x"))
    with pytest.raises(CheckpointError, match="no text_encoder weights"):
        build_sd_model(cfg, CPU).load_trainable_state(unet_only, Path("x"))
    with pytest.raises(CheckpointError, match="do not fit this model's unet.*lora.rank"):  # not torch's page of it
        build_sd_model(cfg.with_overrides({"lora.rank": 2 * cfg.lora.rank}), CPU).load_trainable_state(state, Path("x"))
    again = build_sd_model(cfg, CPU)
    again.load_trainable_state(state, Path("x"))
    restored = again.trainable_state()
    assert restored.keys() == state.keys() and all(torch.equal(v, restored[k]) for k, v in state.items())


# -- exports -------------------------------------------------------------------------------------------------
def _apply_kohya_by_hand(text_encoder: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str) -> int:
    """W += (alpha / rank) * up @ down for every kohya module of ``prefix``; returns how many were applied."""
    applied = 0
    with torch.no_grad():
        for name, module in text_encoder.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            path = name if name.startswith("text_model.") else f"text_model.{name}"
            key = f"{prefix}_{path.replace('.', '_')}"
            if f"{key}.lora_down.weight" not in tensors:
                continue
            down, up = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"]
            module.weight += float(tensors[f"{key}.alpha"]) / down.shape[0] * (up @ down)
            applied += 1
    return applied


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_lora_exports_carry_the_text_encoders(family: str, tiny_sd1: Path, tiny_sdxl: Path, four_images: Path,
                                              tmp_path: Path) -> None:
    from tests.test_export_lora import unet_output

    sdxl = family == "sdxl"
    model = tiny_sdxl if sdxl else tiny_sd1
    run = tmp_path / "run"
    run_to_end(te_lora_config(model, four_images, sdxl), run)
    loaded = load_trained(run)
    ids = loaded.bundle.token_ids(PROMPTS, CPU)
    trained = text_outputs(loaded.bundle.components, ids)
    trained_unet = unet_output(loaded.bundle.components.unet, sdxl)
    base = text_outputs(base_pipeline(model, sdxl), ids)
    for got, want in zip(trained, base):
        assert not torch.allclose(got, want, atol=1e-3), "the LoRA must change the text encoders to mean much"
    # sampling conditions on the trained encoder(s)
    cond = loaded.bundle.encode_captions(PROMPTS, CPU)
    if not sdxl:
        assert torch.equal(cond["encoder_hidden_states"], trained[0])
    else:
        assert torch.equal(cond["text_embeds"], trained[1])

    kohya = export(run, "kohya", tmp_path / "kohya.safetensors", dtype=torch.float32)
    diffusers_file = export(run, "diffusers", tmp_path / "diffusers.safetensors", dtype=torch.float32)
    with safe_open(str(kohya), "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        meta = fh.metadata()
    names = [f"lora_te1_text_model_encoder_layers_0_self_attn_{p}_proj" for p in "qkv"] if sdxl else \
        [f"lora_te_text_model_encoder_layers_0_self_attn_{p}_proj" for p in "qkv"]
    if sdxl:
        names += ["lora_te1_text_model_encoder_layers_3_mlp_fc2", "lora_te2_text_model_encoder_layers_4_mlp_fc1",
                  "lora_te2_text_model_encoder_layers_0_self_attn_out_proj"]
        assert not any(k.startswith(("lora_te_", "lora_te1_text_model_encoder_layers_4_")) for k in tensors)
    else:
        names += ["lora_te_text_model_encoder_layers_4_self_attn_out_proj",
                  "lora_te_text_model_encoder_layers_0_mlp_fc1"]
        assert not any(k.startswith(("lora_te1_", "lora_te2_")) for k in tensors)
    for name in names:
        for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
            assert name + suffix in tensors, name + suffix
        assert tensors[name + ".lora_down.weight"].shape[0] == 4 and tensors[name + ".alpha"].ndim == 0
    assert {float(v) for k, v in tensors.items() if k.endswith(".alpha")} == {2.0}, "the trained alpha"
    assert not any("encoder_layers" in k and "text_model" not in k for k in tensors), "transformers-5 names"
    assert meta["ss_network_train_unet_only"] == "False" and meta["ss_text_encoder_lr"] == "0.02"
    assert meta["sdstudio_text_encoder_trained"] == "True"

    # kohya's deltas applied by hand to the base encoders reproduce the trained ones
    pipe = base_pipeline(model, sdxl)
    prefixes = {"text_encoder": "lora_te1" if sdxl else "lora_te", "text_encoder_2": "lora_te2"}
    for name, module in loaded.bundle.text_encoders().items():
        n_modules = len({k.rsplit(".", 2)[0] for k in tensors if k.startswith(prefixes[name] + "_")})
        assert _apply_kohya_by_hand(getattr(pipe, name), tensors, prefixes[name]) == n_modules > 0
    for got, want in zip(text_outputs(pipe, ids), trained):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()

    with safe_open(str(diffusers_file), "pt") as fh:
        diff_keys = list(fh.keys())
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in diff_keys
    assert ("text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_B.weight" in diff_keys) == sdxl
    # a consumer no one here wrote: diffusers' load_lora_weights (it reads both files; its text-encoder path
    # goes through transformers' load_adapter, which works with peft 0.21) gives the trained encoders and UNet
    for path in (kohya, diffusers_file):
        consumer = base_pipeline(model, sdxl)
        consumer.load_lora_weights(str(path.parent), weight_name=path.name)
        for got, want in zip(text_outputs(consumer, ids), trained):
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), f"{path.name}: {(got - want).abs().max()}"
        assert torch.allclose(unet_output(consumer.unet, sdxl), trained_unet, atol=1e-5, rtol=1e-4), path.name


def test_text_encoder_lora_is_merged_into_full_exports(tiny_sd1: Path, four_images: Path, tmp_path: Path) -> None:
    from sdstudio.core.models.sd.files import load_sd_components

    run = tmp_path / "run"
    run_to_end(te_lora_config(tiny_sd1, four_images), run)
    loaded = load_trained(run)
    ids = loaded.bundle.token_ids(PROMPTS, CPU)
    trained = text_outputs(loaded.bundle.components, ids)
    single = export(run, "single-file", tmp_path / "merged.safetensors", dtype=torch.float32)
    folder = export(run, "diffusers-folder", tmp_path / "folder", dtype=torch.float32)
    for merged in (load_sd_components(single, family="sd1", config_folder=tiny_sd1),
                   load_sd_components(folder, family="sd1")):
        assert torch.allclose(text_outputs(merged, ids)[0], trained[0], atol=1e-5, rtol=1e-4)
        assert not any("lora" in k for k in merged.text_encoder.state_dict())


# -- full fine-tune of the text encoder(s) ------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_full_finetune_trains_the_text_encoders_and_exports_them(family: str, tiny_sd1: Path, tiny_sdxl: Path,
                                                                  four_images: Path, tmp_path: Path) -> None:
    from sdstudio.core.models.sd.files import load_sd_components

    sdxl = family == "sdxl"
    model = tiny_sdxl if sdxl else tiny_sd1
    cfg = sd_config("sd15-full", model, four_images, **{"model.family": family, "train.max_steps": 2,
                                                         "train.learning_rate": 1e-3, "train.ema": False,
                                                         "train.gradient_checkpointing": False,
                                                         "train.train_text_encoder": True})
    run = tmp_path / "run"
    run_to_end(cfg, run)
    weights = checkpoint_weights(run, 2)
    base = load_sd_components(model, family=family)
    single = export(run, "single-file", tmp_path / "model.safetensors", dtype=torch.float32)
    from_file = load_sd_components(single, family=family, config_folder=model)
    for name in ("text_encoder", "text_encoder_2") if sdxl else ("text_encoder",):
        trained, original = part(weights, name), getattr(base, name).state_dict()
        assert trained.keys() == original.keys()
        changed = {k for k in trained if not torch.equal(trained[k], original[k])}
        assert any("layers.0.self_attn.q_proj" in k for k in changed), f"{name} did not train"
        if sdxl and name == "text_encoder":  # frozen: its last layer and final norm never reach the loss
            assert not any("layers.4." in k or "final_layer_norm" in k for k in changed)
        exported = getattr(from_file, name).state_dict()
        for key, tensor in trained.items():
            assert torch.equal(exported[key], tensor), f"single file {name}.{key}"
    with safe_open(str(single), "pt") as fh:
        assert fh.metadata()["sdstudio_text_encoder_trained"] == "True"


def test_memory_estimate_counts_a_trained_text_encoder(tiny_sd1: Path, four_images: Path) -> None:
    from sdstudio.core.train.memory import estimate_memory

    cfg = sd_config("sd15-lora", tiny_sd1, four_images, **{"lora.rank": 4})
    te_cfg = cfg.with_overrides({"lora.text_encoder": True})
    without = estimate_memory(build_sd_model(cfg, CPU), cfg)
    with_lora = estimate_memory(build_sd_model(te_cfg, CPU), te_cfg)
    assert with_lora.gradients > without.gradients and with_lora.activations > without.activations
    full = sd_config("sd15-full", tiny_sd1, four_images, **{"train.ema": False})
    full_te = full.with_overrides({"train.train_text_encoder": True})
    assert estimate_memory(build_sd_model(full_te, CPU), full_te).gradients > \
        estimate_memory(build_sd_model(full, CPU), full).gradients


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_dtypes_under_mixed_precision(family: str, tiny_sd1: Path, tiny_sdxl: Path, four_images: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """With a 16-bit weight dtype (a GPU's bf16, imitated on the CPU): the text encoders' base weights are bf16,
    their adapters fp32, and a step under autocast sends gradients into every adapter."""
    from sdstudio.core.models.sd import model as sd

    monkeypatch.setattr(sd, "_weight_dtype", lambda config, device: torch.bfloat16)
    sdxl = family == "sdxl"
    cfg = te_lora_config(tiny_sdxl if sdxl else tiny_sd1, four_images, sdxl, **{"data.resolution": 32})
    bundle = build_sd_model(cfg, CPU)
    for name, module in bundle.text_encoders().items():
        for key, p in module.named_parameters():
            assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), f"{name}.{key}"
    cond = bundle.encode_batch({"captions": PROMPTS, "original_size": [(32, 32)] * 2,
                                "crop_top_left": [(0, 0)] * 2, "target_size": [(32, 32)] * 2}, CPU)
    assert "input_ids" in cond and ("time_ids" in cond) == sdxl
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = bundle.trainable(torch.randn(2, 4, 4, 4), torch.tensor([10, 500]), cond)
    pred.float().square().mean().backward()
    adapters = [(n, p) for n, p in bundle.trainable.named_parameters() if p.requires_grad and n.startswith("text")]
    assert adapters and all(p.grad is not None and p.grad.dtype == torch.float32 for _, p in adapters)
    # lora_B starts at zero, so only lora_B has a non-zero gradient at the first step
    assert all(p.grad.abs().sum() > 0 for n, p in adapters if ".lora_B." in n)


def test_a_fully_trained_text_encoder_starts_from_the_files_exact_weights(tiny_sd1: Path, four_images: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a 16-bit weight dtype the frozen modules are cast down, but a fully trained encoder must reach fp32
    straight from the file (a round trip through bf16 would change every tensor it checkpoints and exports)."""
    from sdstudio.core.models.sd import model as sd
    from sdstudio.core.models.sd.files import load_sd_components

    base = load_sd_components(tiny_sd1, family="sd1").text_encoder.state_dict()
    monkeypatch.setattr(sd, "_weight_dtype", lambda config, device: torch.bfloat16)
    cfg = sd_config("sd15-full", tiny_sd1, four_images, **{"train.train_text_encoder": True})
    trained = build_sd_model(cfg, CPU).text_encoders()["text_encoder"].state_dict()
    assert all(torch.equal(trained[k].float(), base[k].float()) and trained[k].dtype == torch.float32
               for k in base if base[k].is_floating_point())


def test_text_encoder_settings_of_the_other_mode_are_refused() -> None:
    from sdstudio.core.config import RunConfig
    from sdstudio.core.errors import ConfigError

    with pytest.raises(ConfigError, match="train.train_text_encoder.*lora.text_encoder"):
        RunConfig.from_dict({"model": {"family": "sd1"}, "lora": {"enabled": True},
                             "train": {"train_text_encoder": True}})
    with pytest.raises(ConfigError, match="lora.text_encoder.*train.train_text_encoder"):
        RunConfig.from_dict({"model": {"family": "sd1"}, "lora": {"text_encoder": True}})


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_sdxl_text_encoder_training_runs_under_ddp(mode: str, tiny_sdxl: Path, four_images: Path,
                                                   tmp_path: Path) -> None:
    """Two CPU ranks (torchrun, gloo): DDP refuses parameters that get no gradient, and SDXL's first encoder's
    last layer never reaches the loss; it is left out (LoRA) or frozen (full), so both ranks train in step."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun")
    cmd = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    overrides = {"model.family": "sdxl", "model.path": str(tiny_sdxl), "data.resolution": 64, "data.val_split": 0.0,
                 "data.caption_dropout": 0.0, "train.batch_size": 1, "train.max_steps": 3, "train.device": "cpu",
                 "train.learning_rate": 1e-3, "sample.every_steps": 0, "sample.every_epochs": 0,
                 "sample.at_end": False, "checkpoint.every_steps": 0}
    lora = {"lora.enabled": True, "lora.text_encoder": True, "lora.rank": 4, "lora.targets": "attention_ff"}
    overrides.update(lora if mode == "lora" else {"train.train_text_encoder": True})
    reports = tmp_path / "reports"
    reports.mkdir()
    script = Path(__file__).with_name("mp_train_script.py")
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.run(
        [*cmd, "--nproc_per_node", "2", "--master_port", "29541" if mode == "lora" else "29542", str(script),
         str(four_images), str(tmp_path / "run"), str(reports), json.dumps(overrides)],
        capture_output=True, text=True, timeout=400, env=env, cwd=repo)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    r0, r1 = (json.loads((reports / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == 2 and r0["step"] == r1["step"] == 3 and r0["digest"] == r1["digest"]


def test_sd2_text_encoder_lora_exports_kohya_keys_and_merges_into_the_openclip_layout(four_images: Path,
                                                                                       tmp_path: Path) -> None:
    """SD2's OpenCLIP text encoder (fused qkv in the original layout): its LoRA gets kohya's SD2 names and merges
    into the single file, which reads back with the trained encoder's outputs."""
    from safetensors import safe_open

    from sdstudio.core.models.sd.files import load_sd_components
    from tests.test_export_single_file import _save_sd2, tiny_sd2_components

    model = _save_sd2(tiny_sd2_components(), tmp_path / "sd2")
    run = tmp_path / "run"
    run_to_end(te_lora_config(model, four_images, **{"model.family": "sd2"}), run)
    loaded = load_trained(run)
    assert loaded.bundle.prediction_type == "v_prediction"
    ids = loaded.bundle.token_ids(PROMPTS, CPU)
    trained = text_outputs(loaded.bundle.components, ids)

    kohya = export(run, "kohya", tmp_path / "lora.safetensors", dtype=torch.float32)
    with safe_open(str(kohya), "pt") as fh:
        keys = set(fh.keys())
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha" in keys
    single = export(run, "single-file", tmp_path / "merged.safetensors", dtype=torch.float32)
    merged = load_sd_components(single, family="sd2", config_folder=model)
    assert torch.allclose(text_outputs(merged, ids)[0], trained[0], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(text_outputs(load_sd_components(model, family="sd2"), ids)[0], trained[0],
                              atol=1e-5, rtol=1e-4), "the LoRA changed the encoder"
