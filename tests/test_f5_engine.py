"""tts/f5/engine.py: the batching order (`Waves`), `serve`, and the continuous-batching thread.

A stand-in pipeline records every batch it is given and returns a chunk's index as its audio, so
the tests see exactly which chunks ran together and in which order results came back. The real
pipeline under this order is covered by the Triton tests (tests/test_f5_triton.py).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from tts.f5.engine import F5Engine, Waves, serve
from tts.f5.pipeline import ChunkJob, F5Options, F5Request, PreparedReference

WAIT_S = 10.0  # generous bound on the engine's thread in these tests (it answers in milliseconds)


def request(name: str, chunks: int, seed: int = 0) -> F5Request:
    ref = PreparedReference(mel=torch.zeros(10, 100), wav_len=24000, rms=0.1, clipped=False)
    jobs = [ChunkJob([1, 2], f"{name}{i}", ref, 50, seed + i, F5Options(), i, chunks) for i in range(chunks)]
    return F5Request(jobs, seed)


class FakePipeline:
    """Records batches as lists of chunk texts; audio = [chunk index]. `gate` (if set) holds each
    batch until the test releases it; `fail_on` names a chunk whose batch raises."""

    def __init__(self, gate: threading.Event | None = None, fail_on: str | None = None):
        self.batches: list[list[str]] = []
        self.gate, self.fail_on = gate, fail_on
        self.started = threading.Semaphore(0)

    def synthesize(self, jobs: list[ChunkJob]) -> list[np.ndarray]:
        self.batches.append([j.text for j in jobs])
        self.started.release()
        if self.gate is not None:
            assert self.gate.wait(WAIT_S)
        if self.fail_on in [j.text for j in jobs]:
            raise RuntimeError(f"bad chunk {self.fail_on}")
        return [np.full(3, j.index, dtype=np.float32) for j in jobs]


class ListSink:
    def __init__(self, cancel_after: int | None = None, raise_on: int | None = None):
        self.chunks: list[tuple[int, np.ndarray, dict]] = []
        self.error: str | None = None
        self.was_dropped = False
        self.finished = threading.Event()
        self.cancel_after, self.raise_on = cancel_after, raise_on

    def emit(self, index, wav, info):
        if index == self.raise_on:
            raise ConnectionError("client gone")
        self.chunks.append((index, np.asarray(wav), info))
        if info["final"]:
            self.finished.set()

    def fail(self, message):
        self.error = message
        self.finished.set()

    def dropped(self):
        self.was_dropped = True
        self.finished.set()

    def cancelled(self):
        return self.cancel_after is not None and len(self.chunks) >= self.cancel_after


# -- the order ---------------------------------------------------------------------------------------

def test_static_set_runs_first_chunks_then_everything_else():
    """What one execute did before the engine thread: streaming first chunks alone, then the
    offline requests' chunks with the streaming second chunks, then one chunk a stream per batch."""
    pipe = FakePipeline()
    out = []
    serve(pipe, [("a", request("a", 3), True), ("b", request("b", 2), False), ("c", request("c", 1), True)],
          lambda key, i, wav, info: out.append((key, i, info["final"])), demo_weights=False)
    assert pipe.batches == [["a0", "c0"], ["a1", "b0", "b1"], ["a2"]]
    assert [(k, i) for k, i, _ in out if k == "a"] == [("a", 0), ("a", 1), ("a", 2)]
    assert ("b", 1, True) in out and ("c", 0, True) in out


def test_compute_ms_sums_the_batches_a_request_ran_in():
    waves = Waves(demo_weights=True)
    a = waves.add("a", request("a", 2), True)
    infos = []
    first = waves.next_batch()
    waves.finish(first, [np.zeros(1)], 10.0, lambda e, i, wav, info: infos.append(info))
    second = waves.next_batch()
    done = waves.finish(second, [np.zeros(1)], 5.0, lambda e, i, wav, info: infos.append(info))
    assert [i["compute_ms"] for i in infos] == [10.0, 15.0] and infos[-1]["final"]
    assert infos[0]["demo_weights"] is True and done == [a] and len(waves) == 0


def test_a_run_of_new_streams_cannot_hold_back_the_others():
    """After a batch of first chunks, if other chunks wait, the next batch takes them too, even
    when more first chunks have arrived."""
    waves = Waves(demo_weights=False)
    waves.add("off", request("off", 1), False)
    waves.add("s1", request("s", 2), True)
    assert [j.text for _, j in waves.next_batch()] == ["s0"]
    waves.add("s2", request("t", 2), True)
    assert [j.text for _, j in waves.next_batch()] == ["off0", "s1", "t0"]


