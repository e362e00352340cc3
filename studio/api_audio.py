"""Encoding generated speech for the HTTP API, with maintained libraries (PyAV for streams, soundfile).

OpenAI's `response_format`s: `mp3` (MPEG layer III, LAME), `opus` (Ogg Opus, libopus), `aac` (ADTS
AAC, FFmpeg's encoder), `flac`, `wav` (16-bit PCM) and `pcm` (raw 24 kHz signed 16-bit little-endian
mono, resampled from the model's rate). `AudioEncoder` turns mono float32 chunks into one byte
stream as they arrive, so a streamed response starts with the first chunk; `encode_whole` makes a
finished file (wav and flac through libsndfile, whose headers carry the exact length).

Lengths after decoding: wav, flac and pcm hold exactly the generated samples (pcm at 24 kHz); mp3
and aac add the codec's priming and frame padding (measured: mp3 0.054 s, aac 0.062 s at 24 kHz; at
Spark's 16 kHz mp3 0.078 s and aac 0.126 s, since ADTS cannot say how many samples to drop); opus
always decodes at 48 kHz and its Ogg pre-skip and end trimming keep the length.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

#: OpenAI's raw `pcm`: 24 kHz, signed 16-bit little-endian, mono, no header.
PCM_SAMPLE_RATE = 24000
#: An Opus decoder always outputs 48 kHz, whatever rate went into the encoder.
OPUS_DECODE_RATE = 48000
#: Rates libopus takes as input; anything else is resampled to 48 kHz first.
OPUS_INPUT_RATES = (8000, 12000, 16000, 24000, 48000)
#: Ogg pages are cut at least this often (microseconds) so a streamed opus response is not held
#: back for FFmpeg's default one second per page.
OGG_PAGE_DURATION_US = 100_000


@dataclass(frozen=True)
class AudioFormat:
    name: str
    container: str | None   # FFmpeg muxer; None: raw samples
    codec: str | None       # FFmpeg encoder
    media_type: str
    exact_length: bool      # decodes to exactly the generated samples (no codec priming or padding)

    def output_rate(self, model_rate: int) -> int:
        """The rate a decoder reports for this format, given the model's rate."""
        if self.name == "pcm":
            return PCM_SAMPLE_RATE
        if self.name == "opus":
            return OPUS_DECODE_RATE
        return int(model_rate)


FORMATS = {
    "mp3": AudioFormat("mp3", "mp3", "libmp3lame", "audio/mpeg", False),
    "opus": AudioFormat("opus", "ogg", "libopus", "audio/ogg", True),
    "aac": AudioFormat("aac", "adts", "aac", "audio/aac", False),
    "flac": AudioFormat("flac", "flac", "flac", "audio/flac", True),
    "wav": AudioFormat("wav", "wav", "pcm_s16le", "audio/wav", True),
    "pcm": AudioFormat("pcm", None, None, "audio/pcm", True),
}


class _Sink:
    """A write-only file for PyAV: collects what the muxer writes until it is drained. Having no
    seek() makes FFmpeg treat it as a pipe, so muxers write streamable output (no header rewrites)."""

    def __init__(self):
        self._parts: list[bytes] = []

    def write(self, data) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def drain(self) -> bytes:
        out = b"".join(self._parts)
        self._parts.clear()
        return out


