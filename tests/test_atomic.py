"""Folders written atomically (diffusers-folder exports): the old folder or the new one, never a part."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdstudio.core.atomic import write_folder_atomic


def _fill(files: dict[str, str]):
    def fill(tmp: Path) -> None:
        tmp.mkdir()
        for name, text in files.items():
            (tmp / name).write_text(text)
    return fill


def test_a_new_folder_replaces_the_old_one_whole(tmp_path: Path) -> None:
    target = tmp_path / "export"
    write_folder_atomic(target, _fill({"a.txt": "old", "only-old.txt": "x"}))
    write_folder_atomic(target, _fill({"a.txt": "new"}))
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"] and (target / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"], "no temp or old folder left behind"


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_fill_leaves_the_old_folder_and_no_temp(tmp_path: Path, error: BaseException) -> None:
    target = tmp_path / "export"
    write_folder_atomic(target, _fill({"a.txt": "old"}))

    def failing(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "a.txt").write_text("half")
        raise error

    with pytest.raises(type(error)):
        write_folder_atomic(target, failing)
    assert (target / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
