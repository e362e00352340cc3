"""Listening tests over a batch run's outputs: A/B preference, MOS (naturalness) and SMOS (speaker similarity).

An organiser makes a *session* from one batch run (`studio/batch.py`): a kind, the systems under test,
how many items each rater gets, and instructions. Raters come in two ways: the organiser makes N rater
links, or shares the session's join link, where each visitor becomes a new rater. Either way a rater
is identified only by a random token (`secrets`) in their link.

Each rater gets their own blind, randomly ordered list of items:

- MOS / SMOS item: one (row, system) output; SMOS also plays the row's prompt clip first.
- A/B item: one (row, system X, system Y) pair; which system is A is decided per rater so that every
  pair is heard X-first by half of the raters who get it (the side shown less often so far wins,
  a tie is broken at random).
- Items are spread over raters least-used first, so coverage stays even however many raters join.

Blindness: the rater's page and its requests carry only opaque random item ids and the clip slot
(`a`, `b`, `ref`); system names, file names and paths stay on the server. Audio is re-encoded on the
way out (`clip_wav_bytes`: one sample rate and level for every system, no metadata chunks), so not
even a WAV header tells two systems apart.

Rules the server enforces (not only the page):

- a clip counts as played when the audio route has served it to this rater and the page then
  reports the player's `ended` event for it, no sooner than the clip's length after the first fetch;
  SMOS's sample counts only after the prompt was played;
- an answer needs every clip of its item played, lies in range, belongs to the rater's own items;
- **answers are final**: answering an item twice is refused (HTTP 409) and the first answer stays.
  The page always shows the rater's first unanswered item, so a rater who leaves and comes back
  continues where they stopped;
- each answer is one transaction: it is either stored whole or not at all.

Tables (migration 2 of `studio/store.py`): listening_sessions, raters, rater_items, answers.
"""

from __future__ import annotations

import io
import itertools
import json
import random
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from studio.store import Store, from_json, to_json, utc_now

#: The listening tables are migration 2 of the store (`studio/store.py`, SCHEMA_V2): it sits in the
#: store's own list, so no database can reach a later version without them, whatever was imported.
MIGRATION_VERSION = 2

KINDS = {"ab": "A/B preference", "mos": "MOS (naturalness, 1-5)", "smos": "SMOS (speaker similarity, 1-5)"}
#: Clips of an item in the order the rater plays them.
CLIPS = {"ab": ("a", "b"), "mos": ("a",), "smos": ("ref", "a")}
SCORE_MIN, SCORE_MAX = 1, 5
AB_CHOICES = ("A", "B", "none")
MAX_NAME_CHARS = 80
MAX_INSTRUCTIONS_CHARS = 4000
MAX_REASON_CHARS = 500
MAX_ITEMS_PER_RATER = 500
MAX_RATERS_AT_ONCE = 200
#: secrets.token_urlsafe sizes (bytes of randomness): 128 bits for links, 96 for item ids.
TOKEN_BYTES, ITEM_ID_BYTES = 16, 12
#: An `ended` report may come this much sooner after the clip's first fetch than the clip is long (s):
#: timer granularity and the player's start-up, never a real skip.
EARLY_END_TOLERANCE_S = 0.25
#: Every clip is served at one rate and level, whatever the system made, so neither the WAV header
#: (F5 writes 24 kHz, Spark 16 kHz) nor loudness tells systems apart. 24 kHz loses nothing of either.
SERVE_RATE = 24000
#: Clips are scaled to this RMS level (dBFS; speech near -23 dBFS leaves headroom) unless that would
#: clip a peak above PEAK_LIMIT, in which case the peak sets the gain.
TARGET_RMS_DBFS, PEAK_LIMIT = -23.0, 0.95


class ListeningError(ValueError):
    """A request the rater or organiser must change; `status` is the HTTP status the routes answer."""

    status = 400


class UnknownLink(ListeningError):
    status = 404


class UnknownItem(ListeningError):
    status = 404


class NotPlayed(ListeningError):
    status = 409


class AlreadyAnswered(ListeningError):
    status = 409


class BrokenAudio(ListeningError):
    """A stored clip the server cannot read: nothing the rater can fix."""

    status = 500


@dataclass(frozen=True)
class Session:
    id: int
    name: str
    kind: str
    run_id: int
    systems: tuple[str, ...]
    items_per_rater: int
    instructions: str
    join_token: str
    created: str


@dataclass(frozen=True)
class Rater:
    id: int
    session_id: int
    token: str
    slot: int
    label: str


