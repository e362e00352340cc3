"""Batch generation for internal QA listening tests: a test set x several systems -> stored outputs.

A *test set* is a table with a header row and the columns

    id, prompt, reference_text, target_text [, seed]

from a CSV/TSV file (the delimiter is sniffed: comma, tab, semicolon or |) or pasted text. `prompt`
is a voice of the library (studio.voices: a saved voice or a shipped sample, by name) or the path of
an audio file (relative to the test set's folder). An empty `reference_text` with a library voice
takes the voice's transcript. Rows with every cell empty are skipped (and counted); any other
problem refuses the whole test set with every problem found, before anything is written.

A *run* (table `batch_runs`, unique name) generates every (system, row) pair (systems:
studio.systems) through the studio's Triton client with a bounded number of threads and stores
each output's audio under `DATA/batch/RUN_ID/` and a row in `batch_outputs` (plus, for model
systems, a `generations` row carrying the metrics). Each output is committed in one transaction
after its audio file was renamed into place, so a run killed at any moment keeps every output it
finished. Starting a run with an existing name resumes it: outputs already `done` are skipped,
`failed` ones are tried again; systems given on resuming are added to the run's. `files:DIR`
systems import DIR/ROW_ID.wav as outputs (no latency metrics).

    test_set = read_test_set("testset.csv")                  # or parse_test_set(text)
    run = prepare_run(store, "run-1", test_set, ["f5:nfe_steps=16", "spark"], voices)
    summary = run_batch(store, run, client, concurrency=4, on_progress=print)
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
import threading
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from studio.history import insert_generation, new_id
from studio.store import Store, from_json, to_json, utc_now
from studio.systems import SEED_RANGE, System, SystemSpecError, parse_systems

REQUIRED_COLUMNS = ("id", "prompt", "reference_text", "target_text")
OPTIONAL_COLUMNS = ("seed",)
DELIMITERS = ",\t;|"
#: Bytes of the test set the delimiter sniffer looks at (the header and the first rows).
SNIFF_BYTES = 8192
#: Largest test set read (bytes): thousands of rows; a bigger file is more likely a wrong file.
MAX_TEST_SET_BYTES = 20_000_000
MAX_ID_CHARS = 100
#: Problems listed in one error before "... and N more".
MAX_LISTED_PROBLEMS = 12
#: Audio suffixes that make a prompt look like a file path rather than a voice name.
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".m4a", ".opus", ".aac", ".aiff", ".aif")
BATCH_DIR = "batch"
#: How long one generation may take before the client gives up (s): long texts on a busy CPU.
GENERATION_TIMEOUT_S = 900.0
RUN_STATUSES = ("created", "running", "done", "failed", "stopped")


class BatchInputError(ValueError):
    """A test set, system list or run name the batch cannot use; the message lists every problem."""


# --- test sets ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TestRow:
    row_id: str
    prompt: str              # as written: a voice name or an audio path
    reference_text: str
    target_text: str
    seed: int | None = None
    line: int = 0            # where it was in the source (1 = header), for messages

    __test__ = False  # not a pytest class


@dataclass(frozen=True)
class TestSet:
    rows: tuple[TestRow, ...]
    source: str              # the file's path, or "pasted"
    base_dir: Path           # relative prompt paths start here
    skipped_empty: tuple[int, ...] = ()  # lines skipped because every cell was empty

    __test__ = False

    def note(self) -> str:
        """A line for the user about skipped empty rows ('' when none)."""
        if not self.skipped_empty:
            return ""
        lines = ", ".join(map(str, self.skipped_empty[:MAX_LISTED_PROBLEMS]))
        return f"skipped {len(self.skipped_empty)} empty row(s) (line {lines})"


def _problems(what: str, problems: list[str]) -> BatchInputError:
    shown = problems[:MAX_LISTED_PROBLEMS]
    more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    return BatchInputError(f"{what}:\n  " + "\n  ".join(shown) + more)


def read_test_set(path: str | Path) -> TestSet:
    """A test set file (UTF-8 CSV/TSV with a header). BatchInputError names every problem."""
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BatchInputError(f"test set {path}: no such file") from None
    except OSError as exc:
        raise BatchInputError(f"test set {path}: cannot read it ({exc.strerror or exc})") from None
    if len(data) > MAX_TEST_SET_BYTES:
        raise BatchInputError(f"test set {path}: {len(data) // 1_000_000} MB is too big for a test set "
                              f"(at most {MAX_TEST_SET_BYTES // 1_000_000} MB)")
    try:
        text = data.decode("utf-8-sig")  # a BOM from spreadsheet exports is fine
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise BatchInputError(f"test set {path}: not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); "
                              "save it as UTF-8 (CSV UTF-8 in spreadsheet programs) and try again") from None
    path = path.resolve()  # stored with the run: resuming from another folder finds the same file
    return parse_test_set(text, source=str(path), base_dir=path.parent)


def sniff_delimiter(text: str) -> str:
    """The delimiter of a test set: csv.Sniffer on its start, else whichever of tab/comma/;/| splits the header
    into the most cells."""
    sample = text[:SNIFF_BYTES]
    header = sample.splitlines()[0] if sample.splitlines() else ""
    try:
        found = csv.Sniffer().sniff(sample, delimiters=DELIMITERS).delimiter
        if header.count(found):
            return found
    except csv.Error:
        pass
    return max(DELIMITERS, key=lambda d: (header.count(d), d == ","))


def parse_test_set(text: str, source: str = "pasted", base_dir: Path | None = None) -> TestSet:
    """Rows of a test set given as text (a header row, then one row per line)."""
    where = f"test set {source}"
    if "\x00" in text:
        raise BatchInputError(f"{where}: holds NUL characters; is it a spreadsheet file (.xlsx)? "
                              "Export it as CSV UTF-8")
    if not text.strip():
        raise BatchInputError(f"{where}: is empty; it needs a header ({', '.join(REQUIRED_COLUMNS)}) and rows")
    delimiter = sniff_delimiter(text)
    reader = csv.reader(io.StringIO(text.lstrip("\ufeff")), delimiter=delimiter)
    try:
        table = list(reader)
    except csv.Error as exc:
        raise BatchInputError(f"{where}: not a readable table ({exc})") from None
    header_at = next((i for i, r in enumerate(table) if any(c.strip() for c in r)), None)
    if header_at is None:
        raise BatchInputError(f"{where}: holds no header; it needs {', '.join(REQUIRED_COLUMNS)} (and optionally seed)")
    header = [unicodedata.normalize("NFC", c).strip().lower() for c in table[header_at]]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    unknown = [c for c in header if c and c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    shown_delim = {"\t": "tab"}.get(delimiter, repr(delimiter))
    if missing:
        raise BatchInputError(f"{where}: missing column(s) {', '.join(missing)}; the header (split at {shown_delim}) "
                              f"is {header}; it needs {', '.join(REQUIRED_COLUMNS)} (and optionally seed)")
    if unknown or len(set(header)) != len(header):
        dup = sorted({c for c in header if header.count(c) > 1})
        raise BatchInputError(f"{where}: " + (f"unknown column(s) {', '.join(unknown)}" if unknown else
                                              f"column(s) {', '.join(dup)} given twice") +
                              f"; the columns are {', '.join(REQUIRED_COLUMNS)} and optionally seed")
    col = {name: header.index(name) for name in header if name}
    rows: list[TestRow] = []
    skipped: list[int] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    for index, cells in enumerate(table[header_at + 1:], start=header_at + 2):
        line = index  # csv rows map to lines unless a cell holds a newline; close enough for messages
        if not any(c.strip() for c in cells):
            skipped.append(line)
            continue
        if len(cells) > len(header):
            problems.append(f"line {line}: {len(cells)} cells for {len(header)} columns (a {shown_delim} inside "
                            "a text? put that text in double quotes)")
            continue
        cells = cells + [""] * (len(header) - len(cells))
        get = lambda name: unicodedata.normalize("NFC", cells[col[name]]).strip() if name in col else ""  # noqa: E731
        row_id = get("id")
        id_problem = _check_id(row_id)
        if id_problem:
            problems.append(f"line {line}: {id_problem}")
            continue
        if row_id in seen:
            problems.append(f"line {line}: id {row_id!r} again (first on line {seen[row_id]}); ids must be unique")
            continue
        seen[row_id] = line
        if not get("target_text"):
            problems.append(f"line {line} (id {row_id}): empty target_text; say what to speak")
        if not get("prompt"):
            problems.append(f"line {line} (id {row_id}): empty prompt; give a voice name or an audio file")
        seed = None
        if get("seed"):
            raw = get("seed")
            if not re.fullmatch(r"\+?\d+", raw) or not SEED_RANGE[0] <= int(raw) <= SEED_RANGE[1]:
                problems.append(f"line {line} (id {row_id}): seed {raw!r} is not a whole number in "
                                f"[0, 2^63 - 1]; leave it empty for a random seed")
            else:
                seed = int(raw)
        rows.append(TestRow(row_id, get("prompt"), get("reference_text"), get("target_text"), seed, line))
    if problems:
        raise _problems(where, problems)
    if not rows:
        raise BatchInputError(f"{where}: has a header but no rows" +
                              (f" ({len(skipped)} empty rows skipped)" if skipped else ""))
    return TestSet(tuple(rows), source, Path(base_dir) if base_dir else Path.cwd(), tuple(skipped))


def _check_id(row_id: str) -> str | None:
    """Why `row_id` cannot be an id (it names files: files:DIR/ROW_ID.wav), or None."""
    if not row_id:
        return "empty id; every row needs one"
    if len(row_id) > MAX_ID_CHARS:
        return f"id {row_id[:20]!r}... is longer than {MAX_ID_CHARS} characters"
    if any(ch in row_id for ch in "/\\") or row_id.startswith(".") or any(unicodedata.category(c)[0] == "C"
                                                                          for c in row_id):
        return f"id {row_id!r} cannot name a file (no / or \\, no leading dot, no control characters)"
    return None


# --- prompts and systems against a test set --------------------------------------------------------------
@dataclass(frozen=True)
class Prompt:
    """Where a row's prompt audio is and which voice it was (None: a plain file)."""

    path: Path
    voice: str | None
    transcript: str