def test_chunks_are_emitted_in_order_even_when_a_later_one_is_done_first():
    waves = Waves(demo_weights=False)
    e = waves.add("a", request("a", 2), False)
    batch = waves.next_batch()
    out = []
    waves.finish(list(reversed(batch)), [np.ones(1), np.zeros(1)], 1.0, lambda e, i, wav, info: out.append(i))
    assert out == [0, 1] and e.finished


# -- the engine thread -------------------------------------------------------------------------------

def test_requests_join_between_batches():
    """A request that arrives while a batch runs goes into the next batch, not after the others'
    remaining work; the running batch is not disturbed."""
    gate = threading.Event()
    pipe = FakePipeline(gate=gate)
    engine = F5Engine(pipe, demo_weights=False, log=lambda msg: None)
    try:
        first, second = ListSink(), ListSink()
        engine.submit("a", request("a", 2), True, first)
        assert pipe.started.acquire(timeout=WAIT_S)  # a0 is running
        engine.submit("b", request("b", 1), False, second)
        gate.set()
        assert first.finished.wait(WAIT_S) and second.finished.wait(WAIT_S)
        assert pipe.batches == [["a0"], ["a1", "b0"]]
        assert [c[0] for c in first.chunks] == [0, 1] and [float(c[1][0]) for c in first.chunks] == [0.0, 1.0]
        assert second.chunks[0][2]["final"] and engine.in_flight == 0
    finally:
        gate.set()
        engine.close()


def test_a_failed_batch_fails_only_its_requests():
    gate = threading.Event()
    pipe = FakePipeline(gate=gate, fail_on="bad0")
    engine = F5Engine(pipe, demo_weights=False, log=lambda msg: None)
    try:
        early, bad, later = ListSink(), ListSink(), ListSink()
        engine.submit("early", request("early", 1), False, early)
        assert pipe.started.acquire(timeout=WAIT_S)
        engine.submit("bad", request("bad", 1), False, bad)  # joins the next batch with "later"
        engine.submit("later", request("later", 1), False, later)
        gate.set()
        for sink in (early, bad, later):
            assert sink.finished.wait(WAIT_S)
        assert early.error is None and early.chunks
        assert "F5 synthesis failed" in bad.error and "bad chunk bad0" in bad.error
        assert later.error == bad.error  # same batch, same fate
        # and the engine serves on
        after = ListSink()
        engine.submit("after", request("after", 1), False, after)
        assert after.finished.wait(WAIT_S) and after.error is None and after.chunks
    finally:
        gate.set()
        engine.close()


def test_cancel_drops_the_remaining_chunks():
    pipe = FakePipeline()
    engine = F5Engine(pipe, demo_weights=False, log=lambda msg: None)
    try:
        sink = ListSink(cancel_after=1)
        engine.submit("a", request("a", 4), True, sink)
        assert sink.finished.wait(WAIT_S)
        assert sink.was_dropped and [c[0] for c in sink.chunks] == [0]
        assert pipe.batches == [["a0"]]
    finally:
        engine.close()


def test_a_sink_that_raises_loses_its_request_not_the_engine():
    pipe = FakePipeline()
    logs = []
    engine = F5Engine(pipe, demo_weights=False, log=logs.append)
    try:
        gone, fine = ListSink(raise_on=0), ListSink()
        engine.submit("gone", request("gone", 3), True, gone)
        engine.submit("fine", request("fine", 2), True, fine)
        assert fine.finished.wait(WAIT_S) and [c[0] for c in fine.chunks] == [0, 1]
        deadline = time.monotonic() + WAIT_S
        while engine.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.in_flight == 0
        assert not any("gone2" in b for b in pipe.batches)  # its later chunks never ran
        assert any("request gone: sending chunk 0 failed" in line for line in logs)
    finally:
        engine.close()


def test_close_fails_the_waiting_requests_and_refuses_new_ones():
    gate = threading.Event()
    pipe = FakePipeline(gate=gate)
    engine = F5Engine(pipe, demo_weights=False, log=lambda msg: None)
    running, waiting = ListSink(), ListSink()
    engine.submit("a", request("a", 2), True, running)
    assert pipe.started.acquire(timeout=WAIT_S)
    engine.submit("b", request("b", 1), False, waiting)
    threading.Timer(0.2, gate.set).start()
    engine.close()
    assert "shut down" in waiting.error and "shut down" in running.error
    with pytest.raises(RuntimeError, match="shut down"):
        engine.submit("c", request("c", 1), False, ListSink())


