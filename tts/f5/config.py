"""F5-TTS DiT architecture config.

The published checkpoints carry no architecture description, so the config comes from the
model name (the four upstream `configs/*.yaml` "arch" blocks, restated below), or from a
`config.json` written beside a custom or tiny checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class F5Config:
    """Shape of one DiT. Field names follow upstream's `DiT(...)` keyword arguments."""

    dim: int  # transformer width
    depth: int  # number of DiT blocks
    heads: int  # attention heads; inner attention width = heads * dim_head
    dim_head: int = 64  # width of one attention head (the RoPE dimension)
    ff_mult: int = 2  # feed-forward hidden width = dim * ff_mult
    text_dim: int = 512  # width of the text embedding and its ConvNeXtV2 blocks
    conv_layers: int = 4  # ConvNeXtV2 blocks on the text embedding
    mel_dim: int = 100  # mel channels (vocos mel: 100)
    text_num_embeds: int = 2545  # vocab size (lines of vocab.txt); the table has one more row (filler id 0)
    text_mask_padding: bool = True  # v1: filler/padding text positions are zeroed around each text block
    pe_attn_head: int | None = None  # None: RoPE on all heads; v0 (F5TTS_Base): 1 = first head only
    qk_norm: str | None = None  # None or "rms_norm" (per-head RMSNorm on q and k)

    def __post_init__(self) -> None:
        if min(self.dim, self.depth, self.heads, self.dim_head, self.ff_mult, self.text_dim, self.mel_dim,
               self.text_num_embeds) <= 0:
            raise ValueError(f"F5Config sizes must be positive: {self}")
        if self.dim_head % 2:
            raise ValueError(f"dim_head must be even for rotary embeddings; got {self.dim_head}")
        if self.text_dim % 2:
            raise ValueError(f"text_dim must be even for the sinusoidal text positions; got {self.text_dim}")
        if self.conv_layers < 0:
            raise ValueError(f"conv_layers must be >= 0; got {self.conv_layers}")
        if self.pe_attn_head is not None and not 1 <= self.pe_attn_head <= self.heads:
            raise ValueError(f"pe_attn_head must be None or 1..heads ({self.heads}); got {self.pe_attn_head}")
        if self.qk_norm not in (None, "rms_norm"):
            raise ValueError(f"qk_norm must be None or 'rms_norm'; got {self.qk_norm!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "F5Config":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown F5Config keys {unknown}; known keys: {sorted(known)}")
        missing = sorted(f.name for f in fields(cls) if f.name in ("dim", "depth", "heads") and f.name not in d)
        if missing:
            raise ValueError(f"F5Config needs keys {missing}")
        return cls(**d)


# From upstream src/f5_tts/configs/<name>.yaml, model.arch (dim_head, mel_dim and the vocab size are
# not in the yaml: DiT's default dim_head 64, 100 mels, text_num_embeds from vocab.txt).
MODEL_CONFIGS: dict[str, F5Config] = {
    "F5TTS_v1_Base": F5Config(dim=1024, depth=22, heads=16, text_mask_padding=True, pe_attn_head=None),
    "F5TTS_Base": F5Config(dim=1024, depth=22, heads=16, text_mask_padding=False, pe_attn_head=1),
    "F5TTS_v1_Small": F5Config(dim=768, depth=18, heads=12, text_mask_padding=True, pe_attn_head=None),
    "F5TTS_Small": F5Config(dim=768, depth=18, heads=12, text_mask_padding=False, pe_attn_head=1),
}


def load_config(model_name: str, ckpt_dir: Path | None = None, vocab_size: int | None = None) -> F5Config:
    """The DiT config for a checkpoint.

    A `config.json` in `ckpt_dir` wins (custom and tiny checkpoints); otherwise the named
    upstream config. `vocab_size` (lines in vocab.txt) overrides `text_num_embeds`.
    """
    path = Path(ckpt_dir) / CONFIG_FILE if ckpt_dir is not None else None
    if path is not None and path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object of F5Config fields")
        try:
            cfg = F5Config.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from exc
    elif model_name in MODEL_CONFIGS:
        cfg = MODEL_CONFIGS[model_name]
    else:
        raise ValueError(f"unknown F5 model name {model_name!r}; known: {sorted(MODEL_CONFIGS)} "
                         f"(or put a {CONFIG_FILE} beside a custom checkpoint)")
    if vocab_size is not None:
        cfg = replace(cfg, text_num_embeds=int(vocab_size))
    return cfg
