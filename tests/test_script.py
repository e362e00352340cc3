"""Multi-voice scripts (studio/script.py, studio/ui_script.py): parsing, loudness, generation through the real
tritonserver on demo weights, history and ZIP, the CLI and the Gradio API (`/script`) giving the same plan."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from studio import script as sc
from studio.voices import VoiceLibrary
from tests.conftest import speech_like

ROOT = Path(__file__).resolve().parent.parent
#: Demo weights: quality is moot, time is not. Spark's demo LLM rarely emits its end token early, but a
#: created voice's first segment must be long enough to clone from (0.5 s), hence min = max tokens.
F5_FAST = "f5:nfe_steps=2,seed=1"
CREATED = "spark:gender=female,pitch_level=high,speed_level=moderate,top_k=1,min_new_tokens=40,max_new_tokens=40"
THREE_VOICES = (
    f"{{en_female|{F5_FAST}}} Good morning.\n"
    f"{{{CREATED}}} Hello there.\n"
    f"{{en_male|{F5_FAST}}} Hi both.\n"
    "\n"
    f"{{{CREATED}}} Same voice again.\n"
)


@pytest.fixture()
def library(tmp_path) -> VoiceLibrary:
    return VoiceLibrary(tmp_path / "data")


def plan_of(text: str, library: VoiceLibrary, **kw) -> sc.ScriptPlan:
    return sc.plan_script(text, library, **kw)


# --- parsing ---------------------------------------------------------------------------------------------
def test_plan_segments_voices_pauses_and_created_voice_link(library):
    plan = plan_of(THREE_VOICES + "and it goes on.\n", library, speaker_pause_ms=250, paragraph_pause_ms=900)
    assert plan.ok, plan.problems
    rows = plan.rows()
    assert [r["segment"] for r in rows] == [1, 2, 3, 4]
    assert [r["line"] for r in rows] == [1, 2, 3, 5]
    assert [r["voice_kind"] for r in rows] == ["library", "created", "library", "created"]
    assert [r["family"] for r in rows] == ["f5", "spark", "f5", "spark"]
    assert [r["pause_before_ms"] for r in rows] == [0, 250, 250, 900], "the paragraph pause before segment 4"
    assert rows[3]["text"] == "Same voice again. and it goes on.", "an untagged line continues the segment"
    assert [r["clone_of"] for r in rows] == [None, None, None, 2], "the created voice's later use clones segment 2"
    assert rows[0]["settings"] == "f5:nfe_steps=2,seed=1"
    assert plan.sample_rate == 24000 and plan.families == ["f5", "spark"]
    assert all(r["est_s"] > 0 for r in rows)


def test_untagged_text_after_a_blank_line_is_a_new_segment_of_the_same_voice(library):
    plan = plan_of("{en_male} One.\nTwo.\n\nThree.", library, default_family="spark")
    assert [(s.text, s.voice.name, s.voice.family, s.pause_before_ms) for s in plan.segments] == [
        ("One. Two.", "en_male", "spark", 0), ("Three.", "en_male", "spark", sc.DEFAULT_PARAGRAPH_PAUSE_MS)]


def test_parse_errors_are_reported_by_line(library):
    text = "\n".join([
        "Before any tag.",                    # 1
        "{en_femal} Misspelled.",             # 2
        "{en_male|f5:nfe_steps=999} Range.",  # 3
        "{en_male}",                          # 4 empty segment
        "{zh_female|spark:pitch_level=high} Levels without gender.",  # 5
        "{Nobody} Unknown.",                  # 6
        "{en_male} Fine.",                    # 7
        "{f5:speed=1.2} No voice.",           # 8
        "{en_male ...",                       # 9 not closed
    ])
    plan = plan_of(text, library)
    assert not plan.ok
    by_line = {line: msg for line, msg in plan.problems}
    assert sorted(by_line) == [1, 2, 3, 4, 5, 6, 8, 9]
    assert "before the first voice tag" in by_line[1]
    assert "unknown voice {en_femal}" in by_line[2] and "did you mean {en_female}" in by_line[2]
    assert "nfe_steps" in by_line[3] and "out of range" in by_line[3]
    assert "empty segment" in by_line[4]
    assert "need gender" in by_line[5]
    assert "unknown voice {Nobody}" in by_line[6] and "did you mean" not in by_line[6]
    assert "names no voice" in by_line[8]
    assert "not closed" in by_line[9]
    with pytest.raises(sc.ScriptError) as err:
        plan.check()
    assert "line 2: unknown voice {en_femal}" in str(err.value)


def test_length_limits_name_the_limit(library):
    too_long = plan_of("{en_male} " + "word " * (sc.MAX_SCRIPT_CHARS // 5 + 10), library)
    assert "script length limit" in too_long.problems[0][1] and str(sc.MAX_SCRIPT_CHARS) in too_long.problems[0][1]
    long_segment = plan_of("{en_male} Short.\n{en_female} " + "x" * (sc.MAX_SEGMENT_CHARS + 1), library)
    assert long_segment.problems[0][0] == 2 and "segment length limit" in long_segment.problems[0][1]
    many = "\n".join(f"{{en_male}} Line {i}." for i in range(sc.MAX_SEGMENTS + 1))
    count = plan_of(many, library)
    assert count.problems[0][0] == sc.MAX_SEGMENTS + 1 and "segment count limit" in count.problems[0][1]


def test_bad_settings_of_the_whole_script(library):
    with pytest.raises(sc.ScriptError, match="pause between speakers"):
        plan_of("{en_male} Hi.", library, speaker_pause_ms=-5)
    with pytest.raises(sc.ScriptError, match="default family"):
        plan_of("{en_male} Hi.", library, default_family="bark")
    with pytest.raises(sc.ScriptError, match="empty"):
        plan_of("   \n\n", library).check()


def test_saved_voices_are_found_before_samples(library):
    library.save("Narrator", speech_like(2.0, 24000), 24000, "A short test line.")
    plan = plan_of("{Narrator} Hello.\n{narator} Typo.", library)
    assert plan.segments[0].voice.key == "saved:Narrator"
    assert plan.problems == ((2, plan.problems[0][1]),) and "did you mean {Narrator}" in plan.problems[0][1]


# --- loudness -----------------------------------------------------------------------------------------
def test_loudness_is_matched_to_the_target_with_a_peak_ceiling():
    sr = 24000
    quiet, loud = 0.05 * speech_like(2.0, sr, 1), 3.0 * speech_like(2.0, sr, 2)
    for wav in (quiet, loud):
        out, info = sc.normalize_loudness(wav, sr)
        assert abs(sc.measure_lufs(out, sr) - sc.TARGET_LUFS) < 0.1 or info["peak_limited"]
        assert np.max(np.abs(out)) <= 10 ** (sc.PEAK_CEILING_DBFS / 20) + 1e-6
    spiky = np.zeros(sr, np.float32)
    spiky[::2400] = 0.9  # very quiet on average, loud peaks: the ceiling wins
    out, info = sc.normalize_loudness(spiky, sr)
    assert info["peak_limited"] and np.max(np.abs(out)) == pytest.approx(10 ** (sc.PEAK_CEILING_DBFS / 20), rel=1e-4)
    short, _ = sc.normalize_loudness(0.01 * speech_like(0.2, sr), sr)  # shorter than one 400 ms block
    assert abs(sc.measure_lufs(short, sr) - sc.TARGET_LUFS) < 0.5
    silent, info = sc.normalize_loudness(np.zeros(sr, np.float32), sr)
    assert not silent.any() and info["gain_db"] == 0.0


# --- generation on the real server ------------------------------------------------------------------------
class Spy:
    """The real client, with every request's voice inputs remembered."""

    def __init__(self, client):
        self.client, self.calls, self.lock = client, [], threading.Lock()

    def synthesize(self, model, text, ref_audio, ref_text, **kw):
        with self.lock:
            self.calls.append({"model": model, "text": text, "ref_text": ref_text,
                               "params": dict(kw.get("params") or {}),
                               "ref": None if ref_audio is None else np.array(ref_audio)})
        return self.client.synthesize(model, text, ref_audio, ref_text, **kw)