@dataclass(frozen=True)
class ItemView:
    """What the rater's page may know of an item: nothing that names a system or a file."""

    id: str
    position: int
    clips: tuple[str, ...]          # to play, in order
    played: frozenset[str]


@dataclass(frozen=True)
class RaterView:
    kind: str
    instructions: str
    total: int
    answered: int
    item: ItemView | None           # the first unanswered item; None when all are answered


# --- reading sessions -------------------------------------------------------------------------------
def _session(row: sqlite3.Row) -> Session:
    return Session(row["id"], row["name"], row["kind"], row["run_id"], tuple(from_json(row["systems"], [])),
                   row["items_per_rater"], row["instructions"], row["join_token"], row["created"])


def list_sessions(store: Store) -> list[Session]:
    """Every session, newest first."""
    return [_session(r) for r in store.query("SELECT * FROM listening_sessions ORDER BY id DESC")]


def get_session(store: Store, name_or_id: str | int) -> Session:
    """A session by name (or numeric id); ListeningError naming the known ones if there is none."""
    row = store.query_one("SELECT * FROM listening_sessions WHERE name = ?", (str(name_or_id),))
    if row is None and str(name_or_id).isdigit():
        row = store.query_one("SELECT * FROM listening_sessions WHERE id = ?", (int(name_or_id),))
    if row is None:
        known = ", ".join(s.name for s in list_sessions(store)[:20]) or "none yet"
        raise ListeningError(f"no listening session named {str(name_or_id)!r} (sessions: {known})")
    return _session(row)


def session_by_join_token(store: Store, join_token: str) -> Session:
    row = store.query_one("SELECT * FROM listening_sessions WHERE join_token = ?", (str(join_token),))
    if row is None:
        raise UnknownLink("This listening-test link is not valid. Ask the organiser for a new one.")
    return _session(row)


# --- what can be rated --------------------------------------------------------------------------------
def run_systems(store: Store, run_id: int) -> list[str]:
    """The run's systems in its own order (those the run was asked to make)."""
    try:
        row = store.query_one("SELECT systems FROM batch_runs WHERE id = ?", (int(run_id),))
    except (TypeError, ValueError):
        row = None
    if row is None:
        raise ListeningError(f"there is no batch run with id {run_id}")
    return list(from_json(row["systems"], []))


def done_outputs(conn: sqlite3.Connection, run_id: int) -> dict[str, set[str]]:
    """system -> row ids whose output finished with audio (`conn`: a store's connection, in or out of a
    transaction)."""
    out: dict[str, set[str]] = {}
    for r in conn.execute("SELECT system, row_id FROM batch_outputs WHERE run_id = ? AND status = 'done' "
                          "AND audio_path IS NOT NULL", (int(run_id),)):
        out.setdefault(r["system"], set()).add(r["row_id"])
    return out


def units_of(kind: str, systems: list[str], done: dict[str, set[str]]) -> list[tuple[str, tuple[str, ...]]]:
    """The things to rate: (row id, (system,)) for MOS/SMOS, (row id, (X, Y)) for A/B with X before Y in
    `systems`' order, keeping only rows where every system of the unit has audio. Sorted, deterministic."""
    units = []
    if kind == "ab":
        for x, y in itertools.combinations(systems, 2):
            units += [(row, (x, y)) for row in sorted(done.get(x, set()) & done.get(y, set()))]
    else:
        for s in systems:
            units += [(row, (s,)) for row in sorted(done.get(s, set()))]
    return units


# --- creating sessions and raters -----------------------------------------------------------------------
def _clean_text(value, what: str, limit: int) -> str:
    text = str(value or "").strip()
    if len(text) > limit:
        raise ListeningError(f"{what} is {len(text)} characters long; keep it under {limit}")
    return text


def _mentions(text: str, systems: list[str]) -> str | None:
    """The first system, model family or output folder that `text` names, if any (raters read the
    instructions). Case-insensitive substring match: `f5` also catches "F5-TTS"."""
    low = text.casefold()
    words = set()
    for s in systems:
        family, _, rest = s.partition(":")
        words.add(s.casefold())
        if family == "files":  # a folder of ready-made audio: its name is the secret, "files" is not
            words.add(Path(rest.rstrip("/")).name.casefold())
        else:
            words.add(family.casefold())
    for word in sorted(words, key=len, reverse=True):
        if len(word) >= 2 and word in low:
            return word
    return None


