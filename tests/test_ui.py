"""The studio page's logic without a browser: input checks, the generation flow, the streaming
endpoint, views and pictures. A fake client stands in for Triton (the real path: test_browser.py)."""

from __future__ import annotations

import asyncio
import json
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from studio import ui_stream
from studio.ui_generate import (InputProblem, clone_request, design_request, f5_params, parse_seed, read_text_file,
                                run_generation, script_warning, spark_params)
from studio.ui_runtime import FAMILIES, NotReady, RuntimeOptions, StudioRuntime
from studio.ui_stream import FRAME_AUDIO, FRAME_END, FRAME_META, Job, JobRegistry, parse_frames
from tests.conftest import SAMPLES, speech_like

PROMPT = SAMPLES / "voices" / "en_female.wav"


# --- a fake Triton client and runtime (also used by test_browser.py's fast page tests) --------------
class FakeClient:
    """The StudioClient contract, without a server: deterministic noise in `chunks` pieces."""

    url = "fake:0"

    def __init__(self, chunks: int = 3, chunk_s: float = 0.5, delay_s: float = 0.15, demo: bool = True,
                 served: tuple = ("f5_tts", "f5_tts_stream", "spark_tts", "spark_tts_stream", "asr", "speaker_sim")):
        self.chunks, self.chunk_s, self.delay_s, self.demo, self.served = chunks, chunk_s, delay_s, demo, served
        self.calls: list[dict] = []

    def close(self):
        pass

    def server_ready(self):
        return True

    def model_ready(self, name):
        return name in self.served

    #: what the fake speech recognition "hears" in every clip
    HEARD = "the quiet harbour wakes"

    def transcribe(self, wav, sr, language=None, fixed_tokens=None):
        return self.HEARD, {"language": "en", "compute_ms": 1.0, "tokens": 4, "demo_weights": self.demo}

    def embed(self, wav, sr):
        v = np.array([1.0, float(len(wav) % 7)], np.float32)
        return v / np.linalg.norm(v), {"compute_ms": 1.0, "demo_weights": self.demo}

    def statistics(self, model=None):
        c = lambda n, ns: {"count": str(n), "ns": str(ns)}  # noqa: E731 - int64s arrive as strings
        return {"model_stats": [{"name": "f5_tts", "inference_count": "4", "execution_count": "3",
                                 "last_inference": "1700000000000",
                                 "inference_stats": {"success": c(4, 8_000_000), "fail": c(1, 0),
                                                     "queue": c(4, 2_000_000), "compute_input": c(4, 400_000),
                                                     "compute_infer": c(4, 40_000_000),
                                                     "compute_output": c(4, 400_000)}}]}

    def synthesize(self, model, text, ref_audio, ref_text, stream=False, params=None, on_chunk=None, cancel=None):
        from studio.client import SAMPLE_RATES, GenerationCancelled, SynthesisError, SynthResult

        call = dict(model=model, text=text, ref_text=ref_text, stream=stream, params=dict(params or {}),
                    ref=None if ref_audio is None else ref_audio.size, start=time.monotonic(), end=None)
        self.calls.append(call)
        if "FAIL" in text:
            raise SynthesisError("the model refused this text (FAIL)")
        sr = SAMPLE_RATES[model]
        seed = (params or {}).get("seed", 4242)
        rng = np.random.default_rng(seed)
        n_parts = self.chunks if stream else 1
        samples = int(self.chunk_s * sr * (1 if stream else self.chunks))
        t0, parts, arrivals = time.perf_counter(), [], []
        for i in range(n_parts):
            end = time.monotonic() + self.delay_s
            while time.monotonic() < end:
                if cancel is not None and cancel.is_set():
                    raise GenerationCancelled("generation cancelled")
                time.sleep(0.01)
            part = (0.2 * rng.standard_normal(samples)).astype(np.float32)
            parts.append(part)
            arrivals.append(time.perf_counter() - t0)
            if on_chunk is not None:
                on_chunk(part, {"sample_rate": sr, "chunk_index": i, "final": i == n_parts - 1})
        audio = np.concatenate(parts)
        latency = time.perf_counter() - t0
        call["end"] = time.monotonic()
        info = {"sample_rate": sr, "seed": seed, "demo_weights": self.demo, "compute_ms": 12.5, "final": True,
                "chunk_index": n_parts - 1, "chunks": n_parts, "overlap_samples": 0}
        if model == "spark":
            info.update(tokens=audio.size // 320, prefill_ms=3.0, decode_ms=40.0)
        return SynthResult(audio, sr, latency, arrivals[0], audio.size / sr, latency / (audio.size / sr), info,
                           arrivals, seed, self.demo)


class FakeRuntime(StudioRuntime):
    """A runtime whose server is always ready and whose client is a FakeClient."""

    def __init__(self, data_dir: Path, client: FakeClient | None = None, state: str = "ready"):
        super().__init__(RuntimeOptions(data_dir=data_dir, triton_url="fake:0"))
        self.fake = client or FakeClient()
        self.state = state
        self._started = True

    def client(self):
        return self.fake

    def _compute_status(self):
        fams = {f: {"label": label, "served": True, "offline": self.state == "ready",
                    "streaming": self.state == "ready", "demo": self.fake.demo, "licence": "test licence"}
                for f, (label, _, _) in FAMILIES.items()}
        return {"state": self.state, "message": f"fake server {self.state}", "url": "fake:0", "external": True,
                "device": "cpu", "runtime": "fake", "families": fams}

    def log_tail(self, n=200):
        return ["I1124 fake log line one", "I1124 fake log line two"]


@pytest.fixture()
def rt(tmp_path):
    return FakeRuntime(tmp_path / "data")


def frames_of(job: Job) -> list[tuple[bytes, bytes]]:
    return parse_frames(b"".join(job._frames))


# --- checking inputs -------------------------------------------------------------------------------
def test_clone_request_happy_path_and_warnings():
    req = clone_request(model="f5", mode="streaming", ref_audio_path=str(PROMPT),
                        ref_text=" The quiet harbour. ", text="  Hello there. ", params={"nfe_steps": 16})
    assert req.stream and req.text == "Hello there." and req.ref_text == "The quiet harbour."
    assert req.ref_audio.dtype == np.float32 and abs(req.ref_audio.size / 24000 - 3.1) < 0.05
    assert req.warnings == ()
    spark = clone_request(model="spark", mode="offline", ref_audio_path=str(PROMPT), ref_text="",
                          text="Привет, мир", params={})
    assert spark.ref_audio.size == pytest.approx(3.1 * 16000, rel=0.02), "Spark gets its prompt at 16 kHz"
    assert any("audio alone" in w for w in spark.warnings)
    assert any("Cyrillic" in w for w in spark.warnings)


def test_f5_without_reference_text_is_accepted_for_transcript_fill():
    """An empty F5 transcript is filled in by speech recognition when the request runs."""
    req = clone_request(model="f5", mode="offline", ref_audio_path=str(PROMPT), ref_text="", text="Hello.",
                        params={}, checks=True)
    assert req.ref_text == "" and req.checks


@pytest.mark.parametrize("change,needle", [
    (dict(text="   "), "Type the text"),
    (dict(text="x" * 6000), "at most 5000"),
    (dict(ref_audio_path=None), "Upload or record a prompt clip"),
    (dict(model="bark"), "Choose a model"),
    (dict(mode="fast"), "Choose a mode"),
    (dict(ref_audio_path="/no/such/file.wav"), "not found"),
])
def test_clone_request_refuses_bad_input(change, needle):
    kwargs = dict(model="f5", mode="offline", ref_audio_path=str(PROMPT), ref_text="hi", text="Hello.", params={})
    kwargs.update(change)
    with pytest.raises(InputProblem, match=needle):
        clone_request(**kwargs)


def test_bad_prompt_files_get_clear_messages(tmp_path):
    import soundfile as sf

    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("these are not samples")
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(24000, np.float32), 24000)
    short = tmp_path / "short.wav"
    sf.write(short, speech_like(0.2, 24000), 24000)
    for path, needle in ((not_audio, "not an audio file"), (silent, "silent"), (short, "at least")):
        with pytest.raises(InputProblem, match=needle):
            clone_request(model="f5", mode="offline", ref_audio_path=str(path), ref_text="hi", text="Hello.",
                          params={})


