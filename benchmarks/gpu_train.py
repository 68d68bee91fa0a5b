"""GPU training throughput: sdstudio's training step against the diffusers-example baseline, in one process.

Each workload trains a real-size UNet with random weights (the SD1.5 / SDXL configs that sdstudio ships in
resources/models, no download) on cached-latent-shaped inputs, twice:

- baseline: plain diffusers + peft, trained the way diffusers' example scripts train
  (docs/gpu-benchmark.md): SDPA, TF32 on, AdamW (foreach), clipping at 1.0; full fine-tune =
  fp32 UNet under bf16 autocast; LoRA = UNet frozen in bf16, peft LoRA r16 on to_q/to_k/to_v/to_out.0 with
  fp32 adapters. Latents, noise and text states are random tensors already on the GPU.
- sdstudio: a real ``TrainingSession`` from the workload's preset (built by ``build()``, stepped by
  ``optimizer_step()``), fed batches in the shape its latent cache and text-embedding cache produce (per-image
  latents and per-caption text features on the CPU), so neither the VAE nor a text encoder runs per step.
  Only the model loading is replaced: random-weight components stand in for a checkpoint on disk.

Per loop: img/s (steady state, warm-up excluded), FLOPs of one step (torch.utils.flop_counter), TFLOP/s,
MFU against the card's dense bf16 peak, and peak ``torch.cuda.max_memory_allocated`` after warm-up.

    python benchmarks/gpu_train.py OUT.json [--tiny] [--only sd15-lora,sd15-full,sdxl-lora] [--steps N]
                                   [--warmup N] [--compile [NAMES]] [--set KEY=VALUE ...] [--peak-tflops T]

``--tiny``: tiny configs that run on a CPU in seconds (the test). ``--compile``: also measure sdstudio with
``train.compile = true`` for the named workloads (default: all selected), after every eager pair.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch.utils.flop_counter import FlopCounterMode

GIB = 2**30
TEXT_TOKENS = 77

# Dense bf16 tensor-core peaks (vendor datasheets), most specific name first. performance.md's anchor
# percentages use 790 TFLOP/s for the H200, the bf16 matmul rate measured there; TFLOP/s compare directly.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("GH200", 989.0),
                    ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


@dataclass(frozen=True)
class Workload:
    name: str
    preset: str
    family: str  # sd1 | sdxl
    lora: bool
    batch: int
    resolution: int
    tiny_batch: int = 2
    default: bool = True


WORKLOADS = {w.name: w for w in (
    Workload("sd15-lora", "sd15-lora", "sd1", lora=True, batch=16, resolution=512),
    Workload("sd15-full", "sd15-full", "sd1", lora=False, batch=16, resolution=512),
    Workload("sdxl-lora", "sdxl-lora", "sdxl", lora=True, batch=8, resolution=1024),
    # opt-in (--only sdxl-full): needs ~100 GiB at batch 8, more than an H100 has
    Workload("sdxl-full", "sdxl-lora", "sdxl", lora=False, batch=8, resolution=1024, default=False),
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
    session.caches.read_text_from(text_cache)

    def step() -> float:
        loss, _grad_norm, _lr = session.optimizer_step([batch])
        session.progress.step_done()  # what the loop does after each step (noise seeds and the LR schedule follow it)
        return loss

    frozen = [m for m in (session.bundle.components.vae, session.bundle.components.text_encoder,
                          session.bundle.components.text_encoder_2) if m is not None]
    info = {"preset": w.preset, "overrides": {k: v for k, v in {**SDSTUDIO_OVERRIDES, **extra}.items()
                                              if k != "model.path"},
            "compile": compile_, "mixed_precision": session.accelerator.mixed_precision,
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


# -- measuring -----------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(build: Callable[[], Loop], device: torch.device, warmup: int, steps: int, count_flops: bool,
            peak_tflops: float | None) -> dict[str, Any]:
    free(device)
    on_gpu = device.type == "cuda"
    left_over = torch.cuda.memory_allocated(device) / GIB if on_gpu else None
    t0 = time.perf_counter()
    loop = build()
    sync(device)
    build_s = time.perf_counter() - t0
    try:
        resident = torch.cuda.memory_allocated(device) / GIB if on_gpu else None
        t0 = time.perf_counter()
        for _ in range(warmup):
            loop.step()
        sync(device)
        warmup_s = time.perf_counter() - t0
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = loop.step()
        sync(device)
        step_s = (time.perf_counter() - t0) / steps
        peak = torch.cuda.max_memory_allocated(device) / GIB if on_gpu else None
        flops = None
        if count_flops:
            counter = FlopCounterMode(display=False)
            with counter:
                loop.step()
            flops = int(counter.get_total_flops())
        result = {"batch": loop.batch, "step_s": step_s, "img_per_s": loop.batch / step_s,
                  "flops_per_step": flops, "peak_gib": peak, "resident_gib": resident, "build_s": build_s,
                  "warmup_s": warmup_s, "loss": float(loss),
                  "params_m": sum(_count(m) for m in loop.modules[:1]) / 1e6,
                  "trainable_m": sum(p.numel() for p in loop.trainable) / 1e6,
                  "memory_left_from_before_gib": left_over, **(loop.info or {})}
        add_rates(result, peak_tflops)
        return result
    finally:
        loop.close()
        del loop
        free(device)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def add_rates(result: dict[str, Any], peak_tflops: float | None) -> None:
    flops = result.get("flops_per_step")
    if not flops:
        return
    result["tflop_per_img"] = flops / result["batch"] / 1e12
    result["tflops_per_s"] = flops / result["step_s"] / 1e12
    result["mfu"] = result["tflops_per_s"] / peak_tflops if peak_tflops else None


def attempt(fn: Callable[[], dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """fn(), or its error recorded (an out-of-memory included) so that the other loops still run."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - recorded in the JSON; one failing loop must not stop the rest
        error = {"error": f"{type(exc).__name__}: {str(exc)[:800]}",
                 "traceback": traceback.format_exc(limit=8)[-4000:]}
    traceback.print_exc()
    free(device)  # after the except block, so the traceback's frames no longer hold tensors
    return error


