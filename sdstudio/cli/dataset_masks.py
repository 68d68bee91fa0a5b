"""`sdstudio dataset masks DIR (--from-alpha | --prompt TEXT --segmenter FOLDER)`: write a training mask
(``name.mask.png``) beside each image, from its alpha channel or from a text prompt with a local CLIPSeg
model; undoable with ``sdstudio dataset undo DIR``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from sdstudio.core.errors import UserError
from sdstudio.core.events import Progress

from .common import EXIT_OK


def register_masks(commands: Any) -> None:
    masks = commands.add_parser(
        "masks", help="write training masks (name.mask.png) from the alpha channel or a text prompt",
        description="Write a mask beside every image of DIR (name.mask.png: white = train on this pixel, "
        "black = ignore it), from the image's alpha channel (--from-alpha) or from a text prompt with a local "
        "CLIPSeg model folder (--prompt 'a dog' --segmenter FOLDER). Images that already have a mask are "
        "skipped unless --mode replace. Undo with 'sdstudio dataset undo DIR'.")
    masks.add_argument("dir", metavar="DIR", type=Path, help="the dataset folder")
    source = masks.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-alpha", action="store_true",
                        help="use each image's alpha channel (transparent = not trained)")
    source.add_argument("--prompt", metavar="TEXT", help="what to keep, e.g. 'a dog' (needs --segmenter)")
    masks.add_argument("--segmenter", type=Path, metavar="FOLDER",
                       help="a CLIPSeg model folder (e.g. a copy of CIDAS/clipseg-rd64-refined)")
    masks.add_argument("--threshold", type=float, default=0.4, metavar="T",
                       help="--prompt: probability above which a pixel is kept (default 0.4)")
    masks.add_argument("--mode", choices=("replace", "skip"), default="skip",
                       help="what to do with images that already have a mask (default: skip)")
    masks.add_argument("--batch-size", type=int, default=8, metavar="N", help="images per batch (default 8)")
    masks.add_argument("--device", metavar="DEVICE",
                       help="--prompt: cpu, cuda, mps (default: the GPU when there is one)")
    masks.add_argument("--only", action="append", metavar="FILE_OR_GLOB",
                        help="only these images: a file or glob relative to DIR, e.g. 'cat.png' or 'sub/*.jpg' "
                        "(repeatable; what the app's grid selection does)")
    masks.set_defaults(func=run_masks, flags={"only": "--only"}, flag_subjects=("only",))


def _progress_printer() -> Any:
    def show(event: Progress) -> None:
        if sys.stderr.isatty() and event.total:
            end = "\n" if event.done == event.total else ""
            print(f"\rMasks: {event.done}/{event.total}", end=end, file=sys.stderr, flush=True)
    return show


def run_masks(args: argparse.Namespace) -> int:
    from sdstudio.core.data.image_selection import select_images
    from sdstudio.core.data.masks import masks_from_alpha, run_mask_job

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be 1 or more, not {args.batch_size}")
    only = select_images(args.dir, args.only) if args.only else None  # before a model loads: typos fail fast
    if args.from_alpha:
        if args.segmenter is not None:
            raise UserError("--segmenter goes with --prompt TEXT, not --from-alpha")
        make, label = masks_from_alpha, "masks (from alpha)"
    else:
        if args.segmenter is None:
            raise UserError("--prompt needs --segmenter FOLDER: a local CLIPSeg model folder "
                            "(e.g. a copy of CIDAS/clipseg-rd64-refined)")
        if not args.prompt.strip():
            raise UserError("--prompt is empty: say what to keep, e.g. --prompt 'a dog'")
        if not 0.0 <= args.threshold <= 1.0:
            raise UserError(f"--threshold must be between 0 and 1, not {args.threshold}")
        from sdstudio.core.data.clipseg import SegmenterOptions, prompt_mask_maker

        make = prompt_mask_maker(args.segmenter, args.prompt, SegmenterOptions(
            threshold=args.threshold, batch_size=args.batch_size, device=args.device))
        label = f"masks (prompt {args.prompt.strip()!r})"
    result = run_mask_job(args.dir, make, label=label, mode=args.mode, batch_size=args.batch_size,
                          images=only, progress=_progress_printer())
    for image, why in result.failed:
        print(f"no mask for {image}: {why}", file=sys.stderr)
    skipped = f", {result.skipped_existing} existing mask(s) left alone (--mode replace to redo them)" \
        if result.skipped_existing else ""
    undo = f" Undo with: sdstudio dataset undo {args.dir}" if result.journal else ""
    print(f"wrote {result.written} mask(s){skipped}.{undo}", file=sys.stderr)
    return EXIT_OK
