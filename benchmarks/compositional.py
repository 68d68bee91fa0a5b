"""Compositional test at demo size: train the demo preset on coloured shapes on white / black with some
colour-shape-background combinations held out, then score samples for seen and held-out captions.

    python benchmarks/compositional.py --out OUT [--label NAME] [--set model.text_causal=false ...]
                                       [--samples 8] [--steps N]

Prints the table (per-attribute and all-correct accuracy, seen vs held-out) and the training time, and writes
OUT/compositional.json. The training set (18 seen combinations x 16 images, 32 px, like the demo's 288) is
written to OUT/data; the run folder is OUT/run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from sdstudio.core import events as ev
from sdstudio.core.metrics import compositional
from sdstudio.core.overrides import parse_set_value
from sdstudio.core.presets import load_preset
from sdstudio.core.sampling.from_run import load_trained
from sdstudio.core.train.loop import train


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--label", default="default")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--samples", type=int, default=8, help="samples per combination")
    parser.add_argument("--steps", type=int, default=0, help="train.max_steps (0 = the preset's)")
    parser.add_argument("--per-combo", type=int, default=16)
    parser.add_argument("--evaluate", type=Path, metavar="RUN_OR_CHECKPOINT",
                        help="skip training: score this run's newest checkpoint (or this checkpoint folder)")
    parser.add_argument("--guidance", type=float, nargs="+", default=[],
                        help="with --evaluate: score at each of these guidance scales (default: the run's)")
    parser.add_argument("--sampler", choices=["ddpm", "ddim", "euler", "dpmpp_2m"],
                        help="with --evaluate: this sampler instead of the run's sample.sampler")
    parser.add_argument("--sample-steps", type=int, default=0,
                        help="with --evaluate: sampler steps (0 = the run's sample.steps)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.evaluate:
        return evaluate_only(args)
    data = args.out / "data"
    compositional.write_dataset(data, per_combo=args.per_combo, size=32, seed=0)
    overrides = {"data.path": str(data), "train.device": "cpu"}
    if args.steps:
        overrides["train.max_steps"] = args.steps
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key.strip()] = parse_set_value(value.strip())
    config = load_preset("demo").with_overrides(overrides)
    run = args.out / "run"
    t0 = time.perf_counter()
    for event in train(config, run_dir=run):
        if isinstance(event, ev.Failed):
            print(f"failed: {event.message}\n{event.details}", file=sys.stderr)
            return 1
    train_s = time.perf_counter() - t0
    loaded = load_trained(run)
    t1 = time.perf_counter()
    report = compositional.evaluate(lambda prompts, seeds: loaded.generate(prompts, seeds),
                                    samples_per_combo=args.samples)
    result = {"label": args.label, "overrides": {k: v for k, v in overrides.items() if k != "data.path"},
              "train_s": round(train_s, 1), "eval_s": round(time.perf_counter() - t1, 1),
              "steps": config.train.max_steps, "torch_threads": torch.get_num_threads(),
              "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
              "load_average": os.getloadavg(), **report.as_dict()}
    print(f"{args.label}: trained {config.train.max_steps} steps in {train_s / 60:.1f} min "
          f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    print(report.table())
    (args.out / "compositional.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


def evaluate_only(args: argparse.Namespace) -> int:
    loaded = load_trained(args.evaluate)
    step = loaded.checkpoint.name
    for guidance in args.guidance or [loaded.config.sample.guidance]:
        t1 = time.perf_counter()
        report = compositional.evaluate(
            lambda prompts, seeds, g=guidance: loaded.generate(prompts, seeds, guidance=g, sampler=args.sampler,
                                                               steps=args.sample_steps or None),
            samples_per_combo=args.samples)
        sampler = args.sampler or loaded.config.sample.sampler
        steps = args.sample_steps or loaded.config.sample.steps
        result = {"label": args.label, "checkpoint": str(loaded.checkpoint), "guidance": guidance,
                  "sampler": sampler, "sample_steps": steps,
                  "eval_s": round(time.perf_counter() - t1, 1), "torch_threads": torch.get_num_threads(),
                  **report.as_dict()}
        print(f"{args.label} ({step}, {sampler} {steps} steps, guidance {guidance}):")
        print(report.table(), flush=True)
        tag = "" if args.sampler is None and not args.sample_steps else f"-{sampler}{steps}"
        out = args.out / f"compositional-{step}{tag}-g{guidance:g}.json"
        out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
