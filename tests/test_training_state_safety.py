"""A shared run folder cannot run code on resume: training_state.pt is read with torch's weights-only
unpickler, and a pickle that names code is refused with a CheckpointError, not executed."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from sdstudio.core import events as ev
from sdstudio.core.errors import CheckpointError
from sdstudio.core.train.checkpoint import MANIFEST, sha256_file
from sdstudio.core.train.loop import train
from sdstudio.core.train.state import TRAINING_STATE, load_training_state


class _WritesMarker:
    """Unpickling this calls os.system: what a malicious training_state.pt would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_a_pickle_that_runs_code_is_refused_and_not_run(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned"
    folder = tmp_path / "step-00000004"
    folder.mkdir()
    payload = {"position": {"step": 4}, "schedule": {}, "rng": _WritesMarker(marker)}
    if writer == "torch.save":
        torch.save(payload, folder / TRAINING_STATE)
    else:
        (folder / TRAINING_STATE).write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError) as info:
        load_training_state(folder)
    text = str(info.value)
    assert str(folder / TRAINING_STATE) in text and "not a trusted sdstudio training state" in text
    if writer == "torch.save":
        assert "system" in text, "the message names what the file asked to load"
    assert "weights_only" not in text, "torch's advice to unpickle fully is not passed on"
    assert not marker.exists()


def test_a_state_of_another_shape_is_refused(tmp_path: Path) -> None:
    torch.save([1, 2, 3], tmp_path / TRAINING_STATE)
    with pytest.raises(CheckpointError, match="not an sdstudio training state"):
        load_training_state(tmp_path)


def test_resuming_a_tampered_run_fails_without_running_the_pickle(tiny_config, tmp_path: Path) -> None:
    """Even with the manifest's sha256 rewritten to match (as a sender could), resume refuses the file."""
    run_dir = tmp_path / "run"
    cfg = tiny_config.with_overrides({"train.max_steps": 4, "checkpoint.every_steps": 4})
    assert isinstance(list(train(cfg, run_dir=run_dir))[-1], ev.Finished)
    ckpt = run_dir / "checkpoints" / "step-00000004"
    assert load_training_state(ckpt)["position"]["step"] == 4  # a real state loads with weights_only
    marker = tmp_path / "pwned"
    torch.save({"position": {"step": 4, "epoch": 0, "step_in_epoch": 4}, "schedule": {},
                "rng": _WritesMarker(marker)}, ckpt / TRAINING_STATE)
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["files"][TRAINING_STATE] = {"size": (ckpt / TRAINING_STATE).stat().st_size,
                                         "sha256": sha256_file(ckpt / TRAINING_STATE)}
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    events = list(train(tiny_config.with_overrides({"train.max_steps": 6}), run_dir=run_dir, resume=True))
    assert isinstance(events[-1], ev.Failed), events[-1]
    assert "not a trusted sdstudio training state" in events[-1].message
    assert TRAINING_STATE in events[-1].message
    assert not marker.exists()
