"""studio/audio_io.py: any common audio file in (mono float32 at a model's rate), clear errors, files out."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from studio.audio_io import (AudioInputError, encode_audio, load_audio, mp3_supported, prepare_array, resample,
                             save_audio)

ROOT = Path(__file__).resolve().parent.parent
needs_mp3 = pytest.mark.skipif(not mp3_supported(), reason="this libsndfile has no MP3 support")


def tone(seconds: float, sr: int, freq: float = 220.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_wav_int16_stereo_44k_to_mono_24k(tmp_path):
    left, right = tone(1.0, 44100), tone(1.0, 44100, amp=0.1)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 44100, subtype="PCM_16")
    out = load_audio(path, 24000)
    assert out.dtype == np.float32 and out.ndim == 1 and out.shape == (24000,)
    # channel average of a 220 Hz tone (amplitudes 0.5 and 0.1) survives resampling
    assert abs(np.abs(out[1000:-1000]).max() - 0.3) < 0.01
    direct = resample(((left + right) / 2), 44100, 24000)
    np.testing.assert_allclose(out[1000:-1000], direct[1000:-1000], atol=1e-3)


def test_int_pcm_is_scaled_to_unit_range(tmp_path):
    path = tmp_path / "full_scale.wav"
    sf.write(path, np.array([32767, -32768, 0, 16384] * 4000, np.int16), 16000, subtype="PCM_16")
    out = load_audio(path, 16000)  # same rate: no resampling
    assert out[:4].tolist() == pytest.approx([32767 / 32768, -1.0, 0.0, 0.5])


def test_same_rate_keeps_samples_and_bytes_input_works(tmp_path):
    x = tone(0.5, 16000)
    path = tmp_path / "x.wav"
    sf.write(path, x, 16000, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(path, 16000), x)
    np.testing.assert_array_equal(load_audio(path.read_bytes(), 16000), x)
    np.testing.assert_array_equal(load_audio(str(path), 16000), x)


@pytest.mark.parametrize("fmt", ["flac", "ogg", pytest.param("mp3", marks=needs_mp3)])
def test_other_formats_load(tmp_path, fmt):
    x = tone(1.0, 22050)
    path = tmp_path / f"x.{fmt}"
    sf.write(path, x, 22050, format=fmt.upper())
    out = load_audio(path, 24000)
    assert out.dtype == np.float32 and abs(out.size - 24000) <= 1200  # lossy codecs may pad a frame
    assert 0.4 < np.abs(out).max() < 0.6


def test_resample_ratio_and_length():
    for sr, target in [(48000, 24000), (44100, 16000), (22050, 24000), (8000, 16000)]:
        out = resample(tone(1.0, sr), sr, target)
        assert out.dtype == np.float32 and out.shape == (target,)
    with pytest.raises(AudioInputError, match="positive"):
        resample(tone(0.1, 16000), 0, 16000)


# --- errors a person can fix ------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(AudioInputError, match="not found") as err:
        load_audio(tmp_path / "nope.wav", 24000)
    assert "nope.wav" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_directory_is_not_audio(tmp_path):
    with pytest.raises(AudioInputError, match="not a file"):
        load_audio(tmp_path, 24000)


def test_text_file_renamed_wav(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("these are my meeting notes, not a recording\n" * 20)
    with pytest.raises(AudioInputError, match="not an audio file") as err:
        load_audio(path, 24000)
    assert "notes.wav" in str(err.value)


def test_empty_file_and_empty_bytes(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    with pytest.raises(AudioInputError, match="empty"):
        load_audio(path, 24000)
    with pytest.raises(AudioInputError, match="empty"):
        load_audio(b"", 24000)


def test_wav_with_no_samples(tmp_path):
    path = tmp_path / "zero.wav"
    sf.write(path, np.zeros(0, np.float32), 24000, subtype="PCM_16")
    with pytest.raises(AudioInputError, match="no audio samples"):
        load_audio(path, 24000)


def test_wav_cut_in_half_is_truncated(tmp_path):
    """The header still claims 2 s of data; libsndfile alone would quietly read 1 s."""
    path = tmp_path / "cut.wav"
    sf.write(path, tone(2.0, 24000), 24000, subtype="PCM_16")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AudioInputError, match="truncated") as err:
        load_audio(path, 24000)
    assert "2.00 s" in str(err.value) and "1.00 s" in str(err.value)


def test_wav_cut_to_20_bytes_is_damaged(tmp_path):
    path = tmp_path / "stub.wav"
    sf.write(path, tone(1.0, 24000), 24000, subtype="PCM_16")
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(AudioInputError, match="damaged or truncated"):
        load_audio(path, 24000)


def test_flac_cut_in_half_is_damaged(tmp_path):
    data = encode_audio(tone(2.0, 24000) + 0.01 * np.random.default_rng(0).standard_normal(48000).astype(np.float32),
                        24000, "flac")
    with pytest.raises(AudioInputError, match="damaged or truncated|truncated"):
        load_audio(data[: len(data) // 2], 24000)


def test_streamed_wav_header_with_placeholder_size_is_accepted(tmp_path):
    """Recorders that stream WAV write 0xFFFFFFFF (or 0) as the data size: not a truncation."""
    data = bytearray(encode_audio(tone(1.0, 16000), 16000, "wav"))
    pos = data.find(b"data")
    data[pos + 4:pos + 8] = b"\xff\xff\xff\xff"
    out = load_audio(bytes(data), 16000)
    assert abs(out.size - 16000) <= 1


def test_wav_with_odd_sized_chunk_before_data(tmp_path):
    """Chunks before `data` are walked with RIFF's even padding; a valid file passes the check."""
    body = encode_audio(tone(1.0, 16000), 16000, "wav")
    fmt_end = body.find(b"data")
    extra = b"LIST" + (3).to_bytes(4, "little") + b"abc\x00"  # 3 bytes + 1 pad byte
    data = bytearray(body[:fmt_end] + extra + body[fmt_end:])
    data[4:8] = (len(data) - 8).to_bytes(4, "little")
    assert load_audio(bytes(data), 16000).size == 16000


