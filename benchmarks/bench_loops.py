"""The loops benchmarks/gpu_train.py measures, each built with random weights at real size (or tiny, for a CPU):

- ``baseline_loop``: plain diffusers + peft, trained the way diffusers' example scripts train (SDPA, TF32 on,
  AdamW (foreach), clipping at 1.0; full fine-tune = fp32 UNet under bf16 autocast; LoRA = UNet frozen in bf16,
  peft LoRA r16 on to_q/to_k/to_v/to_out.0 with fp32 adapters); latents, noise and text states on the GPU.
- ``flux_baseline_loop``: Flux.1 dev as diffusers' ``train_dreambooth_lora_flux.py`` trains it: the transformer
  frozen in bf16, peft LoRA r16 (gaussian init, fp32 adapters), gradient checkpointing, flow matching (uniform
  timesteps, FLUX.1-dev's scheduler sigmas with shift 3, target noise - latents, unweighted MSE), packed 2x2
  latents with FluxPipeline's own helpers, the guidance input, AdamW (foreach), clipping at 1.0.
- ``sdstudio_loop``: a real ``TrainingSession`` from the workload's preset (``build()``, ``optimizer_step()``),
  fed a batch in the shape its latent cache and text-embedding cache produce (CPU features, pinned as the
  loader pins them). Only the checkpoint loader is replaced: random-weight components stand in for a file.

Real-size Flux is FLUX.1-dev's topology (the config sdstudio ships, ~11.9 B parameters) built straight on the
GPU in bf16 (``flux_transformer``): never in fp32, never in CPU memory.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch

GIB = 2**30
TEXT_TOKENS = 77
FLUX_T5_TOKENS = {False: 512, True: 16}  # T5 states per caption: FLUX.1-dev's 512 (real size), 16 (tiny)
FLUX_GUIDANCE = 1.0  # the guidance input while training flux-dev (the flux-lora preset's flow.guidance)


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
    checkpointing: bool = False  # both loops train with gradient checkpointing (Flux: as the preset and the
    # diffusers example for Flux do; two bf16 Flux transformers and their activations would not fit 80 GB)
    max_rounds: int = 0  # caps on --rounds / --steps / --warmup for this workload (0: none): Flux steps are
    max_steps: int = 0  # ~1 s each, so fewer of them keep the whole GPU run in its time budget
    max_warmup: int = 0
    compile_default: bool = True  # measured compiled by a bare --compile (Flux: only when named: a third
    # 24 GB transformer fits an H200, not an H100)


WORKLOADS = {w.name: w for w in (
    Workload("sd15-lora-b16", "sd15-lora", "sd1", lora=True, batch=16, resolution=512),
    Workload("sd15-full-b16", "sd15-full", "sd1", lora=False, batch=16, resolution=512),
    Workload("sdxl-lora-b8", "sdxl-lora", "sdxl", lora=True, batch=8, resolution=1024),
    Workload("flux-lora", "flux-lora", "flux", lora=True, batch=1, resolution=1024, tiny_batch=1,
             checkpointing=True, max_rounds=3, max_steps=5, max_warmup=1, compile_default=False),
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
# Flux: checkpointing on both sides (Workload.checkpointing); the frozen CLIP-L and T5-XXL (9.5 GB) leave the
# GPU once the text cache is there, as a Flux user on cached text runs (the baseline holds no text encoder)
FLUX_OVERRIDES: dict[str, Any] = {"train.gradient_checkpointing": True, "train.offload_frozen": True}


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


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Modules built inside create their parameters in ``dtype`` (a real-size model is never built in fp32)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _tiny_flux() -> dict[str, Any]:
    """tests/tiny_flux.py's components (one double and one single block, width 32; CLIP, T5, VAE, tokenizers)."""
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    from tests.tiny_flux import tiny_flux_components

    return tiny_flux_components(seed=0)


def _real_size(device: torch.device) -> None:
    if device.type == "cpu":
        raise RuntimeError("a real-size Flux model is built on a GPU (or the meta device), never in CPU memory: "
                           "pass --tiny on a machine without one")


