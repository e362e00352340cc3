"""Spark's `trtllm` runtime: the LLM decode loop on Triton's `tensorrtllm` backend, behind `DecodeBatch`.

Everything else of `spark_llm` stays as in the torch runtime (prompt building, the audio tokenizer,
segments, chunking and vocoding with overlap, cancellation, voice creation): `TrtllmBatch` has
`DecodeBatch`'s interface (`add`, `step`, `drop`, `running`, `free_slots`), so `Scheduler` drives
it unchanged. Each `Sequence` becomes one streaming request to the TensorRT-LLM model, whose
in-flight batcher does the batching; `step` hands the scheduler the tokens that arrived since the
last step, each sequence's in order.

No Triton import here: the requests go through a *transport* the Triton model passes in
(`triton_models/trtllm_bls.py`, BLS calls), or a stand-in in tests:

    transport.start(tensors: dict[str, np.ndarray]) -> stream
    iter(stream) -> dict[str, np.ndarray] per response (`output_ids` [1, 1, n] int32: the n new
                    tokens of a streaming response; responses without outputs are skipped)
    stream.cancel() -> None   (best effort: stop the generation on the server)

Tensor names, types and shapes are those of TensorRT-LLM's `tensorrt_llm` model template of the
pinned version (TensorRT-LLM 1.1, `triton_backend/all_models/inflight_batcher_llm/tensorrt_llm/
config.pbtxt`): `REQUEST_INPUTS` below. Each carries the batch dimension (1).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import numpy as np

from tts.spark.decode import Sequence

#: Input name -> (numpy dtype, dims without the batch dimension) as the pinned template declares
#: them; `[1]`-dims inputs are reshaped to scalars by the backend (`reshape: { shape: [ ] }`).
REQUEST_INPUTS: dict[str, tuple[type, tuple[int, ...]]] = {
    "input_ids": (np.int32, (-1,)),
    "input_lengths": (np.int32, (1,)),
    "request_output_len": (np.int32, (1,)),
    "end_id": (np.int32, (1,)),
    "pad_id": (np.int32, (1,)),
    "stop_words_list": (np.int32, (2, -1)),
    "bad_words_list": (np.int32, (2, -1)),
    "temperature": (np.float32, (1,)),
    "runtime_top_k": (np.int32, (1,)),
    "runtime_top_p": (np.float32, (1,)),
    "min_tokens": (np.int32, (1,)),
    "seed": (np.uint64, (1,)),
    "streaming": (np.bool_, (1,)),
    "exclude_input_in_output": (np.bool_, (1,)),
}
#: Outputs read back: the new tokens of each streaming response, and the count.
REQUEST_OUTPUTS = ("output_ids", "sequence_length")
#: How long `step` waits for tokens before handing control back to the engine loop (so queued
#: cancels and admissions are seen even when no sequence produced a token meanwhile).
STEP_WAIT_S = 0.05


def word_list(words: list[int]) -> np.ndarray:
    """Single-token words -> TensorRT-LLM's word-list tensor [1, 2, n]: row 0 the tokens, row 1 each
    word's end offset (1, 2, ..., n). An empty list becomes [1, 2, 1] of -1 (no words)."""
    if not words:
        return np.full((1, 2, 1), -1, dtype=np.int32)
    ids = np.asarray(words, dtype=np.int32)
    return np.stack((ids, np.arange(1, len(ids) + 1, dtype=np.int32)))[None]


def primary_end_id(end_ids: tuple[int, ...]) -> int:
    """The end id TensorRT-LLM stops on (it takes one); the others become stop words."""
    if not end_ids:
        raise ValueError("a Spark sequence needs an end token")
    return int(end_ids[0])


