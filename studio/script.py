"""Multi-voice scripts: dialogues and narrations with several voices, generated in parallel, heard in order.

A script is plain text. A line that starts with a voice tag begins a new segment in that voice:

    {Alice} Good morning. Did you sleep well?
    {Bob|f5:nfe_steps=16,speed=1.1} Not really; the harbour was loud all night.
    {spark:gender=female,pitch_level=high,speed_level=moderate} I heard it too.
    Lines without a tag continue the segment above.

    A blank line ends the paragraph; text after it continues the last voice as a new segment.

Tags (the settings use DESIGN.md's system grammar, `studio/systems.py`):
- `{Name}`: a saved or sample voice of the library, generated with the script's default family;
- `{Name|f5:...}` / `{Name|spark:...}`: the same voice with a family and request settings;
- `{spark:gender=...[,pitch_level=...,speed_level=...,...]}`: a voice created by Spark-TTS. Spark
  draws a new speaker for every creation request, so the voice is created once, on the tag's first
  segment, and that segment's audio and text are kept as a temporary prompt: every later segment
  with the same tag (same canonical settings) is cloned from it, so the speaker stays the same.

Pauses: a segment that starts a paragraph follows a `paragraph_pause_ms` silence, any other
segment a `speaker_pause_ms` silence (the first segment none).

Loudness: each segment is normalised, once complete, to `TARGET_LUFS` integrated loudness
(ITU-R BS.1770-4 via pyloudnorm) with its peak held at or below `PEAK_CEILING_DBFS`, so voices
from different prompts and families sit at one level. Segments are normalised whole, which is why
streaming plays whole segments.

Flow: `parse_script` -> `ScriptPlan` (segments, or every problem by line; nothing is generated
for a plan with problems) -> `generate_script` (bounded concurrency, segments handed out in
script order as soon as they and all earlier ones are ready) -> `record_script` (one history row
with its segments) -> `script_zip` (per-segment files and a CSV of lines).

No torch and no Gradio here.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import difflib
import io
import math
import threading
import time
import unicodedata
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from studio.systems import FAMILIES, System, SystemSpecError, parse_system

# --- limits and defaults -----------------------------------------------------------------------------
#: Longest script (characters): about 20 minutes of speech, the most one page request should hold.
MAX_SCRIPT_CHARS = 20_000
#: Most segments a script: each is one request and one row of the preview and the ZIP.
MAX_SEGMENTS = 200
#: Longest segment (characters, one request). Segments play only once complete, so a long one delays
#: everything after it; ~2000 characters is about two minutes of speech.
MAX_SEGMENT_CHARS = 2_000
#: Silence before a segment by another tag (ms): a natural turn-taking gap in conversation.
DEFAULT_SPEAKER_PAUSE_MS = 300
#: Silence before a segment that starts a paragraph (ms).
DEFAULT_PARAGRAPH_PAUSE_MS = 700
MAX_PAUSE_MS = 5_000
#: Segments generated at once. Different voices run side by side and the server batches them as it
#: batches separate users; more than a few only queues on the server and delays segment 1.
DEFAULT_CONCURRENCY = 3
MAX_CONCURRENCY = 8
#: Loudness every segment is normalised to (LUFS, BS.1770-4 integrated). -20 LUFS sits between
#: EBU R128's -23 and the -16 of stereo podcast platforms (AES TD1004 suggests -16..-20 for speech
#: streams), and leaves room for speech peaks under the ceiling below.
TARGET_LUFS = -20.0
#: Highest sample peak after the gain (dBFS): a gain that would pass it is lowered, so no segment clips.
PEAK_CEILING_DBFS = -1.0
#: BS.1770 measures 400 ms blocks; a shorter segment is measured as a tiled copy of itself.
LOUDNESS_BLOCK_S = 0.4
#: Segments quieter than this (LUFS) are silence, not speech: left alone rather than boosted.
SILENCE_LUFS = -70.0
#: How often the dispatcher looks at finished requests and the Stop button (s).
POLL_S = 0.05
#: Speaking-rate guesses for the preview's length estimate when no prompt clip tells the rate
#: (characters per second): about 150 words a minute in English; about 4.5 characters a second in Chinese.
LATIN_CHARS_PER_S = 14.0
CJK_CHARS_PER_S = 4.5
#: Spark voice creation's speed levels as rough tempo factors (for the estimate only).
SPEED_LEVEL_FACTORS = {"very_low": 0.7, "low": 0.85, "moderate": 1.0, "high": 1.15, "very_high": 1.3}
#: Spark decodes 50 tokens per second of audio (tts.audio.SPARK_TOKENS_PER_S).
SPARK_TOKENS_PER_S = 50
#: Spark refuses references under 0.5 s (README); a created voice's first segment becomes one.
MIN_CREATED_PROMPT_S = 0.5
#: Sample rates of the families (tts.audio, repeated so importing this stays light).
FAMILY_RATES = {"f5": 24000, "spark": 16000}


class ScriptError(ValueError):
    """A script that cannot be generated; `problems` lists (line or None, message) pairs."""

    def __init__(self, problems: list[tuple[int | None, str]]):
        self.problems = list(problems)
        self.done: list[SegmentOutcome] = []  # segments handed out before a failure during generation
        super().__init__(format_problems(self.problems))


class ScriptCancelled(Exception):
    """Stop was pressed; `done` holds the segments handed out before it."""

    def __init__(self, done: list["SegmentOutcome"]):
        super().__init__("the script was stopped")
        self.done = done


def format_problems(problems: list[tuple[int | None, str]]) -> str:
    return "\n".join(f"line {line}: {msg}" if line else msg for line, msg in problems)


# --- voices and segments -------------------------------------------------------------------------------
@dataclass(frozen=True)
class VoiceRef:
    """Who speaks a segment: a library voice (`key` saved:NAME / sample:NAME) or a created Spark voice."""

    kind: str                    # library | created
    system: System               # family and request settings (created: with gender/levels)
    name: str | None = None      # the library voice's name
    key: str | None = None       # the library voice's key, fixed at parse time
    transcript: str = ""         # the library clip's transcript
    seconds: float | None = None # the library clip's length

    @property
    def family(self) -> str:
        return self.system.family

    @property
    def identity(self) -> str:
        """Same identity = same speaker: a library key, or a created voice's canonical settings."""
        return self.key if self.kind == "library" else self.system.spec

    @property
    def label(self) -> str:
        """Short name for tables and the player: the library name, or what a created voice was asked for
        (its full settings are in `settings`)."""
        if self.kind == "library":
            return self.name
        asked = self.system.options
        levels = ", ".join(f"{k.split('_')[0]} {asked[k]}" for k in ("pitch_level", "speed_level") if k in asked)
        return f"created {asked['gender']}" + (f" ({levels})" if levels else "")

    @property
    def settings(self) -> str:
        """The family and settings as the grammar writes them (the voice-creation keys included)."""
        return self.system.spec


