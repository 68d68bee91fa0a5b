"""Peak memory and step time of each memory lever (issue 13), in one process on one card.

Workload: an SDXL UNet with random weights built from the config sdstudio ships (resources/models/sdxl-base, no
download), LoRA rank 16 on the attention projections (fp32 adapters, base frozen in bf16), 1024 px (128x128
latents), batch 1, cached text (random text states), AdamW. Each variant adds levers to the plain bf16 step:
fp8 / nf4 base (core/models/quantize.py), block swap (core/train/blockswap.py), gradient checkpointing,
offloaded activations, 8-bit AdamW, the fused backward step (core/train/fused_backward.py).

    python benchmarks/gpu_memory.py OUT.json [--tiny] [--steps N] [--only NAME,NAME]

``--tiny``: a tiny UNet at 64 px on the CPU in seconds (the test); peak_gb is then null (nothing measures CPU
memory per allocation). Flux.1-dev is not measured: sdstudio has no Flux family yet.
JSON: {device, date, torch, tiny, workloads: [{name, peak_gb, step_s, levers}]}.
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

VARIANTS: dict[str, dict[str, Any]] = {
    "plain-bf16": {},
    "checkpointing": {"checkpointing": True},
    "fp8": {"quantize": "fp8", "checkpointing": True},
    "nf4": {"quantize": "nf4", "checkpointing": True},
    "fp8-swap8": {"quantize": "fp8", "checkpointing": True, "swap": 8},
    "fp8-offload-activations": {"quantize": "fp8", "checkpointing": True, "offload_activations": True},
    "fp8-adamw8bit-fused": {"quantize": "fp8", "checkpointing": True, "optimizer": "adamw8bit", "fused": True},
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
    unet = build_unet(tiny, device, dtype)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    if levers.get("quantize"):
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
    side, ctx_dim = (8, 32) if tiny else (128, 2048)
    latents = torch.randn(1, 4, side, side, device=device, dtype=dtype)
    states = torch.randn(1, 77, ctx_dim, device=device, dtype=dtype)
    added = None if tiny else {"text_embeds": torch.randn(1, 1280, device=device, dtype=dtype),
                               "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]], device=device, dtype=dtype)}
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        t0 = time.perf_counter()
        offload = torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda") \
            if levers.get("offload_activations") else _null()
        with offload, torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            pred = unet(latents, torch.tensor([500], device=device), encoder_hidden_states=states,
                        added_cond_kwargs=added).sample
        loss = torch.nn.functional.mse_loss(pred.float(), latents.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del unet, opt
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    step_s = sum(times[1:]) / max(1, len(times) - 1) if len(times) > 1 else times[0]
    return {"name": name, "peak_gb": peak, "step_s": step_s, "levers": levers}


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
    parser.add_argument("--only", default="")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    names = [n for n in (args.only.split(",") if args.only else VARIANTS) if n]
    results = []
    for name in names:
        levers = VARIANTS[name]
        try:
            results.append(run_variant(name, levers, tiny=args.tiny, steps=args.steps, device=device))
        except ImportError as exc:  # nf4 without torchao, 8-bit Adam without bitsandbytes
            results.append({"name": name, "peak_gb": None, "step_s": None, "levers": levers, "skipped": str(exc)})
        print(json.dumps(results[-1]), flush=True)
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "date": datetime.date.today().isoformat(), "torch": torch.__version__, "tiny": args.tiny,
           "workloads": results}
    args.out.write_text(json.dumps(out, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
