"""Audio helpers both sides share: chunk joining by linear cross-fade, waveform checks, rates.

numpy only: the Triton models, the `tts` pipelines and the studio client all import this module,
and the studio must not pull in torch.

Joining rule (DESIGN.md "Streaming and joining"): chunk i may begin with `overlaps[i]` samples
that cover the same stretch of speech as the last `overlaps[i]` samples of what came before;
those two stretches are cross-faded linearly (the earlier one fading 1 -> 0, the later one
0 -> 1, both ends inclusive as in upstream's clients), everything else is concatenated. So the
joined length is `sum(len(chunk)) - sum(overlaps[1:])`. `join_chunks` is the one definition;
`ChunkJoiner` gives bit-identical output incrementally.
"""

from __future__ import annotations

import numpy as np

# --- rates and joining constants -----------------------------------------------------------------
F5_SAMPLE_RATE = 24000  # Vocos mel-24khz output rate
SPARK_SAMPLE_RATE = 16000  # BiCodec rate
F5_CROSSFADE_S = 0.15  # upstream's Gradio cross-fade between text chunks
F5_CROSSFADE_SAMPLES = round(F5_CROSSFADE_S * F5_SAMPLE_RATE)  # 0.15 s * 24000 = 3600
SPARK_TOKENS_PER_S = 50  # BiCodec semantic tokens per second of speech
SPARK_SAMPLES_PER_TOKEN = SPARK_SAMPLE_RATE // SPARK_TOKENS_PER_S  # 16000 / 50 = 320
SPARK_STREAM_OVERLAP_TOKENS = 5  # upstream streams chunks that overlap by 5 tokens (0.1 s)
SPARK_CROSSFADE_SAMPLES = SPARK_STREAM_OVERLAP_TOKENS * SPARK_SAMPLES_PER_TOKEN  # 5 * 320 = 1600

#: A clip whose peak amplitude is below this is treated as silence (about -80 dBFS).
SILENCE_PEAK = 1e-4


def _as_mono_float(wav, name: str) -> np.ndarray:
    arr = np.asarray(wav)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D mono waveform, got an array of shape {arr.shape}")
    if arr.dtype != np.float32 and arr.dtype != np.float64:
        arr = arr.astype(np.float32)
    return arr