@dataclass(frozen=True)
class Segment:
    """One request of a script: a run of text in one voice."""

    index: int                   # 1-based, script order
    line: int                    # the script line it starts on
    paragraph: int               # 1-based
    voice: VoiceRef
    text: str
    pause_before_ms: int         # silence before it in the output
    est_s: float                 # estimated speech length (preview)
    clone_of: int | None = None  # created voice: the segment whose audio is its prompt

    def as_dict(self) -> dict:
        """The plan row shared by the page, the API and the CLI (plain JSON types)."""
        return {"segment": self.index, "line": self.line, "paragraph": self.paragraph, "voice": self.voice.label,
                "voice_kind": self.voice.kind, "family": self.voice.family, "settings": self.voice.settings,
                "text": self.text, "pause_before_ms": self.pause_before_ms, "est_s": round(self.est_s, 1),
                "clone_of": self.clone_of}


@dataclass(frozen=True)
class ScriptPlan:
    """A parsed script: its segments when `ok`, otherwise the problems by line."""

    segments: tuple[Segment, ...]
    problems: tuple[tuple[int | None, str], ...]
    default_family: str
    speaker_pause_ms: int
    paragraph_pause_ms: int

    @property
    def ok(self) -> bool:
        return not self.problems and bool(self.segments)

    @property
    def families(self) -> list[str]:
        return sorted({s.voice.family for s in self.segments})

    @property
    def sample_rate(self) -> int:
        """The output's rate: the highest of the families used (Spark's 16 kHz is resampled up to 24 kHz)."""
        return max((FAMILY_RATES[f] for f in self.families), default=FAMILY_RATES["f5"])

    @property
    def est_s(self) -> float:
        return sum(s.est_s + s.pause_before_ms / 1000 for s in self.segments)

    def check(self) -> "ScriptPlan":
        """The plan itself, or ScriptError listing every problem."""
        if self.problems:
            raise ScriptError(list(self.problems))
        if not self.segments:
            raise ScriptError([(None, "the script is empty: start a line with a voice tag, e.g. {en_female} Hello.")])
        return self

    def rows(self) -> list[dict]:
        return [s.as_dict() for s in self.segments]

    def settings(self) -> dict:
        return {"default_family": self.default_family, "speaker_pause_ms": self.speaker_pause_ms,
                "paragraph_pause_ms": self.paragraph_pause_ms}