def create_session(store: Store, *, name: str, kind: str, run_id: int, systems: list[str],
                   items_per_rater: int, instructions: str = "", raters: int = 0,
                   rng: random.Random | None = None) -> Session:
    """Make a session (and `raters` rater links) in one transaction.

    Refuses, with a message saying what to change: an empty or taken name, an unknown kind or run,
    systems not in the run (or too few: A/B needs two), instructions that name a system or model
    (raters read them), SMOS rows whose prompt clip cannot be found, nothing rateable."""
    name = _clean_text(name, "The session name", MAX_NAME_CHARS)
    if not name:
        raise ListeningError("Give the session a name (it is only shown to you, never to raters).")
    if kind not in KINDS:
        raise ListeningError(f"Choose the kind of test: {', '.join(KINDS)}; got {kind!r}.")
    instructions = _clean_text(instructions, "The instructions", MAX_INSTRUCTIONS_CHARS)
    known = run_systems(store, run_id)
    systems = [s for s in dict.fromkeys(str(s).strip() for s in systems or []) if s]
    missing = [s for s in systems if s not in known]
    if missing:
        raise ListeningError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not a system of this "
                             f"run (it has: {', '.join(known)}).")
    need = 2 if kind == "ab" else 1
    if len(systems) < need:
        raise ListeningError("An A/B test compares two or more systems: pick at least two." if kind == "ab"
                             else "Pick at least one system to rate.")
    named = _mentions(instructions, systems)
    if named:
        raise ListeningError(f"The instructions mention {named!r}: raters read them, and the test must not say "
                             "which system they hear. Remove it.")
    try:
        items_per_rater = int(items_per_rater)
        raters = int(raters or 0)
    except (TypeError, ValueError):
        raise ListeningError("Items per rater and the number of rater links are whole numbers.") from None
    if not 1 <= items_per_rater <= MAX_ITEMS_PER_RATER:
        raise ListeningError(f"Items per rater must be between 1 and {MAX_ITEMS_PER_RATER}.")
    if not 0 <= raters <= MAX_RATERS_AT_ONCE:
        raise ListeningError(f"Make between 0 and {MAX_RATERS_AT_ONCE} rater links at once.")
    units = units_of(kind, systems, done_outputs(store.connection(), run_id))
    if not units:
        raise ListeningError("Nothing to rate: no row has finished audio for " +
                             ("every pair of the chosen systems." if kind == "ab" else "the chosen systems."))
    if kind == "smos":
        for row_id in sorted({u[0] for u in units}):
            prompt_file(store, run_id, row_id)  # raises if a row's prompt clip is gone
    with store.transaction() as db:
        if db.execute("SELECT 1 FROM listening_sessions WHERE name = ?", (name,)).fetchone():
            raise ListeningError(f"A session named {name!r} exists already; pick another name.")
        cur = db.execute("INSERT INTO listening_sessions (name, kind, run_id, systems, items_per_rater, "
                         "instructions, join_token, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (name, kind, int(run_id), to_json(systems), items_per_rater, instructions,
                          secrets.token_urlsafe(TOKEN_BYTES), utc_now()))
        session_id = cur.lastrowid
        for _ in range(raters):
            _add_rater(db, session_id, "link", None, rng)
    return get_session(store, session_id)


def add_raters(store: Store, session: Session, count: int, rng: random.Random | None = None) -> list[Rater]:
    """`count` new rater links, in one transaction."""
    if not 1 <= int(count) <= MAX_RATERS_AT_ONCE:
        raise ListeningError(f"Make between 1 and {MAX_RATERS_AT_ONCE} rater links at once.")
    with store.transaction() as db:
        return [_add_rater(db, session.id, "link", None, rng) for _ in range(int(count))]


def join(store: Store, join_token: str, rng: random.Random | None = None) -> Rater:
    """A new rater for whoever opened the session's join link."""
    session = session_by_join_token(store, join_token)
    with store.transaction() as db:
        return _add_rater(db, session.id, "join", None, rng)


