"""F5-TTS prompt-clip preparation: checks, loudness normalisation, upstream's silence handling (numpy).

Upstream facts followed here (F5-TTS `infer/utils_infer.py`):
- `infer_batch_process`: a prompt whose RMS is below 0.1 is scaled up to RMS 0.1, and the
  generated audio is scaled back by `rms / 0.1`; louder prompts are left alone.
- `preprocess_ref_audio_text` (Gradio and CLI path), on every clip: (1) pydub's
  `split_on_silence(min_silence_len=1000 ms, silence_thresh=-50 dBFS, keep_silence=1000 ms,
  seek_step=10 ms)` and re-join the pieces, stopping once past 6 s when the next piece would pass
  12 s; (2) only if still over 12 s, the same with 100 ms / -40 dBFS; (3) a hard cut at 12 s; then
  `remove_silence_edges` (leading and trailing 10 ms chunks below -42 dBFS) and 50 ms of silence.
  So even a short prompt loses leading silence and has inner gaps over 2 s shortened to 2 s.

`prepare_prompt` does the same on float samples with pydub's millisecond arithmetic (positions in
whole milliseconds, a millisecond slice = `int(ms * sr / 1000)` samples, lengths rounded to ms),
so its output length matches upstream's within a millisecond; the samples themselves stay float.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tts.audio import validate_waveform

TARGET_RMS = 0.1  # upstream target_rms: quieter prompts are scaled up to this RMS
MAX_PROMPT_S = 12.0  # upstream clips prompts longer than 12 s
MIN_PROMPT_S = 0.5  # shorter prompts carry too little voice to clone (and too few mel frames)
#: Sound left after upstream's silence handling: below this there is too little voice to clone.
MIN_SPEECH_S = 0.3
TAIL_SILENCE_S = 0.05  # upstream appends 50 ms of silence after the prepared prompt
#: An RMS below this (-100 dBFS) over the whole clip is silence even when a click passes the peak test.
SILENT_RMS = 1e-5
EDGE_SILENCE_DBFS = -42.0  # upstream's remove_silence_edges threshold
EDGE_CHUNK_MS = 10  # pydub detect_leading_silence examines 10 ms chunks
SEEK_STEP_MS = 10  # upstream's split_on_silence seek_step
#: Re-joining stops once the prompt is past this long and the next piece would pass MAX_PROMPT_S.
REJOIN_MIN_MS = 6000
#: pydub measures dBFS against the largest 16-bit amplitude; float samples are on the same scale.
FULL_SCALE = 1.0
#: Changes smaller than this are not worth a note to the user.
NOTE_MIN_S = 0.1


@dataclass(frozen=True)
class SilencePass:
    """One silence search of upstream's preparation (pydub split_on_silence arguments)."""

    min_silence_ms: int  # a gap must be silent over at least this long a window
    threshold_dbfs: float  # window RMS at or below this (dB relative to full scale) is silence
    keep_ms: int  # each piece keeps up to this much of the silence around it (pydub keep_silence)


#: Upstream tries long quiet gaps first, then short, louder ones (only when still over 12 s).
SILENCE_PASSES = (SilencePass(1000, -50.0, 1000), SilencePass(100, -40.0, 1000))


@dataclass
class PromptPreparation:
    """What `prepare_prompt` did to a clip, in seconds, for `info.notes`."""

    wav: np.ndarray  # float32 [M]: the prepared prompt, 50 ms of silence included
    original_s: float
    shortened_s: float = 0.0  # silence removed inside or before the speech (gaps over 2 s, lead over 1 s)
    clipped_s: float = 0.0  # audio dropped at the end to stay within 12 s
    leading_s: float = 0.0  # leading silence trimmed at the edge
    trailing_s: float = 0.0  # trailing silence trimmed at the edge
    notes: list[str] = field(default_factory=list)

    @property
    def clipped(self) -> bool:
        return self.clipped_s > 0.0


