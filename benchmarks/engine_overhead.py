"""Engine overhead: sdstudio's training loop vs a minimal hand-written loop on the same model.

Both train the demo preset's model (batch 32, 32 px: a step takes ~0.3-0.7 s on 2 CPU cores, so fixed costs
are measured, not noise) with AdamW, MSE on epsilon and gradient clipping. The hand loop keeps a batch of
tensors and its token ids in memory; the engine does everything it does in a real run (data loading from
its in-memory cache, caption processing, tokenisation, accelerate, logging every step, NaN guard) except
validation, sampling and checkpoints, which are switched off. Rounds alternate engine/hand to spread the
machine's noise; the figure is the ratio of the median step times.

    python benchmarks/engine_overhead.py [--steps 30] [--rounds 3] [--threads 0] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from sdstudio.core import events as ev
from sdstudio.core.config import RunConfig
from sdstudio.core.data.dataset import ImageCaptionDataset, collate
from sdstudio.core.diffusion import training_scheduler
from sdstudio.core.presets import load_preset
from sdstudio.core.train.loop import train
from sdstudio.core.train.setup import build_model, prepare_data


def engine_step_times(config: RunConfig, steps: int, run_dir: Path) -> list[float]:
    cfg = config.with_overrides({"train.max_steps": steps, "train.log_every": 1, "data.val_split": 0.0,
                                 "sample.every_epochs": 0, "sample.every_steps": 0, "sample.at_end": False,
                                 "checkpoint.every_steps": 0, "checkpoint.every_epochs": 0})
    stamps: list[float] = []
    for event in train(cfg, run_dir=run_dir):
        if isinstance(event, ev.StepMetrics):
            stamps.append(time.perf_counter())
        elif isinstance(event, ev.Failed):
            raise SystemExit(f"engine run failed: {event.message}")
    return [b - a for a, b in zip(stamps, stamps[1:])]


def hand_step_times(config: RunConfig, steps: int) -> list[float]:
    torch.manual_seed(config.train.seed)
    data = prepare_data(config, lambda _: None)
    dataset = ImageCaptionDataset(data.train, config, train=False)
    batch = collate([dataset[i] for i in range(config.train.batch_size)])
    bundle = build_model(config, sorted({c for r in data.train for c in r.captions}))
    model = bundle.trainable
    cond = bundle.encode_captions(batch["captions"], torch.device("cpu"))
    clean = batch["pixels"]
    sched = training_scheduler(config.diffusion, pixel_space=True)
    # the same AdamW implementation as the engine (fused), so the ratio measures the engine's own costs
    opt = torch.optim.AdamW(model.parameters(), lr=config.train.learning_rate, weight_decay=config.train.weight_decay,
                            fused=True)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        noise = torch.randn_like(clean)
        t = torch.randint(0, sched.config.num_train_timesteps, (clean.shape[0],))
        pred = model(sched.add_noise(clean, noise, t), t, cond)
        loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss)
        times.append(time.perf_counter() - t0)
    return times[1:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import tempfile

    config = load_preset("demo").with_overrides({"train.threads": args.threads, "train.device": "cpu"})
    engine: list[float] = []
    hand: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            engine += engine_step_times(config, args.steps, Path(tmp) / f"run{r}")[2:]
            hand += hand_step_times(config, args.steps)[2:]
            print(f"round {r + 1}: engine {statistics.median(engine) * 1e3:.1f} ms/step, "
                  f"hand {statistics.median(hand) * 1e3:.1f} ms/step", flush=True)
    e, h = statistics.median(engine), statistics.median(hand)
    result = {"engine_ms": e * 1e3, "hand_ms": h * 1e3, "ratio": e / h, "steps": len(engine),
              "batch": config.train.batch_size, "resolution": config.data.resolution,
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "machine": f"{platform.machine()} {platform.processor() or ''} ({torch.get_num_threads()} threads)"}
    print(json.dumps(result, indent=1))
    print(f"engine overhead ratio (median step time, engine / hand loop): {e / h:.3f}  (goal <= 1.05)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