def test_three_voice_script_in_order_with_pauses_and_a_cloned_created_voice(client, data_dir, tmp_path):
    from studio.history import HistoryStore

    library = VoiceLibrary(data_dir)
    plan = plan_of(THREE_VOICES, library, speaker_pause_ms=300, paragraph_pause_ms=800)
    spy = Spy(client)
    handed: list[tuple[int, int]] = []
    result = sc.generate_script(plan, spy, library, concurrency=3,
                                on_segment=lambda o, pause: handed.append((o.segment.index, pause.size)))
    sr = result.sample_rate
    assert sr == 24000
    assert handed == [(1, 0), (2, int(0.3 * sr)), (3, int(0.3 * sr)), (4, int(0.8 * sr))], "script order and pauses"
    # the samples: each segment where it says it starts, preceded by exactly its pause in zeros
    position = 0
    for o in result.segments:
        pause = int(round(o.segment.pause_before_ms * sr / 1000))
        assert o.start_sample == position + pause
        assert not result.audio[position:position + pause].any(), f"segment {o.segment.index}: the pause is silent"
        seg = result.audio[o.start_sample:o.start_sample + o.audio.size]
        assert np.array_equal(seg, o.audio) and np.abs(seg).max() > 0
        position = o.start_sample + o.audio.size
    assert position == result.audio.size
    # the created voice: made once (gender, no prompt), then cloned from that segment's own audio and words
    by_text = {c["text"]: c for c in spy.calls}
    first, again = by_text["Hello there."], by_text["Same voice again."]
    assert first["model"] == "spark" and first["ref"] is None and first["params"]["gender"] == "female"
    assert again["model"] == "spark" and "gender" not in again["params"]
    assert again["ref_text"] == "Hello there." and np.array_equal(again["ref"], result.segments[1].raw_audio)
    assert by_text["Good morning."]["model"] == "f5" and by_text["Good morning."]["params"]["nfe_steps"] == 2
    # loudness matched per segment; metrics per segment and for the script
    for o in result.segments:
        assert o.metrics["lufs_out"] == pytest.approx(sc.TARGET_LUFS, abs=0.2) or o.metrics["peak_limited"]
        for key in ("latency_s", "first_chunk_s", "rtf", "ready_s", "emitted_s"):
            assert o.metrics[key] is not None and o.metrics[key] >= 0
    m = result.metrics
    assert m["segments"] == 4 and m["first_sound_s"] <= m["latency_s"] and m["rtf"] > 0
    assert m["audio_s"] == pytest.approx(result.audio.size / sr, abs=1e-3)
    # one history entry with its segments; ZIP with per-segment files and the lines
    history = HistoryStore(tmp_path / "hist")
    rec = sc.record_script(history, THREE_VOICES, plan, result.segments, sample_rate=sr, stream=False,
                           metrics=m, audio=result.audio)
    stored = history.get(rec["id"])
    assert stored["kind"] == "script" and stored["model"] == "f5+spark" and len(stored["segments"]) == 4
    assert [s["line"] for s in stored["segments"]] == [1, 2, 3, 5]
    assert stored["created_voices"][0]["segment"] == 2 and history.file(stored["created_voices"][0]["audio"])
    zpath = sc.script_zip(history, stored, tmp_path / "script.zip")
    with zipfile.ZipFile(zpath) as z:
        names = set(z.namelist())
        assert {f"segment-00{i}.wav" for i in range(1, 5)} <= names and "lines.csv" in names
        lines = list(csv.DictReader(io.StringIO(z.read("lines.csv").decode())))
    assert [r["line"] for r in lines] == ["1", "2", "3", "5"] and lines[3]["text"] == "Same voice again."