class AudioEncoder:
    """Mono float32 chunks at `sample_rate` -> the bytes of one `fmt` stream, as they are produced.

        enc = AudioEncoder("mp3", 24000)
        data = enc.encode(chunk)   # possibly b"" while the codec fills a frame
        tail = enc.finish()        # flushes the codec and closes the container
    """

    def __init__(self, fmt: str, sample_rate: int):
        import av

        if fmt not in FORMATS:
            raise ValueError(f"unknown audio format {fmt!r}; choose one of {', '.join(FORMATS)}")
        self.format = FORMATS[fmt]
        self.sample_rate = int(sample_rate)
        self._av = av
        self._sink = _Sink()
        self._container = None
        self._stream = None
        self._finished = False
        if self.format.container is None:  # raw pcm: only the resampler to 24 kHz s16
            self._resampler = av.AudioResampler(format="s16", layout="mono", rate=PCM_SAMPLE_RATE)
            return
        rate = self.sample_rate
        options = {"flush_packets": "1"}  # hand every packet to the sink at once (streaming)
        if self.format.name == "opus":
            options["page_duration"] = str(OGG_PAGE_DURATION_US)
            if rate not in OPUS_INPUT_RATES:
                rate = OPUS_DECODE_RATE
        self._container = av.open(self._sink, mode="w", format=self.format.container, options=options)
        self._stream = self._container.add_stream(self.format.codec, rate=rate, layout="mono")
        # The encoder's own sample format (s32p for LAME, fltp for AAC, s16 for the rest).
        self._resampler = av.AudioResampler(format=self._stream.codec_context.format.name, layout="mono", rate=rate)

    def encode(self, samples: np.ndarray) -> bytes:
        """Feed the next samples (float, mono, [-1, 1]; louder samples are clipped); returns new bytes."""
        if self._finished:
            raise RuntimeError("this AudioEncoder is finished")
        arr = np.clip(np.asarray(samples, dtype=np.float32).reshape(-1), -1.0, 1.0)
        if arr.size == 0:
            return self._sink.drain()
        frame = self._av.AudioFrame.from_ndarray(np.ascontiguousarray(arr.reshape(1, -1)), format="flt",
                                                 layout="mono")
        frame.sample_rate = self.sample_rate
        for out in self._resampler.resample(frame):
            self._write(out)
        return self._sink.drain()

    def finish(self) -> bytes:
        """Flush the resampler and the codec and close the container; returns the last bytes."""
        if self._finished:
            return b""
        self._finished = True
        for out in self._resampler.resample(None):
            self._write(out)
        if self._stream is not None:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
            self._container.close()
        return self._sink.drain()

    def _write(self, frame) -> None:
        if self._stream is None:
            self._sink.write(frame.to_ndarray().astype("<i2", copy=False).tobytes())
            return
        frame.pts = None  # let the encoder number the samples itself
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def close(self) -> None:
        """Release the container without flushing (a stream the client left)."""
        if not self._finished and self._container is not None:
            self._finished = True
            try:
                self._container.close()
            except Exception:  # noqa: BLE001 - closing a half-written stream must not raise
                pass


def encode_whole(wav: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """A finished generation as one `fmt` file. wav/flac through libsndfile (exact length in their
    headers), pcm as raw 24 kHz s16le (polyphase resampling, exactly round-up(N * 24000 / rate)
    samples), the compressed formats through PyAV."""
    import soundfile as sf

    from studio.audio_io import resample

    if fmt not in FORMATS:
        raise ValueError(f"unknown audio format {fmt!r}; choose one of {', '.join(FORMATS)}")
    arr = np.clip(np.asarray(wav, dtype=np.float32).reshape(-1), -1.0, 1.0)
    if fmt in ("wav", "flac"):
        buf = io.BytesIO()
        sf.write(buf, arr, int(sample_rate), format=fmt.upper(), subtype="PCM_16")
        return buf.getvalue()
    if fmt == "pcm":
        buf = io.BytesIO()
        sf.write(buf, np.clip(resample(arr, sample_rate, PCM_SAMPLE_RATE), -1.0, 1.0), PCM_SAMPLE_RATE,
                 format="RAW", subtype="PCM_16", endian="LITTLE")
        return buf.getvalue()
    enc = AudioEncoder(fmt, sample_rate)
    return enc.encode(arr) + enc.finish()


__all__ = ["FORMATS", "OPUS_DECODE_RATE", "PCM_SAMPLE_RATE", "AudioEncoder", "AudioFormat", "encode_whole"]
