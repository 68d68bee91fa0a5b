"""`sdstudio sample --model TRANSFORMER.safetensors --vae ... --text-encoder ...`: Flux, SD3 and Chroma kept as
split single files sample exactly as the diffusers folder of the same weights (with and without a LoRA); a
missing part file is named by its flag; families and folders that take no such file refuse it in a sentence."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdstudio.cli import main
from tests.tiny_chroma import save_tiny_chroma_split, tiny_chroma_components
from tests.tiny_flux import save_tiny_flux_split, tiny_flux_components
from tests.tiny_sd3 import save_tiny_sd3_split, tiny_sd3_components

SAMPLE = ["--prompt", "a red circle", "--n", "1", "--seed", "5", "--steps", "2"]


@pytest.fixture(autouse=True)
def _on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from sdstudio.core.train import setup

    monkeypatch.setattr(setup, "pick_device", lambda choice="auto": torch.device("cpu"))


def _folder(pipeline: str, components: dict[str, Any], folder: Path) -> Path:
    import diffusers

    getattr(diffusers, pipeline)(**components).save_pretrained(str(folder), safe_serialization=True)
    return folder


# family -> (components, pipeline class, split saver, flag -> split file name)
FAMILIES: dict[str, tuple[Callable[[], dict[str, Any]], str, Callable[..., dict[str, Path]], dict[str, str]]] = {
    "flux": (tiny_flux_components, "FluxPipeline", save_tiny_flux_split,
             {"--text-encoder": "clip_l", "--text-encoder-2": "t5xxl", "--vae": "ae"}),
    "sd3": (tiny_sd3_components, "StableDiffusion3Pipeline", save_tiny_sd3_split,
            {"--text-encoder": "clip_l", "--clip-g": "clip_g", "--text-encoder-2": "t5xxl", "--vae": "vae"}),
    "chroma": (tiny_chroma_components, "ChromaPipeline", save_tiny_chroma_split,
               {"--text-encoder-2": "t5xxl", "--vae": "ae"}),
}
TRANSFORMER_FILE = {"flux": "flux1", "sd3": "sd3", "chroma": "chroma"}


@pytest.fixture(scope="module", params=list(FAMILIES))
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    name = request.param
    make, pipeline, save_split, flags = FAMILIES[name]
    tmp = tmp_path_factory.mktemp(name)
    folder = _folder(pipeline, make(), tmp / "folder")
    split = save_split(tmp / "split", make())  # the same seed: the same weights
    parts = [arg for flag, file in flags.items() for arg in (flag, str(split[file]))]
    return {"name": name, "folder": folder, "transformer": split[TRANSFORMER_FILE[name]], "parts": parts,
            "flags": flags, "lora": _lora(make()["transformer"], tmp / "lora.safetensors")}


def _lora(transformer: torch.nn.Module, path: Path) -> tuple[Path, int]:
    """A diffusers-format LoRA on every attention projection (A and B nonzero: it changes the output); the file
    and its module count."""
    gen = torch.Generator().manual_seed(7)
    rank, tensors = 4, {}
    for name, linear in transformer.named_modules():
        if name.endswith(("attn.to_q", "attn.to_k", "attn.to_v")) and isinstance(linear, torch.nn.Linear):
            tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, linear.in_features, generator=gen)
            tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(linear.out_features, rank, generator=gen)
    save_file(tensors, str(path))
    return path, len(tensors) // 2


def _sample(args: list[str], out: Path, capsys: pytest.CaptureFixture[str]) -> np.ndarray:
    code = main(["sample", *args, *SAMPLE, "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    return np.asarray(Image.open(out / "0-0.png")).astype(np.int16)


def test_split_files_sample_as_the_folder_with_and_without_a_lora(model: dict[str, Any], tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    split = ["--model", str(model["transformer"]), *model["parts"], "--config-folder", str(model["folder"])]
    folder = ["--model", str(model["folder"])]
    from_folder = _sample(folder, tmp_path / "folder", capsys)
    from_split = _sample(split, tmp_path / "split", capsys)
    assert np.abs(from_split - from_folder).max() <= 1, model["name"]  # the same weights: the same image
    lora_file, modules = model["lora"]
    lora = ["--lora", str(lora_file)]
    folder_lora = _sample([*folder, *lora], tmp_path / "folder-lora", capsys)
    split_lora = _sample([*split, *lora], tmp_path / "split-lora", capsys)
    assert f"+ LoRA lora.safetensors ({modules} modules)" in capsys.readouterr().out
    assert np.abs(split_lora - folder_lora).max() <= 1, model["name"]
    assert np.abs(split_lora - from_split).max() > 8, "the LoRA changes the image"


def test_a_missing_part_file_is_named_by_its_flag(model: dict[str, Any], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    flags = list(model["flags"])
    given = model["parts"][2:]  # all but the first part
    code = main(["sample", "--model", str(model["transformer"]), *given, *SAMPLE, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"sdstudio: --model {model['transformer']} is a single"), err
    assert f"set {flags[0]} " in err and "model." not in err.replace(str(model["transformer"]), ""), err
    assert not (tmp_path / "o").exists()


def test_part_files_a_model_does_not_take_are_refused(model: dict[str, Any], tiny_sd1: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    clip = str(model["parts"][model["parts"].index("--text-encoder-2") + 1])
    cases = [  # (args, what the one line says)
        (["--model", str(tiny_sd1), "--text-encoder", clip],
         f"--text-encoder {clip}: a Stable Diffusion 1.x model has no such separate file; it takes only --vae"),
        (["--model", str(model["folder"]), "--text-encoder-2", clip],
         f"--text-encoder-2 {clip}: belongs with a single transformer file; the diffusers folder"),
        (["--model", str(model["transformer"]), *model["parts"], "--vae", str(tmp_path / "nope.safetensors")],
         f"--vae {tmp_path / 'nope.safetensors'}: no such file"),
    ]
    if model["name"] != "sd3":
        cases.append((["--model", str(model["transformer"]), *model["parts"], "--clip-g", clip],
                      f"--clip-g {clip}: a "))
    for args, says in cases:
        code = main(["sample", *args, *SAMPLE, "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and says in err and len(err.splitlines()) == 1, (args, err)
    runs = main(["sample", "--run", str(tmp_path), "--vae", clip, *SAMPLE, "--out", str(tmp_path / "o")])
    assert runs == 2 and "--vae: only for --model" in capsys.readouterr().err


def test_a_separate_vae_replaces_the_vae_of_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--vae beside a diffusers folder is used instead of the folder's own VAE (shown on Flux; the loaders of
    the three families take model.vae_path beside a folder alike)."""
    folder = _folder("FluxPipeline", tiny_flux_components(), tmp_path / "folder")
    other = save_tiny_flux_split(tmp_path / "other", tiny_flux_components(seed=3))["ae"]
    base = _sample(["--model", str(folder)], tmp_path / "a", capsys)
    swapped = _sample(["--model", str(folder), "--vae", str(other)], tmp_path / "b", capsys)
    assert np.abs(base - swapped).max() > 8