def test_streaming_requests_report_first_chunks(client, data_dir):
    library = VoiceLibrary(data_dir)
    plan = plan_of(f"{{en_female|{F5_FAST}}} One line.\n{{en_male|{F5_FAST}}} Another line.", library)
    result = sc.generate_script(plan, client, library, stream=True, concurrency=2)
    assert [o.segment.index for o in result.segments] == [1, 2]
    assert all(0 < o.metrics["first_chunk_s"] <= o.metrics["latency_s"] for o in result.segments)


def test_a_voice_deleted_while_the_script_runs_is_named_by_line(client, tmp_path):
    library = VoiceLibrary(tmp_path / "data")
    library.save("Temp", speech_like(3.0, 24000), 24000, "A speech like test signal.")
    plan = plan_of(f"{{Temp|{F5_FAST}}} First.\n{{en_male|{F5_FAST}}} Second.\n{{Temp|{F5_FAST}}} Third.", library)

    def delete_after_first(outcome, pause):
        if outcome.segment.index == 1:
            library.delete("Temp")

    with pytest.raises(sc.ScriptError) as err:
        sc.generate_script(plan, client, library, concurrency=1, on_segment=delete_after_first)
    assert err.value.problems[0][0] == 3 and "{Temp} was deleted" in str(err.value)
    assert [o.segment.index for o in err.value.done] == [1, 2], "what was handed out is kept"


