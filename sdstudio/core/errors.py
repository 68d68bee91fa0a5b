"""Exceptions whose text is meant for people: what went wrong, which file or field, what to do.

A message names the input it is about by its config key or parameter ("model.path /x: no such file"), and
an input it advises changing by that name in backticks ("choose another `out` or pass `force`"). It never
names a command-line flag: the CLI words those names as its flags (cli/common.py ``cli_text``)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (a value, a file, a folder). The CLI exits 2 with this one line."""


class ConfigError(UserError):
    """A config value or file is invalid; the message names the field, the value and what is allowed."""


class DatasetError(UserError):
    """A dataset folder cannot be used (missing, unreadable, no usable images)."""


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt, partial or not sdstudio's."""


class RunDirError(UserError):
    """A run directory cannot be used (locked by another process, not empty, not a run)."""
