"""Deterministic prompt clips for the prompt-preparation parity tests (numpy only).

Speech stand-in: voiced harmonics under a syllable-rate envelope with a little noise (about -60
dBFS); silence: noise at about -80 dBFS (quiet but not digital zero, as real recordings are).
Samples are quantised to 16 bits, as a WAV file would hold them, so upstream's pydub path and the
project's float path see the same values.
"""

from __future__ import annotations

import numpy as np

SR = 24000


def _speech(seconds: float, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    f0 = 120 + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = 0.2 + 0.8 * (0.5 * (1 + np.sin(2 * np.pi * 4 * t)))
    return 0.15 * voiced * envelope + 0.001 * rng.standard_normal(t.size)


def _silence(seconds: float, rng: np.random.Generator) -> np.ndarray:
    return 1e-4 * rng.standard_normal(int(seconds * SR))


#: name -> [(kind, seconds)]: the layouts the tests prepare
LAYOUTS = {
    "leading_silence": [("sil", 1.5), ("speech", 3.0), ("sil", 0.3)],
    "inner_gap": [("speech", 2.0), ("sil", 3.0), ("speech", 2.5)],
    "long_14s": [("speech", 5.0), ("sil", 0.6), ("speech", 4.0), ("sil", 1.2), ("speech", 3.2)],
    "long_no_gap": [("speech", 14.0)],
    "no_silence": [("speech", 3.0)],
    "short_gaps": [("speech", 1.0), ("sil", 0.4), ("speech", 1.0), ("sil", 1.4), ("speech", 1.0)],
}


def make_clip(name: str, seed: int = 0) -> np.ndarray:
    """The named layout as float32 samples at 24 kHz, quantised to 16-bit steps."""
    rng = np.random.default_rng(seed)
    parts = [_speech(s, rng) if kind == "speech" else _silence(s, rng) for kind, s in LAYOUTS[name]]
    wav = np.clip(np.concatenate(parts), -1.0, 32767 / 32768)
    return (np.round(wav * 32768) / 32768).astype(np.float32)
