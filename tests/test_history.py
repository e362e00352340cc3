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


def test_legacy_jsonl_is_imported_once_torn_line_skipped(tmp_path):
    """history.jsonl of earlier versions: records and their update lines come in once, the file stays."""
    folder = tmp_path / "history"
    (folder / "audio").mkdir(parents=True)
    sf.write(folder / "audio" / "old-1.wav", AUDIO, 24000, subtype="FLOAT")
    lines = [{**rec(0), "id": "old-1", "time": "2026-01-01T00:00:00Z", "audio": "audio/old-1.wav",
              "sample_rate": 24000, "prompt_audio": None, "demo_weights": True},
             {**rec(1), "id": "old-2", "time": "2026-01-01T00:00:05Z", "audio": None},
             {"id": "old-1", "update": {"metrics": {"first_sound_ms": 40.0}}}]
    legacy = folder / "history.jsonl"
    legacy.write_bytes(b"".join(json.dumps(x).encode() + b"\n" for x in lines) + b'{"id": "torn", "te')
    h = HistoryStore(tmp_path)
    got = h.records()
    assert [r["id"] for r in got] == ["old-2", "old-1"]
    old = h.get("old-1")
    assert old["metrics"] == {"latency_s": pytest.approx(0.1), "rtf": 0.5, "first_sound_ms": 40.0}
    assert old["demo_weights"] is True and old["time"] == "2026-01-01T00:00:00Z"
    assert np.array_equal(sf.read(h.file(old["audio"]), dtype="float32")[0], AUDIO)
    new = h.add(rec(2))
    h.update("old-1", notes="kept")
    assert len(HistoryStore(tmp_path).records()) == 3, "reopening imports nothing twice"
    assert h.get("old-1")["notes"] == "kept" and h.get("old-1")["metrics"]["first_sound_ms"] == 40.0
    assert legacy.is_file(), "the old file is kept"
    assert h.records()[0]["id"] == new["id"]
    with open(legacy, "ab") as fh:  # an older studio appended after the import: only the new id comes in
        fh.write(b"\n" + json.dumps({**rec(3), "id": "old-3", "time": "2026-01-02T00:00:00Z"}).encode() + b"\n")
    assert {r["id"] for r in HistoryStore(tmp_path).records()} == {"old-1", "old-2", "old-3", new["id"]}
    assert h.get("old-1")["notes"] == "kept"


def test_file_refuses_paths_outside_history(tmp_path):
    h = HistoryStore(tmp_path)
    h.add(rec(0), AUDIO, 24000)
    (tmp_path / "secret.wav").write_bytes(b"x")
    assert h.file("../secret.wav") is None
    assert h.file("/etc/passwd") is None


def _writer(data_dir, n, tag):
    h = HistoryStore(data_dir)
    for i in range(n):
        h.add({"model": "spark", "text": tag * 2000, "seed": i})  # long rows: a torn one would show


def test_concurrent_processes_lose_and_tear_nothing(tmp_path):
    HistoryStore(tmp_path)  # the parent has the store open too (its connection must not leak into children)
    procs = [mp.get_context("fork").Process(target=_writer, args=(tmp_path, 40, t)) for t in "abc"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    h = HistoryStore(tmp_path)
    rows = h.records()
    assert len(rows) == 120
    assert len({r["id"] for r in rows}) == 120
    for r in rows:
        assert len(r["text"]) == 2000 and len(set(r["text"])) == 1
    assert h.store.query_one("PRAGMA integrity_check")[0] == "ok"


_KILL_WRITER = """
import sys
import numpy as np
from studio.history import HistoryStore
h = HistoryStore(sys.argv[1])
audio = np.full(24000, 0.25, np.float32)
i = 0
while True:
    r = h.add({"model": "f5", "text": "row %d" % i, "metrics": {"latency_s": 0.1}}, audio, 24000)
    print(r["id"], flush=True)  # printed only after the commit returned
    i += 1
"""


@pytest.mark.slow
def test_killed_writer_loses_nothing_committed(tmp_path):
    """SIGKILL a process mid-stream of adds: every add that returned is there with its audio."""
    import os
    import signal
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-c", _KILL_WRITER, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True, cwd=root)
    committed = []
    try:
        while len(committed) < 25:
            line = proc.stdout.readline()
            assert line, "the writer died early"
            committed.append(line.strip())
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # mid-write: it keeps adding until killed
        proc.wait(30)
    h = HistoryStore(tmp_path)
    assert h.store.query_one("PRAGMA integrity_check")[0] == "ok"
    stored = {r["id"]: r for r in h.records()}
    assert set(committed) <= set(stored)
    for rid in committed:
        wav, sr = sf.read(h.file(stored[rid]["audio"]), dtype="float32")
        assert sr == 24000 and wav.size == 24000
    h.add(rec(9))  # and the store takes writes again
