"""Generation slots: how many generations run at once, shared by the page and the HTTP API.

The page's generate events already wait in Gradio's queue (`concurrency_id="generate"`), but the
OpenAI-compatible API (`studio/api.py`) bypasses that queue. Both take a slot here before they send
a request to Triton, so `STUDIO_CONCURRENCY` bounds the whole process, not each door separately.
The page waits for a slot as long as it takes (Gradio's queue already bounds how many wait); an API
caller waits only while fewer than `STUDIO_API_QUEUE` others are waiting, and is otherwise told to
come back later (HTTP 429 with Retry-After).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from contextlib import contextmanager


def env_int(name: str, default: int, minimum: int = 1) -> int:
    """A whole-number setting from the environment; ValueError naming the variable when it is not one."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < minimum:
        raise ValueError(f"{name} must be a whole number of at least {minimum}, got {raw!r}")
    return int(raw)


#: Generations at once, page and API together (env STUDIO_CONCURRENCY).
GENERATE_CONCURRENCY = env_int("STUDIO_CONCURRENCY", 4)
#: API requests that may wait for a slot before further ones get 429 (env STUDIO_API_QUEUE; 0 = none wait).
API_QUEUE = env_int("STUDIO_API_QUEUE", 16, minimum=0)
#: Retry-After bounds (s), and the guess used before any generation has finished.
RETRY_AFTER_MIN_S, RETRY_AFTER_MAX_S, RETRY_AFTER_GUESS_S = 1, 120, 5.0
#: Generation times remembered for the Retry-After estimate.
RECENT = 20


class SlotsFull(RuntimeError):
    """Every slot is busy and the waiting line is full; `retry_after_s` is when to try again."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class GenerationSlots:
    """A counting semaphore with a bounded waiting line and a Retry-After estimate. Thread-safe."""

    def __init__(self, limit: int = GENERATE_CONCURRENCY):
        if limit < 1:
            raise ValueError(f"at least one generation must be allowed at once, got {limit}")
        self.limit = limit
        self.running = 0
        self.waiting = 0
        self._cond = threading.Condition()
        self._durations: deque[float] = deque(maxlen=RECENT)

    def acquire(self, max_waiting: int | None = None, cancel: threading.Event | None = None) -> bool:
        """Take a slot, waiting for one. With `max_waiting`, raise SlotsFull at once when that many callers
        already wait. Returns False (no slot taken) when `cancel` is set while waiting."""
        with self._cond:
            if self.running < self.limit and self.waiting == 0:
                self.running += 1
                return True
            if max_waiting is not None and self.waiting >= max_waiting:
                raise SlotsFull(f"all {self.limit} generation slots are busy and {self.waiting} request(s) are "
                                "already waiting; try again shortly", self.retry_after_s())
            self.waiting += 1
            try:
                while self.running >= self.limit:
                    if cancel is not None and cancel.is_set():
                        return False
                    self._cond.wait(0.1 if cancel is not None else None)
                self.running += 1
                return True
            finally:
                self.waiting -= 1

    def release(self, seconds: float | None = None) -> None:
        """Give a slot back; `seconds` (how long it was held) feeds the Retry-After estimate."""
        with self._cond:
            if self.running <= 0:
                raise RuntimeError("GenerationSlots.release without a matching acquire")
            self.running -= 1
            if seconds is not None and seconds >= 0:
                self._durations.append(seconds)
            self._cond.notify()

    @contextmanager
    def hold(self):
        """`with slots.hold():` waits as long as it takes (the page: Gradio's queue bounds the waiting)."""
        self.acquire()
        started = time.monotonic()
        try:
            yield
        finally:
            self.release(time.monotonic() - started)

    def retry_after_s(self) -> int:
        """Seconds until a slot is likely free for one more waiter: the recent mean generation time times
        the rounds of `limit` needed to serve everyone ahead (waiters plus this one), clamped."""
        mean = sum(self._durations) / len(self._durations) if self._durations else RETRY_AFTER_GUESS_S
        rounds = math.ceil((self.waiting + 1) / self.limit)
        return int(min(RETRY_AFTER_MAX_S, max(RETRY_AFTER_MIN_S, math.ceil(mean * rounds))))


__all__ = ["API_QUEUE", "GENERATE_CONCURRENCY", "GenerationSlots", "SlotsFull", "env_int"]
