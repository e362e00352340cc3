"""Audio file input and output for the studio: any common format in, mono float32 at a model's rate.

numpy + soundfile (libsndfile) + scipy; no torch. Reading goes through libsndfile, so what it
reads is what the studio accepts: WAV (PCM/float/RF64/W64), FLAC, OGG (Vorbis/Opus), MP3 (with
libsndfile >= 1.1, which the soundfile wheels bundle), AIFF, CAF and others. Problems a person can
fix (missing file, not audio, truncated or corrupt file, no samples) raise `AudioInputError`,
a ValueError whose message names the file and the problem.
"""

from __future__ import annotations

import io
import struct
from math import gcd
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

#: Output formats: name -> (libsndfile format, subtype). 16-bit PCM plays everywhere and is
#: plenty for 16/24 kHz speech; MP3 via libsndfile's LAME encoder.
OUTPUT_FORMATS = {
    "wav": ("WAV", "PCM_16"),
    "flac": ("FLAC", "PCM_16"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
}
#: Rates an MPEG-1/2/2.5 layer III stream can carry.
MP3_SAMPLE_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
#: A decoder that delivers less than the header announced by more than this fraction (and more
#: than TRUNCATION_MIN_S) was cut short. Loose on purpose: MP3 lengths without a Xing header are
#: estimates.
TRUNCATION_TOLERANCE = 0.10
TRUNCATION_MIN_S = 0.1
#: Leading bytes of formats libsndfile reads: such a file that fails to open is damaged, any
#: other file is not audio at all.
AUDIO_MAGIC = (b"RIFF", b"RIFX", b"RF64", b"BW64", b"fLaC", b"OggS", b"FORM", b"ID3", b"caff", b".snd",
               b"riff")


class AudioInputError(ValueError):
    """An audio input the studio cannot use; the message says which file and why."""


# --- reading ---------------------------------------------------------------------------------------
def load_audio(src: str | Path | bytes, target_sr: int) -> np.ndarray:
    """Read an audio file (path or its bytes) as mono float32 [N] in [-1, 1] at `target_sr` Hz.

    Channels are averaged; integer PCM is scaled to [-1, 1]; the rate is converted with a
    polyphase filter (scipy `resample_poly`, ratio reduced by the gcd).
    """
    name, data = _read_source(src)
    if not data:
        raise AudioInputError(f"{name} is empty (0 bytes)")
    _check_wav_header(name, data)
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            sr, announced = f.samplerate, f.frames
            wav = f.read(dtype="float32", always_2d=True)
    except sf.LibsndfileError as exc:
        raise AudioInputError(_decode_failure(name, data, exc.error_string)) from None
    except (RuntimeError, TypeError) as exc:  # soundfile raises these for odd headers, e.g. 0 channels
        raise AudioInputError(_decode_failure(name, data, str(exc))) from None
    if wav.shape[0] == 0:
        raise AudioInputError(f"{name} holds no audio samples (0 frames at {sr} Hz)")
    shortfall = announced - wav.shape[0]
    if announced > 0 and shortfall > TRUNCATION_TOLERANCE * announced and shortfall > TRUNCATION_MIN_S * sr:
        raise AudioInputError(f"{name} is truncated: its header announces {announced / sr:.2f} s of audio but only "
                              f"{wav.shape[0] / sr:.2f} s could be decoded (an interrupted upload or copy?)")
    return resample(to_mono(wav), sr, target_sr)


def to_mono(wav: np.ndarray) -> np.ndarray:
    """[N] or [N, C] (channels last) -> mono float32 [N], the channel average."""
    wav = np.asarray(wav)
    if wav.ndim == 2:
        wav = wav.mean(axis=1)
    elif wav.ndim != 1:
        raise AudioInputError(f"expected audio shaped [samples] or [samples, channels], got {wav.shape}")
    return np.ascontiguousarray(wav, dtype=np.float32)


def resample(wav: np.ndarray, sr: int, target_sr: int) -> np.ndarray:
    """Mono [N] at `sr` Hz -> float32 [round(N * target_sr / sr)] at `target_sr` Hz (polyphase)."""
    sr, target_sr = int(sr), int(target_sr)
    if sr <= 0 or target_sr <= 0:
        raise AudioInputError(f"sample rates must be positive, got {sr} -> {target_sr} Hz")
    wav = np.asarray(wav, dtype=np.float32)
    if sr == target_sr or wav.size == 0:
        return np.ascontiguousarray(wav)
    g = gcd(sr, target_sr)
    out = resample_poly(wav, target_sr // g, sr // g)
    return np.ascontiguousarray(out, dtype=np.float32)


def prepare_array(data: np.ndarray, sr: int, target_sr: int) -> np.ndarray:
    """An in-memory recording (e.g. Gradio's `(sr, array)`) -> mono float32 [N] at `target_sr`.

    data: [N] or [N, C] (or [C, N] with C <= 8); signed integer PCM and unsigned (offset binary,
    e.g. uint8) are scaled to [-1, 1], floats are taken as they are.
    """
    arr = np.asarray(data)
    if arr.size == 0:
        raise AudioInputError("the recording is empty (0 samples)")
    if arr.ndim == 2 and arr.shape[0] < arr.shape[1] and arr.shape[0] <= 8:
        arr = arr.T  # channels first -> channels last
    if np.issubdtype(arr.dtype, np.unsignedinteger):  # offset binary, e.g. 8-bit WAV
        half = float(np.iinfo(arr.dtype).max // 2 + 1)
        arr = (arr.astype(np.float64) - half) / half
    elif np.issubdtype(arr.dtype, np.integer):
        arr = arr.astype(np.float32) / float(-np.iinfo(arr.dtype).min)
    elif not np.issubdtype(arr.dtype, np.floating):
        raise AudioInputError(f"the recording must hold numbers, got dtype {arr.dtype}")
    return resample(to_mono(arr), sr, target_sr)


def _read_source(src) -> tuple[str, bytes]:
    """(a name for messages, the file's bytes)."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return "the uploaded audio", bytes(src)
    if not isinstance(src, (str, Path)):
        raise AudioInputError(f"audio must be a file path or bytes, got {type(src).__name__}")
    path = Path(src).expanduser()
    if not path.exists():
        raise AudioInputError(f"audio file not found: {path}")
    if not path.is_file():
        raise AudioInputError(f"{path} is not a file")
    try:
        return f"audio file {path}", path.read_bytes()
    except OSError as exc:
        raise AudioInputError(f"cannot read audio file {path}: {exc.strerror or exc}") from None


def _check_wav_header(name: str, data: bytes) -> None:
    """Refuse a RIFF/WAVE file whose `data` chunk claims more bytes than the file holds.

    libsndfile quietly reads such a file up to its end, which would hide a cut-off upload.
    Placeholder sizes written by streaming recorders (0 or 0xFFFFFFFF) are accepted.
    """
    if len(data) < 12 or data[:4] not in (b"RIFF", b"RIFX") or data[8:12] != b"WAVE":
        return
    endian = "<" if data[:4] == b"RIFF" else ">"
    block_align, rate, pos = 0, 0, 12
    while pos + 8 <= len(data):
        chunk_id = data[pos:pos + 4]
        (size,) = struct.unpack(endian + "I", data[pos + 4:pos + 8])
        body = pos + 8
        if chunk_id == b"fmt " and body + 14 <= len(data):
            _, _, rate, _, block_align = struct.unpack(endian + "HHIIH", data[body:body + 14])
        if chunk_id == b"data":
            available = len(data) - body
            if size in (0, 0xFFFFFFFF) or size <= available:
                return
            if block_align and rate:
                want, have = size / block_align / rate, available / block_align / rate
                detail = f"its header announces {want:.2f} s of audio but the file holds only {have:.2f} s"
            else:
                detail = f"its header announces {size} bytes of audio but the file holds only {available}"
            raise AudioInputError(f"{name} is a truncated WAV file: {detail} (an interrupted upload or copy?)")
        pos = body + size + (size & 1)  # chunks are padded to an even length


def _decode_failure(name: str, data: bytes, reason: str) -> str:
    reason = (reason or "unknown error").strip().rstrip(".")
    head = data[:4]
    looks_like_audio = head in AUDIO_MAGIC or data[:3] == b"ID3" or (
        len(data) >= 2 and data[0] == 0xFF and (data[1] & 0xE0) == 0xE0)  # an MPEG audio frame sync
    if looks_like_audio:
        return f"{name} looks like audio but cannot be decoded; it is damaged or truncated ({reason})"
    return (f"{name} is not an audio file that can be read ({reason}); use WAV, FLAC, OGG or MP3 "
            f"(libsndfile {sf.__libsndfile_version__})")


# --- writing ---------------------------------------------------------------------------------------
def mp3_supported() -> bool:
    """Whether this libsndfile can write MP3 (1.1.0 and later, built with LAME)."""
    return "MP3" in sf.available_formats()


def encode_audio(wav: np.ndarray, sr: int, fmt: str = "wav") -> bytes:
    """Mono float [N] at `sr` Hz -> the bytes of a `fmt` ('wav', 'flac' or 'mp3') file, 16-bit.

    Samples are clipped to [-1, 1] first (libsndfile would wrap them around otherwise).
    """
    key = fmt.lower().lstrip(".")
    if key not in OUTPUT_FORMATS:
        raise ValueError(f"cannot write audio as {fmt!r}; choose one of {', '.join(OUTPUT_FORMATS)}")
    major, subtype = OUTPUT_FORMATS[key]
    if key == "mp3":
        if not mp3_supported():
            raise ValueError(f"this libsndfile ({sf.__libsndfile_version__}) cannot write MP3 (it needs 1.1 "
                             f"or later with LAME); save as .wav or .flac instead")
        if int(sr) not in MP3_SAMPLE_RATES:
            raise ValueError(f"MP3 cannot carry {sr} Hz audio; it supports {MP3_SAMPLE_RATES} Hz")
    arr = np.asarray(wav, dtype=np.float32)
    if arr.ndim != 1:
        raise ValueError(f"expected a mono waveform [samples], got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("there is no audio to write (0 samples)")
    buf = io.BytesIO()
    sf.write(buf, np.clip(arr, -1.0, 1.0), int(sr), format=major, subtype=subtype)
    return buf.getvalue()


def save_audio(path: str | Path, wav: np.ndarray, sr: int) -> Path:
    """Write mono [N] at `sr` Hz to `path`; the format comes from its suffix (.wav, .flac, .mp3)."""
    path = Path(path).expanduser()
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"cannot tell the audio format from {path.name!r}; end the name with "
                         f"{', '.join('.' + k for k in OUTPUT_FORMATS)}")
    data = encode_audio(wav, sr, fmt)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
