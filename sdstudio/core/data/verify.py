"""Decode every training image once before a run, so a truncated or corrupt file is skipped with one
warning instead of failing the run when its turn comes. Files that decoded are remembered (by stamp, see
``filememo``), so the next run or a resume only checks new or changed files."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .. import paths
from ..errors import DatasetError
from .filememo import FileMemo
from .images import ImageProblem, verify_decodes
from .scan import PROBLEM_KINDS, ImageRecord, Problem

_OK = "ok"


def verified_memo() -> FileMemo:
    return FileMemo(paths.cache_dir() / "verified-images.json")


def _check(path: Path) -> ImageProblem | None:
    try:
        verify_decodes(path, reduced=True)
    except ImageProblem as exc:
        return exc
    return None


def verify_records(records: Sequence[ImageRecord], *, root: Path | None = None, memo: FileMemo | None = None,
                   progress: Callable[[int, int], None] | None = None) -> tuple[list[ImageRecord], list[Problem]]:
    """(records whose image decodes, one error Problem per record that does not)."""
    memo = memo if memo is not None else verified_memo()
    todo = [i for i, r in enumerate(records) if memo.get(r.path) != _OK]
    failed: dict[int, ImageProblem] = {}
    if progress:
        progress(0, len(todo))
    with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) + 2)) as pool:
        for done, (i, problem) in enumerate(zip(todo, pool.map(_check, [records[i].path for i in todo])), 1):
            if problem is None:
                memo.put(records[i].path, _OK)
            else:
                failed[i] = problem
            if progress:
                progress(done, len(todo))
    memo.save()
    problems = []
    for i, exc in sorted(failed.items()):
        path = records[i].path
        try:
            name = path.relative_to(root).as_posix() if root else str(path)
        except ValueError:
            name = str(path)
        problems.append(Problem(exc.kind, path, f"{name} {exc.reason}.", exc.fix, PROBLEM_KINDS[exc.kind]))
    return [r for i, r in enumerate(records) if i not in failed], problems


def verify_prepared(data: Any, config: Any, warn: Callable[[str], None]) -> None:
    """Drop the undecodable images from a run's ``data.train`` / ``data.val`` with one warning each
    (``data.verify_images``, default on); raises DatasetError when no training image is left."""
    if not config.data.verify_images:
        return
    root = data.scan.root
    data.train, bad = verify_records(data.train, root=root)
    data.val, bad_val = verify_records(data.val, root=root)
    for problem in bad + bad_val:
        warn(f"skipping {problem.path}: {problem.message}")
    if not data.train:
        raise DatasetError(f"{root}: no usable image: every image failed to decode; run "
                           f"`sdstudio dataset check {root}` for details")