def flux_transformer(tiny: bool, device: torch.device) -> torch.nn.Module:
    """FLUX.1-dev's transformer with random weights: its real topology (the config sdstudio ships) built straight
    on ``device`` in bf16, or the tiny one of the tests."""
    if tiny:
        return _tiny_flux()["transformer"].to(device)
    from diffusers import FluxTransformer2DModel

    from sdstudio.core.models.flux.offline import transformer_config

    _real_size(device)
    config = {k: v for k, v in transformer_config("dev").items() if not k.startswith("_")}
    with torch.device(device), default_dtype(torch.bfloat16):
        return FluxTransformer2DModel(**config)


def random_flux_components(tiny: bool, device: torch.device):  # -> FluxComponents
    """Flux.1 dev with random weights: transformer, VAE, CLIP-L, T5-XXL (real sizes, bf16, built on the GPU) and
    the tokenizers sdstudio ships; or the tiny ones."""
    from sdstudio.core.models.flux import offline
    from sdstudio.core.models.flux.files import FluxComponents

    if tiny:
        parts = _tiny_flux()
        for key in ("transformer", "vae", "text_encoder", "text_encoder_2"):
            parts[key] = parts[key].to(device)
    else:
        from diffusers import AutoencoderKL
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        _real_size(device)
        parts = {"transformer": flux_transformer(False, device), "tokenizer": offline.clip_tokenizer(),
                 "tokenizer_2": offline.t5_tokenizer()}
        with torch.device(device), default_dtype(torch.bfloat16):
            parts["vae"] = AutoencoderKL(**{k: v for k, v in offline.VAE_CONFIG.items() if not k.startswith("_")})
            parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**offline.CLIP_L_CONFIG))
            parts["text_encoder_2"] = T5EncoderModel(T5Config(**offline.T5_CONFIG))
    return FluxComponents(transformer=parts["transformer"], vae=parts["vae"], text_encoder=parts["text_encoder"],
                          text_encoder_2=parts["text_encoder_2"], tokenizer=parts["tokenizer"],
                          tokenizer_2=parts["tokenizer_2"], variant="dev",
                          sources={k: "random-weights" for k in ("transformer", "vae", "text_encoder", "text_encoder_2")})