def _add_rater(db: sqlite3.Connection, session_id: int, via: str, label: str | None,
               rng: random.Random | None) -> Rater:
    """Insert a rater and their items; runs inside the caller's write transaction, so the counts it
    balances against cannot change underneath it (BEGIN IMMEDIATE holds the write lock)."""
    rng = rng or random.SystemRandom()
    s = _session(db.execute("SELECT * FROM listening_sessions WHERE id = ?", (session_id,)).fetchone())
    units = units_of(s.kind, list(s.systems), done_outputs(db, s.run_id))
    if not units:
        raise ListeningError("This session has nothing left to rate (its batch outputs are gone).")
    uses: dict[tuple, int] = {}
    x_first: dict[tuple, int] = {}
    for r in db.execute("SELECT i.row_id, i.system_a, i.system_b FROM rater_items i JOIN raters t "
                        "ON t.id = i.rater_id WHERE t.session_id = ?", (session_id,)):
        key = _unit_key(s, r["row_id"], r["system_a"], r["system_b"])
        uses[key] = uses.get(key, 0) + 1
        if s.kind == "ab" and r["system_a"] == key[1][0]:
            x_first[key] = x_first.get(key, 0) + 1
    # least-used units first, ties in random order; then the rater's own random order
    order = sorted(units, key=lambda u: (uses.get(u, 0), rng.random()))
    chosen = order[:min(s.items_per_rater, len(units))]
    rng.shuffle(chosen)
    slot = 1 + db.execute("SELECT COALESCE(MAX(slot), 0) FROM raters WHERE session_id = ?",
                          (session_id,)).fetchone()[0]
    token = secrets.token_urlsafe(TOKEN_BYTES)
    label = label or f"rater {slot}" + (" (joined)" if via == "join" else "")
    cur = db.execute("INSERT INTO raters (session_id, token, slot, label, via, created) VALUES (?, ?, ?, ?, ?, ?)",
                     (session_id, token, slot, label, via, utc_now()))
    rater_id = cur.lastrowid
    for position, (row_id, systems) in enumerate(chosen):
        a, b = systems[0], None
        if s.kind == "ab":
            key = (row_id, systems)
            shown_x_first = x_first.get(key, 0)
            shown_y_first = uses.get(key, 0) - shown_x_first
            x_on_a = shown_x_first < shown_y_first or (shown_x_first == shown_y_first and rng.random() < 0.5)
            a, b = (systems[0], systems[1]) if x_on_a else (systems[1], systems[0])
        db.execute("INSERT INTO rater_items (id, rater_id, position, row_id, system_a, system_b) "
                   "VALUES (?, ?, ?, ?, ?, ?)", (secrets.token_urlsafe(ITEM_ID_BYTES), rater_id, position, row_id,
                                                 a, b))
    return Rater(rater_id, session_id, token, slot, label)


def _unit_key(s: Session, row_id: str, a: str, b: str | None) -> tuple[str, tuple[str, ...]]:
    """An item's unit: for A/B the pair in the session's system order, whichever side each was on."""
    if b is None:
        return (row_id, (a,))
    order = {name: i for i, name in enumerate(s.systems)}
    return (row_id, tuple(sorted((a, b), key=lambda x: order.get(x, len(order)))))


# --- the rater's side ------------------------------------------------------------------------------------
def _rater(store: Store, token: str) -> tuple[sqlite3.Row, Session]:
    """The rater row and their session, or UnknownLink (read on this thread's connection, so inside a
    transaction it sees that transaction's state)."""
    if not isinstance(token, str) or not token or len(token) > 64:
        raise UnknownLink("This listening-test link is not valid. Ask the organiser for a new one.")
    db = store.connection()
    rater = db.execute("SELECT * FROM raters WHERE token = ?", (token,)).fetchone()
    if rater is None:
        raise UnknownLink("This listening-test link is not valid. Ask the organiser for a new one.")
    session = _session(db.execute("SELECT * FROM listening_sessions WHERE id = ?", (rater["session_id"],)).fetchone())
    return rater, session


def _item(db: sqlite3.Connection, rater_id: int, item_id: str) -> sqlite3.Row:
    row = db.execute("SELECT * FROM rater_items WHERE id = ? AND rater_id = ?",
                     (str(item_id), rater_id)).fetchone() if isinstance(item_id, str) else None
    if row is None:
        raise UnknownItem("That item is not part of your listening test.")
    return row


def _played(item: sqlite3.Row, kind: str) -> frozenset[str]:
    return frozenset(c for c in CLIPS[kind] if item[f"played_{c}"])


