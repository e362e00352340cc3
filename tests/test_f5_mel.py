"""tts/f5/mel.py against independent numpy implementations of the HTK filterbank and the STFT."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tts.f5 import mel


def htk_filterbank_np(n_freqs: int, f_min: float, f_max: float, n_mels: int, sr: int) -> np.ndarray:
    """Reference written from the HTK definition, in float64: triangles between mel-spaced corners."""
    def to_mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)

    def to_hz(m):
        return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)

    freqs = np.linspace(0.0, sr // 2, n_freqs)
    corners = to_hz(np.linspace(to_mel(f_min), to_mel(f_max), n_mels + 2))
    fb = np.zeros((n_freqs, n_mels))
    for m in range(n_mels):
        lo, mid, hi = corners[m], corners[m + 1], corners[m + 2]
        up = (freqs - lo) / (mid - lo)
        down = (hi - freqs) / (hi - mid)
        fb[:, m] = np.clip(np.minimum(up, down), 0.0, None)
    return fb


def log_mel_np(wav: np.ndarray) -> np.ndarray:
    """[N] -> [100, T]: reflect pad 512, periodic Hann, rfft, |.|, HTK filterbank, log(max(., 1e-5))."""
    n_fft, hop = 1024, 256
    x = np.pad(wav.astype(np.float64), (n_fft // 2, n_fft // 2), mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    n_frames = 1 + (x.size - n_fft) // hop
    frames = np.stack([x[i * hop: i * hop + n_fft] * window for i in range(n_frames)])
    mag = np.abs(np.fft.rfft(frames, axis=1))  # [T, 513]
    fb = htk_filterbank_np(513, 0.0, 12000.0, 100, 24000)
    return np.log(np.maximum(mag @ fb, 1e-5)).T


def test_constants():
    assert (mel.SAMPLE_RATE, mel.N_FFT, mel.WIN_LENGTH, mel.HOP_LENGTH, mel.N_MELS) == (24000, 1024, 1024, 256, 100)
    assert mel.FRAMES_PER_SECOND == 93.75
    assert mel.F_MAX == 12000.0  # torchaudio's f_max=None -> float(sample_rate // 2)


def test_filterbank_matches_htk_formula():
    fb = mel.mel_filterbank()
    assert fb.shape == (513, 100) and fb.dtype == torch.float32
    ref = htk_filterbank_np(513, 0.0, 12000.0, 100, 24000)
    np.testing.assert_allclose(fb.numpy(), ref, atol=2e-5)
    assert (fb >= 0).all() and fb.max() <= 1.0
    assert (fb.max(dim=0).values > 0).all()  # every filter sees at least one bin


def test_filterbank_other_arguments():
    fb = mel.mel_filterbank(n_freqs=201, f_min=50.0, f_max=7000.0, n_mels=40, sample_rate=16000)
    np.testing.assert_allclose(fb.numpy(), htk_filterbank_np(201, 50.0, 7000.0, 40, 16000), atol=2e-5)


def test_log_mel_matches_numpy_reference():
    rng = np.random.default_rng(0)
    t = np.arange(24000 + 123) / 24000
    wav = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    out = mel.log_mel_spectrogram(torch.from_numpy(wav)[None])
    assert out.shape == (1, 100, wav.size // 256 + 1) and out.dtype == torch.float32
    np.testing.assert_allclose(out[0].numpy(), log_mel_np(wav), atol=1e-4, rtol=0)


def test_frame_count_and_batch():
    wavs = torch.randn(3, 5000) * 0.1
    out = mel.log_mel_spectrogram(wavs)
    assert out.shape == (3, 100, 5000 // 256 + 1) == (3, 100, mel.num_frames(5000))
    torch.testing.assert_close(out[1:2], mel.log_mel_spectrogram(wavs[1:2]))
    torch.testing.assert_close(mel.MelSpectrogram()(wavs), out)


def test_silence_is_the_log_floor_and_tone_lands_in_its_band():
    silent = mel.log_mel_spectrogram(torch.zeros(1, 4096))
    assert torch.allclose(silent, torch.full_like(silent, float(np.log(1e-5))))
    t = torch.arange(24000) / 24000
    tone = mel.log_mel_spectrogram((0.5 * torch.sin(2 * torch.pi * 1000 * t))[None])
    peak_channel = int(tone[0, :, 10:-10].mean(dim=1).argmax())
    # 1000 Hz on the HTK scale: 1000 mel; channel centres are 12000 Hz -> 3923.3 mel over 101 steps
    expected = round(mel.hz_to_mel(1000.0) / (mel.hz_to_mel(12000.0) / 101)) - 1
    assert abs(peak_channel - expected) <= 1


def test_errors_are_clear():
    with pytest.raises(ValueError, match="batch"):
        mel.log_mel_spectrogram(torch.zeros(4096))
    with pytest.raises(ValueError, match="too short"):
        mel.log_mel_spectrogram(torch.zeros(1, 300))
