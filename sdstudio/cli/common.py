"""Pieces several commands share: exit codes, --set parsing, config resolution, messages in flag terms."""

from __future__ import annotations

import argparse
import re
import signal
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from ..core.config import RunConfig
from ..core.control import TrainingControl
from ..core.errors import UserError
from ..core.overrides import parse_set_value
from ..core.presets import DEFAULT_PRESET, load_config_file, load_preset

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


_FIELD_REFERENCE = re.compile(r"`([A-Za-z_][\w.]*)`")


def cli_text(text: str, flags: Mapping[str, str], subjects: tuple[str, ...] = ()) -> str:
    """A core message in a command's own terms. Core messages name inputs by field or parameter (see
    core/errors.py): a message that starts with one of ``subjects`` ("model.path /x: ...") starts with its flag
    instead, and each `field` in backticks that ``flags`` knows becomes that flag ("pass `force`" -> "pass
    --force"). Anything else is left as it is."""
    head, sep, rest = text.partition(" ")
    if sep and head in subjects and head in flags:
        text = f"{flags[head]} {rest}"
    return _FIELD_REFERENCE.sub(lambda m: flags.get(m[1], m[0]), text)


def cli_message(message: BaseException | str, args: argparse.Namespace | None = None) -> str:
    """A core error (or an event's text) worded with the flags of the command that ran (``args.flags``,
    ``args.flag_subjects``: set by each command's parser)."""
    return cli_text(str(message), getattr(args, "flags", {}), getattr(args, "flag_subjects", ()))


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--set {item!r}: use KEY=VALUE, e.g. --set train.learning_rate=1e-4")
        out[key] = parse_set_value(value.strip())
    return out


def add_config_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--preset", help=f"built-in or user preset (default: {DEFAULT_PRESET})")
    group.add_argument("--config", type=Path, help="a config TOML file (a full config or an overlay)")
    parser.add_argument("--data", type=Path, help="image folder (sets data.path)")
    parser.add_argument("--set", dest="sets", action="append", metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.learning_rate=1e-4 (repeatable)")


def resolve_config(args: argparse.Namespace) -> tuple[RunConfig, str]:
    """(config, label for the run folder name) from --preset/--config, --data and --set."""
    if args.config is not None:
        config, label = load_config_file(args.config), args.config.stem
    else:
        name = args.preset or DEFAULT_PRESET
        config, label = load_preset(name), name
    overrides = parse_sets(args.sets)
    if args.data is not None:
        if not args.data.is_dir():
            raise UserError(f"--data {args.data}: no such folder")
        overrides["data.path"] = str(args.data.resolve())
    if overrides:
        config = config.with_overrides(overrides)
    return config, label


def say(text: str) -> None:
    """A message line on stderr that does not break a tqdm bar."""
    from tqdm import tqdm

    tqdm.write(text, file=sys.stderr)


@contextmanager
def stop_on_sigint(control: TrainingControl, what: str) -> Iterator[None]:
    """First Ctrl-C: ask the loop to save a resumable checkpoint and stop; second: abort at once."""
    count = {"n": 0}

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        count["n"] += 1
        if count["n"] > 1:
            raise KeyboardInterrupt
        say(f"stopping: saving a resumable checkpoint{what} (Ctrl-C again to abort without saving)")
        control.request_stop()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def describe_eval(event: Any) -> str:
    """One line for an EvalResult: KID first (it is the one to read for small sets), then FID."""
    if event.fid is None and event.kid_mean is None:
        return f"FID/KID not computed ({event.note})"
    parts = []
    if event.kid_mean is not None:
        kid = f"KID {event.kid_mean:.5f}"
        parts.append(kid + (f" ± {event.kid_std:.5f}" if event.kid_std is not None else ""))
    if event.fid is not None:
        parts.append(f"FID {event.fid:.2f}" + ("" if event.fid_meaningful else " (not meaningful below 2048 images)"))
    return ", ".join(parts) + f" [{event.n_generated} generated vs {event.n_real} validation images]"