def test_design_request():
    req = design_request(mode="offline", text="Hello.", gender="male", pitch="low", speed="high", params={"top_k": 1})
    assert req.model == "spark" and req.ref_audio is None
    assert req.params == {"top_k": 1, "gender": "male", "pitch_level": "low", "speed_level": "high"}
    with pytest.raises(InputProblem, match="gender"):
        design_request(mode="offline", text="Hi.", gender="robot", pitch="low", speed="low", params={})
    with pytest.raises(InputProblem, match="pitch level"):
        design_request(mode="offline", text="Hi.", gender="male", pitch="max", speed="low", params={})


def test_params_and_seed():
    assert parse_seed(None) is None and parse_seed(-1) is None and parse_seed("") is None
    assert parse_seed(7.0) == 7
    for bad in (-5, 1.5, "abc", 2**63):
        with pytest.raises(InputProblem, match="seed"):
            parse_seed(bad)
    assert f5_params(16, 2, -1, 1, 3) == {"nfe_steps": 16, "cfg_strength": 2.0, "sway_coef": -1.0, "speed": 1.0,
                                          "seed": 3}
    with pytest.raises(InputProblem, match="NFE"):
        f5_params(0, 2, -1, 1, -1)
    with pytest.raises(InputProblem, match="Speed"):
        f5_params(32, 2, -1, 9, -1)
    assert spark_params(0.8, 50, 0.95, 3000, -1) == {"temperature": 0.8, "top_k": 50, "top_p": 0.95,
                                                    "max_new_tokens": 3000}
    with pytest.raises(InputProblem, match="Top-p"):
        spark_params(0.8, 50, 1.5, 3000, -1)


