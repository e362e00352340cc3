"""Spark's `trtllm` runtime (tts/spark/trtllm.py) against a STAND-IN for the TensorRT-LLM model.

TensorRT-LLM cannot be installed here, so `ScriptedLLM` below stands in for Triton's `tensorrt_llm`
model: it receives the request tensors `spark_llm` would send over BLS, answers with the tokens the
torch runtime produces for the same prompt, sampling fields and seed (the demo LLM through
`tts.spark.decode.generate`), streamed a few tokens per response, and leaves out the end id it
stopped on as TensorRT-LLM does. So these tests check that the requests are right (names, types,
shapes, values), that streamed `output_ids` are assembled in order, that cancellation reaches the
server side, and that the same tokens become exactly the torch runtime's audio. They do not run
TensorRT-LLM.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.test_spark_fixtures import demo_checkpoint, noise_clip, spark_one_thread, spark_pipeline  # noqa: F401,F811 - fixtures
from tts.spark import trtllm as T
from tts.spark.decode import SamplingParams, generate
from tts.spark.request import SparkOptions, SparkRequest

pytestmark = pytest.mark.usefixtures("spark_one_thread")

#: The pinned template's declarations of every input `spark_llm` sends (TensorRT-LLM 1.1,
#: triton_backend/all_models/inflight_batcher_llm/tensorrt_llm/config.pbtxt): type, dims, optional.
TEMPLATE_INPUTS = {
    "input_ids": ("TYPE_INT32", [-1], True),
    "input_lengths": ("TYPE_INT32", [1], False),
    "request_output_len": ("TYPE_INT32", [1], False),
    "end_id": ("TYPE_INT32", [1], True),
    "pad_id": ("TYPE_INT32", [1], True),
    "stop_words_list": ("TYPE_INT32", [2, -1], True),
    "bad_words_list": ("TYPE_INT32", [2, -1], True),
    "temperature": ("TYPE_FP32", [1], True),
    "runtime_top_k": ("TYPE_INT32", [1], True),
    "runtime_top_p": ("TYPE_FP32", [1], True),
    "min_tokens": ("TYPE_INT32", [1], True),
    "seed": ("TYPE_UINT64", [1], True),
    "streaming": ("TYPE_BOOL", [1], True),
    "exclude_input_in_output": ("TYPE_BOOL", [1], True),
}
TEMPLATE_OUTPUTS = {"output_ids": ("TYPE_INT32", [-1, -1]), "sequence_length": ("TYPE_INT32", [-1])}
NP_OF = {"TYPE_INT32": np.int32, "TYPE_FP32": np.float32, "TYPE_UINT64": np.uint64, "TYPE_BOOL": np.bool_}


def words(arr: np.ndarray) -> list[int]:
    """Single-token words of a [1, 2, n] word list."""
    ids, offsets = arr[0]
    return [int(t) for t, o in zip(ids, offsets) if o > 0]


class ScriptedStream:
    def __init__(self, tokens: list[int], sizes: tuple[int, ...], delay_s: float):
        self.tokens, self.sizes, self.delay_s = tokens, sizes, delay_s
        self.cancelled = threading.Event()

    def __iter__(self):
        i, k = 0, 0
        while i < len(self.tokens):
            if self.cancelled.is_set():
                return
            time.sleep(self.delay_s)
            n = self.sizes[k % len(self.sizes)]
            yield {"output_ids": np.asarray(self.tokens[i: i + n], dtype=np.int32).reshape(1, 1, -1),
                   "sequence_length": np.array([[min(i + n, len(self.tokens))]], dtype=np.int32)}
            i, k = i + n, k + 1
        yield {}  # the empty final response of a decoupled model

    def cancel(self):
        self.cancelled.set()


class ScriptedLLM:
    """Stand-in for Triton's `tensorrt_llm` model (see the module docstring)."""

    def __init__(self, llm, sizes=(1, 3, 2), delay_s: float = 0.0, fail_after: int | None = None):
        self.llm, self.sizes, self.delay_s, self.fail_after = llm, sizes, delay_s, fail_after
        self.requests: list[dict] = []
        self.streams: list[ScriptedStream] = []

    def start(self, tensors: dict) -> ScriptedStream:
        for name, arr in tensors.items():  # what the backend would refuse
            dtype, dims, _ = TEMPLATE_INPUTS[name]
            assert arr.dtype == NP_OF[dtype], name
            assert arr.ndim == len(dims) + 1 and arr.shape[0] == 1, name
        self.requests.append(tensors)
        end = int(tensors["end_id"][0, 0])
        stops, bans = words(tensors["stop_words_list"]), words(tensors["bad_words_list"])
        top_k = int(tensors["runtime_top_k"][0, 0])
        params = SamplingParams(temperature=float(tensors["temperature"][0, 0]), top_k=top_k,
                                top_p=float(tensors["runtime_top_p"][0, 0]),
                                max_new_tokens=int(tensors["request_output_len"][0, 0]),
                                min_new_tokens=int(tensors["min_tokens"][0, 0]))
        prompt = tensors["input_ids"][0, : int(tensors["input_lengths"][0, 0])].tolist()
        seq = generate(self.llm, prompt, params, tuple([end] + stops + bans), seed=int(tensors["seed"][0, 0]))
        tokens = list(seq.generated)
        if tokens and tokens[-1] == end and seq.finish_reason == "end":
            tokens = tokens[:-1]  # TensorRT-LLM leaves the end id out of the output
        stream = ScriptedStream(tokens, self.sizes, self.delay_s)
        if self.fail_after is not None and len(self.requests) > self.fail_after:
            stream = FailingStream()
        self.streams.append(stream)
        return stream


