"""F5-TTS prompt-clip preparation: checks, loudness normalisation, clipping at a silence (numpy).

Upstream facts followed here (F5-TTS `infer/utils_infer.py`):
- `infer_batch_process`: a prompt whose RMS is below 0.1 is scaled up to RMS 0.1, and the
  generated audio is scaled back by `rms / 0.1`; louder prompts are left alone.
- `preprocess_ref_audio_text` (Gradio and CLI path): a prompt over 12 s is cut at a silence
  found with pydub (`split_on_silence`: first gaps of >= 1000 ms below -50 dBFS, then gaps of
  >= 100 ms below -40 dBFS, each keeping up to 1000 ms of the gap), else hard at 12 s; its
  silent edges are trimmed (-42 dBFS) and 50 ms of silence is appended.

`clip_at_silence` does the same with a windowed-RMS silence detector on the samples: it keeps
the audio contiguous and cuts once, at the last gap that leaves between 6 and 12 s (upstream also
shortens gaps over 2 s inside the clip; this does not touch the inside).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tts.audio import validate_waveform

TARGET_RMS = 0.1  # upstream target_rms: quieter prompts are scaled up to this RMS
MAX_PROMPT_S = 12.0  # upstream clips prompts longer than 12 s
MIN_PROMPT_S = 0.5  # shorter prompts carry too little voice to clone (and too few mel frames)
TAIL_SILENCE_S = 0.05  # upstream appends 50 ms of silence after the (clipped) prompt
#: An RMS below this (-100 dBFS) over the whole clip is silence even when a click passes the peak test.
SILENT_RMS = 1e-5
EDGE_SILENCE_DBFS = -42.0  # upstream's remove_silence_edges threshold
EDGE_STEP_S = 0.010  # pydub detect_leading_silence examines 10 ms chunks
SEEK_STEP_S = 0.010  # upstream's split_on_silence seek_step: 10 ms


@dataclass(frozen=True)
class SilencePass:
    """One silence search of upstream's clipping (pydub split_on_silence arguments)."""

    min_silence_s: float  # a gap must be silent over at least this long a window
    threshold_dbfs: float  # window RMS below this (dB relative to full scale 1.0) is silence
    keep_s: float  # speech keeps up to this much of the following gap (pydub keep_silence)


#: Upstream tries long quiet gaps first, then short, louder ones.
SILENCE_PASSES = (SilencePass(1.0, -50.0, 1.0), SilencePass(0.1, -40.0, 1.0))


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


def _window_rms(wav: np.ndarray, win: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """RMS of windows [s, s + win) for s = 0, step, 2 step, ... -> (starts, rms)."""
    energy = np.concatenate([[0.0], np.cumsum(np.square(wav, dtype=np.float64))])
    starts = np.arange(0, wav.size - win + 1, step)
    rms = np.sqrt(np.maximum(energy[starts + win] - energy[starts], 0.0) / win)
    return starts, rms


def silent_gaps(wav: np.ndarray, sr: int, min_silence_s: float, threshold_dbfs: float,
                step_s: float = SEEK_STEP_S) -> list[tuple[int, int]]:
    """Silent stretches [(start, end) in samples]: unions of `min_silence_s` windows below the threshold.

    Like pydub's detect_silence: windows start every `step_s`; overlapping silent windows merge.
    """
    win, step = max(1, round(min_silence_s * sr)), max(1, round(step_s * sr))
    if wav.size < win:
        return []
    starts, rms = _window_rms(wav, win, step)
    silent = rms < 10.0 ** (threshold_dbfs / 20.0)
    gaps: list[tuple[int, int]] = []
    for s in starts[silent]:
        s = int(s)
        if gaps and s <= gaps[-1][1]:
            gaps[-1] = (gaps[-1][0], s + win)
        else:
            gaps.append((s, s + win))
    return gaps


def find_cut(wav: np.ndarray, sr: int, max_s: float = MAX_PROMPT_S) -> int | None:
    """Sample index to cut an over-long prompt at, inside a silent gap, or None when there is none.

    Tries each of SILENCE_PASSES in turn and takes the last cut that keeps more than max_s / 2
    (upstream: 6 s) and at most max_s seconds. A cut keeps up to `keep_s` of the gap after the
    speech, and at most half the gap, as pydub's keep_silence does.
    """
    max_len, min_len = int(max_s * sr), int(max_s * sr / 2)
    for p in SILENCE_PASSES:
        keep = round(p.keep_s * sr)
        best = None
        for start, end in silent_gaps(wav, sr, p.min_silence_s, p.threshold_dbfs):
            if start == 0:
                continue  # leading silence: no speech before it
            cut = start + min(keep, (end - start) // 2)
            if min_len < cut <= max_len:
                best = cut
        if best is not None:
            return best
    return None


def trim_silence_edges(wav: np.ndarray, sr: int, threshold_dbfs: float = EDGE_SILENCE_DBFS,
                       min_keep_s: float = MIN_PROMPT_S) -> np.ndarray:
    """Drop leading and trailing 10 ms chunks below `threshold_dbfs` (upstream's remove_silence_edges).

    Leaves the clip as it is when trimming would leave less than `min_keep_s` (a quiet prompt
    upstream would trim to nothing).
    """
    step = max(1, round(EDGE_STEP_S * sr))
    n_chunks = wav.size // step
    if n_chunks == 0:
        return wav
    chunks = wav[: n_chunks * step].astype(np.float64).reshape(n_chunks, step)
    loud = np.flatnonzero(np.sqrt(np.mean(chunks ** 2, axis=1)) >= 10.0 ** (threshold_dbfs / 20.0))
    if loud.size == 0:
        return wav
    start, end = int(loud[0]) * step, min(wav.size, (int(loud[-1]) + 1) * step)
    if end - start < min_keep_s * sr:
        return wav
    return wav[start:end]


def clip_at_silence(wav: np.ndarray, sr: int, max_s: float = MAX_PROMPT_S, *,
                    trim_edges: bool = False) -> tuple[np.ndarray, bool]:
    """Prepare a prompt's length: cut one over `max_s` at a silence, then append 50 ms of silence.

    wav: [N] float samples at `sr` Hz. Returns (float32 [M] samples, whether it was clipped).
    The cut is at a silent gap (see `find_cut`), else hard at `max_s`. `trim_edges` also trims
    silent edges first, as upstream's Gradio path does (off by default: the prompt stays as sent).
    """
    wav = np.asarray(wav, dtype=np.float32).reshape(-1)
    if trim_edges:
        wav = trim_silence_edges(wav, sr)
    clipped = wav.size > max_s * sr
    if clipped:
        cut = find_cut(wav, sr, max_s)
        wav = wav[: cut if cut is not None else int(max_s * sr)]
    tail = np.zeros(round(TAIL_SILENCE_S * sr), dtype=np.float32)
    return np.concatenate([wav, tail]), clipped