def test_script_warning():
    assert script_warning("Hello, 你好！ 123") is None
    assert "Hangul" in script_warning("안녕하세요")
    assert "Arabic" in script_warning("hello مرحبا")


def test_read_text_file(tmp_path):
    good = tmp_path / "a.txt"
    good.write_text("\ufeffLine one.\n第二行。\n", encoding="utf-8")
    assert read_text_file(good) == "Line one.\n第二行。"
    utf16 = tmp_path / "b.txt"
    utf16.write_text("Hello", encoding="utf-16")
    assert read_text_file(utf16) == "Hello"
    binary = tmp_path / "c.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(InputProblem):
        read_text_file(binary)
    big = tmp_path / "d.txt"
    big.write_text("a" * 300_000)
    with pytest.raises(InputProblem, match="at most"):
        read_text_file(big)


# --- one generation ---------------------------------------------------------------------------------
def _req(stream=True, model="f5", text="Hello there."):
    return clone_request(model=model, mode="streaming" if stream else "offline", ref_audio_path=str(PROMPT),
                         ref_text="The quiet harbour wakes up slowly before sunrise.", text=text,
                         params={"seed": 9}, voice="en_female (sample)")


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "offline"])
def test_generation_streams_frames_and_records_history(rt, stream):
    job = rt.jobs.open("a" * 32)
    out = run_generation(rt, job, _req(stream))
    frames = frames_of(job)
    assert frames[0][0] == FRAME_META and json.loads(frames[0][1])["mode"] == ("streaming" if stream else "offline")
    audio_frames = [p for k, p in frames if k == FRAME_AUDIO]
    assert len(audio_frames) == (3 if stream else 1)
    pcm = np.concatenate([np.frombuffer(p[4:], "<f4") for p in audio_frames])
    assert struct.unpack("<I", audio_frames[0][:4])[0] == 24000
    assert np.array_equal(pcm, out.audio)
    assert frames[-1][0] == FRAME_END and json.loads(frames[-1][1])["status"] == "ok"
    rec = rt.history.get(out.record["id"])
    assert rec["status"] == "ok" and rec["seed"] == 9 and rec["voice"] == "en_female (sample)"
    assert rec["metrics"]["rtf"] > 0 and rec["metrics"]["compute_ms"] == 12.5
    assert rt.history.file(rec["audio"]) is not None and rt.history.file(rec["prompt_audio"]) is not None
    assert job.record_id == rec["id"]


def test_browser_first_sound_report_lands_in_metrics_and_history(rt):
    job = rt.jobs.open("b" * 32)
    job.readers = 1  # a browser is listening
    threading.Timer(0.2, job.report_played, args=({"first_sound_ms": 31.5, "first_audio_ms": 80, "junk": "x"},)).start()
    out = run_generation(rt, job, _req(True))
    assert out.metrics["first_sound_ms"] == 31.5
    assert rt.history.get(out.record["id"])["metrics"]["first_sound_ms"] == 31.5