def run_workload(w: Workload, args: argparse.Namespace, device: torch.device, peak: float | None,
                 entry: dict[str, Any] | None = None) -> dict[str, Any]:
    """The baseline and sdstudio (eager) into a new entry; with ``entry`` given, sdstudio compiled into it."""
    tiny, extra = args.tiny, dict(args.set)
    total = args.warmup + args.steps + 1

    def ours(compiled: bool) -> dict[str, Any]:
        with tf32(False):  # torch's defaults: sdstudio sets no TF32 itself, so it gets no help here
            return measure(lambda: sdstudio_loop(w, tiny, device, total, compiled, extra), device,
                           args.warmup, args.steps, not compiled, peak)

    if entry is None:
        entry = {"family": w.family, "mode": "lora" if w.lora else "full",
                 "batch": w.tiny_batch if tiny else w.batch, "resolution": 64 if tiny else w.resolution}

        def base() -> dict[str, Any]:
            with tf32(True):
                return measure(lambda: baseline_loop(w, tiny, device), device, args.warmup, args.steps, True, peak)

        entry["baseline"] = attempt(base, device)
        entry["sdstudio"] = attempt(lambda: ours(False), device)
        compare(entry, "sdstudio", "ratio")
        return entry
    compiled = entry["sdstudio_compiled"] = attempt(lambda: ours(True), device)
    if "error" not in compiled:  # FLOPs of the same step, counted on the eager model
        compiled["flops_per_step"] = entry["sdstudio"].get("flops_per_step") or entry["baseline"].get(
            "flops_per_step")
        add_rates(compiled, peak)
    compare(entry, "sdstudio_compiled", "ratio_compiled")
    return entry


def compare(entry: dict[str, Any], key: str, ratio_key: str) -> None:
    base, ours = entry["baseline"], entry[key]
    if "error" in base or "error" in ours:
        entry[ratio_key] = None
        return
    entry[ratio_key] = ours["img_per_s"] / base["img_per_s"]
    if base.get("peak_gib") and ours.get("peak_gib"):
        entry[ratio_key.replace("ratio", "memory_ratio")] = ours["peak_gib"] / base["peak_gib"]


