"""Thread-safe in-flight batching engine for Spark-TTS (what the Triton `spark_llm` model wraps).

    engine = SparkEngine(SparkPipeline(model_dir, device="cuda"))
    handle = engine.submit(SparkRequest(text, reference_wav=wav, reference_text=ref, streaming=True))
    for chunk in handle:          # SparkChunk: wav, overlap_samples, final, info
        ...
    engine.cancel(handle.request_id)     # from any thread; the request leaves the batch at the next step

Or push-style, for a decoupled Triton model: `engine.submit(request, callback=fn)`; `fn(event)` is
called from the engine's threads with each `SparkChunk` in order, or once with an exception:
`SparkCancelled` after `cancel()`, another exception (its message is for the user) when the request
failed. After a chunk with `final` set, or after an exception, nothing more comes for that request.

Three threads: a preparation thread (reference tokenization with wav2vec2 + BiCodec, prompt cache,
text segmentation), the decode loop (admit prepared requests into free slots, one decode step
for the whole running batch) and the vocoder (`tts.spark.vocode_worker`: windows whose tokens are
ready, vocoded and delivered in order while decoding goes on; STUDIO_SPARK_VOCODE_THREAD=0 vocodes
on the decode loop instead). A request joins the running batch between two steps and leaves it
when its last segment ends, so new requests never wait for a batch to drain.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
import uuid
from collections import deque
from typing import Callable, Iterator

import numpy as np

from tts.devices import bind_thread
from tts.spark.pipeline import SparkPipeline
from tts.spark.request import SparkChunk, SparkRequest, SparkResult
from tts.spark.scheduler import Scheduler
from tts.spark.session import RequestState
from tts.spark.vocode_worker import VocodeWorker
from tts.switches import switch_from_env

#: How long the idle decode loop sleeps between checks for work (it is also woken on submit).
IDLE_WAIT_S = 0.05
#: Seconds with no request in flight before `on_idle` runs (the adapter's malloc_trim, a few ms in a
#: large process, once before after every finished request: on the thread that sent the answer, the
#: vocoder's, so later chunks of the other requests waited on it).
IDLE_S = 0.5
#: "0": vocode offline windows on the decode loop too (streamed chunks always are: `Scheduler`)
VOCODE_THREAD_ENV = "STUDIO_SPARK_VOCODE_THREAD"
#: "0": requests joining the batch together are prefilled one at a time (as before packed prefill)
JOIN_PREFILL_ENV = "STUDIO_SPARK_JOIN_PREFILL"


Event = SparkChunk | BaseException
Callback = Callable[[Event], None]


class SparkCancelled(Exception):
    """The request was cancelled (`SparkEngine.cancel`); no more audio follows."""


class SparkHandle:
    """One submitted request: iterate it for its chunks, or wait for `result()`."""

    def __init__(self, request_id: str, callback: Callback | None = None):
        self.request_id = request_id
        self._callback = callback
        self._events: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self.cancelled = False
        self.error: BaseException | None = None
        self.submitted = time.perf_counter()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def _put(self, event: Event) -> None:
        if self._done.is_set():
            return
        final = isinstance(event, BaseException) or event.final
        if isinstance(event, SparkCancelled):
            self.cancelled = True
        elif isinstance(event, BaseException):
            self.error = event
        if final:
            self._done.set()
        if self._callback is not None:
            try:
                self._callback(event)
            except Exception as exc:  # noqa: BLE001 - a broken receiver must not stop the engine
                print(f"[spark engine] callback for {self.request_id} failed: {exc!r}", flush=True)
        else:
            self._events.put(event)

    def __iter__(self) -> Iterator[SparkChunk]:
        """Chunks in order until the final one; raises the request's error; ends quietly if cancelled."""
        if self._callback is not None:
            raise RuntimeError("this request delivers its chunks to a callback")
        while True:
            event = self._events.get()
            if isinstance(event, SparkCancelled):
                return
            if isinstance(event, BaseException):
                raise event
            yield event
            if event.final:
                return

    def result(self, timeout: float | None = None) -> SparkResult:
        """Wait for every chunk and join them (`tts.audio.join_chunks`)."""
        from tts.audio import join_chunks

        if self._callback is not None:
            raise RuntimeError("this request delivers its chunks to a callback")
        deadline = None if timeout is None else time.monotonic() + timeout
        chunks = []
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                event = self._events.get(timeout=left)
            except queue.Empty:
                raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s") from None
            if isinstance(event, BaseException):
                raise event
            chunks.append(event)
            if event.final:
                break
        wav = join_chunks([c.wav for c in chunks], [c.overlap_samples for c in chunks])
        info = dict(chunks[-1].info)
        info.update(overlap_samples=0, chunk_index=len(chunks) - 1, final=True, chunks=len(chunks),
                    audio_s=round(len(wav) / info.get("sample_rate", 16000), 3))
        return SparkResult(wav.astype(np.float32, copy=False), info, chunks)


