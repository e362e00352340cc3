"""Generation history: every generation of a data directory, as rows of the studio's SQLite store.

Rows live in the `generations` table of `DATA/studio.db` (studio.store); files under
`DATA/history/`:
    audio/ID.wav         the generated audio (float32 WAV, the model's rate)
    prompts/HASH.wav     prompt clips, stored once per distinct clip (16-bit WAV)

A record (the dict this API takes and returns) keeps the shape the page has always used: `id`,
`time`, `kind`, `model`, `mode`, `status`, `text`, `ref_text`, `voice`, `params`, `seed`,
`metrics`, `info`, `error`, `audio` and `prompt_audio` (paths relative to `history/`),
`sample_rate`, plus any other JSON fields the caller adds. Audio is renamed into place before the
row naming it is committed, and each add or update is one transaction, so several studio
processes sharing a data directory never lose or tear a record.

The history of earlier versions, `history/history.jsonl` (one JSON object a line, later updates as
`{"id", "update"}` lines), is imported once when a store opens it (rows already present are kept;
the file is left where it is). Rows of batch runs (studio.batch) are generations too, but not
history: `records()` lists the page's own generations only.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from pathlib import Path

import numpy as np

from studio.store import from_json, open_store, to_json, utc_now

HISTORY_DIR = "history"
LEGACY_FILE = "history.jsonl"
#: Record fields with a column of their own (record name -> column); the rest go to `extra`.
SCALAR_COLUMNS = {"time": "created", "user": "user", "kind": "kind", "model": "model", "mode": "mode",
                  "status": "status", "text": "text", "ref_text": "ref_text", "voice": "voice",
                  "sample_rate": "sample_rate", "seed": "seed", "error": "error", "notes": "notes"}
JSON_COLUMNS = ("params", "metrics", "info")
PATH_FIELDS = {"audio": "audio_path", "prompt_audio": "prompt_path"}


def new_id() -> str:
    """Sortable and unique across processes: UTC time to the millisecond plus random hex."""
    now = time.time()
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime(now)) + f"{int(now * 1000) % 1000:03d}-" + secrets.token_hex(3)


def insert_generation(db, rec: dict, *, batch_run: int | None = None) -> None:
    """INSERT one record (paths already relative to the data directory) inside the caller's transaction."""
    extra = {k: v for k, v in rec.items()
             if k not in SCALAR_COLUMNS and k not in JSON_COLUMNS and k not in PATH_FIELDS and k != "id"}
    db.execute(
        "INSERT INTO generations (id, created, user, kind, model, mode, status, text, ref_text, voice, sample_rate,"
        " seed, error, notes, params, metrics, info, audio_path, prompt_path, extra, batch_run)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (rec["id"], rec.get("time") or utc_now(), rec.get("user"), rec.get("kind") or "clone", rec.get("model") or "?",
         rec.get("mode") or "offline", rec.get("status") or "ok", rec.get("text") or "", rec.get("ref_text") or "",
         rec.get("voice"), rec.get("sample_rate"), _int_or_none(rec.get("seed")), rec.get("error"), rec.get("notes"),
         to_json(rec.get("params") or {}), to_json(rec.get("metrics") or {}), to_json(rec.get("info") or {}),
         rec.get("audio"), rec.get("prompt_audio"), to_json(extra), batch_run))


def _int_or_none(value):
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


