"""Listening tests (studio/listening.py, studio/qa_routes.py): sessions built from synthetic batch rows in a real
store, raters answering at once through the HTTP routes, the rules the server enforces, blindness, a kill
mid-session, results and the `results` command."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from studio import listening
from studio.store import open_store, to_json, utc_now

ROOT = Path(__file__).resolve().parent.parent
#: Systems of the synthetic run, with their output rates (F5 writes 24 kHz, Spark 16 kHz).
SYSTEMS = {"f5:nfe_steps=16": 24000, "spark:temperature=0.6": 16000, "f5:nfe_steps=32": 24000}
ROWS = ("r1", "r2", "r3", "r4")
CLIP_S = 0.3


def tone(seconds: float, sr: int, freq: float, level: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (level * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def make_run(store, name: str = "run1", systems: dict = SYSTEMS, rows=ROWS, failed: tuple = ()) -> int:
    """A finished batch run written straight into the store: one short tone per (system, row), a prompt
    clip per row. `failed`: (system, row) pairs recorded as failed, without audio."""
    now = utc_now()
    for row in rows:
        store.write_wav(f"prompts/{row}.wav", tone(0.5, 24000, 220), 24000, "PCM_16")
    with store.transaction() as db:
        run_id = db.execute("INSERT INTO batch_runs (name, created, updated, systems, source, concurrency, status) "
                            "VALUES (?, ?, ?, ?, 'pasted', 1, 'done')", (name, now, now, to_json(list(systems)))
                            ).lastrowid
        for i, row in enumerate(rows):
            db.execute("INSERT INTO batch_rows (run_id, row_id, position, prompt, reference_text, target_text) "
                       "VALUES (?, ?, ?, ?, 'ref text', 'target text')", (run_id, row, i, f"prompts/{row}.wav"))
    for k, (system, sr) in enumerate(systems.items()):
        for j, row in enumerate(rows):
            if (system, row) in failed:
                audio, status = None, "failed"
            else:
                audio = store.write_wav(f"batch/{name}/{system.replace(':', '_')}/{row}.wav",
                                        tone(CLIP_S, sr, 300 + 50 * k + 10 * j), sr)
                status = "done"
            with store.transaction() as db:
                db.execute("INSERT INTO batch_outputs (run_id, system, row_id, status, audio_path, sample_rate, "
                           "updated) VALUES (?, ?, ?, ?, ?, ?, ?)", (run_id, system, row, status, audio, sr, now))
    return run_id


@pytest.fixture(autouse=True)
def instant_playback(monkeypatch):
    """Tests play clips by calling the routes back to back; the rule that an `ended` report cannot come
    sooner than the clip's length after its fetch has its own test (test_ended_too_soon_is_refused)."""
    monkeypatch.setattr(listening, "EARLY_END_TOLERANCE_S", 1e9)


@pytest.fixture()
def store(tmp_path):
    return open_store(tmp_path / "data")


@pytest.fixture()
def run_id(store):
    return make_run(store)


def new_session(store, run_id, kind, raters=2, items=None, systems=None, name=None, seed=1):
    systems = systems or (list(SYSTEMS)[:2] if kind == "ab" else list(SYSTEMS))
    return listening.create_session(store, name=name or f"{kind} test", kind=kind, run_id=run_id, systems=systems,
                                    items_per_rater=items or 100, instructions="Use headphones.", raters=raters,
                                    rng=random.Random(seed))


def tokens(store, session) -> list[str]:
    return [r["token"] for r in listening.raters_of(store, session)]


def play_all(store, token, item_id, kind):
    for clip in listening.CLIPS[kind]:
        listening.clip_file(store, token, item_id, clip)
        listening.record_played(store, token, item_id, clip)


