"""Offline windows of one length vocoded in one batched call on the engine's vocoder thread
(tts.spark.vocode_worker): which jobs go together, that each request's chunks keep their order,
that a failing batch falls back to one window at a time, and the engine's audio against the inline
vocoder's."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from tests.test_spark_fixtures import noise_clip, spark_dir, spark_pipeline, spark_one_thread  # noqa: F401 - fixtures
from tts.spark.request import SparkOptions, SparkRequest
from tts.spark.vocode_worker import VOCODE_BATCH_ENV, VocodeWorker, WindowJob, plan_batches

pytestmark = pytest.mark.usefixtures("spark_one_thread")


def _job(owner, n, log=None):
    return WindowJob(owner, np.zeros(32, np.int64), np.full(n, hash(owner) % 100, np.int64),
                     lambda wav, ms: log.append((owner, len(wav))) if log is not None else None)


def test_plan_keeps_each_owners_order_and_groups_equal_lengths():
    a1, b1, c1, a2, d1 = _job("a", 50), _job("b", 50), _job("c", 30), _job("a", 50), _job("d", 50)
    plain = ("b", lambda: None)  # a plain job of owner b (e.g. an empty final chunk)
    e1 = _job("b", 50)
    groups = plan_batches([a1, b1, c1, a2, plain, d1, e1])
    # a1 takes b1 and d1 (same length, owners with nothing pending between); a2 waits behind a1
    # (same owner), e1 behind b's plain job
    assert groups == [[a1, b1, d1], [c1], [a2], [plain], [e1]]
    assert plan_batches([a1, b1, d1], limit=2) == [[a1, b1], [d1]]
    assert plan_batches([plain, a1]) == [[plain], [a1]]


def _fake_vocoder(calls, fail_on=None):
    def vocode_batch(globals_, windows):
        calls.append(len(windows))
        if fail_on is not None and any(int(w[0]) == fail_on for w in windows):
            raise RuntimeError("bad window")
        return [np.full(len(w) * 2, float(w[0]), np.float32) for w in windows]
    return vocode_batch


def test_worker_batches_what_waits_and_a_failure_stays_with_its_request(monkeypatch):
    monkeypatch.delenv(VOCODE_BATCH_ENV, raising=False)
    calls, errors, done = [], [], []
    gate = threading.Event()
    worker = VocodeWorker(on_error=lambda owner, exc: errors.append((owner, str(exc))),
                          vocode_batch=_fake_vocoder(calls, fail_on=7))
    try:
        worker.submit("x", gate.wait)  # holds the worker while the windows queue up

        def job(owner, value, n=40):
            return WindowJob(owner, np.zeros(32, np.int64), np.full(n, value, np.int64),
                             lambda wav, ms: done.append((owner, float(wav[0]), len(wav))))
        for owner, value in (("a", 1), ("b", 2), ("c", 3), ("a", 4)):
            worker.submit_window(job(owner, value))
        gate.set()
        assert worker.wait_idle(10)
        assert worker.batches == [3] and calls == [3, 1]
        assert [d for d in done if d[0] == "a"] == [("a", 1.0, 80), ("a", 4.0, 80)]
        assert sorted(done) == [("a", 1.0, 80), ("a", 4.0, 80), ("b", 2.0, 80), ("c", 3.0, 80)]
        # a batch holding a bad window: one call fails, then each alone; only its request hears of it
        gate.clear()
        done.clear()
        worker.submit("x", gate.wait)
        for owner, value in (("p", 5), ("q", 7), ("r", 6)):
            worker.submit_window(job(owner, value))
        gate.set()
        assert worker.wait_idle(10)
        assert sorted(d[0] for d in done) == ["p", "r"] and errors == [("q", "bad window")]
    finally:
        gate.set()
        worker.close()


def test_batching_can_be_turned_off(monkeypatch):
    monkeypatch.setenv(VOCODE_BATCH_ENV, "0")
    worker = VocodeWorker(vocode_batch=_fake_vocoder([]))
    try:
        assert worker.batch_limit == 1 and worker.batched
    finally:
        worker.close()
    plain = VocodeWorker()
    try:
        assert not plain.batched
        with pytest.raises(RuntimeError, match="batched vocoder"):
            plain.submit_window(_job("a", 10))
    finally:
        plain.close()


def test_engine_vocodes_a_wave_of_equal_requests_together(spark_pipeline):
    """Four offline requests of the same length ending together: their windows go through the
    worker in batched calls, and every request's audio is the inline vocoder's (float rounding)."""
    from tts.spark.engine import SparkEngine

    reqs = [SparkRequest(f"Request {i}.", noise_clip(1.0 + 0.3 * i, seed=i), "Ref.",
                         options=SparkOptions(top_k=1, min_new_tokens=40, max_new_tokens=40)) for i in range(4)]
    inline = SparkEngine(spark_pipeline, max_batch_size=4, vocode_thread=False)
    try:
        want = [inline.submit(r).result(timeout=120) for r in reqs]
    finally:
        inline.close()
    engine = SparkEngine(spark_pipeline, max_batch_size=4, vocode_thread=True)
    try:
        engine.join_prefill = True
        gate = threading.Event()
        engine.vocoder.submit("hold", gate.wait)  # the four windows wait for the worker together
        handles = [engine.submit(r) for r in reqs]
        deadline = time.monotonic() + 60
        while engine.vocoder._jobs.qsize() < 4 and time.monotonic() < deadline:  # all four decoded
            time.sleep(0.01)
        gate.set()
        got = [h.result(timeout=120) for h in handles]
        assert max(engine.vocoder.batches, default=1) > 1
    finally:
        engine.close()
    for g, w in zip(got, want):
        assert g.info["tokens"] == w.info["tokens"] == 40 and len(g.wav) == len(w.wav)
        assert np.max(np.abs(g.wav - w.wav)) <= 1e-5
