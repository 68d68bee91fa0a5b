"""The command line: exact forms from the contract, exit codes, one-line errors, a real train + sample."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from sdstudio import __version__
from sdstudio.cli import main
from tests.conftest import TINY_OVERRIDES


def sdstudio(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sdstudio", *args], capture_output=True, text=True, timeout=timeout)


def sets(overrides: dict) -> list[str]:
    out = []
    for key, value in overrides.items():
        out += ["--set", f"{key}={json.dumps(value)}"]
    return out


def test_version_and_presets() -> None:
    proc = sdstudio("--version")
    assert proc.returncode == 0 and __version__ in proc.stdout
    proc = sdstudio("presets", "list")
    assert proc.returncode == 0 and "demo" in proc.stdout and "sd15-lora" in proc.stdout
    proc = sdstudio("presets", "show", "demo")
    assert proc.returncode == 0 and "[train]" in proc.stdout and "learning_rate" in proc.stdout


@pytest.mark.parametrize("args, fragment", [
    (["presets", "show", "nope"], "unknown preset 'nope'"),
    (["train", "--preset", "nope"], "unknown preset 'nope'"),
    (["train", "--set", "train.learning_rate=-1"], "train.learning_rate = -1"),
    (["train", "--set", "train.optimizer=adamx"], "train.optimizer = 'adamx'"),
    (["train", "--data", "/no/such/folder"], "/no/such/folder"),
    (["train", "--config", "/no/such.toml"], "/no/such.toml"),
    (["train", "--set", "nokey"], "KEY=VALUE"),
])
def test_bad_input_exits_2_with_one_line(args: list[str], fragment: str, capsys) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err, err
    assert "Traceback" not in err


def test_unreadable_toml_exits_2(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "not valid TOML" in capsys.readouterr().err


def test_folder_without_images_exits_2_and_writes_nothing(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "run"
    assert main(["train", "--data", str(empty), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no usable image" in err and str(empty) in err
    assert not out.exists()


def test_train_then_sample_then_resume(tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    code = main(["train", "--data", str(tiny_dataset), "--out", str(run), "--quiet",
                 *sets({k: v for k, v in TINY_OVERRIDES.items()}), "--set", "train.max_steps=4"])
    assert code == 0, capsys.readouterr().err
    assert (run / "checkpoints" / "step-00000004" / "manifest.json").is_file()

    out = tmp_path / "samples"
    code = main(["sample", "--run", str(run), "--prompt", "a red circle on white", "--prompt", "a blue square on white",
                 "--n", "3", "--seed", "5", "--steps", "3", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["0-0.png", "0-1.png", "0-2.png", "1-0.png", "1-1.png", "1-2.png", "grid.png"]
    assert Image.open(out / "0-0.png").size == (16, 16)
    grid = Image.open(out / "grid.png")
    assert grid.size == (3 * 16 + 4 * 2, 2 * 16 + 3 * 2), "2 rows (prompts) x 3 columns (seeds), 2 px padding"

    # --resume may extend a run but not change the model or the data order
    assert main(["train", "--resume", str(run), "--set", "model.block_channels=[8,16]"]) == 2
    assert "cannot change when resuming" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--set", "train.max_steps=6", "--quiet"]) == 0
    assert (run / "checkpoints" / "step-00000006").is_dir()
    # an existing run folder is not a new --out
    assert main(["train", "--data", str(tiny_dataset), "--out", str(run), "--quiet"]) == 2


def test_resume_without_checkpoint_is_a_clear_error(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text("schema_version = 1\n")
    (run / "checkpoints").mkdir()
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint to resume from" in err and "Traceback" not in err


def test_sample_needs_a_valid_run(tmp_path: Path, capsys) -> None:
    assert main(["sample", "--run", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "o")]) == 2
    assert "neither a run folder" in capsys.readouterr().err


@pytest.mark.slow
def test_ctrl_c_saves_a_resumable_checkpoint(tiny_dataset: Path, tmp_path: Path) -> None:
    import signal
    import time

    run = tmp_path / "run"
    args = [sys.executable, "-m", "sdstudio", "train", "--data", str(tiny_dataset), "--out", str(run),
            *sets({**TINY_OVERRIDES, "train.max_steps": 100000, "checkpoint.every_steps": 0})]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and '"kind":"train"' in metrics.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "sdstudio train --resume" in err
    assert list((run / "checkpoints").glob("step-*/manifest.json")), "a resumable checkpoint was saved"