def test_a_request_without_chunks_is_refused_at_submit_and_the_engine_serves_on():
    pipe = FakePipeline()
    engine = F5Engine(pipe, demo_weights=False, log=lambda msg: None)
    try:
        with pytest.raises(ValueError, match="without chunks"):
            engine.submit("empty", request("empty", 0), False, ListSink())
        sink = ListSink()
        engine.submit("a", request("a", 1), False, sink)
        assert sink.finished.wait(WAIT_S)
        assert len(sink.chunks) == 1 and sink.error is None
    finally:
        engine.close()


def test_idle_and_batch_callbacks():
    """on_idle runs once the engine has had no work for idle_s (at start too), once per idle spell;
    a request that follows the last one within idle_s does not wait on it."""
    idle = threading.Event()
    calls = []
    batches = []
    pipe = FakePipeline()
    engine = F5Engine(pipe, demo_weights=False, log=lambda msg: None,
                      on_idle=lambda: (calls.append(time.perf_counter()), idle.set()),
                      on_batch=lambda n, chunks, ms: batches.append((n, chunks)), idle_s=0.3)
    try:
        assert idle.wait(WAIT_S)  # idle at start
        idle.clear()
        sink = ListSink()
        engine.submit("a", request("a", 2), False, sink)
        assert sink.finished.wait(WAIT_S)
        done = time.perf_counter()
        second = ListSink()
        engine.submit("b", request("b", 1), False, second)  # right after: no idle call between them
        assert second.finished.wait(WAIT_S) and len(calls) == 1
        assert idle.wait(WAIT_S) and calls[1] - done >= 0.3  # then one, after the idle spell
        time.sleep(0.5)
        assert len(calls) == 2  # not again until work came
        assert batches == [(1, 2), (1, 1)]
    finally:
        engine.close()


@pytest.mark.parametrize("gather_s", [0.0, 0.5])
def test_next_batch_gathers_every_request_in_flight(gather_s):
    """When a batch ends, the requests in flight (its own, whose clients come back, and those that
    waited meanwhile) are gathered for the next one, up to gather_s after it ended: x runs while e
    and f wait; x's client sends x2 0.1 s after x's answer, and e, f and x2 run together. With
    gather_s = 0 each batch starts on whatever is ready."""
    gate = threading.Event()
    pipe = FakePipeline(gate=gate)
    engine = F5Engine(pipe, demo_weights=False, log=lambda msg: None, gather_s=gather_s)
    sinks = {k: ListSink() for k in ("x", "e", "f", "x2")}
    try:
        engine.submit("x", request("x", 1), False, sinks["x"])
        assert pipe.started.acquire(timeout=WAIT_S)  # x runs; e and f wait behind it
        engine.submit("e", request("e", 1), False, sinks["e"])
        engine.submit("f", request("f", 1), False, sinks["f"])
        gate.set()
        assert sinks["x"].finished.wait(WAIT_S)
        time.sleep(0.1)
        engine.submit("x2", request("x2", 1), False, sinks["x2"])
        assert all(s.finished.wait(WAIT_S) for s in sinks.values())
        expected = [["x0"], ["e0", "f0", "x20"]] if gather_s else [["x0"], ["e0", "f0"], ["x20"]]
        assert pipe.batches == expected
    finally:
        engine.close()


def test_gather_setting(monkeypatch):
    from tts.f5.engine import GATHER_ENV, GATHER_S, gather_s_from_env

    assert gather_s_from_env({}) == GATHER_S
    assert gather_s_from_env({GATHER_ENV: "0"}) == 0.0
    assert gather_s_from_env({GATHER_ENV: "12.5"}) == pytest.approx(0.0125)
    for bad in ("-1", "soon", "5000"):
        with pytest.raises(ValueError, match=GATHER_ENV):
            gather_s_from_env({GATHER_ENV: bad})


