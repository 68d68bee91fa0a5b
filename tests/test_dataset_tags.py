"""Bulk tag edits and the undo journal: `sdstudio dataset tags` / `undo` on fixture datasets built in
tmp_path (plain sidecars, .caption files, kohya folders, metadata.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from sdstudio.cli import main
from sdstudio.core.data import tags as tag_ops
from sdstudio.core.data import undo_journal
from sdstudio.core.data.caption_edits import plan_dataset_edit, write_plan
from sdstudio.core.data.caption_store import read_captions
from sdstudio.core.data.scan import scan_dataset


def image(path: Path, color: tuple[int, int, int] = (200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 12), color).save(path)


def files(root: Path) -> dict[str, bytes]:
    """Every file of the dataset (the journal folder aside), as bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".sdstudio" not in p.parts}


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    root = tmp_path / "plain"
    for name in "abcdef":
        image(root / f"{name}.png")
    (root / "a.txt").write_bytes(b"1girl, solo, long_hair\n")
    (root / "b.txt").write_bytes(b"1girl,smile")  # no spaces, no newline: kept as written unless changed
    (root / "c.txt").write_bytes(b"A photo of a dog on a beach.\n")
    (root / "e.caption").write_bytes(b"solo, smile\n")
    (root / "f.txt").write_bytes(b"1girl, solo\r\nA girl sitting alone, smiling at the camera.\r\n")
    return root  # d.png has no caption


def test_tag_lines_and_prose_are_told_apart() -> None:
    assert tag_ops.is_tag_line("1girl, solo, long hair")
    assert tag_ops.is_tag_line("sks dog")
    assert not tag_ops.is_tag_line("A photo of a dog on a beach.")
    assert not tag_ops.is_tag_line("a dog, running across the wet sand near the sea")
    assert tag_ops.is_tag_line("1girl, solo, :d, ^_^")  # emoticons are tags, not sentence punctuation


