"""tts/f5/reference.py: prompt checks, RMS normalisation, clipping at silences."""

from __future__ import annotations

import numpy as np
import pytest

from tts.f5 import reference as ref

SR = 24000


def tone(seconds: float, amp: float = 0.3, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(round(seconds * SR))) / SR
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(round(seconds * SR)), np.float32)


def test_check_reference_accepts_speechlike():
    ref.check_reference(tone(1.0), SR)


@pytest.mark.parametrize("wav, message", [
    (np.array([0.1, np.nan] * SR, np.float32), "NaN"),
    (np.array([0.1, np.inf] * SR, np.float32), "infinite"),
    (tone(0.3), r"0\.30 s long.*at least 0\.5 s"),
    (silence(1.0), "silent"),
    (np.concatenate([silence(1.0), [2e-4]]).astype(np.float32), "silent"),  # one click: peak ok, RMS not
])
def test_check_reference_names_the_problem(wav, message):
    with pytest.raises(ValueError, match=message):
        ref.check_reference(wav, SR)


def test_normalize_rms_scales_quiet_only():
    quiet = tone(1.0, amp=0.01)
    out, rms = ref.normalize_rms(quiet)
    assert rms == pytest.approx(0.01 / np.sqrt(2), rel=1e-3)
    assert np.sqrt(np.mean(out.astype(np.float64) ** 2)) == pytest.approx(ref.TARGET_RMS, rel=1e-4)
    assert ref.output_gain(rms) == pytest.approx(rms / 0.1)
    loud = tone(1.0, amp=0.5)
    out, rms = ref.normalize_rms(loud)
    assert np.array_equal(out, loud) and rms > 0.1 and ref.output_gain(rms) == 1.0


def test_short_clip_gets_only_the_tail():
    wav = tone(3.0)
    out, clipped = ref.clip_at_silence(wav, SR)
    assert not clipped
    assert out.size == wav.size + round(0.05 * SR)
    assert np.array_equal(out[: wav.size], wav) and not out[wav.size:].any()


def test_long_clip_is_cut_in_the_last_long_gap():
    # speech 5 s | 1.5 s gap | speech 4 s | 1.5 s gap (ends at 12 s) | speech 3 s
    wav = np.concatenate([tone(5), silence(1.5), tone(4), silence(1.5), tone(3)])
    out, clipped = ref.clip_at_silence(wav, SR)
    assert clipped
    body = out[: -round(0.05 * SR)]
    # cut in the second gap, keeping up to half of it after the speech (pydub keep_silence)
    assert 10.5 * SR <= body.size <= 11.5 * SR, body.size / SR
    assert np.array_equal(body, wav[: body.size])


def test_long_clip_falls_back_to_short_gaps_then_hard_cut():
    # only short (0.2 s) gaps: the second pass finds one before 12 s
    pieces = []
    for _ in range(8):
        pieces += [tone(1.6), silence(0.2)]
    wav = np.concatenate(pieces)  # 14.4 s
    out, clipped = ref.clip_at_silence(wav, SR)
    body = out[: -round(0.05 * SR)]
    assert clipped and 6 * SR < body.size <= 12 * SR
    assert np.abs(wav[body.size - 100: body.size]).max() < 1e-3  # ends inside a gap
    # no gaps at all: hard cut at exactly 12 s
    out, clipped = ref.clip_at_silence(tone(15.0), SR)
    assert clipped and out.size == 12 * SR + round(0.05 * SR)


def test_gap_too_early_is_not_used():
    # the only long gap ends the first 3 s: cutting there would keep < 6 s, so hard cut
    wav = np.concatenate([tone(3), silence(1.5), tone(10)])
    out, clipped = ref.clip_at_silence(wav, SR)
    assert clipped and out.size == 12 * SR + round(0.05 * SR)


def test_trim_edges_option():
    wav = np.concatenate([silence(1.0), tone(2.0), silence(1.0)])
    out, _ = ref.clip_at_silence(wav, SR, trim_edges=True)
    assert abs(out.size - (2.0 + 0.05) * SR) <= 0.01 * SR
    quiet = tone(2.0, amp=1e-3)  # below -42 dBFS throughout: left alone rather than trimmed away
    assert ref.trim_silence_edges(quiet, SR).size == quiet.size
