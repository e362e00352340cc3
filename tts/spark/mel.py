"""Mel spectrogram of BiCodec's speaker-encoder input, without torchaudio.

Upstream builds `torchaudio.transforms.MelSpectrogram(sample_rate, n_fft, win_length, hop_length,
f_min, f_max, n_mels=..., power=1, norm="slaney", mel_scale="slaney")` with torchaudio's other
defaults: periodic Hann window of `win_length` (zero-padded to `n_fft` by torch.stft), centred
frames with reflect padding, one-sided, not normalised, magnitude (power 1), no log. This module
computes the same thing with `torch.stft` and a filterbank built the way torchaudio's
`melscale_fbanks` builds it (float32 throughout, in the same order, so the bank matches bit for bit).

The two tensors are non-persistent buffers: the published `BiCodec/model.safetensors` does not hold
`mel_transformer.spectrogram.window` / `mel_transformer.mel_scale.fb` (upstream recomputes them).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tts.spark.config import MelParams

# Slaney's auditory-toolbox mel scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above,
# with 27 mels per factor 6.4 in frequency.
SLANEY_HZ_PER_MEL = 200.0 / 3
SLANEY_LOG_START_HZ = 1000.0
SLANEY_LOG_START_MEL = SLANEY_LOG_START_HZ / SLANEY_HZ_PER_MEL  # 15.0
SLANEY_LOGSTEP = math.log(6.4) / 27.0


def hz_to_mel(freq: float, mel_scale: str = "htk") -> float:
    """One frequency in Hz -> mel (`"htk"`: 2595 log10(1 + f/700); `"slaney"`: see constants)."""
    if mel_scale == "htk":
        return 2595.0 * math.log10(1.0 + freq / 700.0)
    if mel_scale != "slaney":
        raise ValueError(f'mel_scale must be "htk" or "slaney"; got {mel_scale!r}')
    if freq < SLANEY_LOG_START_HZ:
        return freq / SLANEY_HZ_PER_MEL
    return SLANEY_LOG_START_MEL + math.log(freq / SLANEY_LOG_START_HZ) / SLANEY_LOGSTEP


def mel_to_hz(mels: torch.Tensor, mel_scale: str = "htk") -> torch.Tensor:
    """Mel values (tensor) -> Hz, the inverse of `hz_to_mel`."""
    if mel_scale == "htk":
        return 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
    if mel_scale != "slaney":
        raise ValueError(f'mel_scale must be "htk" or "slaney"; got {mel_scale!r}')
    linear = SLANEY_HZ_PER_MEL * mels
    logpart = SLANEY_LOG_START_HZ * torch.exp(SLANEY_LOGSTEP * (mels - SLANEY_LOG_START_MEL))
    return torch.where(mels >= SLANEY_LOG_START_MEL, logpart, linear)


def mel_filterbank(n_freqs: int, f_min: float, f_max: float, n_mels: int, sample_rate: int,
                   norm: str | None = None, mel_scale: str = "htk") -> torch.Tensor:
    """Triangular mel filterbank [n_freqs, n_mels] (float32), torchaudio's construction.

    STFT bins are spaced evenly on [0, sample_rate // 2]; filter edges evenly on the mel scale
    between f_min and f_max. `norm="slaney"` divides each triangle by its width in Hz / 2 so each
    filter has about constant energy.
    """
    if norm not in (None, "slaney"):
        raise ValueError(f'norm must be None or "slaney"; got {norm!r}')
    bin_hz = torch.linspace(0, sample_rate // 2, n_freqs)
    edges_mel = torch.linspace(hz_to_mel(f_min, mel_scale), hz_to_mel(f_max, mel_scale), n_mels + 2)
    edges_hz = mel_to_hz(edges_mel, mel_scale)
    widths = edges_hz[1:] - edges_hz[:-1]  # [n_mels + 1]
    # distance from every bin to every edge: rising side towards edge i+1, falling side after it
    dist = edges_hz.unsqueeze(0) - bin_hz.unsqueeze(1)  # [n_freqs, n_mels + 2]
    rising = -dist[:, :-2] / widths[:-1]
    falling = dist[:, 2:] / widths[1:]
    fb = torch.clamp(torch.minimum(rising, falling), min=0.0)
    if norm == "slaney":
        fb = fb * (2.0 / (edges_hz[2:n_mels + 2] - edges_hz[:n_mels])).unsqueeze(0)
    return fb


class MelSpectrogram(nn.Module):
    """wav [B, T] (16 kHz, float) -> magnitude mel [B, n_mels, T // hop + 1]."""

    def __init__(self, params: MelParams):
        super().__init__()
        self.params = params
        f_max = params.mel_fmax if params.mel_fmax is not None else params.sample_rate / 2
        self.register_buffer("window", torch.hann_window(params.win_length), persistent=False)
        fb = mel_filterbank(params.n_fft // 2 + 1, float(params.mel_fmin), float(f_max), params.num_mels,
                            params.sample_rate, norm="slaney", mel_scale="slaney")
        self.register_buffer("fb", fb, persistent=False)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        p = self.params
        spec = torch.stft(wav, n_fft=p.n_fft, hop_length=p.hop_length, win_length=p.win_length,
                          window=self.window.to(wav.dtype), center=True, pad_mode="reflect",
                          normalized=False, onesided=True, return_complex=True)
        return torch.matmul(spec.abs().transpose(-1, -2), self.fb.to(wav.dtype)).transpose(-1, -2)
