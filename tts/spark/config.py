"""Spark-TTS configuration, rebuilt from the checkpoint's own files.

A `Spark-TTS-0.5B/` directory holds (as published):

    config.yaml                      sample_rate, ref_segment_duration, latent_hop_length, volume_normalize
    BiCodec/config.yaml              key `audio_tokenizer`: mel_params, encoder, decoder, quantizer,
                                     speaker_encoder, prenet, postnet
    BiCodec/model.safetensors
    LLM/config.json (+ tokenizer, model.safetensors)   a Qwen2 causal LM
    wav2vec2-large-xlsr-53/          config.json, preprocessor_config.json, pytorch_model.bin

Every network here is built from these dataclasses, so the tiny demo checkpoint (same files, tiny
sizes) runs through exactly the same code as the published one. Keys that upstream hard-codes
(ECAPA-TDNN width, bottlenecks) have optional keys here whose defaults are upstream's values; the
published yaml never carries them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: Audio in and out of Spark-TTS (BiCodec and wav2vec2 both run at 16 kHz).
SAMPLE_RATE = 16000
#: Semantic tokens per second: wav2vec2's conv stack strides 5*2*2*2*2*2*2 = 320 samples.
TOKENS_PER_SECOND = 50
#: Samples the BiCodec wave generator emits per semantic token: 16000 / 50 (its rates 8*5*4*2).
SAMPLES_PER_TOKEN = SAMPLE_RATE // TOKENS_PER_SECOND
#: Global (speaker) tokens per utterance: the perceiver resampler's latents.
GLOBAL_TOKENS = 32
#: Global token vocabulary: residual FSQ with levels [4]*6 -> 4**6 codes.
GLOBAL_CODEBOOK = 4096
#: Semantic token vocabulary: the factorized VQ codebook.
SEMANTIC_CODEBOOK = 8192
#: wav2vec2 hidden states averaged into BiCodec's encoder input (upstream: layers 11, 14, 16).
WAV2VEC2_LAYERS = (11, 14, 16)

# Upstream hard-codes these inside its modules (ECAPA_TDNN_GLOB_c512, SE/ASTP bottlenecks,
# PerceiverResampler defaults); they are config fields here only so the demo can shrink them.
ECAPA_CHANNELS = 512
SE_BOTTLENECK = 128
ASTP_BOTTLENECK = 128
PERCEIVER_DEPTH = 2
PERCEIVER_HEADS = 8
PERCEIVER_DIM_HEAD = 64
PERCEIVER_FF_MULT = 4


def _pick(cls, raw: dict[str, Any], where: str):
    """Build dataclass `cls` from the keys it knows in `raw`; a missing required key is an error."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(raw).__name__}")
    names = {f.name for f in cls.__dataclass_fields__.values()}
    kwargs = {k: v for k, v in raw.items() if k in names}
    try:
        obj = cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"{where}: {exc}") from exc
    return obj


def _tuple(v) -> tuple:
    return tuple(v) if v is not None else ()


@dataclass(frozen=True)
class SparkTopConfig:
    """Top-level `config.yaml`: how a reference clip is prepared."""

    sample_rate: int = SAMPLE_RATE
    ref_segment_duration: float = 6.0  # seconds of reference the speaker encoder sees (tiled if shorter)
    latent_hop_length: int = SAMPLES_PER_TOKEN  # samples per semantic token
    volume_normalize: bool = True  # the CLI normalises the reference's loudness before tokenizing

    @property
    def ref_segment_samples(self) -> int:
        """Reference samples for the global tokens: 6 s floored to a multiple of the hop (96000)."""
        return int(self.sample_rate * self.ref_segment_duration) // self.latent_hop_length * self.latent_hop_length


@dataclass(frozen=True)
class MelParams:
    """`mel_params`: torchaudio MelSpectrogram settings of the speaker-encoder input."""

    sample_rate: int = SAMPLE_RATE
    n_fft: int = 1024
    win_length: int = 640
    hop_length: int = 320
    mel_fmin: float = 10.0
    mel_fmax: float | None = None  # None = sample_rate / 2
    num_mels: int = 128


@dataclass(frozen=True)
class FeatEncoderConfig:
    """`encoder`: wav2vec2 features -> BiCodec latent (Vocos backbone + sampling blocks)."""

    input_channels: int
    vocos_dim: int
    vocos_intermediate_dim: int
    vocos_num_layers: int
    out_channels: int
    sample_ratios: tuple[int, ...] = (1, 1)

    def __post_init__(self):
        object.__setattr__(self, "sample_ratios", _tuple(self.sample_ratios))


