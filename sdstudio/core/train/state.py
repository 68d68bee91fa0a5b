"""What a checkpoint holds and how it goes back: weights (safetensors), EMA, optimizer, schedule, RNG."""

from __future__ import annotations

import pickle
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from ..errors import CheckpointError
from ..models.bundle import ModelBundle

# the checkpoint folder's file names and readers are the run folder's (exports read them without the trainer)
from ..runs.checkpoints import CONFIG, EMA_WEIGHTS, TRAINING_STATE, WEIGHTS, load_weights, read_architecture

__all__ = ["CONFIG", "EMA_WEIGHTS", "TRAINING_STATE", "WEIGHTS", "load_weights", "read_architecture"]


def model_state(bundle: ModelBundle) -> dict[str, torch.Tensor]:
    return bundle.trainable_state()


def load_model_state(bundle: ModelBundle, weights: dict[str, torch.Tensor], source: Path) -> None:
    bundle.load_trainable_state(weights, source)


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(),
            "numpy": [np.random.get_state()[0], np.random.get_state()[1].tolist(), *np.random.get_state()[2:]],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Position:
    step: int
    epoch: int
    step_in_epoch: int


def save_training_files(folder: Path, bundle: ModelBundle, *, optimizer: Any, schedule: Any, scaler: Any,
                        ema: Any, ema_names: list[str], position: Position, config_toml: str,
                        save_optimizer: bool, extra_state: dict[str, Any] | None = None) -> None:
    """Write every file of a checkpoint into ``folder`` (the caller handles atomicity)."""
    save_file(model_state(bundle), str(folder / WEIGHTS), metadata={"format": "pt", "sdstudio": "weights"})
    if ema is not None:
        shadow = {n: p.detach().to("cpu").contiguous() for n, p in zip(ema_names, ema.shadow_params)}
        save_file(shadow, str(folder / EMA_WEIGHTS), metadata={"format": "pt", "sdstudio": "ema",
                                                               "optimization_step": str(ema.optimization_step)})
    state = {"position": position.__dict__, "schedule": schedule.state_dict(), "rng": rng_state(),
             "extra": extra_state or {},
             "optimizer": optimizer.state_dict() if save_optimizer else None,
             "scaler": scaler.state_dict() if scaler is not None else None}
    torch.save(state, folder / TRAINING_STATE)
    bundle.save_extra(folder)
    (folder / CONFIG).write_text(config_toml, encoding="utf-8")


def load_training_state(folder: Path) -> dict[str, Any]:
    """The optimizer, schedule, RNG and position of a checkpoint.

    Read with ``weights_only=True``: a run folder may come from someone else, and a full unpickle would run
    whatever code the file names. Everything sdstudio stores here is tensors, numbers, strings, lists, tuples
    and dicts, which the restricted unpickler accepts; anything else is refused, not executed.
    """
    path = folder / TRAINING_STATE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: not a trusted sdstudio training state ({_refusal_reason(exc)}); it was "
                              "not loaded. Resume only run folders you made, or start a new run") from None
    except Exception as exc:  # noqa: BLE001 - zip/IO errors of every kind mean a bad checkpoint
        raise CheckpointError(f"{path}: cannot be read ({exc})") from None
    if not isinstance(state, dict) or not {"position", "schedule", "rng"} <= state.keys():
        raise CheckpointError(f"{path}: not an sdstudio training state (expected a dict with position, "
                              "schedule and rng)")
    return state


def _refusal_reason(exc: Exception) -> str:
    """The line of torch's refusal that names what the file asked for (torch's text around it suggests
    turning the restriction off, which is the advice not to follow here)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line or "unsupported" in line]
    return (named or ["it asks to load objects sdstudio never stores"])[0]