# --- parsing -----------------------------------------------------------------------------------------
def _closest(name: str, names: list[str]) -> str | None:
    """The library name a mistyped tag most likely meant (case and small typos forgiven)."""
    folded = {n.casefold(): n for n in names}
    match = difflib.get_close_matches(name.casefold(), list(folded), n=1, cutoff=0.6)
    return folded[match[0]] if match else None


def _unknown_voice(name: str, voices: list) -> str:
    names = list(dict.fromkeys(v.name for v in voices))
    guess = _closest(name, names)
    hint = f"; did you mean {{{guess}}}?" if guess else ""
    listed = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
    return f"unknown voice {{{name}}}{hint} Voices: {listed or 'none saved yet'}"


def parse_tag(content: str, default_family: str, voices: list) -> VoiceRef:
    """A tag's inside -> VoiceRef; ValueError with the problem (no line number) otherwise.

    `voices`: the library's Voice objects (saved voices first, as VoiceLibrary.list gives them)."""
    content = content.strip()
    if not content:
        raise ValueError("an empty tag {}: write {Name} for a saved voice or {spark:gender=female} to create one")
    name, bar, spec = content.partition("|")
    name, spec = name.strip(), spec.strip()
    if bar:
        if not name:
            raise ValueError(f"{{{content}}} has settings but no voice: write {{Name|{spec}}}")
        if not spec:
            raise ValueError(f"nothing after '|' in {{{content}}}: write {{{name}}} for the default family")
    elif ":" in content or content.lower() in FAMILIES:
        name, spec = "", content  # a system alone: voice creation
    else:
        spec = default_family
    try:
        system = parse_system(spec)
    except SystemSpecError as exc:
        raise ValueError(str(exc)) from None
    if system.is_files:
        raise ValueError(f"{{{content}}}: files: systems belong to batch runs, not scripts")
    if system.stream:
        raise ValueError(f"{{{content}}}: stream is a setting of the whole script (Mode), not of a tag")
    if not name:
        if not system.voice_creation:
            raise ValueError(f"{{{content}}} names no voice: write {{Name|{system.spec}}} for a saved voice, or "
                             "{spark:gender=female,...} to create one")
        return VoiceRef("created", system)
    if system.voice_creation:
        raise ValueError(f"{{{content}}} mixes a saved voice with voice creation (gender/pitch_level/speed_level): "
                         f"use {{{name}}} or {{{spec}}}")
    match = next((v for v in voices if v.name == name), None)
    if match is None:
        raise ValueError(_unknown_voice(name, voices))
    if system.family == "f5" and not match.transcript.strip():
        raise ValueError(f"voice {{{name}}} has no transcript, which F5-TTS needs: add one in the Voices tab or "
                         f"write {{{name}|spark}}")
    return VoiceRef("library", system, match.name, match.key, match.transcript, match.seconds)


