"""The generation history: atomic appends, updates merged on read, torn lines survived."""

from __future__ import annotations

import json
import multiprocessing as mp

import numpy as np
import pytest
import soundfile as sf

from studio.history import HistoryStore
from tests.conftest import speech_like

AUDIO = speech_like(1.0, 24000)


def rec(i: int, **extra) -> dict:
    return {"model": "f5", "mode": "offline", "status": "ok", "text": f"text {i}", "seed": i,
            "metrics": {"latency_s": 0.1 * (i + 1), "rtf": 0.5}, **extra}


def test_add_stores_audio_and_prompt_and_lists_newest_first(tmp_path):
    h = HistoryStore(tmp_path)
    a = h.add(rec(0), AUDIO, 24000, prompt=AUDIO, prompt_rate=24000)
    b = h.add(rec(1), AUDIO[:100], 24000, prompt=AUDIO, prompt_rate=24000)
    got = h.records()
    assert [r["id"] for r in got] == [b["id"], a["id"]]
    wav, sr = sf.read(h.file(a["audio"]), dtype="float32")
    assert sr == 24000 and np.array_equal(wav, AUDIO)  # float WAV: bit exact
    assert a["prompt_audio"] == b["prompt_audio"], "one file per distinct prompt"
    assert len(list((tmp_path / "history" / "prompts").iterdir())) == 1
    assert h.records(limit=1)[0]["id"] == b["id"]
    assert h.get(a["id"])["text"] == "text 0"


def test_records_without_audio(tmp_path):
    h = HistoryStore(tmp_path)
    r = h.add(rec(0, status="error", error="the server is starting"))
    assert r["audio"] is None and h.file(r["audio"]) is None
    assert h.records()[0]["error"] == "the server is starting"


def test_updates_merge_into_nested_metrics(tmp_path):
    h = HistoryStore(tmp_path)
    r = h.add(rec(3), AUDIO, 24000)
    h.update(r["id"], metrics={"first_sound_ms": 42.0})
    got = h.get(r["id"])
    assert got["metrics"] == {"latency_s": pytest.approx(0.4), "rtf": 0.5, "first_sound_ms": 42.0}
    h.update("no-such-id", metrics={"x": 1})  # ignored on reading
    assert len(h.records()) == 1


def test_torn_last_line_is_skipped_and_sealed(tmp_path):
    h = HistoryStore(tmp_path)
    first = h.add(rec(0))
    with open(h.path, "ab") as fh:
        fh.write(b'{"id": "torn", "model": "f5", "te')  # a crash mid-write
    assert [r["id"] for r in h.records()] == [first["id"]]
    second = h.add(rec(1))
    assert [r["id"] for r in h.records()] == [second["id"], first["id"]]
    lines = h.path.read_bytes().split(b"\n")
    assert json.loads(lines[-2])["id"] == second["id"]


def test_file_refuses_paths_outside_history(tmp_path):
    h = HistoryStore(tmp_path)
    h.add(rec(0), AUDIO, 24000)
    (tmp_path / "secret.wav").write_bytes(b"x")
    assert h.file("../secret.wav") is None
    assert h.file("/etc/passwd") is None


def _writer(data_dir, n, tag):
    h = HistoryStore(data_dir)
    for i in range(n):
        h.add({"model": "spark", "text": tag * 2000, "seed": i})  # long lines: interleaving would show


def test_concurrent_processes_never_interleave_lines(tmp_path):
    procs = [mp.get_context("fork").Process(target=_writer, args=(tmp_path, 40, t)) for t in "abc"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    h = HistoryStore(tmp_path)
    rows = h.records()
    assert len(rows) == 120
    assert len({r["id"] for r in rows}) == 120
    for line in h.path.read_text().splitlines():
        obj = json.loads(line)
        assert set(obj["text"]) <= {"a", "b", "c"} and len(set(obj["text"])) == 1