def test_tag_table_counts_images(plain: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dataset", "tags", str(plain), "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    rows = {r["tag"]: r for r in table["tags"]}
    assert rows["1girl"]["count"] == 3 and rows["1girl"]["images"] == ["a.png", "b.png", "f.png"]
    assert rows["solo"]["count"] == 3  # a.txt, e.caption, f.txt's tag line
    assert "A photo of a dog on a beach." not in rows  # prose is not a tag
    assert table["tags"][0]["count"] >= table["tags"][-1]["count"]
    assert main(["dataset", "tags", str(plain)]) == 0
    assert "     3  1girl" in capsys.readouterr().out


def test_rename_writes_then_undo_restores_bytes(plain: Path) -> None:
    before = files(plain)
    assert main(["dataset", "tags", str(plain), "--rename", "1girl", "woman"]) == 0
    after = files(plain)
    assert after["a.txt"] == b"woman, solo, long_hair\n"
    assert after["b.txt"] == b"woman, smile"
    assert after["f.txt"] == b"woman, solo\r\nA girl sitting alone, smiling at the camera.\r\n"
    assert after["c.txt"] == before["c.txt"] and after["e.caption"] == before["e.caption"]
    assert main(["dataset", "undo", str(plain)]) == 0
    assert files(plain) == before
    assert undo_journal.list_entries(plain) == []
    assert main(["dataset", "undo", str(plain)]) == 2  # nothing left to undo: one clear line, exit 2


def test_add_first_creates_missing_sidecars_and_undo_removes_them(plain: Path) -> None:
    before = files(plain)
    assert main(["dataset", "tags", str(plain), "--add", "sks", "--first", "--where-not", "smile"]) == 0
    after = files(plain)
    assert after["a.txt"] == b"sks, 1girl, solo, long_hair\n"
    assert after["d.txt"] == b"sks"  # had no caption: a new sidecar in the dataset's convention
    assert after["b.txt"] == before["b.txt"] and after["e.caption"] == before["e.caption"]  # have smile
    assert after["c.txt"] == before["c.txt"]  # prose left alone
    assert main(["dataset", "undo", str(plain)]) == 0
    assert files(plain) == before and not (plain / "d.txt").exists()


def test_dry_run_previews_and_writes_nothing(plain: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = files(plain)
    assert main(["dataset", "tags", str(plain), "--remove", "solo", "--where", "1girl", "--dry-run",
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert {c["image"] for c in plan["changes"]} == {"a.png", "f.png"}
    assert plan["selected"] == 3 and plan["dry_run"] is True
    assert files(plain) == before and undo_journal.list_entries(plain) == []


def test_prose_is_edited_only_when_asked(plain: Path) -> None:
    main(["dataset", "tags", str(plain), "--replace", "dog", "cat"])
    assert (plain / "c.txt").read_bytes() == b"A photo of a dog on a beach.\n"
    main(["dataset", "tags", str(plain), "--replace", "dog", "cat", "--include-prose"])
    assert (plain / "c.txt").read_bytes() == b"A photo of a cat on a beach.\n"


def test_move_first_replace_and_dedupe(tmp_path: Path) -> None:
    root = tmp_path / "d"
    image(root / "x.png")
    (root / "x.txt").write_text("long_hair, solo, long_hair, blue_eyes")
    main(["dataset", "tags", str(root), "--dedupe"])
    assert (root / "x.txt").read_text() == "long_hair, solo, blue_eyes"
    main(["dataset", "tags", str(root), "--replace", "_", " "])
    assert (root / "x.txt").read_text() == "long hair, solo, blue eyes"
    main(["dataset", "tags", str(root), "--move-first", "solo"])
    assert (root / "x.txt").read_text() == "solo, long hair, blue eyes"
    for _ in range(3):  # three edits, three undo steps, newest first
        assert main(["dataset", "undo", str(root)]) == 0
    assert (root / "x.txt").read_text() == "long_hair, solo, long_hair, blue_eyes"


def test_journal_folder_is_not_part_of_the_dataset(plain: Path) -> None:
    before = scan_dataset(plain)
    main(["dataset", "tags", str(plain), "--add", "extra"])
    assert any((plain / ".sdstudio" / "undo").iterdir())
    after = scan_dataset(plain)
    assert [r.path for r in after.records] == [r.path for r in before.records]
    assert not any(".sdstudio" in str(p.path) for p in after.problems)


def test_crash_half_way_leaves_old_or_new_and_undo_restores(plain: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    before = files(plain)
    captions = read_captions(plain)
    plan = plan_dataset_edit(captions, [tag_ops.add("crash")])
    real = undo_journal.write_bytes_atomic
    calls = {"n": 0}

    def failing(path: Path, data: bytes, *, fsync: bool = True) -> None:
        if path.parent == plain:  # a caption, not a journal backup
            calls["n"] += 1
            if calls["n"] == 3:
                # Die while writing: the temp file exists, the target is untouched.
                (path.parent / f".{path.name}.partial.tmp").write_bytes(data[: len(data) // 2])
                raise KeyboardInterrupt
        real(path, data, fsync=fsync)

    monkeypatch.setattr(undo_journal, "write_bytes_atomic", failing)
    with pytest.raises(KeyboardInterrupt):
        write_plan(captions, plan, "crash test")
    monkeypatch.setattr(undo_journal, "write_bytes_atomic", real)
    after = files(plain)
    new = {captions.relative(captions.by_image()[i].file): t.encode() for i, (_o, t) in plan.changes.items()}
    changed = 0
    for name, data in before.items():
        if name.endswith((".txt", ".caption")):
            assert after[name] in (data, new.get(name, data)), name
            changed += after[name] != data
    assert changed == 2
    for name in set(after) - set(before):  # only new sidecars or the dead temp file appear
        assert name.startswith(".") or after[name] == new[name]
    assert main(["dataset", "undo", str(plain)]) == 0
    restored = files(plain)
    assert {k: v for k, v in restored.items() if not k.startswith(".")} == before


def test_kohya_sidecars_edited_folder_captions_left(tmp_path: Path) -> None:
    root = tmp_path / "kohya"
    image(root / "10_sks dog" / "a.png")
    image(root / "10_sks dog" / "b.png")
    (root / "10_sks dog" / "a.caption").write_bytes(b"sks dog, grass\n")
    before = files(root)
    assert main(["dataset", "tags", str(root), "--rename", "grass", "lawn"]) == 0
    assert (root / "10_sks dog" / "a.caption").read_bytes() == b"sks dog, lawn\n"
    assert not (root / "10_sks dog" / "b.caption").exists() and not (root / "10_sks dog" / "b.txt").exists()
    main(["dataset", "undo", str(root)])
    assert files(root) == before


def test_metadata_jsonl_rows_edited_in_place(tmp_path: Path) -> None:
    root = tmp_path / "hf"
    for name in ("a", "b", "c"):
        image(root / f"{name}.png")
    original = ('{"file_name": "a.png", "text": "1girl, solo"}\n'
                '{"file_name":"b.png","text":"a photo of a dog, sitting on a red sofa by the window"}\n')
    (root / "metadata.jsonl").write_text(original)
    assert main(["dataset", "tags", str(root), "--add", "sks", "--first"]) == 0
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    assert rows[0] == {"file_name": "a.png", "text": "sks, 1girl, solo"}
    assert rows[1]["text"].startswith("a photo of a dog")  # prose, and its line is kept as written
    assert (root / "metadata.jsonl").read_text().splitlines()[1] == original.splitlines()[1]
    assert rows[2] == {"file_name": "c.png", "text": "sks"}  # a new row, not a sidecar
    assert not (root / "c.txt").exists()
    main(["dataset", "undo", str(root)])
    assert (root / "metadata.jsonl").read_text() == original


def test_bad_arguments_exit_2(plain: Path) -> None:
    assert main(["dataset", "tags", str(plain), "--first"]) == 2
    assert main(["dataset", "tags", str(plain), "--where", "solo"]) == 2
    assert main(["dataset", "tags", str(plain / "missing")]) == 2


def test_upper_case_caption_extension_is_found(tmp_path: Path) -> None:
    root = tmp_path / "d"
    image(root / "x.png")
    (root / "x.TXT").write_bytes(b"a, b\n")
    main(["dataset", "tags", str(root), "--remove", "a"])
    assert (root / "x.TXT").read_bytes() == b"b\n" and not (root / "x.txt").exists()