def _speakable(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


def _is_cjk(ch: str) -> bool:
    return unicodedata.name(ch, "").startswith("CJK")


def estimate_seconds(text: str, voice: VoiceRef) -> float:
    """Speech length of `text` in `voice` (s), for the preview only.

    A library voice speaks at its clip's rate (upstream F5's duration rule: prompt seconds per
    transcript byte); otherwise a typical rate per script, scaled by Spark's speed level and
    speed setting; Spark's max_new_tokens caps it."""
    params = voice.system.options
    if voice.seconds and voice.transcript.strip():
        seconds = voice.seconds * len(text.encode("utf-8")) / len(voice.transcript.encode("utf-8"))
    else:
        cjk = sum(1 for ch in text if _is_cjk(ch))
        seconds = cjk / CJK_CHARS_PER_S + (len(text) - cjk) / LATIN_CHARS_PER_S
        seconds /= SPEED_LEVEL_FACTORS.get(params.get("speed_level", "moderate"), 1.0)
    seconds /= float(params.get("speed", 1.0))
    if voice.family == "spark" and "max_new_tokens" in params:
        seconds = min(seconds, params["max_new_tokens"] / SPARK_TOKENS_PER_S)
    return seconds


def _check_pause(name: str, value) -> int:
    try:
        ms = float(value)
    except (TypeError, ValueError):
        raise ScriptError([(None, f"the {name} must be a number of milliseconds, not {value!r}")]) from None
    if not math.isfinite(ms) or not 0 <= ms <= MAX_PAUSE_MS:
        raise ScriptError([(None, f"the {name} must be between 0 and {MAX_PAUSE_MS} ms; got {value}")])
    return int(round(ms))


def parse_script(text: str, voices: list, *, default_family: str = "f5",
                 speaker_pause_ms=DEFAULT_SPEAKER_PAUSE_MS,
                 paragraph_pause_ms=DEFAULT_PARAGRAPH_PAUSE_MS) -> ScriptPlan:
    """Script text -> ScriptPlan. Every problem is collected with its line (see the module docstring).

    `voices`: the library's voices (VoiceLibrary.list()), looked up once, here."""
    if default_family not in FAMILIES:
        raise ScriptError([(None, f"the default family must be one of {', '.join(FAMILIES)}; got {default_family!r}")])
    speaker_ms = _check_pause("pause between speakers", speaker_pause_ms)
    paragraph_ms = _check_pause("pause between paragraphs", paragraph_pause_ms)
    text = unicodedata.normalize("NFC", text or "")

    def plan(segments=(), problems=()):
        return ScriptPlan(tuple(segments), tuple(problems), default_family, speaker_ms, paragraph_ms)

    if len(text) > MAX_SCRIPT_CHARS:
        return plan(problems=[(None, f"the script has {len(text)} characters; the script length limit is "
                                     f"{MAX_SCRIPT_CHARS} characters: split it into several scripts")])
    problems: list[tuple[int | None, str]] = []
    drafts: list[dict] = []      # segments being collected: line, paragraph, voice, parts, new_paragraph
    current: dict | None = None  # the segment untagged lines join
    paragraph, blank_before, told_untagged = 1, False, False
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            blank_before = bool(drafts) or blank_before
            continue
        if blank_before and drafts:
            paragraph += 1
        new_paragraph, blank_before = blank_before and bool(drafts), False
        if line.startswith("{"):
            end = line.find("}")
            if end < 0:
                problems.append((number, f"the tag {line[:30]!r} is not closed with '}}'"))
                current = None
                continue
            try:
                voice = parse_tag(line[1:end], default_family, voices)
            except ValueError as exc:
                problems.append((number, str(exc)))
                voice = None  # its text still forms a segment, so the lines below are not blamed too
            current = {"line": number, "paragraph": paragraph, "voice": voice, "parts": [line[end + 1:].strip()],
                       "new_paragraph": new_paragraph, "tag": line[:end + 1]}
            drafts.append(current)
        elif current is None and not drafts:
            if not told_untagged:
                problems.append((number, "text before the first voice tag: start the script with a tag such as "
                                         "{en_female} or {spark:gender=female}"))
                told_untagged = True
        elif new_paragraph or current is None:
            last = drafts[-1]
            current = {"line": number, "paragraph": paragraph, "voice": last["voice"], "parts": [line],
                       "new_paragraph": new_paragraph, "tag": last["tag"]}
            drafts.append(current)
        else:
            current["parts"].append(line)
    segments: list[Segment] = []
    first_of: dict[str, int] = {}  # created voice identity -> its first segment
    for draft in drafts:
        body = " ".join(p for p in draft["parts"] if p)
        if not body:
            problems.append((draft["line"], f"{draft['tag']} has no text: an empty segment (write the words after "
                                            "the tag or on the lines below it)"))
            continue
        if not _speakable(body):
            problems.append((draft["line"], f"the segment {body[:30]!r} has no words to speak"))
            continue
        if len(body) > MAX_SEGMENT_CHARS:
            problems.append((draft["line"], f"the segment has {len(body)} characters; the segment length limit is "
                                            f"{MAX_SEGMENT_CHARS}: split it with a blank line or another tag"))
            continue
        voice = draft["voice"]
        if voice is None:
            continue
        index = len(segments) + 1
        if index > MAX_SEGMENTS:
            problems.append((draft["line"], f"segment {index}: the script has more than {MAX_SEGMENTS} segments, "
                                            f"the segment count limit: split it into several scripts"))
            break
        clone_of = None
        if voice.kind == "created":
            clone_of = first_of.setdefault(voice.identity, index)
            clone_of = None if clone_of == index else clone_of
        pause = 0 if index == 1 else (paragraph_ms if draft["new_paragraph"] else speaker_ms)
        segments.append(Segment(index, draft["line"], draft["paragraph"], voice, body, pause,
                                estimate_seconds(body, voice), clone_of))
    problems.sort(key=lambda p: p[0] or 0)
    return plan(segments, problems)


def plan_script(text: str, library, **settings) -> ScriptPlan:
    """parse_script over a VoiceLibrary (its current voices)."""
    return parse_script(text, library.list(), **settings)


# --- loudness ------------------------------------------------------------------------------------------
def measure_lufs(audio: np.ndarray, sample_rate: int) -> float:
    """Integrated loudness (LUFS, BS.1770-4). Shorter than one 400 ms block: measured on the clip
    repeated to one block (the loudness of its own content). -inf for silence."""
    import pyloudnorm

    audio = np.asarray(audio, dtype=np.float64)
    if audio.size == 0 or not np.any(audio):
        return float("-inf")
    need = int(math.ceil(LOUDNESS_BLOCK_S * sample_rate)) + 1
    if audio.size < need:
        audio = np.tile(audio, int(math.ceil(need / audio.size)))
    return float(pyloudnorm.Meter(sample_rate).integrated_loudness(audio))


def normalize_loudness(audio: np.ndarray, sample_rate: int, target_lufs: float = TARGET_LUFS,
                       ceiling_dbfs: float = PEAK_CEILING_DBFS) -> tuple[np.ndarray, dict]:
    """`audio` scaled to `target_lufs`, the gain lowered where the peak would pass `ceiling_dbfs`.

    Returns (float32 audio, {"lufs_in", "lufs_out", "gain_db", "peak_limited"})."""
    audio = np.asarray(audio, dtype=np.float32)
    lufs = measure_lufs(audio, sample_rate)
    if not math.isfinite(lufs) or lufs < SILENCE_LUFS:
        return audio, {"lufs_in": None if not math.isfinite(lufs) else round(lufs, 2), "lufs_out": None,
                       "gain_db": 0.0, "peak_limited": False}
    gain_db = target_lufs - lufs
    peak = float(np.max(np.abs(audio)))
    limited = peak > 0 and 20 * math.log10(peak) + gain_db > ceiling_dbfs
    if limited:
        gain_db = ceiling_dbfs - 20 * math.log10(peak)
    out = (audio * np.float32(10 ** (gain_db / 20))).astype(np.float32)
    return out, {"lufs_in": round(lufs, 2), "lufs_out": round(measure_lufs(out, sample_rate), 2),
                 "gain_db": round(gain_db, 2), "peak_limited": bool(limited)}


# --- generation ----------------------------------------------------------------------------------------
@dataclass
class SegmentOutcome:
    """One generated segment: loudness-matched audio at the script's rate and its numbers."""

    segment: Segment
    audio: np.ndarray            # float32 [N] at the script's rate, normalised
    raw_audio: np.ndarray        # float32 as the server sent it, at raw_rate (a created voice's prompt)
    raw_rate: int
    metrics: dict
    seed: int | None = None
    demo_weights: bool = False
    info: dict = field(default_factory=dict)
    start_sample: int = 0        # where it begins in the script's audio (after its pause)


@dataclass
class ScriptResult:
    plan: ScriptPlan
    audio: np.ndarray            # float32, every segment with its pause, at plan.sample_rate
    sample_rate: int
    segments: list[SegmentOutcome]
    metrics: dict
    stream: bool

    @property
    def demo_weights(self) -> bool:
        return any(s.demo_weights for s in self.segments)


def _resample(audio: np.ndarray, rate: int, target: int) -> np.ndarray:
    from studio.audio_io import resample

    return resample(audio, rate, target)


def load_library_prompt(voices, segment: Segment) -> tuple[np.ndarray, str]:
    """The segment's library clip at its family's rate, read now (so a voice deleted while the script
    runs is noticed at its next segment). ScriptError naming the line otherwise."""
    from studio.audio_io import AudioInputError, load_audio
    from studio.voices import VoiceError

    voice = segment.voice
    try:
        found = voices.get(voice.key)
        return load_audio(found.audio_path, FAMILY_RATES[voice.family]), found.transcript
    except (VoiceError, AudioInputError, OSError):
        raise ScriptError([(segment.line, f"voice {{{voice.name}}} was deleted (or its clip removed) while the "
                                          f"script ran; segment {segment.index} cannot be generated")]) from None


def _request(segment: Segment, voices, done: dict[int, SegmentOutcome]) -> tuple[str, np.ndarray | None, str, dict]:
    """(family, reference audio, reference text, params) of one segment's request."""
    voice = segment.voice
    params = voice.system.options
    if voice.kind == "library":
        audio, transcript = load_library_prompt(voices, segment)
        return voice.family, audio, transcript, params
    if segment.clone_of is None:
        return "spark", None, "", params  # voice creation: gender and levels, no prompt
    source = done[segment.clone_of]
    # Cloned from the created voice's first segment: its own audio and words are the prompt.
    for key in ("gender", "pitch_level", "speed_level"):
        params.pop(key, None)
    return "spark", source.raw_audio, source.segment.text, params


def _segment_metrics(result, ready_s: float, sent_s: float, norm: dict, audio_s: float) -> dict:
    info = result.info or {}
    m = {"latency_s": round(result.latency_s, 4), "first_chunk_s": round(result.first_chunk_s, 4),
         "audio_s": round(audio_s, 4), "rtf": round(result.latency_s / audio_s, 4) if audio_s else None,
         "sent_s": round(sent_s, 4), "ready_s": round(ready_s, 4), "compute_ms": info.get("compute_ms"),
         "chunks": len(result.chunk_arrivals_s), **norm}
    if "tokens" in info:
        m["tokens"] = info["tokens"]
    return m


def generate_script(plan: ScriptPlan, client, voices, *, stream: bool = False,
                    concurrency: int = DEFAULT_CONCURRENCY, cancel: threading.Event | None = None,
                    on_segment: Callable[[SegmentOutcome, np.ndarray], None] | None = None,
                    slots=None, target_lufs: float = TARGET_LUFS) -> ScriptResult:
    """Generate every segment of `plan` through `client` (a StudioClient) and join them in order.

    Up to `concurrency` requests run at once, dispatched in script order; a created voice's later
    segments wait for its first one (their prompt). `on_segment(outcome, pause)` is called in this
    thread, in script order, as soon as a segment and every one before it are ready: `pause` is the
    silence (float32 samples) that precedes the segment. `slots` (studio.slots.GenerationSlots, if
    given) bounds generations across the whole process. Raises ScriptError (naming the line) when a
    segment fails, ScriptCancelled when `cancel` is set.
    """
    from studio.client import GenerationCancelled, SynthesisError

    plan.check()
    if not 1 <= int(concurrency) <= MAX_CONCURRENCY:
        raise ScriptError([(None, f"concurrency must be between 1 and {MAX_CONCURRENCY}; got {concurrency}")])
    rate = plan.sample_rate
    stop = threading.Event()  # set on Stop or on a failed segment: in-flight requests end
    t0 = time.perf_counter()
    done: dict[int, SegmentOutcome] = {}
    lock = threading.Lock()

    def run(segment: Segment) -> SegmentOutcome:
        with lock:
            family, ref_audio, ref_text, params = _request(segment, voices, done)
        too_short = MIN_CREATED_PROMPT_S * FAMILY_RATES["spark"]
        if segment.clone_of is not None and ref_audio.size < too_short:
            raise ScriptError([(segment.line, f"the created voice's first segment (line "
                                              f"{done[segment.clone_of].segment.line}) came out "
                                              f"{ref_audio.size / FAMILY_RATES['spark']:.2f} s long; cloning it needs "
                                              f"at least {MIN_CREATED_PROMPT_S} s: give that line more words")])
        if slots is not None and not slots.acquire(cancel=stop):
            raise GenerationCancelled("stopped while waiting for a generation slot")
        held = time.monotonic()
        sent_s = time.perf_counter() - t0
        try:
            result = client.synthesize(family, segment.text, ref_audio, ref_text, stream=stream, params=params,
                                       cancel=stop)
        except SynthesisError as exc:
            raise ScriptError([(segment.line, f"segment {segment.index} ({segment.voice.label}) failed on the "
                                              f"server: {exc}")]) from None
        finally:
            if slots is not None:
                slots.release(time.monotonic() - held)
        audio = _resample(result.audio, result.sample_rate, rate)
        audio, norm = normalize_loudness(audio, rate, target_lufs)
        ready_s = time.perf_counter() - t0
        return SegmentOutcome(segment, audio, result.audio, result.sample_rate,
                              _segment_metrics(result, ready_s, sent_s, norm, audio.size / rate),
                              result.seed, result.demo_weights, result.info or {})

    pending = list(plan.segments)
    emitted: list[SegmentOutcome] = []
    parts: list[np.ndarray] = []
    position = 0
    first_sound_s = None
    with cf.ThreadPoolExecutor(max_workers=int(concurrency), thread_name_prefix="script") as pool:
        running: dict[cf.Future, Segment] = {}
        try:
            while len(emitted) < len(plan.segments):
                if cancel is not None and cancel.is_set():
                    raise ScriptCancelled(emitted)
                for segment in list(pending):  # in script order, as far as slots and prompts allow
                    if len(running) >= concurrency:
                        break
                    if segment.clone_of is not None and segment.clone_of not in done:
                        continue
                    pending.remove(segment)
                    running[pool.submit(run, segment)] = segment
                finished, _ = cf.wait(list(running), timeout=POLL_S, return_when=cf.FIRST_COMPLETED)
                for future in finished:
                    running.pop(future)
                    try:
                        outcome = future.result()
                    except GenerationCancelled:
                        raise ScriptCancelled(emitted) from None
                    with lock:
                        done[outcome.segment.index] = outcome
                # hand out, in order, everything that is ready
                while len(emitted) < len(plan.segments) and plan.segments[len(emitted)].index in done:
                    outcome = done[plan.segments[len(emitted)].index]
                    pause = np.zeros(int(round(outcome.segment.pause_before_ms * rate / 1000)), np.float32)
                    outcome.start_sample = position + pause.size
                    position += pause.size + outcome.audio.size
                    parts += [pause, outcome.audio]
                    outcome.metrics["emitted_s"] = round(time.perf_counter() - t0, 4)
                    if first_sound_s is None:
                        first_sound_s = outcome.metrics["emitted_s"]
                    emitted.append(outcome)
                    if on_segment is not None:
                        on_segment(outcome, pause)
        except BaseException as exc:
            stop.set()
            for future in running:
                future.cancel()
            if isinstance(exc, ScriptError):
                exc.done = list(emitted)  # already played: kept in the history entry
            raise
    latency = time.perf_counter() - t0
    audio = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    audio_s = audio.size / rate
    # first_chunk_s as everywhere else (start -> first audio handed out): the first segment, whole.
    metrics = {"latency_s": round(latency, 4), "first_sound_s": first_sound_s, "first_chunk_s": first_sound_s,
               "audio_s": round(audio_s, 4),
               "speech_s": round(sum(o.audio.size for o in emitted) / rate, 4),
               "rtf": round(latency / audio_s, 4) if audio_s else None, "segments": len(emitted),
               "concurrency": int(concurrency), "target_lufs": target_lufs,
               "last_ready_s": max(o.metrics["ready_s"] for o in emitted)}
    return ScriptResult(plan, audio, rate, emitted, metrics, stream)


# --- history and downloads ------------------------------------------------------------------------------
SCRIPTS_DIR = "scripts"  # under history/: one folder per script entry with its segment files


def segment_rows(outcomes: list[SegmentOutcome], sample_rate: int) -> list[dict]:
    """Per-segment record entries (plan row + timing in the output + metrics)."""
    rows = []
    for o in outcomes:
        row = o.segment.as_dict()
        row.update(start_s=round(o.start_sample / sample_rate, 4), duration_s=round(o.audio.size / sample_rate, 4),
                   seed=o.seed, metrics=o.metrics)
        rows.append(row)
    return rows


def record_script(history, script_text: str, plan: ScriptPlan, outcomes: list[SegmentOutcome], *,
                  sample_rate: int, stream: bool, status: str = "ok", metrics: dict | None = None,
                  error: str | None = None, concurrency: int = DEFAULT_CONCURRENCY,
                  audio: np.ndarray | None = None) -> dict:
    """One history row (kind `script`) for the whole script, its segments listed in `segments`, each
    with its own audio file under history/scripts/ID/; a created voice's prompt (first segment's
    audio as generated, and its text) is kept beside them as created-voice-N.wav."""
    from studio.history import HISTORY_DIR, new_id

    rec_id = new_id()
    folder = f"{SCRIPTS_DIR}/{rec_id}"
    rows = segment_rows(outcomes, sample_rate)
    created = []
    for o, row in zip(outcomes, rows):
        rel = f"{folder}/segment-{o.segment.index:03d}.wav"
        history.store.write_wav(f"{HISTORY_DIR}/{rel}", o.audio, sample_rate)
        row["audio"] = rel
        if o.segment.voice.kind == "created" and o.segment.clone_of is None:
            prompt = f"{folder}/created-voice-{o.segment.index:03d}.wav"
            history.store.write_wav(f"{HISTORY_DIR}/{prompt}", o.raw_audio, o.raw_rate)
            created.append({"settings": o.segment.voice.settings, "segment": o.segment.index, "audio": prompt,
                            "text": o.segment.text})
    if audio is None:
        audio = join_outcomes(outcomes, sample_rate)
    record = {"id": rec_id, "kind": "script", "model": "+".join(plan.families), "status": status,
              "mode": "streaming" if stream else "offline", "text": script_text, "ref_text": "",
              "params": {**plan.settings(), "concurrency": concurrency, "target_lufs": TARGET_LUFS},
              "metrics": metrics or {}, "segments": rows, "created_voices": created, "error": error,
              "demo_weights": any(o.demo_weights for o in outcomes) if outcomes else None}
    return history.add(record, audio if audio.size else None, sample_rate)


def join_outcomes(outcomes: list[SegmentOutcome], sample_rate: int) -> np.ndarray:
    """The segments with their pauses, as generate_script joins them."""
    parts = []
    for o in outcomes:
        parts += [np.zeros(int(round(o.segment.pause_before_ms * sample_rate / 1000)), np.float32), o.audio]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


CSV_FIELDS = ("segment", "line", "paragraph", "voice", "voice_kind", "family", "settings", "pause_before_ms",
              "start_s", "duration_s", "latency_s", "first_chunk_s", "rtf", "lufs_in", "gain_db", "seed", "file",
              "text")


def lines_csv(record: dict) -> str:
    """The CSV of a script record's lines (one row a segment), as written into the ZIP."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in record.get("segments", []):
        m = row.get("metrics") or {}
        writer.writerow({**row, **{k: m.get(k) for k in ("latency_s", "first_chunk_s", "rtf", "lufs_in", "gain_db")},
                         "file": Path(row.get("audio") or "").name})
    return buf.getvalue()


def script_zip(history, record: dict, out: Path) -> Path:
    """A ZIP of a script record: segment-NNN.wav files, created-voice prompts, lines.csv, script.txt."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for row in record.get("segments", []):
            path = history.file(row.get("audio"))
            if path is not None:
                z.write(path, Path(row["audio"]).name)
        for voice in record.get("created_voices", []):
            path = history.file(voice.get("audio"))
            if path is not None:
                z.write(path, Path(voice["audio"]).name)
        z.writestr("lines.csv", lines_csv(record))
        z.writestr("script.txt", record.get("text", ""))
    tmp.replace(out)
    return out


def plan_json(plan: ScriptPlan) -> dict:
    """The plan as the API and the CLI print it."""
    return {"ok": plan.ok, "settings": plan.settings(), "sample_rate": plan.sample_rate if plan.segments else None,
            "segments": plan.rows(), "problems": [{"line": line, "message": msg} for line, msg in plan.problems],
            "est_s": round(plan.est_s, 1)}


__all__ = ["DEFAULT_CONCURRENCY", "DEFAULT_PARAGRAPH_PAUSE_MS", "DEFAULT_SPEAKER_PAUSE_MS", "MAX_SCRIPT_CHARS",
           "MAX_SEGMENTS", "MAX_SEGMENT_CHARS", "TARGET_LUFS", "ScriptCancelled", "ScriptError", "ScriptPlan",
           "ScriptResult", "Segment", "SegmentOutcome", "VoiceRef", "format_problems", "generate_script", "lines_csv",
           "normalize_loudness", "parse_script", "parse_tag", "plan_json", "plan_script", "record_script",
           "script_zip"]
