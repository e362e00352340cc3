"""Generation history: every generation in one data directory, under `data_dir/history/`.

Layout:
    history.jsonl        one JSON object per line: a generation record, or a later update to one
    audio/ID.wav         the generated audio (float32 WAV, the model's rate)
    prompts/HASH.wav     prompt clips, stored once per distinct clip (16-bit WAV)

Records are appended, never rewritten: each append is one `write` of a whole line under an exclusive
`flock`, fsync'd, so several studio processes sharing a data directory never interleave lines and a
crash loses at most the line being written. Audio files are written to a temporary name and renamed
into place before the line that names them is appended. Values measured later (the browser's
first-sound delay) are appended as `{"id": ..., "update": {...}}` lines and merged on reading.
A torn last line (power loss mid-write) is skipped on reading and sealed with a newline before the
next append.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import time
import uuid
from pathlib import Path

import numpy as np

HISTORY_FILE = "history.jsonl"


def _atomic_write_wav(path: Path, wav: np.ndarray, sample_rate: int, subtype: str) -> None:
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as fh:
            sf.write(fh, np.asarray(wav, dtype=np.float32), sample_rate, subtype=subtype, format="WAV")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def new_id() -> str:
    """Sortable and unique across processes: UTC time to the millisecond plus random hex."""
    now = time.time()
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime(now)) + f"{int(now * 1000) % 1000:03d}-" + secrets.token_hex(3)


class HistoryStore:
    def __init__(self, data_dir: Path):
        self.root = Path(data_dir).expanduser() / "history"
        self.path = self.root / HISTORY_FILE

    # -- writing ------------------------------------------------------------------------------
    def add(self, record: dict, audio: np.ndarray | None = None, sample_rate: int | None = None,
            prompt: np.ndarray | None = None, prompt_rate: int | None = None) -> dict:
        """Store audio (and the prompt clip) and append `record` with `id`, `time`, `audio`, `prompt_audio`.

        `record` must be JSON-serialisable: model, mode, status, texts, params, seed, metrics, ...
        Returns the record as stored.
        """
        rec = dict(record)
        rec.setdefault("id", new_id())
        rec.setdefault("time", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        if audio is not None and np.asarray(audio).size:
            if not sample_rate:
                raise ValueError("HistoryStore.add: audio needs its sample_rate")
            rel = f"audio/{rec['id']}.wav"
            _atomic_write_wav(self.root / rel, audio, sample_rate, "FLOAT")
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
                _atomic_write_wav(self.root / rel, pcm, prompt_rate, "PCM_16")
            rec["prompt_audio"] = rel
        else:
            rec.setdefault("prompt_audio", None)
        self._append(rec)
        return rec

    def update(self, record_id: str, **fields) -> None:
        """Attach values measured after the record was written (merged into `metrics` if nested)."""
        self._append({"id": record_id, "update": fields})

    def _append(self, obj: dict) -> None:
        line = (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line  # seal a torn last line so this record starts on its own
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)  # releases the lock

    # -- reading ------------------------------------------------------------------------------
    def records(self, limit: int | None = None) -> list[dict]:
        """Generations, newest first, with later updates merged in. Unreadable lines are skipped."""
        if not self.path.is_file():
            return []
        with open(self.path, "rb") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH)
            data = fh.read()
        by_id: dict[str, dict] = {}
        order: list[str] = []
        for raw in data.split(b"\n"):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except ValueError:
                continue  # a torn line from a crash
            if not isinstance(obj, dict) or "id" not in obj:
                continue
            if "update" in obj:
                target = by_id.get(obj["id"])
                if target is not None:
                    _merge(target, obj["update"])
                continue
            if obj["id"] not in by_id:
                order.append(obj["id"])
            by_id[obj["id"]] = obj
        out = [by_id[i] for i in reversed(order)]
        return out[:limit] if limit else out

    def get(self, record_id: str) -> dict:
        for rec in self.records():
            if rec["id"] == record_id:
                return rec
        raise KeyError(f"no generation {record_id!r} in {self.path}")

    def file(self, rel: str | None) -> Path | None:
        """Absolute path of a record's `audio` / `prompt_audio`, only if it lies inside the history folder."""
        if not rel:
            return None
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root.resolve()) or not path.is_file():
            return None
        return path


def _merge(target: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value
