"""Serving order of F5 chunk jobs: which chunks run together (`Waves`), synchronously (`serve`) or
continuously on a thread of their own (`F5Engine`).

The rule (DESIGN.md "F5 chunk and seed rule", "Prefer one engine per GPU"): the first chunk of a
streaming request runs in a batch of first chunks only, so streaming answers fast; after that one
batch holds every chunk of the offline requests (upstream's plan: all chunks at once) and the next
chunk of every streaming request. A request's chunks are emitted in order, each as soon as it and
the chunks before it are done.

`F5Engine` applies the rule to whatever has arrived each time the device is free: requests join
between batches (continuous batching), so a request that arrives while a batch runs waits for that
batch only, not for the batch after it, and its parsing overlaps the running batch. Before, a
Triton `execute` ran its requests' batches to the end and the next requests waited for the whole
execute; with concurrent clients the device idled while responses went out and new requests were
parsed.

Shapes and units: audio float32 mono at 24 kHz; times in milliseconds.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from tts.devices import bind_thread
from tts.f5.pipeline import ChunkJob, F5Pipeline, F5Request, chunk_info
from tts.switches import F5_ENGINE_LOOP_ENV, number_from_env

Emit = Callable[[object, int, np.ndarray, dict], None]
#: The Triton adapter's switch: "1" continuous batching on the engine thread; "0" each execute's
#: requests run to the end. Unset: on on a GPU, off on the CPU (measured: faster at c=8 on an H100,
#: slower on the CPU)
LOOP_ENV = F5_ENGINE_LOOP_ENV


@dataclass(eq=False)
class Entry:
    """One request in the serving order."""

    key: object
    request: F5Request
    streaming: bool
    sink: "Sink | None" = None
    started: int = 0  # chunks handed to a batch
    sent: int = 0  # chunks emitted
    spent_ms: float = 0.0  # wall time of the batches its chunks ran in (the info's compute_ms)
    arrived: float | None = None  # perf_counter when the engine took it (F5Engine)
    queue_ms: float | None = None  # from `arrived` to the start of its first batch (the info's queue_ms)
    arrived_wall: float | None = None  # time.time() at `arrived` (the info's engine_in_s)
    received_wall: float | None = None  # time.time() when the server's execute got it (the info's engine_exec_s)
    done: dict[int, np.ndarray] = field(default_factory=dict)  # finished chunks not yet emitted

    @property
    def finished(self) -> bool:
        return self.sent >= len(self.request.jobs)


def batch_members(batch: list[tuple[Entry, ChunkJob]]) -> list[Entry]:
    """The requests a batch holds chunks of, each once, in batch order."""
    return list({id(e): e for e, _ in batch}.values())


class Waves:
    """The batching rule as a state machine: `add` requests, take `next_batch`, report its audio
    with `finish` (or `fail` it), `drop` a cancelled request. Not thread-safe (one owner)."""

    def __init__(self, demo_weights: bool):
        self.demo_weights = demo_weights
        self.entries: list[Entry] = []  # arrival order
        self._last_was_firsts = False

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, key: object, request: F5Request, streaming: bool, sink: "Sink | None" = None,
            arrived: float | None = None, arrived_wall: float | None = None,
            received_wall: float | None = None) -> Entry:
        return self.admit(Entry(key, request, streaming, sink, arrived=arrived, arrived_wall=arrived_wall,
                                received_wall=received_wall))

    def admit(self, entry: Entry) -> Entry:
        """Add an entry made elsewhere (`F5Engine.submit` makes it when the request arrives)."""
        if not entry.request.jobs:
            raise ValueError("a request without chunks")
        self.entries.append(entry)
        return entry

    def drop(self, entry: Entry) -> None:
        self.entries.remove(entry)

    def next_batch(self) -> list[tuple[Entry, ChunkJob]]:
        """The chunks to run next: streaming first chunks alone, else every offline request's
        chunks with each streaming request's next chunk. A batch of first chunks is never followed
        by another one while other chunks wait, so a stream of new streaming requests cannot hold
        the others back."""
        firsts = [e for e in self.entries if e.streaming and e.started == 0]
        if firsts and not (self._last_was_firsts and any(e.started < len(e.request.jobs)
                                                        for e in self.entries if e not in firsts)):
            batch = [(e, e.request.jobs[0]) for e in firsts]
            self._last_was_firsts = True
        else:
            batch = []
            for e in self.entries:
                jobs = e.request.jobs
                if e.started < len(jobs):
                    batch += [(e, jobs[e.started])] if e.streaming else [(e, j) for j in jobs[e.started:]]
            self._last_was_firsts = False
        for e, job in batch:
            e.started = max(e.started, job.index + 1)
        return batch

    def finish(self, batch: list[tuple[Entry, ChunkJob]], audio: list[np.ndarray], ms: float,
               emit: Callable[[Entry, int, np.ndarray, dict], None]) -> list[Entry]:
        """Record a batch's audio and emit every chunk now in order; returns the requests that
        are complete (removed from the order)."""
        for (e, job), wav in zip(batch, audio):
            e.done[job.index] = wav
        members = batch_members(batch)
        for e in members:
            e.spent_ms += ms
            while e.sent in e.done:
                job = e.request.jobs[e.sent]
                info = chunk_info(e.request, job, e.spent_ms, self.demo_weights)
                if e.queue_ms is not None:
                    info["queue_ms"] = round(e.queue_ms, 3)
                if e.arrived_wall is not None:  # wall clock: a client on the same machine splits its latency
                    info.update(engine_in_s=round(e.arrived_wall, 6), engine_out_s=round(time.time(), 6))
                if e.received_wall is not None:
                    info["engine_exec_s"] = round(e.received_wall, 6)
                emit(e, job.index, e.done.pop(e.sent), info)
                e.sent += 1
        complete = [e for e in members if e.finished]
        for e in complete:
            self.entries.remove(e)
        return complete

    def fail(self, batch: list[tuple[Entry, ChunkJob]]) -> list[Entry]:
        """A batch that raised: its requests leave the order (returned); the others go on."""
        members = batch_members(batch)
        for e in members:
            if e in self.entries:
                self.entries.remove(e)
        return members


def serve(pipeline: F5Pipeline, requests: list[tuple[object, F5Request, bool]], emit: Emit,
          demo_weights: bool, cancelled: Callable[[object], bool] = lambda key: False) -> list:
    """Run a set of requests to the end in the batching order; returns the keys of requests
    cancelled part-way (`cancelled(key)` is asked before every batch).

    `requests` holds (key, request, streaming); `emit(key, chunk_index, audio, info)` is called
    per chunk in each request's chunk order; compute_ms accumulates the wall time of the batches a
    request's chunks ran in. An exception from the pipeline propagates (every request fails)."""
    waves = Waves(demo_weights)
    for key, request, streaming in requests:
        waves.add(key, request, streaming)
    dropped = []
    while waves.entries:
        for e in [e for e in waves.entries if cancelled(e.key)]:
            waves.drop(e)
            dropped.append(e.key)
        batch = waves.next_batch()
        if not batch:
            break
        t0 = time.perf_counter()
        audio = pipeline.synthesize([job for _, job in batch])
        waves.finish(batch, audio, (time.perf_counter() - t0) * 1000,
                     lambda e, index, wav, info: emit(e.key, index, wav, info))
    return dropped


