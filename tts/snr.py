"""How close one waveform is to another: the figures the precision checks report (dB)."""

from __future__ import annotations

import numpy as np
import torch


def snr_db(out: np.ndarray, ref: np.ndarray) -> float:
    """Signal-to-noise ratio of `out` against `ref` over their common length, in dB:
    10 log10(sum ref^2 / sum (out - ref)^2); counts every amplitude and phase difference."""
    n = min(out.size, ref.size)
    out, ref = out[:n].astype(np.float64), ref[:n].astype(np.float64)
    noise = float(np.sum((out - ref) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(float(np.sum(ref ** 2)) / noise)


def log_mel_snr_db(out: np.ndarray, ref: np.ndarray) -> float:
    """The same ratio over the Vocos log-mel spectrograms (24 kHz audio) of the two, in dB: how far
    the spectral content moved, blind to phase (two renderings of the same mel score high here
    and can still score near 0 dB as waveforms)."""
    from tts.f5.mel import log_mel_spectrogram

    n = min(out.size, ref.size)

    def log_mel(wav: np.ndarray) -> np.ndarray:
        return log_mel_spectrogram(torch.from_numpy(np.ascontiguousarray(wav[:n], dtype=np.float32))[None]).numpy()

    return snr_db(log_mel(out).ravel(), log_mel(ref).ravel())