def looks_like_path(prompt: str) -> bool:
    return "/" in prompt or "\\" in prompt or prompt.lower().endswith(AUDIO_SUFFIXES)


def resolve_prompt(prompt: str, voices, base_dir: Path) -> Prompt:
    """A row's prompt: a library voice by name (or key) first, else an audio file. BatchInputError otherwise."""
    import soundfile as sf

    from studio.voices import VoiceError

    if voices is not None and not looks_like_path(prompt):
        try:
            voice = voices.get(prompt)
            return Prompt(voice.audio_path, voice.label, voice.transcript)
        except VoiceError:
            pass
    path = Path(prompt).expanduser()
    path = path if path.is_absolute() else (base_dir / path)
    if not path.is_file():
        if looks_like_path(prompt):
            raise BatchInputError(f"prompt {prompt!r}: missing audio file ({path} does not exist)")
        names = ", ".join(v.name for v in voices.list()[:10]) if voices is not None else ""
        raise BatchInputError(f"prompt {prompt!r}: unknown voice" + (f" (voices: {names})" if names else "") +
                              " and no such audio file")
    try:
        info = sf.info(str(path))
    except (RuntimeError, sf.LibsndfileError) as exc:
        raise BatchInputError(f"prompt {prompt!r}: {path} is not readable audio ({exc})") from None
    if info.frames <= 0:
        raise BatchInputError(f"prompt {prompt!r}: {path} holds no audio")
    return Prompt(path.resolve(), None, "")


