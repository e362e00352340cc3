"""In-flight batching over one DecodeBatch: requests join and leave between decode steps.

`admit(state)` prefills the request's first segment into a free slot; `step()` runs one decode step
for every running sequence, routes the new tokens, vocodes the windows that became ready and emits
them; when a segment's sequence ends the next segment is prefilled at once (same slot count), and
when the last one ends the final window is vocoded and emitted with `final` set. One failing
request is dropped with an error; the others go on. Single-threaded: the engine's loop thread (or
the pipeline, for one request) is the only caller.

Vocoding and emitting run where `vocoder` puts them: inline by default (the pipeline's one
request), on a `tts.spark.vocode_worker.VocodeWorker` in the engine for offline requests, so decoding
goes on meanwhile. Streamed chunks are vocoded inline even then: on an H100 the worker's jobs ran only
once decoding paused, so a stream's first chunk came with its last (0.77 s against 0.11 s inline at
one stream; cause not found).
A window's vocoding that fails there is reported to its request at once and the request leaves
the batch at the next step.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable

from tts.spark.decode import DecodeBatch, Sequence
from tts.spark.request import SparkChunk
from tts.spark.session import RequestState
from tts.spark.vocode_worker import WindowJob

Emit = Callable[[RequestState, SparkChunk], None]
Fail = Callable[[RequestState, BaseException], None]


class Scheduler:
    def __init__(self, pipeline, max_batch: int, max_seq_len: int, emit: Emit, fail: Fail,
                 batch: DecodeBatch | None = None, vocoder=None):
        """vocoder: None = vocode and emit inline; else an object with submit(owner, job) running
        the jobs in order (`VocodeWorker`, made with this scheduler's `vocode_failed` as on_error)."""
        self.pipeline = pipeline
        self.vocoder = vocoder
        self._lock = threading.Lock()
        self._failed: list[str] = []  # requests whose vocoding failed on the worker: to drop
        self.batch = batch or pipeline.new_batch(max_batch, max_seq_len)
        if self.batch.running:
            raise ValueError("the scheduler needs an idle DecodeBatch")
        self.emit, self.fail = emit, fail
        self.states: dict[str, RequestState] = {}
        self._seq_of: dict[str, Sequence] = {}

    @property
    def running_batch_size(self) -> int:
        """Sequences in the running batch (one per request being decoded)."""
        return len(self.batch.running)

    @property
    def free_slots(self) -> int:
        return self.batch.free_slots

    @property
    def busy(self) -> bool:
        return bool(self.states)

    def admit(self, state: RequestState) -> None:
        """Start a prepared request (needs a free slot)."""
        self.states[state.request_id] = state
        self._guard(state, self._next_segment, state)

    def admit_many(self, states: list[RequestState]) -> None:
        """Start several prepared requests (as many free slots), their first segments prefilled
        together where the batch can (`DecodeBatch.add_many`); if that fails, one at a time, so
        a request that cannot start fails alone."""
        firsts = []
        for state in states:
            self.states[state.request_id] = state
            try:
                seq = state.next_sequence()
            except Exception as exc:  # noqa: BLE001 - this request's own problem (its text)
                self.cancel(state.request_id)
                self.fail(state, exc)
                continue
            if seq is None:
                self._guard(state, self._finish, state)
            else:
                firsts.append((state, seq))
        add_many = getattr(self.batch, "add_many", None)
        toks = None
        if add_many is not None and len(firsts) > 1:
            try:
                toks = add_many([seq for _, seq in firsts])
            except ValueError:  # one of them cannot start (its prompt too long): each alone below
                pass
            except Exception as exc:  # noqa: BLE001 - the packed forward failed: each alone below, said once
                print(f"[spark scheduler] joint prefill of {len(firsts)} requests failed ({type(exc).__name__}: "
                      f"{exc}); prefilling them one at a time", file=sys.stderr, flush=True)
        for i, (state, seq) in enumerate(firsts):
            self._seq_of[state.request_id] = seq
            if toks is None:
                self._guard(state, self._start, state, seq, self.batch.add)
            else:
                self._guard(state, self._start, state, seq, lambda _seq, tok=toks[i]: tok)

    def step(self) -> None:
        """One decode step for every running sequence (no-op when none)."""
        with self._lock:
            failed, self._failed = self._failed, []
        for rid in failed:
            self.cancel(rid)
        t0 = time.perf_counter()
        results = self.batch.step()
        # the trtllm runtime's batch reports sequences whose server-side stream failed
        for seq, exc in getattr(self.batch, "take_failures", list)():
            state = seq.tag
            if state.request_id in self.states:
                self.cancel(state.request_id)
                self.fail(state, exc)
        if not results:
            return
        dt_ms = (time.perf_counter() - t0) * 1000
        for state in {id(seq.tag): seq.tag for seq, _ in results}.values():
            state.decode_ms += dt_ms
        last = {id(seq): i for i, (seq, _) in enumerate(results)}  # a replay may give a sequence several tokens
        for i, (seq, tok) in enumerate(results):
            state = seq.tag
            if state.request_id in self.states:
                # its segment ends (and the next one starts) only after its last token of this step
                self._guard(state, self._on_token, state, seq, tok, i == last[id(seq)])

    def cancel(self, request_id: str) -> bool:
        """Drop a request from the batch; nothing more is emitted for it. False if unknown."""
        state = self.states.pop(request_id, None)
        if state is None:
            return False
        state.cancelled = True
        seq = self._seq_of.pop(request_id, None)
        if seq is not None:
            self.batch.drop(seq)
        return True

    # ---- internals -----------------------------------------------------------------------------------------
    def _guard(self, state: RequestState, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - one bad request must not stop the batch
            self.cancel(state.request_id)
            self.fail(state, exc)

    def _next_segment(self, state: RequestState) -> None:
        seq = state.next_sequence()
        if seq is None:
            self._finish(state)
            return
        self._seq_of[state.request_id] = seq
        self._start(state, seq, self.batch.add)

    def _start(self, state: RequestState, seq: Sequence, add: Callable[[Sequence], int]) -> None:
        """Route the first token of a segment's sequence (add(seq) prefills it, or gives the token
        of a prefill already done); a sequence that ended at once chains to the next segment."""
        tok = add(seq)
        self._on_token(state, seq, tok, chain=False)
        if seq.finished:
            self._end_segment(state, seq)
            self._next_segment(state)

    def _on_token(self, state: RequestState, seq: Sequence, tok: int, chain: bool = True) -> None:
        for window in state.feed(tok, seq):
            self._vocode(state, window, final=False)
        if seq.finished and chain:
            self._end_segment(state, seq)
            self._next_segment(state)

    def _end_segment(self, state: RequestState, seq: Sequence) -> None:
        self._seq_of.pop(state.request_id, None)
        for window in state.end_segment(seq):
            self._vocode(state, window, final=False)

    def _finish(self, state: RequestState) -> None:
        window = state.finish()
        self.states.pop(state.request_id, None)
        state.done = True
        if window is None:
            state.notes.append("the model wrote no speech (semantic) tokens")
            self._emit_later(state, self.pipeline.empty_audio, final=True)
        else:
            self._vocode(state, window, final=True)

    def vocode_failed(self, state: RequestState, exc: BaseException) -> None:
        """A vocoder job failed (on the worker's thread): report it now, drop the request at the next step."""
        state.cancelled = True
        with self._lock:
            self._failed.append(state.request_id)
        self.fail(state, exc)

    def _emit_chunk(self, state: RequestState, wav, final: bool, vocode_ms: float) -> None:
        """Emit a vocoded window as the request's next chunk (whichever way it was vocoded)."""
        self.emit(state, state.chunk(wav, final=final, vocode_ms=vocode_ms))

    def _emit_later(self, state: RequestState, make_wav: Callable[[], object], final: bool) -> None:
        """make_wav() then emit, inline or on the vocoder (in order with the request's other chunks)."""
        def job():
            if state.cancelled:
                return
            t0 = time.perf_counter()
            wav = make_wav()
            self._emit_chunk(state, wav, final, (time.perf_counter() - t0) * 1000)
        if self.vocoder is None or state.request.streaming:
            job()  # streamed chunks inline: on a GPU the worker's jobs ran only once decoding paused
        else:
            self.vocoder.submit(state, job)

    def _vocode(self, state: RequestState, window, final: bool) -> None:
        global_tokens = state.global_tokens
        if self.vocoder is not None and not state.request.streaming and getattr(self.vocoder, "batched", False):
            # on the worker, batched with other requests' windows of this length waiting there
            def done(wav, ms):
                self._emit_chunk(state, wav, final, ms)
            self.vocoder.submit_window(WindowJob(state, global_tokens, window, done, lambda: state.cancelled))
            return
        self._emit_later(state, lambda: self.pipeline.vocode(global_tokens, window), final)
