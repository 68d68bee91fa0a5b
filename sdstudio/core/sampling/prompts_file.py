"""Sample prompts in kohya's prompt-file format (``sample.prompts_file``, ``sdstudio sample --prompts-file``).

One prompt a line; options follow it, each introduced by `` --``::

    # comments and empty lines are skipped
    a photo of sks dog on a beach --n blurry, lowres --w 768 --h 512 --s 30 --l 6.5 --d 42

``--n`` negative prompt, ``--w`` / ``--h`` width / height in pixels, ``--s`` sampler steps, ``--l`` guidance
scale, ``--d`` seed (the row's images use seeds d, d+1, ...). ``--ss`` names a sampler when it is one sdstudio
has (ddpm, ddim, euler, dpmpp_2m, or kohya's k_euler / dpmsolver++ / ddim names). Anything a line leaves out comes
from ``sample.*``. Other kohya options (``--cfgr``, ``--am`` ...) are ignored with a note.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError

SAMPLER_NAMES = {"ddpm": "ddpm", "ddim": "ddim", "euler": "euler", "k_euler": "euler", "euler_a": "euler",
                 "k_euler_a": "euler", "dpmpp_2m": "dpmpp_2m", "dpmsolver++": "dpmpp_2m", "dpmsolver": "dpmpp_2m",
                 "k_dpm_2": "dpmpp_2m", "dpm++_2m": "dpmpp_2m"}
_OPTION = re.compile(r"\s--(?=[A-Za-z])")


@dataclass(frozen=True)
class PromptSpec:
    """One prompt and the settings it overrides (None: take ``sample.*``)."""

    prompt: str
    negative: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    sampler: str | None = None
    ignored: tuple[str, ...] = field(default=(), compare=False)  # kohya options sdstudio does not use

    def settings(self) -> dict[str, Any]:
        """The overrides this line gives, for a grid's JSON record."""
        keys = ("negative", "width", "height", "steps", "guidance", "seed", "sampler")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


def _number(kind: type, text: str, option: str, where: str, low: float, high: float) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise UserError(f"{where}: --{option} {text!r} is not a {'whole ' if kind is int else ''}number") from None
    if not low <= value <= high:
        raise UserError(f"{where}: --{option} {text} is out of range ({low:g} to {high:g})")
    return value


def parse_prompt_line(line: str, where: str = "prompt") -> PromptSpec | None:
    """The prompt of one line (None for a comment or an empty line); errors name ``where`` (file:line)."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    prompt, *options = _OPTION.split(text)
    values: dict[str, Any] = {}
    ignored: list[str] = []
    for option in options:
        name, _, arg = option.partition(" ")
        name, arg = name.strip(), arg.strip()
        if name == "n":
            values["negative"] = arg
        elif name in ("w", "h"):
            side = _number(int, arg, name, where, 8, 8192)
            if side % 8:
                raise UserError(f"{where}: --{name} {side} must be a multiple of 8")
            values["width" if name == "w" else "height"] = side
        elif name == "s":
            values["steps"] = _number(int, arg, name, where, 1, 1000)
        elif name == "l":
            values["guidance"] = _number(float, arg, name, where, 1.0, 30.0)
        elif name == "d":
            values["seed"] = _number(int, arg, name, where, 0, 2**63 - 1)
        elif name == "ss" and arg.lower() in SAMPLER_NAMES:
            values["sampler"] = SAMPLER_NAMES[arg.lower()]
        else:
            ignored.append(f"--{name}")
    prompt = prompt.strip()
    return PromptSpec(prompt, ignored=tuple(ignored), **values)


def parse_prompts(text: str, source: str = "prompts file") -> list[PromptSpec]:
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        spec = parse_prompt_line(line, f"{source}:{number}")
        if spec is not None:
            out.append(spec)
    return out


def read_prompts_file(path: Path | str) -> list[PromptSpec]:
    """Every prompt of a kohya-format prompts file (UTF-8); a missing or empty file is an error naming it."""
    path = Path(path).expanduser()
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"sample.prompts_file: {path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"sample.prompts_file: {path} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise UserError(f"sample.prompts_file: {path} cannot be read ({exc.strerror or exc})") from None
    specs = parse_prompts(text, str(path))
    if not specs:
        raise UserError(f"sample.prompts_file: {path} has no prompt (only comments or empty lines)")
    return specs