def test_late_first_sound_report_is_appended(rt):
    job = rt.jobs.open("c" * 32)
    out = run_generation(rt, job, _req(False))  # nobody listening: no wait
    assert "first_sound_ms" not in out.metrics
    job.report_played({"first_sound_ms": 12.0})
    rt._late_first_sound(job)
    assert rt.history.get(out.record["id"])["metrics"]["first_sound_ms"] == 12.0


def test_cancel_keeps_partial_audio_and_records_it(rt):
    rt.fake.delay_s = 0.3
    job = rt.jobs.open("d" * 32)
    threading.Timer(0.45, job.cancel.set).start()
    out = run_generation(rt, job, _req(True))
    assert out.status == "cancelled"
    assert out.audio.size == int(0.5 * 24000), "exactly the one chunk that arrived before the stop"
    assert json.loads(frames_of(job)[-1][1])["status"] == "cancelled"
    rec = rt.history.get(out.record["id"])
    assert rec["status"] == "cancelled" and rt.history.file(rec["audio"]) is not None


def test_cancel_requested_while_queued(rt):
    assert rt.jobs.cancel("e" * 32)  # the Stop click came before the handler started
    job = rt.jobs.open("e" * 32)
    assert job.cancel.is_set()
    assert not rt.jobs.cancel("not-a-job-id")


def test_server_error_is_recorded_and_raised(rt):
    from studio.client import SynthesisError

    job = rt.jobs.open("f" * 32)
    with pytest.raises(SynthesisError, match="refused"):
        run_generation(rt, job, _req(True, text="please FAIL"))
    end = json.loads(frames_of(job)[-1][1])
    assert end["status"] == "error" and "refused" in end["message"]
    assert rt.history.records()[0]["status"] == "error"


def test_not_ready_says_why(tmp_path):
    starting = FakeRuntime(tmp_path, state="starting")
    with pytest.raises(NotReady, match="still starting"):
        run_generation(starting, starting.jobs.open(None), _req(True))
    failed = FakeRuntime(tmp_path, state="failed")
    with pytest.raises(NotReady, match="Server tab"):
        run_generation(failed, failed.jobs.open(None), _req(True))


# --- the streaming endpoint -------------------------------------------------------------------------
def test_job_frames_async_reader_sees_everything_in_order(monkeypatch):
    monkeypatch.setattr(ui_stream, "KEEPALIVE_S", 0.05)
    job = Job("1" * 32)

    def writer():
        time.sleep(0.12)  # one keep-alive first
        for i in range(3):
            job.push_audio(np.full(10, i, np.float32), 16000)
            time.sleep(0.01)
        job.finish("ok")

    async def read():
        return b"".join([block async for block in job.frames()])

    threading.Thread(target=writer).start()
    data = asyncio.run(read())
    kinds = [k for k, _ in parse_frames(data)]
    assert kinds[0] == b"K" and kinds[-4:] == [FRAME_AUDIO] * 3 + [FRAME_END]
    assert job.readers == 0


def test_routes_stream_and_played(rt):
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    app = Starlette(routes=rt.jobs.routes())
    job_id = "2" * 32
    with TestClient(app) as http:
        assert http.get("/studio_api/stream/NOT-HEX").status_code == 400
        assert http.post(f"/studio_api/stream/{'3' * 32}/played", json={}).status_code == 404

        def generate():
            time.sleep(0.2)
            run_generation(rt, rt.jobs.open(job_id), _req(True))

        worker = threading.Thread(target=generate)
        worker.start()
        resp = http.get(f"/studio_api/stream/{job_id}")
        assert resp.status_code == 200 and resp.headers["content-type"] == "application/octet-stream"
        kinds = [k for k, _ in parse_frames(resp.content)]
        assert kinds[0] == FRAME_META and kinds.count(FRAME_AUDIO) == 3 and kinds[-1] == FRAME_END
        worker.join(10)  # it waits PLAYED_WAIT_S for a report that this client never sends
        job = rt.jobs.get(job_id)
        assert job.record_id
        r = http.post(f"/studio_api/stream/{job_id}/played", json={"first_sound_ms": 22.2})
        assert r.status_code == 200 and r.json()["played"] == {"first_sound_ms": 22.2}
        # the generation had finished without a report (no browser) -> appended as an update
        assert rt.history.get(job.record_id)["metrics"]["first_sound_ms"] == 22.2
        assert http.post(f"/studio_api/stream/{job_id}/played", content=b"nope").status_code == 400