class Sink(Protocol):
    """Where one request's results go (the Triton adapter's response sender, a test's list)."""

    def emit(self, index: int, wav: np.ndarray, info: dict) -> None: ...  # one chunk, in order

    def fail(self, message: str) -> None: ...  # the request failed; nothing more comes

    def dropped(self) -> None: ...  # cancelled part-way; nothing more comes

    def cancelled(self) -> bool: ...  # asked before every batch


#: When a batch ends with n requests in flight (its own and those that waited meanwhile), the next
#: batch may wait up to this long (from that end) while fewer than n are ready, to batch them all.
#: Off by default: in one H100 call (commit d8dbe1e, 16 NFE, c=8, 24 requests) starting on whatever
#: had arrived gave batches of 7 and 1 in turn, the GPU busy 93 % of the time, rtf 0.0069; waiting
#: 20 ms gave batches of 4-8 with the GPU idle while it waited (85-88 % busy), rtf 0.0072-0.0079.
#: The batch of one runs while the seven answers travel and their next requests come back.
#: STUDIO_F5_ENGINE_GATHER_MS sets a wait (milliseconds, up to 1000).
GATHER_S = 0.0
GATHER_ENV = "STUDIO_F5_ENGINE_GATHER_MS"


def gather_s_from_env(env: dict | None = None) -> float:
    return number_from_env(GATHER_ENV, GATHER_S * 1000, 0, 1000, "milliseconds", env=env) / 1000


