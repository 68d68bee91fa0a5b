"""`sdstudio dataset tags | undo | caption | masks`: bulk tag edits, undo, automatic captioning and masks from
the command line. Every write goes through the dataset's undo journal (DIR/.sdstudio/undo/)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from sdstudio.core.data import tags as tag_ops
from sdstudio.core.data.caption_edits import dataset_tag_table, plan_dataset_edit, write_plan
from sdstudio.core.data.undo_journal import undo_last
from sdstudio.core.errors import UserError

from .common import EXIT_OK

PREVIEW_LIMIT = 20


def register(commands: Any) -> None:
    """Add ``tags``, ``undo`` and ``caption`` to the ``dataset`` command's subparsers."""
    tags = commands.add_parser(
        "tags", help="list the dataset's tags, or rename / remove / add tags in every caption",
        description="Without an edit option: the tag table (tag, number of images). With one: edit the "
        "comma-separated tag captions of the dataset (or of the images --where / --where-not select); "
        "prose captions are left alone unless --include-prose. Undo with 'sdstudio dataset undo DIR'.")
    tags.add_argument("dir", metavar="DIR", type=Path, help="the dataset folder")
    tags.add_argument("--json", action="store_true", help="print the tag table (or the plan) as JSON")
    edit = tags.add_mutually_exclusive_group()
    edit.add_argument("--rename", nargs=2, metavar=("OLD", "NEW"), help="rename tag OLD to NEW")
    edit.add_argument("--remove", metavar="TAG", help="remove TAG")
    edit.add_argument("--add", metavar="TAG", help="add TAG (at the end, or first with --first)")
    edit.add_argument("--replace", nargs=2, metavar=("FROM", "TO"),
                      help="replace text inside every tag, e.g. --replace _ ' '")
    edit.add_argument("--move-first", metavar="TAG", help="move TAG to the front where it is present")
    edit.add_argument("--dedupe", action="store_true", help="drop repeated tags within each caption")
    tags.add_argument("--first", action="store_true", help="with --add: put the tag first")
    tags.add_argument("--where", action="append", default=[], metavar="TAG",
                      help="only images that have TAG (repeat: all of them)")
    tags.add_argument("--where-not", action="append", default=[], metavar="TAG",
                      help="only images that do not have TAG (repeat: none of them)")
    tags.add_argument("--include-prose", action="store_true",
                      help="treat prose captions as comma-separated tags too")
    tags.add_argument("--dry-run", action="store_true", help="show what would change; write nothing")
    tags.set_defaults(func=run_tags)

    undo = commands.add_parser(
        "undo", help="restore the captions (or masks) from before the last edit, captioning or mask run",
        description="Put back, byte for byte, every caption (or mask) file the last bulk edit, captioning "
        "or mask run changed, and delete the ones it created. Repeat to go further back.")
    undo.add_argument("dir", metavar="DIR", type=Path, help="the dataset folder")
    undo.set_defaults(func=run_undo)

    from sdstudio.cli.dataset_caption import register_caption
    from sdstudio.cli.dataset_masks import register_masks

    register_caption(commands)
    register_masks(commands)


def _operation(args: argparse.Namespace) -> tuple[tag_ops.TagOperation, str] | None:
    if args.rename:
        old, new = (t.strip() for t in args.rename)
        return tag_ops.rename(old, new), f"rename {old!r} to {new!r}"
    if args.remove:
        return tag_ops.remove(args.remove.strip()), f"remove {args.remove.strip()!r}"
    if args.add:
        where = " first" if args.first else ""
        return tag_ops.add(args.add.strip(), args.first), f"add {args.add.strip()!r}{where}"
    if args.replace:
        return tag_ops.replace_text(*args.replace), f"replace {args.replace[0]!r} by {args.replace[1]!r}"
    if args.move_first:
        return tag_ops.move_first(args.move_first.strip()), f"move {args.move_first.strip()!r} first"
    if args.dedupe:
        return tag_ops.dedupe(), "dedupe"
    return None


def run_tags(args: argparse.Namespace) -> int:
    if args.first and not args.add:
        raise UserError("--first goes with --add TAG, e.g. sdstudio dataset tags DIR --add 'sks' --first")
    captions, table = dataset_tag_table(args.dir, args.include_prose)
    selection = tag_ops.TagFilter(tuple(t.strip() for t in args.where), tuple(t.strip() for t in args.where_not))
    operation = _operation(args)
    if operation is None:
        if selection.where or selection.where_not:
            raise UserError("--where / --where-not select images for an edit; add --rename, --remove, --add, "
                            "--replace, --move-first or --dedupe")
        _print_table(captions, table, args.json)
        return EXIT_OK
    op, label = operation
    plan = plan_dataset_edit(captions, [op], selection, args.include_prose)
    changes = [(captions.relative(image), old, new) for image, (old, new) in sorted(plan.changes.items())]
    if args.json:
        print(json.dumps({"edit": label, "selected": plan.matched, "dry_run": args.dry_run,
                          "prose_left_alone": plan.skipped_prose,
                          "changes": [{"image": i, "old": o, "new": n} for i, o, n in changes]}, indent=2))
    else:
        for image, old, new in changes[:PREVIEW_LIMIT if not args.dry_run else None]:
            print(f"{image}\n  - {_one_line(old)}\n  + {_one_line(new)}")
        if not args.dry_run and len(changes) > PREVIEW_LIMIT:
            print(f"... and {len(changes) - PREVIEW_LIMIT} more")
        if plan.skipped_prose:
            print(f"{plan.skipped_prose} selected caption(s) have prose lines that were left alone "
                  "(--include-prose edits them too).", file=sys.stderr)
    if args.dry_run:
        print(f"dry run: {len(changes)} of {plan.matched} selected caption(s) would change ({label}); "
              "nothing written.", file=sys.stderr)
        return EXIT_OK
    write_plan(captions, plan, f"tags: {label}")
    print(f"{label}: {len(changes)} caption(s) changed. Undo with: sdstudio dataset undo {args.dir}",
          file=sys.stderr)
    return EXIT_OK


def _one_line(text: str | None) -> str:
    if text is None:
        return "(no caption)"
    return text.rstrip("\r\n").replace("\r\n", " | ").replace("\n", " | ") or "(empty)"


def _print_table(captions: Any, table: list[tag_ops.TagRow], as_json: bool) -> None:
    if as_json:
        print(json.dumps({"dataset": str(captions.root), "layout": captions.layout,
                          "images": len(captions.entries),
                          "tags": [{"tag": r.tag, "count": r.count,
                                    "images": [captions.relative(p) for p in r.images]} for r in table]},
                         indent=2, ensure_ascii=False))
        return
    for row in table:
        print(f"{row.count:6d}  {row.tag}")
    print(f"{len(table)} tag(s) in {len(captions.entries)} image(s) ({captions.layout} layout)", file=sys.stderr)


def run_undo(args: argparse.Namespace) -> int:
    result = undo_last(args.dir)
    print(f"undone: {result.label}: {len(result.restored)} file(s) restored, {len(result.removed)} "
          "created file(s) removed.", file=sys.stderr)
    return EXIT_OK
