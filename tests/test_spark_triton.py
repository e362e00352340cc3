"""Spark-TTS end to end through a real tritonserver (demo weights): DESIGN.md's Triton contract."""

from __future__ import annotations

import functools
import json
import queue
import re
import threading
import time
import urllib.request

import numpy as np
import pytest

from tests.conftest import speech_like
from tts.audio import SPARK_SAMPLE_RATE

REF = speech_like(3.0, SPARK_SAMPLE_RATE, seed=1)
REF_TEXT = "Some call me nature, others call me mother nature."
GREEDY = {"top_k": 1, "seed": 5}
HOP = 320  # samples per semantic token
OVERLAP = 5 * HOP  # one streaming overlap


def synth(client, text="Hello there, this is a test.", stream=False, ref=REF, ref_text=REF_TEXT, **params):
    return client.synthesize("spark", text, ref, ref_text, stream=stream, params={**GREEDY, **params})


def test_offline_and_streaming(client):
    off = synth(client, max_new_tokens=120)
    assert off.sample_rate == SPARK_SAMPLE_RATE and off.audio.size > 0 and np.isfinite(off.audio).all()
    assert off.info["demo_weights"] is True and off.info["tokens"] > 0
    assert "decode_ms" in off.info and "prefill_ms" in off.info
    st = synth(client, stream=True, max_new_tokens=120)
    assert len(st.chunk_arrivals_s) >= 2 and st.first_chunk_s < st.latency_s
    first = st.first_info  # the first chunk's own figures (ms since its request was prepared)
    assert first["chunk_index"] == 0 and st.info["chunk_index"] == len(st.chunk_arrivals_s) - 1
    assert 0 < first["prep_ms"] <= first["first_token_ms"] < first["compute_ms"] < 1000 * st.first_chunk_s
    assert 0 < first["vocode_ms"] < first["compute_ms"]
    assert off.first_info is off.info  # offline: one response
    # greedy: the same tokens, and the joined length equals offline within one overlap
    assert st.info["tokens"] == off.info["tokens"]
    assert abs(st.audio.size - off.audio.size) <= OVERLAP


def test_clone_from_audio_alone(client):
    r = synth(client, ref_text="", max_new_tokens=60)
    assert r.audio.size > 0 and r.info["mode"] == "voice_cloning"


def test_voice_creation(client):
    r = client.synthesize("spark", "Hello there.", None, "", params={
        "gender": "male", "pitch_level": "low", "speed_level": "high", "max_new_tokens": 80, "seed": 3})
    assert r.audio.size > 0 and r.info["mode"] == "voice_creation"


def _batch_sizes(server) -> list[int]:
    return [int(m.group(1)) for line in server.log_tail(2000)
            if (m := re.search(r"\[spark_llm\] running batch size (\d+)", line))]


def test_four_concurrent_requests_share_one_running_batch(client, triton_server):
    texts = ["One two three four.", "A longer sentence for the second request here.", "Third.", "And a fourth one."]
    params = {"min_new_tokens": 200, "max_new_tokens": 200}
    solo = [synth(client, t, **params) for t in texts]
    results = [None] * 4
    barrier = threading.Barrier(4)

    def run(i):
        from studio.client import StudioClient

        with StudioClient(triton_server.grpc_url) as c:
            barrier.wait()
            results[i] = synth(c, texts[i], **params)

    mark = len(_batch_sizes(triton_server))
    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(0.1)
    assert max(_batch_sizes(triton_server)[mark:], default=0) >= 4, "the four requests never decoded together"
    for got, want in zip(results, solo):
        assert got.info["tokens"] == want.info["tokens"]
        assert got.audio.shape == want.audio.shape
        assert np.abs(got.audio - want.audio).max() <= 1e-4


