"""data.prefetch_batches: batches read ahead by a background thread (core/data/prefetch.py) are the same batches
in the same order, errors come out where their batch would have, a closed generator leaves no thread behind, and
a training run is bit-identical with and without it."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from sdstudio.core import events as ev
from sdstudio.core.data.prefetch import prefetch
from sdstudio.core.train.loop import train


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "sdstudio-prefetch" and t.is_alive()]


def test_the_same_items_in_order_and_no_thread_without_depth() -> None:
    assert list(prefetch(range(50), 3)) == list(range(50))
    before = threading.active_count()
    gen = prefetch(iter(range(5)), 0)
    assert next(gen) == 0 and threading.active_count() == before
    assert list(gen) == [1, 2, 3, 4]


def test_the_next_item_is_read_while_the_current_one_is_in_use() -> None:
    started = [threading.Event() for _ in range(4)]

    def source():
        for i in range(4):
            started[i].set()
            yield i

    gen = prefetch(source(), 2)
    assert next(gen) == 0
    # the consumer still holds item 0: the thread has already gone on to items 1 and 2 (depth 2)
    assert started[1].wait(10) and started[2].wait(10)
    assert list(gen) == [1, 2, 3]


def test_an_error_comes_out_after_the_items_before_it() -> None:
    def source():
        yield 0
        yield 1
        raise ValueError("image 2 is broken")

    gen = prefetch(source(), 2)
    assert next(gen) == 0 and next(gen) == 1
    with pytest.raises(ValueError, match="image 2 is broken"):
        next(gen)


def test_closing_stops_the_thread_and_reads_at_most_depth_ahead() -> None:
    read: list[int] = []

    def source():
        for i in range(1000):
            read.append(i)
            yield i

    gen = prefetch(source(), 3)
    assert next(gen) == 0
    gen.close()
    assert not _prefetch_threads()
    assert len(read) <= 1 + 3 + 1  # the one used, the queue's three, the one the thread held when stopped


def test_a_run_is_bit_identical_with_and_without_reading_ahead(tiny_config, tmp_path: Path) -> None:
    """Stops mid-epoch (max_steps) and resumes, with gradient accumulation: every batch boundary of the loop."""
    cfg = tiny_config.with_overrides({"train.max_steps": 5, "train.gradient_accumulation": 2, "train.log_every": 1,
                                      "checkpoint.every_steps": 3, "sample.at_end": False})

    def rows(run: Path) -> list[tuple]:
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r["grad_norm"]) for r in lines if r.get("kind") == "train"]

    results = {}
    for depth in (0, 2):
        run = tmp_path / f"run-{depth}"
        first = cfg.with_overrides({"data.prefetch_batches": depth, "train.max_steps": 3})
        events, reading = [], []
        for event in train(first, run_dir=run):
            events.append(event)
            if isinstance(event, ev.StepMetrics):
                reading.append(bool(_prefetch_threads()))
        assert isinstance(events[-1], ev.Finished), events[-1]
        # the loop reads ahead, or does not (at an epoch's last step the reader may have finished already)
        assert reading and (any(reading) if depth else not any(reading)), reading
        assert not _prefetch_threads(), "a run that ended mid-epoch left its reader behind"
        events = list(train(cfg.with_overrides({"data.prefetch_batches": depth}), run_dir=run, resume=True))
        assert isinstance(events[-1], ev.Finished) and events[-1].step == 5, events[-1]
        results[depth] = rows(run)
    assert [r[0] for r in results[2]] == [1, 2, 3, 4, 5]
    assert results[0] == results[2]
