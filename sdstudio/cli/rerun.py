"""`sdstudio rerun RUN_OR_CARD --out NEW_RUN`: do a run again from its run card."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from .common import say
from .train import drive_training


def register(sub: Any) -> None:
    p = sub.add_parser("rerun", help="do a run again from its run card (run-card.json)",
                       description="Repeat a run: the card's config into a new run folder. The dataset is checked "
                       "against the card's manifest and the libraries/device against the card's; what differs is "
                       "said before training starts.")
    p.add_argument("source", type=Path, metavar="RUN_OR_CARD", help="a run folder or its run-card.json")
    p.add_argument("--out", type=Path, required=True, help="the new run folder")
    p.add_argument("--data", help="where the dataset lies now, when it moved (replaces data.path)")
    p.add_argument("--strict", action="store_true", help="refuse when the dataset differs from the card's manifest")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run, flags={"out": "--out", "data.path": "--data"})


def run(args: argparse.Namespace) -> int:
    from ..core.train.rerun import plan_rerun

    plan = plan_rerun(args.source, data_path=args.data)
    for line in plan.describe():
        say(line)
    if args.strict and plan.dataset_notes:
        raise UserError(f"{args.source}: the dataset differs from the run card ({'; '.join(plan.dataset_notes)}); "
                        "drop --strict to rerun anyway")
    return drive_training(plan.config, args.out.resolve(), resume=False, quiet=args.quiet, args=args)
