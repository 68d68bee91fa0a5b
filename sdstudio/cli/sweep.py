"""`sdstudio sweep FILE.toml [--out DIR]`: a grid or random search, one run per combination, with a summary."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..core import events as ev
from ..core.control import TrainingControl
from ..core.sweeps.plan import SweepPlan, default_sweep_dir, format_value, load_sweep
from ..core.sweeps.summary import SUMMARY_CSV, SUMMARY_JSON
from .common import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, describe_eval, say, stop_on_sigint
from .console import warning_already_shown


def register(sub: Any) -> None:
    p = sub.add_parser("sweep", help="run a grid, random or Optuna (TPE) search over config keys (one run per combination or trial)",
                       description="Run every combination of a sweep file one after another, then write "
                       "summary.csv, summary.json and overlay.png. Run the same command again to resume; "
                       "Ctrl-C stops the current run resumably (exit 130).")
    p.add_argument("file", type=Path, metavar="FILE.toml", help="the sweep file (see docs/sweeps.md)")
    p.add_argument("--out", type=Path, help="sweep folder (default: <runs folder>/sweeps/<name>)")
    p.add_argument("--retry-failed", action="store_true", help="run failed combinations again (in fresh folders)")
    p.add_argument("--dry-run", action="store_true", help="validate the file and list the combinations; run nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run, flags={"out": "--out"})


def _list(plan: SweepPlan, out_dir: Path) -> None:
    if plan.mode == "search":
        assert plan.search is not None and plan.ranges is not None
        s = plan.search
        print(f"sweep {plan.name} (search: {s['method']}, {s['trials']} trials, prune {str(s['prune']).lower()}, "
              f"seed {s['seed']}, base {plan.base}) -> {out_dir} (study {out_dir / 'study.db'})")
        for key, spec in plan.ranges.items():
            print(f"  {key:<30} {spec}")
        return
    print(f"sweep {plan.name} ({plan.mode}, base {plan.base}): {len(plan.combinations)} combinations -> {out_dir}")
    for combo in plan.combinations:
        print(f"  {combo.folder:<30} {combo.describe()}")


def run(args: argparse.Namespace) -> int:
    plan = load_sweep(args.file)  # every combination validated before anything runs
    out_dir = (args.out if args.out is not None else default_sweep_dir(plan.name)).expanduser().resolve()
    if args.dry_run:
        _list(plan, out_dir)
        return EXIT_OK
    # the runner imports the training loop (torch, diffusers): on demand, so a dry run starts fast
    from ..core.sweeps.runner import SweepFinished, SweepRunEnded, SweepRunStarted, SweepStarted, run_sweep

    control = TrainingControl()
    bar: tqdm | None = None
    finished: SweepFinished | None = None
    with stop_on_sigint(control, " of the current run"):
        try:
            if plan.mode == "search":
                from ..core.sweeps.search import run_search

                events = run_search(plan, out_dir, control)
            else:
                events = run_sweep(plan, out_dir, control, retry_failed=args.retry_failed)
            for event in events:
                if isinstance(event, SweepStarted):
                    done = event.total - event.to_run
                    say(f"sweep {plan.name}: {event.total} combinations, {event.to_run} to run"
                         + (f" ({done} done or failed already)" if done else "") + f"; folder {event.out_dir}")
                elif isinstance(event, SweepRunStarted):
                    verb = "resuming" if event.resumed else "starting"
                    values = ", ".join(f"{k}={format_value(v)}" for k, v in event.overrides.items())
                    say(f"[{event.index + 1}/{event.total}] {verb} {event.run_dir.name}: {values}")
                elif isinstance(event, ev.Started) and not args.quiet:
                    bar = tqdm(total=event.total_steps, initial=event.resumed_from_step, unit="step",
                               dynamic_ncols=True, file=sys.stderr, leave=False)
                elif isinstance(event, ev.StepMetrics) and bar is not None:
                    bar.update(event.step - bar.n)
                    bar.set_postfix(loss=f"{event.loss:.4f}", lr=f"{event.lr:.2e}")
                elif isinstance(event, ev.ValidationResult) and bar is None:
                    say(f"  step {event.step}: validation loss {event.val_loss:.5f}")
                elif isinstance(event, ev.EvalResult) and bar is None:
                    say(f"  step {event.step}: {describe_eval(event)}")
                elif isinstance(event, ev.Warning) and not warning_already_shown(event.text):
                    say(f"  warning: {event.text}")
                elif isinstance(event, SweepRunEnded):
                    if bar is not None:
                        bar.close()
                        bar = None
                    detail = f": {event.message}" if event.message else ""
                    say(f"  {event.status}{detail} ({event.seconds:.0f} s)")
                elif isinstance(event, SweepFinished):
                    finished = event
        finally:
            if bar is not None:
                bar.close()
        return _report(args.file, out_dir, finished)


def _report(sweep_file: Path, out_dir: Path, finished: Any) -> int:
    counts = finished.counts if finished is not None else {}
    parts = ", ".join(f"{n} {status}" for status, n in counts.items() if n)
    print(f"summary: {out_dir / SUMMARY_CSV} ({parts})", file=sys.stderr)
    try:
        summary = json.loads((out_dir / SUMMARY_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = {}
    best = summary.get("best")
    if summary.get("importances"):
        ranked = sorted(summary["importances"].items(), key=lambda kv: -kv[1])
        print("parameter importances: " + ", ".join(f"{k} {v:.2f}" for k, v in ranked), file=sys.stderr)
    if best:
        print(f"best: {out_dir / best['run_dir']} (best validation loss {best['best_val_loss']:.5f})",
              file=sys.stderr)
    if finished is None or finished.reason == "stopped":
        print(f"stopped; resume with: sdstudio sweep {sweep_file} --out {out_dir}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if counts.get("failed") and not counts.get("completed"):
        return EXIT_FAILURE  # every combination failed: almost always a problem shared by all of them
    return EXIT_OK
