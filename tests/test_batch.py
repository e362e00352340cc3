"""Batch runs: test sets and their errors, files: systems, the runner (fake and real Triton), kill and resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from studio.batch import (BatchInputError, output_path, parse_test_set, prepare_run, read_test_set, run_batch,
                          run_outputs, run_summary, sniff_delimiter)
from studio.store import Store
from studio.voices import SAMPLES_DIR, VoiceLibrary

ROOT = Path(__file__).resolve().parent.parent
PROMPT = SAMPLES_DIR / "en_female.wav"
PROMPT_TEXT = (SAMPLES_DIR / "en_female.txt").read_text("utf-8").strip()
HEADER = "id,prompt,reference_text,target_text,seed\n"


def csv_rows(n: int, prompt: str = str(PROMPT), ref: str = PROMPT_TEXT) -> str:
    return HEADER + "".join(f'r{i},{prompt},"{ref}","Row {i}, short.",{i}\n' for i in range(n))


@pytest.fixture()
def store(tmp_path):
    return Store(tmp_path / "data")


@pytest.fixture()
def voices(tmp_path):
    return VoiceLibrary(tmp_path / "data", SAMPLES_DIR)


def files_dir(tmp_path: Path, ids, seconds: float = 0.5, sr: int = 24000) -> Path:
    folder = tmp_path / "made"
    folder.mkdir(exist_ok=True)
    for i, rid in enumerate(ids):
        sf.write(folder / f"{rid}.wav", np.full(int(seconds * sr), 0.1 * (i + 1), np.float32), sr)
    return folder


def nothing_written(store: Store) -> bool:
    counts = [store.query_one(f"SELECT COUNT(*) FROM {t}")[0] for t in
              ("batch_runs", "batch_rows", "batch_outputs", "generations")]
    return counts == [0, 0, 0, 0] and not (store.root / "batch").exists()


# --- test sets ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("delimiter", [",", "\t", ";", "|"])
def test_delimiters_are_sniffed(delimiter):
    text = delimiter.join(["id", "prompt", "reference_text", "target_text"]) + "\n" + \
        delimiter.join(["a", "en_male", "the ref", "Hello there friend"]) + "\n"
    assert sniff_delimiter(text) == delimiter
    ts = parse_test_set(text)
    assert [(r.row_id, r.prompt, r.reference_text, r.target_text, r.seed) for r in ts.rows] == \
        [("a", "en_male", "the ref", "Hello there friend", None)]


def test_quoted_cells_bom_seed_and_case_insensitive_header(tmp_path):
    path = tmp_path / "set.csv"
    path.write_bytes("\ufeffID, Prompt ,Reference_Text,target_text,seed\n"
                     'x1,en_male,"Hi, you.","Say ""this"", then stop.",42\n'.encode("utf-8"))
    ts = read_test_set(path)
    row = ts.rows[0]
    assert (row.row_id, row.reference_text, row.target_text, row.seed) == ("x1", "Hi, you.",
                                                                            'Say "this", then stop.', 42)
    assert ts.base_dir == tmp_path and ts.source == str(path)


def test_empty_rows_are_skipped_and_reported():
    ts = parse_test_set(HEADER + "a,en_male,,Hello.,\n,,,,\n\n  ,\t, ,,\nb,en_male,,Bye.,\n")
    assert [r.row_id for r in ts.rows] == ["a", "b"]
    assert ts.skipped_empty == (3, 4, 5) and "skipped 3 empty row(s) (line 3, 4, 5)" in ts.note()


@pytest.mark.parametrize("text, words", [
    ("id,prompt,target_text\na,b,c\n", ["missing column(s) reference_text"]),
    ("id;prompt;reference_text\na;b;c\n", ["missing column(s) target_text", "split at ';'"]),
    ("id,prompt,reference_text,target_text,speaker\n", ["unknown column(s) speaker"]),
    ("id,prompt,reference_text,target_text,id\n", ["id given twice"]),
    (HEADER, ["no rows"]),
    (HEADER + ",,,,\n", ["no rows", "1 empty rows skipped"]),
    ("", ["is empty"]),
    (",,,\n", ["no header"]),
    (HEADER + "a,en_male,,Hello.,\na,en_male,,Again.,\n", ["line 3: id 'a' again (first on line 2)"]),
    (HEADER + "a,en_male,,,\n", ["line 2 (id a): empty target_text"]),
    (HEADER + "a,,,Hello.,\n", ["line 2 (id a): empty prompt"]),
    (HEADER + ",en_male,,Hello.,\n", ["line 2: empty id"]),
    (HEADER + "a/b,en_male,,Hello.,\n", ["id 'a/b' cannot name a file"]),
    (HEADER + "a,en_male,,Hello.,-3\n", ["seed '-3' is not a whole number"]),
    (HEADER + "a,en_male,,Hello.,1.5\n", ["seed '1.5'"]),
    (HEADER + "a,en_male,,Hello, world.,\n", ["line 2: 6 cells for 5 columns", "double quotes"]),
])
def test_bad_test_sets_say_what_is_wrong(text, words):
    with pytest.raises(BatchInputError) as err:
        parse_test_set(text)
    for word in words:
        assert word in str(err.value), str(err.value)


def test_every_problem_is_listed_at_once():
    text = HEADER + "a,en_male,,,\nb,,,Hi.,\na,en_male,,Hi.,\n"
    with pytest.raises(BatchInputError) as err:
        parse_test_set(text)
    msg = str(err.value)
    assert "empty target_text" in msg and "empty prompt" in msg and "again" in msg


def test_not_utf8_is_refused_with_the_line(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes((HEADER + "a,en_male,,Caf\xe9 au lait.,\n").encode("latin-1"))
    with pytest.raises(BatchInputError, match=r"not UTF-8 text \(byte 0xe9 on line 2\)"):
        read_test_set(path)
    with pytest.raises(BatchInputError, match="no such file"):
        read_test_set(tmp_path / "nope.csv")
    (tmp_path / "sheet.csv").write_bytes(b"PK\x03\x04\x00\x00binary")
    with pytest.raises(BatchInputError, match="xlsx"):
        read_test_set(tmp_path / "sheet.csv")


# --- checks against prompts, voices and systems: nothing written when refused ----------------------------
@pytest.mark.parametrize("rows, systems, words", [
    (HEADER + "a,no_such_voice,ref,Hello.,\n", ["f5"], ["prompt 'no_such_voice': unknown voice", "en_female"]),
    (HEADER + "a,clips/missing.wav,ref,Hello.,\n", ["f5"], ["missing audio file", "clips/missing.wav"]),
    (HEADER + f"a,{PROMPT},,Hello.,\n", ["f5"], ["empty reference_text; F5-TTS needs"]),
    (HEADER + "a,en_male,,Hello.,\n", ["tacotron"], ["unknown family"]),
    (HEADER + "a,en_male,,Hello.,\n", ["f5:nfe_steps=0"], ["nfe_steps='0'", "out of range"]),
    (HEADER + "a,en_male,,Hello.,\n", ["f5", "f5:"], ["nothing after"]),
    (HEADER + "a,en_male,,Hello.,\n", ["spark", "spark"], ["same system"]),
    (HEADER + "a,en_male,,Hello.,\n", [], ["no systems"]),
])
def test_bad_runs_write_nothing(tmp_path, store, voices, rows, systems, words):
    ts = parse_test_set(rows, base_dir=tmp_path)
    with pytest.raises(BatchInputError) as err:
        prepare_run(store, "run", ts, systems, voices)
    for word in words:
        assert word in str(err.value), str(err.value)
    assert nothing_written(store)


def test_files_folder_missing_ids_or_bad_wavs_writes_nothing(tmp_path, store, voices):
    ts = parse_test_set(csv_rows(4), base_dir=tmp_path)
    folder = files_dir(tmp_path, ["r0", "r1"])
    with pytest.raises(BatchInputError, match=r"no WAV for 2 of 4 row id\(s\) .* \(r2, r3\)"):
        prepare_run(store, "run", ts, [f"files:{folder}"], voices)
    files_dir(tmp_path, ["r2", "r3"])
    (folder / "r2.wav").write_bytes(b"")
    sf.write(folder / "r3.wav", np.zeros(0, np.float32), 24000)
    with pytest.raises(BatchInputError) as err:
        prepare_run(store, "run", ts, ["files:made"], voices)  # relative to the test set's folder
    assert "r2.wav is not a readable WAV" in str(err.value) and "r3.wav holds no audio" in str(err.value)
    with pytest.raises(BatchInputError, match="is not a folder"):
        prepare_run(store, "run", ts, ["files:nowhere"], voices)
    assert nothing_written(store)


def test_voice_prompts_take_the_voice_transcript(tmp_path, store, voices):
    ts = parse_test_set(HEADER + "a,en_male,,Hello.,\n", base_dir=tmp_path)
    run = prepare_run(store, "voices", ts, ["f5"], voices)
    male = (SAMPLES_DIR / "en_male.txt").read_text("utf-8").strip()
    assert run.rows[0].prompt == "en_male" and run.rows[0].reference_text == male


def test_voice_creation_needs_no_prompt(tmp_path, store, voices):
    ts = parse_test_set(HEADER + "a,unknown_voice,,Hello.,\n", base_dir=tmp_path)
    run = prepare_run(store, "design", ts, ["spark:gender=female,pitch_level=high"], voices)
    assert run.systems[0].voice_creation


def test_resume_refuses_another_test_set(tmp_path, store, voices):
    folder = files_dir(tmp_path, ["r0", "r1", "r2"])
    prepare_run(store, "same", parse_test_set(csv_rows(2), base_dir=tmp_path), [f"files:{folder}"], voices)
    with pytest.raises(BatchInputError, match=r"different test set \(new id\(s\) r2\)"):
        prepare_run(store, "same", parse_test_set(csv_rows(3), base_dir=tmp_path), [], voices)
    changed = csv_rows(2).replace("Row 1, short.", "Row 1, changed.")
    with pytest.raises(BatchInputError, match=r"changed row\(s\) r1"):
        prepare_run(store, "same", parse_test_set(changed, base_dir=tmp_path), [], voices)
    with pytest.raises(BatchInputError, match="no run called 'other' to resume"):
        prepare_run(store, "other", None, [], voices)
    run = prepare_run(store, "same", None, [], voices)  # no test set: the stored rows
    assert run.resumed and [r.row_id for r in run.rows] == ["r0", "r1"]


# --- running -------------------------------------------------------------------------------------------
def test_files_system_imports_wavs_without_a_server(tmp_path, store, voices):
    ts = parse_test_set(csv_rows(3), base_dir=tmp_path)
    folder = files_dir(tmp_path, ["r0", "r1", "r2"], seconds=0.25, sr=16000)
    run = prepare_run(store, "imported", ts, [f"files:{folder}"], voices)
    seen = []
    progress = run_batch(store, run, None, on_progress=lambda p: seen.append((p.done, p.total)))
    assert progress.done == 3 and progress.failed == 0 and seen[-1] == (3, 3)
    outs = run_outputs(store, "imported")
    assert [o["row_id"] for o in outs] == ["r0", "r1", "r2"] and {o["status"] for o in outs} == {"done"}
    for o in outs:
        assert o["metrics"]["audio_s"] == 0.25 and "latency_s" not in o["metrics"] and o["generation_id"] is None
        assert store.file(o["audio_path"]).read_bytes() == (folder / f"{o['row_id']}.wav").read_bytes()
        assert not Path(o["audio_path"]).is_absolute()
    assert run_summary(store, "imported")["status"] == "done"


class FakeResult:
    def __init__(self, seed):
        self.audio = np.full(1600, 0.2, np.float32)
        self.sample_rate, self.latency_s, self.first_chunk_s, self.audio_s = 16000, 0.05, 0.05, 0.1
        self.rtf, self.info, self.chunk_arrivals_s = 0.5, {"compute_ms": 3.0, "tokens": 5}, [0.05]
        self.seed, self.demo_weights = seed, True


class FakeClient:
    """Fails the rows in `fail`; counts calls per row; records the requests."""

    def __init__(self, fail=()):
        self.fail, self.calls, self.lock = set(fail), [], threading.Lock()

    def synthesize(self, model, text, ref, ref_text, stream=False, params=None, cancel=None, timeout_s=None):
        from studio.client import SynthesisError

        with self.lock:
            self.calls.append((model, text, None if ref is None else ref.size, ref_text, stream, dict(params)))
        if any(text == f"Row {i}, short." for i in self.fail):
            raise SynthesisError("target_text is too long for the demo")
        return FakeResult(params.get("seed", 7))


def test_runner_records_failures_and_retries_only_those(tmp_path, store, voices):
    ts = parse_test_set(csv_rows(4), base_dir=tmp_path)
    run = prepare_run(store, "retry", ts, ["spark:max_new_tokens=5,stream", "spark:gender=male,seed=99"], voices)
    first = FakeClient(fail={1})
    progress = run_batch(store, run, first, concurrency=3)
    assert (progress.done, progress.failed, progress.total) == (6, 2, 8)
    assert run_summary(store, "retry")["status"] == "failed"
    assert {(f["row_id"], f["error"]) for f in run_summary(store, "retry")["failures"]} == \
        {("r1", "target_text is too long for the demo")}
    clone = [c for c in first.calls if c[2] is not None]
    assert all(c[2] == pytest.approx(3.1 * 16000, rel=0.02) and c[4] for c in clone), "prompt at 16 kHz, streaming"
    assert {c[5]["seed"] for c in clone} == {0, 1, 2, 3}, "each row's seed"
    design = [c for c in first.calls if c[2] is None]
    assert {c[5]["seed"] for c in design} == {99} and all(c[3] == "" for c in design), "the system's seed wins"
    again = FakeClient()
    progress = run_batch(store, prepare_run(store, "retry", ts, [], voices), again)
    assert len(again.calls) == 2 and {c[1] for c in again.calls} == {"Row 1, short."}
    assert (progress.done, progress.failed, progress.skipped) == (8, 0, 6)
    assert run_summary(store, "retry")["status"] == "done"
    gens = store.query("SELECT * FROM generations WHERE batch_run = ?", (run.run_id,))
    assert len(gens) == 8, "one generation row per done output"
    assert not store.query("SELECT 1 FROM generations WHERE batch_run IS NULL")
    out = run_outputs(store, "retry")[0]
    system = next(s for s in run.systems if s.spec == out["system"])
    assert out["audio_path"] == output_path(run, system, out["row_id"]) and store.file(out["audio_path"])
    assert out["metrics"]["latency_s"] == 0.05 and out["metrics"]["seed"] is not None


def test_saved_voice_prompt_is_referenced_and_a_broken_callback_is_survived(tmp_path, store, voices):
    from tests.conftest import speech_like

    voices.save("Ann", speech_like(2.0, 24000), 24000, "Ann's own words.")
    ts = parse_test_set(HEADER + "a,Ann,,Hello.,\n", base_dir=tmp_path)
    run = prepare_run(store, "saved", ts, ["f5"], voices)
    assert run.rows[0].reference_text == "Ann's own words."

    def broken(progress):
        raise RuntimeError("display gone")

    progress = run_batch(store, run, FakeClient(), voices=voices, on_progress=broken)
    assert progress.done == 1 and "display gone" in progress.last_error
    gen = store.query_one("SELECT * FROM generations WHERE batch_run = ?", (run.run_id,))
    assert gen["prompt_path"] == "voices/Ann/prompt.wav" and store.file(gen["prompt_path"])
    assert gen["voice"] == "Ann" and gen["ref_text"] == "Ann's own words."


def test_stop_event_ends_a_run_as_stopped(tmp_path, store, voices):
    ts = parse_test_set(csv_rows(5), base_dir=tmp_path)
    run = prepare_run(store, "stop", ts, ["spark"], voices)
    stop = threading.Event()

    def on_progress(p):
        if p.done >= 2:
            stop.set()

    progress = run_batch(store, run, FakeClient(), concurrency=1, stop=stop, on_progress=on_progress)
    assert progress.stopped and progress.done == 2
    assert run_summary(store, "stop")["status"] == "stopped"


def test_cli_refuses_bad_input_and_runs_files_without_a_server(tmp_path, capsys):
    from studio.cli import main

    data = tmp_path / "data"
    bad = tmp_path / "bad.csv"
    bad.write_text("id,prompt,target_text\na,en_male,Hi.\n", "utf-8")
    assert main(["batch", str(bad), "--system", "f5", "-o", "x", "--data-dir", str(data)]) == 2
    assert "missing column(s) reference_text" in capsys.readouterr().err
    good = tmp_path / "good.csv"
    good.write_text(csv_rows(2) + ",,,,\n", "utf-8")
    assert main(["batch", str(good), "--system", "files:nowhere", "-o", "x", "--data-dir", str(data)]) == 2
    assert "nowhere is not a folder" in capsys.readouterr().err
    files_dir(tmp_path, ["r0", "r1"])
    assert main(["batch", str(good), "--system", "files:made", "-o", "x", "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out
    assert "note: skipped 1 empty row(s) (line 4)" in out
    assert "[x] 2/2 done" in out and f"run 'x' (id 1, done) in {data / 'studio.db'}" in out
    assert main(["batch", "--system", "files:made", "-o", "x", "--data-dir", str(data)]) == 0  # resume: nothing left
    assert "resuming run 'x'" in capsys.readouterr().out


def test_background_job_reports_progress_and_lists_runs(tmp_path, store, voices):
    from studio.batch import BatchJob, list_runs

    ts = parse_test_set(csv_rows(3), base_dir=tmp_path)
    run = prepare_run(store, "bg", ts, ["spark", "f5"], voices)
    assert run.systems[0].spec == "spark" and list_runs(store)[0]["status"] == "created"
    job = BatchJob(store, run, FakeClient(fail={2}), concurrency=2)
    assert job.progress()["total"] == 6 and not job.finished
    final = job.start().wait(60)
    assert job.finished and final["finished"] and (final["done"], final["failed"]) == (4, 2) and final["error"] is None
    [listed] = list_runs(store)
    assert (listed["name"], listed["status"], listed["rows"], listed["done"], listed["failed"]) == \
        ("bg", "failed", 3, 4, 2)
    broken = BatchJob(store, run, None).start().wait(60)  # model outputs left and no client: a clear error
    assert broken["finished"] and "needs a Triton client" in broken["error"]
    with store.transaction() as db:  # deleting a run takes its rows, outputs and generations along
        db.execute("DELETE FROM batch_runs WHERE id = ?", (run.run_id,))
    assert [store.query_one(f"SELECT COUNT(*) FROM {t}")[0] for t in ("batch_rows", "batch_outputs", "generations")] \
        == [0, 0, 0]


# --- with the real server ---------------------------------------------------------------------------------
MODEL_SYSTEMS = ["f5:nfe_steps=2", "spark:max_new_tokens=8,top_k=1"]


@pytest.mark.slow
def test_batch_over_two_model_systems_and_files_completes(tmp_path, client, voices):
    store = Store(tmp_path / "data")
    rows = HEADER + "".join(f'r{i},{"en_male" if i % 2 else PROMPT},{"" if i % 2 else PROMPT_TEXT},'
                            f'"Batch row {i}.",{i}\n' for i in range(6))
    ts = parse_test_set(rows, base_dir=tmp_path)
    folder = files_dir(tmp_path, [f"r{i}" for i in range(6)])
    run = prepare_run(store, "qa-1", ts, MODEL_SYSTEMS + [f"files:{folder}"], voices, concurrency=2)
    lines = []
    progress = run_batch(store, run, client, voices=voices, on_progress=lambda p: lines.append(p.line()))
    assert (progress.done, progress.failed, progress.total) == (18, 0, 18), lines
    assert "18/18 done" in lines[-1]
    summary = run_summary(store, "qa-1")
    assert summary["status"] == "done" and all(c["done"] == 6 for c in summary["systems"].values())
    for out in run_outputs(store, "qa-1"):
        wav, sr = sf.read(store.file(out["audio_path"]), dtype="float32")
        assert wav.size > 0
        if out["system"].startswith("files:"):
            continue
        assert sr == (24000 if out["system"].startswith("f5") else 16000)
        m = out["metrics"]
        assert m["latency_s"] > 0 and m["first_chunk_s"] > 0 and m["audio_s"] > 0 and m["rtf"] > 0
        assert m["seed"] == int(out["row_id"][1:]), "the row's seed was used"
        if out["system"].startswith("spark"):
            assert m["tokens"] == 8
        gen = store.query_one("SELECT * FROM generations WHERE id = ?", (out["generation_id"],))
        assert gen["batch_run"] == run.run_id and gen["audio_path"] == out["audio_path"]
    from studio.history import HistoryStore

    assert HistoryStore(tmp_path / "data").records() == [], "batch outputs are not page history"


def _done_now(db: Path, name: str) -> dict[tuple[str, str], str]:
    import sqlite3

    if not db.is_file():
        return {}  # the CLI has not opened its store yet
    conn = sqlite3.connect(db, timeout=30)
    try:
        return {(s, r): g for s, r, g in conn.execute(
            "SELECT o.system, o.row_id, o.generation_id FROM batch_outputs o JOIN batch_runs b ON b.id = o.run_id"
            " WHERE b.name = ? AND o.status = 'done'", (name,))}
    except sqlite3.OperationalError:
        return {}  # the CLI has not created the tables yet
    finally:
        conn.close()


@pytest.mark.slow
def test_killed_batch_resumes_without_redoing_outputs(tmp_path, triton_server):
    """SIGKILL the CLI mid-run, run it again: it finishes, and no output done before the kill is made again."""
    data = tmp_path / "data"
    testset = tmp_path / "set.tsv"
    testset.write_text("id\tprompt\treference_text\ttarget_text\n" +
                       "".join(f"k{i}\t{PROMPT}\t{PROMPT_TEXT}\tKill test row {i}.\n" for i in range(12)), "utf-8")
    cmd = [sys.executable, "-m", "studio", "batch", str(testset), "--system", MODEL_SYSTEMS[0], "--system",
           MODEL_SYSTEMS[1], "-o", "killed", "--concurrency", "1", "--triton-url", triton_server.grpc_url,
           "--data-dir", str(data)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    try:
        while len(_done_now(data / "studio.db", "killed")) < 3:
            assert proc.poll() is None, f"the batch ended before it could be killed: {proc.stdout.read()}"
            assert time.monotonic() < deadline, "no outputs within 300 s"
            time.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # only the process this test started
        proc.wait(30)
    before = _done_now(data / "studio.db", "killed")
    assert 3 <= len(before) < 24, "killed mid-run"
    resumed = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming run 'killed'" in resumed.stdout
    assert f"({len(before)} done before)" in resumed.stdout
    assert f"in {data / 'studio.db'}" in resumed.stdout and "24/24 done" in resumed.stdout
    assert "DEMO WEIGHTS" in resumed.stdout
    after = _done_now(data / "studio.db", "killed")
    assert len(after) == 24
    assert all(after[k] == g for k, g in before.items()), "outputs done before the kill were kept, not redone"
    store = Store(data)
    assert store.query_one("SELECT COUNT(*) FROM generations")[0] == 24, "one generation per output: none redone"
    assert store.query_one("PRAGMA integrity_check")[0] == "ok"
    leftovers = [p for p in (data / "batch").rglob("*.tmp")]
    assert not leftovers or len(leftovers) <= 1, "at most the killed write's temporary file"
