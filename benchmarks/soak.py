"""Soak: a long run of a micro model must keep memory flat (metrics, events and buffers bounded, or linear
only in logged points). Prints the process RSS at checkpoints of the run and the growth between 2k and the end.

    python benchmarks/soak.py [--steps 20000] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import psutil

from sdstudio.core import events as ev
from sdstudio.core.demo_shapes import generate_demo_dataset
from sdstudio.core.presets import load_preset
from sdstudio.core.train.loop import train


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    proc = psutil.Process()
    marks = sorted({min(args.steps, m) for m in (500, 2000, 5000, 10000, 20000, args.steps)})
    rss: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        generate_demo_dataset(data, per_class=2, size=16, seed=0)
        config = load_preset("demo").with_overrides({
            "data.path": str(data), "data.resolution": 8, "data.val_split": 0.0,
            "model.block_channels": [8, 16], "model.attention_levels": [False, True], "model.attention_head_dim": 8,
            "model.text_width": 8, "model.text_layers": 1, "model.text_heads": 1, "model.max_caption_tokens": 8,
            "train.batch_size": 4, "train.max_steps": args.steps, "train.log_every": 1, "train.device": "cpu",
            "sample.every_epochs": 0, "sample.every_steps": 2000, "sample.steps": 2, "sample.seeds": [0],
            "checkpoint.every_steps": 2000, "checkpoint.keep_last": 2})
        t0 = time.perf_counter()
        for event in train(config, run_dir=Path(tmp) / "run"):
            if isinstance(event, ev.StepMetrics) and event.step in marks:
                rss[event.step] = proc.memory_info().rss / 2**20
                print(f"step {event.step:>6}: RSS {rss[event.step]:.1f} MiB ({time.perf_counter() - t0:.0f} s)",
                      flush=True)
            elif isinstance(event, ev.Failed):
                print(f"failed: {event.message}", file=sys.stderr)
                return 1
        metrics_mb = (Path(tmp) / "run" / "metrics.jsonl").stat().st_size / 2**20
    first = rss.get(2000, next(iter(rss.values())))
    last = rss[max(rss)]
    result = {"steps": args.steps, "rss_mib": rss, "growth_after_2k_mib": last - first,
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "metrics_jsonl_mib": metrics_mb, "seconds": time.perf_counter() - t0}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