def rater_view(store: Store, token: str) -> RaterView:
    """The rater's progress and first unanswered item (what the page shows)."""
    rater, s = _rater(store, token)
    db = store.connection()
    total = db.execute("SELECT COUNT(*) FROM rater_items WHERE rater_id = ?", (rater["id"],)).fetchone()[0]
    answered = db.execute("SELECT COUNT(*) FROM rater_items i JOIN answers a ON a.item_id = i.id "
                          "WHERE i.rater_id = ?", (rater["id"],)).fetchone()[0]
    nxt = db.execute("SELECT i.* FROM rater_items i LEFT JOIN answers a ON a.item_id = i.id "
                     "WHERE i.rater_id = ? AND a.id IS NULL ORDER BY i.position LIMIT 1", (rater["id"],)).fetchone()
    item = None if nxt is None else ItemView(nxt["id"], nxt["position"], CLIPS[s.kind], _played(nxt, s.kind))
    return RaterView(s.kind, s.instructions, total, answered, item)


def _check_clip_name(kind: str, clip: str) -> None:
    if clip not in CLIPS[kind]:
        raise UnknownItem("That item has no such clip.")


def clip_file(store: Store, token: str, item_id: str, clip: str) -> Path:
    """The file behind one clip of the rater's item, recording that it was served to them."""
    rater, s = _rater(store, token)
    _check_clip_name(s.kind, clip)
    with store.transaction() as db:
        item = _item(db, rater["id"], item_id)
        if clip == "ref":
            path = prompt_file(store, s.run_id, item["row_id"])
        else:
            system = item["system_a"] if clip == "a" else item["system_b"]
            path = output_file(store, s.run_id, system, item["row_id"])
        db.execute(f"UPDATE rater_items SET fetched_{clip} = COALESCE(fetched_{clip}, ?) WHERE id = ?",
                   (time.time(), item["id"]))
    return path


def record_played(store: Store, token: str, item_id: str, clip: str) -> frozenset[str]:
    """The page's report that a clip played to its end; returns the item's played clips.

    Refused unless the clip's audio was served to this rater at least the clip's length earlier (an
    `ended` report sooner than that cannot come from listening), and (SMOS) unless the prompt clip
    was played before the sample."""
    rater, s = _rater(store, token)
    _check_clip_name(s.kind, clip)
    with store.transaction() as db:
        item = _item(db, rater["id"], item_id)
        fetched = item[f"fetched_{clip}"]
        if fetched is None:
            raise NotPlayed("That clip has not been loaded yet: press its play button and listen to the end.")
        if s.kind == "smos" and clip == "a" and not item["played_ref"]:
            raise NotPlayed("Listen to the reference voice first, then to the sample.")
        if not item[f"played_{clip}"]:
            seconds = _clip_seconds(store, s, item, clip)
            if time.time() - fetched < seconds - EARLY_END_TOLERANCE_S:
                raise NotPlayed("That clip has not played to its end yet: listen to all of it.")
        db.execute(f"UPDATE rater_items SET played_{clip} = COALESCE(played_{clip}, ?) WHERE id = ?",
                   (utc_now(), item["id"]))
        item = _item(db, rater["id"], item_id)
    return _played(item, s.kind)


def _clip_seconds(store: Store, s: Session, item: sqlite3.Row, clip: str) -> float:
    """Length of one clip of an item (from the file's header)."""
    import soundfile as sf

    if clip == "ref":
        path = prompt_file(store, s.run_id, item["row_id"])
    else:
        path = output_file(store, s.run_id, item["system_a" if clip == "a" else "system_b"], item["row_id"])
    try:
        return float(sf.info(str(path)).duration)
    except (RuntimeError, sf.LibsndfileError):
        return 0.0  # a format libsndfile cannot measure: the fetch-then-ended rule still holds


def parse_answer(kind: str, choice=None, score=None, reason=None) -> tuple[str | None, int | None, str | None]:
    """Validate an answer's fields for `kind`: (choice, score, reason) or ListeningError."""
    if reason is not None and not isinstance(reason, str):
        raise ListeningError("The reason must be text.")
    reason = (reason or "").strip() or None
    if reason and len(reason) > MAX_REASON_CHARS:
        raise ListeningError(f"Keep the reason under {MAX_REASON_CHARS} characters.")
    if kind == "ab":
        if score is not None:
            raise ListeningError("An A/B item takes a choice (A, B or no preference), not a score.")
        if choice not in AB_CHOICES:
            raise ListeningError("Choose A, B or no preference.")
        return choice, None, reason
    if choice is not None:
        raise ListeningError("This item takes a score from 1 to 5, not a choice.")
    if isinstance(score, bool) or score is None:
        raise ListeningError(f"Choose a score from {SCORE_MIN} to {SCORE_MAX}.")
    if isinstance(score, str) and score.strip().isdigit():
        score = int(score.strip())
    if isinstance(score, float) and score.is_integer():
        score = int(score)
    if not isinstance(score, int) or not SCORE_MIN <= score <= SCORE_MAX:
        raise ListeningError(f"The score must be a whole number from {SCORE_MIN} to {SCORE_MAX}; got {score!r}.")
    return None, score, reason