class FailingStream:
    def __iter__(self):
        yield {"output_ids": np.array([[[5]]], dtype=np.int32)}
        raise RuntimeError("TensorRT-LLM: request failed on the server")

    def cancel(self):
        pass


@pytest.fixture(scope="module")
def trt_pipeline_factory(spark_pipeline):
    from tts.spark.pipeline import SparkPipeline

    def make(**kw):
        stand_in = ScriptedLLM(spark_pipeline.llm, **kw)
        pipe = SparkPipeline(demo_checkpoint(), device="cpu", demo_weights=True, max_batch_size=4,
                             max_seq_len=1024, llm_transport=stand_in)
        return pipe, stand_in

    return make


def test_request_tensors_follow_the_template_and_the_request(spark_pipeline):
    req = SparkRequest("Hello there.", noise_clip(1.5), "A reference.",
                       options=SparkOptions(temperature=0.7, top_k=40, top_p=0.9, max_new_tokens=3000, seed=11))
    state = spark_pipeline.prepare(req)
    seq = state.next_sequence()
    t = T.request_tensors(seq, max_seq_len=5120)
    assert set(t) == set(TEMPLATE_INPUTS) == set(T.REQUEST_INPUTS)
    for name, arr in t.items():
        dtype, dims, _ = TEMPLATE_INPUTS[name]
        assert arr.dtype == NP_OF[dtype] and arr.shape[0] == 1 and arr.ndim == len(dims) + 1, name
    assert t["input_ids"][0].tolist() == spark_pipeline.tokenizer.encode(state.prompt(0))
    assert int(t["input_lengths"][0, 0]) == len(seq.prompt_ids)
    assert int(t["request_output_len"][0, 0]) == 3000  # no 512-token cap
    assert float(t["temperature"][0, 0]) == pytest.approx(0.7) and int(t["runtime_top_k"][0, 0]) == 40
    assert float(t["runtime_top_p"][0, 0]) == pytest.approx(0.9) and int(t["seed"][0, 0]) == 11
    ends = spark_pipeline.tokenizer.end_ids
    assert int(t["end_id"][0, 0]) == ends[0] and words(t["stop_words_list"]) == list(ends[1:])
    assert words(t["bad_words_list"]) == [] and int(t["min_tokens"][0, 0]) == 0
    assert bool(t["streaming"][0, 0]) and bool(t["exclude_input_in_output"][0, 0])
    # the output is capped so prompt + output fit the engine
    short = T.request_tensors(seq, max_seq_len=len(seq.prompt_ids) + 100)
    assert int(short["request_output_len"][0, 0]) == 100
    with pytest.raises(ValueError, match="TensorRT-LLM engine holds"):
        T.request_tensors(seq, max_seq_len=len(seq.prompt_ids))


def test_fixed_tokens_ban_every_end_token(spark_pipeline):
    req = SparkRequest("Hi.", noise_clip(1.0), "Ref.", options=SparkOptions(max_new_tokens=40, min_new_tokens=40,
                                                                           seed=1))
    t = T.request_tensors(spark_pipeline.prepare(req).next_sequence(), 1024)
    ends = spark_pipeline.tokenizer.end_ids
    assert int(t["min_tokens"][0, 0]) == 40 and words(t["stop_words_list"]) == []
    assert words(t["bad_words_list"]) == list(ends[1:])


