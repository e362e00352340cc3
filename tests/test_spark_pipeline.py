"""Spark pipeline and engine on the demo checkpoint: tokenizer shapes, streaming, long text, batching, errors."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from tests.test_spark_fixtures import noise_clip, spark_dir, spark_pipeline, spark_one_thread  # noqa: F401 - fixtures
from tts.spark.config import GLOBAL_TOKENS, SAMPLES_PER_TOKEN
from tts.spark.request import SparkOptions, SparkRequest

pytestmark = pytest.mark.usefixtures("spark_one_thread")

GREEDY = dict(top_k=1, seed=0)


def _greedy(n: int, **kw) -> SparkOptions:
    return SparkOptions(max_new_tokens=n, **{**GREEDY, **kw})


def test_tokenize_and_detokenize_shapes(spark_pipeline):
    codec = spark_pipeline.codec
    for seconds in (0.5, 2.0, 7.0):  # shorter than, and longer than, the 6 s speaker segment
        g, s = codec.tokenize(noise_clip(seconds))
        assert g.shape == (GLOBAL_TOKENS,) and g.dtype == np.int64 and 0 <= g.min() and g.max() < 4096
        assert abs(len(s) - seconds * 50) <= 2 and 0 <= s.min() and s.max() < 8192
        wav = codec.detokenize(g, s)
        assert wav.dtype == np.float32 and wav.shape == (len(s) * SAMPLES_PER_TOKEN,)
        assert 0.01 < float(wav.std()) and float(np.abs(wav).max()) <= 1.0


def test_tokenize_is_deterministic_and_the_prompt_cache_hits(spark_pipeline):
    clip = noise_clip(2.5, seed=5)
    a = spark_pipeline.reference_tokens(clip, use_cache=False)
    b = spark_pipeline.reference_tokens(clip)
    c = spark_pipeline.reference_tokens(clip, use_cache=False)
    assert not a.cache_hit and b.cache_hit and not c.cache_hit
    assert np.array_equal(a.global_tokens, b.global_tokens) and np.array_equal(a.semantic_tokens, c.semantic_tokens)


def test_long_reference_is_clipped_with_a_note(spark_pipeline):
    ref = spark_pipeline.reference_tokens(noise_clip(31.0, seed=2), use_cache=False)
    assert ref.seconds == pytest.approx(30.0)
    assert any("clipped" in n for n in ref.notes)
    assert abs(len(ref.semantic_tokens) - 1500) <= 2


def test_offline_clone_length_is_320_samples_per_token(spark_pipeline):
    r = spark_pipeline.synthesize(SparkRequest("Hello there.", noise_clip(2.0), "A reference.", options=_greedy(60)))
    assert r.info["semantic_tokens"] == 60 and len(r.wav) == 60 * SAMPLES_PER_TOKEN
    assert r.info["final"] and r.info["demo_weights"] and r.info["seed"] == 0
    for key in ("sample_rate", "compute_ms", "chunk_index", "overlap_samples", "tokens", "prefill_ms", "decode_ms"):
        assert key in r.info


def test_streaming_chunks_join_to_the_offline_length(spark_pipeline):
    from tts.audio import join_chunks

    n = 500
    req = dict(text="Streaming test sentence.", reference_wav=noise_clip(2.0, seed=3), reference_text="Ref.")
    offline = spark_pipeline.synthesize(SparkRequest(**req, options=_greedy(n)))
    chunks = list(spark_pipeline.stream(SparkRequest(**req, options=_greedy(n), streaming=True)))
    # upstream's plan: 50 tokens, then 50 * 8 = 400 (5 of them overlapping), then the rest
    sizes = [len(c.wav) // SAMPLES_PER_TOKEN for c in chunks]
    assert sizes == [50, 400, n - 440]  # tokens 0-49, 45-444, 440-499
    assert [c.overlap_samples for c in chunks] == [0, 5 * SAMPLES_PER_TOKEN, 5 * SAMPLES_PER_TOKEN]
    assert [c.final for c in chunks] == [False, False, True] and [c.index for c in chunks] == [0, 1, 2]
    joined = join_chunks([c.wav for c in chunks], [c.overlap_samples for c in chunks])
    assert abs(len(joined) - len(offline.wav)) <= 5 * SAMPLES_PER_TOKEN
    assert len(joined) == n * SAMPLES_PER_TOKEN == len(offline.wav)
    # the first chunk is the first second of the same tokens (vocoded on its own)
    assert chunks[0].info["tokens"] >= 50 and chunks[-1].info["tokens"] == n


def test_clone_without_transcript_uses_the_short_prompt(spark_pipeline):
    state = spark_pipeline.prepare(SparkRequest("Hi.", noise_clip(1.0), "", options=_greedy(5)))
    prompt = state.prompt(0)
    assert prompt.endswith("<|end_global_token|>") and "bicodec_semantic" not in prompt
    with_text = spark_pipeline.prepare(SparkRequest("Hi.", noise_clip(1.0), "Ref.", options=_greedy(5)))
    assert with_text.prompt(0).count("bicodec_semantic") == len(with_text.reference.semantic_tokens)


def test_long_text_is_generated_in_segments_with_one_voice(spark_pipeline):
    text = " ".join(f"This is sentence number {i} of a long text that goes on." for i in range(12))
    r = spark_pipeline.synthesize(SparkRequest(text, noise_clip(1.5), "Ref.", options=_greedy(20)))
    segments = r.info["segments"]
    assert segments >= 2 and r.info["semantic_tokens"] == 20 * segments
    assert len(r.wav) == 20 * segments * SAMPLES_PER_TOKEN
    state = spark_pipeline.prepare(SparkRequest(text, noise_clip(1.5), "Ref.", options=_greedy(20)))
    globals_part = [p[p.index("<|start_global_token|>"):p.index("<|end_global_token|>")]
                    for p in (state.prompt(i) for i in range(len(state.segments)))]
    assert len(set(globals_part)) == 1
    assert "".join(state.segments).replace(" ", "") == text.replace(" ", "")


def test_voice_creation_runs(spark_pipeline):
    req = SparkRequest("Create a voice.", gender="female", pitch_level="high", speed_level="low", options=_greedy(40))
    state = spark_pipeline.prepare(req)
    assert state.prompt(0).startswith("<|task_controllable_tts|>")
    r = spark_pipeline.synthesize(req)
    assert r.info["mode"] == "voice_creation" and len(r.wav) == r.info["semantic_tokens"] * SAMPLES_PER_TOKEN


@pytest.mark.parametrize("kwargs, match", [
    (dict(text="  "), "target_text"),
    (dict(options=SparkOptions(temperature=-1)), "temperature"),
    (dict(options=SparkOptions(top_p=0.0)), "top_p"),
    (dict(options=SparkOptions(min_new_tokens=10, max_new_tokens=5)), "min_new_tokens"),
    (dict(reference_wav=None), "reference clip"),
    (dict(gender="male"), "takes no reference"),
])
def test_bad_requests_are_refused_with_a_message(spark_pipeline, kwargs, match):
    base = dict(text="Hello.", reference_wav=noise_clip(1.0), reference_text="")
    with pytest.raises(ValueError, match=match):
        spark_pipeline.prepare(SparkRequest(**{**base, **kwargs}))


def test_bad_reference_audio_is_refused(spark_pipeline):
    with pytest.raises(ValueError, match="at least"):
        spark_pipeline.prepare(SparkRequest("Hi.", np.zeros(100, np.float32)))
    with pytest.raises(ValueError, match="NaN"):
        spark_pipeline.prepare(SparkRequest("Hi.", np.full(16000, np.nan, np.float32)))
    with pytest.raises(ValueError, match="mono"):
        spark_pipeline.prepare(SparkRequest("Hi.", np.zeros((2, 16000), np.float32)))


def test_engine_batches_requests_and_matches_solo_audio(spark_pipeline):
    from tts.spark.engine import SparkEngine

    reqs = [SparkRequest(f"Request number {i}.", noise_clip(1.0 + i * 0.5, seed=i), "Ref." if i % 2 else "",
                         options=_greedy(40 + 25 * i), streaming=bool(i % 2)) for i in range(4)]
    solo = [spark_pipeline.synthesize(r) for r in reqs]
    engine = SparkEngine(spark_pipeline, max_batch_size=3)
    seen = []
    try:
        sampler = threading.Event()

        def watch():
            while not sampler.is_set():
                seen.append(engine.running_batch_size)
                sampler.wait(0.002)

        t = threading.Thread(target=watch)
        t.start()
        handles = [engine.submit(r) for r in reqs]
        results = [h.result(timeout=120) for h in handles]
        sampler.set()
        t.join()
    finally:
        engine.close()
    assert max(seen) >= 2  # requests really ran together (at most 3 slots)
    for got, ref in zip(results, solo):
        assert got.info["tokens"] == ref.info["tokens"]
        assert len(got.wav) == len(ref.wav)
        assert np.max(np.abs(got.wav - ref.wav)) <= 1e-4


def test_engine_idle_callback_waits_for_a_quiet_spell(spark_pipeline):
    """on_idle (the adapter's malloc_trim) runs once no request has been in flight for idle_s, once
    per quiet spell: never between two requests that follow each other closely."""
    import time

    from tts.spark.engine import SparkEngine

    calls = []
    engine = SparkEngine(spark_pipeline, max_batch_size=2, on_idle=lambda: calls.append(time.perf_counter()),
                         idle_s=0.4)
    try:
        time.sleep(0.7)
        assert len(calls) == 1  # quiet since start
        for i in range(2):  # back to back
            engine.submit(SparkRequest(f"Request {i}.", noise_clip(1.0, seed=i), options=_greedy(12))).result(timeout=120)
        done = time.perf_counter()
        assert len(calls) == 1
        time.sleep(0.9)
        assert len(calls) == 2 and calls[1] - done >= 0.4
    finally:
        engine.close()


def test_engine_cancel_and_callbacks(spark_pipeline):
    from tts.spark.engine import SparkCancelled, SparkEngine

    engine = SparkEngine(spark_pipeline, max_batch_size=2)
    try:
        events = []
        done = threading.Event()

        def callback(ev):
            events.append(ev)
            if isinstance(ev, BaseException) or ev.final:
                done.set()

        long_req = SparkRequest("A long one.", noise_clip(1.0), options=_greedy(900), streaming=True,
                                request_id="long-1")
        handle = engine.submit(long_req, callback=callback)
        with pytest.raises(ValueError, match="already running"):
            engine.submit(SparkRequest("dup", noise_clip(1.0), request_id="long-1"))
        for _ in range(2000):  # wait for the first chunk (50 tokens), then cancel mid-generation
            if events:
                break
            threading.Event().wait(0.01)
        assert events and engine.cancel("long-1")
        assert done.wait(60)
        assert isinstance(events[-1], SparkCancelled) and handle.cancelled
        assert not engine.cancel("long-1")  # already gone
        # the engine goes on serving
        r = engine.submit(SparkRequest("After.", noise_clip(1.0), options=_greedy(10))).result(timeout=60)
        assert len(r.wav) == 10 * SAMPLES_PER_TOKEN
        with pytest.raises(ValueError, match="temperature"):
            engine.submit(SparkRequest("x", noise_clip(1.0), options=SparkOptions(temperature=99)))
        # a request whose reference is unusable fails alone, with the message
        with pytest.raises(ValueError, match="at least"):
            engine.submit(SparkRequest("x", np.zeros(10, np.float32))).result(timeout=60)
    finally:
        engine.close()


def test_several_tokens_per_replay_give_the_same_audio_chunks_and_segments(spark_pipeline, monkeypatch):
    """The scheduler gets several tokens per sequence from one fast step (the GPU default): the
    same chunks, segment chaining (a segment that ends in mid-replay starts the next) and audio
    as one token per step. On the CPU through the fused step without graphs."""
    from tts.spark.decode import DecodeBatch

    text = " ".join(f"This is sentence number {i} of a long text that goes on." for i in range(8))
    sampled = SparkOptions(max_new_tokens=23, temperature=1.0, top_k=50, top_p=0.9, seed=5)
    requests = [dict(text=text, reference_wav=noise_clip(1.5), reference_text="Ref.", options=sampled),
                dict(text="Streaming test sentence.", reference_wav=noise_clip(2.0, seed=3), reference_text="Ref.",
                     options=_greedy(130), streaming=True)]

    def outputs() -> list[list[tuple[int, bool, bytes]]]:
        return [[(c.overlap_samples, c.final, c.wav.tobytes()) for c in spark_pipeline.stream(SparkRequest(**r))]
                for r in requests]

    one = outputs()
    monkeypatch.setattr(spark_pipeline, "new_batch", lambda max_batch, max_seq_len: DecodeBatch(
        spark_pipeline.llm, max_batch, max_seq_len, cuda_graphs=False, fused=True, tokens_per_replay=3))
    monkeypatch.setattr(spark_pipeline, "_solo_batch", None)  # stream() keeps its batch: a new one, restored after
    several = outputs()
    assert spark_pipeline._solo_batch.tokens_per_replay == 3
    # the streamed request's first chunk came out of single-step replays (ALIGN_ENV, on by default)
    assert spark_pipeline._solo_batch.short_replays > 0
    assert [len(o) for o in several] == [len(o) for o in one] and len(one[1]) >= 2
    assert several == one


def test_vocoding_runs_beside_decoding_and_its_failure_stays_with_its_request(spark_pipeline, monkeypatch):
    """The engine's vocoder thread: while an offline request's (slowed) window is being vocoded the
    decode loop keeps stepping for the other request; the audio equals the inline vocoder's; a
    streamed request's chunks are vocoded inline on the decode thread all the same (on a GPU the
    worker's jobs ran only once decoding paused: first chunks came at the end); a window whose
    vocoding fails fails only its own request, which leaves the batch, and the engine goes on."""
    import threading
    import time

    from tts.spark.engine import SparkEngine

    real = spark_pipeline.vocode
    state = {"slow": 0.0, "fail": False, "steps_during": [], "threads": []}
    engine = None

    def vocode(global_tokens, window):
        if state["fail"]:
            raise RuntimeError("vocoder out of memory")
        state["threads"].append(threading.current_thread().name)
        before = engine.steps if engine else 0
        time.sleep(state["slow"])
        state["steps_during"].append((engine.steps if engine else 0) - before)
        return real(global_tokens, window)

    offline = [SparkRequest("Short one.", noise_clip(1.5, seed=2), "Ref.", options=_greedy(30)),
               SparkRequest("A longer offline request.", noise_clip(1.2, seed=4), "Ref.", options=_greedy(220))]
    streaming = SparkRequest("A streaming request.", noise_clip(1.5, seed=2), "Ref.", options=_greedy(160),
                             streaming=True)
    inline = SparkEngine(spark_pipeline, max_batch_size=2, vocode_thread=False)
    try:
        assert inline.vocoder is None
        ref = [inline.submit(r).result(timeout=120) for r in offline + [streaming]]
    finally:
        inline.close()
    monkeypatch.setattr(spark_pipeline, "vocode", vocode)
    engine = SparkEngine(spark_pipeline, max_batch_size=2, vocode_thread=True)
    try:
        assert engine.vocoder is not None
        state["slow"] = 0.3
        got = [h.result(timeout=120) for h in [engine.submit(r) for r in offline]]
        for g, r in zip(got, ref):
            assert g.wav.tobytes() == r.wav.tobytes()
        assert max(state["steps_during"]) > 0  # decoding went on during a vocoder call
        assert all(name.endswith("-vocode") for name in state["threads"])
        state.update(slow=0.0, threads=[])
        streamed = engine.submit(streaming).result(timeout=120)
        assert [c.index for c in streamed.chunks] == list(range(len(ref[2].chunks))) and streamed.chunks[-1].final
        assert [c.wav.tobytes() for c in streamed.chunks] == [c.wav.tobytes() for c in ref[2].chunks]
        assert state["threads"] and all(name.endswith("-decode") for name in state["threads"])
        state["fail"] = True
        with pytest.raises(RuntimeError, match="out of memory"):
            engine.submit(SparkRequest("Fails.", noise_clip(1.0), options=_greedy(80))).result(timeout=60)
        for _ in range(500):
            if engine.running_batch_size == 0 and not engine.scheduler.busy:
                break
            time.sleep(0.01)
        assert not engine.scheduler.busy  # the failed request left the batch
        state["fail"] = False
        after = engine.submit(SparkRequest("After.", noise_clip(1.0), options=_greedy(10))).result(timeout=60)
        assert len(after.wav) == 10 * SAMPLES_PER_TOKEN
    finally:
        engine.close()


def test_requests_admitted_together_share_one_prefill_and_fail_alone(spark_pipeline):
    """Scheduler.admit_many: joining requests are prefilled in one packed forward and give their
    solo audio; when one of them cannot start (its prompt exceeds the cache), the others still
    start (one at a time) and it alone fails, with the reason."""
    from tts.spark.scheduler import Scheduler

    good = [SparkRequest(f"Request number {i}.", noise_clip(1.0, seed=i), "Ref.", options=_greedy(20 + 7 * i))
            for i in range(3)]
    solo = [spark_pipeline.synthesize(r) for r in good]

    def run(requests):
        chunks, errors = {}, {}
        sched = Scheduler(spark_pipeline, 4, 220, lambda st, c: chunks.setdefault(st.request_id, []).append(c),
                          lambda st, e: errors.__setitem__(st.request_id, e))
        calls = []
        real = sched.batch.add_many
        sched.batch.add_many = lambda seqs: calls.append(len(seqs)) or real(seqs)
        sched.admit_many([spark_pipeline.prepare(r, f"r{i}") for i, r in enumerate(requests)])
        while sched.busy:
            sched.step()
        return chunks, errors, calls

    chunks, errors, calls = run(good)
    assert calls == [3] and not errors
    for i, ref in enumerate(solo):
        wav = np.concatenate([c.wav for c in chunks[f"r{i}"]])
        assert chunks[f"r{i}"][-1].final and len(wav) == len(ref.wav)
        assert np.max(np.abs(wav - ref.wav)) <= 1e-4
    bad = SparkRequest("Too long a reference.", noise_clip(5.0, seed=7), "Ref.", options=_greedy(10))
    chunks, errors, calls = run([good[0], bad, good[1]])
    assert calls == [3] and list(errors) == ["r1"] and "KV cache holds 220" in str(errors["r1"])
    assert sorted(chunks) == ["r0", "r2"] and all(c[-1].final for c in chunks.values())


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_engine_on_cuda_vocoder_thread_and_joint_prefill_give_the_inline_audio(spark_dir):
    """On CUDA (fast decode step, fp32): requests submitted together, prefilled jointly and vocoded on
    the worker's own stream, give the tokens and audio of the engine with both off."""
    import torch

    from tts.spark.engine import SparkEngine
    from tts.spark.pipeline import SparkPipeline

    pipe = SparkPipeline(spark_dir, device="cuda", dtype=torch.float32, demo_weights=True, max_batch_size=4,
                         max_seq_len=1024)
    reqs = [SparkRequest(f"Request number {i}.", noise_clip(1.0 + 0.5 * i, seed=i), "Ref.", options=_greedy(60 + 20 * i),
                         streaming=bool(i % 2)) for i in range(4)]
    results = []
    for worker, joint in ((False, False), (True, True)):
        engine = SparkEngine(pipe, max_batch_size=4, vocode_thread=worker)
        engine.join_prefill = joint
        try:
            handles = [engine.submit(r) for r in reqs]
            results.append([h.result(timeout=300) for h in handles])
        finally:
            engine.close()
    for a, b in zip(*results):
        assert a.info["tokens"] == b.info["tokens"] and len(a.wav) == len(b.wav)
        assert np.max(np.abs(a.wav - b.wav)) <= 1e-4


def test_vocoder_graphs_only_on_cuda(spark_pipeline):
    """On the CPU no window is captured (the first streamed window's graph is a CUDA path)."""
    from tts.spark.vocode_graphs import WindowGraphs

    assert spark_pipeline.codec.window_graphs is None and spark_pipeline.vocode_capture_s is None
    with pytest.raises(ValueError, match="CUDA"):
        WindowGraphs(spark_pipeline.codec.bicodec, spark_pipeline.device, (50,))


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_first_window_from_its_graph_equals_the_eager_vocoder_on_cuda(spark_dir, monkeypatch):
    """The pipeline captures the first streamed window (50 tokens); its graph gives the eager
    detokenize's audio (fp32) for any tokens, from two threads at once; other lengths go eager;
    STUDIO_SPARK_VOCODE_GRAPHS=0 captures nothing."""
    import torch

    from tts.spark.pipeline import SparkPipeline
    from tts.spark.vocode_graphs import VOCODE_GRAPHS_ENV

    pipe = SparkPipeline(spark_dir, device="cuda", dtype=torch.float32, demo_weights=True, max_batch_size=2,
                         max_seq_len=512)
    codec = pipe.codec
    assert set(codec.window_graphs.graphs) == {50} and pipe.vocode_capture_s > 0
    rng = np.random.default_rng(0)
    cases = [(rng.integers(0, 4096, GLOBAL_TOKENS), rng.integers(0, 8192, n)) for n in (50, 50, 37, 50)]
    graphs = codec.window_graphs
    got = [codec.detokenize(g, s) for g, s in cases]
    codec.window_graphs = None
    want = [codec.detokenize(g, s) for g, s in cases]
    codec.window_graphs = graphs
    for a, b in zip(got, want):
        assert a.shape == b.shape and np.max(np.abs(a - b)) <= 1e-5
    outs: dict[int, np.ndarray] = {}
    threads = [threading.Thread(target=lambda i=i: outs.__setitem__(i, codec.detokenize(*cases[i]))) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert np.max(np.abs(outs[0] - want[0])) <= 1e-5 and np.max(np.abs(outs[1] - want[1])) <= 1e-5
    monkeypatch.setenv(VOCODE_GRAPHS_ENV, "0")
    off = SparkPipeline(spark_dir, device="cuda", dtype=torch.float32, demo_weights=True, max_batch_size=2,
                        max_seq_len=512)
    assert off.codec.window_graphs is None and off.vocode_capture_s is None
