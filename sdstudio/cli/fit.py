"""`sdstudio fit --preset P --data DIR [--set ...] [--budget-gb N] [--out FILE.toml]`: try the memory levers in a
short trial and write the fastest setting that fits as a config file for `sdstudio train --config FILE.toml`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from .common import EXIT_BAD_INPUT, EXIT_OK, add_config_args, resolve_config, say


def register(sub: Any) -> None:
    p = sub.add_parser("fit", help="find the fastest settings that fit this GPU's memory (a short trial)",
                       description="Runs a few training steps of each candidate setting (gradient checkpointing, "
                       "8-bit optimizer, quantized base, offloading, block swap, smaller batches) at the run's "
                       "resolution until one fits the free memory with a 10%% margin, prints what it tried and "
                       "writes the winner as a config file for `sdstudio train --config FILE.toml`.")
    add_config_args(p)
    p.add_argument("--budget-gb", type=float, metavar="N", help="memory to fit in GB (default: the GPU's free "
                   "memory; needed on a machine without a GPU)")
    p.add_argument("--out", type=Path, metavar="FILE.toml", help="where to write the winning config "
                   "(default: fit.toml)")
    p.add_argument("--steps", type=int, default=3, help="training steps per trial (default 3)")
    p.set_defaults(func=run, flags={"out": "--out"})


def run(args: argparse.Namespace) -> int:
    config, _label = resolve_config(args)
    problems = config.readiness_problems()
    if problems:
        raise UserError("; ".join(problems))
    if args.budget_gb is not None and args.budget_gb <= 0:
        raise UserError(f"--budget-gb {args.budget_gb:g}: give the memory in GB, e.g. --budget-gb 8")
    from ..core.presets import write_toml_atomic
    from ..core.train.fit import fit, overlay

    def show(trial: Any) -> None:
        say(f"tried {trial.name}: " + ("fits" if trial.fits else "does not fit") +
            (f" ({trial.note})" if trial.note else ""))

    result = fit(config, budget_gb=args.budget_gb, steps=max(1, args.steps), on_trial=show)
    print(f"budget {result.budget_bytes / 2**30:.2f} GiB (10% kept free)")
    print(result.table())
    if result.winner is None:
        print("nothing tried fits: lower data.resolution or lora.rank, or use a larger GPU", file=sys.stderr)
        return EXIT_BAD_INPUT
    out = args.out or Path("fit.toml")
    write_toml_atomic(out, overlay(config, result.winner))
    changes = ", ".join(f"{k}={v}" for k, v in result.winner.overrides.items()) or "no changes needed"
    print(f"winner: {result.winner.name} ({changes}); written to {out}: sdstudio train --config {out}")
    return EXIT_OK
