"""``OUT/sweep.json``: the status of every combination of a sweep (pending / running / completed / failed /
stopped), written atomically after every change so that running the sweep again resumes it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomic
from ..errors import UserError
from ..runs import LOCK_FILE
from .plan import SweepPlan

STATE_FILE = "sweep.json"
FORMAT = "sdstudio-sweep"
FORMAT_VERSION = 1
STATUSES = ("pending", "running", "completed", "failed", "stopped")


@dataclass
class RunRecord:
    """One combination's progress. ``run_dir`` is relative to the sweep folder ("" before it first ran)."""

    index: int
    overrides: dict[str, Any]
    config_hash: str
    status: str = "pending"
    message: str = ""
    run_dir: str = ""
    attempts: int = 0
    seconds: float = 0.0
    steps: int = 0
    folders: list[str] = field(default_factory=list)  # every folder it ran in (restarts get a fresh one)


@dataclass
class SweepState:
    out_dir: Path
    plan: SweepPlan
    records: list[RunRecord]

    @property
    def path(self) -> Path:
        return self.out_dir / STATE_FILE

    def save(self) -> None:
        data = {"format": FORMAT, "version": FORMAT_VERSION, "name": self.plan.name,
                "sweep_file": str(self.plan.path.resolve()), "base": self.plan.base, "mode": self.plan.mode,
                "fixed": self.plan.fixed, "keys": self.plan.keys, "runs": [asdict(r) for r in self.records]}
        write_text_atomic(self.path, json.dumps(data, indent=1) + "\n")

    def counts(self) -> dict[str, int]:
        return {status: sum(r.status == status for r in self.records) for status in STATUSES}


def open_state(plan: SweepPlan, out_dir: Path) -> SweepState:
    """A new state for an empty (or missing) folder, or the saved one when the folder holds this sweep.

    A folder holding something else, or a sweep whose combinations differ, is refused: resuming it would mix
    two experiments in one summary.
    """
    path = out_dir / STATE_FILE
    if not path.is_file():
        if out_dir.exists() and any(p.name != LOCK_FILE for p in out_dir.iterdir()):
            raise UserError(f"{out_dir}: folder exists, is not empty and holds no sweep ({STATE_FILE}); "
                            "choose another `out`")
        out_dir.mkdir(parents=True, exist_ok=True)
        records = [RunRecord(c.index, c.overrides, c.config_hash) for c in plan.combinations]
        state = SweepState(out_dir, plan, records)
        state.save()
        return state
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != FORMAT:
            raise ValueError("not an sdstudio sweep file")
        records = [_record(raw) for raw in data["runs"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: cannot be read as a sweep state ({exc}); choose another `out`") from None
    saved = [(r.index, r.config_hash) for r in records]
    wanted = [(c.index, c.config_hash) for c in plan.combinations]
    if saved != wanted:
        differ = next((i for i, (a, b) in enumerate(zip(saved, wanted)) if a != b), min(len(saved), len(wanted)))
        raise UserError(f"{out_dir}: holds a different sweep ({len(saved)} combinations; the sweep file or its base "
                        f"config now gives {len(wanted)}, first difference at combination {differ}); "
                        "use another `out`, or restore the sweep file to resume")
    for record in records:
        if record.status == "running":  # the process died during this run
            record.status = "stopped"
            record.message = "interrupted (the sweep process ended during this run)"
    state = SweepState(out_dir, plan, records)
    state.save()
    return state


def _record(raw: dict[str, Any]) -> RunRecord:
    record = RunRecord(**{k: raw[k] for k in RunRecord.__dataclass_fields__ if k in raw})
    if record.status not in STATUSES:
        raise ValueError(f"unknown status {record.status!r}")
    return record
