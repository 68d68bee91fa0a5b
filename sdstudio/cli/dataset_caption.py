"""`sdstudio dataset caption DIR (--tagger FOLDER | --captioner FOLDER) ...`: caption a dataset with a local
WD14 tagger or an image-to-text model; resumable and undoable."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from sdstudio.core.captioning import Labeler
from sdstudio.core.errors import UserError
from sdstudio.core.events import Progress

from .common import EXIT_OK


def register_caption(commands: Any) -> None:
    caption = commands.add_parser(
        "caption", help="write captions with a WD14 tagger or an image-to-text model",
        description="Caption every image of DIR with a local model folder and write the captions in the "
        "dataset's own convention (sidecar .txt / .caption, or metadata.jsonl). Images that already have a "
        "caption are skipped unless --mode replace or append. An interrupted run continues where it "
        "stopped when started again with the same options. Undo with 'sdstudio dataset undo DIR'.")
    caption.add_argument("dir", metavar="DIR", type=Path, help="the dataset folder")
    model = caption.add_mutually_exclusive_group(required=True)
    model.add_argument("--tagger", type=Path, metavar="FOLDER",
                       help="a WD14 tagger folder (model.onnx + selected_tags.csv)")
    model.add_argument("--captioner", type=Path, metavar="FOLDER",
                       help="a transformers model folder: image-to-text (BLIP style) or a vision-language "
                       "chat model (Qwen2-VL / Qwen2.5-VL class, with a chat template)")
    caption.add_argument("--mode", choices=("replace", "append", "skip"), default="skip",
                         help="what to do with images that already have a caption (default: skip)")
    caption.add_argument("--trigger", metavar="WORD", help="put WORD first in every caption")
    caption.add_argument("--threshold", type=float, default=0.35, metavar="T",
                         help="tagger: minimum score of a general tag (default 0.35)")
    caption.add_argument("--character-threshold", type=float, default=0.85, metavar="T",
                         help="tagger: minimum score of a character tag (default 0.85)")
    caption.add_argument("--exclude", action="append", default=[], metavar="TAG",
                         help="tagger: never write TAG (repeatable, or comma-separated)")
    caption.add_argument("--keep-underscores", action="store_true",
                         help="tagger: write tags as 'long_hair' instead of 'long hair'")
    caption.add_argument("--ratings", action="store_true", help="tagger: add the rating tag last")
    caption.add_argument("--prompt", metavar="TEXT",
                         help="captioner: a vision-language model's instruction (default 'Describe this image "
                         "in one sentence.'); for a BLIP-style model the text the caption starts from")
    caption.add_argument("--max-new-tokens", type=int, default=40, metavar="N",
                         help="captioner: longest caption in tokens (default 40)")
    caption.add_argument("--batch-size", type=int, default=8, metavar="N", help="images per batch (default 8)")
    caption.add_argument("--device", metavar="DEVICE", help="captioner: cpu, cuda, mps (default: the GPU when "
                         "there is one)")
    caption.add_argument("--restart", action="store_true",
                         help="ignore an interrupted run and start over")
    caption.add_argument("--only", action="append", metavar="FILE_OR_GLOB",
                          help="only these images: a file or glob relative to DIR, e.g. 'cat.png' or 'sub/*.jpg' "
                          "(repeatable; what the app's grid selection does)")
    caption.set_defaults(func=run_caption, flags={"only": "--only"}, flag_subjects=("only",))


def _labeler(args: argparse.Namespace) -> Labeler:
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be 1 or more, not {args.batch_size}")
    if args.tagger is not None:
        from sdstudio.core.captioning.wd14 import TaggerOptions, WD14Tagger

        for name, value in (("--threshold", args.threshold), ("--character-threshold", args.character_threshold)):
            if not 0.0 <= value <= 1.0:
                raise UserError(f"{name} must be between 0 and 1, not {value}")
        exclude = tuple(t.strip() for item in args.exclude for t in item.split(",") if t.strip())
        options = TaggerOptions(general_threshold=args.threshold, character_threshold=args.character_threshold,
                                exclude=exclude, underscores_to_spaces=not args.keep_underscores,
                                include_ratings=args.ratings, batch_size=args.batch_size)
        return WD14Tagger(args.tagger, options)
    from sdstudio.core.captioning.image_to_text import CaptionerOptions
    from sdstudio.core.captioning.vision_language import open_captioner

    return open_captioner(args.captioner, CaptionerOptions(
        prompt=args.prompt, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, device=args.device))


def _progress_printer() -> Any:
    def show(event: Progress) -> None:
        if sys.stderr.isatty() and event.total:
            end = "\n" if event.done == event.total else ""
            print(f"\rCaptioning: {event.done}/{event.total}", end=end, file=sys.stderr, flush=True)
    return show


def run_caption(args: argparse.Namespace) -> int:
    from sdstudio.core.captioning.job import run_caption_job
    from sdstudio.core.data.image_selection import select_images

    only = select_images(args.dir, args.only) if args.only else None  # before a model loads: typos fail fast
    labeler = _labeler(args)
    try:
        result = run_caption_job(args.dir, labeler, mode=args.mode, trigger=args.trigger, restart=args.restart,
                                 images=only, progress=_progress_printer())
    except KeyboardInterrupt:
        print("\nstopped: the captions written so far are kept (undo restores them); run the same command "
              "again to continue with the rest", file=sys.stderr)
        raise
    if result.resumed:
        print(f"continued an interrupted run ({result.already_done} image(s) were already done)",
              file=sys.stderr)
    for image, why in result.failed:
        print(f"skipped {image}: {why}", file=sys.stderr)
    skipped = f", {result.skipped_existing} already captioned left alone (--mode replace or append to change "\
        "them)" if result.skipped_existing else ""
    undo = f" Undo with: sdstudio dataset undo {args.dir}" if result.journal else ""
    print(f"captioned {result.written} image(s){skipped}.{undo}", file=sys.stderr)
    return EXIT_OK