def test_nothing_is_generated_for_a_script_that_does_not_parse(library):
    class NoCalls:
        def synthesize(self, *a, **k):
            raise AssertionError("a script with problems reached the server")

    plan = plan_of("{en_male} Fine.\n{nobody} Not fine.", library)
    with pytest.raises(sc.ScriptError, match="line 2"):
        sc.generate_script(plan, NoCalls(), library)


def test_stop_keeps_what_was_handed_out(client, data_dir):
    library = VoiceLibrary(data_dir)
    plan = plan_of("\n".join(f"{{en_male|{F5_FAST}}} Line number {i}." for i in range(6)), library)
    cancel = threading.Event()
    with pytest.raises(sc.ScriptCancelled) as stopped:
        sc.generate_script(plan, client, library, concurrency=1, cancel=cancel,
                           on_segment=lambda o, p: cancel.set() if o.segment.index == 2 else None)
    assert [o.segment.index for o in stopped.value.done] == [1, 2]


# --- the CLI and the Gradio API give the same plan ----------------------------------------------------------
@pytest.fixture(scope="module")
def script_page(triton_server, tmp_path_factory):
    """The page in this process over the session's tritonserver (the path gradio_client takes)."""
    from studio.ui import build_demo, launch_kwargs
    from studio.ui_runtime import RuntimeOptions, StudioRuntime
    from tests.test_browser import free_port

    data = tmp_path_factory.mktemp("script-page")
    rt = StudioRuntime(RuntimeOptions(data_dir=data, triton_url=triton_server.grpc_url))
    rt.start()
    demo = build_demo(rt, autostart=False)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_kwargs(rt))
    yield f"http://127.0.0.1:{port}/", rt, data
    demo.close()
    rt.stop()


def test_cli_and_gradio_client_produce_the_same_segment_plan(script_page, triton_server, tmp_path):
    from gradio_client import Client

    url, rt, data = script_page
    script = tmp_path / "dialogue.txt"
    script.write_text(THREE_VOICES, encoding="utf-8")
    out, report = tmp_path / "out.wav", tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "-m", "studio", "script", str(script), "-o", str(out), "--json",
                           str(report), "--zip", str(tmp_path / "out.zip"), "--triton-url", triton_server.grpc_url,
                           "--data-dir", str(data), "--speaker-pause-ms", "300", "--paragraph-pause-ms", "800"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert "segment 4 (line 5, created female (pitch high, speed moderate))" in proc.stdout
    assert "DEMO WEIGHTS" in proc.stdout
    cli = json.loads(report.read_text())
    assert out.is_file() and (tmp_path / "out.zip").is_file()

    api = Client(url, verbose=False)
    problems, table, audio, metrics, _, _, details, files = api.predict(
        THREE_VOICES, "f5", "offline", 300, 800, 3, "", api_name="/script")
    assert details["status"] == "ok" and Path(audio).is_file()
    assert sorted(Path(f).suffix for f in files) == [".wav", ".zip"] and all(Path(f).is_file() for f in files)
    assert details["plan"]["segments"] == cli["plan"]["segments"]
    assert [s["segment"] for s in details["segments"]] == [1, 2, 3, 4]
    plan_only = api.predict(THREE_VOICES, "f5", 300, 800, api_name="/script_plan")
    assert [row[:2] for row in plan_only[1]["data"]] == [[s["segment"], s["line"]] for s in cli["plan"]["segments"]]
    # both went to the history as one script entry each
    scripts = [r for r in rt.history.records() if r["kind"] == "script"]
    assert len(scripts) == 2 and all(len(r["segments"]) == 4 for r in scripts)


def test_gradio_client_gets_the_problems_by_line(script_page):
    from gradio_client import Client

    url, _, _ = script_page
    with pytest.raises(Exception) as err:
        Client(url, verbose=False).predict("{en_male} Fine.\n{en_mail} Typo.", "f5", "offline", 300, 700, 2, "",
                                           api_name="/script")
    assert "line 2" in str(err.value) and "did you mean {en_male}" in str(err.value)