# --- sessions ------------------------------------------------------------------------------------------
def test_migration_two_adds_the_listening_tables(store):
    names = {r[0] for r in store.query("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"listening_sessions", "raters", "rater_items", "answers"} <= names
    assert store.schema_version() >= listening.MIGRATION_VERSION


def test_items_cover_every_unit_in_random_order(store, run_id):
    s = new_session(store, run_id, "mos", raters=2)
    per_rater = []
    for r in listening.raters_of(store, s):
        items = store.query("SELECT row_id, system_a, system_b, id FROM rater_items WHERE rater_id = ? "
                            "ORDER BY position", (r["id"],))
        assert len(items) == len(ROWS) * len(SYSTEMS) == r["total"]
        assert {(i["row_id"], i["system_a"]) for i in items} == {(row, s_) for row in ROWS for s_ in SYSTEMS}
        assert all(re.fullmatch(r"[A-Za-z0-9_-]{16}", i["id"]) for i in items), "opaque ids"
        per_rater.append([(i["row_id"], i["system_a"]) for i in items])
    assert per_rater[0] != per_rater[1], "each rater has their own order"
    assert len(set(tokens(store, s))) == 2 and all(len(t) >= 22 for t in tokens(store, s))


def test_ab_sides_are_balanced_across_raters(store, run_id):
    systems = list(SYSTEMS)  # three systems: three pairs per row
    s = listening.create_session(store, name="ab balance", kind="ab", run_id=run_id, systems=systems,
                                 items_per_rater=100, raters=4, rng=random.Random(3))
    first = {}
    for r in store.query("SELECT row_id, system_a, system_b FROM rater_items"):
        pair = tuple(sorted((r["system_a"], r["system_b"]), key=systems.index))
        first.setdefault((r["row_id"], pair), []).append(r["system_a"] == pair[0])
    assert len(first) == len(ROWS) * 3
    assert all(len(v) == 4 and sum(v) == 2 for v in first.values()), "each pair A-first for exactly half"
    # a fifth rater joining later keeps every pair within one of even
    listening.join(store, s.join_token, rng=random.Random(9))
    first.clear()
    for r in store.query("SELECT row_id, system_a, system_b FROM rater_items"):
        pair = tuple(sorted((r["system_a"], r["system_b"]), key=systems.index))
        first.setdefault((r["row_id"], pair), []).append(r["system_a"] == pair[0])
    assert all(abs(2 * sum(v) - len(v)) <= 1 for v in first.values())


def test_partial_assignments_spread_items_evenly(store, run_id):
    s = new_session(store, run_id, "mos", raters=5, items=5)  # 12 units, 25 items handed out
    counts = [r[0] for r in store.query("SELECT COUNT(*) FROM rater_items GROUP BY row_id, system_a")]
    assert sum(counts) == 25 and len(counts) == 12 and max(counts) - min(counts) <= 1
    assert all(r["total"] == 5 for r in listening.raters_of(store, s))


@pytest.mark.parametrize("change,needle", [
    (dict(name=""), "name"),
    (dict(kind="mushra"), "kind of test"),
    (dict(systems=["f5:nfe_steps=16"], kind="ab"), "at least two"),
    (dict(systems=["f5:nfe_steps=8"]), "not a system of this run"),
    (dict(instructions="Compare F5-TTS with the other one."), "mention"),
    (dict(instructions="spark:temperature=0.6 is the new one"), "mention"),
    (dict(items_per_rater=0), "between 1 and"),
    (dict(items_per_rater="many"), "whole numbers"),
    (dict(raters=-1), "between 0 and"),
    (dict(run_id=999), "no batch run"),
])
def test_create_session_refuses_bad_settings(store, run_id, change, needle):
    kwargs = dict(name="s", kind="mos", run_id=run_id, systems=list(SYSTEMS), items_per_rater=4, raters=1)
    kwargs.update(change)
    with pytest.raises(listening.ListeningError, match=needle):
        listening.create_session(store, **kwargs)
    assert store.query_one("SELECT COUNT(*) FROM listening_sessions")[0] == 0, "nothing half-written"
    assert store.query_one("SELECT COUNT(*) FROM raters")[0] == 0


def test_duplicate_name_and_failed_outputs(store):
    run_id = make_run(store, failed=(("spark:temperature=0.6", "r1"),))
    s = new_session(store, run_id, "ab", raters=1)
    rows = {r["row_id"] for r in store.query("SELECT row_id FROM rater_items")}
    assert rows == {"r2", "r3", "r4"}, "a row whose output failed is left out of the pair"
    with pytest.raises(listening.ListeningError, match="exists already"):
        new_session(store, run_id, "ab", name=s.name)


# --- the rater's rules -----------------------------------------------------------------------------------
def test_rules_the_server_enforces(store, run_id):
    s = new_session(store, run_id, "smos", raters=2)
    t1, t2 = tokens(store, s)
    item = listening.rater_view(store, t1).item
    other = listening.rater_view(store, t2).item
    assert item.clips == ("ref", "a") and item.played == frozenset()
    with pytest.raises(listening.UnknownLink):
        listening.rater_view(store, "not-a-token")
    with pytest.raises(listening.UnknownLink):
        listening.submit_answer(store, "x" * 22, item.id, score=3)
    with pytest.raises(listening.UnknownItem, match="not part of your"):
        listening.clip_file(store, t1, other.id, "a")  # another rater's item
    with pytest.raises(listening.UnknownItem, match="no such clip"):
        listening.clip_file(store, t1, item.id, "b")   # SMOS has no B
    with pytest.raises(listening.NotPlayed, match="to the end"):
        listening.submit_answer(store, t1, item.id, score=4)  # rating before playback
    with pytest.raises(listening.NotPlayed, match="not been loaded"):
        listening.record_played(store, t1, item.id, "ref")  # an 'ended' report without the audio fetch
    listening.clip_file(store, t1, item.id, "a")
    with pytest.raises(listening.NotPlayed, match="reference voice first"):
        listening.record_played(store, t1, item.id, "a")
    listening.clip_file(store, t1, item.id, "ref")
    assert listening.record_played(store, t1, item.id, "ref") == {"ref"}
    with pytest.raises(listening.NotPlayed, match="the sample"):
        listening.submit_answer(store, t1, item.id, score=4)
    assert listening.record_played(store, t1, item.id, "a") == {"ref", "a"}
    for bad in (0, 6, 2.5, "five", True, None, [3]):
        with pytest.raises(listening.ListeningError, match="score"):
            listening.submit_answer(store, t1, item.id, score=bad)
    with pytest.raises(listening.ListeningError, match="not a choice"):
        listening.submit_answer(store, t1, item.id, choice="A", score=3)
    with pytest.raises(listening.ListeningError, match="under"):
        listening.submit_answer(store, t1, item.id, score=3, reason="x" * 600)
    assert store.query_one("SELECT COUNT(*) FROM answers")[0] == 0, "nothing written by refused answers"
    view = listening.submit_answer(store, t1, item.id, score="4")
    assert view.answered == 1 and view.item.id != item.id
    with pytest.raises(listening.AlreadyAnswered, match="final"):
        listening.submit_answer(store, t1, item.id, score=1)
    assert [r["score"] for r in store.query("SELECT score FROM answers")] == [4], "the first answer stays"
    with pytest.raises(listening.UnknownItem):
        listening.submit_answer(store, t2, item.id, score=2)  # rater 2 answering rater 1's item


class _Clock:
    """A stand-in for the `time` module as `studio.listening` uses it: a wall clock the test moves,
    so the rule is checked at exact moments however slowly a loaded machine runs the store."""

    def __init__(self, start: float = 1.8e9):
        self.now = start

    def time(self) -> float:
        return self.now


def test_ended_too_soon_is_refused(store, run_id, monkeypatch):
    monkeypatch.setattr(listening, "EARLY_END_TOLERANCE_S", 0.05)
    clock = _Clock()
    monkeypatch.setattr(listening, "time", clock)
    s = new_session(store, run_id, "mos", raters=1)
    (t,) = tokens(store, s)
    item = listening.rater_view(store, t).item
    listening.clip_file(store, t, item.id, "a")
    clock.now += CLIP_S - 0.06  # just outside the tolerance: no player ends a 0.3 s clip that soon
    with pytest.raises(listening.NotPlayed, match="not played to its end"):
        listening.record_played(store, t, item.id, "a")
    clock.now += 0.02  # inside the tolerance (a player's `ended` may come a little early)
    assert listening.record_played(store, t, item.id, "a") == {"a"}
    assert listening.submit_answer(store, t, item.id, score=3).answered == 1


def test_ab_choices_and_resume(store, run_id):
    s = new_session(store, run_id, "ab", raters=1)
    (t,) = tokens(store, s)
    first = listening.rater_view(store, t)
    play_all(store, t, first.item.id, "ab")
    with pytest.raises(listening.ListeningError, match="Choose A, B"):
        listening.submit_answer(store, t, first.item.id, choice="C")
    with pytest.raises(listening.ListeningError, match="not a score"):
        listening.submit_answer(store, t, first.item.id, choice="A", score=3)
    listening.submit_answer(store, t, first.item.id, choice="B", reason="  crisper  ")
    second = listening.rater_view(store, t)
    play_all(store, t, second.item.id, "ab")
    listening.submit_answer(store, t, second.item.id, choice="none")
    # leaving and coming back: the link shows the first unanswered item, with its played state
    third = listening.rater_view(store, t)
    listening.clip_file(store, t, third.item.id, "a")
    listening.record_played(store, t, third.item.id, "a")
    again = listening.rater_view(store, t)
    assert again.answered == 2 and again.item.id == third.item.id and again.item.position == 2
    assert again.item.played == {"a"}
    recs = listening.answer_records(store, s)
    item1 = store.query_one("SELECT system_a, system_b FROM rater_items WHERE id = ?", (first.item.id,))
    assert recs[0]["side"] == "B" and recs[0]["choice"] == item1["system_b"] and recs[0]["reason"] == "crisper"
    assert recs[1]["side"] == "none" and recs[1]["choice"] is None


# --- through the HTTP routes: two raters at once, for each kind --------------------------------------------
def http_client(store):
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from studio.qa_routes import routes

    return TestClient(Starlette(routes=routes(lambda: store)))


ITEM_RE = re.compile(r'data-item="([^"]+)"')
CLIPS_RE = re.compile(r'data-clips="([^"]+)"')


def rate_everything(http, token: str, kind: str, rng: random.Random, answered: list, leave_after: int | None = None):
    """One rater through their whole session over HTTP, as the page's script does; returns what they sent."""
    base = f"/qa/r/{token}"
    sent = 0
    while True:
        page = http.get(base)
        assert page.status_code == 200
        m = ITEM_RE.search(page.text)
        if m is None:
            assert 'id="done"' in page.text
            return
        item, clips = m.group(1), CLIPS_RE.search(page.text).group(1).split()
        for clip in clips:
            audio = http.get(f"{base}/audio/{item}/{clip}")
            assert audio.status_code == 200 and audio.content[:4] == b"RIFF"
            r = http.post(f"{base}/played", json={"item": item, "clip": clip})
            assert r.status_code == 200, r.text
        body = {"item": item}
        if kind == "ab":
            body.update(choice=rng.choice(listening.AB_CHOICES), reason=rng.choice(["", "clearer"]))
        else:
            body["score"] = rng.randint(1, 5)
        r = http.post(f"{base}/answer", json=body)
        assert r.status_code == 200, r.text
        answered.append((token, body))
        sent += 1
        if leave_after is not None and sent == leave_after:
            return


@pytest.mark.parametrize("kind", ["ab", "mos", "smos"])
def test_two_raters_at_once_every_answer_stored(store, run_id, kind):
    s = new_session(store, run_id, kind, raters=2, items=6, systems=list(SYSTEMS))  # 12 units of each kind
    answered: list = []
    errors: list = []

    def rater(token, seed):
        try:
            with http_client(store) as http:
                rate_everything(http, token, kind, random.Random(seed), answered, leave_after=2)  # leaves...
                rate_everything(http, token, kind, random.Random(seed + 10), answered)             # ...and resumes
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=rater, args=(t, i)) for i, t in enumerate(tokens(store, s))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors, errors
    assert len(answered) == 12
    recs = listening.answer_records(store, s)
    assert len(recs) == 12 and all(r["total"] == r["answered"] == 6 for r in listening.raters_of(store, s))
    stored = {(r["rater"], r["item"], r["position"]): r for r in recs}
    assert len(stored) == 12
    if kind == "ab":
        sides = sorted(r["side"] for r in recs)
        assert sides == sorted(b["choice"] for _, b in answered)
    else:
        assert sorted(r["score"] for r in recs) == sorted(b["score"] for _, b in answered)
    rep = listening.report(store, s)
    assert rep["answers"] == 12
    assert rep["tables"]["ab" if kind == "ab" else "ratings"], "statistics computed"


def test_routes_refuse_bad_requests_with_clear_messages(store, run_id):
    s = new_session(store, run_id, "mos", raters=2)
    t1, t2 = tokens(store, s)
    with http_client(store) as http:
        bad = http.get("/qa/r/nope")
        assert bad.status_code == 404 and "not valid" in bad.text
        item = ITEM_RE.search(http.get(f"/qa/r/{t1}").text).group(1)
        other = ITEM_RE.search(http.get(f"/qa/r/{t2}").text).group(1)
        r = http.post(f"/qa/r/{t1}/answer", json={"item": item, "score": 3})
        assert r.status_code == 409 and "before answering" in r.json()["error"]
        assert http.get(f"/qa/r/{t1}/audio/{other}/a").status_code == 404
        assert http.get(f"/qa/r/nope/audio/{item}/a").status_code == 404
        assert http.post(f"/qa/r/{t1}/played", content=b"{oops").json()["error"] == "Send a JSON object."
        r = http.post(f"/qa/r/{t1}/played", json={"item": item, "clip": "a"})
        assert r.status_code == 409 and "not been loaded" in r.json()["error"]
        http.get(f"/qa/r/{t1}/audio/{item}/a")
        assert http.post(f"/qa/r/{t1}/played", json={"item": item, "clip": "a"}).json()["played"] == ["a"]
        r = http.post(f"/qa/r/{t1}/answer", json={"item": item, "score": 9})
        assert r.status_code == 400 and "1 to 5" in r.json()["error"]
        assert http.post(f"/qa/r/{t1}/answer", json={"item": item, "score": 5}).status_code == 200
        r = http.post(f"/qa/r/{t1}/answer", json={"item": item, "score": 2})
        assert r.status_code == 409 and "final" in r.json()["error"]
        assert http.post(f"/qa/r/{t1}/answer", content=b"x" * 9000).status_code == 400
    assert [r["score"] for r in listening.answer_records(store, s)] == [5]


def test_a_damaged_clip_is_a_clear_error(store, run_id):
    s = new_session(store, run_id, "mos", raters=1)
    (token,) = tokens(store, s)
    with http_client(store) as http:
        item = ITEM_RE.search(http.get(f"/qa/r/{token}").text).group(1)
        row = store.query_one("SELECT row_id, system_a FROM rater_items WHERE id = ?", (item,))
        rel = store.query_one("SELECT audio_path FROM batch_outputs WHERE row_id = ? AND system = ?",
                              (row["row_id"], row["system_a"]))[0]
        store.abspath(rel).write_bytes(b"RIFF\x00\x00not a wav")
        r = http.get(f"/qa/r/{token}/audio/{item}/a")
        assert r.status_code == 500 and "tell the organiser" in r.json()["error"]


def test_join_link_makes_one_rater_per_browser(store, run_id):
    s = new_session(store, run_id, "mos", raters=0, items=3)
    with http_client(store) as http:
        page = http.get(f"/qa/join/{s.join_token}")
        assert page.status_code == 200 and "Start" in page.text
        assert not listening.raters_of(store, s), "opening the link (a link preview) makes no rater"
        r = http.post(f"/qa/join/{s.join_token}", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/qa/r/")
        again = http.get(f"/qa/join/{s.join_token}", follow_redirects=False)
        assert again.status_code == 303 and again.headers["location"] == r.headers["location"], "resumes by cookie"
        assert http.post(f"/qa/join/{s.join_token}", follow_redirects=False).headers["location"] == \
            r.headers["location"]
        assert http.get("/qa/join/wrong").status_code == 404
    with http_client(store) as other_browser:
        other_browser.post(f"/qa/join/{s.join_token}")
    raters = listening.raters_of(store, s)
    assert [r["label"] for r in raters] == ["rater 1 (joined)", "rater 2 (joined)"]
    assert all(r["total"] == 3 for r in raters)


def test_nothing_on_the_rater_side_names_a_system_or_file(store, run_id):
    s = new_session(store, run_id, "ab", raters=1, systems=list(SYSTEMS))
    (token,) = tokens(store, s)
    secrets_ = secret_words(store)
    with http_client(store) as http:
        rate_everything(http, token, "ab", random.Random(0), [], leave_after=1)
        page = http.get(f"/qa/r/{token}")
        item = ITEM_RE.search(page.text).group(1)
        served = [http.get(f"/qa/r/{token}/audio/{item}/{c}") for c in ("a", "b")]
    for resp in [page, *served]:
        blob = (resp.text if resp is page else "") + " ".join(f"{k}: {v}" for k, v in resp.headers.items())
        for word in secrets_:
            assert not mentions(word, blob), f"{word!r} leaked in {resp.url}"
    import soundfile as sf
    import io

    infos = [sf.info(io.BytesIO(r.content)) for r in served]
    assert {i.samplerate for i in infos} == {listening.SERVE_RATE}, "F5 (24 kHz) and Spark (16 kHz) look alike"
    assert {i.subtype for i in infos} == {"PCM_16"}


def mentions(word: str, text: str) -> bool:
    """Whether `text` names `word` (case-insensitive). Short words must stand alone: random tokens and item
    ids (base64url) contain strings like "f5" by chance about once in a hundred ids."""
    if len(word) <= 4:
        return re.search(rf"(?<![A-Za-z0-9_-]){re.escape(word)}(?![A-Za-z0-9_-])", text, re.IGNORECASE) is not None
    return word.casefold() in text.casefold()


def secret_words(store) -> list[str]:
    """What a rater must never see: system strings and families, model names, output file names and folders."""
    words = {"f5", "spark", "F5-TTS", "Spark-TTS", "nfe_steps", "temperature", "batch/", ".wav", "run1"}
    words |= set(SYSTEMS)
    for r in store.query("SELECT audio_path FROM batch_outputs WHERE audio_path IS NOT NULL"):
        words |= {r["audio_path"], Path(r["audio_path"]).name, Path(r["audio_path"]).parent.name}
    return sorted(words)


# --- a kill mid-session ------------------------------------------------------------------------------------
SERVER_CODE = """
import sys, uvicorn
from starlette.applications import Starlette
from studio.qa_routes import routes
from studio.store import open_store
store = open_store(sys.argv[1])
uvicorn.run(Starlette(routes=routes(lambda: store)), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post_json(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_sigkill_mid_session_keeps_every_confirmed_answer(store, run_id, tmp_path):
    """The rater routes in their own server process; two raters answer over HTTP while it is SIGKILLed.
    Afterwards the database passes integrity_check and holds every answer the server had confirmed."""
    s = new_session(store, run_id, "mos", raters=2)
    toks = tokens(store, s)
    # play every clip up front (through the module: same database), so the raters only answer
    for t in toks:
        for r in store.query("SELECT i.id FROM rater_items i JOIN raters r ON r.id = i.rater_id WHERE r.token = ?",
                             (t,)):
            play_all(store, t, r["id"], "mos")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER_CODE, str(store.root), str(port)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    confirmed: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/qa/r/{toks[0]}", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "the rater server did not start"
                time.sleep(0.2)

        def rater(token):
            items = [r["id"] for r in store.query("SELECT i.id FROM rater_items i JOIN raters r ON r.id = i.rater_id "
                                                  "WHERE r.token = ? ORDER BY i.position", (token,))]
            for item in items:
                if stop.is_set():
                    return
                try:
                    status, _ = post_json(f"http://127.0.0.1:{port}/qa/r/{token}/answer", {"item": item, "score": 3})
                except OSError:
                    return  # the server died under this request: not confirmed
                if status == 200:
                    with lock:
                        confirmed.append(item)

        threads = [threading.Thread(target=rater, args=(t,)) for t in toks]
        for th in threads:
            th.start()
        while len(confirmed) < 5 and any(th.is_alive() for th in threads):
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)  # only the server this test started
        stop.set()
        for th in threads:
            th.join(30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    assert len(confirmed) >= 5
    import sqlite3

    db = sqlite3.connect(store.path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = {r[0] for r in db.execute("SELECT item_id FROM answers")}
    finally:
        db.close()
    assert set(confirmed) <= stored, "an answer the server confirmed is missing"
    print(f"\n[kill] {len(confirmed)} answers confirmed before SIGKILL, {len(stored)} stored")


# --- results -------------------------------------------------------------------------------------------------
def answer_all(store, session, rng):
    for token in tokens(store, session):
        while (view := listening.rater_view(store, token)).item is not None:
            play_all(store, token, view.item.id, session.kind)
            if session.kind == "ab":
                listening.submit_answer(store, token, view.item.id, choice=rng.choice(listening.AB_CHOICES))
            else:
                listening.submit_answer(store, token, view.item.id, score=rng.randint(1, 5))


def test_export_and_results_command(store, run_id, tmp_path):
    s = new_session(store, run_id, "mos", raters=3, items=6)
    answer_all(store, s, random.Random(5))
    out = listening.export(store, s, tmp_path / "out")
    data = json.loads(out["json"].read_text())
    assert data["session"]["name"] == s.name and len(data["records"]) == 18
    assert {r["system"] for r in data["tables"]["ratings"]} <= set(SYSTEMS)
    assert out["plot"].read_bytes()[:4] == b"\x89PNG"
    assert out["answers_csv"].read_text().splitlines()[0].startswith("rater,item,position,system,score")
    proc = subprocess.run([sys.executable, "-m", "studio", "results", s.name, "--data-dir", str(store.root),
                           "--out", str(tmp_path / "cli")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "f5:nfe_steps=16" in proc.stdout and "18 answers" in proc.stdout
    assert "Mean X - Y" in proc.stdout and "Krippendorff" in proc.stdout
    assert (tmp_path / "cli" / "mos_test.json").is_file() and (tmp_path / "cli" / "csv" / "ratings.csv").is_file()
    bad = subprocess.run([sys.executable, "-m", "studio", "results", "nope", "--data-dir", str(store.root)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no listening session named 'nope'" in bad.stderr
