"""Turning what a person typed into config data: dotted keys (``train.learning_rate``) into nested sections, and
pydantic's validation errors into lines that each name the field, the value given and what is allowed."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError


class Section(BaseModel):
    """A section of the run config: unknown keys are refused (a typo must not pass silently), and assignments
    are validated like input."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _allowed(err: dict[str, Any]) -> str:
    ctx = err.get("ctx") or {}
    typ = err.get("type", "")
    if typ == "literal_error" and "expected" in ctx:
        return f"allowed: {ctx['expected']}"
    for key, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("multiple_of", "a multiple of")):
        if key in ctx:
            return f"allowed: {word} {ctx[key]}"
    if typ == "extra_forbidden":
        return "unknown key (check the spelling; `sdstudio presets show demo` lists all keys)"
    return err.get("msg", "invalid")


def format_validation_error(exc: ValidationError, source: str = "config") -> str:
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "config"
        if err.get("type") == "value_error":
            msg = str(err.get("ctx", {}).get("error", err["msg"]))
            lines.extend(f"{source}: {part.strip()}" for part in msg.split("\n") if part.strip())
            continue
        value = err.get("input")
        shown = repr(value) if not isinstance(value, dict) else "{...}"
        if err.get("type") == "literal_error":
            lines.append(f"{source}: {field} = {shown} is invalid ({_allowed(err)})")
        else:
            lines.append(f"{source}: {field} = {shown} is invalid: {err['msg']} ({_allowed(err)})")
    return "\n".join(lines)


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data["train"]["learning_rate"]`` from ``"train.learning_rate"``; unknown sections are errors."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"{key}: not a config key; a key looks like section.name, e.g. train.learning_rate")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value
