"""The OpenAI-compatible API (studio/api.py) and the page's gradio_client API, against a real `python app.py`.

One app (demo weights, an API key, two generations at once) serves the module: the official `openai`
package and `gradio_client` talk to it over loopback. A few fast tests run the API in-process over
the fake runtime of test_ui.py (auth off, the shared slots' 429). F5 runs with nfe_steps=2 and Spark
with few tokens: the audio is noise, the lengths, rates, framing and figures are what is checked.
"""

from __future__ import annotations

import base64
import io
import json
import math
import time

import numpy as np
import pytest

from tests.app_process import base_env, free_port, start_app, stop_app
from tests.conftest import SAMPLES

openai = pytest.importorskip("openai")
av = pytest.importorskip("av")

API_KEY = "test-key-123"
PROMPT = SAMPLES / "voices" / "en_male.wav"
PROMPT_TEXT = (SAMPLES / "voices" / "en_male.txt").read_text().strip()
SHORT = "Hello there, friend."
#: Three sentences: F5 streams a short first clause, then the rest, so there are several chunks.
LONG = ("Hello there, my friend. The harbour was quiet this morning, and the boats rested. "
        "We walked along the water until the sun came up over the hills.")
F5 = {"nfe_steps": 2}
#: For the streaming-time test: enough ODE steps that the chunks after the first take measurable time
#: (at 2 steps the whole generation took 0.13 s on a quiet machine, at 16 the second chunk 0.24 s).
F5_SLOWER = {"nfe_steps": 64}
SPARK = {"max_new_tokens": 60}
#: mp3 and aac add the codec's priming and frame padding; opus, flac, wav and pcm are exact.
LOSSY_PADDING_S = 0.1
EXPECTED_RATE = {"mp3": 24000, "aac": 24000, "flac": 24000, "wav": 24000, "pcm": 24000, "opus": 48000}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    data = tmp_path_factory.mktemp("api-app")
    port = free_port()
    args = ["--demo-weights", "--no-download", "--data-dir", str(data / "data"), "--port", str(port),
            "--http-port", str(free_port()), "--grpc-port", str(free_port()), "--instances", "2",
            "--api-key", API_KEY, "--no-asr"]  # the objective-check models are not used here: a faster start
    running = start_app(args, base_env(STUDIO_CONCURRENCY=2), data / "app.log", port, api_key=API_KEY)
    running.data_dir = data / "data"
    yield running
    stop_app(running)