def test_cli_plan_only_and_bad_scripts(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text(THREE_VOICES, encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "studio", "script", str(good), "--plan-only", "--data-dir",
                           str(tmp_path / "d")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert [s["line"] for s in plan["segments"]] == [1, 2, 3, 5]
    bad = tmp_path / "bad.txt"
    bad.write_text("{en_male} Fine.\n{en_male|f5:speed=9} Too fast.\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "studio", "script", str(bad), "-o", str(tmp_path / "x.wav"),
                           "--data-dir", str(tmp_path / "d")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "line 2:" in proc.stderr and "speed" in proc.stderr
    assert not (tmp_path / "x.wav").exists()


# --- the page's handler over a fake client (frames, history, errors) ----------------------------------------
def test_page_handler_streams_whole_segments_in_order_with_line_frames(tmp_path):
    import struct

    from studio.ui_script import FRAME_SEGMENT, ScriptHandlers
    from studio.ui_stream import FRAME_AUDIO, FRAME_END, FRAME_META, parse_frames
    from tests.test_ui import FakeClient, FakeRuntime

    rt = FakeRuntime(tmp_path / "data", FakeClient(chunks=2, chunk_s=0.3, delay_s=0.05))
    h = ScriptHandlers(rt)
    job_id = "a" * 32
    out = h.generate("{en_female} One.\n{en_male} Two.\n\n{spark:gender=male} Three.", "f5", "streaming", 200, 500,
                     2, job_id)
    frames = parse_frames(b"".join(rt.jobs.get(job_id)._frames))
    kinds = [k for k, _ in frames]
    assert kinds == [FRAME_META, FRAME_SEGMENT, FRAME_AUDIO, FRAME_AUDIO, FRAME_SEGMENT, FRAME_AUDIO, FRAME_AUDIO,
                     FRAME_SEGMENT, FRAME_AUDIO, FRAME_END]
    segs = [json.loads(p) for k, p in frames if k == FRAME_SEGMENT]
    assert [(s["segment"], s["line"]) for s in segs] == [(1, 1), (2, 2), (3, 4)]
    pauses = [p for k, p in frames if k == FRAME_AUDIO][1::2]
    for payload, ms in zip(pauses, (200, 500)):
        samples = np.frombuffer(payload[4:], "<f4")
        assert struct.unpack("<I", payload[:4])[0] == 24000 and samples.size == ms * 24 and not samples.any()
    payload, files = out[6], out[7]
    assert payload["status"] == "ok" and [s["line"] for s in payload["segments"]] == [1, 2, 4]
    assert sorted(Path(f).suffix for f in files) == [".wav", ".zip"]
    rec = rt.history.get(payload["record_id"])
    assert rec["kind"] == "script" and rec["mode"] == "streaming" and rec["params"]["speaker_pause_ms"] == 200
    assert [c["stream"] for c in rt.fake.calls] == [True, True, True]


def test_page_handler_refuses_a_bad_script_by_line(tmp_path):
    import gradio as gr

    from studio.ui_script import ScriptHandlers
    from studio.ui_stream import parse_frames
    from tests.test_ui import FakeRuntime

    rt = FakeRuntime(tmp_path / "data")
    h = ScriptHandlers(rt)
    with pytest.raises(gr.Error, match="line 2: unknown voice"):
        h.generate("{en_male} Fine.\n{en_mal} Typo.", "f5", "offline", 300, 700, 2, "b" * 32)
    end = parse_frames(b"".join(rt.jobs.get("b" * 32)._frames))[-1]
    assert json.loads(end[1])["status"] == "error" and not rt.fake.calls and not rt.history.records()
    problems, rows = h.preview("{en_male} Fine.\n{en_mal} Typo.", "f5", 300, 700)
    assert 'data-line="2"' in problems and rows[0][:2] == [1, 1]


def test_a_created_voice_too_short_to_clone_names_both_lines(library):
    from tests.test_ui import FakeClient

    plan = plan_of("{spark:gender=male} Hi.\n{en_male} Between.\n{spark:gender=male} Again.", library)
    with pytest.raises(sc.ScriptError) as err:
        sc.generate_script(plan, FakeClient(chunks=1, chunk_s=0.2, delay_s=0.01), library, concurrency=2)
    assert err.value.problems[0][0] == 3 and "first segment (line 1)" in str(err.value)
    assert "at least 0.5 s" in str(err.value)
