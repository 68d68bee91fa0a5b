"""What can be wrong with a dataset: the problem kinds, their severity, and a problem found in a file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# kind -> severity. "error": the file is not used for training; "warning": used (or harmless), worth a look.
PROBLEM_KINDS: dict[str, str] = {  # in the order reports list them
    "zero_byte": "error",
    "not_an_image": "error",
    "unreadable": "error",
    "truncated": "error",
    "decompression_bomb": "error",
    "unreadable_folder": "error",
    "skipped_folder": "warning",
    "metadata_error": "warning",
    "undecodable_caption": "warning",
    "missing_caption": "warning",
    "orphan_caption": "warning",
    "duplicate": "warning",
    "near_duplicate": "warning",
    "too_small": "warning",
    "extreme_aspect": "warning",
    "missing_mask": "warning",  # masked training (loss.masked) and an image without a mask
    "mask_size": "warning",  # a mask of another size than its image (or unreadable)
}
KIND_ORDER = {kind: i for i, kind in enumerate(PROBLEM_KINDS)}

@dataclass(frozen=True)
class Problem:
    kind: str  # one of PROBLEM_KINDS
    path: Path
    message: str  # what is wrong, naming the file
    fix: str  # what to do
    severity: str  # "error" | "warning"


class ProblemList(list[Problem]):
    """Problems with paths shown relative to the dataset folder in their messages."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def rel(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix() or "."
        except ValueError:
            return str(path)

    def add(self, kind: str, path: Path, message: str, fix: str) -> None:
        self.append(Problem(kind, path, message, fix, PROBLEM_KINDS[kind]))