@pytest.fixture()
def client(app):
    return openai.OpenAI(base_url=app.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def decode(data: bytes, fmt: str) -> tuple[np.ndarray, int]:
    """Samples (mono float) and the rate a decoder reports; raw pcm is 24 kHz s16le by definition."""
    if fmt == "pcm":
        return np.frombuffer(data, "<i2").astype(np.float32) / 32768, 24000
    container = av.open(io.BytesIO(data))
    frames = [f for f in container.decode(audio=0)]
    rate = frames[0].sample_rate
    return np.concatenate([f.to_ndarray().reshape(-1) for f in frames]), rate


def header_figures(headers) -> dict:
    return {k: headers[f"x-studio-{k}"] for k in ("latency-s", "first-chunk-s", "audio-s", "rtf", "demo-weights",
                                                   "audio-samples", "model-sample-rate", "sample-rate")}


def expected_samples(samples: int, model_rate: int, out_rate: int) -> int:
    """What an exact format holds: the generated samples, at the output rate (pcm is resampled up)."""
    return math.ceil(samples * out_rate / model_rate)


def error_of(exc) -> dict:
    body = exc.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# --- formats ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac", "wav", "pcm"])
def test_every_format_decodes_to_the_expected_rate_and_length(client, fmt):
    resp = client.audio.speech.create(model="f5-tts", voice="alloy", input=SHORT, response_format=fmt, extra_body=F5)
    figures = header_figures(resp.response.headers)
    samples, rate = decode(resp.content, fmt)
    assert rate == EXPECTED_RATE[fmt] == int(figures["sample-rate"])
    assert figures["demo-weights"] == "true" and float(figures["latency-s"]) > 0 and float(figures["rtf"]) > 0
    model_rate, generated = int(figures["model-sample-rate"]), int(figures["audio-samples"])
    assert model_rate == 24000 and abs(generated / model_rate - float(figures["audio-s"])) < 1e-5
    if fmt in ("mp3", "aac"):
        assert 0 <= samples.size / rate - generated / model_rate <= LOSSY_PADDING_S
    elif fmt == "opus":  # Ogg's pre-skip and end trimming: the length survives, at 48 kHz
        assert abs(samples.size / rate - generated / model_rate) <= 1 / model_rate
    else:
        assert samples.size == expected_samples(generated, model_rate, rate)
    assert resp.response.headers["content-type"].startswith({"mp3": "audio/mpeg", "opus": "audio/ogg",
                                                             "aac": "audio/aac", "flac": "audio/flac",
                                                             "wav": "audio/wav", "pcm": "audio/pcm"}[fmt])


@pytest.mark.parametrize("fmt", ["wav", "pcm", "mp3"])
def test_spark_formats_keep_its_rate_except_pcm(client, fmt):
    resp = client.audio.speech.create(model="spark-tts", voice="en_male", input=SHORT, response_format=fmt,
                                      extra_body=SPARK)
    figures = header_figures(resp.response.headers)
    samples, rate = decode(resp.content, fmt)
    generated = int(figures["audio-samples"])
    assert int(figures["model-sample-rate"]) == 16000 and rate == (24000 if fmt == "pcm" else 16000)
    if fmt == "mp3":
        assert 0 <= samples.size / rate - generated / 16000 <= LOSSY_PADDING_S
    else:
        assert samples.size == expected_samples(generated, 16000, rate)  # pcm: 16 kHz resampled to 24 kHz


# --- streaming ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["mp3", "pcm", "opus", "wav"])
def test_audio_stream_starts_before_generation_ends(app, client, fmt):
    import httpx

    sent = time.perf_counter()
    arrivals, data = [], b""
    with client.audio.speech.with_streaming_response.create(model="f5-tts", voice="alloy", input=LONG,
                                                            response_format=fmt, stream_format="audio",
                                                            extra_body=F5_SLOWER) as resp:
        request_id = resp.headers["x-request-id"]
        assert resp.headers["x-studio-demo-weights"] == "true"
        for block in resp.iter_bytes():
            arrivals.append(time.perf_counter() - sent)
            data += block
    ended = time.perf_counter() - sent
    rec = httpx.get(f"{app.url}/v1/studio/requests/{request_id}", headers={"Authorization": f"Bearer {API_KEY}"},
                    timeout=30).json()
    m = rec["metrics"]
    assert rec["status"] == "ok" and m["chunks"] >= 2 and m["first_chunk_s"] < m["latency_s"]
    # Generation went on for a while after its first chunk; the first bytes came during that time:
    # the stream was open for at least half of the studio's first-to-last chunk interval after them.
    still_generating = m["latency_s"] - m["first_chunk_s"]
    assert still_generating > 0.3, m
    assert ended - arrivals[0] >= 0.5 * still_generating, (arrivals[:3], ended, m)
    samples, rate = decode(data, fmt)
    assert rate == EXPECTED_RATE[fmt]
    generated_s = m["audio_s"]
    if fmt == "mp3":
        assert 0 <= samples.size / rate - generated_s <= LOSSY_PADDING_S
    else:
        assert abs(samples.size / rate - generated_s) <= 1.5 / 24000


def test_sse_events_parse_and_carry_the_figures(client):
    deltas, done = [], None
    with client.audio.speech.with_streaming_response.create(
            model="spark-tts", voice="create", input=SHORT, response_format="pcm", stream_format="sse",
            instructions="A deep male voice, speaking very fast.", extra_body=SPARK) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert "gender=male" in resp.headers["x-studio-notes"]
        for line in resp.iter_lines():
            if not line:
                continue
            assert line.startswith("data: ")
            event = json.loads(line[len("data: "):])
            if event["type"] == "speech.audio.delta":
                deltas.append(base64.b64decode(event["audio"]))
            else:
                assert event["type"] == "speech.audio.done" and done is None
                done = event
    assert deltas and done is not None
    pcm = b"".join(deltas)
    assert len(pcm) // 2 == expected_samples(done["audio_samples"], done["sample_rate"], 24000)
    assert done["sample_rate"] == 16000 and done["output_sample_rate"] == 24000
    for key in ("latency_s", "first_chunk_s", "audio_s", "rtf"):
        assert isinstance(done[key], float) and done[key] > 0
    assert done["demo_weights"] is True and 0 < done["usage"]["output_tokens"] <= SPARK["max_new_tokens"]
    assert "speed_level=very_high" in " ".join(done["notes"]) and "pitch_level=low" in " ".join(done["notes"])


def test_sse_of_f5_mp3_decodes(client):
    data = b""
    with client.audio.speech.with_streaming_response.create(model="tts-1", voice="nova", input=SHORT,
                                                            stream_format="sse", extra_body=F5) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if event["type"] == "speech.audio.delta":
                    data += base64.b64decode(event["audio"])
                else:
                    done = event
    samples, rate = decode(data, "mp3")
    assert rate == 24000 and done["model"] == "f5-tts"
    assert 0 <= samples.size / rate - done["audio_s"] <= LOSSY_PADDING_S


# --- cloning options ----------------------------------------------------------------------------------------
def test_ref_audio_as_data_url_clones_without_a_saved_voice(client):
    clip = base64.b64encode(PROMPT.read_bytes()).decode()
    for ref in (clip, "data:audio/wav;base64," + clip):
        resp = client.audio.speech.create(model="f5-tts", voice="alloy", input=SHORT, response_format="wav",
                                          extra_body={**F5, "ref_audio": ref, "ref_text": PROMPT_TEXT, "seed": 7})
        assert resp.response.headers["x-studio-seed"] == "7"
        assert "voice 'alloy' ignored" in resp.response.headers["x-studio-notes"]


def test_speed_and_instructions_are_handled_and_said(client):
    resp = client.audio.speech.create(model="f5-tts", voice="alloy", input=SHORT, speed=4.0, response_format="wav",
                                      instructions="Cheerful.", extra_body=F5)
    notes = resp.response.headers["x-studio-notes"]
    assert "outside F5-TTS's 0.3-3.0; 3 was used" in notes and "instructions are not supported" in notes
    resp = client.audio.speech.create(model="spark-tts", voice="alloy", input=SHORT, speed=2.0, response_format="wav",
                                      extra_body=SPARK)
    assert "Spark-TTS cloning has no speed control" in resp.response.headers["x-studio-notes"]
    resp = client.audio.speech.create(model="spark-tts", voice="create", input=SHORT, speed=0.5,
                                      response_format="wav", extra_body={**SPARK, "gender": "female"})
    assert "speed_level=very_low" in resp.response.headers["x-studio-notes"]


# --- voices --------------------------------------------------------------------------------------------------
def test_voice_upload_list_use_delete_round_trip(app, client):
    import httpx

    auth = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=app.url + "/v1", headers=auth, timeout=60) as http:
        made = http.post("/audio/voices", data={"name": "Test Voice", "transcript": PROMPT_TEXT},
                         files={"audio": ("clip.wav", PROMPT.read_bytes(), "audio/wav")})
        assert made.status_code == 201 and made.json()["id"] == "Test Voice" and made.json()["kind"] == "saved"
        again = http.post("/audio/voices", data={"name": "Test Voice", "transcript": "x"},
                          files={"audio": ("clip.wav", PROMPT.read_bytes(), "audio/wav")})
        assert again.status_code == 409 and again.json()["error"]["code"] == "voice_exists"
        broken = http.post("/audio/voices", data={"name": "Broken"},
                           files={"audio": ("clip.wav", b"not audio at all", "audio/wav")})
        assert broken.status_code == 400 and broken.json()["error"]["param"] == "audio"
        listed = {v["id"]: v for v in http.get("/audio/voices").json()["data"]}
        assert listed["Test Voice"]["transcript"] == PROMPT_TEXT and listed["en_female"]["kind"] == "sample"
        assert listed["alloy"]["maps_to"] == "en_female" and listed["create"]["kind"] == "voice_creation"

        resp = client.audio.speech.create(model="f5-tts", voice="Test Voice", input=SHORT, response_format="wav",
                                          extra_body=F5)
        assert int(resp.response.headers["x-studio-audio-samples"]) > 0

        assert http.delete("/audio/voices/Test Voice").json() == {"id": "Test Voice", "object": "audio.voice.deleted",
                                                                  "deleted": True}
        assert "Test Voice" not in {v["id"] for v in http.get("/audio/voices").json()["data"]}
        gone = http.delete("/audio/voices/Test Voice")
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "voice_not_found"
        sample = http.delete("/audio/voices/en_female")
        assert sample.status_code == 403 and sample.json()["error"]["code"] == "voice_read_only"
    from studio.voices import VoiceLibrary

    assert "Test Voice" not in {v.name for v in VoiceLibrary(app.data_dir).list()}  # the page's library


