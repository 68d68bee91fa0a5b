"""A sweep's results: ``summary.csv`` / ``summary.json`` (one row per combination) and ``overlay.png``,
rebuilt from the state and each run's curves (``RunFolder.curves``) after every run, so a crash leaves a valid summary."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from ..atomic import write_text_atomic
from ..runs import RunCurves, RunFolder
from .plan import format_value, short_key
from .state import RunRecord, SweepState

SUMMARY_CSV = "summary.csv"
SUMMARY_JSON = "summary.json"
OVERLAY_PNG = "overlay.png"
METRIC_COLUMNS = ("best_val_loss", "final_val_loss", "final_loss", "steps", "seconds",
                  "best_fid", "final_fid", "best_kid", "final_kid", "final_kid_std")
FINAL_LOSS_ROWS = 5  # final_loss averages the last few logged training losses: one row is noise


def summary_row(record: RunRecord, keys: list[str], curves: RunCurves | None) -> dict[str, Any]:
    row: dict[str, Any] = {"index": record.index, "run_dir": record.run_dir, "status": record.status,
                           "message": record.message}
    for key in keys:
        row[key] = record.overrides.get(key)
    c = curves or RunCurves()
    tail = [loss for _, loss in c.train[-FINAL_LOSS_ROWS:]]
    row["best_val_loss"] = min(v for _, v in c.val) if c.val else None
    row["final_val_loss"] = c.val[-1][1] if c.val else None
    row["final_loss"] = sum(tail) / len(tail) if tail else None
    row["steps"] = max(c.last_step, record.steps)
    row["seconds"] = round(record.seconds, 1)
    row["best_fid"] = min(v for _, v in c.fid) if c.fid else None
    row["final_fid"] = c.fid[-1][1] if c.fid else None
    row["best_kid"] = min(m for _, m, _ in c.kid) if c.kid else None
    row["final_kid"] = c.kid[-1][1] if c.kid else None
    row["final_kid_std"] = c.kid[-1][2] if c.kid else None
    return row


def collect(state: SweepState) -> tuple[list[dict[str, Any]], dict[int, RunCurves]]:
    rows, curves = [], {}
    for record in state.records:
        run = state.out_dir / record.run_dir if record.run_dir else None
        c = RunFolder(run).curves() if run is not None and run.is_dir() else None
        if c is not None:
            curves[record.index] = c
        rows.append(summary_row(record, state.plan.keys, c))
    return rows, curves


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The completed run with the lowest best validation loss."""
    done = [r for r in rows if r["status"] == "completed" and r["best_val_loss"] is not None]
    return min(done, key=lambda r: r["best_val_loss"]) if done else None


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def write_summary(state: SweepState) -> tuple[list[dict[str, Any]], dict[int, RunCurves]]:
    """Write summary.csv and summary.json (atomically); returns the rows and the curves read."""
    rows, curves = collect(state)
    columns = ["index", "run_dir", "status", "message", *state.plan.keys, *METRIC_COLUMNS]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_cell(row[k]) for k in columns})
    write_text_atomic(state.out_dir / SUMMARY_CSV, buf.getvalue())
    best = best_row(rows)
    data = {"name": state.plan.name, "sweep_file": str(state.plan.path.resolve()), "base": state.plan.base,
            "mode": state.plan.mode, "fixed": state.plan.fixed, "keys": state.plan.keys,
            "counts": state.counts(), "best": None if best is None else {
                "index": best["index"], "run_dir": best["run_dir"], "best_val_loss": best["best_val_loss"]},
            "columns": columns, "rows": rows}
    write_text_atomic(state.out_dir / SUMMARY_JSON, json.dumps(data, indent=1) + "\n")
    return rows, curves


LEGEND_CHARS = 40  # what fits the overlay's legend; longer labels switch to abbreviated keys


def run_labels(records: list[RunRecord], keys: list[str]) -> tuple[dict[int, str], list[str]]:
    """Legend text per run (``3: learning_rate=3e-4 batch_size=16``) and notes explaining abbreviations,
    used when the full names do not fit (``3: lr=3e-4 bs=16`` with ``lr = train.learning_rate``)."""

    def label(record: RunRecord, name: Any) -> str:
        values = " ".join(f"{name(k)}={format_value(v)}" for k, v in record.overrides.items())
        return f"{record.index}: {values}" if values else str(record.index)

    full = {r.index: label(r, lambda k: k.split(".")[-1]) for r in records}
    if all(len(text) <= LEGEND_CHARS for text in full.values()):
        return full, []
    short = {r.index: label(r, short_key) for r in records}
    return short, [f"{short_key(k)} = {k}" for k in keys]