def test_greedy_maps_to_top_k_one(spark_pipeline):
    req = SparkRequest("Hi.", noise_clip(1.0), "Ref.", options=SparkOptions(temperature=0.0, top_k=50, seed=1))
    t = T.request_tensors(spark_pipeline.prepare(req).next_sequence(), 1024)
    assert int(t["runtime_top_k"][0, 0]) == 1


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("options", [dict(top_k=1, seed=0, max_new_tokens=120),
                                     dict(seed=5, max_new_tokens=120)], ids=["greedy", "sampled"])
def test_same_tokens_give_the_torch_runtimes_audio(spark_pipeline, trt_pipeline_factory, streaming, options):
    """Streamed output_ids (1, 3, 2 tokens a response) -> exactly the torch runtime's chunks and audio."""
    trt_pipe, stand_in = trt_pipeline_factory()
    req = dict(text="Same tokens, same audio.", reference_wav=noise_clip(2.0, seed=4), reference_text="Ref.",
               streaming=streaming)
    ref = spark_pipeline.synthesize(SparkRequest(**req, options=SparkOptions(**options)))
    out = trt_pipe.synthesize(SparkRequest(**req, options=SparkOptions(**options)))
    assert len(stand_in.requests) == 1
    assert out.info["tokens"] == ref.info["tokens"] and out.info["finish_reasons"] == ref.info["finish_reasons"]
    assert [len(c.wav) for c in out.chunks] == [len(c.wav) for c in ref.chunks]
    assert [c.overlap_samples for c in out.chunks] == [c.overlap_samples for c in ref.chunks]
    assert np.array_equal(out.wav, ref.wav)
    for key in ("sample_rate", "seed", "demo_weights", "compute_ms", "chunk_index", "final", "overlap_samples",
                "tokens", "prefill_ms", "decode_ms"):
        assert key in out.info


def test_fixed_length_generation_runs_to_max(trt_pipeline_factory):
    trt_pipe, stand_in = trt_pipeline_factory()
    out = trt_pipe.synthesize(SparkRequest("Fixed.", noise_clip(1.0), "Ref.",
                                           options=SparkOptions(max_new_tokens=60, min_new_tokens=60, seed=2)))
    assert out.info["tokens"] == 60 and out.info["finish_reasons"] == ["length"]


def test_cancel_reaches_the_server_and_ends_the_request(trt_pipeline_factory):
    from tts.spark.engine import SparkEngine

    trt_pipe, stand_in = trt_pipeline_factory(delay_s=0.02)
    engine = SparkEngine(trt_pipe)
    try:
        events, done = [], threading.Event()

        def on_event(ev):
            events.append(ev)
            if isinstance(ev, BaseException) or ev.final:
                done.set()

        handle = engine.submit(SparkRequest("A long streaming request to cancel.", noise_clip(1.0), "Ref.",
                                            options=SparkOptions(max_new_tokens=600, min_new_tokens=600, seed=3),
                                            streaming=True), callback=on_event)
        deadline = time.monotonic() + 60
        while not events and time.monotonic() < deadline:
            time.sleep(0.01)
        assert events, "no first chunk"
        engine.cancel(handle.request_id)
        assert done.wait(10)
        from tts.spark.engine import SparkCancelled

        assert isinstance(events[-1], SparkCancelled)
        assert stand_in.streams[0].cancelled.is_set()
        assert engine.running_batch_size == 0 or engine.scheduler.batch.free_slots == 4
    finally:
        engine.close()


def test_a_failed_stream_fails_only_its_request(trt_pipeline_factory):
    from tts.spark.engine import SparkEngine

    trt_pipe, stand_in = trt_pipeline_factory(fail_after=1)
    engine = SparkEngine(trt_pipe)
    try:
        ok = engine.submit(SparkRequest("First.", noise_clip(1.0), "Ref.",
                                        options=SparkOptions(max_new_tokens=30, min_new_tokens=30, seed=1)))
        time.sleep(0.2)
        bad = engine.submit(SparkRequest("Second.", noise_clip(1.0), "Ref.",
                                         options=SparkOptions(max_new_tokens=30, seed=1)))
        assert ok.result(timeout=60).info["tokens"] == 30
        with pytest.raises(RuntimeError, match="request failed on the server"):
            bad.result(timeout=60)
    finally:
        engine.close()


def test_stream_ending_without_tokens_is_an_end(spark_pipeline):
    """A server that stops on its end id at once (nothing streamed) ends the segment as 'end'."""

    class Empty:
        def start(self, tensors):
            return iter([{}])

    batch = T.TrtllmBatch(Empty(), 2, 1024)
    seq = spark_pipeline.prepare(SparkRequest("Hi.", noise_clip(1.0), "Ref.", options=SparkOptions(seed=1))
                                 ).next_sequence()
    tok = batch.add(seq)
    assert tok == seq.end_ids[0] and seq.finished and seq.finish_reason == "end" and seq.tokens == []
    assert batch.free_slots == 2