def check_reference(wav: np.ndarray, sr: int, min_s: float = MIN_PROMPT_S) -> None:
    """Raise ValueError naming the problem unless `wav` ([N] float samples at `sr` Hz) can be a prompt.

    Problems: not mono, empty, NaN or infinite samples, shorter than `min_s` seconds, silent
    (peak below `tts.audio.SILENCE_PEAK` or RMS below `SILENT_RMS`).
    """
    validate_waveform(wav, sr, min_seconds=min_s, what="prompt clip")
    rms = float(np.sqrt(np.mean(np.square(np.asarray(wav, dtype=np.float64)))))
    if rms < SILENT_RMS:
        raise ValueError(f"the prompt clip is silent (RMS {rms:.2g}, about {_dbfs(rms):.0f} dBFS); "
                         f"record or upload a clip in which someone speaks")


def normalize_rms(wav: np.ndarray, target_rms: float = TARGET_RMS) -> tuple[np.ndarray, float]:
    """Scale a quiet prompt up to `target_rms`; return (float32 samples, the prompt's original RMS).

    Louder prompts are returned unscaled. Generated audio is scaled back by
    `min(rms, target_rms) / target_rms` (1 when nothing was scaled), as upstream does.
    """
    wav = np.asarray(wav, dtype=np.float32)
    rms = float(np.sqrt(np.mean(np.square(wav, dtype=np.float64)))) if wav.size else 0.0
    if 0.0 < rms < target_rms:
        wav = (wav * np.float32(target_rms / rms)).astype(np.float32)
    return wav, rms


def output_gain(rms: float, target_rms: float = TARGET_RMS) -> float:
    """Factor for generated audio that undoes `normalize_rms`: rms / target when the prompt was scaled up."""
    return rms / target_rms if 0.0 < rms < target_rms else 1.0


def _dbfs(rms: float) -> float:
    return 20.0 * np.log10(max(rms, 1e-12))


# --- pydub's millisecond arithmetic ----------------------------------------------------------------
def _ms_len(n: int, sr: int) -> int:
    """pydub's len(): a segment's length in whole milliseconds (rounded)."""
    return round(1000 * n / sr)


def _frame(ms: float, sr: int) -> int:
    """pydub's position of a millisecond in samples (truncated)."""
    return int(ms * (sr / 1000.0))


class _Energy:
    """Windowed RMS of a clip with pydub's slice rules: [i, j) ms -> samples [frame(i), frame(j)),
    j clamped to the clip's length in ms, samples past the end read as zeros (pydub pads <= 2 ms)."""

    def __init__(self, wav: np.ndarray, sr: int):
        self.sr, self.n, self.ms = sr, wav.size, _ms_len(wav.size, sr)
        self.cum = np.concatenate([[0.0], np.cumsum(np.square(wav, dtype=np.float64))])

    def rms(self, start_ms: np.ndarray, end_ms: np.ndarray) -> np.ndarray:
        start_ms = np.minimum(start_ms, self.ms)
        end_ms = np.minimum(end_ms, self.ms)
        a = (start_ms * (self.sr / 1000.0)).astype(np.int64)
        b = (end_ms * (self.sr / 1000.0)).astype(np.int64)
        width = np.maximum(b - a, 1)
        energy = self.cum[np.minimum(b, self.n)] - self.cum[np.minimum(a, self.n)]
        return np.sqrt(np.maximum(energy, 0.0) / width) * (b > a)


def _threshold(dbfs: float) -> float:
    return FULL_SCALE * 10.0 ** (dbfs / 20.0)