def files_for(system: System, base_dir: Path) -> Path:
    folder = Path(system.folder).expanduser()
    return folder if folder.is_absolute() else base_dir / folder


def check_output_wav(path: Path) -> tuple[int, int]:
    """(sample_rate, frames) of a pre-made output WAV; ValueError saying why it cannot be used."""
    import soundfile as sf

    try:
        with sf.SoundFile(str(path)) as f:
            wav = f.read(dtype="float32", always_2d=True)
            sr = f.samplerate
    except (RuntimeError, sf.LibsndfileError) as exc:
        raise ValueError(f"{path} is not a readable WAV ({exc})") from None
    if wav.shape[0] == 0:
        raise ValueError(f"{path} holds no audio (0 samples)")
    if not np.isfinite(wav).all():
        raise ValueError(f"{path} holds NaN or infinite samples")
    return sr, wav.shape[0]


def _find_wav(folder: Path, row_id: str) -> Path | None:
    for suffix in (".wav", ".WAV"):
        path = folder / f"{row_id}{suffix}"
        if path.is_file():
            return path
    return None


def validate(test_set: TestSet, systems: list[System], voices) -> dict[str, Prompt]:
    """Check the test set against the systems before anything is written; returns each row's prompt (for
    systems that clone). BatchInputError lists every problem found."""
    problems: list[str] = []
    prompts: dict[str, Prompt] = {}
    cloning = [s for s in systems if not s.is_files and not s.voice_creation]
    if cloning:
        for row in test_set.rows:
            try:
                prompt = resolve_prompt(row.prompt, voices, test_set.base_dir)
            except BatchInputError as exc:
                problems.append(f"line {row.line} (id {row.row_id}): {exc}")
                continue
            prompts[row.row_id] = prompt
            if not (row.reference_text or prompt.transcript) and any(s.family == "f5" for s in cloning):
                problems.append(f"line {row.line} (id {row.row_id}): empty reference_text; F5-TTS needs the "
                                "transcript of the prompt clip")
    for system in systems:
        if not system.is_files:
            continue
        folder = files_for(system, test_set.base_dir)
        if not folder.is_dir():
            problems.append(f"system {system.spec}: {folder} is not a folder")
            continue
        missing = []
        for row in test_set.rows:
            path = _find_wav(folder, row.row_id)
            if path is None:
                missing.append(row.row_id)
                continue
            try:
                check_output_wav(path)
            except ValueError as exc:
                problems.append(f"system {system.spec}: {exc}")
        if missing:
            shown = ", ".join(missing[:MAX_LISTED_PROBLEMS]) + (" ..." if len(missing) > MAX_LISTED_PROBLEMS else "")
            problems.append(f"system {system.spec}: no WAV for {len(missing)} of {len(test_set.rows)} row id(s) in "
                            f"{folder} ({shown}); it needs one ROW_ID.wav per row")
    if problems:
        raise _problems(f"test set {test_set.source}", problems)
    return prompts