def test_models_list(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[:2] == ["f5-tts", "spark-tts"] and "tts-1" in ids and "gpt-4o-mini-tts" in ids
    assert client.models.retrieve("tts-1-hd").model_dump()["maps_to"] == "f5-tts"


# --- errors ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, status, param, code", [
    (dict(model="tts-9", voice="alloy", input=SHORT), 404, "model", "model_not_found"),
    (dict(model="f5-tts", voice="nobody", input=SHORT), 400, "voice", "voice_not_found"),
    (dict(model="f5-tts", voice="alloy", input="x" * 4097), 400, "input", "string_above_max_length"),
    (dict(model="f5-tts", voice="alloy", input=SHORT, extra_body={"ref_audio": "%%%", "ref_text": "a"}),
     400, "ref_audio", "invalid_audio"),
    (dict(model="f5-tts", voice="alloy", input=SHORT,
          extra_body={"ref_audio": base64.b64encode(b"RIFF but not a wave file").decode(), "ref_text": "a"}),
     400, "ref_audio", "invalid_audio"),
    (dict(model="f5-tts", voice="alloy", input=SHORT, extra_body={"ref_audio": base64.b64encode(
        PROMPT.read_bytes()).decode()}), 400, "ref_text", "missing_required_parameter"),  # --no-asr: no fill
    (dict(model="f5-tts", voice="alloy", input=SHORT, extra_body={"nfe_steps": 500}), 400, "nfe_steps",
     "invalid_value"),
    (dict(model="f5-tts", voice="alloy", input=SHORT, extra_body={"temperature": 0.5}), 400, "temperature",
     "invalid_value"),
    (dict(model="f5-tts", voice="alloy", input=SHORT, response_format="ogg"), 400, "response_format",
     "invalid_value"),
    (dict(model="spark-tts", voice="create", input=SHORT), 400, "gender", "missing_required_parameter"),
])
def test_bad_requests_get_openai_shaped_errors(client, kwargs, status, param, code):
    with pytest.raises(openai.APIStatusError) as info:
        client.audio.speech.create(**kwargs)
    assert info.value.status_code == status
    err = error_of(info.value)
    assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error")
    assert len(err["message"]) > 10


