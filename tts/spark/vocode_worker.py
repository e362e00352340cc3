"""Vocoding beside the decode loop: one worker thread (its own CUDA stream on a GPU) runs the
engine's vocoder jobs in the order they were handed over.

Why: the scheduler vocodes a window as soon as its tokens exist. Done on the decode thread, every
running sequence waits for it: at 16 offline rows each request's 10 s window stalls the other 15
rows' decoding, and in streaming every request's chunks stall every other request's first chunk.
On its own thread the decode loop goes on while the vocoder runs; on CUDA its kernels go to a
second stream and fill the gaps of the latency-bound decode step (one row's step keeps a GPU far
from busy). One thread keeps each request's chunks in order (and its final chunk last).

A job's exception is reported through `on_error(job_owner, exc)`; the worker goes on with the others.

Windows of equal length waiting together are vocoded in one batched call (`submit_window` jobs,
with the engine's `vocode_batch`): when many offline requests end together (a wave of equal
requests), one window at a time left each request waiting for all the windows before it, and the
requests came back one by one (H200, 16 offline requests of 500 tokens: the next wave then
started one request at a time and decoded two or three rows at once). A batch never takes a
window ahead of an earlier job of its own request.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

#: Jobs waiting for the worker before `submit` blocks (back-pressure on the decode loop if the
#: vocoder falls this far behind: each job is a window of one request).
MAX_PENDING = 256
#: Most windows vocoded in one batched call (the engine's row count: one wave of requests).
MAX_VOCODE_BATCH = 16
VOCODE_BATCH_ENV = "STUDIO_SPARK_VOCODE_BATCH"  # "0": one window a call


@dataclass(eq=False)
class WindowJob:
    """One window to vocode: 32 global tokens, N semantic tokens; `done(wav, vocode_ms)` takes the
    audio (on the worker's thread); `skip()` says the request went away meanwhile."""

    owner: object
    global_tokens: np.ndarray
    window: np.ndarray
    done: Callable[[np.ndarray, float], None]
    skip: Callable[[], bool] = lambda: False


def plan_batches(items: list, limit: int = MAX_VOCODE_BATCH) -> list[list]:
    """Jobs in the order they were submitted -> groups to run in turn: each `WindowJob` with the
    later ones of its length (up to `limit`) whose owner has no job between them still to run
    (so every owner's jobs keep their order); anything else alone."""
    placed = [False] * len(items)
    groups = []
    for i, item in enumerate(items):
        if placed[i]:
            continue
        placed[i] = True
        group = [item]
        if isinstance(item, WindowJob):
            waiting = set()  # owners with a job after item still to run: later jobs of theirs stay behind it
            for j in range(i + 1, len(items)):
                if len(group) >= limit:
                    break
                other = items[j]
                if placed[j]:
                    continue
                if (isinstance(other, WindowJob) and len(other.window) == len(item.window)
                        and other.owner not in waiting and all(other.owner is not g.owner for g in group)):
                    placed[j] = True
                    group.append(other)
                else:
                    waiting.add(_owner(other))
        groups.append(group)
    return groups


def _owner(item) -> object:
    return item.owner if isinstance(item, WindowJob) else item[0]


class VocodeWorker:
    def __init__(self, device=None, on_error: Callable[[object, BaseException], None] | None = None,
                 name: str = "spark-vocode", vocode_batch: Callable[[list, list], list] | None = None,
                 batch_limit: int | None = None):
        """vocode_batch(global token arrays, equal-length windows) -> one waveform per window: the
        vocoder `submit_window` jobs need (also called with a single window). batch_limit: most
        windows a call (None: MAX_VOCODE_BATCH, or 1 with VOCODE_BATCH_ENV=0)."""
        from tts.switches import switch_from_env

        self._vocode_batch = vocode_batch
        self.batch_limit = batch_limit or (MAX_VOCODE_BATCH if switch_from_env(VOCODE_BATCH_ENV) else 1)
        self.batches: list[int] = []  # size of every batched call made (tests, logs)
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

    @property
    def batched(self) -> bool:
        """Whether `submit_window` works here (a batched vocoder was given)."""
        return self._vocode_batch is not None

    def submit_window(self, job: WindowJob) -> None:
        """Vocode a window after every job of its owner submitted before it (batched with other
        owners' windows of its length that wait at the same time)."""
        if self._vocode_batch is None:
            raise RuntimeError("this worker has no batched vocoder (vocode_batch)")
        with self._idle:
            self._pending += 1
        self._jobs.put(job)

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
                items = [self._jobs.get()]
                while items[-1] is not None and len(items) < MAX_PENDING:
                    try:  # everything waiting now: windows of one length go in one call
                        items.append(self._jobs.get_nowait())
                    except queue.Empty:
                        break
                stop = items[-1] is None
                for group in plan_batches([i for i in items if i is not None], self.batch_limit):
                    try:
                        self._run(group)
                    finally:
                        with self._idle:
                            self._pending -= len(group)
                            self._idle.notify_all()
                if stop:
                    return

    def _run(self, group: list) -> None:
        """One plain job, or windows of one length in one batched call (each alone if that fails,
        so a failure stays with its own request)."""
        if not isinstance(group[0], WindowJob):
            owner, job = group[0]
            self._guarded(owner, job)
            return
        live = [j for j in group if not j.skip()]
        if len(live) > 1:
            t0 = time.perf_counter()
            try:
                wavs = self._vocode_batch([j.global_tokens for j in live], [j.window for j in live])
            except Exception:  # noqa: BLE001 - retried one by one below
                wavs = None
            if wavs is not None:
                self.batches.append(len(live))
                ms = (time.perf_counter() - t0) * 1000
                for job, wav in zip(live, wavs):
                    self._guarded(job.owner, lambda job=job, wav=wav: job.done(wav, ms))
                return
        for job in live:
            def one(job=job):
                t0 = time.perf_counter()
                (wav,) = self._vocode_batch([job.global_tokens], [job.window])
                job.done(wav, (time.perf_counter() - t0) * 1000)
            self._guarded(job.owner, one)

    def _guarded(self, owner, fn) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - one request's failure; the others go on
            if self._on_error is not None:
                self._on_error(owner, exc)


def _side_stream(device):
    """A context making a new CUDA stream current on this thread (a no-op off CUDA)."""
    import contextlib

    import torch

    if device is None or torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.stream(torch.cuda.Stream(device=torch.device(device)))
