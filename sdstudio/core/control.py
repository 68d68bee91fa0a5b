"""The control object the GUI/CLI use to steer a running loop; the loop polls it between steps."""

from __future__ import annotations

import threading


class TrainingControl:
    """Thread-safe flags: stop (save a resumable checkpoint, then finish), pause/resume, sample/save now."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self._sample_now = threading.Event()
        self._save_now = threading.Event()

    def request_stop(self) -> None:
        self._stop.set()
        self._running.set()  # a paused loop must wake up to stop

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def request_sample(self) -> None:
        self._sample_now.set()

    def request_save(self) -> None:
        self._save_now.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def wait_while_paused(self, timeout: float = 0.1) -> bool:
        """Block up to ``timeout`` s while paused; True when running again (or stopping)."""
        return self._running.wait(timeout)

    def take_sample_request(self) -> bool:
        if self._sample_now.is_set():
            self._sample_now.clear()
            return True
        return False

    def take_save_request(self) -> bool:
        if self._save_now.is_set():
            self._save_now.clear()
            return True
        return False
