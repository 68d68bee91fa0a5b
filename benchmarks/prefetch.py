"""Reading batches ahead (``data.prefetch_batches``) in the real training loop, measured in one run.

Trains the same small from-scratch model (32 px) on synthetic JPEGs (2048x1536, decoded, resized and cropped
every step: no cache) with ``data.prefetch_batches = 0`` and ``= 2``, alternately, for a few rounds. The model runs on one
thread (``train.threads = 1``), leaving the machine's other core to the reader thread the way a GPU leaves the
CPU free while it trains; on a machine with a GPU, run it with ``--device cuda``. Reports images/s from the first
to the last step of each run (set-up and compile left out) and the median per-round ratio.

    python benchmarks/prefetch.py [--images 64] [--steps 24] [--rounds 3] [--device cpu] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_pipeline import cpu_model, make_jpegs

from sdstudio.core import events as ev
from sdstudio.core.config import RunConfig
from sdstudio.core.train.loop import train


def run_rate(config: RunConfig, run_dir: Path) -> float:
    """Images/s between the first and the last optimizer step of one run."""
    stamps: list[float] = []
    last = None
    for event in train(config, run_dir=run_dir):
        if isinstance(event, ev.StepMetrics):
            stamps.append(time.perf_counter())
        last = event
    if not isinstance(last, ev.Finished):
        raise SystemExit(f"the run did not finish: {last}")
    steps = len(stamps) - 1
    return steps * config.train.batch_size / (stamps[-1] - stamps[0])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        make_jpegs(folder, args.images, (2048, 1536), "img")
        base = RunConfig().with_overrides({
            "data.path": str(folder), "data.resolution": 32, "data.val_split": 0.0, "data.center_crop": False,
            "data.flip_p": 0.5, "model.block_channels": [16, 32], "model.attention_levels": [False, True],
            "model.conditional": False, "train.batch_size": args.batch, "train.max_steps": args.steps,
            "train.log_every": 1, "train.threads": 1, "train.device": args.device, "sample.every_epochs": 0,
            "sample.every_steps": 0, "sample.at_end": False, "checkpoint.every_steps": 0})
        rounds = []
        for r in range(args.rounds):
            order = (0, 2) if r % 2 == 0 else (2, 0)
            rates = {}
            for depth in order:
                cfg = base.with_overrides({"data.prefetch_batches": depth})
                rates[depth] = run_rate(cfg, Path(tmp) / f"run-{r}-{depth}")
            rounds.append({"round": r, "img_per_s_off": rates[0], "img_per_s_ahead2": rates[2],
                           "ratio": rates[2] / rates[0]})
            print(f"round {r}: {rates[0]:.1f} img/s reading when needed, {rates[2]:.1f} img/s reading 2 ahead, "
                  f"ratio {rates[2] / rates[0]:.2f}", flush=True)
    result = {"benchmark": "prefetch", "device": args.device,
              "machine": cpu_model() if args.device == "cpu" else torch.cuda.get_device_name(),
              "cpu_count": __import__("os").cpu_count(), "python": platform.python_version(),
              "torch": torch.__version__, "images": args.images, "batch": args.batch, "steps": args.steps,
              "rounds": rounds, "median_ratio": statistics.median(r["ratio"] for r in rounds)}
    print(f"median ratio (2 ahead / when needed): {result['median_ratio']:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