def parse_system_list(texts: list[str], base_dir: Path) -> list[System]:
    """Systems from their strings; `files:` folders made absolute so a resumed run finds them anywhere."""
    if not texts:
        raise BatchInputError("no systems: give at least one, e.g. --system f5:nfe_steps=16 --system spark")
    try:
        systems = parse_systems(texts)
    except SystemSpecError as exc:
        raise BatchInputError(str(exc)) from None
    out = [replace(s, folder=str(files_for(s, base_dir).resolve())) if s.is_files else s for s in systems]
    return parse_systems([s.spec for s in out])


# --- runs --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """A run as stored: its id, name, systems, rows (prompts resolved) and files folders."""

    run_id: int
    name: str
    systems: tuple[System, ...]
    rows: tuple[TestRow, ...]
    concurrency: int
    resumed: bool = False
    added_systems: tuple[str, ...] = ()


def check_run_name(name: str) -> str:
    name = unicodedata.normalize("NFC", str(name or "")).strip()
    if not name:
        raise BatchInputError("a run needs a name (-o NAME); the same name resumes it")
    if len(name) > 200 or any(unicodedata.category(c)[0] == "C" for c in name):
        raise BatchInputError(f"run name {name[:40]!r}: use at most 200 printable characters")
    return name


def _stored_prompt(row: TestRow, prompts: dict[str, Prompt]) -> str:
    """What batch_rows keeps as the prompt: the voice name, or the audio file's absolute path."""
    p = prompts.get(row.row_id)
    if p is None:
        return row.prompt
    return row.prompt if p.voice else str(p.path)


