"""`sdstudio export (RUN_DIR | CHECKPOINT_DIR) --format FORMAT --out PATH [--dtype] [--ema] [--force]`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from .common import EXIT_OK

FORMATS = ("kohya", "diffusers", "single-file", "diffusers-folder")
DTYPES = ("fp32", "fp16", "bf16")


def register(sub: Any) -> None:
    p = sub.add_parser("export", help="export a trained LoRA or model for A1111 / ComfyUI / diffusers")
    p.add_argument("source", type=Path, metavar="RUN_DIR|CHECKPOINT_DIR",
                   help="a run folder (its newest valid checkpoint) or a checkpoint folder")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="kohya / diffusers: LoRA files; single-file: a full model in the original layout; "
                        "diffusers-folder: a diffusers pipeline folder")
    p.add_argument("--out", type=Path, required=True, help="output file (a folder for diffusers-folder)")
    p.add_argument("--dtype", choices=DTYPES, default="fp16", help="tensor dtype of the export (default fp16)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (the run must have used EMA)")
    p.add_argument("--best", action="store_true", help="export the checkpoint with the best validation loss")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.set_defaults(func=run, flags={"out": "--out", "force": "--force"})


def run(args: argparse.Namespace) -> int:
    import torch

    from ..core.export.api import export

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    if args.format != "diffusers-folder" and args.out.suffix.lower() != ".safetensors":
        raise UserError(f"--out {args.out}: a {args.format} export is a .safetensors file; name it *.safetensors")
    path = export(args.source, args.format, args.out, dtype=dtype, use_ema=args.ema, force=args.force,
                  best=args.best)
    print(f"exported {args.format} to {path}")
    return EXIT_OK