class SparkEngine:
    def __init__(self, pipeline: SparkPipeline, max_batch_size: int | None = None, max_seq_len: int | None = None,
                 name: str = "spark-engine", vocode_thread: bool | None = None,
                 on_idle: Callable[[], None] | None = None, idle_s: float = IDLE_S):
        """vocode_thread: vocode on a thread of its own (None: STUDIO_SPARK_VOCODE_THREAD, default
        on). Requests joining together are prefilled in one forward unless STUDIO_SPARK_JOIN_PREFILL=0.
        on_idle: called on the decode thread once no request has been in flight for `idle_s` seconds
        (the adapter returns freed memory to the system then), once per quiet spell."""
        self.pipeline = pipeline
        self.max_batch_size = max_batch_size or pipeline.max_batch_size
        self.max_seq_len = max_seq_len or pipeline.max_seq_len
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._handles: dict[str, SparkHandle] = {}
        self._to_prepare: queue.Queue = queue.Queue()
        self._ready: deque[RequestState] = deque()
        self._cancels: set[str] = set()
        self._closing = False
        self._running = 0
        self.steps = 0
        self.on_idle, self.idle_s = on_idle, idle_s
        use_worker = switch_from_env(VOCODE_THREAD_ENV) if vocode_thread is None else vocode_thread
        self.join_prefill = switch_from_env(JOIN_PREFILL_ENV)
        self.vocoder = (VocodeWorker(getattr(pipeline, "device", None),
                                     on_error=lambda state, exc: self.scheduler.vocode_failed(state, exc),
                                     name=f"{name}-vocode", vocode_batch=getattr(pipeline, "vocode_batch", None))
                        if use_worker else None)
        self.scheduler = self._new_scheduler()
        self._prep_thread = threading.Thread(target=self._prep_loop, name=f"{name}-prep", daemon=True)
        self._loop_thread = threading.Thread(target=self._decode_loop, name=f"{name}-decode", daemon=True)
        self._prep_thread.start()
        self._loop_thread.start()

    # ---- public API ------------------------------------------------------------------------------------------
    def submit(self, request: SparkRequest, callback: Callback | None = None) -> SparkHandle:
        """Queue a request; raises ValueError at once for a request that can never run."""
        if self._closing:
            raise RuntimeError("the Spark engine is shut down")
        request.validated()
        rid = request.request_id or uuid.uuid4().hex
        handle = SparkHandle(rid, callback)
        with self._lock:
            if rid in self._handles:
                raise ValueError(f"request id {rid!r} is already running")
            self._handles[rid] = handle
        self._to_prepare.put((rid, request))
        return handle

    def cancel(self, request_id: str) -> bool:
        """Drop a request (queued or running); its handle gets `SparkCancelled`. False if unknown/finished."""
        with self._lock:
            if request_id not in self._handles:
                return False
            self._cancels.add(request_id)
            self._wake.notify_all()
        return True

    @property
    def running_batch_size(self) -> int:
        """Sequences decoding right now (one per running request)."""
        return self._running

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet finished (queued, preparing or running)."""
        with self._lock:
            return len(self._handles)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the threads; requests still in flight get an error."""
        self._closing = True
        self._to_prepare.put(None)
        with self._lock:
            self._wake.notify_all()
        self._prep_thread.join(timeout)
        self._loop_thread.join(timeout)
        if self.vocoder is not None:
            self.vocoder.close(timeout)
        with self._lock:
            handles = list(self._handles.values())
            self._handles.clear()
        for h in handles:
            h._put(RuntimeError("the Spark engine shut down before this request finished"))

    # ---- delivery --------------------------------------------------------------------------------------------
    def _take(self, request_id: str, final: bool) -> SparkHandle | None:
        with self._lock:
            return self._handles.pop(request_id, None) if final else self._handles.get(request_id)

    def _emit(self, state: RequestState, chunk: SparkChunk) -> None:
        handle = self._take(state.request_id, chunk.final)
        if handle is not None:
            handle._put(chunk)

    def _fail(self, state_or_id, exc: BaseException) -> None:
        rid = state_or_id if isinstance(state_or_id, str) else state_or_id.request_id
        handle = self._take(rid, True)
        if handle is not None:
            handle._put(exc)

    # ---- threads ---------------------------------------------------------------------------------------------
    def _prep_loop(self) -> None:
        bind_thread(getattr(self.pipeline, "device", None))  # an engine on GPU n works on GPU n
        while True:
            item = self._to_prepare.get()
            if item is None or self._closing:
                return
            rid, request = item
            if not self._alive(rid):
                continue  # cancelled while queued (already reported)
            try:
                state = self.pipeline.prepare(request, rid)
            except Exception as exc:  # noqa: BLE001 - report to this request only
                self._fail(rid, exc)
                continue
            with self._lock:
                self._ready.append(state)
                self._wake.notify_all()

    def _alive(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._handles and request_id not in self._cancels

    def _apply_cancels(self) -> None:
        with self._lock:
            cancels, self._cancels = self._cancels, set()
            ready = [s for s in self._ready if s.request_id not in cancels]
            self._ready = deque(ready)
        for rid in cancels:
            self.scheduler.cancel(rid)
            self._fail(rid, SparkCancelled(f"request {rid} was cancelled"))

    def _decode_loop(self) -> None:
        bind_thread(getattr(self.pipeline, "device", None))
        quiet_since, idle_done = None, False  # no request in flight since; on_idle ran in this quiet spell
        while not self._closing:
            try:
                self._apply_cancels()
                joining = []  # prefilled together: one packed forward instead of one each
                with self._lock:
                    while self._ready and len(joining) < self.scheduler.free_slots:
                        state = self._ready.popleft()
                        if state.request_id in self._handles and state.request_id not in self._cancels:
                            joining.append(state)
                if self.join_prefill:
                    self.scheduler.admit_many(joining)
                else:
                    for state in joining:
                        self.scheduler.admit(state)
                if self.scheduler.busy:
                    self.scheduler.step()
                    self.steps += 1
                    self._running = self.scheduler.running_batch_size
                    quiet_since, idle_done = None, False
                    continue
                self._running = 0
                with self._lock:
                    if not self._ready and not self._cancels and not self._closing:
                        self._wake.wait(IDLE_WAIT_S)
                    quiet = not self._handles
                if not quiet:
                    quiet_since, idle_done = None, False
                elif quiet_since is None:
                    quiet_since = time.perf_counter()
                elif self.on_idle is not None and not idle_done and time.perf_counter() - quiet_since >= self.idle_s:
                    idle_done = True
                    self._idle()
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory in a batched step: fail the batch, go on
                self._reset(exc)

    def _idle(self) -> None:
        try:
            self.on_idle()
        except Exception as exc:  # noqa: BLE001 - a callback's failure must not stop decoding
            print(f"[spark-engine] on_idle raised {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)

    def _reset(self, exc: BaseException) -> None:
        for rid in list(self.scheduler.states):
            self._fail(rid, RuntimeError(f"Spark decoding failed: {type(exc).__name__}: {exc}"))
        self.scheduler = self._new_scheduler()
        self._running = 0

    def _new_scheduler(self) -> Scheduler:
        return Scheduler(self.pipeline, self.max_batch_size, self.max_seq_len, self._emit, self._fail,
                         vocoder=self.vocoder)
