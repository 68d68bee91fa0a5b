"""Reading ahead: the next batches of an iterable made by a background thread while the caller works on the
current one (``data.prefetch_batches``, with ``data.num_workers = 0``). Loading an image (file read, decode,
crop, flip) releases the GIL for most of its time, so with the model's work on a GPU the two overlap instead of
taking turns. What is yielded, and in which order, is exactly what the iterable yields; an exception raised
while reading comes out where its batch would have; closing the generator stops the thread (after the batch it
is reading, if any) and drops what was read ahead."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_ITEM, _END, _ERROR = 0, 1, 2


def prefetch(iterable: Iterable[T], depth: int, *, name: str = "sdstudio-prefetch") -> Iterator[T]:
    """The items of ``iterable``, up to ``depth`` of them made ahead in a thread; ``depth <= 0``: no thread."""
    if depth <= 0:
        yield from iterable
        return
    slots: queue.Queue[tuple[int, object]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[int, object]) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in iterable:
                if not put((_ITEM, item)):
                    return
            put((_END, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put((_ERROR, exc))

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            kind, value = slots.get()
            if kind == _ITEM:
                yield value  # type: ignore[misc]
            elif kind == _END:
                return
            else:
                raise value  # type: ignore[misc]
    finally:
        stop.set()
        while thread.is_alive():  # let a producer blocked on a full queue see the stop
            try:
                slots.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)