@dataclass(frozen=True)
class FeatDecoderConfig:
    """`prenet` / `postnet`: Vocos-backbone decoders; the prenet is conditioned on the d-vector."""

    input_channels: int
    vocos_dim: int
    vocos_intermediate_dim: int
    vocos_num_layers: int
    out_channels: int
    condition_dim: int | None = None
    sample_ratios: tuple[int, ...] = (1, 1)
    use_tanh_at_final: bool = False

    def __post_init__(self):
        object.__setattr__(self, "sample_ratios", _tuple(self.sample_ratios))


@dataclass(frozen=True)
class WaveGeneratorConfig:
    """`decoder`: the DAC-style wave generator; its rates multiply to the samples per token."""

    input_channel: int
    channels: int
    rates: tuple[int, ...]
    kernel_sizes: tuple[int, ...]
    d_out: int = 1

    def __post_init__(self):
        object.__setattr__(self, "rates", _tuple(self.rates))
        object.__setattr__(self, "kernel_sizes", _tuple(self.kernel_sizes))
        if len(self.rates) != len(self.kernel_sizes):
            raise ValueError(f"decoder: rates {self.rates} and kernel_sizes {self.kernel_sizes} differ in length")
        if self.channels % (2 ** len(self.rates)):
            raise ValueError(f"decoder: channels {self.channels} must be divisible by 2**{len(self.rates)}")

    @property
    def hop(self) -> int:
        out = 1
        for r in self.rates:
            out *= r
        return out


@dataclass(frozen=True)
class QuantizerConfig:
    """`quantizer`: factorized VQ of the semantic stream (cosine-similarity codebook lookup)."""

    input_dim: int
    codebook_size: int
    codebook_dim: int


@dataclass(frozen=True)
class SpeakerEncoderConfig:
    """`speaker_encoder`: ECAPA-TDNN -> perceiver resampler -> residual FSQ -> global tokens."""

    input_dim: int  # mel bins
    out_dim: int  # d-vector size
    latent_dim: int
    token_num: int = GLOBAL_TOKENS
    fsq_levels: tuple[int, ...] = (4, 4, 4, 4, 4, 4)
    fsq_num_quantizers: int = 1
    # Not in the published yaml (upstream hard-codes them); the demo checkpoint shrinks them.
    ecapa_channels: int = ECAPA_CHANNELS
    se_bottleneck: int = SE_BOTTLENECK
    astp_bottleneck: int = ASTP_BOTTLENECK
    perceiver_depth: int = PERCEIVER_DEPTH
    perceiver_heads: int = PERCEIVER_HEADS
    perceiver_dim_head: int = PERCEIVER_DIM_HEAD
    perceiver_ff_mult: int = PERCEIVER_FF_MULT

    def __post_init__(self):
        object.__setattr__(self, "fsq_levels", _tuple(self.fsq_levels))
        if self.ecapa_channels % 8:
            raise ValueError(f"speaker_encoder: ecapa_channels {self.ecapa_channels} must be divisible by 8 (Res2 scale)")

    @property
    def codebook_size(self) -> int:
        out = 1
        for level in self.fsq_levels:
            out *= level
        return out


