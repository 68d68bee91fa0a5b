"""`sdstudio lora merge | resize | extract`: LoRA files in, one LoRA (or a merged model) out."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from ..core.export.formats import DTYPE_NAMES
from .common import EXIT_OK


def _weighted(text: str) -> tuple[Path, float]:
    """"A.safetensors:0.7" -> (A.safetensors, 0.7); no ":W" = weight 1 (a Windows drive letter is no weight)."""
    head, sep, tail = text.rpartition(":")
    if sep and head and not (len(head) == 1 and head.isalpha()):
        try:
            return Path(head), float(tail)
        except ValueError:
            pass
    return Path(text), 1.0


def register(sub: Any) -> None:
    p = sub.add_parser("lora", help="merge, resize or extract LoRA files")
    tools = p.add_subparsers(dest="lora_command", metavar="TOOL", required=True, parser_class=type(p))
    flags = {"out": "--out", "force": "--force", "rank": "--rank", "into": "--into"}

    m = tools.add_parser("merge", help="several LoRA / LyCORIS files with weights into one LoRA, or into a base "
                         "model (--into)")
    m.add_argument("inputs", nargs="+", metavar="FILE[:W]", help="LoRA files, each with an optional :weight")
    m.add_argument("--rank", type=int, default=None, help="SVD the sum to this rank (default: concatenate the "
                   "ranks, exact)")
    m.add_argument("--into", type=Path, default=None, help="a base model file or folder to merge the LoRAs into; "
                   "--out is then a .safetensors file or a folder, as the base is")
    _common(m)
    m.set_defaults(func=run_merge, flags=flags)

    r = tools.add_parser("resize", help="reduce a LoRA's rank by SVD (reports the error kept)")
    r.add_argument("input", type=Path, metavar="IN")
    how = r.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=int, help="the new rank")
    how.add_argument("--sv-ratio", type=float, help="keep singular values above max / X")
    how.add_argument("--sv-fro", type=float, help="keep the fewest singular values holding this fraction (0-1] of "
                     "the Frobenius norm")
    _common(r)
    r.set_defaults(func=run_resize, flags=flags)

    e = tools.add_parser("extract", help="a LoRA from the difference of a fine-tuned model and its base")
    e.add_argument("--base", type=Path, required=True, help="the base model (file or folder)")
    e.add_argument("--tuned", type=Path, required=True, help="the fine-tuned model (file or folder)")
    e.add_argument("--rank", type=int, required=True, help="rank of the extracted LoRA")
    e.add_argument("--min-diff", type=float, default=1e-6, help="skip layers whose largest change is below this")
    e.add_argument("--unet-only", action="store_true", help="leave the text encoder(s) out")
    _common(e)
    e.set_defaults(func=run_extract, flags=flags)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="the output .safetensors file (a folder for --into a "
                   "diffusers folder)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=DTYPE_NAMES[0], help="tensor dtype of the output")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")


def _dtype(args: argparse.Namespace) -> Any:
    from ..core.export.formats import torch_dtype

    return torch_dtype(args.dtype)


def _print(report: Any) -> int:
    print(report.summary())
    for note in report.notes:
        print(f"  {note}")
    return EXIT_OK


def run_merge(args: argparse.Namespace) -> int:
    from ..core.lora_tools.ops import merge_loras

    if args.into is not None and args.rank is not None:
        raise UserError("--rank and --into: merging into a base model keeps every LoRA at full strength; give one")
    inputs = [_weighted(t) for t in args.inputs]
    return _print(merge_loras(inputs, args.out, rank=args.rank, into=args.into, dtype=_dtype(args),
                              force=args.force))


def run_resize(args: argparse.Namespace) -> int:
    from ..core.lora_tools.ops import resize_lora

    return _print(resize_lora(args.input, args.out, rank=args.rank, sv_ratio=args.sv_ratio, sv_fro=args.sv_fro,
                              dtype=_dtype(args), force=args.force))


def run_extract(args: argparse.Namespace) -> int:
    from ..core.lora_tools.ops import extract_lora

    return _print(extract_lora(args.base, args.tuned, args.out, rank=args.rank, min_diff=args.min_diff,
                               text_encoder=not args.unet_only, dtype=_dtype(args), force=args.force))