def test_upstream_client_http_request_shape(triton_server):
    """The KServe v2 JSON of upstream's client_http.py (zero-padded wav + its true length)."""
    padded = np.zeros((1, REF.size + 8000), np.float32)
    padded[0, : REF.size] = REF
    body = {"inputs": [
        {"name": "reference_wav", "shape": list(padded.shape), "datatype": "FP32", "data": padded.tolist()},
        {"name": "reference_wav_len", "shape": [1, 1], "datatype": "INT32", "data": [[REF.size]]},
        {"name": "reference_text", "shape": [1, 1], "datatype": "BYTES", "data": [REF_TEXT]},
        {"name": "target_text", "shape": [1, 1], "datatype": "BYTES", "data": ["Hello from HTTP."]},
    ]}
    req = urllib.request.Request(f"http://{triton_server.http_url}/v2/models/spark_tts/infer",
                                 data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        result = json.loads(resp.read())
    assert result["outputs"][0]["name"] == "waveform"
    assert len(result["outputs"][0]["data"]) > 0


def test_upstream_client_grpc_streaming_flow(triton_server):
    """Upstream client_grpc.py's flow: only `waveform` requested, stop reading at the final flag."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    try:
        wav = REF.reshape(1, -1)
        lengths = np.array([[REF.size]], dtype=np.int32)
        inputs = [grpcclient.InferInput("reference_wav", wav.shape, np_to_triton_dtype(wav.dtype)),
                  grpcclient.InferInput("reference_wav_len", lengths.shape, np_to_triton_dtype(lengths.dtype)),
                  grpcclient.InferInput("reference_text", [1, 1], "BYTES"),
                  grpcclient.InferInput("target_text", [1, 1], "BYTES")]
        inputs[0].set_data_from_numpy(wav)
        inputs[1].set_data_from_numpy(lengths)
        inputs[2].set_data_from_numpy(np.array([[REF_TEXT]], dtype=object))
        inputs[3].set_data_from_numpy(np.array([["Hello from the gRPC stream."]], dtype=object))
        client.start_stream(callback=functools.partial(lambda q, result, error: q.put(error or result), results))
        client.async_stream_infer("spark_tts_stream", inputs, request_id="42",
                                  outputs=[grpcclient.InferRequestedOutput("waveform")],
                                  enable_empty_final_response=True)
        chunks = []
        while True:
            result = results.get(timeout=300)
            assert not isinstance(result, Exception), result
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
            chunks.append(result.as_numpy("waveform").reshape(-1))
        client.stop_stream()
    finally:
        client.close()
    assert chunks and all(c.size > 0 for c in chunks)


def test_cancelled_stream_frees_its_decode_slot(client, triton_server):
    from studio.client import GenerationCancelled

    cancel = threading.Event()
    got = []

    def on_chunk(samples, info):
        got.append(info)
        cancel.set()  # cancel as soon as the first chunk arrives

    mark = len(_batch_sizes(triton_server))
    t0 = time.monotonic()
    with pytest.raises(GenerationCancelled):
        client.synthesize(
            "spark", "This request would run for a long time.", REF, REF_TEXT, stream=True,
            params={**GREEDY, "min_new_tokens": 2500, "max_new_tokens": 2500}, on_chunk=on_chunk, cancel=cancel)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        sizes = _batch_sizes(triton_server)[mark:]
        if sizes and sizes[-1] == 0:
            break
        time.sleep(0.2)
    sizes = _batch_sizes(triton_server)[mark:]
    assert got, "no chunk arrived before the cancel"
    assert 1 in sizes and sizes[-1] == 0, f"the running batch did not shrink: {sizes}"
    assert time.monotonic() - t0 < 60, "the cancelled request was decoded to the end"


BAD = [
    ("empty text", dict(text="  "), "target_text"),
    ("silent prompt", dict(ref=np.zeros(SPARK_SAMPLE_RATE, np.float32)), "silent"),
    ("short prompt", dict(ref=REF[: SPARK_SAMPLE_RATE // 4]), "0.5 s"),
    ("nan prompt", dict(ref=np.where(np.arange(REF.size) == 3, np.nan, REF).astype(np.float32)), "NaN"),
    ("temperature", dict(temperature=-1.0), "temperature"),
    ("top_p", dict(top_p=2.0), "top_p"),
]


@pytest.mark.parametrize("name,change,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_clear_message(client, name, change, needle):
    from studio.client import SynthesisError

    kwargs = dict(text="Hello there.", ref=REF)
    kwargs.update({k: v for k, v in change.items() if k in kwargs})
    params = {k: v for k, v in change.items() if k not in kwargs}
    with pytest.raises(SynthesisError) as err:
        synth(client, kwargs["text"], ref=kwargs["ref"], max_new_tokens=20, **params)
    assert needle.lower() in str(err.value).lower()
    assert synth(client, "Still alive.", max_new_tokens=20).audio.size > 0


def test_bad_voice_creation_requests(client):
    from studio.client import SynthesisError

    with pytest.raises(SynthesisError, match="(?i)pitch"):
        client.synthesize("spark", "Hi there.", None, "", params={"gender": "female", "pitch_level": "shrill"})
    with pytest.raises(SynthesisError, match="(?i)reference"):
        client.synthesize("spark", "Hi there.", REF, "", params={"gender": "female"})


def test_engine_sends_a_streams_last_chunk_with_the_final_flag(triton_server):
    """spark_llm answers a streamed request with one response per chunk, the last one carrying the
    final flag (see the F5 test of the same name)."""
    from tests.conftest import engine_stream

    seen = engine_stream(triton_server.grpc_url, "spark_llm", REF, REF_TEXT, "Hello from the engine.",
                         {"max_new_tokens": 120, "min_new_tokens": 120, "seed": 3})
    assert len(seen) >= 2 and all(audio for audio, _ in seen)
    assert [final for _, final in seen] == [False] * (len(seen) - 1) + [True]