def test_every_v1_route_needs_the_key(app):
    import httpx

    calls = [("GET", "/v1/models", None), ("GET", "/v1/models/f5-tts", None), ("GET", "/v1/audio/voices", None),
             ("POST", "/v1/audio/speech", {"model": "f5-tts", "input": "x", "voice": "alloy"}),
             ("DELETE", "/v1/audio/voices/en_male", None), ("GET", "/v1/studio/requests/x", None),
             ("GET", "/v1/no/such/route", None)]
    for key, code in ((None, "missing_api_key"), ("wrong", "invalid_api_key")):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        for method, path, body in calls:
            r = httpx.request(method, app.url + path, json=body, headers=headers, timeout=30)
            assert r.status_code == 401 and r.json()["error"]["code"] == code, (method, path, r.text)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=app.url + "/v1", api_key="wrong", max_retries=0).models.list()


# --- the page's gradio_client API ----------------------------------------------------------------------------------
def test_gradio_client_clone_and_voice_creation(app):
    import httpx
    from gradio_client import Client, handle_file

    page = Client(app.url + "/", verbose=False)
    endpoints = page.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/clone", "/create_voice"} <= set(endpoints)
    assert not [e for e in endpoints if "voice" in e and e != "/create_voice"]  # save / rename / delete: private
    audio, html, download, figures = page.predict(
        ref_audio=handle_file(str(PROMPT)), ref_text=PROMPT_TEXT, text=SHORT, model="f5", mode="offline", nfe=4,
        seed=3, voice_key=None, job_id="", api_name="/clone")
    samples, rate = decode(open(audio, "rb").read(), "wav")
    assert rate == 24000 and figures["status"] == "ok" and figures["seed"] == 3 and figures["demo_weights"] is True
    assert abs(samples.size / rate - figures["metrics"]["audio_s"]) < 1e-3 and figures["metrics"]["latency_s"] > 0
    assert 'data-metric="latency_s"' in html
    audio, html, download, figures = page.predict(
        text=SHORT, gender="male", pitch="low", speed_level="high", mode="streaming", max_new_tokens=50, job_id="",
        api_name="/create_voice")
    samples, rate = decode(open(audio, "rb").read(), "wav")
    assert rate == 16000 and figures["model"] == "spark" and 0 < figures["metrics"]["tokens"] <= 50
    assert figures["metrics"]["first_chunk_s"] <= figures["metrics"]["latency_s"]
    # Gradio would run a private event by name; the page refuses that route.
    for name in ("save_voice", "delete_voice", "rename_voice"):
        r = httpx.post(f"{app.url}/gradio_api/call/{name}", json={"data": ["x"]}, timeout=30)
        assert r.status_code == 404, (name, r.text)