def submit_answer(store: Store, token: str, item_id: str, *, choice=None, score=None, reason=None) -> RaterView:
    """Store one answer (one transaction; nothing is written when it is refused). Returns the new view."""
    rater, s = _rater(store, token)
    choice, score, reason = parse_answer(s.kind, choice, score, reason)
    with store.transaction() as db:
        item = _item(db, rater["id"], item_id)
        missing = [c for c in CLIPS[s.kind] if not item[f"played_{c}"]]
        if missing:
            names = {"a": "clip A" if s.kind == "ab" else "the sample", "b": "clip B", "ref": "the reference voice"}
            raise NotPlayed("Listen to " + " and ".join(names[c] for c in missing) + " to the end before answering.")
        if db.execute("SELECT 1 FROM answers WHERE item_id = ?", (item["id"],)).fetchone():
            raise AlreadyAnswered("You have answered this item already; answers are final.")
        db.execute("INSERT INTO answers (item_id, choice, score, reason, answered) VALUES (?, ?, ?, ?, ?)",
                   (item["id"], choice, score, reason, utc_now()))
    return rater_view(store, token)


# --- files --------------------------------------------------------------------------------------------------
def output_file(store: Store, run_id: int, system: str, row_id: str) -> Path:
    row = store.query_one("SELECT audio_path FROM batch_outputs WHERE run_id = ? AND system = ? AND row_id = ? "
                          "AND status = 'done'", (run_id, system, row_id))
    path = store.file(row["audio_path"]) if row is not None else None
    if path is None:
        raise UnknownItem("The audio of this item is missing on the server; tell the organiser.")
    return path


def prompt_file(store: Store, run_id: int, row_id: str) -> Path:
    """The prompt clip of a batch row: a saved or sample voice by name, or an audio file path (absolute, or
    relative to the data directory)."""
    from studio.voices import VoiceError, VoiceLibrary

    row = store.query_one("SELECT prompt FROM batch_rows WHERE run_id = ? AND row_id = ?", (run_id, row_id))
    if row is None:
        raise UnknownItem(f"Row {row_id!r} is not in the batch run.")
    prompt = str(row["prompt"])
    candidate = Path(prompt).expanduser()
    if candidate.is_absolute() and candidate.is_file():
        return candidate
    inside = store.file(prompt)
    if inside is not None:
        return inside
    try:
        return VoiceLibrary(store.root).get(prompt).audio_path
    except VoiceError:
        pass
    raise ListeningError(f"The prompt clip of row {row_id!r} ({prompt}) cannot be found; SMOS needs it.")


def clip_wav_bytes(path: Path) -> bytes:
    """The clip as the rater receives it: mono 16-bit WAV at SERVE_RATE, levelled to TARGET_RMS_DBFS, with
    no metadata chunks (a file's own header or tags could tell systems apart)."""
    import soundfile as sf

    from studio.audio_io import AudioInputError, load_audio

    try:
        wav = load_audio(path, SERVE_RATE)
    except AudioInputError:
        raise BrokenAudio("This clip cannot be played (its file is damaged); tell the organiser.") from None
    rms = float(np.sqrt(np.mean(np.square(wav, dtype=np.float64)))) if wav.size else 0.0
    peak = float(np.abs(wav).max()) if wav.size else 0.0
    if rms > 0:
        gain = min(10 ** (TARGET_RMS_DBFS / 20) / rms, PEAK_LIMIT / peak)
        wav = wav * gain
    buf = io.BytesIO()
    sf.write(buf, np.clip(wav, -1, 1).astype(np.float32), SERVE_RATE, subtype="PCM_16", format="WAV")
    return buf.getvalue()


# --- the organiser's side ------------------------------------------------------------------------------------
def raters_of(store: Store, session: Session) -> list[dict]:
    """Per rater: label, token, answered / total items, when they last answered."""
    rows = store.query(
        "SELECT t.id, t.slot, t.label, t.token, t.via, t.created, COUNT(i.id) AS total, COUNT(a.id) AS answered, "
        "MAX(a.answered) AS last FROM raters t LEFT JOIN rater_items i ON i.rater_id = t.id "
        "LEFT JOIN answers a ON a.item_id = i.id WHERE t.session_id = ? GROUP BY t.id ORDER BY t.slot",
        (session.id,))
    return [dict(r) for r in rows]


