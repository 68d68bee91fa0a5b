"""The command line: `sdstudio [COMMAND] ...`. Each command lives in its own module with
``register(subparsers)``; handlers return an exit code (0 ok, 1 unexpected, 2 bad input, 130 Ctrl-C)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .. import __version__
from ..core.errors import UserError
from . import dataset, export, fit, grid, lora, presets, rerun, sample, sweep, train
from .common import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, cli_message

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_OK", "build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own exit code is 2 too; keep one clear line
        self.print_usage(sys.stderr)
        self.exit(EXIT_BAD_INPUT, f"sdstudio: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sdstudio", description="Train diffusion models on your own computer. "
                     "Without a command, the desktop app opens.")
    parser.add_argument("--version", action="version", version=f"sdstudio {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in (train, sample, presets, dataset, export, sweep, fit, lora, rerun, grid):
        module.register(sub)
    gui = sub.add_parser("gui", help="open the desktop app (the default without a command)")
    gui.set_defaults(func=_run_gui)
    return parser


def _run_gui(args: argparse.Namespace) -> int:
    try:
        from ..gui.app import run_app
    except ImportError as exc:
        print(f"sdstudio: the desktop app cannot start ({exc}); install PySide6-Essentials and pyqtgraph, "
              "or use the headless commands (`sdstudio train`, `sdstudio --help`)", file=sys.stderr)
        return EXIT_FAILURE
    return run_app([])


def main(argv: list[str]) -> int:
    from .console import install_console_log

    install_console_log()  # warnings once; sdstudio's INFO lines stay in run.log
    parser = build_parser()
    if not argv:
        return _run_gui(argparse.Namespace())
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        return func(args)
    except UserError as exc:
        print(f"sdstudio: {cli_message(exc, args)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("sdstudio: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