# --- in-process: auth off, slots shared with the page ----------------------------------------------------------------
@pytest.fixture()
def fake_api(tmp_path, monkeypatch):
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from studio.api import api_routes
    from studio.slots import GenerationSlots
    from tests.test_ui import FakeRuntime

    rt = FakeRuntime(tmp_path / "data")
    rt.slots = GenerationSlots(1)
    with TestClient(Starlette(routes=api_routes(rt))) as http:
        yield rt, http


def test_ref_audio_without_ref_text_is_transcribed_for_f5(fake_api):
    """F5 needs the prompt's transcript: left out, the asr model fills it in (the fake client's words) and the
    notes say so, marking a demo model's transcript."""
    import base64

    from tests.test_ui import FakeClient

    rt, http = fake_api
    r = http.post("/v1/audio/speech", json={"model": "f5-tts", "voice": "alloy", "input": SHORT, "response_format":
                                            "wav", "ref_audio": base64.b64encode(PROMPT.read_bytes()).decode()})
    assert r.status_code == 200, r.text
    assert "transcript was filled by the DEMO speech-recognition model" in r.headers["x-studio-notes"]
    assert rt.fake.calls[-1]["ref_text"] == FakeClient.HEARD


def test_without_a_key_the_api_is_open(fake_api):
    rt, http = fake_api
    assert rt.options.api_key is None
    r = http.post("/v1/audio/speech", json={"model": "f5-tts", "voice": "alloy", "input": SHORT,
                                            "response_format": "wav"})
    assert r.status_code == 200 and r.headers["x-studio-demo-weights"] == "true"
    assert http.get("/v1/models").status_code == 200


def test_a_full_line_answers_429_with_retry_after(fake_api, monkeypatch):
    import studio.api

    rt, http = fake_api
    monkeypatch.setattr(studio.api, "API_QUEUE", 0)
    body = {"model": "spark-tts", "voice": "alloy", "input": SHORT, "response_format": "wav"}
    assert rt.slots.acquire()  # a page generation holds the only slot
    try:
        r = http.post("/v1/audio/speech", json=body)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "rate_limit_exceeded" and r.json()["error"]["type"] == "requests"
        r = http.post("/v1/audio/speech", json={**body, "stream_format": "audio"})
        assert r.status_code == 429
    finally:
        rt.slots.release(2.0)
    assert http.post("/v1/audio/speech", json=body).status_code == 200
    assert rt.slots.running == 0


def test_slots_wait_cancel_and_estimate():
    import threading

    from studio.slots import GenerationSlots, SlotsFull

    slots = GenerationSlots(1)
    assert slots.acquire()
    with pytest.raises(SlotsFull) as full:
        slots.acquire(max_waiting=0)
    assert full.value.retry_after_s >= 1
    cancel = threading.Event()
    cancel.set()
    assert slots.acquire(cancel=cancel) is False and slots.waiting == 0
    got = []
    waiter = threading.Thread(target=lambda: got.append(slots.acquire(max_waiting=1)))
    waiter.start()
    time.sleep(0.2)
    assert slots.waiting == 1 and not got
    slots.release(3.0)
    waiter.join(5)
    assert got == [True] and slots.running == 1
    slots.release(3.0)
    assert slots.retry_after_s() == 3


