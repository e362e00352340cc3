"""Reference (prompt) clip preparation for Spark-TTS: checks, clipping, loudness, the speaker segment.

Upstream's CLI reads the clip at 16 kHz and, because the checkpoint's `config.yaml` says
`volume_normalize: true`, rescales its loudness before tokenizing; its Triton runtime takes the
client's samples as they are. We follow the checkpoint's config (the CLI); `SparkOptions` can turn
it off. Clips longer than 30 s are cut to their first 30 s (a note says so): the reference's
semantic tokens go into the LLM prompt, and 30 s is already 1500 prompt tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tts.spark.config import SAMPLE_RATE, SparkTopConfig

#: References are cut to this many seconds (1500 semantic tokens in the prompt).
MAX_REFERENCE_S = 30.0
#: Shorter clips are refused, as for F5: half a second is too little voice to clone (25 semantic tokens).
MIN_REFERENCE_S = 0.5
#: Loudness target of the normalisation: the 90th-99th percentile of |x| is brought to this level.
VOLUME_TARGET = 0.2
#: Clips whose peak is below this are first scaled so the peak reaches it.
VOLUME_QUIET_PEAK = 0.1
#: Samples quieter than this do not count towards the loudness estimate.
VOLUME_FLOOR = 0.01
#: The loudness gain is kept within [1/10, 10].
VOLUME_GAIN_RANGE = (0.1, 10.0)


@dataclass
class PreparedClip:
    """A checked reference clip: what the audio tokenizer consumes."""

    wav: np.ndarray  # float32 [S] at 16 kHz, after clipping and loudness normalisation
    speaker_clip: np.ndarray  # float32 [ref_segment_samples]: the first 6 s, tiled if shorter
    seconds: float  # duration of `wav`
    notes: list[str] = field(default_factory=list)


def volume_normalize(wav: np.ndarray) -> np.ndarray:
    """Upstream's loudness normalisation (the CLI applies it to every reference).

    A very quiet clip is first scaled so its peak is 0.1. Then the mean of the 90th-99th
    percentile of |x| among samples above 0.01 is brought to 0.2 (gain clamped to [0.1, 10]), and
    the result is scaled down if it would clip. Clips with ten or fewer samples above 0.01 are
    returned after the first step only.
    """
    wav = np.asarray(wav, dtype=np.float64)
    magnitudes = np.sort(np.abs(wav))
    if magnitudes[-1] < VOLUME_QUIET_PEAK:
        wav = wav / max(magnitudes[-1], 1e-3) * VOLUME_QUIET_PEAK
    loud = magnitudes[magnitudes > VOLUME_FLOOR]
    n = loud.shape[0]
    if n <= 10:
        return wav
    level = np.mean(loud[int(0.9 * n):int(0.99 * n)])
    wav = wav * np.clip(VOLUME_TARGET / level, *VOLUME_GAIN_RANGE)
    peak = np.max(np.abs(wav))
    return wav / peak if peak > 1 else wav


def speaker_segment(wav: np.ndarray, length: int) -> np.ndarray:
    """The first `length` samples, the clip repeated end to end first when it is shorter."""
    if len(wav) < length:
        wav = np.tile(wav, length // len(wav) + 1)
    return wav[:length]


def as_mono(wav) -> np.ndarray:
    """float32 [S]; a [1, S] or [S, 1] array is accepted, anything else with more channels is refused."""
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim == 2 and 1 in wav.shape:
        wav = wav.reshape(-1)
    if wav.ndim != 1:
        raise ValueError(f"the reference must be mono 16 kHz samples; got an array of shape {wav.shape}")
    return wav


def prepare_clip(wav, top: SparkTopConfig, volume_normalize_clip: bool | None = None) -> PreparedClip:
    """Check and prepare a 16 kHz mono clip; raises ValueError with an actionable message."""
    wav = as_mono(wav)
    if not np.all(np.isfinite(wav)):
        raise ValueError("the reference audio contains NaN or infinite samples")
    seconds = len(wav) / SAMPLE_RATE
    if seconds < MIN_REFERENCE_S:
        raise ValueError(f"the reference audio is {seconds:.2f} s long; Spark-TTS needs at least "
                         f"{MIN_REFERENCE_S} s of the voice to clone")
    notes = []
    max_samples = int(MAX_REFERENCE_S * SAMPLE_RATE)
    if len(wav) > max_samples:
        notes.append(f"reference clipped to its first {MAX_REFERENCE_S:.0f} s (it was {seconds:.1f} s)")
        wav = wav[:max_samples]
    if not np.any(wav):
        raise ValueError("the reference audio is silent (all samples are zero)")
    normalize = top.volume_normalize if volume_normalize_clip is None else volume_normalize_clip
    if normalize:
        wav = volume_normalize(wav).astype(np.float32)
    return PreparedClip(wav=wav, speaker_clip=speaker_segment(wav, top.ref_segment_samples),
                        seconds=len(wav) / SAMPLE_RATE, notes=notes)