# -- through a real tritonserver: spark_llm -> BLS -> a stand-in named spark_trtllm -------------------

STAND_IN = Path(__file__).resolve().parent / "data" / "trtllm_stand_in" / "model.py"


@pytest.mark.slow
def test_trtllm_runtime_through_triton_with_a_stand_in_llm_model(tmp_path, monkeypatch):
    """The rendered `runtime=trtllm` repository on the real tritonserver, with `spark_trtllm`'s
    backend swapped for the Python stand-in (same name, inputs, outputs, decoupled): spark_tts and
    spark_tts_stream answer with exactly the torch runtime's audio for the same request, and the
    stand-in received the tensors the template declares."""
    import shutil

    import studio.server as S
    from studio.client import StudioClient
    from tests.conftest import speech_like
    from tts.spark.pipeline import SparkPipeline

    monkeypatch.setattr(S, "check_runtime", lambda *a, **k: None)  # no tensorrtllm backend here
    render = S.render_model_repository

    def render_with_stand_in(dest, families, **kw):
        names = render(dest, families, **kw)
        cfg = dest / "spark_trtllm" / "config.pbtxt"
        cfg.write_text(cfg.read_text().replace('backend: "tensorrtllm"', 'backend: "python"'))
        shutil.copy(STAND_IN, dest / "spark_trtllm" / "1" / "model.py")
        return names

    monkeypatch.setattr(S, "render_model_repository", render_with_stand_in)
    data, engines, log = tmp_path / "data", tmp_path / "engines", tmp_path / "requests.jsonl"
    model_dir = data / "demo-weights" / "Spark-TTS-0.5B"  # where the server writes its demo weights
    eng = engines / "spark" / "engine"
    eng.mkdir(parents=True)
    (eng / "config.json").write_text(json.dumps({
        "build_config": {"max_batch_size": 4, "max_seq_len": 1024},
        "stand_in": {"project_root": str(Path(__file__).resolve().parent.parent), "llm_dir": str(model_dir / "LLM"),
                     "log_path": str(log)}}))
    monkeypatch.setenv("STUDIO_WARM_FRONTS", "1")  # off by default: its requests reach the stand-in too
    server = S.TritonServer(data, demo_weights=True, no_download=True, instances=2, gpus=[], families=["spark"],
                            runtime="trtllm", engines_dir=engines)
    server.start(timeout_s=600)
    try:
        assert "spark_trtllm" in server.models and server.status()["runtime"] == "trtllm"
        # the start-up's front warm-up: one request per instance of spark_tts and spark_tts_stream
        warmed = len(log.read_text().splitlines())
        assert warmed == 2 * server.front_instances
        ref_wav = speech_like(2.0, 16000, seed=1)
        params = {"top_k": 1, "seed": 5, "max_new_tokens": 120}
        client = StudioClient(server.grpc_url)
        try:
            off = client.synthesize("spark", "Hello from the stand-in.", ref_wav, "A reference.", params=params)
            st = client.synthesize("spark", "Hello from the stand-in.", ref_wav, "A reference.", stream=True,
                                   params=params)
        finally:
            client.close()
        pipe = SparkPipeline(model_dir, device="cpu", demo_weights=True, max_batch_size=4, max_seq_len=1024)
        ref = pipe.synthesize(SparkRequest("Hello from the stand-in.", ref_wav, "A reference.",
                                           options=SparkOptions(top_k=1, seed=5, max_new_tokens=120)))
        assert off.info["tokens"] == ref.info["tokens"] == st.info["tokens"]
        assert off.audio.shape == ref.wav.shape and np.abs(off.audio - ref.wav).max() <= 1e-4
        sent = [json.loads(line) for line in log.read_text().splitlines()[warmed:]]
        assert len(sent) == 2
        for name, spec in sent[0].items():
            dtype, dims, _ = TEMPLATE_INPUTS[name]
            # [1]-dims inputs carry `reshape: { shape: [ ] }`: the model sees [batch] (as TensorRT-LLM's does)
            want = [1] if dims == [1] else None
            assert spec["dtype"] == np.dtype(NP_OF[dtype]).name, name
            assert spec["shape"] == want if want else len(spec["shape"]) == len(dims) + 1, name
        assert sent[0]["streaming"]["value"] == [True] and sent[0]["request_output_len"]["value"] == [120]
    finally:
        server.stop()
