"""`sdstudio export (RUN_DIR | CHECKPOINT_DIR) --format FORMAT --out PATH [--dtype] [--ema] [--force]`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from ..core.export.formats import DTYPE_NAMES, EXPORT_FORMATS, FORMAT_NAMES, get_format
from .common import EXIT_OK


def register(sub: Any) -> None:
    p = sub.add_parser("export", help="export a trained LoRA or model for A1111 / ComfyUI / diffusers")
    p.add_argument("source", type=Path, metavar="RUN_DIR|CHECKPOINT_DIR",
                   help="a run folder (its newest valid checkpoint) or a checkpoint folder")
    p.add_argument("--format", required=True, choices=FORMAT_NAMES,
                   help="; ".join(f"{f.name}: {f.label}" for f in EXPORT_FORMATS.values()))
    p.add_argument("--out", type=Path, required=True, help="output file (a folder for diffusers-folder)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=DTYPE_NAMES[0],
                   help=f"tensor dtype of the export (default {DTYPE_NAMES[0]})")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (the run must have used EMA)")
    p.add_argument("--best", action="store_true", help="export the checkpoint with the best validation loss")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.set_defaults(func=run, flags={"out": "--out", "force": "--force"})


def run(args: argparse.Namespace) -> int:
    from ..core.export.api import export
    from ..core.export.formats import torch_dtype

    fmt = get_format(args.format)
    if not fmt.folder and args.out.suffix.lower() != fmt.suffix:
        raise UserError(f"--out {args.out}: a {fmt.name} export is a {fmt.suffix} file; name it *{fmt.suffix}")
    path = export(args.source, args.format, args.out, dtype=torch_dtype(args.dtype), use_ema=args.ema, force=args.force,
                  best=args.best)
    print(f"exported {args.format} to {path}")
    return EXIT_OK