@dataclass(frozen=True)
class Shapes:
    latent: int  # side of the latent grid
    text_width: int  # cross-attention width (SDXL: both encoders' states concatenated; Flux: T5's width)
    pooled: int  # SDXL's pooled text embedding, Flux's CLIP-L pooled output (0 for SD1)
    channels: int = 4  # latent channels (Flux: 16)
    tokens: int = TEXT_TOKENS  # text states per caption (Flux: T5's length)

    @classmethod
    def of(cls, unet: torch.nn.Module) -> Shapes:
        c = unet.config
        pooled = 0
        if c.addition_embed_type == "text_time":
            pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        return cls(int(c.sample_size), int(c.cross_attention_dim), int(pooled))

    @classmethod
    def of_flux(cls, transformer: torch.nn.Module, resolution: int, tiny: bool) -> Shapes:
        c = transformer.config
        return cls(resolution // 8, int(c.joint_attention_dim), int(c.pooled_projection_dim),
                   channels=int(c.in_channels) // 4, tokens=FLUX_T5_TOKENS[tiny])


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

    if w.family == "flux":
        return flux_baseline_loop(w, tiny, device)

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


# diffusers' train_dreambooth_lora_flux.py default layers (double blocks: attention + both MLPs; single blocks:
# q/k/v) + the single blocks' proj_mlp / proj_out, which sdstudio's preset (lora.targets = attention_ff) also
# trains: both loops train the same layers. A regex, so the final proj_out is not matched.
_FLUX_DOUBLE = (r"attn\.(to_k|to_q|to_v|to_out\.0|add_k_proj|add_q_proj|add_v_proj|to_add_out)"
                r"|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)")
FLUX_BASELINE_TARGETS = (rf"^(transformer_blocks\.\d+\.({_FLUX_DOUBLE})"
                         r"|single_transformer_blocks\.\d+\.(attn\.(to_k|to_q|to_v)|proj_mlp|proj_out))$")


@dataclass
class FluxInputs:
    """A Flux.1 batch as the diffusers example feeds it: (latent - shift) * scale (cached), T5 states, CLIP-L's
    pooled output, the text / image position ids and the guidance input (dev)."""
    latents: torch.Tensor  # [B, 16, H/8, W/8], fp32
    states: torch.Tensor
    pooled: torch.Tensor
    text_ids: torch.Tensor
    image_ids: torch.Tensor
    guidance: torch.Tensor | None

    @classmethod
    def random(cls, transformer: torch.nn.Module, batch: int, resolution: int, tiny: bool, device: torch.device,
               dtype: torch.dtype) -> FluxInputs:
        from diffusers import FluxPipeline

        shapes = Shapes.of_flux(transformer, resolution, tiny)
        side = shapes.latent
        guided = bool(transformer.config.guidance_embeds)
        return cls(latents=torch.randn(batch, shapes.channels, side, side, device=device),
                   states=torch.randn(batch, shapes.tokens, shapes.text_width, device=device, dtype=dtype),
                   pooled=torch.randn(batch, shapes.pooled, device=device, dtype=dtype),
                   text_ids=torch.zeros(shapes.tokens, 3, device=device, dtype=dtype),
                   image_ids=FluxPipeline._prepare_latent_image_ids(batch, side // 2, side // 2, device, dtype),
                   guidance=torch.full((batch,), FLUX_GUIDANCE, device=device) if guided else None)

    def predict(self, transformer: torch.nn.Module, noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The velocity for ``noisy`` [B, C, H, W] at ``t`` in [0, 1]: packed into 2x2 patches and back."""
        from diffusers import FluxPipeline

        b, c, h, w = noisy.shape
        out = transformer(hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w), timestep=t,
                          guidance=self.guidance, pooled_projections=self.pooled, encoder_hidden_states=self.states,
                          txt_ids=self.text_ids, img_ids=self.image_ids, return_dict=False)[0]
        return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)


def flux_baseline_loop(w: Workload, tiny: bool, device: torch.device) -> Loop:
    """Flux.1 dev LoRA the way diffusers' ``train_dreambooth_lora_flux.py`` trains it (module docstring), on
    cached-style inputs already on the device (random latents, T5 states, CLIP pooled output)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from peft import LoraConfig

    batch = w.tiny_batch if tiny else w.batch
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    transformer = flux_transformer(tiny, device)
    transformer.requires_grad_(False)  # built in the weight dtype: bf16 on a GPU (real size), fp32 tiny on a CPU
    if w.checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                                       target_modules=FLUX_BASELINE_TARGETS))
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:  # cast_training_params: the adapters train in fp32
        p.data = p.data.float()
    transformer.train()
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8,
                            foreach=on_gpu or None)  # the example's defaults
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)  # FLUX.1-dev's training copy
    sigmas, timesteps = sched.sigmas.to(device), sched.timesteps.to(device)
    inputs = FluxInputs.random(transformer, batch, 64 if tiny else w.resolution, tiny, device, dtype)
    latents = inputs.latents

    def step() -> torch.Tensor:
        noise = torch.randn_like(latents)
        # weighting_scheme "none": uniform u; the sigma at the sampled timestep index
        index = (torch.rand(batch, device=device) * sched.config.num_train_timesteps).long()
        sigma = sigmas[index].view(-1, 1, 1, 1)
        noisy = (1.0 - sigma) * latents + sigma * noise
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
            pred = inputs.predict(transformer, noisy, timesteps[index] / 1000)
        target = noise - latents
        loss = torch.mean(((pred.float() - target.float()) ** 2).reshape(batch, -1), 1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return Loop(step, batch, params, [transformer],
                info={"tf32": on_gpu, "optimizer": _describe_optimizer(opt), "checkpointing": w.checkpointing})


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
        rows[caption] = {"states": torch.randn(shapes.tokens, shapes.text_width)}
        if shapes.pooled:
            rows[caption]["pooled"] = torch.randn(shapes.pooled)
    items = [{"features": {"latents": torch.randn(shapes.channels, shapes.latent, shapes.latent)}, "caption": caption,
              "original_size": (side, side), "crop_top_left": (0, 0), "target_size": (side, side),
              "cache_item": None} for caption in captions]
    return collate_cached(items), PrecomputedText(rows)


def sdstudio_config(w: Workload, tiny: bool, steps: int, compile_: bool, extra: dict[str, Any]):  # -> RunConfig
    from sdstudio.core.presets import load_preset

    overrides = {**SDSTUDIO_OVERRIDES, **(FLUX_OVERRIDES if w.family == "flux" else {}),
                 "train.gradient_checkpointing": w.checkpointing, "train.batch_size": w.tiny_batch if tiny else w.batch,
                 "train.max_steps": steps, "train.compile": compile_,
                 "data.resolution": 64 if tiny else w.resolution}
    if not w.lora:
        overrides["lora.enabled"] = False
    if tiny and w.family == "flux":
        overrides["model.t5_max_length"] = FLUX_T5_TOKENS[True]
    return load_preset(w.preset).with_overrides({**overrides, **extra})


def sdstudio_loop(w: Workload, tiny: bool, device: torch.device, steps: int, compile_: bool,
                  extra: dict[str, Any]) -> Loop:
    from sdstudio.core.train.session import TrainingSession

    config = sdstudio_config(w, tiny, steps, compile_, extra)
    flux = w.family == "flux"
    components = random_flux_components(tiny, device) if flux else random_components(w.family, tiny, device)

    def load_random(path: Path, *, family: str, **_: Any):
        assert family == w.family, f"preset family {family} != workload family {w.family}"
        return components

    session = TrainingSession(config, run_dir=None, resume=False)
    session.prepare_data()
    # the one stand-in: the checkpoint loader returns the random-weight components (see docs/gpu-benchmark.md)
    loader = ("sdstudio.core.models.flux.model.load_components", lambda *a, **k: components) if flux else \
        ("sdstudio.core.models.sd.model.load_sd_components", load_random)
    with mock.patch(*loader):
        session.build()
    denoiser = components.transformer if flux else components.unet
    shapes = (Shapes.of_flux(denoiser, config.data.resolution, tiny) if flux else Shapes.of(denoiser))
    batch, text_cache = cached_batch(w.family, config.train.batch_size, shapes)
    if device.type == "cuda":  # what the loader's pin_memory thread hands the loop
        from torch.utils.data._utils.pin_memory import pin_memory

        batch = pin_memory(batch)
    session.caches.read_text_from(text_cache)
    session.park_frozen()  # train.offload_frozen (Flux): the text encoders leave the GPU, as the loop does

    def step() -> Any:
        loss, _grad_norm, _lr = session.optimizer_step([batch])  # a device tensor on the no-sync path
        session.progress.step_done()  # what the loop does after each step (noise seeds and the LR schedule follow it)
        return loss

    parked = session.frozen_parts.parked if session.frozen_parts is not None else {}
    frozen = [m for m in (session.bundle.components.vae, session.bundle.components.text_encoder,
                          session.bundle.components.text_encoder_2)
              if m is not None and all(m is not p for p in parked.values())]  # on the device while training
    overrides = {**SDSTUDIO_OVERRIDES, **(FLUX_OVERRIDES if flux else {}),
                 "train.gradient_checkpointing": w.checkpointing, **extra}
    info = {"preset": w.preset, "overrides": {k: v for k, v in overrides.items() if k != "model.path"},
            "compile": compile_, "compiled_regions": getattr(session, "compiled_regions", 0),
            "lazy_step": bool(getattr(session.steps, "lazy", False)),
            "mixed_precision": session.accelerator.mixed_precision,
            "optimizer": _describe_optimizer(getattr(session.optimizer, "optimizer", session.optimizer)),
            "tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "frozen_gib": sum(_bytes(m) for m in frozen) / GIB, "frozen_parked": sorted(parked)}
    if device.type == "cuda":
        from sdstudio.core.train.memory import estimate_memory

        info["sdstudio_estimate_gib"] = estimate_memory(session.bundle, config).total / GIB
    return Loop(step, config.train.batch_size, session.steps.params, [denoiser, *frozen], close=session.close,
                info=info)


def _describe_optimizer(opt: torch.optim.Optimizer) -> str:
    flags = [k for k in ("fused", "foreach") if opt.defaults.get(k)]
    return type(opt).__name__ + (f" ({', '.join(flags)})" if flags else "")


def _bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())