def answer_records(store: Store, session: Session) -> list[dict]:
    """Every answer, unblinded, as plain records in `studio/qa_stats.py`'s format (item = the row id).

    MOS/SMOS: rater, item, system, score. A/B: rater, item, system_a, system_b (the systems as heard on
    sides A and B), choice (the preferred system, or None for no preference), side ('A' | 'B' | 'none'),
    reason. Every record also carries session, kind, position (in the rater's order) and answered (UTC)."""
    rows = store.query(
        "SELECT t.label AS rater, i.row_id, i.position, i.system_a, i.system_b, a.choice, a.score, a.reason, "
        "a.answered FROM answers a JOIN rater_items i ON i.id = a.item_id JOIN raters t ON t.id = i.rater_id "
        "WHERE t.session_id = ? ORDER BY t.slot, i.position", (session.id,))
    out = []
    for r in rows:
        rec = {"session": session.name, "kind": session.kind, "rater": r["rater"], "item": r["row_id"],
               "position": r["position"], "answered": r["answered"]}
        if session.kind == "ab":
            preferred = {"A": r["system_a"], "B": r["system_b"]}.get(r["choice"])
            rec.update(system_a=r["system_a"], system_b=r["system_b"], choice=preferred, side=r["choice"],
                       reason=r["reason"])
        else:
            rec.update(system=r["system_a"], score=r["score"], reason=r["reason"])
        out.append(rec)
    return out


#: Objective figures of the session's outputs shown beside the ratings (per-system means with CIs):
#: client timings from the batch run, and the objective checks when the run had them (--check).
OBJECTIVE_FIELDS = ("latency_s", "first_chunk_s", "rtf", "wer", "cer", "speaker_sim")


def objective_records(store: Store, session: Session) -> list[dict]:
    """One record per finished output of the session's systems: {"system", <OBJECTIVE_FIELDS present>}."""
    import json

    out = []
    for r in store.query("SELECT system, metrics FROM batch_outputs WHERE run_id = ? AND status = 'done'",
                         (session.run_id,)):
        if r["system"] not in session.systems:
            continue
        metrics = json.loads(r["metrics"]) if r["metrics"] else {}
        rec = {k: metrics[k] for k in OBJECTIVE_FIELDS
               if isinstance(metrics.get(k), (int, float)) and not isinstance(metrics.get(k), bool)}
        if rec:
            out.append({"system": r["system"], **rec})
    return out


def report(store: Store, session: Session) -> dict:
    """The session's statistics (`qa_stats.qa_report`) with the session's settings and answer count,
    and the outputs' objective figures per system beside them."""
    from studio import qa_stats

    records = answer_records(store, session)
    # its keyword names are the kinds: mos, smos, ab
    rep = qa_stats.qa_report(**{session.kind: records}, objective=objective_records(store, session),
                             objective_fields=list(OBJECTIVE_FIELDS))
    rep["session"] = session_summary(session)
    rep["answers"] = len(records)
    return rep


#: Columns of the raw answers export, per kind.
ANSWER_COLUMNS = {
    "ab": ("rater", "item", "position", "system_a", "system_b", "side", "choice", "reason", "answered"),
    "mos": ("rater", "item", "position", "system", "score", "reason", "answered"),
    "smos": ("rater", "item", "position", "system", "score", "reason", "answered"),
}


def export(store: Store, session: Session, directory: Path) -> dict[str, Path]:
    """Write the session's results under `directory`: `NAME.json` (settings, statistics and every answer),
    `csv/` (one CSV per statistics table, from qa_stats, plus answers.csv) and `plot.png`.
    Returns {"json": ..., "csv_dir": ..., "answers_csv": ..., "plot": ...}."""
    import csv

    from studio import qa_stats

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rep = report(store, session)
    records = answer_records(store, session)
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in session.name).strip("._") or "session"
    json_path = directory / f"{safe}.json"
    tmp = json_path.with_name(f".{json_path.name}.tmp")
    tmp.write_text(dumps({**rep, "records": records}), "utf-8")
    tmp.replace(json_path)
    csv_dir = directory / "csv"
    qa_stats.write_csv(rep, csv_dir)
    answers_csv = csv_dir / "answers.csv"
    with open(answers_csv, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=ANSWER_COLUMNS[session.kind], extrasaction="ignore")
        writer.writeheader()
        for rec in records:
            writer.writerow({k: "" if rec.get(k) is None else rec.get(k) for k in ANSWER_COLUMNS[session.kind]})
    plot = qa_stats.write_plot(rep, directory / "plot.png")
    return {"json": json_path, "csv_dir": csv_dir, "answers_csv": answers_csv, "plot": plot}


