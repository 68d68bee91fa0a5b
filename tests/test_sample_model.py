"""`sdstudio sample --model PATH [--lora FILE]`: Stable Diffusion base models (diffusers folder, single file),
LoRA files as sdstudio exports them (kohya and diffusers format), sdstudio's pixel diffusers-folder exports,
and one clear line with exit code 2 for every input that cannot work."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdstudio.cli import main
from sdstudio.core import events as ev
from sdstudio.core.export.api import export
from sdstudio.core.train.loop import train
from tests.conftest import TINY_OVERRIDES
from tests.sd_helpers import sd_config

SAMPLE = ["--n", "2", "--seed", "3", "--steps", "2", "--guidance", "4.0", "--sampler", "ddim", "--negative", ""]


def sample(model_args: list[str], out: Path, *prompts: str) -> np.ndarray:
    """Run the CLI; the images it wrote, prompt-major, as one array."""
    args = ["sample", *model_args]
    for p in prompts or ("a red circle",):
        args += ["--prompt", p]
    assert main([*args, *SAMPLE, "--out", str(out)]) == 0
    n = len(prompts or ("a red circle",))
    return np.stack([np.asarray(Image.open(out / f"{i}-{k}.png")) for i in range(n) for k in range(2)])


@pytest.fixture(autouse=True)
def _on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """--run and --model pick the GPU when there is one; the comparisons here are CPU (fp32) facts."""
    import sdstudio.core.sampling.from_run as inference
    from sdstudio.core.train import setup

    cpu = lambda choice="auto": torch.device("cpu")
    monkeypatch.setattr(setup, "pick_device", cpu)
    monkeypatch.setattr(inference, "pick_device", cpu)


@pytest.fixture(scope="module")
def lora_run(tiny_sd1: Path, four_images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD1 LoRA run (2 steps) with its kohya and diffusers exports (fp32) in run/exports."""
    root = tmp_path_factory.mktemp("lora-run")
    with pytest.MonkeyPatch.context() as mp:  # module scope: the autouse home fixture is not active yet
        mp.setenv("SDSTUDIO_HOME", str(root / "home"))
        cfg = sd_config("sd15-lora", tiny_sd1, four_images, **{"train.max_steps": 2, "train.learning_rate": 5e-2,
                                                               "lora.rank": 4, "lora.alpha": 2.0,
                                                               "lora.targets": "attention_ff"})
        run = root / "run"
        events = list(train(cfg, run_dir=run))
        assert isinstance(events[-1], ev.Finished), events[-1]
        export(run, "kohya", run / "exports" / "kohya.safetensors", dtype=torch.float32)
        export(run, "diffusers", run / "exports" / "diffusers.safetensors", dtype=torch.float32)
    return run


def test_sample_an_sd_folder_and_the_same_model_as_a_single_file(tiny_sd1: Path, tmp_path: Path) -> None:
    from sdstudio.core.export.single_file import write_single_file
    from sdstudio.core.models.sd.files import load_sd_components

    images = sample(["--model", str(tiny_sd1)], tmp_path / "folder", "a red circle", "a blue square")
    names = sorted(p.name for p in (tmp_path / "folder").glob("*.png"))
    assert names == ["0-0.png", "0-1.png", "1-0.png", "1-1.png", "grid.png"]
    assert images.shape == (4, 64, 64, 3), "the model's native size (UNet sample_size 8 x 8)"
    assert Image.open(tmp_path / "folder" / "grid.png").size == (2 * 64 + 3 * 2, 2 * 64 + 3 * 2)
    assert not np.array_equal(images[0], images[1]), "image k uses seed S + k"

    single = tmp_path / "tiny.safetensors"
    write_single_file(load_sd_components(tiny_sd1, family="sd1"), single, family="sd1", dtype=torch.float32)
    # a single file takes its configs from --config-folder (the tiny topology is not one sdstudio ships)
    from_file = sample(["--model", str(single), "--config-folder", str(tiny_sd1)], tmp_path / "file",
                       "a red circle", "a blue square")
    assert np.abs(from_file.astype(int) - images.astype(int)).max() <= 1


