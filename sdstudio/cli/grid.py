"""`sdstudio grid RUN --prompt P [--prompt P2 ...] [--every N] --out grid.png`: the checkpoint x prompt grid."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .common import say


def register(sub: Any) -> None:
    p = sub.add_parser("grid", help="sample every saved checkpoint of a run with the same prompts and seeds",
                       description="One column per checkpoint (every N-th with --every, the newest always in), one "
                       "row per prompt and seed; column headers show the step and the validation loss / KID the "
                       "run measured there. Pick a column and export it with `sdstudio export CHECKPOINT_DIR`.")
    p.add_argument("run", type=Path, metavar="RUN", help="run folder")
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeatable: one row each)")
    p.add_argument("--seed", type=int, action="append", help="seed (repeatable; default 0)")
    p.add_argument("--every", type=int, default=1, help="every N-th checkpoint, counted back from the newest")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the run's)")
    p.add_argument("--raw", action="store_true", help="use the raw weights even when the checkpoints have EMA")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--json", action="store_true", help="print the columns (step, checkpoint, metrics) as JSON")
    p.add_argument("--out", type=Path, required=True, help="the grid image (.png)")
    p.set_defaults(func=run, flags={"out": "--out"})


def run(args: argparse.Namespace) -> int:
    from PIL import Image

    from ..core.atomic import write_file_atomic
    from ..core.sampling.checkpoint_grid import checkpoint_grid, column_summary

    grid = checkpoint_grid(args.run, args.prompt, seeds=args.seed or [0], every=args.every, steps=args.steps,
                           guidance=args.guidance, use_ema=not args.raw, device=args.device,
                           progress=lambda done, total: say(f"checkpoint {done} of {total} sampled"))
    image = Image.fromarray(grid.render())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(args.out, lambda tmp: image.save(tmp, format="PNG"))
    columns = column_summary(grid)
    if args.json:
        print(json.dumps(columns, indent=1))
    else:
        for c in columns:
            metrics = ", ".join(f"{k} {c[k]:.5f}" for k in ("val_loss", "kid", "fid") if c[k] is not None)
            if c["memo_ratio"] is not None:  # eval.memorisation: near 0 = the samples copy training images
                metrics += (", " if metrics else "") + f"memorisation {c['memo_ratio']:.3f}" + (
                    " (copies training images)" if c["copying"] else "")
            say(f"step {c['step']}: {c['checkpoint']}" + (f" ({metrics})" if metrics else ""))
    say(f"grid: {args.out}")
    return 0
