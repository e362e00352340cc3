"""The voice library: named prompt clips with their transcripts, kept under `data_dir/voices/`.

Layout: one folder per saved voice, `voices/NAME/prompt.wav` (mono 24 kHz, 16-bit) and
`voices/NAME/voice.json` (transcript, length, creation time). The folder name is the voice's name.
The project's shipped clips (`samples/voices/NAME.wav` + `NAME.txt`) are listed beside them,
read-only.

Never lose a saved voice: a voice is written whole into a hidden temporary folder and then renamed
into place (a directory rename is atomic on POSIX), so a crash leaves either the old voice or the new
one, never half of one; saving never overwrites another voice unless asked; deleting or overwriting
moves the old folder into `voices/.trash/` instead of removing it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import threading
import time
import unicodedata
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from studio.config import PROJECT_ROOT

#: Stored clips are resampled to F5-TTS's rate; Spark (16 kHz) resamples down on load, losing nothing.
VOICE_SAMPLE_RATE = 24000
#: Shortest and longest clip worth keeping (s): F5 needs about a second; both models use at most
#: the first ~12 s (F5 clips there, Spark's speaker tokens see 6 s), so 30 s is ample.
MIN_SECONDS, MAX_SECONDS = 0.5, 30.0
MAX_NAME_CHARS = 64
MAX_TRANSCRIPT_CHARS = 2000
SAMPLES_DIR = PROJECT_ROOT / "samples" / "voices"

_AUDIO, _META = "prompt.wav", "voice.json"
#: Characters allowed in names besides letters and digits of any script (so 张三 is a fine name).
_NAME_PUNCT = set(" -_.()'")
_lock = threading.Lock()  # serialises writers in this process; renames keep other processes safe


class VoiceError(ValueError):
    """A voice operation the user must change: the message says what to do."""


@dataclass(frozen=True)
class Voice:
    name: str
    audio_path: Path
    transcript: str
    read_only: bool            # a shipped sample: listed and usable, never renamed or deleted
    seconds: float | None = None
    created: str | None = None  # ISO 8601 UTC, saved voices only

    @property
    def key(self) -> str:
        """Unique id across both kinds (a saved voice may share a sample's name)."""
        return f"{'sample' if self.read_only else 'saved'}:{self.name}"

    @property
    def label(self) -> str:
        return f"{self.name} (sample)" if self.read_only else self.name


def sanitize_name(raw: str) -> str:
    """A safe folder name from what the user typed: letters/digits of any script and ` -_.()'`.

    Other characters become `_`, runs of spaces collapse, leading dots are dropped (no hidden or
    `..` folders). Raises VoiceError when nothing usable is left.
    """
    text = unicodedata.normalize("NFC", str(raw or "")).strip()
    cleaned = "".join(ch if (ch.isalnum() or ch in _NAME_PUNCT) else "_" for ch in text)
    cleaned = re.sub(r"\s+", " ", cleaned).strip(" .")
    cleaned = cleaned[:MAX_NAME_CHARS].strip(" .")
    if not cleaned or set(cleaned) <= {"_"}:
        raise VoiceError(f"{raw!r} is not a usable voice name: use letters or digits (up to {MAX_NAME_CHARS}).")
    return cleaned


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def check_clip(wav: np.ndarray, sample_rate: int) -> np.ndarray:
    """Validate a prompt clip for storage; returns it as float32 mono. Raises VoiceError."""
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim != 1:
        raise VoiceError(f"the clip must be mono (one channel); got shape {wav.shape}")
    if not np.isfinite(wav).all():
        raise VoiceError("the clip holds NaN or infinite samples; record or export it again")
    seconds = wav.size / sample_rate
    if seconds < MIN_SECONDS:
        raise VoiceError(f"the clip is {seconds:.2f} s long; a voice needs at least {MIN_SECONDS} s of speech")
    if seconds > MAX_SECONDS:
        raise VoiceError(f"the clip is {seconds:.1f} s long; keep voices under {MAX_SECONDS:.0f} s "
                         "(the models use about the first 6-12 s)")
    if float(np.abs(wav).max()) < 1e-4:
        raise VoiceError("the clip is silent; record or upload speech")
    return wav


class VoiceLibrary:
    """Saved voices under `data_dir/voices/` plus the shipped samples (read-only)."""

    def __init__(self, data_dir: Path, samples_dir: Path | None = SAMPLES_DIR):
        self.root = Path(data_dir).expanduser() / "voices"
        self.samples_dir = Path(samples_dir) if samples_dir else None

    # -- reading ------------------------------------------------------------------------------
    def list(self) -> list[Voice]:
        """Saved voices (by name), then the samples (by name)."""
        saved = []
        if self.root.is_dir():
            for folder in sorted(self.root.iterdir(), key=lambda p: p.name.casefold()):
                if folder.name.startswith(".") or not (folder / _AUDIO).is_file():
                    continue  # temporaries, the trash, and anything half-made
                saved.append(self._read_saved(folder))
        return saved + self.samples()

    def samples(self) -> list[Voice]:
        if not self.samples_dir or not self.samples_dir.is_dir():
            return []
        out = []
        for wav in sorted(self.samples_dir.glob("*.wav")):
            txt = wav.with_suffix(".txt")
            transcript = txt.read_text("utf-8").strip() if txt.is_file() else ""
            out.append(Voice(wav.stem, wav, transcript, read_only=True, seconds=_wav_seconds(wav)))
        return out

    def get(self, key_or_name: str) -> Voice:
        """By key (`saved:NAME`, `sample:NAME`) or plain name (saved voices first)."""
        kind, _, name = key_or_name.partition(":") if ":" in key_or_name else ("", "", key_or_name)
        for voice in self.list():
            if voice.name == name and (not kind or voice.key.startswith(kind + ":")):
                return voice
        raise VoiceError(f"there is no voice called {name!r}; pick one from the list")

    def _read_saved(self, folder: Path) -> Voice:
        meta = {}
        try:
            meta = json.loads((folder / _META).read_text("utf-8"))
        except (OSError, ValueError):
            pass  # a voice whose metadata went missing still plays; its transcript is just unknown
        return Voice(folder.name, folder / _AUDIO, meta.get("transcript", ""), read_only=False,
                     seconds=meta.get("seconds"), created=meta.get("created"))

    # -- writing ------------------------------------------------------------------------------
    def save(self, name: str, wav: np.ndarray, sample_rate: int, transcript: str, *,
             overwrite: bool = False) -> Voice:
        """Store a clip (mono float32 at `sample_rate`) and its transcript under `name`."""
        import soundfile as sf

        name = sanitize_name(name)
        transcript = (transcript or "").strip()
        if len(transcript) > MAX_TRANSCRIPT_CHARS:
            raise VoiceError(f"the transcript has {len(transcript)} characters; keep it under {MAX_TRANSCRIPT_CHARS}")
        wav = check_clip(wav, sample_rate)
        if sample_rate != VOICE_SAMPLE_RATE:
            wav = _resample(wav, sample_rate, VOICE_SAMPLE_RATE)
        peak = float(np.abs(wav).max())
        if peak > 1.0:  # 16-bit storage clips; scale instead so the voice keeps its shape
            wav = wav / peak
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            with open(tmp / _AUDIO, "wb") as fh:
                sf.write(fh, wav, VOICE_SAMPLE_RATE, subtype="PCM_16", format="WAV")
                fh.flush()
                os.fsync(fh.fileno())
            meta = {"transcript": transcript, "seconds": round(wav.size / VOICE_SAMPLE_RATE, 3),
                    "sample_rate": VOICE_SAMPLE_RATE, "created": _utc_now()}
            with open(tmp / _META, "w", encoding="utf-8") as fh:
                json.dump(meta, fh, ensure_ascii=False, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            with _lock:
                dest = self.root / name
                if dest.exists():
                    if not overwrite:
                        raise VoiceError(f"a voice called {name!r} exists already; pick another name "
                                         "or delete that one first")
                    self._to_trash(dest)
                os.rename(tmp, dest)  # fails rather than merging if another writer got there first
                _fsync_dir(self.root)
        except FileExistsError:
            raise VoiceError(f"a voice called {name!r} was just saved by someone else; pick another name") from None
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):  # the same race as above
                raise VoiceError(f"a voice called {name!r} was just saved by someone else; "
                                 "pick another name") from None
            raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return self._read_saved(self.root / name)

    def rename(self, old: str, new: str) -> Voice:
        old_voice = self._saved(old)
        new = sanitize_name(new)
        if new == old_voice.name:
            return old_voice
        with _lock:
            dest = self.root / new
            if dest.exists():
                raise VoiceError(f"a voice called {new!r} exists already; pick another name")
            os.rename(self.root / old_voice.name, dest)
            _fsync_dir(self.root)
        return self._read_saved(dest)

    def delete(self, name: str) -> Path:
        """Move a saved voice into `voices/.trash/` (recoverable by hand). Returns where it went."""
        voice = self._saved(name)
        with _lock:
            return self._to_trash(self.root / voice.name)

    def _saved(self, key_or_name: str) -> Voice:
        kind, _, name = key_or_name.partition(":") if ":" in key_or_name else ("saved", "", key_or_name)
        if kind == "sample":
            raise VoiceError(f"{name!r} is a shipped sample voice and cannot be changed; save a copy under a new name")
        folder = self.root / name
        if name.startswith(".") or "/" in name or not (folder / _AUDIO).is_file():
            raise VoiceError(f"there is no saved voice called {name!r}")
        return self._read_saved(folder)

    def _to_trash(self, folder: Path) -> Path:
        trash = self.root / ".trash"
        trash.mkdir(exist_ok=True)
        dest = trash / f"{folder.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        os.rename(folder, dest)
        _fsync_dir(self.root)
        return dest


def _wav_seconds(path: Path) -> float | None:
    try:
        import soundfile as sf

        info = sf.info(str(path))
        return round(info.frames / info.samplerate, 3)
    except Exception:  # noqa: BLE001 - an unreadable sample just shows no length
        return None


def _resample(wav: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    from math import gcd

    from scipy.signal import resample_poly

    g = gcd(sr_in, sr_out)
    return resample_poly(wav, sr_out // g, sr_in // g).astype(np.float32)