def prepare_run(store: Store, name: str, test_set: TestSet | None, systems: list[str], voices,
                concurrency: int = 4, user: str | None = None) -> Run:
    """Create run `name`, or resume it (same rows required; new systems are added). Everything is checked
    first and written in one transaction. `test_set` None resumes with the stored rows."""
    name = check_run_name(name)
    if not isinstance(concurrency, int) or not 1 <= concurrency <= 64:
        raise BatchInputError(f"concurrency must be a whole number from 1 to 64; got {concurrency!r}")
    existing = store.query_one("SELECT * FROM batch_runs WHERE name = ?", (name,))
    if test_set is None:
        if existing is None:
            raise BatchInputError(f"there is no run called {name!r} to resume; give a test set to start it")
        # Stored prompts are absolute paths or voice names; a new files: folder is relative to the test set's.
        source = existing["source"]
        base = Path(source).parent if Path(source).is_absolute() else Path.cwd()
        test_set = TestSet(tuple(_stored_rows(store, existing["id"])), source, base)
    base = test_set.base_dir
    new_systems = parse_system_list(systems, base) if systems else []
    all_specs = list(from_json(existing["systems"], [])) if existing is not None else []
    added = tuple(s.spec for s in new_systems if s.spec not in all_specs)
    all_specs += added
    if not all_specs:
        raise BatchInputError("no systems: give at least one, e.g. --system f5:nfe_steps=16 --system spark")
    run_systems = parse_system_list(all_specs, base)
    prompts = validate(test_set, run_systems, voices)
    rows = tuple(replace(r, prompt=_stored_prompt(r, prompts),
                         reference_text=r.reference_text or (prompts[r.row_id].transcript if r.row_id in prompts
                                                             else "")) for r in test_set.rows)
    with store.transaction() as db:
        again = db.execute("SELECT * FROM batch_runs WHERE name = ?", (name,)).fetchone()
        if again is None:
            now = utc_now()
            run_id = db.execute(
                "INSERT INTO batch_runs (name, created, updated, user, systems, source, concurrency, status)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, 'created')",
                (name, now, now, user, to_json(all_specs), test_set.source, concurrency)).lastrowid
            db.executemany(
                "INSERT INTO batch_rows (run_id, row_id, position, prompt, reference_text, target_text, seed)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(run_id, r.row_id, i, r.prompt, r.reference_text, r.target_text, r.seed) for i, r in enumerate(rows)])
            return Run(run_id, name, tuple(run_systems), rows, concurrency)
        run_id = again["id"]
        stored = _stored_rows(store, run_id, db)
        _check_same_rows(name, stored, rows)
        db.execute("UPDATE batch_runs SET systems = ?, concurrency = ?, updated = ? WHERE id = ?",
                   (to_json(all_specs), concurrency, utc_now(), run_id))
    return Run(run_id, name, tuple(run_systems), tuple(stored), concurrency, resumed=True,
               added_systems=added if existing is not None else ())


def _stored_rows(store: Store, run_id: int, db=None) -> list[TestRow]:
    conn = db if db is not None else store.connection()
    return [TestRow(r["row_id"], r["prompt"], r["reference_text"], r["target_text"], r["seed"], r["position"] + 2)
            for r in conn.execute("SELECT * FROM batch_rows WHERE run_id = ? ORDER BY position", (run_id,))]


def _check_same_rows(name: str, stored: list[TestRow], given: tuple[TestRow, ...]) -> None:
    key = lambda r: (r.row_id, r.prompt, r.reference_text, r.target_text, r.seed)  # noqa: E731
    if [key(r) for r in stored] == [key(r) for r in given]:
        return
    old, new = {r.row_id: key(r) for r in stored}, {r.row_id: key(r) for r in given}
    changed = sorted(i for i in old.keys() & new.keys() if old[i] != new[i])
    parts = []
    if new.keys() - old.keys():
        parts.append(f"new id(s) {', '.join(sorted(new.keys() - old.keys())[:5])}")
    if old.keys() - new.keys():
        parts.append(f"missing id(s) {', '.join(sorted(old.keys() - new.keys())[:5])}")
    if changed:
        parts.append(f"changed row(s) {', '.join(changed[:5])}")
    raise BatchInputError(f"run {name!r} exists with a different test set ({'; '.join(parts) or 'other order'}); "
                          "resume it with the same test set (or none), or choose another name")


# --- progress ----------------------------------------------------------------------------------------------
@dataclass
class Progress:
    """Where a run stands; handed to the progress callback after every output (and at start and end)."""

    run: str
    total: int                # outputs of the run (systems x rows)
    done: int = 0             # outputs done, including those done before this session
    failed: int = 0           # outputs failed in this session
    skipped: int = 0          # outputs already done when this session started (not generated again)
    generated: int = 0        # outputs produced in this session (model systems and files:)
    started: float = field(default_factory=time.monotonic)
    finished: bool = False
    stopped: bool = False
    last_error: str = ""

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    @property
    def eta_s(self) -> float | None:
        """Seconds left at this session's pace (None until one output finished here)."""
        worked = self.generated + self.failed
        remaining = self.total - self.done - self.failed
        if not worked:
            return None
        return max(remaining, 0) * self.elapsed_s / worked

    def line(self) -> str:
        eta = self.eta_s
        text = (f"[{self.run}] {self.done}/{self.total} done, {self.failed} failed, "
                f"{self.elapsed_s:.0f} s elapsed" + (f", ETA {eta:.0f} s" if eta is not None and not self.finished
                                                      else ""))
        if self.skipped:
            text += f" ({self.skipped} done before)"
        return text

    def as_dict(self) -> dict:
        return {"run": self.run, "total": self.total, "done": self.done, "failed": self.failed,
                "skipped": self.skipped, "generated": self.generated, "elapsed_s": round(self.elapsed_s, 2),
                "eta_s": None if self.eta_s is None else round(self.eta_s, 1), "finished": self.finished,
                "stopped": self.stopped, "last_error": self.last_error}


# --- running -----------------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    """A file-name-safe, unique and still readable name for a system or a row id."""
    safe = re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("._")[:48]
    return f"{safe or 'x'}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:8]}"


def output_path(run: Run, system: System, row_id: str) -> str:
    """Relative path (to the data directory) of one output's audio."""
    return f"{BATCH_DIR}/{run.run_id}/{_slug(system.spec)}/{_slug(row_id)}.wav"


def output_metrics(result) -> dict:
    """DESIGN.md metrics of one generation (client timings, the used seed, Spark tokens, server compute)."""
    info = result.info or {}
    m = {"latency_s": round(result.latency_s, 4), "first_chunk_s": round(result.first_chunk_s, 4),
         "audio_s": round(result.audio_s, 4), "rtf": round(result.rtf, 4) if np.isfinite(result.rtf) else None,
         "seed": result.seed, "chunks": len(result.chunk_arrivals_s), "compute_ms": info.get("compute_ms")}
    for key in ("tokens", "prefill_ms", "decode_ms"):
        if key in info:
            m[key] = info[key]
    if info.get("tokens") and info.get("decode_ms"):
        m["decode_tokens_per_s"] = round(info["tokens"] / (info["decode_ms"] / 1000.0), 1)
    return m


def _save_output(store: Store, run: Run, system: System, row_id: str, *, status: str, audio_path: str | None = None,
                 sample_rate: int | None = None, metrics: dict | None = None, error: str | None = None,
                 generation: dict | None = None) -> None:
    """One output (and its generation row) in one transaction; a failed one replaces nothing done."""
    with store.transaction() as db:
        if generation is not None:
            insert_generation(db, generation, batch_run=run.run_id)
        db.execute(
            "INSERT INTO batch_outputs (run_id, system, row_id, status, audio_path, sample_rate, metrics, error,"
            " generation_id, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT(run_id, system, row_id) DO UPDATE SET status = excluded.status,"
            " audio_path = excluded.audio_path, sample_rate = excluded.sample_rate, metrics = excluded.metrics,"
            " error = excluded.error, generation_id = excluded.generation_id, updated = excluded.updated"
            " WHERE batch_outputs.status != 'done'",
            (run.run_id, system.spec, row_id, status, audio_path, sample_rate, to_json(metrics or {}), error,
             generation["id"] if generation else None, utc_now()))


def done_outputs(store: Store, run_id: int) -> set[tuple[str, str]]:
    return {(r["system"], r["row_id"]) for r in
            store.query("SELECT system, row_id FROM batch_outputs WHERE run_id = ? AND status = 'done'", (run_id,))}


class PromptCache:
    """Each row's prompt clip loaded once per sample rate (F5 24 kHz, Spark 16 kHz), shared by threads."""

    def __init__(self, prompts: dict[str, Path]):
        self.paths = prompts
        self._cache: dict[tuple[str, int], np.ndarray] = {}
        self._lock = threading.Lock()

    def get(self, row_id: str, sample_rate: int) -> np.ndarray:
        from studio.audio_io import load_audio

        key = (row_id, sample_rate)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        wav = load_audio(self.paths[row_id], sample_rate)
        with self._lock:
            self._cache[key] = wav
        return wav


def check_metrics(client, audio: np.ndarray, sample_rate: int, target_text: str, prompts: PromptCache,
                  row_id: str) -> dict:
    """Objective checks of one output (studio/objective.py) as flat metrics; notes under `check_notes`."""
    from studio.objective import CHECK_SAMPLE_RATE, run_checks

    prompt = prompts.get(row_id, CHECK_SAMPLE_RATE) if row_id in prompts.paths else None
    checked = run_checks(client, audio, sample_rate, target_text, prompt, CHECK_SAMPLE_RATE if prompt is not None
                         else None)
    out = checked.metrics()
    if checked.notes:
        out["check_notes"] = checked.notes
    return out


def _generate_one(store: Store, run: Run, system: System, row: TestRow, client, prompts: PromptCache,
                  voices_of: dict[str, str | None], cancel: threading.Event, checks: bool = False) -> str | None:
    """Generate, store and commit one model output. Returns None when done, else the error message."""
    from studio.client import SAMPLE_RATES, GenerationCancelled, SynthesisError

    params = dict(system.options)
    if row.seed is not None:
        params.setdefault("seed", row.seed)  # a seed in the system string wins over the row's
    try:
        ref = None if system.voice_creation else prompts.get(row.row_id, SAMPLE_RATES[system.family])
        ref_text = "" if system.voice_creation else row.reference_text
        result = client.synthesize(system.family, row.target_text, ref, ref_text, stream=system.stream,
                                   params=params, cancel=cancel, timeout_s=GENERATION_TIMEOUT_S)
    except GenerationCancelled:
        return None
    except (SynthesisError, ValueError) as exc:  # ValueError: a prompt the client or audio reader refused
        error = str(exc)
        _save_output(store, run, system, row.row_id, status="failed", error=error)
        return error
    rel = output_path(run, system, row.row_id)
    store.write_wav(rel, result.audio, result.sample_rate)  # renamed into place before the commit below
    metrics = output_metrics(result)
    if checks:
        # a created voice has no prompt to compare with: error rate only
        metrics.update(check_metrics(client, result.audio, result.sample_rate, row.target_text,
                                     PromptCache({}) if system.voice_creation else prompts, row.row_id))
    generation = {"id": new_id(), "kind": "design" if system.voice_creation else "clone", "model": system.family,
                  "mode": "streaming" if system.stream else "offline", "status": "ok", "text": row.target_text,
                  "ref_text": ref_text, "voice": voices_of.get(row.row_id), "params": params, "seed": result.seed,
                  "prompt_audio": None if system.voice_creation else _inside(store, prompts.paths[row.row_id]),
                  "prompt": None if system.voice_creation else row.prompt,
                  "metrics": metrics, "info": result.info, "audio": rel, "sample_rate": result.sample_rate,
                  "demo_weights": result.demo_weights, "system": system.spec, "row_id": row.row_id}
    _save_output(store, run, system, row.row_id, status="done", audio_path=rel, sample_rate=result.sample_rate,
                 metrics=metrics, generation=generation)
    return None


def _inside(store: Store, path: Path) -> str | None:
    """`path` relative to the data directory when it lies inside (a saved voice), else None."""
    try:
        return Path(path).resolve().relative_to(store.root.resolve()).as_posix()
    except ValueError:
        return None


def _import_one(store: Store, run: Run, system: System, row: TestRow, client=None, prompts: PromptCache | None = None,
                checks: bool = False) -> str | None:
    """A files: output: check the WAV, copy it beside the database, commit. None when done, else the error."""
    path = _find_wav(Path(system.folder), row.row_id)
    try:
        if path is None:
            raise ValueError(f"{Path(system.folder) / (row.row_id + '.wav')} is missing")
        sr, frames = check_output_wav(path)
    except ValueError as exc:
        _save_output(store, run, system, row.row_id, status="failed", error=str(exc))
        return str(exc)
    rel = output_path(run, system, row.row_id)
    store.write_file(rel, path.read_bytes())
    metrics = {"audio_s": round(frames / sr, 4), "source": str(path)}
    if checks and client is not None and prompts is not None:  # recordings get the same checks as outputs
        from studio.audio_io import load_audio

        metrics.update(check_metrics(client, load_audio(path, sr), sr, row.target_text, prompts, row.row_id))
    _save_output(store, run, system, row.row_id, status="done", audio_path=rel, sample_rate=sr, metrics=metrics)
    return None


def run_batch(store: Store, run: Run, client=None, *, concurrency: int | None = None,
              on_progress: Callable[[Progress], None] | None = None, voices=None,
              stop: threading.Event | None = None, checks: bool = False) -> Progress:
    """Produce every output of `run` not yet done; returns the final Progress.

    `client` (a StudioClient, shared by the threads) is needed only when model outputs remain.
    `on_progress(progress)` is called (serialised) at the start, after each output and at the end.
    Set `stop` to finish the outputs in flight and start no more (the run's status becomes stopped).
    `checks`: objective checks (WER/CER, speaker similarity) on each new output, `files:` ones included,
    stored with its metrics (needs `client`).
    """
    stop = stop or threading.Event()
    workers = concurrency or run.concurrency
    done = done_outputs(store, run.run_id)
    # Row by row, every system for a row: a partial run still holds comparable outputs.
    pairs = [(s, r) for r in run.rows for s in run.systems]
    todo = [(s, r) for s, r in pairs if (s.spec, r.row_id) not in done]
    progress = Progress(run.name, total=len(pairs), done=len(pairs) - len(todo), skipped=len(pairs) - len(todo))
    lock = threading.Lock()

    def report(error: str | None = None, produced: bool = False) -> None:
        with lock:
            if produced:
                progress.done += 1
                progress.generated += 1
            elif error is not None:
                progress.failed += 1
                progress.last_error = error
            if on_progress is not None:
                try:
                    on_progress(progress)
                except Exception as exc:  # noqa: BLE001 - a broken display must not end the run
                    progress.last_error = f"progress callback failed: {type(exc).__name__}: {exc}"

    model_todo = [(s, r) for s, r in todo if not s.is_files]
    if model_todo and client is None:
        raise BatchInputError(f"run {run.name!r} has {len(model_todo)} model outputs to generate: it needs a "
                              "Triton client (a server)")
    # Stored prompts are voice names or absolute paths; resolve them before the run counts as running.
    prompts: dict[str, Path] = {}
    voice_names: dict[str, str | None] = {}
    checked_rows = {r.row_id for s, r in todo if s.is_files} if checks and client is not None else set()
    for row_id in {r.row_id for s, r in model_todo if not s.voice_creation} | checked_rows:
        row = next(r for r in run.rows if r.row_id == row_id)
        p = resolve_prompt(row.prompt, voices, Path("/"))
        prompts[row_id], voice_names[row_id] = p.path, p.voice
    _set_status(store, run.run_id, "running")
    report()
    files_prompts = PromptCache(prompts)
    for system, row in [(s, r) for s, r in todo if s.is_files]:
        if stop.is_set():
            break
        error = _import_one(store, run, system, row, client, files_prompts, checks)
        report(error, produced=error is None)
    if model_todo and not stop.is_set():
        cache = PromptCache(prompts)

        def work(pair):
            system, row = pair
            if stop.is_set():
                return
            try:
                error = _generate_one(store, run, system, row, client, cache, voice_names, stop, checks)
            except Exception as exc:  # noqa: BLE001 - one output's bug must not end the whole run
                error = f"{type(exc).__name__}: {exc}"
                _save_output(store, run, system, row.row_id, status="failed", error=error)
            if stop.is_set() and error is None and (system.spec, row.row_id) not in done_outputs(store, run.run_id):
                return  # cancelled mid-generation: neither done nor failed
            report(error, produced=error is None)

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="batch") as pool:
            list(pool.map(work, model_todo))
    progress.stopped = stop.is_set() and progress.done + progress.failed < progress.total
    progress.finished = True
    status = "stopped" if progress.stopped else ("failed" if progress.failed else "done")
    _set_status(store, run.run_id, status)
    report()
    return progress


