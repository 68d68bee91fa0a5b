"""The compile warm-up as the loop reports it (``train.compile_prewarm``): each bucket shape compiled before step 1
by ``TrainingSession.prewarm`` (one forward and backward, nothing kept), timed apart from the steps."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from .. import events as ev
from ..runs import MetricsWriter, metrics_row
from .session import TrainingSession

log = logging.getLogger("sdstudio")


def prewarm_events(s: TrainingSession, shapes: list[Any], metrics: MetricsWriter | None) -> Iterator[ev.Event]:
    """Compiles the graphs of each batch shape (one forward and backward each, nothing kept), timed apart from
    the steps: a Status with the time, run.log, and an event row ``compiled`` with ``warmup_s`` in metrics.jsonl
    (the steps' img_per_s and the ETA then measure the steady state only)."""
    p = s.progress
    res = s.config.data.resolution
    names = [f"{size[0]}x{size[1]}" if size is not None else f"{res}x{res}" for size in shapes]
    what = "compiling bucket shapes"
    yield ev.Status("compiling", f"compiling {len(shapes)} bucket shape{'s' if len(shapes) != 1 else ''} "
                                 f"({', '.join(names)}; batch {s.config.train.batch_size}) with torch.compile")
    t0 = time.perf_counter()
    for done, size in enumerate(shapes):
        yield ev.Progress(done, len(shapes), what)
        s.prewarm(size)
    warmup = time.perf_counter() - t0
    yield ev.Progress(len(shapes), len(shapes), what)
    text = f"{len(shapes)} bucket shape{'s' if len(shapes) != 1 else ''} compiled in {warmup:.1f} s"
    log.info("torch.compile warm-up: %s (%s)", text, ", ".join(names))
    if metrics:
        metrics.write(metrics_row("event", p.step, p.epoch, event="compiled", warmup_s=round(warmup, 3),
                                  shapes=names, batch_size=s.config.train.batch_size))
    yield ev.Status("compiled", text)
