"""The SQLite store: pragmas, migrations, transactions, concurrent writers, atomic files."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
import threading

import numpy as np
import pytest
import soundfile as sf

from studio import store as store_mod
from studio.store import Store, open_store, register_migration, split_statements


def _gen(db, gid: str, text: str = "x") -> None:
    db.execute("INSERT INTO generations (id, created, model, text) VALUES (?, ?, 'f5', ?)",
               (gid, store_mod.utc_now(), text))


def test_pragmas_and_schema_version(tmp_path):
    s = Store(tmp_path)
    conn = s.connection()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == store_mod.BUSY_TIMEOUT_MS
    assert s.schema_version() == store_mod.latest_version() >= 1
    tables = {r[0] for r in s.query("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"generations", "batch_runs", "batch_rows", "batch_outputs"} <= tables
    assert (tmp_path / "studio.db").is_file()
    assert Store(tmp_path).schema_version() == s.schema_version(), "reopening migrates nothing twice"


def test_transaction_commits_or_rolls_back_whole(tmp_path):
    s = Store(tmp_path)
    with s.transaction() as db:
        _gen(db, "a")
        with s.transaction() as inner:  # nested: joins the outer transaction
            _gen(inner, "b")
    with pytest.raises(RuntimeError):
        with s.transaction() as db:
            _gen(db, "c")
            raise RuntimeError("boom")
    with pytest.raises(sqlite3.IntegrityError):
        with s.transaction() as db:
            _gen(db, "d")
            _gen(db, "a")  # duplicate key: the whole transaction goes, d included
    assert [r["id"] for r in s.query("SELECT id FROM generations ORDER BY id")] == ["a", "b"]


def test_foreign_keys_are_enforced(tmp_path):
    s = Store(tmp_path)
    with pytest.raises(sqlite3.IntegrityError):
        with s.transaction() as db:
            db.execute("INSERT INTO batch_rows (run_id, row_id, position, prompt, reference_text, target_text) "
                       "VALUES (42, 'r1', 0, 'p', '', 't')")


def test_migration_registered_later_is_applied_once(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "MIGRATIONS", list(store_mod.MIGRATIONS))
    s = Store(tmp_path)
    v = s.schema_version()
    register_migration(v + 1, "CREATE TABLE extra_a (x INTEGER);\nCREATE INDEX extra_a_x ON extra_a(x);")
    register_migration(v + 1, "CREATE TABLE extra_a (x INTEGER);\nCREATE INDEX extra_a_x ON extra_a(x);")
    with pytest.raises(ValueError, match="different SQL"):
        register_migration(v + 1, "CREATE TABLE other (y);")
    with s.transaction() as db:  # the open store notices the new migration on its next use
        db.execute("INSERT INTO extra_a VALUES (1)")
    assert s.schema_version() == v + 1
    assert Store(tmp_path).schema_version() == v + 1


def test_failing_migration_leaves_the_old_version(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "MIGRATIONS", list(store_mod.MIGRATIONS))
    s = Store(tmp_path)
    v = s.schema_version()
    register_migration(v + 1, "CREATE TABLE half (x);\nCREATE TABLE half (x);")  # second statement fails
    with pytest.raises(sqlite3.OperationalError, match="already exists"):
        s.migrate()
    with pytest.raises(sqlite3.OperationalError):  # every later use says so too, never works half-migrated
        s.query("SELECT 1")
    raw = sqlite3.connect(tmp_path / "studio.db")
    assert raw.execute("PRAGMA user_version").fetchone()[0] == v
    assert not raw.execute("SELECT name FROM sqlite_master WHERE name = 'half'").fetchall(), "nothing half-applied"
    raw.close()


def test_split_statements_keeps_semicolons_in_strings():
    got = split_statements("CREATE TABLE t (x TEXT DEFAULT 'a;b');\n-- note\nINSERT INTO t VALUES ('c;');\n")
    assert len(got) == 2 and "'a;b'" in got[0]
    with pytest.raises(ValueError, match="incomplete"):
        split_statements("CREATE TABLE t (x")


def test_threads_write_at_once(tmp_path):
    s = open_store(tmp_path)
    errors = []

    def writer(tag):
        try:
            for i in range(30):
                with s.transaction() as db:
                    _gen(db, f"{tag}-{i}")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in "abcd"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert s.query_one("SELECT COUNT(*) FROM generations")[0] == 120


def _proc_writer(root, tag):
    s = Store(root)
    for i in range(25):
        with s.transaction() as db:
            _gen(db, f"{tag}-{i}", tag * 500)


def test_processes_write_at_once(tmp_path):
    Store(tmp_path)
    procs = [mp.get_context("spawn").Process(target=_proc_writer, args=(tmp_path, t)) for t in "xyz"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    s = Store(tmp_path)
    assert s.query_one("SELECT COUNT(*) FROM generations")[0] == 75
    assert s.query_one("PRAGMA integrity_check")[0] == "ok"


def test_audio_files_are_atomic_and_relative(tmp_path):
    s = Store(tmp_path)
    wav = np.linspace(-0.5, 0.5, 1000, dtype=np.float32)
    rel = s.write_wav("batch/run/a.wav", wav, 24000)
    assert rel == "batch/run/a.wav"
    got, sr = sf.read(s.file(rel), dtype="float32")
    assert sr == 24000 and np.array_equal(got, wav)
    assert not [p for p in (tmp_path / "batch" / "run").iterdir() if p.name.endswith(".tmp")]
    (tmp_path.parent / "outside.wav").write_bytes(b"x")
    assert s.file("../outside.wav") is None and s.file("/etc/passwd") is None and s.file(None) is None
    with pytest.raises(ValueError):
        s.write_wav("../escape.wav", wav, 24000)
