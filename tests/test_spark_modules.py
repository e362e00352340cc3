"""BiCodec building blocks against reference values (no weights needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from tests.test_spark_fixtures import spark_one_thread  # noqa: F401 - fixture
from tts.spark.config import MelParams, SpeakerEncoderConfig, WaveGeneratorConfig
from tts.spark.layers import WNConv1d, WNConvTranspose1d, fold_weight_norm
from tts.spark.mel import MelSpectrogram, hz_to_mel, mel_filterbank, mel_to_hz
from tts.spark.quantizers import FactorizedVQ, ResidualFSQ
from tts.spark.speaker import SpeakerEncoder
from tts.spark.wave_generator import WaveGenerator

pytestmark = pytest.mark.usefixtures("spark_one_thread")

# librosa.filters.mel(sr=16000, n_fft=1024, n_mels=128, fmin=10, fmax=8000, htk=False, norm="slaney")
# (the same construction as torchaudio's melscale_fbanks with norm/mel_scale "slaney"), per filter:
# (index, sum over bins, argmax bin, max, first non-zero bin, last non-zero bin)
LIBROSA_SLANEY = [(0, 0.06740594655275345, 2, 0.03912476450204849, 1, 3),
                  (1, 0.060346417129039764, 4, 0.03206522762775421, 3, 5),
                  (63, 0.06275446712970734, 107, 0.021386945620179176, 105, 109),
                  (127, 0.06394705176353455, 500, 0.00525736715644598, 488, 511)]
# librosa.feature.melspectrogram of a 440 Hz sine (amplitude 0.5, 1 s), same settings, centred
# reflect-padded frames, magnitude: frame 25 -> (argmax bin, max, sum)
LIBROSA_SINE_FRAME = (18, 4.4180216789245605, 11.393548011779785)


def test_mel_scales_round_trip():
    for scale in ("htk", "slaney"):
        for f in (10.0, 440.0, 999.0, 1000.0, 4000.0, 8000.0):
            assert float(mel_to_hz(torch.tensor([hz_to_mel(f, scale)], dtype=torch.float64), scale)) == \
                pytest.approx(f, rel=1e-9)
    assert hz_to_mel(1000.0, "slaney") == pytest.approx(15.0)
    assert hz_to_mel(700.0, "htk") == pytest.approx(2595 * math.log10(2))


def test_slaney_filterbank_matches_librosa():
    fb = mel_filterbank(513, 10.0, 8000.0, 128, 16000, norm="slaney", mel_scale="slaney")
    assert fb.shape == (513, 128) and fb.dtype == torch.float32 and bool((fb >= 0).all())
    for j, total, peak_bin, peak, first, last in LIBROSA_SLANEY:
        col = fb[:, j]
        nz = torch.nonzero(col).view(-1)
        assert float(col.sum()) == pytest.approx(total, rel=1e-5)
        assert int(col.argmax()) == peak_bin and float(col.max()) == pytest.approx(peak, rel=1e-5)
        assert (int(nz[0]), int(nz[-1])) == (first, last)


def test_mel_spectrogram_matches_librosa_on_a_sine():
    t = np.arange(16000) / 16000
    wav = torch.from_numpy((0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)).unsqueeze(0)
    mel = MelSpectrogram(MelParams())(wav)
    assert mel.shape == (1, 128, 51)  # 16000 // 320 + 1 centred frames
    frame = mel[0, :, 25]
    bin_, peak, total = LIBROSA_SINE_FRAME
    assert int(frame.argmax()) == bin_
    assert float(frame.max()) == pytest.approx(peak, rel=1e-4)
    assert float(frame.sum()) == pytest.approx(total, rel=1e-4)
    assert not any(k.startswith("mel") or k in ("window", "fb") for k in MelSpectrogram(MelParams()).state_dict())


def test_weight_norm_convs_match_torch_weight_norm():
    g = torch.Generator().manual_seed(0)
    for ours, ref in ((WNConv1d(6, 4, 3, dilation=2, padding=2), nn.Conv1d(6, 4, 3, dilation=2, padding=2)),
                      (WNConvTranspose1d(6, 4, 4, stride=2, padding=1), nn.ConvTranspose1d(6, 4, 4, stride=2, padding=1))):
        ref = torch.nn.utils.parametrizations.weight_norm(ref, dim=0)
        with torch.no_grad():
            v = torch.randn(ours.weight_v.shape, generator=g)
            gain = torch.rand(ours.weight_g.shape, generator=g) + 0.5
            b = torch.randn(ours.bias.shape, generator=g)
            ours.weight_v.copy_(v), ours.weight_g.copy_(gain), ours.bias.copy_(b)
            ref.parametrizations.weight.original1.copy_(v)
            ref.parametrizations.weight.original0.copy_(gain)
            ref.bias.copy_(b)
        x = torch.randn(2, 6, 10, generator=g)
        expected = ref(x)
        assert torch.allclose(ours(x), expected, atol=1e-5)
        fold_weight_norm(ours)
        assert ours.folded is not None and torch.allclose(ours(x), expected, atol=1e-5)
    assert set(WNConv1d(2, 2, 1).state_dict()) == {"weight_g", "weight_v", "bias"}


def test_fsq_ids_round_trip():
    fsq = ResidualFSQ((4, 4, 4, 4, 4, 4), 1, dim=6)  # no projections: codes are the quantized output
    x = torch.randn(3, 6, 32, generator=torch.Generator().manual_seed(1)) * 2
    quantized, ids = fsq(x)
    assert ids.shape == (3, 1, 32) and int(ids.min()) >= 0 and int(ids.max()) < 4096
    assert torch.allclose(fsq.decode(ids), quantized)
    # every id is a mixed-radix number of per-dim levels: decoding gives distinct codes on the grid
    codes = fsq.codes_from_ids(torch.arange(4096).view(-1, 1))  # [4096, 6]
    assert set(codes.unique().tolist()) == {-1.0, -0.5, 0.0, 0.5}
    assert codes.unique(dim=0).shape[0] == 4096
    back = ((codes * 2 + 2) * torch.tensor([1, 4, 16, 64, 256, 1024])).sum(-1)
    assert torch.equal(back.long(), torch.arange(4096))


def test_factorized_vq_picks_the_cosine_nearest_entry():
    vq = FactorizedVQ(4, 16, 3)
    with torch.no_grad():
        vq.in_project.weight_v.copy_(torch.eye(3, 4).view(3, 4, 1))
        vq.in_project.weight_g.fill_(1.0)
        vq.in_project.bias.zero_()
        vq.codebook.weight.copy_(torch.randn(16, 3, generator=torch.Generator().manual_seed(2)))
    z = torch.randn(1, 4, 7, generator=torch.Generator().manual_seed(3))
    ids = vq.tokenize(z)
    cos = torch.nn.functional.normalize(z[0, :3].T, dim=-1) @ torch.nn.functional.normalize(vq.codebook.weight, dim=-1).T
    assert torch.equal(ids[0], cos.argmax(dim=-1))
    assert vq.detokenize(ids).shape == (1, 4, 7)


def test_wave_generator_emits_320_samples_per_token():
    gen = WaveGenerator(WaveGeneratorConfig(input_channel=8, channels=32, rates=(8, 5, 4, 2), kernel_sizes=(16, 11, 8, 4)))
    for t in (1, 7, 50):
        assert gen(torch.randn(1, 8, t)).shape == (1, 1, 320 * t)


def test_speaker_encoder_gives_32_global_tokens():
    cfg = SpeakerEncoderConfig(input_dim=128, out_dim=16, latent_dim=16, ecapa_channels=16, se_bottleneck=8,
                               astp_bottleneck=8, perceiver_heads=2, perceiver_dim_head=8)
    enc = SpeakerEncoder(cfg).eval()
    mel = torch.randn(2, 301, 128)
    with torch.no_grad():
        ids = enc.tokenize(mel)
        assert ids.shape == (2, 1, 32)
        assert enc.detokenize(ids).shape == (2, 16)
