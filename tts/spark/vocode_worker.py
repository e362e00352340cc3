"""Vocoding beside the decode loop: one worker thread (its own CUDA stream on a GPU) runs the
engine's vocoder jobs in the order they were handed over.

Why: the scheduler vocodes a window as soon as its tokens exist. Done on the decode thread, every
running sequence waits for it: at 16 offline rows each request's 10 s window stalls the other 15
rows' decoding, and in streaming every request's chunks stall every other request's first chunk.
On its own thread the decode loop goes on while the vocoder runs; on CUDA its kernels go to a
second stream and fill the gaps of the latency-bound decode step (one row's step keeps a GPU far
from busy). One thread keeps each request's chunks in order (and its final chunk last).

A job's exception is reported through `on_error(job_owner, exc)`; the worker goes on with the others.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable

#: Jobs waiting for the worker before `submit` blocks (back-pressure on the decode loop if the
#: vocoder falls this far behind: each job is a window of one request).
MAX_PENDING = 256


class VocodeWorker:
    def __init__(self, device=None, on_error: Callable[[object, BaseException], None] | None = None,
                 name: str = "spark-vocode"):
        self._jobs: queue.Queue = queue.Queue(MAX_PENDING)
        self._device = device
        self._on_error = on_error
        self._idle = threading.Condition()
        self._pending = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, owner: object, job: Callable[[], None]) -> None:
        """Run job() on the worker after every job submitted before it; owner names it to on_error."""
        with self._idle:
            self._pending += 1
        self._jobs.put((owner, job))

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every submitted job has run (tests, shutdown); False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float = 5.0) -> None:
        self._jobs.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        if self._device is not None:
            from tts.devices import bind_thread

            bind_thread(self._device)  # an engine on GPU n vocodes on GPU n
        stream_ctx = _side_stream(self._device)
        with stream_ctx:
            while True:
                item = self._jobs.get()
                if item is None:
                    return
                owner, job = item
                try:
                    job()
                except Exception as exc:  # noqa: BLE001 - one request's failure; the others go on
                    if self._on_error is not None:
                        self._on_error(owner, exc)
                finally:
                    with self._idle:
                        self._pending -= 1
                        self._idle.notify_all()


def _side_stream(device):
    """A context making a new CUDA stream current on this thread (a no-op off CUDA)."""
    import contextlib

    import torch

    if device is None or torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.stream(torch.cuda.Stream(device=torch.device(device)))
