"""Exact duplicates (same file content) and near-duplicates (nearly the same pixels) among images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .problems import ProblemList

NEAR_DUPLICATE_BITS = 4  # dHash Hamming distance
NEAR_DUPLICATE_CORRELATION = 0.98  # and 16x16 thumbnail correlation


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return np.bitwise_count(x)
    table = np.array([i.bit_count() for i in range(256)], dtype=np.uint8)
    return table[x.view(np.uint8).reshape(*x.shape, 8)].sum(axis=-1)


@dataclass
class Fingerprint:
    path: Path
    sha256: str
    dhash: int
    thumbnail: np.ndarray | None


def duplicate_problems(prints: list[Fingerprint], problems: ProblemList) -> None:
    """Flag the 2nd+ copy of identical files, then images whose pixels are nearly the same."""
    first_by_sha: dict[str, Path] = {}
    exact: set[int] = set()
    for j, fp in enumerate(prints):
        first = first_by_sha.setdefault(fp.sha256, fp.path)
        if first != fp.path:
            exact.add(j)
            problems.add("duplicate", fp.path,
                         f"{problems.rel(fp.path)} is an exact copy of {problems.rel(first)}; that image is "
                         "trained on twice as often.",
                         "Delete one of the copies (or keep both if that weighting is intended).")
    if len(prints) < 2:
        return
    hashes = np.array([fp.dhash for fp in prints], dtype=np.uint64)
    thumbs = np.stack([fp.thumbnail if fp.thumbnail is not None else np.zeros(256, np.float32)
                       for fp in prints])
    groups = np.unique([fp.sha256 for fp in prints], return_inverse=True)[1]
    index = np.arange(len(prints))
    for start in range(0, len(prints), 256):
        rows = slice(start, start + 256)
        close = _popcount(hashes[rows, None] ^ hashes[None, :]) <= NEAR_DUPLICATE_BITS
        close &= index[None, :] < index[rows, None]  # name the earlier image of a pair
        close &= groups[None, :] != groups[rows, None]  # exact copies are reported above
        close &= thumbs[rows] @ thumbs.T >= NEAR_DUPLICATE_CORRELATION
        for offset in np.flatnonzero(close.any(axis=1)):
            j = start + int(offset)
            if j in exact:
                continue
            path, first = prints[j].path, prints[int(np.argmax(close[offset]))].path
            problems.add("near_duplicate", path,
                         f"{problems.rel(path)} looks almost the same as {problems.rel(first)}.",
                         "Look at the two; delete one if it is a re-saved or slightly edited copy.")
