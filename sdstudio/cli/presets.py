"""`sdstudio presets list|show NAME`."""

from __future__ import annotations

import argparse
from typing import Any

from ..core.presets import config_to_toml, list_presets, load_preset
from .common import EXIT_OK


def register(sub: Any) -> None:
    p = sub.add_parser("presets", help="list or show presets")
    psub = p.add_subparsers(dest="presets_command", metavar="ACTION", required=True)
    ls = psub.add_parser("list", help="list built-in and user presets")
    ls.set_defaults(func=run_list)
    show = psub.add_parser("show", help="print the full resolved config of a preset as TOML")
    show.add_argument("name")
    show.set_defaults(func=run_show)


def run_list(args: argparse.Namespace) -> int:
    for preset in list_presets():
        kind = "built-in" if preset.builtin else "user"
        print(f"{preset.name:<22} {kind:<9} {preset.description}")
    return EXIT_OK


def run_show(args: argparse.Namespace) -> int:
    print(config_to_toml(load_preset(args.name)), end="")
    return EXIT_OK
