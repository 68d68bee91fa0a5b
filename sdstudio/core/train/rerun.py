"""Doing a run again from its card (``sdstudio rerun``): the card's config, the dataset checked against the
card's manifest, and what about this machine may keep the rerun from matching bit for bit."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import RunConfig
from ..data.scan import scan_dataset
from ..paths import training_data_dir
from ..runs.card import (
    card_config,
    compare_manifest,
    dataset_files,
    dataset_manifest,
    environment_differences,
    read_card,
)
from .setup import pick_device


@dataclass
class RerunPlan:
    config: RunConfig
    source: Path
    dataset_notes: list[str] = field(default_factory=list)  # how the dataset differs from the card's manifest
    environment_notes: list[str] = field(default_factory=list)  # versions / device that differ

    @property
    def exact(self) -> bool:
        """Same files, same libraries, same device: the rerun should match the original bit for bit (on a CPU;
        GPU kernels may still differ between runs)."""
        return not self.dataset_notes and not self.environment_notes

    def describe(self) -> list[str]:
        lines = [f"dataset: {n}" for n in self.dataset_notes] + [f"environment: {n}" for n in self.environment_notes]
        if self.exact:
            device = self.config.train.device
            lines.append("same dataset, libraries and device: the rerun should reproduce the original"
                         + (" bit for bit" if device == "cpu" else " (bit for bit on a CPU; GPU kernels may differ)"))
        else:
            lines.append("the rerun may not reproduce the original bit for bit (see above)")
        return lines


def plan_rerun(run_or_card: Path, *, data_path: str | None = None) -> RerunPlan:
    """The config of the card in ``run_or_card`` (a run folder or a run-card.json), with ``data_path`` replacing
    the card's ``data.path`` when the dataset moved; the dataset compared with the card's manifest."""
    card = read_card(run_or_card)
    config = card_config(card)
    if data_path is not None:
        config = config.with_overrides({"data.path": data_path})
    plan = RerunPlan(config, run_or_card)
    root = training_data_dir(config.data.path)
    if not root.is_dir():
        plan.dataset_notes.append(f"{root}: the dataset folder is missing (give its new place with data.path)")
    else:
        prompt = config.data.instance_prompt or None
        images = [r.path for r in scan_dataset(root, resolution=config.data.resolution, instance_prompt=prompt).records]
        if config.data.val_path and Path(config.data.val_path).expanduser().is_dir():  # listed by absolute path
            images += [r.path for r in scan_dataset(Path(config.data.val_path).expanduser(),
                                                    resolution=config.data.resolution, instance_prompt=prompt).records]
        current = dataset_manifest(root, dataset_files(root, images))
        diff = compare_manifest(card.get("dataset", {}).get("files", {}), current)
        if not diff.same:
            plan.dataset_notes.append(f"{root} differs from the card: {diff.describe()}")
    plan.environment_notes = environment_differences(card, pick_device(config.train.device))
    return plan
