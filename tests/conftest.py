"""Shared fixtures. Tests never touch the real home folder (SDSTUDIO_HOME points into tmp) and Qt runs
offscreen. Tiny models and a tiny generated dataset keep the whole suite within the CI budget."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N (pyproject's -n auto): N worker processes share the cores;
    # torch's default of one thread per core in each worker would oversubscribe them (slower, not faster)
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto`` (pyproject's addopts): one worker per physical core, at most one per 2 GB of free memory (each
    worker holds torch, diffusers and a few tiny models) and at most 8, so a many-core laptop is not swamped."""
    import psutil

    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    by_memory = int(psutil.virtual_memory().available // (2 * 1024**3))
    return max(1, min(cores, by_memory, 8))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path_factory.mktemp("sdstudio-home")
    monkeypatch.setenv("SDSTUDIO_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 captioned 16 px shape images (2 per colour/shape), generated, never modified by tests."""
    from sdstudio.core.demo_shapes import generate_demo_dataset

    folder = tmp_path_factory.mktemp("tiny-shapes")
    generate_demo_dataset(folder, per_class=2, size=16, seed=3)
    return folder


TINY_OVERRIDES = {
    "data.resolution": 16,
    "data.val_split": 0.2,
    "model.block_channels": [16, 32],
    "model.attention_levels": [False, True],
    "model.attention_head_dim": 8,
    "model.text_width": 16,
    "model.text_layers": 1,
    "model.text_heads": 2,
    "model.max_caption_tokens": 8,
    "train.batch_size": 4,
    "train.max_steps": 6,
    "train.log_every": 1,
    "train.learning_rate": 1e-3,
    "train.device": "cpu",
    "sample.prompts": ["a red circle on white", "a blue square on white"],
    "sample.seeds": [0, 1],
    "sample.steps": 3,
    "sample.every_epochs": 0,
    "sample.every_steps": 0,
    "checkpoint.every_steps": 3,
    "checkpoint.keep_last": 5,
}


@pytest.fixture
def tiny_config(tiny_dataset: Path):
    """A config for a model that trains a step in well under a second on a CPU."""
    from sdstudio.core.config import RunConfig

    return RunConfig().with_overrides({**TINY_OVERRIDES, "data.path": str(tiny_dataset)})


# -- tiny Stable Diffusion models in the real topologies (saved once per session) -------------------------
@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import save_tiny_sd1

    return save_tiny_sd1(tmp_path_factory.mktemp("tiny-sd1") / "model")


@pytest.fixture(scope="session")
def tiny_sd1_v(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import save_tiny_sd1

    return save_tiny_sd1(tmp_path_factory.mktemp("tiny-sd1-v") / "model", prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import save_tiny_sdxl

    return save_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl") / "model")


@pytest.fixture(scope="session")
def four_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sdstudio.core.demo_shapes import generate_demo_dataset

    folder = tmp_path_factory.mktemp("four")
    generate_demo_dataset(folder, per_class=1, size=32, seed=5)
    for extra in sorted(folder.glob("*.png"))[4:]:
        extra.unlink()
        extra.with_suffix(".txt").unlink()
    return folder


@pytest.fixture(scope="session")
def class_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sdstudio.core.demo_shapes import generate_demo_dataset

    folder = tmp_path_factory.mktemp("class")
    generate_demo_dataset(folder, per_class=1, size=32, seed=9)
    for caption in folder.glob("*.txt"):
        caption.unlink()  # class images without captions take data.class_prompt
    return folder