def _fades(n: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(fade_out, fade_in), each [n]: 1 -> 0 and 0 -> 1 with both end points included."""
    fade_in = np.linspace(0.0, 1.0, n, dtype=np.float64).astype(dtype)
    fade_out = np.linspace(1.0, 0.0, n, dtype=np.float64).astype(dtype)
    return fade_out, fade_in


def effective_overlap(overlap: int, len_a: int, len_b: int) -> int:
    """`overlap` clamped to what both sides hold; a negative overlap is a caller error."""
    overlap = int(overlap)
    if overlap < 0:
        raise ValueError(f"overlap must be >= 0 samples, got {overlap}")
    return min(overlap, len_a, len_b)


def crossfade_join(a: np.ndarray, b: np.ndarray, overlap: int) -> np.ndarray:
    """Join two 1-D waveforms, cross-fading a's last `overlap` samples with b's first.

    a: [Na], b: [Nb] samples; returns [Na + Nb - k] with k = min(overlap, Na, Nb) (an overlap
    longer than either side is clamped to it). overlap 0 is plain concatenation. The dtype is
    float32 unless either input is float64.
    """
    a = _as_mono_float(a, "a")
    b = _as_mono_float(b, "b")
    dtype = np.result_type(a.dtype, b.dtype)
    k = effective_overlap(overlap, a.size, b.size)
    if k == 0:
        return np.concatenate([a, b]).astype(dtype, copy=False)
    fade_out, fade_in = _fades(k, dtype)
    mixed = a[a.size - k:] * fade_out + b[:k] * fade_in
    return np.concatenate([a[: a.size - k], mixed, b[k:]]).astype(dtype, copy=False)


def join_chunks(chunks: list[np.ndarray], overlaps: list[int]) -> np.ndarray:
    """Join streamed chunks into one waveform: THE joining function (offline path, client, API).

    chunks: list of [Ni] waveforms; overlaps[i]: how many of chunk i's first samples overlap the
    end of what came before (overlaps[0] is ignored). Returns [sum Ni - sum k_i], float32 unless
    a chunk is float64. No chunks -> an empty float32 array.
    """
    if len(chunks) != len(overlaps):
        raise ValueError(f"join_chunks needs one overlap per chunk: got {len(chunks)} chunks "
                         f"and {len(overlaps)} overlaps")
    if len(chunks) == 1:  # nothing to cross-fade (F5's offline answers): checked and copied as `add` does
        chunk = _as_mono_float(chunks[0], "chunk")
        return chunk.astype(np.result_type(chunk.dtype, np.float32), copy=True)
    # Holding back the largest overlap keeps the work linear in the total length.
    joiner = ChunkJoiner(hold_back=max([0] + [int(o) for o in overlaps[1:]]))
    for chunk, overlap in zip(chunks, overlaps):
        joiner.add(chunk, overlap)
    return joiner.finish_joined()


class ChunkJoiner:
    """Incremental `join_chunks`: releases samples as soon as no later cross-fade can touch them.

    `hold_back` is the largest overlap a later chunk may have, in samples (e.g.
    F5_CROSSFADE_SAMPLES or SPARK_CROSSFADE_SAMPLES); the last `hold_back` samples of the joined
    audio are kept back until the next chunk or `finish()`. `hold_back=None` keeps everything
    back until `finish()`. The concatenation of everything `add` and `finish` return equals
    `join_chunks` of the same chunks and overlaps, bit for bit: the cross-fade only ever touches
    the held-back tail, with the same arithmetic.
    """

    def __init__(self, hold_back: int | None):
        if hold_back is not None and int(hold_back) < 0:
            raise ValueError(f"hold_back must be >= 0 samples, got {hold_back}")
        self.hold_back = None if hold_back is None else int(hold_back)
        self._released: list[np.ndarray] = []
        self._released_len = 0
        self._tail: np.ndarray | None = None  # the not-yet-final end of the joined audio
        self._chunks = 0
        self._finished = False

    @property
    def chunks(self) -> int:
        """How many chunks were added."""
        return self._chunks

    @property
    def released_samples(self) -> int:
        """How many samples `add`/`finish` have returned so far."""
        return self._released_len

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def joined(self) -> np.ndarray:
        """Everything joined so far (released and held back), [N]."""
        parts = self._released + ([self._tail] if self._tail is not None else [])
        if not parts:
            return np.zeros(0, np.float32)
        return np.concatenate(parts)

    def __len__(self) -> int:
        return self._released_len + (0 if self._tail is None else self._tail.size)

    def add(self, chunk: np.ndarray, overlap_samples: int) -> np.ndarray:
        """Add the next chunk ([Ni]); returns the samples that became final ([M], maybe empty)."""
        if self._finished:
            raise ValueError("ChunkJoiner.add after finish(): start a new joiner for a new stream")
        chunk = _as_mono_float(chunk, "chunk")
        if self._tail is None:
            self._tail = chunk.astype(np.result_type(chunk.dtype, np.float32), copy=True)
        else:
            overlap = int(overlap_samples)
            if self._released_len and min(overlap, chunk.size) > self._tail.size:
                # The cross-fade would reach into samples already handed out: refuse rather than diverge.
                raise ValueError(f"chunk {self._chunks} overlaps the previous audio by {overlap} samples, more "
                                 f"than this joiner holds back ({self.hold_back}); create the ChunkJoiner "
                                 f"with hold_back >= the largest overlap")
            self._tail = crossfade_join(self._tail, chunk, overlap)
        self._chunks += 1
        if self.hold_back is None:
            return self._release(0)
        return self._release(self._tail.size - self.hold_back)

    def finish(self) -> np.ndarray:
        """Release everything still held back ([M]); no more chunks may be added."""
        out = self._release(0 if self._tail is None else self._tail.size)
        self._finished = True
        return out

    def finish_joined(self) -> np.ndarray:
        """`finish()` and return the whole joined waveform."""
        self.finish()
        return self.joined

    def _release(self, n: int) -> np.ndarray:
        if self._tail is None or n <= 0:
            dtype = np.float32 if self._tail is None else self._tail.dtype
            return np.zeros(0, dtype)
        out, self._tail = self._tail[:n], self._tail[n:]
        self._released.append(out)
        self._released_len += out.size
        return out


def validate_waveform(wav, sample_rate: int, min_seconds: float = 0.5, what: str = "prompt clip") -> None:
    """Raise ValueError naming the problem unless `wav` ([N] samples at `sample_rate` Hz) is usable.

    Checks, in order: 1-D, not empty, no NaN, no infinities, at least `min_seconds` long, and not
    silent (peak amplitude >= SILENCE_PEAK).
    """
    arr = np.asarray(wav)
    if arr.ndim != 1:
        raise ValueError(f"the {what} must be a mono waveform (1-D), got an array of shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"the {what} is empty (0 samples)")
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"the {what} must hold numbers, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        n_nan = int(np.isnan(arr).sum())
        if n_nan:
            raise ValueError(f"the {what} contains {n_nan} NaN (not-a-number) samples out of {arr.size}; "
                             f"the audio is corrupt")
        n_inf = int(np.isinf(arr).sum())
        if n_inf:
            raise ValueError(f"the {what} contains {n_inf} infinite samples out of {arr.size}; the audio is corrupt")
    seconds = arr.size / float(sample_rate)
    if seconds < min_seconds:
        raise ValueError(f"the {what} is {seconds:.2f} s long ({arr.size} samples at {sample_rate} Hz); "
                         f"at least {min_seconds:g} s is needed")
    peak = float(np.abs(arr).max())
    if peak < SILENCE_PEAK:
        raise ValueError(f"the {what} is silent (peak amplitude {peak:.2g} < {SILENCE_PEAK:g}); "
                         f"record or upload a clip in which someone speaks")
