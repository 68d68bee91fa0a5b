"""The console shows each message once (run.log keeps the full log), and core messages, which name fields,
reach the console worded with the command's flags."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from sdstudio.cli import main
from sdstudio.cli.common import cli_text
from tests.conftest import TINY_OVERRIDES


def _sets(overrides: dict) -> list[str]:
    return [arg for key, value in overrides.items() for arg in ("--set", f"{key}={json.dumps(value)}")]


def test_a_run_prints_each_line_once_and_run_log_keeps_everything(tiny_dataset: Path, tmp_path: Path,
                                                                   capsys) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    (data / "broken.png").write_bytes(b"not an image")  # a warning the engine logs and reports as an event
    run = tmp_path / "run"
    code = main(["train", "--data", str(data), "--out", str(run), "--quiet",
                 *_sets({**TINY_OVERRIDES, "train.max_steps": 2, "checkpoint.every_steps": 2})])
    err = capsys.readouterr().err
    assert code == 0, err
    lines = err.splitlines()
    assert len([line for line in lines if "broken.png" in line]) == 1, err
    assert not [line for line in lines if line.startswith(("INFO", "ERROR"))], err
    assert len([line for line in lines if "checkpoint" in line]) == 1, err  # the CLI's "step 2: checkpoint ..."
    log = (run / "run.log").read_text()
    assert "broken.png" in log and "checkpoint saved" in log


def test_a_failed_run_says_why_once(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text("schema_version = 1\n")
    (run / "checkpoints").mkdir()
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("no checkpoint to resume from") == 1, err
    assert not [line for line in err.splitlines() if line.startswith("ERROR")], err


def test_field_names_become_the_commands_flags() -> None:
    flags = {"model.path": "--model", "lora": "--lora", "out": "--out", "force": "--force"}
    assert cli_text("model.path /m.ckpt: no such file", flags, ("model.path",)) == "--model /m.ckpt: no such file"
    assert cli_text("/x: exists already; choose another `out` or pass `force` to overwrite it", flags) == \
        "/x: exists already; choose another --out or pass --force to overwrite it"
    assert cli_text("lora /l.safetensors: this is a LoRA; pass it as `lora` together with a base `model.path`",
                    flags, ("lora",)) == "--lora /l.safetensors: this is a LoRA; pass it as --lora together " \
                                         "with a base --model"
    # without subjects (e.g. a run's own base model in `sample --run`), a leading field name stays as it is
    assert cli_text("model.path /m.ckpt: no such file", flags) == "model.path /m.ckpt: no such file"
    assert cli_text("see `sdstudio export RUN --format kohya` and `unknown`", flags) == \
        "see `sdstudio export RUN --format kohya` and `unknown`"


def test_an_existing_export_names_the_flags(tmp_path: Path, capsys) -> None:
    from sdstudio.core.errors import UserError
    from sdstudio.core.export.metadata import write_safetensors

    target = tmp_path / "out.safetensors"
    target.write_bytes(b"x")
    try:
        write_safetensors({}, target, {})
    except UserError as exc:
        core = str(exc)
    assert "--" not in core and "`out`" in core and "`force`" in core
    assert "choose another --out or pass --force" in cli_text(core, {"out": "--out", "force": "--force"})