def test_lora_changes_the_images_as_the_trained_run_does(tiny_sd1: Path, lora_run: Path, tmp_path: Path) -> None:
    base = sample(["--model", str(tiny_sd1)], tmp_path / "base")
    kohya = sample(["--model", str(tiny_sd1), "--lora", str(lora_run / "exports" / "kohya.safetensors")],
                   tmp_path / "kohya")
    diffusers = sample(["--model", str(tiny_sd1), "--lora", str(lora_run / "exports" / "diffusers.safetensors")],
                       tmp_path / "diffusers")
    run = sample(["--run", str(lora_run), "--raw"], tmp_path / "run")  # exports hold the raw weights
    assert np.abs(kohya.astype(int) - base.astype(int)).max() > 10, "the LoRA must change the output"
    # the base model + the exported LoRA is the trained model: the run's own samples, within rounding
    assert np.abs(kohya.astype(int) - run.astype(int)).max() <= 2
    assert np.abs(diffusers.astype(int) - run.astype(int)).max() <= 2
    # the run exported as a diffusers pipeline folder (LoRA merged into the UNet) samples the same
    folder = export(lora_run, "diffusers-folder", tmp_path / "merged", dtype=torch.float32)
    merged = sample(["--model", str(folder)], tmp_path / "merged-samples")
    assert np.abs(merged.astype(int) - run.astype(int)).max() <= 2