def request_tensors(seq: Sequence, max_seq_len: int) -> dict[str, np.ndarray]:
    """The tensors of one streaming generation request for `seq` (batch of 1).

    Sampling maps one to one (temperature, top-k with 0 = off and 1 = greedy, top-p, per-request
    seed). End tokens: `end_id` is the first, the others are stop words. Fixed-length generation
    (min = max = N, the benchmarks' `--fixed-tokens`) sets `min_tokens` N, and because TensorRT-LLM's
    minimum only holds back `end_id`, the other end tokens are banned outright (bad words) for that
    request, which over a generation of exactly N tokens is what the torch runtime's ban does.
    The output length is capped so prompt + output fits the engine's `max_seq_len`.
    """
    p = seq.params
    prompt = np.asarray(seq.prompt_ids, dtype=np.int32)
    if len(prompt) == 0:
        raise ValueError("empty prompt")
    room = max_seq_len - len(prompt)
    if room < 1:
        raise ValueError(f"the prompt has {len(prompt)} tokens but the TensorRT-LLM engine holds {max_seq_len}; "
                         f"use a shorter reference clip or text")
    end = primary_end_id(seq.end_ids)
    others = [int(e) for e in seq.end_ids[1:]]
    fixed = p.min_new_tokens >= p.max_new_tokens
    # greedy as the torch runtime decides it (top_k 1 or temperature 0): top-k 1 in TensorRT-LLM
    top_k = 1 if p.greedy else int(p.top_k)

    def scalar(name, value):
        dtype, _ = REQUEST_INPUTS[name]
        return np.array([[value]], dtype=dtype)

    return {
        "input_ids": prompt[None, :],
        "input_lengths": scalar("input_lengths", len(prompt)),
        "request_output_len": scalar("request_output_len", min(int(p.max_new_tokens), room)),
        "end_id": scalar("end_id", end),
        "pad_id": scalar("pad_id", end),
        "stop_words_list": word_list([] if fixed else others),
        "bad_words_list": word_list(others if fixed else []),
        "temperature": scalar("temperature", max(float(p.temperature), 0.0) if not p.greedy else 1.0),
        "runtime_top_k": scalar("runtime_top_k", top_k),
        "runtime_top_p": scalar("runtime_top_p", float(p.top_p)),
        "min_tokens": scalar("min_tokens", int(p.min_new_tokens)),
        "seed": scalar("seed", int(seq.seed) % 2 ** 64),
        "streaming": scalar("streaming", True),
        "exclude_input_in_output": scalar("exclude_input_in_output", True),
    }


@dataclass
class _Event:
    seq: Sequence
    tokens: list[int]
    done: bool = False
    error: BaseException | None = None