def test_registry_reaps_finished_jobs(monkeypatch):
    reg = JobRegistry()
    job = reg.open("4" * 32)
    job.finish("ok")
    monkeypatch.setattr(ui_stream, "FINISHED_TTL_S", -1)
    reg.open("5" * 32)
    assert reg.get("4" * 32) is None and len(reg) == 1


# --- views, pictures, handlers --------------------------------------------------------------------
def test_banner_and_model_notes(rt):
    from studio.ui_views import banner_html, model_note_html

    st = rt.status()
    html = banner_html(st)
    assert "Triton ready" in html and "DEMO WEIGHTS" in html and "noise" in html
    assert "F5-TTS" in html and "Spark-TTS" in html
    note = model_note_html(st, "spark")
    assert "test licence" in note and "noise" in note
    starting = dict(st, state="starting", message="resolving weights")
    assert "Starting the Triton server" in banner_html(starting) and "resolving weights" in banner_html(starting)
    assert "waiting for the Triton server" in model_note_html(starting, "f5")
    failed = dict(st, state="failed", message="port in use")
    assert "port in use" in banner_html(failed) and "Server tab" in banner_html(failed)
    real = {**st, "families": {k: {**v, "demo": False} for k, v in st["families"].items()}}
    assert "DEMO" not in banner_html(real)


def test_metrics_and_tables():
    from studio.ui_views import HISTORY_HEADERS, STATS_HEADERS, history_rows, metrics_html, stats_rows

    html = metrics_html({"latency_s": 1.23456, "first_chunk_s": 0.2, "audio_s": 3.0, "rtf": 0.41, "compute_ms": 900.0,
                         "first_sound_ms": 25.0, "chunks": 3, "tokens": 150, "decode_tokens_per_s": 75.0},
                        seed=11, demo=True, mode="streaming")
    for key, text in [("latency_s", "1.235 s"), ("rtf", "0.410"), ("seed", "11"), ("first_sound_ms", "25.0 ms"),
                      ("demo_weights", "DEMO"), ("decode_tokens_per_s", "75.0 tok/s")]:
        assert f'data-metric="{key}"' in html and text in html
    assert "studio-notes" not in html
    noted = metrics_html({"latency_s": 1.0}, seed=1, demo=False, mode="offline",
                         notes=["the prompt was clipped at 11.8 s <a pause>", ""])
    assert '<ul class="studio-notes"><li>the prompt was clipped at 11.8 s &lt;a pause&gt;</li></ul>' in noted
    rows = stats_rows(FakeClient().statistics())
    assert len(rows[0]) == len(STATS_HEADERS)
    assert rows[0][:4] == ["f5_tts", 4, 1, 3] and rows[0][4] == 0.5 and rows[0][5] == 10.2
    hr = history_rows([{"id": "x", "time": "2026-01-01T00:00:00Z", "model": "spark", "kind": "design",
                        "mode": "offline", "status": "ok", "text": "t" * 100, "seed": 1, "demo_weights": True,
                        "metrics": {"latency_s": 1.0, "rtf": 0.5}}])
    assert len(hr[0]) == len(HISTORY_HEADERS) and hr[0][1] == "Spark-TTS (voice creation)"
    assert hr[0][4].endswith("...") and hr[0][-1] == "x"


