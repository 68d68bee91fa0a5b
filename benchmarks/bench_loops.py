"""The loops benchmarks/gpu_train.py measures, each built with random weights at real size (or tiny, for a CPU):

- ``baseline_loop``: plain diffusers + peft, trained the way diffusers' example scripts train (SDPA, TF32 on,
  AdamW (foreach), clipping at 1.0; full fine-tune = fp32 UNet under bf16 autocast; LoRA = UNet frozen in bf16,
  peft LoRA r16 on to_q/to_k/to_v/to_out.0 with fp32 adapters); latents, noise and text states on the GPU.
- ``sdstudio_loop``: a real ``TrainingSession`` from the workload's preset (``build()``, ``optimizer_step()``),
  fed a batch in the shape its latent cache and text-embedding cache produce (CPU features, pinned as the
  loader pins them). Only the checkpoint loader is replaced: random-weight components stand in for a file.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch

GIB = 2**30
TEXT_TOKENS = 77


@dataclass(frozen=True)
class Workload:
    name: str
    preset: str
    family: str  # sd1 | sdxl | flux
    lora: bool
    batch: int
    resolution: int
    tiny_batch: int = 2
    default: bool = True
    missing: str = ""  # why it cannot be measured yet (recorded in the JSON instead)


WORKLOADS = {w.name: w for w in (
    Workload("sd15-lora-b16", "sd15-lora", "sd1", lora=True, batch=16, resolution=512),
    Workload("sd15-full-b16", "sd15-full", "sd1", lora=False, batch=16, resolution=512),
    Workload("sdxl-lora-b8", "sdxl-lora", "sdxl", lora=True, batch=8, resolution=1024),
    Workload("flux-lora", "flux-lora", "flux", lora=True, batch=1, resolution=1024,
             missing="no random-weight Flux builder and no plain-diffusers Flux baseline loop in this benchmark yet"),
    # opt-in (--only sdxl-full-b8): needs ~100 GiB at batch 8, more than an H100 has
    Workload("sdxl-full-b8", "sdxl-lora", "sdxl", lora=False, batch=8, resolution=1024, default=False),
)}

# What the sdstudio side changes in each preset: the baseline has no gradient checkpointing and no EMA, so
# neither has sdstudio here (``--set train.gradient_checkpointing=true`` measures them). Everything else
# (optimizer, loss with Min-SNR, channels_last, fused AdamW, accelerate autocast) is the preset's own.
SDSTUDIO_OVERRIDES: dict[str, Any] = {
    "train.gradient_checkpointing": False, "train.ema": False, "train.device": "auto",
    "data.cache_latents": True, "data.cache_text_embeddings": True, "data.num_workers": 0,
    "model.path": "random-weights", "data.path": "",  # empty: the bundled demo set, only scanned for build()
}


# -- models with random weights ------------------------------------------------------------------------------
def _tiny_builders():  # -> (tiny_sd1_components, tiny_sdxl_components)
    """The test suite's tiny-model builders (tests/tiny_models.py, not part of the package), loaded by path:
    this script always runs from a checkout."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "tests" / "tiny_models.py"
    spec = importlib.util.spec_from_file_location("sdstudio_tiny_models", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tiny_sd1_components, module.tiny_sdxl_components


def random_components(family: str, tiny: bool, device: torch.device):  # -> SDComponents
    """UNet, VAE, text encoder(s) and tokenizer(s) with random weights: real sizes, or tiny ones for a CPU."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdstudio.core.models.sd.files import SDComponents
    from sdstudio.core.models.sd.offline import config_folder, config_folder_tokenizers
    tiny_sd1_components, tiny_sdxl_components = _tiny_builders()

    if tiny:
        parts = (tiny_sdxl_components if family == "sdxl" else tiny_sd1_components)(seed=0)
        for key in ("unet", "vae", "text_encoder", "text_encoder_2"):
            if key in parts:
                parts[key] = parts[key].to(device)
        scheduler_config = dict(parts["scheduler"].config)
    else:
        folder = config_folder(family)
        parts = dict(config_folder_tokenizers(folder))
        with torch.device(device):  # initialise on the GPU: seconds instead of a minute on the CPU
            parts["unet"] = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
            parts["vae"] = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
            parts["text_encoder"] = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
            if family == "sdxl":
                parts["text_encoder_2"] = CLIPTextModelWithProjection(
                    CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
        scheduler_config = dict(DDPMScheduler.load_config(folder / "scheduler"))
    return SDComponents(family=family, unet=parts["unet"], vae=parts["vae"], text_encoder=parts["text_encoder"],
                        tokenizer=parts["tokenizer"], scheduler_config=scheduler_config, prediction_type="epsilon",
                        text_encoder_2=parts.get("text_encoder_2"), tokenizer_2=parts.get("tokenizer_2"))


def random_unet(family: str, tiny: bool, device: torch.device) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    from sdstudio.core.models.sd.offline import config_folder
    tiny_sd1_components, tiny_sdxl_components = _tiny_builders()

    if tiny:
        return (tiny_sdxl_components if family == "sdxl" else tiny_sd1_components)(seed=0)["unet"].to(device)
    with torch.device(device):
        return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_folder(family) / "unet"))


@dataclass(frozen=True)
class Shapes:
    latent: int  # side of the latent grid
    text_width: int  # cross-attention width (SDXL: both encoders' states concatenated)
    pooled: int  # SDXL's pooled text embedding (0 for SD1)

    @classmethod
    def of(cls, unet: torch.nn.Module) -> Shapes:
        c = unet.config
        pooled = 0
        if c.addition_embed_type == "text_time":
            pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        return cls(int(c.sample_size), int(c.cross_attention_dim), int(pooled))


# -- the two training loops ----------------------------------------------------------------------------------
@dataclass
class Loop:
    step: Callable[[], Any]  # one optimizer step
    batch: int
    trainable: list[torch.nn.Parameter]
    modules: list[torch.nn.Module]
    close: Callable[[], None] = lambda: None
    info: dict[str, Any] | None = None


@contextmanager
def tf32(enabled: bool):
    """TF32 matmul/conv on or off for one loop, the previous setting restored after."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def baseline_loop(w: Workload, tiny: bool, device: torch.device) -> Loop:
    """The diffusers example-script recipe, written out plainly (see the module docstring)."""
    from diffusers import DDPMScheduler

    batch = w.tiny_batch if tiny else w.batch
    on_gpu = device.type == "cuda"
    unet = random_unet(w.family, tiny, device)
    if w.lora:
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.to(torch.bfloat16 if on_gpu else torch.float32)
        unet.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        params = [p for p in unet.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
        lr = 1e-4
    else:
        params = list(unet.parameters())
        lr = 1e-5
    unet.train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2, foreach=on_gpu or None)  # torch's default on CUDA
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    shapes = Shapes.of(unet)
    latents = torch.randn(batch, 4, shapes.latent, shapes.latent, device=device)
    states = torch.randn(batch, TEXT_TOKENS, shapes.text_width, device=device)
    added = None
    if shapes.pooled:
        side = float(shapes.latent * 8)
        added = {"text_embeds": torch.randn(batch, shapes.pooled, device=device),
                 "time_ids": torch.tensor([[side, side, 0.0, 0.0, side, side]] * batch, device=device)}

    def step() -> torch.Tensor:
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), device=device)
        noisy = sched.add_noise(latents, noise, t)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
            pred = unet(noisy, t, encoder_hidden_states=states, added_cond_kwargs=added).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return Loop(step, batch, params, [unet], info={"tf32": on_gpu, "optimizer": _describe_optimizer(opt)})


