"""`sdstudio dataset check DIR [--json] [--resolution N]`: the dataset health check from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdstudio.core.data.report import build_report, format_report
from sdstudio.core.data.scan import scan_dataset
from sdstudio.core.errors import UserError

from .common import EXIT_BAD_INPUT, EXIT_OK

DEFAULT_RESOLUTION = 512


def register(subparsers: Any) -> None:
    """Add the ``dataset`` command (with ``check``) to the main parser's subparsers."""
    parser = subparsers.add_parser(
        "dataset", help="inspect a dataset folder, edit and write its captions",
        description="Inspect dataset folders ('check' is read-only) and edit their captions ('tags', "
        "'caption', 'undo').")
    commands = parser.add_subparsers(dest="dataset_command", metavar="COMMAND")
    check = commands.add_parser(
        "check", help="report problems, sizes and captions of a dataset folder",
        description="Scan DIR (a folder of images, a kohya parent of N_name folders, or a Hugging Face "
        "imagefolder), decode every image and report problems, sizes, captions and duplicates. "
        "Exit 0 when the check ran (whatever it found), 2 when DIR cannot be read.")
    check.add_argument("dir", metavar="DIR", type=Path, help="the dataset folder")
    check.add_argument("--json", action="store_true",
                       help="print the report as JSON (see docs/dataset-report.md)")
    check.add_argument("--masked", action="store_true",
                       help="check for masked training (loss.masked): list the images without a mask")
    check.add_argument("--mask-from-alpha", action="store_true",
                       help="with --masked: an image's alpha channel counts as its mask (data.mask_from_alpha)")
    check.add_argument("--resolution", type=int, default=DEFAULT_RESOLUTION, metavar="N",
                       help=f"training resolution, for the too-small check (default {DEFAULT_RESOLUTION}; "
                       "0 turns that check off)")
    check.set_defaults(func=run_check)
    from sdstudio.cli.dataset_tools import register as register_tools

    register_tools(commands)  # tags, undo, caption (they write captions, through the undo journal)

    def usage(_args: argparse.Namespace) -> int:
        parser.print_usage(sys.stderr)
        print("sdstudio dataset: choose a command, e.g. 'sdstudio dataset check DIR'", file=sys.stderr)
        return EXIT_BAD_INPUT

    parser.set_defaults(func=usage)


def _progress_printer() -> Callable[[int, int], None] | None:
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        if total and (done == total or done % 50 == 0):
            end = "\n" if done == total else ""
            print(f"\rChecking images: {done}/{total}", end=end, file=sys.stderr, flush=True)

    return show


def run_check(args: argparse.Namespace) -> int:
    """Run the health check; 0 when it ran, 2 (one line on stderr) when the folder cannot be read."""
    resolution = getattr(args, "resolution", DEFAULT_RESOLUTION)
    as_json = bool(getattr(args, "json", False))
    if resolution < 0:
        print(f"sdstudio dataset check: --resolution must be 0 or more, not {resolution}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        scan = scan_dataset(args.dir, resolution=resolution, decode=True, find_duplicates=True,
                            progress=_progress_printer())
    except UserError as exc:
        print(f"sdstudio dataset check: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    report = build_report(scan, resolution, masked=bool(getattr(args, "masked", False)),
                          mask_from_alpha=bool(getattr(args, "mask_from_alpha", False)))
    print(json.dumps(report, indent=2) if as_json else format_report(report))
    return EXIT_OK
