"""How a front waits on its engine (`triton_models.shared.pump_responses`): the engine's responses
are iterated on a helper thread, and the front resumes only once that thread has ended, so nothing
of the backend's (the last response, the iterator) is freed on it while the front sends. The real
stubs run in tests/test_stream_forwarding.py and tests/test_reliability.py."""

from __future__ import annotations

import threading
import time

import pytest

from triton_models import shared

#: How long freeing a fake response takes: long enough that a caller resuming before the helper
#: thread ended would see it still unfinished.
FREE_S = 0.3


class _Response:
    """A response whose freeing is slow and noted (thread, whether it finished)."""

    def __init__(self, log: list, index: int):
        self.log, self.index = log, index

    def __del__(self):
        time.sleep(FREE_S)
        self.log.append((self.index, threading.current_thread().name))


class _Request:
    """A BLS request whose decoupled responses come from `make()` (a generator function)."""

    def __init__(self, make):
        self.make = make

    def exec(self, decoupled: bool):
        assert decoupled
        return self.make()


def test_caller_resumes_after_the_helper_freed_the_responses():
    freed: list = []

    def responses():
        for i in range(3):
            yield _Response(freed, i)

    seen = []
    shared.pump_responses(_Request(responses), lambda r: seen.append(r.index), "f5_engine", None,
                          time.monotonic() + 30)
    # every response, the last one too (held by the helper's loop until its frame went), is freed
    # by the time the caller goes on to send
    assert seen == [0, 1, 2]
    assert sorted(i for i, _ in freed) == [0, 1, 2]
    assert all(name.startswith("bls-") for _, name in freed)


def test_stopping_early_also_waits_for_the_helper():
    freed: list = []

    def responses():
        for i in range(5):
            yield _Response(freed, i)

    shared.pump_responses(_Request(responses), lambda r: r.index < 1, "f5_engine", None, time.monotonic() + 30)
    assert sorted(i for i, _ in freed) == [0, 1]  # the second response stopped it; neither outlives the wait


def test_a_failure_on_the_helper_reaches_the_caller():
    def responses():
        yield object()
        raise RuntimeError("engine answered with garbage")

    with pytest.raises(RuntimeError, match="garbage"):
        shared.pump_responses(_Request(responses), lambda r: True, "f5_engine", None, time.monotonic() + 30)


def test_the_deadline_ends_a_wait_on_a_silent_engine(monkeypatch):
    monkeypatch.setattr(shared, "LIVENESS_POLL_S", 0.05)
    release = threading.Event()

    def responses():
        release.wait(10)  # an engine that never answers (released after the test)
        yield from ()

    try:
        with pytest.raises(shared.DeadlineExceeded):
            shared.pump_responses(_Request(responses), lambda r: True, "f5_engine", None, time.monotonic() + 0.2)
    finally:
        release.set()


def test_after_a_deadline_the_caller_can_let_the_helper_end(monkeypatch):
    """The deadline leaves the helper iterating (the engine still answers); once the engine is told
    to stop and ends its stream, `settle_helper` returns as soon as the helper has ended."""
    monkeypatch.setattr(shared, "LIVENESS_POLL_S", 0.05)
    stop = threading.Event()

    def responses():
        while not stop.wait(0.01):  # an engine streaming until it is cancelled
            yield object()

    with pytest.raises(shared.DeadlineExceeded) as err:
        shared.pump_responses(_Request(responses), lambda r: True, "f5_engine", None, time.monotonic() + 0.2)
    helper = err.value.helper
    assert helper.is_alive(), "the deadline does not wait for the stream"
    stop.set()  # the cancel reached the engine
    t0 = time.monotonic()
    shared.settle_helper(err.value)
    assert not helper.is_alive() and time.monotonic() - t0 < shared.HELPER_GRACE_S