class PrecomputedText:
    """Stands in for sdstudio's text-embedding ``FeatureCache``: every caption's features already encoded."""

    def __init__(self, rows: dict[str, dict[str, torch.Tensor]]) -> None:
        self.rows = rows

    def get_or_compute(self, item: Any, encode: Callable[..., Any]) -> dict[str, torch.Tensor]:
        return self.rows[item.text]


def cached_batch(family: str, batch: int, shapes: Shapes) -> tuple[dict[str, Any], PrecomputedText]:
    """A batch as sdstudio's cached data path yields it (CPU fp32 features), and the text features behind it."""
    from sdstudio.core.data.cached import collate_cached

    side = shapes.latent * 8
    captions = [f"benchmark caption {i}" for i in range(batch)]
    rows = {}
    for caption in captions:
        rows[caption] = {"states": torch.randn(TEXT_TOKENS, shapes.text_width)}
        if family == "sdxl":
            rows[caption]["pooled"] = torch.randn(shapes.pooled)
    items = [{"features": {"latents": torch.randn(4, shapes.latent, shapes.latent)}, "caption": caption,
              "original_size": (side, side), "crop_top_left": (0, 0), "target_size": (side, side),
              "cache_item": None} for caption in captions]
    return collate_cached(items), PrecomputedText(rows)