def test_pictures(tmp_path):
    from studio.ui_plots import history_png, waveform_png

    png = waveform_png(speech_like(2.0, 24000), 24000, tmp_path / "w.png", title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = history_png([], tmp_path / "h0.png")
    assert empty.stat().st_size > 0
    recs = [{"status": "ok", "metrics": {"latency_s": 0.1 * i, "first_chunk_s": 0.05, "rtf": 0.3}} for i in range(5)]
    assert history_png(recs, tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"


def test_handlers_generate_export_and_voices(rt):
    from studio.ui import Handlers

    h = Handlers(rt, autostart=False)
    audio, html, download, record_id, seed, figures = h.clone(
        str(PROMPT), "The quiet harbour wakes up.", "Hello there.", "f5", "offline", 16, 2.0, -1.0, 1.0,
        0.8, 50, 0.95, 3000, 5, "mp3", "sample:en_female", True, "")
    # objective checks on: the fake ASR heard 4 words for 2 -> WER 2 (2 substitutions + 2 insertions) / 2
    assert figures["metrics"]["wer"] == pytest.approx(2.0) and 'data-metric="wer"' in html
    assert -1.0 <= figures["metrics"]["speaker_sim"] <= 1.0 and 'data-metric="speaker_sim"' in html
    picture = h.picture(record_id)
    assert seed == 5 and Path(audio).is_file() and Path(picture).is_file()
    assert 'data-metric="latency_s"' in html
    assert ".mp3" in str(download.value) and download.visible
    for fmt in ("wav", "flac", "mp3"):
        path = Path(h.export(rt.history.get(record_id), fmt))
        assert path.is_file() and path.stat().st_size > 1000
    assert rt.fake.calls[-1]["params"]["nfe_steps"] == 16
    assert rt.history.get(record_id)["voice"] == "en_female (sample)"
    # voices: save, rename, use, delete
    rows, sel, _ = h.save_voice("My Voice", str(PROMPT), "The quiet harbour.")
    assert ["My Voice", "saved"] == rows[0][:2] and sel.value == "saved:My Voice"
    h.rename_voice("saved:My Voice", "Other")
    path, text, pick, tabs = h.use_voice("saved:Other")
    assert Path(path).is_file() and text == "The quiet harbour." and pick.value == "saved:Other"
    h.delete_voice("saved:Other")
    assert not [v for v in rt.voices.list() if not v.read_only]
    # history and server views
    plot, hrows, ids = h.history_view()
    assert ids[0] == record_id and Path(plot).is_file()
    md, srows, log = h.server_view()
    assert "ready" in md and srows[0][0] == "f5_tts" and "fake log line" in log


def test_handlers_turn_problems_into_user_errors(tmp_path):
    import gradio as gr

    from studio.ui import Handlers

    h = Handlers(FakeRuntime(tmp_path), autostart=False)
    rt_no_asr = FakeRuntime(tmp_path / "no-asr", FakeClient(served=("f5_tts", "f5_tts_stream")))
    with pytest.raises(gr.Error, match="F5-TTS needs the prompt's transcript"):
        Handlers(rt_no_asr, autostart=False).clone(str(PROMPT), "", "Hello.", "f5", "offline", 16, 2, -1, 1, 0.8, 50,
                                                   0.95, 3000, -1, "wav", None, False, "")
    with pytest.raises(gr.Error, match="could not generate"):
        h.clone(str(PROMPT), "hi", "FAIL now", "f5", "offline", 16, 2, -1, 1, 0.8, 50, 0.95, 3000, -1, "wav", None,
                False, "")
    with pytest.raises(gr.Error, match="usable voice name"):
        h.save_voice("///", str(PROMPT), "")
    with pytest.raises(gr.Error, match="shipped sample"):
        h.delete_voice("sample:en_male")
    starting = Handlers(FakeRuntime(tmp_path, state="starting"), autostart=False)
    with pytest.raises(gr.Error, match="still starting"):
        starting.design("Hello.", "female", "low", "moderate", "streaming", 0.8, 50, 0.95, 3000, -1, "wav", "")


def test_importing_app_starts_nothing():
    import subprocess
    import sys

    code = ("import app, gradio; assert isinstance(app.demo, gradio.Blocks); assert not app.runtime.started; "
            "assert app.runtime.server is None; a = app.parse_args(['--port', '9', '--demo-weights', '--triton-url', "
            "'h:1', '--root-path', '/s', '--share', '--gpus', '0,1']); "
            "o = app.options_from(a); assert o.triton_url == 'h:1' and o.demo_weights and o.gpus == [0, 1]; "
            "print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_queue_limits_generations_but_not_the_light_events(tmp_path):
    from studio.ui import GENERATE_CONCURRENCY, LIGHT_CONCURRENCY, build_demo

    demo = build_demo(FakeRuntime(tmp_path), autostart=False)
    fns = {f.api_name: f for f in demo.fns.values()}
    for name in ("clone", "create_voice"):
        assert fns[name].concurrency_limit == GENERATE_CONCURRENCY and fns[name].concurrency_id == "generate"
    stops = [f for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "stop"]
    assert len(stops) == 2 and all(f.concurrency_limit is None for f in stops), "Stop never waits behind generations"
    assert demo._queue.default_concurrency_limit == LIGHT_CONCURRENCY