def silent_ranges(wav: np.ndarray, sr: int, min_silence_ms: int, threshold_dbfs: float,
                  seek_ms: int = SEEK_STEP_MS) -> list[tuple[int, int]]:
    """Silent stretches [(start_ms, end_ms)] as pydub's detect_silence finds them.

    Windows of `min_silence_ms` start every `seek_ms` (and at the last possible start); a window
    whose RMS is at or below the threshold is silent; windows that touch or overlap merge.
    """
    energy = _Energy(wav, sr)
    if energy.ms < min_silence_ms:
        return []
    last = energy.ms - min_silence_ms
    starts = list(range(0, last + 1, seek_ms)) + ([last] if last % seek_ms else [])
    starts_arr = np.asarray(starts, dtype=np.int64)
    silent = starts_arr[energy.rms(starts_arr, starts_arr + min_silence_ms) <= _threshold(threshold_dbfs)]
    if silent.size == 0:
        return []
    ranges, begin, prev = [], int(silent[0]), int(silent[0])
    for s in silent[1:].tolist():
        # a window that neither follows on nor overlaps the previous one starts a new range
        if s != prev + seek_ms and s > prev + min_silence_ms:
            ranges.append((begin, prev + min_silence_ms))
            begin = s
        prev = s
    ranges.append((begin, prev + min_silence_ms))
    return ranges


def speech_pieces(wav: np.ndarray, sr: int, p: SilencePass) -> list[tuple[int, int]]:
    """The pieces [(start_ms, end_ms)] pydub's split_on_silence returns for pass `p`.

    Non-silent stretches, each widened by `keep_ms` on both sides; where two widened pieces
    overlap (a gap shorter than 2 * keep_ms) they meet in the gap's middle; clamped to the clip.
    """
    length = _ms_len(wav.size, sr)
    silences = silent_ranges(wav, sr, p.min_silence_ms, p.threshold_dbfs)
    if not silences:
        speech = [[0, length]]
    elif silences[0] == (0, length):
        speech = []
    else:
        speech, prev_end = [], 0
        for start, end in silences:
            speech.append([prev_end, start])
            prev_end = end
        if silences[-1][1] != length:
            speech.append([prev_end, length])
        if speech[0] == [0, 0]:
            speech.pop(0)
    pieces = [[start - p.keep_ms, end + p.keep_ms] for start, end in speech]
    for a, b in zip(pieces, pieces[1:]):
        if b[0] < a[1]:
            a[1] = (a[1] + b[0]) // 2
            b[0] = a[1]
    return [(max(start, 0), min(end, length)) for start, end in pieces]


def _take(wav: np.ndarray, sr: int, start_ms: int, end_ms: int) -> np.ndarray:
    """pydub's slice [start_ms, end_ms): zero-padded when the millisecond grid overruns the clip."""
    a, b = _frame(start_ms, sr), _frame(end_ms, sr)
    piece = wav[a:b]
    return np.concatenate([piece, np.zeros(b - a - piece.size, np.float32)]) if piece.size < b - a else piece


def rejoin(wav: np.ndarray, sr: int, p: SilencePass, max_ms: int) -> tuple[np.ndarray, int]:
    """Upstream's re-join of one pass's pieces: stop once past 6 s when the next would pass `max_ms`.

    Returns (joined samples, the end in ms of the last piece kept in the original clip).
    """
    joined: list[np.ndarray] = []
    n, last_end = 0, 0
    for start, end in speech_pieces(wav, sr, p):
        piece = _take(wav, sr, start, end)
        if _ms_len(n, sr) > REJOIN_MIN_MS and _ms_len(n + piece.size, sr) > max_ms:
            break
        joined.append(piece)
        n += piece.size
        last_end = end
    return (np.concatenate(joined) if joined else np.zeros(0, np.float32)), last_end


def leading_silence_ms(wav: np.ndarray, sr: int, threshold_dbfs: float = EDGE_SILENCE_DBFS,
                       chunk_ms: int = EDGE_CHUNK_MS) -> int:
    """pydub's detect_leading_silence: ms of leading `chunk_ms` chunks whose dBFS is below the threshold."""
    energy = _Energy(wav, sr)
    starts = np.arange(0, energy.ms, chunk_ms, dtype=np.int64)
    loud = np.flatnonzero(energy.rms(starts, starts + chunk_ms) >= _threshold(threshold_dbfs))
    return min(int(starts[loud[0]]), energy.ms) if loud.size else energy.ms


