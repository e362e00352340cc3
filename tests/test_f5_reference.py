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
    prep = ref.prepare_prompt(wav, SR)
    assert not prep.clipped and prep.notes == []
    assert prep.wav.size == wav.size + round(0.05 * SR)
    assert np.array_equal(prep.wav[: wav.size], wav) and not prep.wav[wav.size:].any()


def test_silent_ranges_follow_pydub_windows():
    # 2 s tone | 1.5 s silence | 1 s tone: 1000 ms windows every 10 ms; the silent ones start at
    # 2000..2500 ms and merge into one range ending 1000 ms after the last start
    wav = np.concatenate([tone(2.0), silence(1.5), tone(1.0)])
    assert ref.silent_ranges(wav, SR, 1000, -50.0) == [(2000, 3500)]
    # a gap shorter than the window is not silence at this window length
    assert ref.silent_ranges(np.concatenate([tone(2.0), silence(0.8), tone(1.0)]), SR, 1000, -50.0) == []


def test_long_gap_shortened_to_twice_the_kept_silence():
    # pieces keep 1000 ms of silence on each side: a 3 s gap becomes 2 s, a 1.5 s gap stays
    wav = np.concatenate([tone(2.0), silence(3.0), tone(2.0), silence(1.5), tone(1.0)])
    assert ref.speech_pieces(wav, SR, ref.SILENCE_PASSES[0]) == [(0, 3000), (4000, 7750), (7750, 9500)]
    prep = ref.prepare_prompt(wav, SR)
    assert prep.wav.size == round(8.5 * SR) + round(0.05 * SR)
    assert prep.shortened_s == pytest.approx(1.0) and not prep.clipped


def test_long_clip_stops_rejoining_past_six_seconds():
    # speech 5 s | 1.5 s gap | speech 4 s | 1.5 s gap | speech 3 s: the third piece would pass 12 s
    wav = np.concatenate([tone(5), silence(1.5), tone(4), silence(1.5), tone(3)])
    prep = ref.prepare_prompt(wav, SR)
    # kept: 5 s + 1.5 s gap + 4 s (+0.75 s of the next gap, then trimmed as a silent edge)
    assert prep.clipped and prep.wav.size == round(10.5 * SR) + round(0.05 * SR)
    assert np.array_equal(prep.wav[: round(10.5 * SR)], wav[: round(10.5 * SR)])


def test_long_clip_falls_back_to_short_gaps_then_hard_cut():
    # only short (0.2 s) gaps: the second pass (100 ms, -40 dBFS) splits there
    pieces = []
    for _ in range(8):
        pieces += [tone(1.6), silence(0.2)]
    prep = ref.prepare_prompt(np.concatenate(pieces), SR)  # 14.4 s
    body = prep.wav.size - round(0.05 * SR)
    assert prep.clipped and 6 * SR < body <= 12 * SR
    # no gaps at all: hard cut at exactly 12 s
    prep = ref.prepare_prompt(tone(15.0), SR)
    assert prep.clipped and prep.wav.size == 12 * SR + round(0.05 * SR)
    assert prep.clipped_s == pytest.approx(3.0)


def test_edges_trimmed_and_quiet_clip_left_alone():
    prep = ref.prepare_prompt(np.concatenate([silence(0.4), tone(2.0), silence(0.5)]), SR)
    assert prep.wav.size == round(2.05 * SR) and prep.leading_s == pytest.approx(0.4)
    assert prep.trailing_s == pytest.approx(0.5)
    quiet = tone(2.0, amp=1e-3)  # below -42 dBFS throughout: upstream would trim it to nothing
    out, lead, trail = ref.trim_silence_edges(quiet, SR)
    assert out.size == quiet.size and lead == trail == 0
