"""Sample prompts from a file in kohya's format (sample.prompts_file, `sdstudio sample --prompts-file`): the
parser, and that previews and the CLI sample each prompt with its own settings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdstudio.core.errors import UserError
from sdstudio.core.sampling.prompts_file import (
    PromptSpec,
    parse_prompt_line,
    parse_prompts,
    read_prompts_file,
)
from sdstudio.core.sampling.sampler import stack_padded

KOHYA_FILE = """# kohya-style sample prompts
a red circle on white --n blurry, lowres --w 24 --h 16 --s 3 --l 4.5 --d 42

  # indented comment
a blue square on white
masterpiece, 1girl --ss k_euler --cfgr 0.5 --d 7
"""


def test_parser_reads_every_kohya_option() -> None:
    specs = parse_prompts(KOHYA_FILE)
    assert [s.prompt for s in specs] == ["a red circle on white", "a blue square on white", "masterpiece, 1girl"]
    first = specs[0]
    assert (first.negative, first.width, first.height, first.steps, first.guidance, first.seed) == \
        ("blurry, lowres", 24, 16, 3, 4.5, 42)
    assert specs[1] == PromptSpec("a blue square on white") and specs[1].settings() == {}
    assert specs[2].sampler == "euler" and specs[2].seed == 7 and specs[2].ignored == ("--cfgr",)
    assert parse_prompt_line("   ") is None and parse_prompt_line("# x --w 8") is None
    assert parse_prompt_line("a--b c") == PromptSpec("a--b c"), "only ' --' starts an option"


@pytest.mark.parametrize("line, words", [("x --w 30", "multiple of 8"), ("x --s zero", "not a whole number"),
                                         ("x --l 99", "out of range"), ("x --h -8", "out of range")])
def test_parser_errors_name_file_and_line(line: str, words: str) -> None:
    with pytest.raises(UserError, match=f"p.txt:2: .*{words}"):
        parse_prompts("ok\n" + line, "p.txt")


def test_reading_the_file(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("\ufeffa cat --d 3\n", encoding="utf-8")
    assert read_prompts_file(path) == [PromptSpec("a cat", seed=3)]
    with pytest.raises(UserError, match="does not exist"):
        read_prompts_file(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(UserError, match="no prompt"):
        read_prompts_file(tmp_path / "empty.txt")


def test_rows_of_other_sizes_are_padded_into_one_grid() -> None:
    a = np.zeros((2, 16, 24, 3), np.uint8)
    b = np.zeros((2, 8, 8, 3), np.uint8)
    out = stack_padded([a, b])
    assert out.shape == (4, 16, 24, 3) and out[2, 0, 0, 0] == 255 and out[2, 4, 8, 0] == 0


def test_previews_use_each_prompts_settings(tiny_config, tmp_path: Path, monkeypatch) -> None:
    """A run's preview grid: the file's prompts after sample.prompts, each sampled with its line's settings."""
    from sdstudio.core import events as ev
    from sdstudio.core.sampling import sampler
    from sdstudio.core.train import previews
    from sdstudio.core.train.loop import train

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(KOHYA_FILE, encoding="utf-8")
    calls: list[dict] = []
    real = sampler.generate

    def spy(bundle, model, sched, prompts_, seeds, **kw):
        calls.append({"prompts": list(prompts_), "seeds": list(seeds), **kw})
        return real(bundle, model, sched, prompts_, seeds, **kw)

    monkeypatch.setattr(previews, "generate", spy)
    cfg = tiny_config.with_overrides({"sample.prompts": ["a green circle on white"],
                                      "sample.prompts_file": str(prompts), "sample.every_steps": 2,
                                      "train.max_steps": 2, "sample.negative_prompt": "ugly",
                                      "sample.steps": 2, "sample.guidance": 3.0, "sample.seeds": [0, 1]})
    events = list(train(cfg, run_dir=tmp_path / "run"))
    grid = next(e for e in events if isinstance(e, ev.SampleGrid))
    assert list(grid.prompts) == ["a green circle on white", "a red circle on white", "a blue square on white",
                                  "masterpiece, 1girl"]
    rows = {c["prompts"][0]: c for c in calls}
    red = rows["a red circle on white"]
    assert (red["seeds"], red["steps"], red["guidance"], red["negative_prompt"], red["size"]) == \
        ([42, 43], 3, 4.5, "blurry, lowres", (24, 16))
    blue = rows["a blue square on white"]
    assert (blue["seeds"], blue["steps"], blue["guidance"], blue["negative_prompt"], blue["size"]) == \
        ([0, 1], 2, 3.0, "ugly", None), "a line without options takes sample.*"
    assert rows["masterpiece, 1girl"]["sampler"] == "euler"
    assert grid.image.shape[0] == 4 * 16 + 5 * 2 and grid.image.shape[1] == 2 * 24 + 3 * 2, \
        "the 24x16 row sets the cell size; the 16 px rows are centred in it"
    meta = json.loads((tmp_path / "run" / "samples" / "step-00000002.json").read_text())
    assert meta["prompt_settings"][1] == {"negative": "blurry, lowres", "width": 24, "height": 16, "steps": 3,
                                          "guidance": 4.5, "seed": 42}


def test_cli_sample_with_a_prompts_file(tiny_config, tmp_path: Path, capsys) -> None:
    from sdstudio.cli import main
    from sdstudio.core.train.loop import train

    list(train(tiny_config.with_overrides({"train.max_steps": 1, "checkpoint.every_steps": 1}),
               run_dir=tmp_path / "run"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle on white --w 24 --h 16 --s 2 --d 5\na blue square on white --s 2\n",
                       encoding="utf-8")
    out = tmp_path / "out"
    assert main(["sample", "--run", str(tmp_path / "run"), "--prompts-file", str(prompts), "--n", "2",
                 "--steps", "2", "--out", str(out)]) == 0
    assert Image.open(out / "0-0.png").size == (24, 16) and Image.open(out / "1-1.png").size == (16, 16)
    assert Image.open(out / "grid.png").size == (2 * 24 + 3 * 2, 2 * 16 + 3 * 2)
    assert main(["sample", "--run", str(tmp_path / "run"), "--out", str(out)]) == 2
    assert "--prompt" in capsys.readouterr().err