# -- reporting -----------------------------------------------------------------------------------------------
def peak_bf16_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "no GPU"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value, f"datasheet dense bf16 for {key}"
    return None, f"unknown card {name!r}: pass --peak-tflops"


def describe(label: str, r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{label}: FAILED {r['error'].splitlines()[0][:160]}"
    mfu = f", MFU {r['mfu']:.1%}" if r.get("mfu") is not None else ""
    rate = f", {r['tflops_per_s']:.3g} TFLOP/s" if r.get("tflops_per_s") else ""
    mem = f", peak {r['peak_gib']:.1f} GiB" if r.get("peak_gib") is not None else ""
    return f"{label}: {r['img_per_s']:.2f} img/s ({r['step_s'] * 1000:.1f} ms/step{rate}{mfu}{mem})"


def print_entry(name: str, e: dict[str, Any]) -> None:
    print(f"\n== {name}: {e['mode']}, batch {e['batch']}, {e['resolution']} px", flush=True)
    print("  " + describe("baseline ", e["baseline"]))
    for key, ratio in (("sdstudio", "ratio"), ("sdstudio_compiled", "ratio_compiled")):
        if key in e:
            line = "  " + describe(f"{key:9s}", e[key])
            if e.get(ratio):
                line += f"  -> {e[ratio]:.2f}x the baseline"
                mem = e.get(ratio.replace("ratio", "memory_ratio"))
                line += f", {mem:.2f}x its memory" if mem else ""
            print(line, flush=True)


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    import sdstudio

    out: dict[str, str | None] = {"torch": torch.__version__, "sdstudio": sdstudio.__version__,
                                  "python": sys.version.split()[0]}
    for name in ("diffusers", "transformers", "peft", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    tmp.replace(path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="JSON file to write (rewritten after every workload)")
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (for tests)")
    parser.add_argument("--only", default="", help=f"comma-separated workloads out of {', '.join(WORKLOADS)}")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per loop (20 on a GPU, 2 tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (3 on a GPU, 1 tiny)")
    parser.add_argument("--compile", nargs="?", const="all", default="",
                        help="also measure sdstudio with train.compile for these workloads (default: all)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", type=_override,
                        help="a config override for the sdstudio side, e.g. train.gradient_checkpointing=true")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak for MFU")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or [n for n, w in WORKLOADS.items() if w.default]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; known: {', '.join(WORKLOADS)}")
    args.names = names
    compiled = [n.strip() for n in args.compile.split(",") if n.strip()]
    args.compiled = set(names) if compiled == ["all"] else set(compiled)
    args.steps = args.steps or (2 if args.tiny else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    return args


def _override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    peak, peak_source = peak_bf16_tflops(device, args.peak_tflops)
    import logging

    from diffusers.utils import logging as diffusers_logging

    logging.basicConfig(level=logging.WARNING)  # sdstudio's own info lines would drown the figures
    diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32: []" on every .to()
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "peak_bf16_tflops": peak, "peak_source": peak_source, "versions": versions(),
        "tiny": args.tiny, "steps": args.steps, "warmup": args.warmup, "argv": sys.argv[1:],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "workloads": {},
    }
    if device.type == "cpu":
        results["cpu_threads"] = torch.get_num_threads()
    print(f"device {results['device']}, peak {peak} TFLOP/s ({peak_source}), {results['versions']}", flush=True)
    torch.manual_seed(0)
    # every eager pair first, the compiled runs (minutes of warm-up each) last: a time limit cuts those first
    for name in args.names + [n for n in args.names if n in args.compiled]:
        t0 = time.perf_counter()
        entry = run_workload(WORKLOADS[name], args, device, peak, results["workloads"].get(name))
        entry["wall_s"] = entry.get("wall_s", 0.0) + time.perf_counter() - t0
        results["workloads"][name] = entry
        write_json(args.out, results)
        print_entry(name, entry)
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json(args.out, results)
    print(f"\nwrote {args.out}", flush=True)
    failed = [n for n, e in results["workloads"].items()
              if any("error" in e.get(k, {}) for k in ("baseline", "sdstudio", "sdstudio_compiled"))]
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "--tiny" in sys.argv and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # a smoke test: two threads on a shared 2-core machine can run 10-50x slower
    sys.exit(main())