def test_request_checks_in_isolation(tmp_path):
    from studio.api import ApiError, decode_ref_audio, extension_params, nearest_speed_level, read_instructions

    assert [nearest_speed_level(s) for s in (0.25, 0.7, 1.0, 1.2, 1.6, 4.0)] == [
        "very_low", "low", "moderate", "high", "high", "very_high"]
    assert read_instructions("Speak as a woman with a very high pitch, slowly.") == {
        "gender": "female", "pitch_level": "very_high", "speed_level": "low"}
    assert read_instructions("Calm and warm.") == {}
    assert extension_params({"top_k": 1, "temperature": 0.5, "seed": 3}, "spark") == {
        "temperature": 0.5, "top_k": 1, "seed": 3}
    with pytest.raises(ApiError) as bad:
        extension_params({"min_new_tokens": 10, "max_new_tokens": 5}, "spark")
    assert "min_new_tokens" in bad.value.message and bad.value.status == 400
    with pytest.raises(ApiError) as bad:
        extension_params({"cfg_strength": "a,b"}, "f5")
    assert bad.value.param == "cfg_strength"
    with pytest.raises(ApiError, match="base64"):
        decode_ref_audio("data:audio/wav,plain")
    assert decode_ref_audio("data:audio/wav;base64," + base64.b64encode(b"abc").decode()) == b"abc"


def test_space_storage_choice(tmp_path, monkeypatch):
    import studio.config as config

    monkeypatch.delenv("STUDIO_DATA_DIR", raising=False)
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert config.ephemeral_storage_note(tmp_path) is None  # not a Space: nothing to say
    monkeypatch.setenv("SPACE_ID", "someone/voice-studio")
    monkeypatch.setattr(config, "SPACE_PERSISTENT_DIR", tmp_path / "missing")
    assert "will be lost" in config.ephemeral_storage_note(config.default_data_dir())
    persistent = tmp_path / "data"
    persistent.mkdir()
    monkeypatch.setattr(config, "SPACE_PERSISTENT_DIR", persistent)
    assert config.default_data_dir() == persistent / "voice-studio"
    assert config.ephemeral_storage_note(config.default_data_dir()) is None


def test_one_client_over_its_own_limit_gets_429(fake_api, monkeypatch):
    from studio.slots import GenerationSlots

    rt, http = fake_api
    monkeypatch.setenv("STUDIO_MAX_CLIENT_REQUESTS", "1")
    rt.slots = GenerationSlots(4)
    rt.fake.delay_s = 1.0  # each of the 3 chunks: a 3 s generation
    body = {"model": "f5-tts", "voice": "alloy", "input": SHORT, "response_format": "pcm", "stream_format": "audio"}
    with http.stream("POST", "/v1/audio/speech", json=body, headers={"Authorization": "Bearer one"}) as first:
        assert first.status_code == 200
        again = http.post("/v1/audio/speech", json=body, headers={"Authorization": "Bearer one"})
        assert again.status_code == 429 and "STUDIO_MAX_CLIENT_REQUESTS" in again.json()["error"]["message"]
        assert int(again.headers["retry-after"]) >= 1
        other = http.post("/v1/audio/speech", json={**body, "stream_format": None},
                          headers={"Authorization": "Bearer two"})
        assert other.status_code == 200  # another client is not held up
        assert len(b"".join(first.iter_bytes())) > 0
    assert http.post("/v1/audio/speech", json=body, headers={"Authorization": "Bearer one"}).status_code == 200


def test_a_client_leaving_a_stream_cancels_and_records_it(fake_api):
    rt, http = fake_api
    rt.fake.delay_s = 0.5
    body = {"model": "spark-tts", "voice": "alloy", "input": SHORT, "response_format": "mp3", "stream_format": "audio"}
    with http.stream("POST", "/v1/audio/speech", json=body) as resp:
        request_id = resp.headers["x-request-id"]
        next(resp.iter_bytes())  # the first chunk, then hang up
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            rec = rt.history.get(request_id)
            break
        except KeyError:
            time.sleep(0.1)
    assert rec["status"] == "cancelled" and rec["audio"]  # what was generated before the hang-up is kept
    assert rt.slots.running == 0