#: Seconds without work before the engine calls `on_idle` (the adapter's malloc_trim, a few ms in
#: a large process): at one request in flight the next request arrives ~1-2 ms after the last
#: answer, and an immediate trim would sit on its path.
IDLE_S = 0.5


class F5Engine:
    """Continuous batching on one thread: each time the device is free, the next batch of `Waves`
    over every request that has arrived. `submit` returns at once; results reach the request's
    `Sink` from the engine's thread. A failed batch fails its own requests only; a sink that
    raises loses its request, never the engine."""

    def __init__(self, pipeline: F5Pipeline, demo_weights: bool, log: Callable[[str], None] | None = None,
                 on_idle: Callable[[], None] | None = None,
                 on_batch: Callable[[int, int, float], None] | None = None, batch_context=None,
                 on_queued: Callable[[float], None] | None = None, idle_s: float | None = None,
                 gather_s: float | None = None):
        """on_idle: called once the engine has had no work for `idle_s` seconds (the adapter
        returns freed memory then; not at once, so a request that follows the last one closely, as
        at one request in flight, never waits on it); on_batch(requests, chunks, ms): after every
        batch (timing lines);
        batch_context: a reusable context manager entered around every batch (a profiler);
        on_queued(ms): once per request, with its wait from `submit` to the start of its first batch;
        gather_s: how long the next batch may wait for the rest of a burst (None: GATHER_ENV or GATHER_S).
        Requests wait here, not in Triton's queue (whose execute only hands them over), so this is
        the wait a queue-time metric must count (the adapter exports it to Prometheus)."""
        self.pipeline = pipeline
        self.batch_context = batch_context if batch_context is not None else contextlib.nullcontext()
        self.log = log or (lambda msg: print(f"[f5_engine] {msg}", file=sys.stderr, flush=True))
        self.on_idle, self.on_batch, self.on_queued = on_idle, on_batch, on_queued
        self.idle_s = IDLE_S if idle_s is None else idle_s
        self.gather_s = gather_s_from_env() if gather_s is None else gather_s
        self._last_size, self._last_end = 0, 0.0  # requests in flight when the last batch ended, and when
        self._waves = Waves(demo_weights)
        self._incoming: list[Entry] = []  # submitted, not yet in `_waves` (the loop admits them between batches)
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="f5-engine", daemon=True)
        self._thread.start()

    def submit(self, key: object, request: F5Request, streaming: bool, sink: Sink,
               received_at: float | None = None) -> None:
        """received_at: time.time() when the server got the request (before parsing it), reported
        as the info's engine_exec_s."""
        if not request.jobs:
            raise ValueError("a request without chunks")
        entry = Entry(key, request, streaming, sink, arrived=time.perf_counter(), arrived_wall=time.time(),
                      received_wall=received_at)
        with self._cv:
            if self._closed:
                raise RuntimeError("the F5 engine is shut down")
            self._incoming.append(entry)
            self._cv.notify()

    @property
    def in_flight(self) -> int:
        with self._cv:
            return len(self._incoming) + len(self._waves)

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking requests; the batch running finishes, the requests waiting fail."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout)

    # -- the loop ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        bind_thread(getattr(self.pipeline, "device", None))  # an engine on GPU n works on GPU n
        waves = self._waves
        idle_done = False  # on_idle already ran since the last batch
        while True:
            if not waves.entries and self.on_idle is not None and not idle_done:
                with self._cv:
                    if not self._incoming and not self._closed:
                        self._cv.wait(self.idle_s)
                    idle = not self._incoming and not self._closed
                if idle:  # outside the lock: submit() never waits on it
                    idle_done = True
                    self._call(self.on_idle)
            with self._cv:
                while not self._incoming and not waves.entries and not self._closed:
                    self._cv.wait()
                if self.gather_s:
                    self._gather(len(waves.entries))
                if self._closed:
                    left = [e.sink for e in self._incoming + waves.entries]
                    self._incoming.clear()
                    waves.entries.clear()
                    break
                for entry in self._incoming:
                    waves.admit(entry)
                self._incoming.clear()
            for e in list(waves.entries):
                if self._call(e.sink.cancelled, default=False):
                    waves.drop(e)
                    self.log(f"request {e.key} cancelled: its remaining chunks were dropped")
                    self._call(e.sink.dropped)
            batch = waves.next_batch()
            if not batch:
                continue
            t0 = time.perf_counter()
            for e in batch_members(batch):
                if e.queue_ms is None and e.arrived is not None:
                    e.queue_ms = (t0 - e.arrived) * 1000
                    if self.on_queued is not None:
                        self._call(self.on_queued, e.queue_ms)
            try:
                with self.batch_context:
                    audio = self.pipeline.synthesize([job for _, job in batch])
            except Exception as exc:  # noqa: BLE001 - fail this batch's requests, keep serving
                msg = f"F5 synthesis failed: {type(exc).__name__}: {exc}"
                self.log(msg)
                for e in waves.fail(batch):
                    self._call(e.sink.fail, msg)
                continue
            idle_done = False
            ms = (time.perf_counter() - t0) * 1000
            waves.finish(batch, audio, ms, self._emit)
            # requests in flight as this batch ended: its own (back soon, finished or not) and those
            # that waited meanwhile; the next batch gathers that many (GATHER_S)
            if self.gather_s:
                served = {id(e) for e in batch_members(batch)} | {id(e) for e in waves.entries}
                with self._cv:
                    self._last_size, self._last_end = len(served) + len(self._incoming), time.perf_counter()
            if self.on_batch is not None:
                self._call(self.on_batch, len(batch_members(batch)), len(batch), ms)
        for sink in left:
            self._call(sink.fail, "the F5 engine shut down before this request finished")

    def _gather(self, waiting: int) -> None:
        """Under the lock: while fewer requests are ready than were in flight when the last batch
        ended (its own and those waiting then), wait for more until `gather_s` after it ended
        (GATHER_S says why)."""
        end = self._last_end + self.gather_s
        while not self._closed and waiting + len(self._incoming) < self._last_size:
            left = end - time.perf_counter()
            if left <= 0:
                return
            self._cv.wait(left)

    def _emit(self, entry: Entry, index: int, wav: np.ndarray, info: dict) -> None:
        try:
            entry.sink.emit(index, wav, info)
        except Exception as exc:  # noqa: BLE001 - the request is lost (its client gone), not the engine
            self.log(f"request {entry.key}: sending chunk {index} failed ({type(exc).__name__}: {exc}); "
                     f"its remaining chunks are dropped")
            entry.sent = len(entry.request.jobs)  # finished: `Waves.finish` takes it out of the order
            entry.done.clear()

    def _call(self, fn, *args, default=None):
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - a callback's failure is logged, the loop goes on
            self.log(f"{getattr(fn, '__qualname__', fn)} raised {type(exc).__name__}: {exc}")
            return default