def _set_status(store: Store, run_id: int, status: str) -> None:
    with store.transaction() as db:
        db.execute("UPDATE batch_runs SET status = ?, updated = ? WHERE id = ?", (status, utc_now(), run_id))


class BatchJob:
    """A run in a background thread, for the page: poll `progress()`, call `stop()`, read `error`.

        job = BatchJob(store, run, client, voices=voices).start()
        job.progress()   # {"run", "total", "done", "failed", "eta_s", "finished", ...}
    """

    def __init__(self, store: Store, run: Run, client=None, *, concurrency: int | None = None, voices=None,
                 checks: bool = False):
        self.store, self.run, self.client, self.voices, self.checks = store, run, client, voices, checks
        self.concurrency = concurrency
        self._stop = threading.Event()
        self._latest: dict = Progress(run.name, total=len(run.systems) * len(run.rows)).as_dict()
        self._lock = threading.Lock()
        self.error: str | None = None
        self.thread = threading.Thread(target=self._work, name=f"batch-{run.run_id}", daemon=True)

    def start(self) -> "BatchJob":
        self.thread.start()
        return self

    def _keep(self, progress: Progress) -> None:
        with self._lock:
            self._latest = progress.as_dict()

    def _work(self) -> None:
        try:
            run_batch(self.store, self.run, self.client, concurrency=self.concurrency, voices=self.voices,
                      stop=self._stop, on_progress=self._keep, checks=self.checks)
        except Exception as exc:  # noqa: BLE001 - shown by the page through progress()
            self.error = str(exc)
            with self._lock:
                self._latest = {**self._latest, "finished": True, "last_error": self.error}

    def progress(self) -> dict:
        with self._lock:
            return dict(self._latest, error=self.error)

    def stop(self) -> None:
        """Start no more outputs; those in flight are cancelled (the run can be resumed)."""
        self._stop.set()

    @property
    def finished(self) -> bool:
        return not self.thread.is_alive() and self.thread.ident is not None

    def wait(self, timeout: float | None = None) -> dict:
        self.thread.join(timeout)
        return self.progress()