def test_sample_a_pixel_export_like_its_run(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config.with_overrides({"train.max_steps": 3})
    events = list(train(cfg, run_dir=tmp_path / "run"))
    assert isinstance(events[-1], ev.Finished), events[-1]
    folder = export(tmp_path / "run", "diffusers-folder", tmp_path / "export", dtype=torch.float32)
    prompts = TINY_OVERRIDES["sample.prompts"]
    theirs = sample(["--model", str(folder)], tmp_path / "model", *prompts)
    ours = sample(["--run", str(tmp_path / "run")], tmp_path / "ours", *prompts)
    assert theirs.shape == (4, 16, 16, 3)
    assert np.array_equal(theirs, ours)
    # defaults come from the run (sdstudio.json): no --steps / --guidance / --sampler needed
    assert main(["sample", "--model", str(folder), "--prompt", prompts[0], "--n", "1",
                 "--out", str(tmp_path / "defaults")]) == 0
    assert (tmp_path / "defaults" / "0-0.png").is_file()


def _foreign_lora(tmp: Path) -> Path:
    """kohya names of the SD1 UNet, but shapes no SD model of that topology has."""
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    path = tmp / "foreign.safetensors"
    save_file({f"{name}.lora_down.weight": torch.zeros(4, 7), f"{name}.lora_up.weight": torch.zeros(7, 4),
               f"{name}.alpha": torch.tensor(4.0)}, str(path))
    return path


def _sdxl_labelled_lora(lora_run: Path, tmp: Path) -> Path:
    from safetensors import safe_open

    path = tmp / "xl.safetensors"
    with safe_open(str(lora_run / "exports" / "kohya.safetensors"), "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        meta = dict(fh.metadata())
    save_file(tensors, str(path), metadata={**meta, "ss_base_model_version": "sdxl_base_v1-0"})
    return path


def test_bad_inputs_exit_2_with_a_message_naming_the_path(tiny_sd1: Path, lora_run: Path, tmp_path: Path,
                                                          capsys) -> None:
    out = str(tmp_path / "out")
    missing = tmp_path / "nope.safetensors"
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    bogus = tmp_path / "bogus.safetensors"
    save_file({"a.weight": torch.zeros(2)}, str(bogus))
    plain = tmp_path / "plain"
    plain.mkdir()
    kohya = lora_run / "exports" / "kohya.safetensors"
    foreign = _foreign_lora(tmp_path)
    xl = _sdxl_labelled_lora(lora_run, tmp_path)
    cases = [
        (["--model", str(missing)], str(missing), "no such file"),
        (["--model", str(text)], str(text), ".safetensors/.ckpt"),
        (["--model", str(bogus)], str(bogus), "not a Stable Diffusion checkpoint"),
        (["--model", str(kohya)], str(kohya), "pass it as --lora"),
        (["--model", str(plain)], str(plain), "no model_index.json"),
        (["--model", str(lora_run)], str(lora_run), "--run"),
        (["--run", str(lora_run), "--lora", str(kohya)], str(kohya), "--model"),
        (["--model", str(tiny_sd1), "--lora", str(missing)], str(missing), "no such file"),
        (["--model", str(tiny_sd1), "--lora", str(bogus)], str(bogus), "not a LoRA"),
        (["--model", str(tiny_sd1), "--lora", str(foreign)], str(foreign), "does not fit"),
        (["--model", str(tiny_sd1), "--lora", str(xl)], str(xl), "a LoRA for sdxl models"),
    ]
    for args, path, fragment in cases:
        code = main(["sample", *args, "--prompt", "x", "--n", "1", "--steps", "1", "--out", out])
        err = capsys.readouterr().err.strip()
        assert code == 2, (args, err)
        assert path in err and fragment in err, (args, err)
        assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists(), "nothing written"


def test_lora_on_a_pixel_model_is_refused(tiny_config, lora_run: Path, tmp_path: Path, capsys) -> None:
    events = list(train(tiny_config.with_overrides({"train.max_steps": 1}), run_dir=tmp_path / "run"))
    assert isinstance(events[-1], ev.Finished), events[-1]
    folder = export(tmp_path / "run", "diffusers-folder", tmp_path / "export")
    lora = lora_run / "exports" / "kohya.safetensors"
    assert main(["sample", "--model", str(folder), "--lora", str(lora), "--prompt", "x",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(lora) in err and "from-scratch" in err


def test_sample_run_of_a_mixed_precision_run_uses_autocast(tiny_sd1: Path, four_images: Path, tmp_path: Path,
                                                           monkeypatch) -> None:
    """A GPU run in bf16 keeps its frozen weights in bf16; `sample --run` must sample under autocast as the run's
    previews do (fp32 latents against bf16 weights failed). Imitated on the CPU by loading in bf16."""
    from sdstudio.core.models.sd import model as sd_module
    from sdstudio.core.sampling.from_run import load_trained
    from sdstudio.core.train.loop import train
    from tests.sd_helpers import sd_config

    config = sd_config("sd15-lora", tiny_sd1, four_images, **{"train.max_steps": 1, "lora.rank": 4,
                                                              "train.threads": 1})
    run = tmp_path / "run"
    assert type(list(train(config, run_dir=run))[-1]).__name__ == "Finished"
    monkeypatch.setattr(sd_module, "_weight_dtype", lambda config, device: torch.bfloat16)
    loaded = load_trained(run)
    assert loaded.autocast_dtype == torch.bfloat16
    images = loaded.generate(["a photo"], [0], steps=2)
    assert images.shape[0] == 1 and images.dtype == np.uint8


def test_prediction_type_override_for_a_model_file(tiny_sd1: Path, tmp_path: Path, capsys) -> None:
    """A v-prediction file without the marker keys: --prediction-type says what the file does not."""
    from sdstudio.core.sampling.from_files import load_model

    plain = load_model(tiny_sd1)
    forced = load_model(tiny_sd1, prediction_type="v_prediction")
    assert plain.scheduler.config.prediction_type == "epsilon"
    assert forced.scheduler.config.prediction_type == "v_prediction"
    a = plain.generate(["a photo"], [0], steps=2, guidance=1.0)
    b = forced.generate(["a photo"], [0], steps=2, guidance=1.0)
    assert not np.array_equal(a, b)
    out = tmp_path / "out"
    assert main(["sample", "--model", str(tiny_sd1), "--prediction-type", "v_prediction", "--prompt", "x",
                 "--n", "1", "--steps", "2", "--out", str(out)]) == 0
    assert (out / "grid.png").is_file()
    assert main(["sample", "--run", str(tmp_path), "--prediction-type", "v_prediction", "--prompt", "x",
                 "--out", str(out)]) == 2
    assert "only for --model" in capsys.readouterr().err
