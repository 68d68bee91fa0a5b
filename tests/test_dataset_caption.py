"""`sdstudio dataset caption`: a tiny WD14-format ONNX tagger (built with the onnx helper API, with its
selected_tags.csv) and a tiny random-weight BLIP saved with save_pretrained. The tests check the path (files
read, thresholds, sidecars in the dataset's convention, modes, resume, undo), never the words."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdstudio.cli import main
from sdstudio.core.captioning.job import JOB_FILE, run_caption_job
from sdstudio.core.data import undo_journal
from sdstudio.core.errors import UserError

try:
    from tiny_tagger import build_tagger
except ImportError:  # tests/ imported as a package
    from tests.tiny_tagger import build_tagger


@pytest.fixture(scope="module")
def tagger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'sdstudio[tagger]')")
    return build_tagger(tmp_path_factory.mktemp("tagger"))


@pytest.fixture(scope="module")
def blip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    out = tmp_path_factory.mktemp("blip")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *["a", "photo", "of", "the", "cat", "dog", "red", "on"],
             *(f"w{i}" for i in range(20))]
    (out / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizer(str(out / "vocab.txt"), model_max_length=32)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    config = BlipConfig(
        text_config={"vocab_size": len(words), "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "intermediate_size": 37, "max_position_embeddings": 64, "encoder_hidden_size": 32,
                     "bos_token_id": 5, "pad_token_id": 0, "sep_token_id": 3, "eos_token_id": 3},
        vision_config={"hidden_size": 32, "image_size": 32, "patch_size": 16, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "intermediate_size": 37},
        projection_dim=32)
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(out)
    processor.save_pretrained(out)
    return out


def image(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (20, 12)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".sdstudio" not in p.parts}


RED, BLUE = (255, 0, 0), (0, 0, 255)


def test_preprocessing_is_wd14s(tagger: Path) -> None:
    from sdstudio.core.captioning.wd14 import prepare_image

    picture = Image.new("RGBA", (8, 2), (255, 0, 0, 255))
    picture.putpixel((0, 0), (0, 0, 0, 0))  # transparent: composited on white
    arr = prepare_image(picture, 8)
    assert arr.shape == (8, 8, 3) and arr.dtype == np.float32
    assert arr[0, 0].tolist() == [255.0, 255.0, 255.0]  # padded with white
    assert arr[3, 4].tolist() == [0.0, 0.0, 255.0]  # red, in BGR order, 0..255
    assert arr[3, 0].tolist() == [255.0, 255.0, 255.0]  # the transparent pixel became white
    assert prepare_image(Image.new("L", (30, 10), 0), 16).shape == (16, 16, 3)


def test_tagger_thresholds_and_options(tagger: Path) -> None:
    from sdstudio.core.captioning.wd14 import TaggerOptions, WD14Tagger

    red, blue = Image.new("RGB", (40, 40), RED), Image.new("RGB", (40, 40), BLUE)
    tags = WD14Tagger(tagger).label([red, blue])
    assert tags == ["red hair, watermark, ^_^, half sure", "blue sky, watermark, ^_^, half sure"]  # best first
    strict = WD14Tagger(tagger, TaggerOptions(general_threshold=0.6, character_threshold=0.8,
                                              exclude=("watermark",), underscores_to_spaces=False,
                                              include_ratings=True))
    assert strict.label([red]) == ["hero_(series), red_hair, ^_^, general"]


def test_caption_cli_writes_sidecars_modes_and_undo(tagger: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    image(root / "a.png", RED)
    image(root / "b.png", BLUE)
    image(root / "c.png", RED)
    (root / "b.txt").write_bytes(b"blue sky, outdoors\n")
    (root / "c.txt").write_bytes(b"A hand-written sentence.\n")
    original = files(root)
    args = ["dataset", "caption", str(root), "--tagger", str(tagger), "--threshold", "0.6",
            "--exclude", "watermark,^_^"]
    assert main([*args, "--trigger", "sks"]) == 0  # default mode: skip images with a caption
    assert (root / "a.txt").read_text() == "sks, red hair"
    assert files(root)["b.txt"] == original["b.txt"] and files(root)["c.txt"] == original["c.txt"]
    assert main([*args, "--mode", "append"]) == 0
    assert (root / "a.txt").read_text() == "sks, red hair"  # nothing new to add
    assert (root / "b.txt").read_text() == "blue sky, outdoors"
    assert (root / "c.txt").read_text() == "A hand-written sentence.\nred hair"  # prose: a new line
    assert main([*args, "--mode", "replace"]) == 0
    assert (root / "c.txt").read_text() == "red hair"
    for _ in range(3):
        assert main(["dataset", "undo", str(root)]) == 0
    assert files(root) == original and not (root / "a.txt").exists()


def test_caption_cli_only_captions_the_selected_images(tagger: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "data"
    for name in ("a.png", "b.png", "c.png", "sub/d.png"):
        image(root / name, RED)
    original = files(root)
    args = ["dataset", "caption", str(root), "--tagger", str(tagger), "--threshold", "0.6",
            "--exclude", "watermark,^_^"]
    assert main([*args, "--only", "b.png", "--only", str(root / "sub" / "*.png")]) == 0  # a name, an absolute glob
    assert sorted(set(files(root)) - set(original)) == ["b.txt", "sub/d.txt"]
    assert (root / "b.txt").read_text() == "red hair"
    assert main([*args, "--only", "[ac].png", "--only", "a.png"]) == 0  # overlapping patterns: once each
    assert "captioned 2 image(s)" in capsys.readouterr().err
    assert main([*args, "--only", "z*.png"]) == 2  # a typo is an error, never "nothing to do"
    assert "--only 'z*.png' matches no image" in capsys.readouterr().err
    assert main([*args, "--only", "a.txt"]) == 2  # a caption file is no image
    assert main([*args, "--only", str(tmp_path / "elsewhere.png")]) == 2
    assert "outside the dataset folder" in capsys.readouterr().err
    for _ in range(2):
        assert main(["dataset", "undo", str(root)]) == 0
    assert files(root) == original


def test_caption_follows_the_dataset_convention(tagger: Path, tmp_path: Path) -> None:
    kohya = tmp_path / "kohya"
    image(kohya / "5_sks" / "a.png", RED)
    image(kohya / "5_sks" / "b.png", RED)
    (kohya / "5_sks" / "b.caption").write_text("old")
    assert main(["dataset", "caption", str(kohya), "--tagger", str(tagger)]) == 0
    assert (kohya / "5_sks" / "a.caption").is_file()  # the dataset uses .caption files
    hf = tmp_path / "hf"
    image(hf / "a.png", BLUE)
    (hf / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "keep me"}\n')
    image(hf / "b.png", BLUE)
    assert main(["dataset", "caption", str(hf), "--tagger", str(tagger), "--trigger", "zzz"]) == 0
    rows = [json.loads(line) for line in (hf / "metadata.jsonl").read_text().splitlines()]
    assert rows[0]["text"] == "keep me" and rows[1]["file_name"] == "b.png"
    assert rows[1]["text"].startswith("zzz, ") and not (hf / "b.txt").exists()


def test_interrupted_run_continues_into_the_same_undo_entry(tagger: Path, tmp_path: Path) -> None:
    from sdstudio.core.captioning.wd14 import TaggerOptions, WD14Tagger

    root = tmp_path / "data"
    for i in range(5):
        image(root / f"{i}.png", RED if i % 2 else BLUE)
    (root / "3.txt").write_bytes(b"old, tags\n")
    original = files(root)
    labeler = WD14Tagger(tagger, TaggerOptions(batch_size=2))
    batches = {"n": 0}

    def stop_after_one_batch() -> bool:
        batches["n"] += 1
        return batches["n"] > 1

    first = run_caption_job(root, labeler, mode="append", should_stop=stop_after_one_batch)
    assert first.stopped and first.written == 2 and (root / JOB_FILE).is_file()
    labeler.options.batch_size = 1  # not a setting that changes captions: the job still continues
    events = []
    second = run_caption_job(root, labeler, mode="append", progress=events.append)
    assert second.resumed and second.already_done == 2 and second.written == 3
    assert second.journal == first.journal and not (root / JOB_FILE).exists()
    assert events[-1].done == events[-1].total == 3
    assert (root / "3.txt").read_text().startswith("old, tags, ")  # appended once, not twice
    assert len(undo_journal.list_entries(root)) == 1
    undo_journal.undo_last(root)
    assert files(root) == original


def test_missing_onnxruntime_names_the_extra(tagger: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from sdstudio.core.captioning.wd14 import WD14Tagger

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(UserError, match=r'pip install "sdstudio\[tagger\]"'):
        WD14Tagger(tagger)
    image(tmp_path / "d" / "a.png", RED)
    assert main(["dataset", "caption", str(tmp_path / "d"), "--tagger", str(tagger)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'pip install "sdstudio[tagger]"' in err[0]


def test_bad_tagger_folder_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image(tmp_path / "d" / "a.png", RED)
    assert main(["dataset", "caption", str(tmp_path / "d"), "--tagger", str(tmp_path)]) == 2
    assert "model.onnx" in capsys.readouterr().err


def test_captioner_writes_and_undoes(blip: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    image(root / "a.png", RED)
    image(root / "b.png", BLUE, (12, 30))
    (root / "b.txt").write_bytes(b"an old caption\n")
    original = files(root)
    args = ["dataset", "caption", str(root), "--captioner", str(blip), "--prompt", "a photo of",
            "--max-new-tokens", "4", "--batch-size", "2", "--device", "cpu", "--trigger", "sks"]
    assert main(args) == 0
    assert (root / "a.txt").read_text().startswith("sks, a photo of")
    assert files(root)["b.txt"] == original["b.txt"]  # skip is the default
    assert main([*args, "--mode", "replace"]) == 0
    assert (root / "b.txt").read_text().startswith("sks, a photo of")
    assert main(["dataset", "undo", str(root)]) == 0
    assert main(["dataset", "undo", str(root)]) == 0
    assert files(root) == original


def test_captioner_folder_must_be_a_model(tmp_path: Path) -> None:
    from sdstudio.core.captioning.image_to_text import ImageToTextCaptioner

    with pytest.raises(UserError, match="config.json"):
        ImageToTextCaptioner(tmp_path)


class _CrashingLabeler:
    """Tags every image 'fake'; raises on the given call, as a crash or Ctrl-C half-way would."""

    tag_style = True
    batch_size = 2

    def __init__(self, crash_on: int) -> None:
        self.calls, self.crash_on = 0, crash_on

    def settings(self) -> dict[str, str]:
        return {"fake": "labeler"}

    def label(self, images: list[Image.Image]) -> list[str]:
        self.calls += 1
        if self.calls == self.crash_on:
            raise KeyboardInterrupt
        return ["fake"] * len(images)


def test_a_crashed_run_continues_with_the_rest(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for i in range(5):
        image(root / f"{i}.png", RED)
    with pytest.raises(KeyboardInterrupt):
        run_caption_job(root, _CrashingLabeler(crash_on=2), mode="replace")
    assert sorted(p.name for p in root.glob("*.txt")) == ["0.txt", "1.txt"]
    again = _CrashingLabeler(crash_on=0)
    result = run_caption_job(root, again, mode="replace")
    assert result.resumed and result.already_done == 2 and result.written == 3 and again.calls == 2
    assert sorted(p.name for p in root.glob("*.txt")) == [f"{i}.txt" for i in range(5)]
    undo_journal.undo_last(root)  # one entry for the whole job, crash included
    assert not list(root.glob("*.txt")) and undo_journal.list_entries(root) == []
