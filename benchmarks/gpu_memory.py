"""Peak memory and step time of each memory lever (issue 13), in one process on one card.

Workload: an SDXL UNet with random weights built from the config sdstudio ships (resources/models/sdxl-base, no
download), LoRA rank 16 on the attention projections (fp32 adapters, base frozen in bf16), 1024 px (128x128
latents), batch 1, cached text (random text states), AdamW. Each variant adds levers to the plain bf16 step:
fp8 / nf4 base (core/models/quantize.py), block swap (core/train/blockswap.py), gradient checkpointing,
offloaded activations, 8-bit AdamW, the fused backward step (core/train/fused_backward.py).

Flux.1-dev (the ``flux-*`` variants): FLUX.1-dev's transformer topology (~11.9 B parameters) with random weights,
built straight on the GPU in bf16 (never fp32, never in CPU memory; bench_loops.flux_transformer), LoRA rank 16
on the flux-lora preset's layers (lora.targets = attention_ff, fp32 adapters), 1024 px (16x128x128 latents,
4096 image tokens), 512 T5 tokens, guidance 1.0, batch 1, flow-matching loss, AdamW. Levers: ``model.quantize``
fp8 / nf4 of the blocks' frozen linears (transformer_parts.quantize_blocks, what the run does), gradient
checkpointing as the preset has it, ``train.blocks_to_swap`` (the 19 double blocks, the largest: ~6.5 GB fp8).
Issue 13's target: peak <= 16 GB (goal 12 GB) with an fp8 or nf4 base + block swap.

    python benchmarks/gpu_memory.py OUT.json [--tiny] [--steps N] [--only NAME,NAME] [--model sdxl|flux|all]

``--tiny``: a tiny UNet / the tests' tiny Flux at 64 px on the CPU in seconds (the test); peak_gb is then null
(nothing measures CPU memory per allocation). A variant that fails (out of memory, say) is recorded with its
``error``; one whose library is missing (nf4: torchao; 8-bit AdamW: bitsandbytes) with ``skipped``.
JSON: {device, date, torch, tiny, workloads: [{name, model, peak_gb, step_s, levers, loss}]}.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
FLUX_SWAP = 19  # FLUX.1-dev's double blocks: the largest ones, what block swap picks first

VARIANTS: dict[str, dict[str, Any]] = {
    "plain-bf16": {},
    "checkpointing": {"checkpointing": True},
    "fp8": {"quantize": "fp8", "checkpointing": True},
    "nf4": {"quantize": "nf4", "checkpointing": True},
    "fp8-swap8": {"quantize": "fp8", "checkpointing": True, "swap": 8},
    "fp8-offload-activations": {"quantize": "fp8", "checkpointing": True, "offload_activations": True},
    "fp8-adamw8bit-fused": {"quantize": "fp8", "checkpointing": True, "optimizer": "adamw8bit", "fused": True},
    # Flux.1-dev (issue 13): the plain bf16 step, then each lever against it
    "flux-plain-bf16": {},
    "flux-checkpointing": {"checkpointing": True},
    "flux-fp8": {"quantize": "fp8", "checkpointing": True},
    "flux-nf4": {"quantize": "nf4", "checkpointing": True},
    f"flux-fp8-swap{FLUX_SWAP}": {"quantize": "fp8", "checkpointing": True, "swap": FLUX_SWAP},
}


def build_unet(tiny: bool, device: torch.device, dtype: torch.dtype) -> Any:
    from diffusers import UNet2DConditionModel

    if tiny:
        unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                    attention_head_dim=8, norm_num_groups=8)
    else:
        config = UNet2DConditionModel.load_config(ROOT / "sdstudio/resources/models/sdxl-base/unet")
        with torch.device(device):
            unet = UNet2DConditionModel.from_config(config)
    return unet.to(device, dtype=dtype)


def run_variant(name: str, levers: dict[str, Any], *, tiny: bool, steps: int, device: torch.device) -> dict:
    from peft import LoraConfig

    from sdstudio.core.models.quantize import quantize_frozen_linears
    from sdstudio.core.train.blockswap import install_block_swap
    from sdstudio.core.train.fused_backward import FusedBackwardOptimizer

    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    flux = name.startswith("flux-")
    if flux:
        from bench_loops import FluxInputs, flux_transformer

        from sdstudio.core.models.flux.model import LORA_TARGETS
        from sdstudio.core.models.transformer_parts import quantize_blocks

        unet = flux_transformer(tiny, device)  # real size: bf16 on the GPU from the start; tiny: fp32
        targets: Any = LORA_TARGETS["attention_ff"]  # the flux-lora preset's layers
    else:
        unet = build_unet(tiny, device, dtype)
        targets = ["to_q", "to_k", "to_v", "to_out.0"]
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian", target_modules=targets))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    if levers.get("quantize"):
        if flux:  # model.quantize: the blocks' frozen linears (peft's base layers included), as a run does
            quantize_blocks(unet, levers["quantize"], {})
        else:
            quantize_frozen_linears(unet, levers["quantize"])
    if levers.get("checkpointing"):
        unet.enable_gradient_checkpointing()
    if levers.get("swap"):
        install_block_swap(unet, levers["swap"], device=device)

    def make(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        if levers.get("optimizer") == "adamw8bit":
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(groups, lr=1e-4)
        return torch.optim.AdamW(groups, lr=1e-4)
    fused = levers.get("fused", False)
    opt: Any = FusedBackwardOptimizer([{"params": params}], make) if fused else make([{"params": params}])
    if flux:
        inputs = FluxInputs.random(unet, 1, 64 if tiny else 1024, tiny, device, dtype)
        latents = inputs.latents

        def predict() -> torch.Tensor:  # flow matching at t = 0.5: velocity target noise - latents
            noise = torch.randn_like(latents)
            pred = inputs.predict(unet, 0.5 * (latents + noise), torch.full((1,), 0.5, device=device))
            return torch.nn.functional.mse_loss(pred.float(), (noise - latents).float())
    else:
        side, ctx_dim = (8, 32) if tiny else (128, 2048)
        latents = torch.randn(1, 4, side, side, device=device, dtype=dtype)
        states = torch.randn(1, 77, ctx_dim, device=device, dtype=dtype)
        added = None if tiny else {"text_embeds": torch.randn(1, 1280, device=device, dtype=dtype),
                                   "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]], device=device,
                                                            dtype=dtype)}

        def predict() -> torch.Tensor:
            pred = unet(latents, torch.tensor([500], device=device), encoder_hidden_states=states,
                        added_cond_kwargs=added).sample
            return torch.nn.functional.mse_loss(pred.float(), latents.float())
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        t0 = time.perf_counter()
        offload = torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda") \
            if levers.get("offload_activations") else _null()
        with offload, torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            loss = predict()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    step_s = sum(times[1:]) / max(1, len(times) - 1) if len(times) > 1 else times[0]
    return {"name": name, "model": "flux-dev" if flux else "sdxl", "peak_gb": peak, "step_s": step_s,
            "levers": levers, "loss": float(loss)}


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--only", default="", help="comma-separated variant names")
    parser.add_argument("--model", choices=("all", "sdxl", "flux"), default="all",
                        help="the SDXL variants, the flux-* ones, or both")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    names = [n for n in (args.only.split(",") if args.only else VARIANTS) if n]
    if args.model != "all":
        names = [n for n in names if n.startswith("flux-") == (args.model == "flux")]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    results: list[dict[str, Any]] = []
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "date": datetime.date.today().isoformat(), "torch": torch.__version__, "tiny": args.tiny,
           "steps": args.steps, "workloads": results}
    for name in names:
        levers = VARIANTS[name]
        try:
            results.append(run_variant(name, levers, tiny=args.tiny, steps=args.steps, device=device))
        except ImportError as exc:  # nf4 without torchao, 8-bit Adam without bitsandbytes
            results.append({"name": name, "peak_gb": None, "step_s": None, "levers": levers, "skipped": str(exc)})
        except Exception as exc:  # noqa: BLE001 - out of memory, say: recorded, the other variants still run
            results.append({"name": name, "peak_gb": None, "step_s": None, "levers": levers,
                            "error": f"{type(exc).__name__}: {str(exc)[:600]}"})
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps(results[-1]), flush=True)
        args.out.write_text(json.dumps(out, indent=1), encoding="utf-8")  # after each: a time limit loses one
    args.out.write_text(json.dumps(out, indent=1), encoding="utf-8")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
