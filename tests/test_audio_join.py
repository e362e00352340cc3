"""tts/audio.py: the one chunk-joining rule, its incremental form, and waveform checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tts.audio import (F5_CROSSFADE_S, F5_CROSSFADE_SAMPLES, F5_SAMPLE_RATE, SPARK_CROSSFADE_SAMPLES,
                       SPARK_SAMPLE_RATE, ChunkJoiner, crossfade_join, join_chunks, validate_waveform)


def test_constants():
    assert (F5_SAMPLE_RATE, SPARK_SAMPLE_RATE, F5_CROSSFADE_S) == (24000, 16000, 0.15)
    assert F5_CROSSFADE_SAMPLES == 3600 and SPARK_CROSSFADE_SAMPLES == 1600


def test_crossfade_values_at_both_ends():
    a = np.full(10, 2.0, np.float32)
    b = np.full(8, -1.0, np.float32)
    out = crossfade_join(a, b, 5)
    assert out.dtype == np.float32 and out.shape == (13,)
    np.testing.assert_array_equal(out[:5], 2.0)  # untouched head of a
    assert out[5] == 2.0  # first overlapped sample: all a (fade-out starts at 1)
    assert out[9] == -1.0  # last overlapped sample: all b (fade-in ends at 1)
    np.testing.assert_allclose(out[5:10], [2.0, 1.25, 0.5, -0.25, -1.0], atol=1e-6)  # linear
    np.testing.assert_array_equal(out[10:], -1.0)  # untouched rest of b


def test_crossfade_weights_sum_to_one():
    """A constant signal cross-faded with itself stays constant: the fades are complementary."""
    a = np.full(100, 0.3, np.float32)
    np.testing.assert_allclose(crossfade_join(a, a, 40), 0.3, atol=1e-6)


def test_overlap_zero_concatenates_and_large_overlap_clamps():
    a = np.arange(5, dtype=np.float32)
    b = np.arange(3, dtype=np.float32) + 10
    np.testing.assert_array_equal(crossfade_join(a, b, 0), np.concatenate([a, b]))
    assert crossfade_join(a, b, 100).shape == (5,)  # clamped to len(b) = 3
    assert crossfade_join(b, a, 100).shape == (5,)  # clamped to len(b) = 3 on the other side
    np.testing.assert_array_equal(crossfade_join(np.zeros(0, np.float32), b, 4), b)
    with pytest.raises(ValueError, match="overlap"):
        crossfade_join(a, b, -1)


def test_joined_length_is_sum_minus_overlaps():
    rng = np.random.default_rng(0)
    chunks = [rng.standard_normal(n).astype(np.float32) for n in (24000, 30000, 18000, 9000)]
    overlaps = [0, 3600, 3600, 1000]
    out = join_chunks(chunks, overlaps)
    assert out.shape == (sum(map(len, chunks)) - sum(overlaps[1:]),)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[: 24000 - 3600], chunks[0][: 24000 - 3600])
    np.testing.assert_array_equal(out[-(9000 - 1000):], chunks[-1][1000:])


def test_join_chunks_edge_cases():
    assert join_chunks([], []).shape == (0,)
    one = np.ones(7, np.float32)
    np.testing.assert_array_equal(join_chunks([one], [123]), one)  # overlaps[0] is ignored
    with pytest.raises(ValueError, match="one overlap per chunk"):
        join_chunks([one, one], [0])


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int16])
def test_one_chunk_joins_as_the_joiner_would(dtype):
    """join_chunks' shortcut for one chunk answers what ChunkJoiner answers: values, dtype, a copy,
    the same refusals."""
    chunk = (np.random.default_rng(3).standard_normal(1001) * 1000).astype(dtype)
    joiner = ChunkJoiner(hold_back=0)
    joiner.add(chunk, 0)
    expected = joiner.finish_joined()
    got = join_chunks([chunk], [55])
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    got[0] = 7
    assert chunk[0] != 7, "the answer is a copy: changing it leaves the chunk alone"
    for bad in (np.zeros((2, 5), np.float32), np.array(["a", "b"])):
        with pytest.raises(ValueError) as shortcut:
            join_chunks([bad], [0])
        with pytest.raises(ValueError) as general:
            ChunkJoiner(hold_back=0).add(bad, 0)
        assert str(shortcut.value) == str(general.value)


def test_join_chunks_equals_pairwise_crossfades():
    rng = np.random.default_rng(1)
    chunks = [rng.standard_normal(int(n)).astype(np.float32) for n in rng.integers(1, 400, 12)]
    overlaps = [0] + [int(o) for o in rng.integers(0, 60, 11)]
    want = chunks[0]
    for c, o in zip(chunks[1:], overlaps[1:]):
        want = crossfade_join(want, c, o)
    np.testing.assert_array_equal(join_chunks(chunks, overlaps), want)


@pytest.mark.parametrize("seed", range(20))
def test_chunk_joiner_equals_join_chunks(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 10))
    hold_back = int(rng.integers(0, 80))
    chunks = [rng.standard_normal(int(rng.integers(0, 300))).astype(np.float32) for _ in range(n)]
    overlaps = [int(rng.integers(0, hold_back + 1)) for _ in range(n)]
    joiner = ChunkJoiner(hold_back=hold_back)
    released = []
    for c, o in zip(chunks, overlaps):
        out = joiner.add(c, o)
        released.append(out)
        assert joiner.released_samples + min(hold_back, len(joiner)) == len(joiner)  # held back: no more
    released.append(joiner.finish())
    want = join_chunks(chunks, overlaps)
    np.testing.assert_array_equal(np.concatenate(released), want)  # bit for bit
    np.testing.assert_array_equal(joiner.joined, want)
    assert joiner.finished and joiner.chunks == n


def test_chunk_joiner_releases_early_and_finish_releases_rest():
    joiner = ChunkJoiner(hold_back=100)
    first = joiner.add(np.ones(1000, np.float32), 0)
    assert first.shape == (900,)
    assert joiner.joined.shape == (1000,)
    second = joiner.add(np.zeros(500, np.float32), 100)
    assert second.shape == (400,)  # 100 cross-faded + 400 new - 100 held back
    rest = joiner.finish()
    assert rest.shape == (100,)
    with pytest.raises(ValueError, match="after finish"):
        joiner.add(np.ones(3, np.float32), 0)


def test_chunk_joiner_refuses_overlap_beyond_hold_back():
    joiner = ChunkJoiner(hold_back=10)
    joiner.add(np.ones(100, np.float32), 0)
    with pytest.raises(ValueError, match="hold_back"):
        joiner.add(np.ones(100, np.float32), 50)


def test_chunk_joiner_hold_back_none_keeps_everything():
    joiner = ChunkJoiner(hold_back=None)
    assert joiner.add(np.ones(50, np.float32), 0).size == 0
    assert joiner.add(np.ones(50, np.float32), 200).size == 0  # clamps like join_chunks
    assert joiner.finish().size == 50


def test_join_rejects_non_mono():
    with pytest.raises(ValueError, match="1-D"):
        crossfade_join(np.zeros((2, 5)), np.zeros(5), 1)


# --- validate_waveform -----------------------------------------------------------------------------
def _speech(seconds=1.0, sr=F5_SAMPLE_RATE):
    t = np.arange(int(seconds * sr)) / sr
    return (0.2 * np.sin(2 * np.pi * 150 * t)).astype(np.float32)


def test_validate_accepts_a_normal_clip():
    validate_waveform(_speech(), F5_SAMPLE_RATE)


@pytest.mark.parametrize("wav,needles", [
    (np.zeros(0, np.float32), ["empty", "0 samples"]),
    (np.where(np.arange(24000) == 3, np.nan, _speech()).astype(np.float32), ["NaN", "1 "]),
    (np.where(np.arange(24000) < 2, np.inf, _speech()).astype(np.float32), ["infinite", "2 "]),
    (_speech(0.25), ["0.25 s", "0.5 s", "6000 samples", "24000 Hz"]),
    (np.zeros(24000, np.float32), ["silent", "peak"]),
    (np.full(24000, 5e-5, np.float32), ["silent", "5e-05"]),
    (np.zeros((2, 24000), np.float32), ["mono", "(2, 24000)"]),
], ids=["empty", "nan", "inf", "short", "zeros", "near-silent", "stereo"])
def test_validate_names_the_problem(wav, needles):
    with pytest.raises(ValueError) as err:
        validate_waveform(wav, F5_SAMPLE_RATE)
    for needle in needles:
        assert needle in str(err.value)
    assert "prompt clip" in str(err.value)


def test_validate_custom_limits_and_name():
    with pytest.raises(ValueError, match=r"the recording is 1\.00 s .* at least 2 s"):
        validate_waveform(_speech(1.0, 16000), 16000, min_seconds=2, what="recording")


def test_module_is_numpy_only():
    code = ("import sys, tts.audio; "
            "print([m for m in ('torch', 'tritonclient', 'scipy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "[]"
