"""scan_dataset and the image loader on messy, kohya and imagefolder datasets built in tmp_path."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdstudio.core.data.images import ImageProblem, load_image_rgb, probe_image, verify_decodes
from sdstudio.core.data.scan import PROBLEM_KINDS, process_caption, scan_dataset
from sdstudio.core.errors import DatasetError, UserError

try:
    from conftest_data import (
        make_imagefolder,
        make_kohya_folder,
        make_messy_folder,
        noise_image,
        save,
        snapshot,
        write_png_header_only,
    )
except ImportError:  # tests/ imported as a package
    from tests.conftest_data import (
        make_imagefolder,
        make_kohya_folder,
        make_messy_folder,
        noise_image,
        save,
        snapshot,
        write_png_header_only,
    )

USABLE = {
    "good.png", "good_bright.png", "sub/good_copy.png", "cmyk.jpg", "gray16.png", "palette.png",
    "rotated.jpg", "anim.gif", "tiny.png", "sliver.png", "latin1.png", "nocap.png", "runs/r.png",
}
EXPECTED = {  # every problem of the messy folder, except the missing captions (checked separately)
    ("truncated", "truncated.jpg"),
    ("zero_byte", "empty.png"),
    ("not_an_image", "notes.jpg"),
    ("decompression_bomb", "huge.png"),
    ("too_small", "tiny.png"),
    ("extreme_aspect", "sliver.png"),
    ("duplicate", "sub/good_copy.png"),
    ("near_duplicate", "good_bright.png"),
    ("orphan_caption", "orphan.txt"),
    ("undecodable_caption", "latin1.txt"),
}


def _rel(scan, path: Path) -> str:
    return path.relative_to(scan.root).as_posix() or "."


def _kinds(scan) -> set[tuple[str, str]]:
    return {(p.kind, _rel(scan, p.path)) for p in scan.problems}


@pytest.fixture(scope="module")
def messy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_messy_folder(tmp_path_factory.mktemp("data") / "messy")


@pytest.fixture(scope="module")
def messy_scan(messy: Path):
    return scan_dataset(messy, resolution=64, decode=True, find_duplicates=True)


def test_messy_folder_every_problem_reported_by_kind_and_file(messy_scan) -> None:
    scan = messy_scan
    assert scan.layout == "plain"
    assert {_rel(scan, r.path) for r in scan.records} == USABLE
    found = _kinds(scan)
    assert {k for k in found if k[0] != "missing_caption"} == EXPECTED
    assert {path for kind, path in found if kind == "missing_caption"} == USABLE - {
        "good.png", "latin1.png"}  # latin1's unreadable caption is reported as undecodable_caption
    for problem in scan.problems:
        assert problem.kind in PROBLEM_KINDS
        assert problem.severity == PROBLEM_KINDS[problem.kind]
        assert problem.fix
        assert problem.path.name in problem.message or problem.kind == "skipped_folder"


def test_messages_name_the_related_file(messy_scan) -> None:
    by_kind = {p.kind: p for p in messy_scan.problems}
    assert "good.png" in by_kind["duplicate"].message
    assert "good.png" in by_kind["near_duplicate"].message
    assert "UTF-8" in by_kind["undecodable_caption"].fix


def test_hidden_junk_and_symlink_cycle_are_skipped(messy_scan) -> None:
    paths = [str(r.path) for r in messy_scan.records] + [str(p.path) for p in messy_scan.problems]
    assert not any(".hidden" in p or "DS_Store" in p or "Thumbs" in p or "MACOSX" in p for p in paths)
    assert not any("loop" in p for p in paths)


def test_records_sorted_with_captions_and_sizes(messy_scan) -> None:
    records = {_rel(messy_scan, r.path): r for r in messy_scan.records}
    assert [r.path for r in messy_scan.records] == sorted(r.path for r in messy_scan.records)
    assert all(r.path.is_absolute() for r in messy_scan.records)
    assert records["good.png"].captions == ("a red thing", "second caption")
    assert records["good.png"].caption_source == "sidecar"
    assert records["latin1.png"].captions == ()
    assert records["nocap.png"].captions == () and records["nocap.png"].caption_source == "none"
    assert (records["rotated.jpg"].width, records["rotated.jpg"].height) == (64, 96)  # EXIF applied
    assert (records["sliver.png"].width, records["sliver.png"].height) == (4000, 100)
    assert all(r.repeats == 1 and r.concept == "" for r in messy_scan.records)
    assert messy_scan.images_per_epoch == len(USABLE)


def test_scan_changes_nothing_in_the_folder(tmp_path: Path) -> None:
    folders = [make_messy_folder(tmp_path / "m"), make_kohya_folder(tmp_path / "k"),
               make_imagefolder(tmp_path / "i")]
    before = {f: snapshot(f) for f in folders}
    time.sleep(0.01)
    for folder in folders:
        scan_dataset(folder, resolution=64, decode=True, find_duplicates=True)
        scan_dataset(folder)
    assert {f: snapshot(f) for f in folders} == before


def test_header_only_scan_misses_truncation_but_decode_finds_it(messy: Path) -> None:
    fast = scan_dataset(messy)
    assert "truncated.jpg" in {_rel(fast, r.path) for r in fast.records}
    assert not any(p.kind in ("duplicate", "near_duplicate", "too_small") for p in fast.problems)
    assert ("zero_byte", "empty.png") in _kinds(fast)
    assert ("decompression_bomb", "huge.png") in _kinds(fast)
    with pytest.raises(ImageProblem) as info:
        load_image_rgb(messy / "truncated.jpg")
    assert info.value.kind == "truncated" and "truncated.jpg" in str(info.value)


def test_progress_reports_every_image(messy: Path) -> None:
    calls: list[tuple[int, int]] = []
    scan_dataset(messy, progress=lambda done, total: calls.append((done, total)))
    total = calls[-1][1]
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert total == len(USABLE) + 4  # + truncated.jpg, empty.png, notes.jpg, huge.png


# --- the loader ------------------------------------------------------------------------------------


def test_every_good_image_loads_as_rgb(messy_scan) -> None:
    for record in messy_scan.records:
        img = load_image_rgb(record.path)
        assert img.mode == "RGB"
        assert img.size == (record.width, record.height)


def test_exif_rotation_applied(messy: Path) -> None:
    img = np.asarray(load_image_rgb(messy / "rotated.jpg"))
    assert img.shape == (96, 64, 3)
    r, g, b = (int(v) for v in img[6, 64 - 7])  # top-right corner: the stored top-left red block
    assert r > 200 and g < 80 and b < 80
    r, g, b = (int(v) for v in img[6, 6])
    assert not (r > 200 and g < 80 and b < 80)


def test_16_bit_is_scaled_not_clipped(messy: Path) -> None:
    img = np.asarray(load_image_rgb(messy / "gray16.png"))
    assert tuple(img[32, 10]) == (255, 255, 255)
    assert tuple(img[32, 50]) == (128, 128, 128)


def test_palette_transparency_composited_on_background(messy: Path) -> None:
    assert load_image_rgb(messy / "palette.png").getpixel((0, 0)) == (255, 255, 255)
    assert load_image_rgb(messy / "palette.png", background=(0, 0, 0)).getpixel((0, 0)) == (0, 0, 0)
    assert load_image_rgb(messy / "palette.png").getpixel((40, 40)) == (0, 0, 255)


def test_cmyk_and_animated_gif(messy: Path) -> None:
    r, g, b = load_image_rgb(messy / "cmyk.jpg").getpixel((32, 32))
    assert r < 40 and g > 215 and b > 215  # full cyan
    assert load_image_rgb(messy / "anim.gif").getpixel((10, 10)) == (255, 0, 0)  # first frame, not blue


def test_rgba_and_la_composited(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((1, 1), (0, 255, 0, 255))
    save(rgba, tmp_path / "a.png")
    img = load_image_rgb(tmp_path / "a.png", background=(10, 20, 30))
    assert img.getpixel((0, 0)) == (10, 20, 30) and img.getpixel((1, 1)) == (0, 255, 0)
    save(Image.new("LA", (4, 4), (100, 255)), tmp_path / "la.png")
    assert load_image_rgb(tmp_path / "la.png").getpixel((0, 0)) == (100, 100, 100)


def test_probe_reads_headers_and_names_problems(messy: Path) -> None:
    info = probe_image(messy / "anim.gif")
    assert (info.width, info.height, info.format, info.n_frames) == (64, 64, "GIF", 2)
    assert probe_image(messy / "gray16.png").mode == "I;16"
    for name, kind in [("empty.png", "zero_byte"), ("notes.jpg", "not_an_image"),
                       ("huge.png", "decompression_bomb")]:
        with pytest.raises(ImageProblem) as problem:
            probe_image(messy / name)
        assert problem.value.kind == kind and name in str(problem.value) and problem.value.fix
        assert isinstance(problem.value, DatasetError)
    with pytest.raises(ImageProblem, match="truncated"):
        verify_decodes(messy / "truncated.jpg")


def test_bomb_limit_is_pillows_and_not_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    save(noise_image(64, 64, seed=9), tmp_path / "p.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels > 2 x 1000
    with pytest.raises(ImageProblem) as problem:
        load_image_rgb(tmp_path / "p.png")
    assert problem.value.kind == "decompression_bomb"
    monkeypatch.undo()
    assert Image.MAX_IMAGE_PIXELS == limit
    write_png_header_only(tmp_path / "h.png", 60000, 60000)
    assert scan_dataset(tmp_path).problems[0].kind == "decompression_bomb"
    assert Image.MAX_IMAGE_PIXELS == limit


# --- layouts ---------------------------------------------------------------------------------------


def test_kohya_layout_repeats_and_folder_captions(tmp_path: Path) -> None:
    scan = scan_dataset(make_kohya_folder(tmp_path / "k"))
    assert scan.layout == "kohya"
    records = {_rel(scan, r.path): r for r in scan.records}
    assert set(records) == {"10_sks dog/a.png", "10_sks dog/b.png", "10_sks dog/c.jpg", "2_cat/x.png"}
    assert scan.concepts == {"10_sks dog": 10, "2_cat": 2}
    assert scan.images_per_epoch == 3 * 10 + 2
    assert records["10_sks dog/a.png"].captions == ("sks dog on a beach",)
    assert records["10_sks dog/b.png"].captions == ("sks dog",)
    assert records["10_sks dog/b.png"].caption_source == "folder"
    assert records["2_cat/x.png"].captions == ("cat",)
    assert records["2_cat/x.png"].concept == "2_cat" and records["2_cat/x.png"].repeats == 2
    skipped = {path for kind, path in _kinds(scan) if kind == "skipped_folder"}
    assert skipped == {".", "reg stuff", "0_zero"}
    root_problem = next(p for p in scan.problems if p.kind == "skipped_folder" and p.path == scan.root)
    assert "kohya" in root_problem.message and "ignored" in root_problem.message
    assert {path for kind, path in _kinds(scan) if kind == "missing_caption"} == {
        "10_sks dog/b.png", "10_sks dog/c.jpg", "2_cat/x.png"}


def test_kohya_caption_template(tmp_path: Path) -> None:
    scan = scan_dataset(make_kohya_folder(tmp_path / "k"), caption_template="a photo of {caption}")
    captions = {r.path.name: r.captions for r in scan.records}
    assert captions["a.png"] == ("a photo of sks dog on a beach",)
    assert captions["b.png"] == ("a photo of sks dog",)
    with pytest.raises(UserError, match="caption"):
        scan_dataset(tmp_path / "k", caption_template="no placeholder")


def test_kohya_concept_folder_itself_is_a_plain_folder(tmp_path: Path) -> None:
    scan = scan_dataset(make_kohya_folder(tmp_path / "k") / "10_sks dog")
    assert scan.layout == "plain" and len(scan.records) == 3


def test_imagefolder_jsonl_metadata_wins_over_sidecar(tmp_path: Path) -> None:
    scan = scan_dataset(make_imagefolder(tmp_path / "i", "jsonl"))
    assert scan.layout == "imagefolder"
    captions = {_rel(scan, r.path): r.captions for r in scan.records}
    assert captions == {
        "a.png": ("cat one",), "b.png": ("first line", "second line"), "sub/c.png": ("third",),
        "d.png": ("sidecar d",), "e.png": (),
    }
    kinds = _kinds(scan)
    assert ("metadata_error", "missing.png") in kinds
    assert ("metadata_error", "metadata.jsonl") in kinds  # the line that is not JSON
    assert ("missing_caption", "e.png") in kinds
    assert not any(kind == "orphan_caption" for kind, _ in kinds)


def test_imagefolder_csv_uses_first_text_column(tmp_path: Path) -> None:
    scan = scan_dataset(make_imagefolder(tmp_path / "i", "csv"))
    captions = {_rel(scan, r.path): r.captions for r in scan.records}
    assert captions["a.png"] == ("cat one",)
    assert captions["b.png"] == ("first line", "second line")
    assert captions["d.png"] == ("sidecar d",)
    assert ("metadata_error", "missing.png") in _kinds(scan)


def test_instance_prompt_for_uncaptioned_images(tmp_path: Path) -> None:
    save(noise_image(64, 64, seed=1), tmp_path / "A.PNG")
    save(noise_image(64, 64, seed=2), tmp_path / "b.webp")
    (tmp_path / "b.CAPTION").write_text("own caption", encoding="utf-8")
    scan = scan_dataset(tmp_path, instance_prompt="photo of sks", caption_template="{caption}, best")
    captions = {r.path.name: (r.captions, r.caption_source) for r in scan.records}
    assert captions["A.PNG"] == (("photo of sks",), "instance_prompt")
    assert captions["b.webp"] == (("own caption, best",), "sidecar")


def test_caption_extension_order(tmp_path: Path) -> None:
    save(noise_image(64, 64, seed=1), tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("from txt", encoding="utf-8")
    (tmp_path / "a.caption").write_text("from caption", encoding="utf-8")
    assert scan_dataset(tmp_path).records[0].captions == ("from txt",)
    scan = scan_dataset(tmp_path, caption_extensions=(".caption", ".txt"))
    assert scan.records[0].captions == ("from caption",)


def test_missing_root_and_file_root_raise(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset(tmp_path / "nope")
    (tmp_path / "f.png").write_bytes(b"x")
    with pytest.raises(DatasetError, match="not a folder"):
        scan_dataset(tmp_path / "f.png")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs POSIX permissions, not root")
def test_unreadable_subfolder_reported(tmp_path: Path) -> None:
    save(noise_image(64, 64, seed=1), tmp_path / "a.png")
    locked = tmp_path / "locked"
    save(noise_image(64, 64, seed=2), locked / "b.png")
    locked.chmod(0)
    try:
        scan = scan_dataset(tmp_path)
    finally:
        locked.chmod(0o755)
    assert ("unreadable_folder", "locked") in _kinds(scan)
    assert len(scan.records) == 1


def test_unreadable_subfolder_reported_when_listing_fails(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    save(noise_image(64, 64, seed=1), tmp_path / "a.png")
    save(noise_image(64, 64, seed=2), tmp_path / "locked" / "b.png")
    real_scandir = os.scandir

    def scandir(path):  # what a folder without read permission does, even when the tests run as root
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    scan = scan_dataset(tmp_path)
    assert ("unreadable_folder", "locked") in _kinds(scan)
    assert [r.path.name for r in scan.records] == ["a.png"]


# --- caption processing ----------------------------------------------------------------------------


def test_process_caption_keeps_first_tags_and_shuffles_the_rest() -> None:
    caption = "sks dog, beach, sunset, red collar, running, grass"
    seen = set()
    for seed in range(20):
        out = process_caption(caption, random.Random(seed), shuffle_tags=True, keep_tokens=2, dropout=0.0)
        tags = out.split(", ")
        assert tags[:2] == ["sks dog", "beach"]
        assert sorted(tags) == sorted(caption.split(", "))
        seen.add(out)
    assert len(seen) > 1
    same = [process_caption(caption, random.Random(7), shuffle_tags=True, keep_tokens=1, dropout=0.1)
            for _ in range(2)]
    assert same[0] == same[1]  # deterministic for a seed
    assert process_caption(caption, random.Random(0), shuffle_tags=False, keep_tokens=0, dropout=0) == caption
    assert process_caption(caption, random.Random(0), shuffle_tags=True, keep_tokens=0, dropout=1.0) == ""


def test_header_scan_of_many_images_is_fast(tmp_path: Path) -> None:
    img = noise_image(32, 32, seed=1)
    for i in range(500):
        save(img, tmp_path / f"{i:04d}.png")
    start = time.perf_counter()
    scan = scan_dataset(tmp_path)
    elapsed = time.perf_counter() - start
    assert len(scan.records) == 500
    assert elapsed < 10  # loose: ~0.1 s on a laptop; 10,000 images take a few seconds