# --- reading results -------------------------------------------------------------------------------------
def list_runs(store: Store, user: str | None = None) -> list[dict]:
    """Runs, newest first: id, name, created, updated, user, status, systems (list), rows, done, failed."""
    sql = ("SELECT r.*, (SELECT COUNT(*) FROM batch_rows b WHERE b.run_id = r.id) AS n_rows,"
           " (SELECT COUNT(*) FROM batch_outputs o WHERE o.run_id = r.id AND o.status = 'done') AS n_done,"
           " (SELECT COUNT(*) FROM batch_outputs o WHERE o.run_id = r.id AND o.status = 'failed') AS n_failed"
           " FROM batch_runs r" + (" WHERE r.user IS ?" if user is not None else "") + " ORDER BY r.id DESC")
    out = []
    for r in store.query(sql, (user,) if user is not None else ()):
        out.append({"id": r["id"], "name": r["name"], "created": r["created"], "updated": r["updated"],
                    "user": r["user"], "status": r["status"], "systems": from_json(r["systems"], []),
                    "rows": r["n_rows"], "done": r["n_done"], "failed": r["n_failed"], "source": r["source"]})
    return out


def run_summary(store: Store, name: str) -> dict:
    """A run's state for the page and the CLI: status, counts per system, failures with their errors."""
    run = store.query_one("SELECT * FROM batch_runs WHERE name = ?", (name,))
    if run is None:
        raise KeyError(f"no batch run called {name!r}")
    rows = store.query_one("SELECT COUNT(*) FROM batch_rows WHERE run_id = ?", (run["id"],))[0]
    per_system = {}
    for spec in from_json(run["systems"], []):
        counts = dict(store.query("SELECT status, COUNT(*) FROM batch_outputs WHERE run_id = ? AND system = ? "
                                  "GROUP BY status", (run["id"], spec)))
        per_system[spec] = {"done": counts.get("done", 0), "failed": counts.get("failed", 0), "rows": rows}
    failures = [dict(r) for r in store.query("SELECT system, row_id, error FROM batch_outputs WHERE run_id = ? AND "
                                             "status = 'failed' ORDER BY system, row_id", (run["id"],))]
    return {"id": run["id"], "name": run["name"], "status": run["status"], "created": run["created"],
            "updated": run["updated"], "user": run["user"], "source": run["source"], "rows": rows,
            "concurrency": run["concurrency"], "systems": per_system, "failures": failures}


def run_outputs(store: Store, name: str) -> list[dict]:
    """Every output of a run with its row's texts: system, row_id, status, audio_path, metrics, error, ..."""
    out = []
    for r in store.query(
            "SELECT o.*, b.prompt, b.reference_text, b.target_text, b.seed, b.position FROM batch_outputs o"
            " JOIN batch_runs r ON r.id = o.run_id JOIN batch_rows b ON b.run_id = o.run_id AND b.row_id = o.row_id"
            " WHERE r.name = ? ORDER BY o.system, b.position", (name,)):
        item = dict(r)
        item["metrics"] = from_json(item["metrics"])
        out.append(item)
    return out


__all__ = ["BatchInputError", "BatchJob", "Progress", "Prompt", "Run", "TestRow", "TestSet", "check_output_wav",
           "done_outputs", "list_runs", "output_metrics", "output_path", "parse_test_set", "prepare_run",
           "read_test_set", "resolve_prompt", "run_batch", "run_outputs", "run_summary", "sniff_delimiter", "validate"]