def sdstudio_config(w: Workload, tiny: bool, steps: int, compile_: bool, extra: dict[str, Any]):  # -> RunConfig
    from sdstudio.core.presets import load_preset

    overrides = {**SDSTUDIO_OVERRIDES, "train.batch_size": w.tiny_batch if tiny else w.batch,
                 "train.max_steps": steps, "train.compile": compile_,
                 "data.resolution": 64 if tiny else w.resolution}
    if not w.lora:
        overrides["lora.enabled"] = False
    return load_preset(w.preset).with_overrides({**overrides, **extra})


def sdstudio_loop(w: Workload, tiny: bool, device: torch.device, steps: int, compile_: bool,
                  extra: dict[str, Any]) -> Loop:
    from sdstudio.core.train.session import TrainingSession

    config = sdstudio_config(w, tiny, steps, compile_, extra)
    components = random_components(w.family, tiny, device)

    def load_random(path: Path, *, family: str, **_: Any):
        assert family == w.family, f"preset family {family} != workload family {w.family}"
        return components

    session = TrainingSession(config, run_dir=None, resume=False)
    session.prepare_data()
    # the one stand-in: the checkpoint loader returns the random-weight components (see docs/gpu-benchmark.md)
    with mock.patch("sdstudio.core.models.sd.model.load_sd_components", load_random):
        session.build()
    unet = components.unet
    shapes = Shapes.of(unet)
    batch, text_cache = cached_batch(w.family, config.train.batch_size, shapes)
    if device.type == "cuda":  # what the loader's pin_memory thread hands the loop
        from torch.utils.data._utils.pin_memory import pin_memory

        batch = pin_memory(batch)
    session.caches.read_text_from(text_cache)

    def step() -> Any:
        loss, _grad_norm, _lr = session.optimizer_step([batch])  # a device tensor on the no-sync path
        session.progress.step_done()  # what the loop does after each step (noise seeds and the LR schedule follow it)
        return loss

    frozen = [m for m in (session.bundle.components.vae, session.bundle.components.text_encoder,
                          session.bundle.components.text_encoder_2) if m is not None]
    info = {"preset": w.preset, "overrides": {k: v for k, v in {**SDSTUDIO_OVERRIDES, **extra}.items()
                                              if k != "model.path"},
            "compile": compile_, "compiled_regions": getattr(session, "compiled_regions", 0),
            "lazy_step": bool(getattr(session.steps, "lazy", False)),
            "mixed_precision": session.accelerator.mixed_precision,
            "optimizer": _describe_optimizer(getattr(session.optimizer, "optimizer", session.optimizer)),
            "tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "frozen_gib": sum(_bytes(m) for m in frozen) / GIB}
    if device.type == "cuda":
        from sdstudio.core.train.memory import estimate_memory

        info["sdstudio_estimate_gib"] = estimate_memory(session.bundle, config).total / GIB
    return Loop(step, config.train.batch_size, session.steps.params, [unet, *frozen], close=session.close,
                info=info)


def _describe_optimizer(opt: torch.optim.Optimizer) -> str:
    flags = [k for k in ("fused", "foreach") if opt.defaults.get(k)]
    return type(opt).__name__ + (f" ({', '.join(flags)})" if flags else "")


def _bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())