def results_table(rep: dict, kind: str) -> tuple[list[str], list[list]]:
    """The headline table of a report, for the page and the command line: per system (MOS/SMOS) or per
    pair (A/B). Numbers rounded for reading; the exports keep full precision."""
    r2 = lambda x: None if x is None else round(float(x), 2)  # noqa: E731
    r4 = lambda x: None if x is None else round(float(x), 4)  # noqa: E731
    if kind == "ab":
        headers = ["System X", "System Y", "Answers", "Raters", "Prefer X", "No preference", "Prefer Y",
                   "p (Holm)", "Significant"]
        rows = [[t["system_a"], t["system_b"], t["n_answers"], t["n_raters"], t["prefer_a"], t["no_preference"],
                 t["prefer_b"], r4(t["p_holm"]), "yes" if t["significant"] else "no"] for t in rep["tables"]["ab"]]
        return headers, rows
    headers = ["System", "Answers", "Raters", "Items", "Mean", "95% CI (bootstrap)", "95% CI (t)"]
    ci = lambda lo, hi: "" if lo is None or hi is None else f"{lo:.2f} - {hi:.2f}"  # noqa: E731
    rows = [[t["system"], t["n_answers"], t["n_raters"], t["n_items"], r2(t["mean"]), ci(t["boot_low"], t["boot_high"]),
             ci(t["t_low"], t["t_high"])] for t in rep["tables"]["ratings"]]
    return headers, rows


def pairs_table(rep: dict) -> tuple[list[str], list[list]]:
    """MOS/SMOS: every pair of systems compared (Wilcoxon over shared items, Holm-corrected)."""
    r3 = lambda x: None if x is None else round(float(x), 3)  # noqa: E731
    headers = ["System X", "System Y", "Items", "Mean X - Y", "p (Holm)", "Significant"]
    rows = [[t["system_a"], t["system_b"], t["n_items"], r3(t["mean_difference"]), r3(t["p_holm"]),
             "yes" if t["significant"] else "no"] for t in rep["tables"].get("rating_pairs", [])]
    return headers, rows


def objective_table(rep: dict) -> tuple[list[str], list[list]]:
    """The outputs' objective figures as one row per system, one column per measured field (means over the
    system's finished outputs; intervals are in the exports). Empty when the run measured nothing."""
    fields = [f for f in OBJECTIVE_FIELDS if any(t["field"] == f for t in rep["tables"].get("objective", []))]
    means: dict[str, dict[str, float]] = {}
    for t in rep["tables"].get("objective", []):
        means.setdefault(t["system"], {})[t["field"]] = t["mean"]
    headers = ["System"] + [f"{f} (mean)" for f in fields]
    rows = [[system] + [None if by_field.get(f) is None else round(float(by_field[f]), 3) for f in fields]
            for system, by_field in means.items()]
    return (headers, rows) if fields else (headers, [])


def agreement_line(rep: dict) -> str:
    """Rater agreement in words (Krippendorff's ordinal alpha for MOS/SMOS), or '' when there is none."""
    parts = []
    for t in rep["tables"].get("agreement", []):
        alpha = "undefined" if t["alpha"] is None else f"{t['alpha']:.2f}"
        parts.append(f"{t['test']} rater agreement (Krippendorff's ordinal alpha): {alpha}"
                     + (f" ({t['note']})" if t.get("note") else ""))
    return "; ".join(parts)


def format_table(headers: list[str], rows: list[list]) -> str:
    """Plain-text columns (the `results` command's output)."""
    cells = [[str(h) for h in headers]] + [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def answer_count(store: Store, session: Session) -> int:
    return store.query_one("SELECT COUNT(*) FROM answers a JOIN rater_items i ON i.id = a.item_id JOIN raters t "
                           "ON t.id = i.rater_id WHERE t.session_id = ?", (session.id,))[0]


def session_summary(session: Session) -> dict:
    """The session's settings as plain data (exports carry it beside the answers)."""
    return {"name": session.name, "kind": session.kind, "run_id": session.run_id, "systems": list(session.systems),
            "items_per_rater": session.items_per_rater, "created": session.created}


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, indent=2)