def trim_silence_edges(wav: np.ndarray, sr: int,
                       threshold_dbfs: float = EDGE_SILENCE_DBFS) -> tuple[np.ndarray, int, int]:
    """Upstream's remove_silence_edges -> (trimmed samples, leading ms, trailing ms removed).

    A clip with no 10 ms chunk at or above the threshold is left as it is (upstream would trim it
    to nothing and fail later; here the loudness check and the speech-length check decide).
    """
    lead = leading_silence_ms(wav, sr, threshold_dbfs)
    if lead >= _ms_len(wav.size, sr):
        return wav, 0, 0
    rest = wav[_frame(lead, sr):]
    trail = leading_silence_ms(rest[::-1], sr, threshold_dbfs)
    out = rest[: _frame(_ms_len(rest.size, sr) - trail, sr)] if trail > 0 else rest
    return out, lead, trail


def prepare_prompt(wav: np.ndarray, sr: int, max_s: float = MAX_PROMPT_S) -> PromptPreparation:
    """Prepare a prompt clip as upstream's `preprocess_ref_audio_text` does (module docstring).

    wav: [N] float samples at `sr` Hz. Returns the prepared float32 samples (50 ms of silence
    appended) and what was shortened, clipped or trimmed, with notes for changes over 0.1 s.
    """
    wav = np.asarray(wav, dtype=np.float32).reshape(-1)
    max_ms = int(max_s * 1000)
    original_s = wav.size / sr
    out, last_end = rejoin(wav, sr, SILENCE_PASSES[0], max_ms)
    if _ms_len(out.size, sr) > max_ms:
        out, last_end = rejoin(wav, sr, SILENCE_PASSES[1], max_ms)
    clipped_s = max(0.0, original_s - last_end / 1000.0) if out.size else 0.0
    if _ms_len(out.size, sr) > max_ms:
        hard = _frame(max_ms, sr)
        clipped_s += (out.size - hard) / sr
        out = out[:hard]
    shortened_s = max(0.0, original_s - clipped_s - out.size / sr)
    if out.size == 0:
        raise ValueError(f"the prompt clip has no sound louder than {SILENCE_PASSES[0].threshold_dbfs:.0f} dBFS "
                         f"that lasts; record or upload a clip in which someone speaks")
    out, lead_ms, trail_ms = trim_silence_edges(out, sr)
    if out.size < MIN_SPEECH_S * sr:
        raise ValueError(f"the prompt clip holds only {out.size / sr:.2f} s of sound once its silent edges are "
                         f"trimmed (at least {MIN_SPEECH_S} s is needed); record or upload a clip with more speech")
    tail = np.zeros(round(TAIL_SILENCE_S * sr), dtype=np.float32)
    prep = PromptPreparation(np.concatenate([out, tail]), original_s, shortened_s, clipped_s,
                             lead_ms / 1000.0, trail_ms / 1000.0)
    prep.notes = preparation_notes(prep, max_s)
    return prep


def preparation_notes(prep: PromptPreparation, max_s: float = MAX_PROMPT_S) -> list[str]:
    """Plain-language notes for changes of at least NOTE_MIN_S seconds."""
    notes = []
    if prep.clipped_s >= NOTE_MIN_S:
        notes.append(f"the prompt clip was longer than {max_s:.0f} s: its last {prep.clipped_s:.1f} s were "
                     f"dropped (cut at a pause where there was one)")
    if prep.shortened_s >= NOTE_MIN_S:
        notes.append(f"{prep.shortened_s:.1f} s of long silence was removed from the prompt clip "
                     f"(pauses over 2 s become 2 s and leading silence over 1 s becomes 1 s, as upstream does)")
    edges = [(name, s) for name, s in (("leading", prep.leading_s), ("trailing", prep.trailing_s)) if s >= NOTE_MIN_S]
    if edges:
        notes.append("the prompt clip's " + " and ".join(f"{name} silence ({s:.1f} s)" for name, s in edges)
                     + " was trimmed")
    return notes