class HistoryStore:
    """The page's generations in `data_dir`'s store. Safe to share between threads and processes."""

    def __init__(self, data_dir: Path):
        self.store = open_store(Path(data_dir).expanduser())
        self.root = self.store.root / HISTORY_DIR
        self.path = self.store.path  # the database file
        self.legacy_path = self.root / LEGACY_FILE
        import_legacy(self)

    # -- paths: records speak relative to history/, the database relative to the data directory ------
    @staticmethod
    def _db_path(rel: str | None) -> str | None:
        return f"{HISTORY_DIR}/{rel}" if rel else None

    @staticmethod
    def _record_path(db_rel: str | None) -> str | None:
        if not db_rel:
            return None
        prefix = HISTORY_DIR + "/"
        return db_rel[len(prefix):] if db_rel.startswith(prefix) else "../" + db_rel

    # -- writing ------------------------------------------------------------------------------
    def add(self, record: dict, audio: np.ndarray | None = None, sample_rate: int | None = None,
            prompt: np.ndarray | None = None, prompt_rate: int | None = None) -> dict:
        """Store audio (and the prompt clip) and insert `record` with `id`, `time`, `audio`, `prompt_audio`.

        `record` must be JSON-serialisable: model, mode, status, texts, params, seed, metrics, ...
        Returns the record as stored.
        """
        rec = dict(record)
        rec.setdefault("id", new_id())
        rec.setdefault("time", utc_now())
        if audio is not None and np.asarray(audio).size:
            if not sample_rate:
                raise ValueError("HistoryStore.add: audio needs its sample_rate")
            rel = f"audio/{rec['id']}.wav"
            self.store.write_wav(self._db_path(rel), audio, sample_rate, "FLOAT")
            rec["audio"], rec["sample_rate"] = rel, int(sample_rate)
        else:
            rec["audio"] = None
        if prompt is not None and np.asarray(prompt).size:
            if not prompt_rate:
                raise ValueError("HistoryStore.add: the prompt needs its prompt_rate")
            pcm = np.clip(np.asarray(prompt, dtype=np.float32), -1, 1)
            digest = hashlib.sha1(pcm.tobytes() + str(prompt_rate).encode()).hexdigest()[:20]
            rel = f"prompts/{digest}.wav"
            if not (self.root / rel).is_file():
                self.store.write_wav(self._db_path(rel), pcm, prompt_rate, "PCM_16")
            rec["prompt_audio"] = rel
        else:
            rec.setdefault("prompt_audio", None)
        row = {**rec, "audio": self._db_path(rec["audio"]), "prompt_audio": self._db_path(rec["prompt_audio"])}
        with self.store.transaction() as db:
            insert_generation(db, row)
        return rec

    def update(self, record_id: str, **fields) -> None:
        """Attach values measured after the record was written (dicts merge into `metrics`, `info`, ...).
        An unknown id is ignored (the row may belong to another data directory)."""
        with self.store.transaction() as db:
            row = db.execute("SELECT * FROM generations WHERE id = ?", (record_id,)).fetchone()
            if row is None:
                return
            rec = _merge(self._to_record(row), fields)
            sets, values = [], []
            for key, col in SCALAR_COLUMNS.items():
                sets.append(f"{col} = ?")
                values.append(_int_or_none(rec.get(key)) if key == "seed" else rec.get(key))
            for col in JSON_COLUMNS:
                sets.append(f"{col} = ?")
                values.append(to_json(rec.get(col) or {}))
            extra = {k: v for k, v in rec.items() if k not in SCALAR_COLUMNS and k not in JSON_COLUMNS
                     and k not in PATH_FIELDS and k != "id"}
            sets.append("extra = ?")
            values.append(to_json(extra))
            db.execute(f"UPDATE generations SET {', '.join(sets)} WHERE id = ?", (*values, record_id))

    # -- reading ------------------------------------------------------------------------------
    def _to_record(self, row) -> dict:
        rec = {"id": row["id"]}
        for key, col in SCALAR_COLUMNS.items():
            if row[col] is not None or key in ("seed", "error"):
                rec[key] = row[col]
        for col in JSON_COLUMNS:
            rec[col] = from_json(row[col])
        for key, col in PATH_FIELDS.items():
            rec[key] = self._record_path(row[col])
        for key, value in from_json(row["extra"]).items():
            rec.setdefault(key, value)
        if rec.get("error") is None:
            rec.pop("error", None)
        return rec

    def records(self, limit: int | None = None) -> list[dict]:
        """The page's generations (not batch runs'), newest first."""
        sql = "SELECT * FROM generations WHERE batch_run IS NULL ORDER BY created DESC, rowid DESC"
        rows = self.store.query(sql + (" LIMIT ?" if limit else ""), (int(limit),) if limit else ())
        return [self._to_record(r) for r in rows]

    def get(self, record_id: str) -> dict:
        row = self.store.query_one("SELECT * FROM generations WHERE id = ?", (record_id,))
        if row is None:
            raise KeyError(f"no generation {record_id!r} in {self.path}")
        return self._to_record(row)

    def file(self, rel: str | None) -> Path | None:
        """Absolute path of a record's `audio` / `prompt_audio`, only if it lies inside the history folder."""
        if not rel:
            return None
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root.resolve()) or not path.is_file():
            return None
        return path


def _merge(target: dict, update: dict) -> dict:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value
    return target


# --- the history.jsonl of earlier versions ------------------------------------------------------------
def read_legacy(path: Path) -> list[dict]:
    """Records of a history.jsonl, oldest first, with `update` lines merged; torn lines skipped."""
    by_id: dict[str, dict] = {}
    for raw in path.read_bytes().split(b"\n"):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError:
            continue  # a line torn by a crash
        if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
            continue
        if "update" in obj:
            if obj["id"] in by_id and isinstance(obj["update"], dict):
                _merge(by_id[obj["id"]], obj["update"])
            continue
        by_id.setdefault(obj["id"], obj)
    return list(by_id.values())


def import_legacy(history: HistoryStore) -> int:
    """Copy `history/history.jsonl` into the store once (again only if the file grew since, adding the
    new ids). One transaction; rows already there win. Returns the number of rows added."""
    path = history.legacy_path
    if not path.is_file():
        return 0
    source = f"{HISTORY_DIR}/{LEGACY_FILE}"
    size = path.stat().st_size
    done = history.store.query_one("SELECT size FROM imports WHERE source = ?", (source,))
    if done is not None and done["size"] == size:
        return 0
    records = read_legacy(path)
    added = 0
    with history.store.transaction() as db:
        done = db.execute("SELECT size FROM imports WHERE source = ?", (source,)).fetchone()
        if done is not None and done["size"] == size:
            return 0  # another process imported it meanwhile
        for rec in records:
            if db.execute("SELECT 1 FROM generations WHERE id = ?", (rec["id"],)).fetchone():
                continue
            row = {**rec, "audio": history._db_path(rec.get("audio")),
                   "prompt_audio": history._db_path(rec.get("prompt_audio"))}
            if isinstance(rec.get("time"), str):
                row["time"] = rec["time"]
            insert_generation(db, row)
            added += 1
        db.execute("INSERT INTO imports (source, imported, size, records) VALUES (?, ?, ?, ?) "
                   "ON CONFLICT(source) DO UPDATE SET imported = excluded.imported, size = excluded.size, "
                   "records = imports.records + excluded.records", (source, utc_now(), size, added))
    return added


__all__ = ["HistoryStore", "import_legacy", "insert_generation", "new_id", "read_legacy"]