# --- in-memory recordings ---------------------------------------------------------------------------
def test_prepare_array_gradio_style():
    x = tone(1.0, 48000)
    pcm = (np.stack([x, x], axis=1) * 32767).astype(np.int16)  # Gradio's (sr, int16 [N, C])
    out = prepare_array(pcm, 48000, 24000)
    assert out.dtype == np.float32 and out.shape == (24000,)
    assert abs(np.abs(out).max() - 0.5) < 0.01
    np.testing.assert_allclose(prepare_array(np.stack([x, x]), 48000, 48000), x, atol=1e-6)  # channels first
    u8 = np.array([0, 128, 255], np.uint8)
    assert prepare_array(u8, 8000, 8000).tolist() == pytest.approx([-1.0, 0.0, 127 / 128])
    with pytest.raises(AudioInputError, match="empty"):
        prepare_array(np.zeros(0, np.int16), 16000, 16000)


# --- writing ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["wav", "flac", pytest.param("mp3", marks=needs_mp3)])
def test_encode_round_trip(fmt):
    x = tone(1.0, 24000)
    data = encode_audio(x, 24000, fmt)
    back, sr = sf.read(io.BytesIO(data), dtype="float32")
    assert sr == 24000
    if fmt == "mp3":
        assert abs(back.size - x.size) <= 2400 and 0.4 < np.abs(back).max() < 0.6
    else:
        np.testing.assert_allclose(back, x, atol=1 / 32768 + 1e-6)  # 16-bit PCM


def test_encode_clips_instead_of_wrapping():
    data = encode_audio(np.array([2.0, -3.0, 0.5] * 100, np.float32), 16000, "wav")
    back, _ = sf.read(io.BytesIO(data), dtype="float32")
    assert back.max() == pytest.approx(32767 / 32768) and back.min() == -1.0


def test_encode_errors():
    with pytest.raises(ValueError, match="choose one of"):
        encode_audio(tone(0.1, 16000), 16000, "aac")
    with pytest.raises(ValueError, match="0 samples"):
        encode_audio(np.zeros(0, np.float32), 16000, "wav")
    with pytest.raises(ValueError, match="mono"):
        encode_audio(np.zeros((2, 10), np.float32), 16000, "wav")


@needs_mp3
def test_mp3_rejects_rates_it_cannot_carry():
    with pytest.raises(ValueError, match="MP3 cannot carry 96000 Hz"):
        encode_audio(tone(0.1, 96000), 96000, "mp3")


@pytest.mark.parametrize("suffix", [".wav", ".flac", pytest.param(".mp3", marks=needs_mp3)])
def test_save_audio_format_from_suffix(tmp_path, suffix):
    path = save_audio(tmp_path / "sub" / f"out{suffix.upper()}", tone(1.0, 16000), 16000)
    info = sf.info(path)
    assert info.samplerate == 16000 and info.format == {".wav": "WAV", ".flac": "FLAC", ".mp3": "MP3"}[suffix]
    assert abs(load_audio(path, 16000).size - 16000) <= 1600


def test_save_audio_unknown_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"\.wav, \.flac, \.mp3"):
        save_audio(tmp_path / "out.aiff", tone(0.1, 16000), 16000)


def test_module_does_not_import_torch():
    code = "import sys, studio.audio_io; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"