def test_queue_wait_is_reported_once_per_request():
    """A request that arrives while a batch runs waits for it: that wait (submit -> its first batch's
    start) goes to on_queued once per request and into every chunk's info as queue_ms."""
    gate = threading.Event()
    pipe = FakePipeline(gate=gate)
    waits = []
    engine = F5Engine(pipe, demo_weights=False, log=lambda msg: None, on_queued=waits.append)
    try:
        first, second = ListSink(), ListSink()
        engine.submit("a", request("a", 2), True, first)
        assert pipe.started.acquire(timeout=WAIT_S)  # a0 is running; b waits for it
        engine.submit("b", request("b", 1), False, second, received_at=time.time() - 0.05)
        time.sleep(0.2)
        gate.set()
        assert first.finished.wait(WAIT_S) and second.finished.wait(WAIT_S)
        assert len(waits) == 2  # a once, although it ran in two batches
        a_info, b_info = first.chunks[-1][2], second.chunks[-1][2]
        assert [c[2]["queue_ms"] for c in first.chunks] == [a_info["queue_ms"]] * 2
        assert waits == [pytest.approx(a_info["queue_ms"], abs=1e-3), pytest.approx(b_info["queue_ms"], abs=1e-3)]
        assert b_info["queue_ms"] >= 200 > a_info["queue_ms"]
        # wall-clock stamps: taken in, handed out; b waited for a's first batch in between
        assert b_info["engine_out_s"] - b_info["engine_in_s"] >= 0.2 + b_info["compute_ms"] / 1000 - 1e-3
        assert a_info["engine_in_s"] <= b_info["engine_in_s"] and a_info["engine_in_s"] < a_info["engine_out_s"]
        # when the server got it, if the adapter said (b: 50 ms before its submit)
        assert "engine_exec_s" not in a_info and 0.04 < b_info["engine_in_s"] - b_info["engine_exec_s"] < 0.2
    finally:
        gate.set()
        engine.close()


def test_serve_reports_no_queue_wait():
    """The execute-at-a-time order (`serve`) has no engine queue: Triton's own queue time holds it."""
    from tts.f5.engine import serve

    infos = []
    serve(FakePipeline(), [("a", request("a", 1), False)], lambda key, i, wav, info: infos.append(info), False)
    assert infos and "queue_ms" not in infos[0]


# -- the real pipeline under the engine thread ----------------------------------------------------------

@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_engine_audio_equals_each_request_alone(tmp_path, device, request):
    """Requests submitted together (streaming and offline, different lengths and seeds) through the
    engine thread: every chunk equals the same request served alone by `serve` (fp32: the DESIGN.md
    "same audio" bound; on CUDA the fast path's graphs run from the engine's thread, without TF32:
    with it, cuDNN's and cuBLAS's choices for the batch's shapes against the lone request's put the
    audio 3.3e-4 apart on an H100)."""
    if device == "cuda":
        request.getfixturevalue("no_tf32")
    from tests.conftest import speech_like
    from tts.demo_weights import DEMO_F5_NAME, write_f5
    from tts.f5.pipeline import F5Pipeline

    write_f5(tmp_path)
    d = tmp_path / DEMO_F5_NAME
    pipe = F5Pipeline(next(d.glob("*.safetensors")), d / "vocab.txt", tmp_path / "vocos-mel-24khz", DEMO_F5_NAME,
                      device=device, dtype=torch.float32)
    pipe.warmup()
    texts = ["Short one. Then a longer second sentence follows, with a clause in it.",
             "A single plain sentence.", "Two parts here. And the second of them."]
    specs = [(texts[0], True, 3), (texts[1], False, 5), (texts[2], False, 7), (texts[2], True, 9)]

    def make(text, streaming, seed):
        return pipe.make_request(speech_like(2.0, 24000, seed=seed), "The quiet harbour wakes up slowly.", text,
                                 F5Options(nfe_steps=6, seed=seed), streaming=streaming)

    alone = []
    for text, streaming, seed in specs:
        out = []
        serve(pipe, [(0, make(text, streaming, seed), streaming)], lambda k, i, wav, info: out.append(wav),
              demo_weights=True)
        alone.append(out)
    gate = threading.Event()
    real = pipe.synthesize

    batches = []

    def held(jobs):  # the first batch waits until every request is in, so the rest join together
        assert gate.wait(WAIT_S)
        batches.append(len(jobs))
        return real(jobs)

    pipe.synthesize = held
    engine = F5Engine(pipe, demo_weights=True, log=lambda msg: None)
    try:
        sinks = [ListSink() for _ in specs]
        for i, ((text, streaming, seed), sink) in enumerate(zip(specs, sinks)):
            engine.submit(i, make(text, streaming, seed), streaming, sink)
        gate.set()
        for sink, ref in zip(sinks, alone):
            assert sink.finished.wait(120) and sink.error is None
            assert [c[0] for c in sink.chunks] == list(range(len(ref)))
            for (_, wav, _), solo in zip(sink.chunks, ref):
                assert wav.shape == solo.shape and np.abs(wav - solo).max() <= 1e-4
    finally:
        gate.set()
        engine.close()
    assert len(batches) < sum(len(ref) for ref in alone)  # they did run together
