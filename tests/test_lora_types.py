"""lora.type = loha / lokr / dora / oft: each trains (the loss on one fixed batch falls), learns something other
than plain LoRA, resumes exactly, and its LyCORIS export (read back by sdstudio's own reader, which applies the
formulas A1111 / ComfyUI use) reproduces the trained UNet and text encoder."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sdstudio.core import events as ev
from sdstudio.core.control import TrainingControl
from sdstudio.core.export.api import export
from sdstudio.core.lora_tools.files import read_adapter_file
from sdstudio.core.lora_tools.ops import apply_adapter_file
from sdstudio.core.models.sd.model import build_sd_model
from sdstudio.core.runs.metrics import read_metrics
from sdstudio.core.sampling.from_run import load_trained
from sdstudio.core.train.loop import train
from tests.sd_helpers import sd_config
from tests.test_export_lora import unet_output

CPU = torch.device("cpu")
TYPES = ["loha", "lokr", "dora", "oft"]


def type_config(model: Path, data: Path, kind: str, **extra):
    return sd_config("sd15-lora", model, data, **{"lora.type": kind, "lora.rank": 4, "lora.alpha": 2.0,
                                                  "lora.oft_block_size": 8, "lora.targets": "attention_ff",
                                                  "train.max_steps": 3, "train.learning_rate": 1e-2, **extra})


def fixed_batch_losses(cfg, steps: int = 6) -> tuple[list[float], torch.Tensor]:
    """Adam on one fixed (noisy latents, timesteps, conditioning) batch; the losses and the final output."""
    bundle = build_sd_model(cfg, CPU)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    target = torch.randn(2, 4, 8, 8, generator=gen)
    cond = {"encoder_hidden_states": torch.randn(2, 77, 32, generator=gen)}
    t = torch.tensor([300, 600])
    params = [p for p in bundle.trainable.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    values = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(bundle.trainable(x, t, cond), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        values.append(float(loss.detach()))
    with torch.no_grad():
        return values, bundle.trainable(x, t, cond)


def test_every_adapter_type_trains_and_differs_from_lora(tiny_sd1: Path, four_images: Path) -> None:
    outputs = {}
    for kind in ["lora", *TYPES]:
        values, outputs[kind] = fixed_batch_losses(type_config(tiny_sd1, four_images, kind))
        # falls at every step (LoHa slowest: one factor of each product starts at zero, measured 1.238 -> 1.197)
        assert all(b < a for a, b in itertools.pairwise(values)) and values[-1] < 0.98 * values[0], (kind, values)
    for kind in TYPES:
        assert not torch.allclose(outputs[kind], outputs["lora"], atol=1e-4), kind
    # the adapters are the peft kinds asked for
    names = {kind: [n for n, p in build_sd_model(type_config(tiny_sd1, four_images, kind), CPU).trainable
                    .named_parameters() if p.requires_grad] for kind in TYPES}
    assert any(".hada_w1_a." in n for n in names["loha"]) and any(".lokr_w1." in n for n in names["lokr"])
    assert any(".lora_magnitude_vector." in n for n in names["dora"]) and any(".oft_R." in n for n in names["oft"])


def _apply_to_base(model: Path, file: Path, family: str = "sd1"):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(str(model), subfolder="unet")
    te = CLIPTextModel.from_pretrained(str(model), subfolder="text_encoder")
    applied = apply_adapter_file(read_adapter_file(file), {"unet": unet, "text_encoder": te}, family=family)
    return unet, te, applied


@pytest.mark.parametrize("kind", TYPES)
def test_lycoris_export_reproduces_the_trained_model(kind: str, tiny_sd1: Path, four_images: Path,
                                                     tmp_path: Path) -> None:
    """Exported with UNet + text-encoder adapters, read back, merged into the base: same outputs (fp32,
    atol 1e-5) as the trained peft model."""
    cfg = type_config(tiny_sd1, four_images, kind, **{"lora.text_encoder": True})
    run = tmp_path / "run"
    assert isinstance(list(train(cfg, run_dir=run))[-1], ev.Finished)
    loaded = load_trained(run).bundle
    trained = unet_output(loaded.components.unet, False)
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        trained_te = loaded.components.text_encoder(ids)[0]
    out = export(run, "kohya", tmp_path / f"{kind}.safetensors", dtype=torch.float32)
    with safe_open(str(out), "pt") as fh:
        keys, meta = list(fh.keys()), fh.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya"
    marker = {"loha": ".hada_w1_a", "lokr": ".lokr_w1", "dora": ".dora_scale", "oft": ".diff"}[kind]
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0") and k.endswith(marker) for k in keys)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0") and k.endswith(marker) for k in keys)
    unet, te, applied = _apply_to_base(tiny_sd1, out)
    assert applied == len({k.split(".")[0] for k in keys if not k.endswith(".alpha")})
    got = unet_output(unet, False)
    base = unet_output(type(unet).from_pretrained(str(tiny_sd1), subfolder="unet"), False)
    assert not torch.allclose(got, base, atol=1e-4), "the adapter changed the model"
    assert torch.allclose(got, trained, atol=1e-5, rtol=1e-4), (got - trained).abs().max()
    with torch.no_grad():
        assert torch.allclose(te(ids)[0], trained_te, atol=1e-5, rtol=1e-4)


def test_diffusers_loads_a_dora_export(tiny_sd1: Path, four_images: Path, tmp_path: Path) -> None:
    from tests.test_export_lora import consumer_output

    run = tmp_path / "run"
    list(train(type_config(tiny_sd1, four_images, "dora"), run_dir=run))
    trained = unet_output(load_trained(run).bundle.components.unet, False)
    out = export(run, "diffusers", tmp_path / "dora.safetensors", dtype=torch.float32)
    got = consumer_output(tiny_sd1, out, False)
    assert torch.allclose(got, trained, atol=1e-5, rtol=1e-4), (got - trained).abs().max()
    with pytest.raises(Exception, match="diffusers loads LoRA and DoRA"):
        run2 = tmp_path / "run2"
        list(train(type_config(tiny_sd1, four_images, "loha"), run_dir=run2))
        export(run2, "diffusers", tmp_path / "loha.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["oft"])
def test_resume_with_an_adapter_type_is_exact(kind: str, tiny_sd1: Path, four_images: Path, tmp_path: Path) -> None:
    cfg = type_config(tiny_sd1, four_images, kind, **{"train.max_steps": 4, "train.ema": True})
    list(train(cfg, run_dir=tmp_path / "straight"))
    control = TrainingControl()
    split = tmp_path / "split"
    for event in train(cfg, control, run_dir=split):
        if isinstance(event, ev.StepMetrics) and event.step == 2:
            control.request_stop()
    assert isinstance(list(train(cfg, run_dir=split, resume=True))[-1], ev.Finished)

    def losses(run: Path) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"}

    assert losses(split) == losses(tmp_path / "straight") and len(losses(split)) == 4
    a = export(tmp_path / "straight", "kohya", tmp_path / "a.safetensors", dtype=torch.float32, use_ema=True)
    b = export(split, "kohya", tmp_path / "b.safetensors", dtype=torch.float32, use_ema=True)
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        assert all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())  # noqa: SIM118


def test_lokr_factor_decompose_both_and_oft_block_size_shape_the_adapter() -> None:
    """lora.factor / lora.decompose_both / lora.oft_block_size reach peft: the trained tensors change shape."""
    from peft.utils import get_peft_model_state_dict

    from sdstudio.core.models.adapters import peft_adapter_config
    from tests.tiny_models import tiny_sd1_components

    def shapes(**lora) -> dict[str, tuple[int, ...]]:
        unet = tiny_sd1_components()["unet"]
        unet.add_adapter(peft_adapter_config({"rank": 2, "alpha": 2.0, **lora}, ["to_q"]))
        state = get_peft_model_state_dict(unet)
        prefix = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q."
        return {k[len(prefix):]: tuple(v.shape) for k, v in state.items() if k.startswith(prefix)}

    assert shapes(type="lokr") == {"lokr_w1": (4, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8)}  # 32 = 4 x 8
    assert shapes(type="lokr", factor=2) == {"lokr_w1": (2, 2), "lokr_w2_a": (16, 2), "lokr_w2_b": (2, 16)}
    # peft factors the small matrix only when the rank is below half its size
    assert set(shapes(type="lokr", rank=1)) == {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}
    assert set(shapes(type="lokr", rank=1, decompose_both=True)) == {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a",
                                                                     "lokr_w2_b"}
    assert shapes(type="oft", oft_block_size=8)["oft_R.weight"] == (4, 28)  # 4 blocks of 8: 8 * 7 / 2 values
    assert shapes(type="oft", oft_block_size=4)["oft_R.weight"] == (8, 6)


@pytest.mark.parametrize("kind", TYPES)
def test_sdxl_adapter_types_train_and_export_reproduces_the_trained_model(kind: str, tiny_sdxl: Path,
                                                                          four_images: Path, tmp_path: Path) -> None:
    """SDXL: each type trains the UNet and both text encoders (the loss moves off the base model's), exported in
    LyCORIS keys (SDXL's original UNet block names, lora_te1_ / lora_te2_) that give the trained outputs."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cfg = sd_config("sdxl-lora", tiny_sdxl, four_images, **{
        "lora.type": kind, "lora.rank": 4, "lora.alpha": 2.0, "lora.oft_block_size": 8,
        "lora.targets": "attention_ff", "lora.text_encoder": True, "train.max_steps": 3,
        "train.learning_rate": 1e-2})
    run = tmp_path / "run"
    events = list(train(cfg, run_dir=run))
    assert isinstance(events[-1], ev.Finished), events[-1]
    loaded = load_trained(run).bundle
    trained = unet_output(loaded.components.unet, True)
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        trained_te = [loaded.components.text_encoder(ids)[0], loaded.components.text_encoder_2(ids)[0]]
    out = export(run, "kohya", tmp_path / f"{kind}.safetensors", dtype=torch.float32)
    with safe_open(str(out), "pt") as fh:
        keys = list(fh.keys())
    marker = {"loha": ".hada_w1_a", "lokr": ".lokr_w1", "dora": ".dora_scale", "oft": ".diff"}[kind]
    assert any(k.startswith("lora_unet_input_blocks_") and k.endswith(marker) for k in keys), keys[:4]
    for prefix in ("lora_te1_text_model_encoder_layers_0", "lora_te2_text_model_encoder_layers_0"):
        assert any(k.startswith(prefix) and k.endswith(marker) for k in keys), prefix
    unet = UNet2DConditionModel.from_pretrained(str(tiny_sdxl), subfolder="unet")
    te1 = CLIPTextModel.from_pretrained(str(tiny_sdxl), subfolder="text_encoder")
    te2 = CLIPTextModelWithProjection.from_pretrained(str(tiny_sdxl), subfolder="text_encoder_2")
    base = unet_output(unet, True)
    applied = apply_adapter_file(read_adapter_file(out), {"unet": unet, "text_encoder": te1, "text_encoder_2": te2},
                                 family="sdxl")
    assert applied == len({k.split(".")[0] for k in keys if not k.endswith(".alpha")})
    got = unet_output(unet, True)
    assert not torch.allclose(got, base, atol=1e-4), "training moved the UNet"
    assert torch.allclose(got, trained, atol=1e-5, rtol=1e-4), (got - trained).abs().max()
    with torch.no_grad():
        assert torch.allclose(te1(ids)[0], trained_te[0], atol=1e-5, rtol=1e-4)
        assert torch.allclose(te2(ids)[0], trained_te[1], atol=1e-5, rtol=1e-4)