@dataclass(frozen=True)
class BiCodecConfig:
    """`BiCodec/config.yaml`, key `audio_tokenizer`."""

    mel_params: MelParams
    encoder: FeatEncoderConfig
    decoder: WaveGeneratorConfig
    quantizer: QuantizerConfig
    speaker_encoder: SpeakerEncoderConfig
    prenet: FeatDecoderConfig
    postnet: FeatDecoderConfig

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "BiCodecConfig":
        """From the `audio_tokenizer` mapping (unknown keys, e.g. training settings, are ignored)."""
        parts = {"mel_params": MelParams, "encoder": FeatEncoderConfig, "decoder": WaveGeneratorConfig,
                 "quantizer": QuantizerConfig, "speaker_encoder": SpeakerEncoderConfig,
                 "prenet": FeatDecoderConfig, "postnet": FeatDecoderConfig}
        missing = [k for k in parts if k not in raw]
        if missing:
            raise ValueError(f"BiCodec config lacks {missing} under `audio_tokenizer`")
        cfg = cls(**{k: _pick(c, raw[k], f"BiCodec config `{k}`") for k, c in parts.items()})
        cfg.check()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping (tuples as lists) for writing a yaml."""
        def plain(v):
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            if isinstance(v, (tuple, list)):
                return [plain(x) for x in v]
            return v
        return plain(asdict(self))

    def check(self) -> None:
        """Cross-part consistency, so a bad config fails at load time with a clear message."""
        if self.quantizer.input_dim != self.encoder.out_channels:
            raise ValueError("BiCodec config: quantizer.input_dim must equal encoder.out_channels")
        if self.prenet.input_channels != self.quantizer.input_dim:
            raise ValueError("BiCodec config: prenet.input_channels must equal quantizer.input_dim")
        if self.prenet.condition_dim != self.speaker_encoder.out_dim:
            raise ValueError("BiCodec config: prenet.condition_dim must equal speaker_encoder.out_dim")
        if self.prenet.out_channels != self.speaker_encoder.out_dim or \
                self.decoder.input_channel != self.prenet.out_channels:
            raise ValueError("BiCodec config: prenet.out_channels, speaker_encoder.out_dim and "
                             "decoder.input_channel must be equal (the d-vector is added to the prenet output)")
        if self.speaker_encoder.input_dim != self.mel_params.num_mels:
            raise ValueError("BiCodec config: speaker_encoder.input_dim must equal mel_params.num_mels")


@dataclass(frozen=True)
class SparkConfig:
    """Everything read from one `Spark-TTS-0.5B/` directory."""

    model_dir: Path
    top: SparkTopConfig
    bicodec: BiCodecConfig
    llm: Any = field(repr=False)  # transformers.Qwen2Config

    @property
    def llm_dir(self) -> Path:
        return self.model_dir / "LLM"

    @property
    def bicodec_dir(self) -> Path:
        return self.model_dir / "BiCodec"

    @property
    def wav2vec2_dir(self) -> Path:
        return self.model_dir / "wav2vec2-large-xlsr-53"


REQUIRED_FILES = (
    "config.yaml",
    "BiCodec/config.yaml",
    "BiCodec/model.safetensors",
    "LLM/config.json",
    "LLM/tokenizer.json",
    "wav2vec2-large-xlsr-53/config.json",
    "wav2vec2-large-xlsr-53/preprocessor_config.json",
)


def _read_yaml(path: Path) -> dict:
    import yaml

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a yaml mapping")
    return data


def load_top_config(model_dir: Path) -> SparkTopConfig:
    return _pick(SparkTopConfig, _read_yaml(Path(model_dir) / "config.yaml"), f"{model_dir}/config.yaml")


def load_bicodec_config(bicodec_dir: Path) -> BiCodecConfig:
    raw = _read_yaml(Path(bicodec_dir) / "config.yaml")
    if "audio_tokenizer" not in raw:
        raise ValueError(f"{bicodec_dir}/config.yaml has no `audio_tokenizer` key")
    return BiCodecConfig.from_dict(raw["audio_tokenizer"])


def load_llm_config(llm_dir: Path):
    """The LLM's `config.json` through transformers' Qwen2Config (refuses other architectures)."""
    from transformers import Qwen2Config

    cfg = Qwen2Config.from_pretrained(str(llm_dir))
    if cfg.model_type != "qwen2":
        raise ValueError(f"{llm_dir}/config.json is a {cfg.model_type!r} model; Spark-TTS uses qwen2")
    if getattr(cfg, "use_sliding_window", False):
        raise ValueError(f"{llm_dir}/config.json enables sliding-window attention, which this decoder does not do")
    return cfg


def load_spark_config(model_dir: str | Path) -> SparkConfig:
    """Read a `Spark-TTS-0.5B/` directory's configs; names every missing file at once."""
    model_dir = Path(model_dir).expanduser()
    missing = [f for f in REQUIRED_FILES if not (model_dir / f).is_file()]
    if missing:
        raise ValueError(f"{model_dir} is not a complete Spark-TTS-0.5B directory; missing: {', '.join(missing)}")
    top = load_top_config(model_dir)
    if top.sample_rate != SAMPLE_RATE:
        raise ValueError(f"{model_dir}/config.yaml: sample_rate {top.sample_rate}; this code expects {SAMPLE_RATE}")
    bicodec = load_bicodec_config(model_dir / "BiCodec")
    if bicodec.decoder.hop != top.latent_hop_length:
        raise ValueError(f"BiCodec decoder upsamples by {bicodec.decoder.hop} but config.yaml says "
                         f"latent_hop_length {top.latent_hop_length}")
    return SparkConfig(model_dir=model_dir, top=top, bicodec=bicodec, llm=load_llm_config(model_dir / "LLM"))

