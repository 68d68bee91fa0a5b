"""Training masks (name.mask.png): never scanned as images, listed by the health report, made from the alpha
channel or from a prompt with a tiny random-weight CLIPSeg (saved with save_pretrained, with the bundled CLIP
tokenizer), written through the undo journal. The tests check the path (files, sizes, modes, thresholds,
batches, undo), not what a random model finds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdstudio.cli import main
from sdstudio.core.data.mask_files import is_mask_file, mask_path
from sdstudio.core.data.masks import read_mask, write_masks
from sdstudio.core.data.report import build_report, format_report
from sdstudio.core.data.scan import scan_dataset

try:
    from tiny_clipseg import build_clipseg
except ImportError:  # tests/ imported as a package
    from tests.tiny_clipseg import build_clipseg


@pytest.fixture(scope="module")
def clipseg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_clipseg(tmp_path_factory.mktemp("clipseg"))


def _dataset(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    cut = Image.new("RGBA", (20, 12), (255, 0, 0, 255))
    cut.paste((0, 0, 0, 0), (0, 0, 10, 12))  # left half transparent
    cut.save(root / "cut.png")
    Image.new("RGB", (16, 24), (0, 0, 255)).save(root / "plain.jpg")
    Image.new("RGBA", (8, 8), (0, 255, 0, 255)).save(root / "opaque.png")
    (root / "cut.txt").write_text("a red square")
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".sdstudio" not in p.parts}


def test_mask_files_are_not_images_and_the_report_lists_them(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "d")
    assert mask_path(root / "plain.jpg") == root / "plain.mask.png"
    assert is_mask_file("A.MASK.PNG") and not is_mask_file("mask.png")
    write_masks(root, {root / "plain.jpg": Image.new("L", (16, 24), 255)}, "test")
    Image.new("L", (4, 4), 0).save(root / "orphan.mask.png")  # a mask without its image is no image either
    scan = scan_dataset(root, decode=True)
    assert sorted(r.path.name for r in scan.records) == ["cut.png", "opaque.png", "plain.jpg"]
    report = build_report(scan)
    assert report["counts"]["masked"] == 1 and report["masks"]["images"] == ["plain.jpg"]
    assert "Masks:   1 of 3 images have a training mask" in format_report(report)
    kohya = tmp_path / "k"
    (kohya / "2_dog").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(kohya / "2_dog" / "a.png")
    Image.new("L", (8, 8)).save(kohya / "2_dog" / "a.mask.png")
    Image.new("L", (8, 8)).save(kohya / "stray.mask.png")  # not an image left in a kohya parent
    scan = scan_dataset(kohya)
    assert [r.path.name for r in scan.records] == ["a.png"]
    assert not [p for p in scan.problems if p.kind == "skipped_folder"]


def test_masks_from_alpha_modes_and_undo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _dataset(tmp_path / "d")
    before = _files(root)
    assert main(["dataset", "masks", str(root), "--from-alpha"]) == 0
    err = capsys.readouterr().err
    assert "wrote 1 mask(s)" in err and "plain.jpg: it has no alpha channel" in err and "fully opaque" in err
    with Image.open(root / "cut.mask.png") as mask:
        assert mask.mode == "L" and mask.size == (20, 12)
        pixels = np.asarray(mask)
    assert (pixels[:, :10] == 0).all() and (pixels[:, 10:] == 255).all()
    assert not (root / "plain.mask.png").exists() and not (root / "opaque.mask.png").exists()
    assert [r.path.name for r in scan_dataset(root).records] == ["cut.png", "opaque.png", "plain.jpg"]

    painted = (root / "cut.mask.png").read_bytes()
    write_masks(root, {root / "cut.png": Image.new("L", (20, 12), 128)}, "painted")
    edited = (root / "cut.mask.png").read_bytes()
    assert main(["dataset", "masks", str(root), "--from-alpha"]) == 0  # skip: the edited mask stays
    assert "1 existing mask(s) left alone" in capsys.readouterr().err
    assert (root / "cut.mask.png").read_bytes() == edited
    assert main(["dataset", "masks", str(root), "--from-alpha", "--mode", "replace"]) == 0
    assert (root / "cut.mask.png").read_bytes() == painted
    assert main(["dataset", "undo", str(root)]) == 0  # the replace run
    assert (root / "cut.mask.png").read_bytes() == edited
    assert main(["dataset", "undo", str(root)]) == 0  # the painted mask
    assert main(["dataset", "undo", str(root)]) == 0  # the first run: its mask is removed again
    assert _files(root) == before


def test_read_mask_resizes_and_reports_a_broken_file(tmp_path: Path) -> None:
    from sdstudio.core.errors import UserError

    root = _dataset(tmp_path / "d")
    assert read_mask(root / "cut.png") is None
    Image.new("RGB", (10, 6), (255, 255, 255)).save(mask_path(root / "cut.png"))
    mask = read_mask(root / "cut.png", size=(20, 12))
    assert mask is not None and mask.mode == "L" and mask.size == (20, 12)
    mask_path(root / "cut.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="cut.mask.png"):
        read_mask(root / "cut.png")


def test_masks_from_a_prompt_with_clipseg(clipseg: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from sdstudio.core.data import clipseg as clipseg_module

    root = _dataset(tmp_path / "d")
    seen: list[tuple[int, str]] = []
    original = clipseg_module.ClipSegSegmenter.probabilities

    def spy(self, images, prompt):  # records each batch the model sees
        seen.append((len(images), prompt))
        return original(self, images, prompt)

    monkeypatch.setattr(clipseg_module.ClipSegSegmenter, "probabilities", spy)
    args = ["dataset", "masks", str(root), "--prompt", "a red square", "--segmenter", str(clipseg),
            "--batch-size", "2", "--device", "cpu"]
    assert main([*args, "--threshold", "0"]) == 0  # every sigmoid is above 0: all white
    assert seen == [(2, "a red square"), (1, "a red square")]  # batched, the prompt passed as given
    for name, size in (("cut", (20, 12)), ("plain", (16, 24)), ("opaque", (8, 8))):
        with Image.open(root / f"{name}.mask.png") as mask:
            assert mask.mode == "L" and mask.size == size
            assert (np.asarray(mask) == 255).all()
    assert main([*args, "--threshold", "1", "--mode", "replace"]) == 0  # nothing is above 1: all black
    for name in ("cut", "plain", "opaque"):
        assert (np.asarray(Image.open(root / f"{name}.mask.png")) == 0).all()
    assert main([*args, "--threshold", "0.5", "--mode", "replace"]) == 0
    values = set(np.unique(np.asarray(Image.open(root / "plain.mask.png"))).tolist())
    assert values <= {0, 255}  # thresholded, never soft
    for _ in range(3):
        assert main(["dataset", "undo", str(root)]) == 0
    assert not list(root.glob("*.mask.png"))


def test_masks_for_a_selection_only(clipseg: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _dataset(tmp_path / "d")
    before = _files(root)
    assert main(["dataset", "masks", str(root), "--from-alpha", "--only", "opaque.png"]) == 0
    assert "wrote 0 mask(s)" in capsys.readouterr().err and not list(root.glob("*.mask.png"))  # cut.png: not asked
    args = ["dataset", "masks", str(root), "--prompt", "a red square", "--segmenter", str(clipseg), "--device", "cpu",
            "--threshold", "0"]
    assert main([*args, "--only", "p*", "--only", "./cut.png"]) == 0
    assert sorted(p.name for p in root.glob("*.mask.png")) == ["cut.mask.png", "plain.mask.png"]
    assert main([*args, "--only", "cut.mask.png"]) == 2  # a mask is no image: never a mask of a mask
    assert "matches no image" in capsys.readouterr().err
    assert main(["dataset", "undo", str(root)]) == 0
    assert _files(root) == before


def test_mask_command_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _dataset(tmp_path / "d")
    assert main(["dataset", "masks", str(root), "--prompt", "a dog"]) == 2
    assert "--segmenter" in capsys.readouterr().err
    assert main(["dataset", "masks", str(root), "--prompt", "a dog", "--segmenter", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["dataset", "masks", str(root), "--prompt", "a dog", "--segmenter", str(tmp_path / "empty")]) == 2
    assert "config.json" in capsys.readouterr().err
    assert not list(root.glob("*.mask.png"))
