"""Log-mel spectrogram of F5-TTS / Vocos (`charactr/vocos-mel-24khz`), without torchaudio.

Upstream (F5-TTS `get_vocos_mel_spectrogram`, Vocos `MelSpectrogramFeatures`) builds a
torchaudio `MelSpectrogram(sample_rate=24000, n_fft=1024, win_length=1024, hop_length=256,
n_mels=100, power=1, center=True, normalized=False, norm=None)` and takes
`log(clamp(mel, min=1e-5))`. Everything else is torchaudio's default: periodic Hann window,
reflect padding, one-sided STFT, HTK mel scale, f_min 0, f_max None -> float(sample_rate // 2)
= 12000 Hz, no filter normalisation. This module computes the same thing with `torch.stft`
and a filterbank built by the same formula, in the same float32 operation order, so the two
agree to float rounding (tools/check_mel_torchaudio.py compares them where torchaudio exists).
"""

from __future__ import annotations

import math
import threading

import torch
from torch import nn

# --- constants -----------------------------------------------------------------------------------
SAMPLE_RATE = 24000  # Hz; Vocos mel-24khz and F5-TTS both run at 24 kHz
N_FFT = 1024  # STFT size: 1024 / 24000 = 42.7 ms analysis window
WIN_LENGTH = 1024  # window = N_FFT (torchaudio's default when win_length is None)
HOP_LENGTH = 256  # 24000 / 256 = 93.75 mel frames per second (10.67 ms per frame)
N_MELS = 100  # mel channels of the Vocos checkpoint and of F5's mel_dim
N_FREQS = N_FFT // 2 + 1  # one-sided STFT bins: 1024 // 2 + 1 = 513
F_MIN = 0.0  # Hz, torchaudio's default
F_MAX = float(SAMPLE_RATE // 2)  # Hz; torchaudio's MelScale uses float(sample_rate // 2) when f_max is None
LOG_FLOOR = 1e-5  # mel magnitudes are clamped here before the log: log(1e-5) = -11.51 is "silence"
FRAMES_PER_SECOND = SAMPLE_RATE / HOP_LENGTH  # 93.75

# HTK mel scale: mel = 2595 * log10(1 + hz / 700)
_HTK_MEL_FACTOR = 2595.0
_HTK_HZ_BREAK = 700.0


def num_frames(num_samples: int) -> int:
    """Frames of a centred STFT over `num_samples`: N // 256 + 1 (one frame per hop plus the last)."""
    return num_samples // HOP_LENGTH + 1


def hz_to_mel(hz: float) -> float:
    """HTK mel of a frequency in Hz (a Python float, as torchaudio computes it)."""
    return _HTK_MEL_FACTOR * math.log10(1.0 + hz / _HTK_HZ_BREAK)


def mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    """Inverse of `hz_to_mel`, element-wise on a tensor of mels."""
    return _HTK_HZ_BREAK * (10.0 ** (mel / _HTK_MEL_FACTOR) - 1.0)


def mel_filterbank(n_freqs: int = N_FREQS, f_min: float = F_MIN, f_max: float = F_MAX, n_mels: int = N_MELS,
                   sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Triangular HTK mel filterbank without area normalisation -> float32 [n_freqs, n_mels].

    Same values as `torchaudio.functional.melscale_fbanks(n_freqs, f_min, f_max, n_mels,
    sample_rate, norm=None, mel_scale="htk")`: STFT bin centres spaced linearly over
    [0, sample_rate // 2], n_mels + 2 corner points spaced linearly in mel between f_min and
    f_max, and filter m rising from corner m to a peak of 1 at corner m+1, falling to 0 at m+2.
    Column m multiplies a magnitude spectrum [.., n_freqs] into mel channel m.
    """
    if not 0.0 <= f_min < f_max:
        raise ValueError(f"need 0 <= f_min < f_max, got f_min={f_min} f_max={f_max}")
    bin_hz = torch.linspace(0, sample_rate // 2, n_freqs)  # [n_freqs]
    corner_mel = torch.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2)
    corner_hz = mel_to_hz(corner_mel)  # [n_mels + 2]
    width = corner_hz[1:] - corner_hz[:-1]  # [n_mels + 1] distance between neighbouring corners
    offset = corner_hz.unsqueeze(0) - bin_hz.unsqueeze(1)  # [n_freqs, n_mels + 2]: corner - bin
    rising = (-1.0 * offset[:, :-2]) / width[:-1]  # (bin - left corner) / left width
    falling = offset[:, 2:] / width[1:]  # (right corner - bin) / right width
    return torch.max(torch.zeros(1), torch.min(rising, falling))


# --- cached window and filterbank, one copy per (device, dtype) ----------------------------------
_cache: dict[tuple[str, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
_cache_lock = threading.Lock()


def _window_and_fb(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    key = (str(device), dtype)
    hit = _cache.get(key)
    if hit is None:
        with _cache_lock:
            hit = _cache.get(key)
            if hit is None:
                window = torch.hann_window(WIN_LENGTH, periodic=True).to(device=device, dtype=dtype)
                fb = mel_filterbank().to(device=device, dtype=dtype)
                hit = _cache[key] = (window, fb)
    return hit


def magnitude_spectrogram(wav: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """|STFT| of [B, N] audio -> [B, 513, N // 256 + 1] (centred, reflect-padded, periodic Hann)."""
    spec = torch.stft(wav, n_fft=N_FFT, hop_length=HOP_LENGTH, win_length=WIN_LENGTH, window=window,
                      center=True, pad_mode="reflect", normalized=False, onesided=True, return_complex=True)
    return spec.abs()  # power 1: magnitude, not power


def _check_wav(wav: torch.Tensor) -> torch.Tensor:
    if wav.dim() == 3 and wav.shape[1] == 1:  # [B, 1, N] as upstream also accepts
        wav = wav[:, 0]
    if wav.dim() == 1:
        raise ValueError("log_mel_spectrogram expects a batch [B, N]; add a batch dimension with wav[None]")
    if wav.dim() != 2:
        raise ValueError(f"log_mel_spectrogram expects audio of shape [B, N], got {tuple(wav.shape)}")
    if wav.shape[-1] <= N_FFT // 2:
        # reflect padding by n_fft // 2 = 512 samples needs more samples than that
        raise ValueError(f"audio of {wav.shape[-1]} samples is too short for the mel spectrogram: "
                         f"more than {N_FFT // 2} samples ({(N_FFT // 2) / SAMPLE_RATE * 1000:.0f} ms) are needed")
    if not wav.is_floating_point():
        raise ValueError(f"audio must be floating point, got {wav.dtype}")
    return wav


def log_mel_spectrogram(wav: torch.Tensor) -> torch.Tensor:
    """Vocos log-mel of 24 kHz audio: [B, N] float -> [B, 100, N // 256 + 1] (natural log).

    Computed in float32 whatever the input dtype (half-precision STFTs lose the quiet bins);
    the result is float32 on the input's device.
    """
    wav = _check_wav(wav).float()
    window, fb = _window_and_fb(wav.device, torch.float32)
    mag = magnitude_spectrogram(wav, window)  # [B, 513, T]
    mel = torch.matmul(mag.transpose(-1, -2), fb).transpose(-1, -2)  # [B, 100, T]
    return torch.log(torch.clamp(mel, min=LOG_FLOOR))


class MelSpectrogram(nn.Module):
    """`log_mel_spectrogram` as a module whose window and filterbank follow `.to(device)`.

    Buffers are non-persistent: they are derived constants and never part of a checkpoint.
    forward: [B, N] float audio at 24 kHz -> [B, 100, N // 256 + 1] float32 log-mel.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("window", torch.hann_window(WIN_LENGTH, periodic=True), persistent=False)
        self.register_buffer("fb", mel_filterbank(), persistent=False)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        wav = _check_wav(wav).float()
        mag = magnitude_spectrogram(wav, self.window.float())
        mel = torch.matmul(mag.transpose(-1, -2), self.fb.float()).transpose(-1, -2)
        return torch.log(torch.clamp(mel, min=LOG_FLOOR))