class TrtllmBatch:
    """`DecodeBatch`'s interface over streaming requests to a TensorRT-LLM model (one per sequence).

    A reader thread per running sequence iterates its response stream and queues the tokens;
    `step` returns what arrived (at least one event, or nothing after `STEP_WAIT_S`). A sequence
    finishes on an end token, at `max_new_tokens`, or when its stream ends (TensorRT-LLM leaves the
    `end_id` it stopped on out of the output; the batch appends it, so `Sequence.generated` ends as
    the torch runtime's does). Not thread-safe: one driver thread, as `DecodeBatch`.
    """

    def __init__(self, transport, max_batch: int, max_seq_len: int):
        self.transport = transport
        self.slots: list[Sequence | None] = [None] * max_batch
        self._max_seq_len = max_seq_len
        self._events: queue.Queue[_Event] = queue.Queue()
        self._streams: dict[int, object] = {}
        self._failures: list[tuple[Sequence, BaseException]] = []

    # -- DecodeBatch's interface ------------------------------------------------------------------
    @property
    def max_batch(self) -> int:
        return len(self.slots)

    @property
    def max_seq_len(self) -> int:
        return self._max_seq_len

    @property
    def running(self) -> list[Sequence]:
        return [s for s in self.slots if s is not None]

    @property
    def free_slots(self) -> int:
        return sum(s is None for s in self.slots)

    def add(self, seq: Sequence) -> int:
        """Send `seq`'s request and wait for its first token (the prefill); returns that token."""
        tensors = request_tensors(seq, self._max_seq_len)
        try:
            slot = self.slots.index(None)
        except ValueError:
            raise RuntimeError("no free decode slot") from None
        t0 = time.perf_counter()
        stream = self.transport.start(tensors)
        seq.slot, self.slots[slot] = slot, seq
        self._streams[id(seq)] = stream
        first: queue.Queue[_Event] = queue.Queue()
        threading.Thread(target=self._read, args=(seq, stream, first), daemon=True,
                         name=f"trtllm-{slot}").start()
        event = first.get()  # the reader puts the first token alone here, the rest on the queue
        seq.prefill_s = time.perf_counter() - t0
        if event.error is not None:
            self._release(seq, "error")
            raise event.error
        return self._accept(seq, event)[0]

    def step(self) -> list[tuple[Sequence, int]]:
        """Tokens that arrived since the last step: (seq, token) pairs, each sequence's in order."""
        if not self.running and self._events.empty():
            return []
        try:
            events = [self._events.get(timeout=STEP_WAIT_S)]
        except queue.Empty:
            return []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                break
        out = []
        for event in events:
            seq = event.seq
            if event.error is not None:
                if not seq.finished:
                    self._release(seq, "error")
                    self._failures.append((seq, event.error))
                continue
            if seq.finished:
                continue  # dropped, or already ended: late tokens are discarded
            out += [(seq, t) for t in self._accept(seq, event)]
        return out

    def drop(self, seq: Sequence, reason: str = "cancelled") -> None:
        """Leave the batch at once; the server-side generation is cancelled (best effort)."""
        stream = self._streams.get(id(seq))
        was_running = not seq.finished
        self._release(seq, reason)
        if was_running and stream is not None:
            cancel = getattr(stream, "cancel", None)
            if cancel is not None:
                try:
                    cancel()
                except Exception as exc:  # noqa: BLE001 - the request is gone from our batch either way
                    print(f"[spark trtllm] cancel failed: {exc!r}", flush=True)

    def take_failures(self) -> list[tuple[Sequence, BaseException]]:
        """Sequences whose stream failed since the last call (the scheduler fails their requests)."""
        failures, self._failures = self._failures, []
        return failures

    # -- internals ----------------------------------------------------------------------------------
    def _read(self, seq: Sequence, stream, first: queue.Queue) -> None:
        """Reader thread: the first token goes alone to `first` (`add` returns it), everything after
        it to the step queue in arrival order; then a `done` event (or an `error` one)."""
        target = first
        try:
            for response in stream:
                ids = response.get("output_ids")
                tokens = [int(t) for t in np.asarray(ids).reshape(-1)] if ids is not None else []
                if tokens and target is first:
                    first.put(_Event(seq, tokens[:1]))
                    target, tokens = self._events, tokens[1:]
                if tokens:
                    target.put(_Event(seq, tokens))
            target.put(_Event(seq, [], done=True))
        except Exception as exc:  # noqa: BLE001 - reported to this sequence's request only
            target.put(_Event(seq, [], error=exc))

    def _accept(self, seq: Sequence, event: _Event) -> list[int]:
        """Append an event's tokens to `seq`, finishing it as `DecodeBatch._accept` would; returns
        the tokens the scheduler gets (those up to the finishing one)."""
        taken = []
        for tok in event.tokens:
            seq.generated.append(tok)
            taken.append(tok)
            if tok in seq.end_ids and len(seq.generated) > seq.params.min_new_tokens:
                self._release(seq, "end")
            elif len(seq.generated) >= seq.params.max_new_tokens:
                self._release(seq, "length")
            elif len(seq.prompt_ids) + len(seq.generated) >= self._max_seq_len:
                self._release(seq, "cache")
            if seq.finished:
                return taken
        if event.done:  # the server stopped on its end_id, which it leaves out of the output
            end = primary_end_id(seq.end_ids)
            seq.generated.append(end)
            taken.append(end)
            self._release(seq, "end")
        return taken

    def _release(self, seq: Sequence, reason: str) -> None:
        if not seq.finished:
            seq.finished, seq.finish_reason = True, reason
        if 0 <= seq.slot < len(self.slots) and self.slots[seq.slot] is seq:
            self.slots[seq.slot] = None
        self._streams.pop(id(seq), None)

