"""Spark-TTS request, options and results: plain data (no torch), shared by the pipeline and the engine."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tts.spark.prompts import check_voice

# Accepted option ranges; outside them a request is refused with a message naming the option.
TEMPERATURE_RANGE = (0.0, 5.0)
MAX_NEW_TOKENS_RANGE = (1, 8192)


@dataclass(frozen=True)
class SparkOptions:
    """Per-request generation options (upstream's defaults)."""

    temperature: float = 0.8  # 0 = greedy
    top_k: int = 50  # 1 = greedy; 0 = no top-k filter
    top_p: float = 0.95  # nucleus mass; 1.0 = no filter
    max_new_tokens: int = 3000  # per LLM call (one text segment); 3000 tokens = 60 s
    min_new_tokens: int = 0  # end tokens are ignored until this many exist (min = max = N: fixed length)
    seed: int | None = None  # None = random; the used seed is returned. Segment i samples with seed + i.
    use_prompt_cache: bool = True  # False re-tokenizes the reference (a cold prompt)
    volume_normalize: bool | None = None  # None = the checkpoint's config.yaml (true: as upstream's CLI)

    def validated(self) -> "SparkOptions":
        def bad(name, value, lo, hi):
            raise ValueError(f"{name} must be between {lo} and {hi}; got {value}")
        if not (math.isfinite(self.temperature) and TEMPERATURE_RANGE[0] <= self.temperature <= TEMPERATURE_RANGE[1]):
            bad("temperature", self.temperature, *TEMPERATURE_RANGE)
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p}")
        if int(self.top_k) < 0:
            raise ValueError(f"top_k must be >= 0 (1 = greedy, 0 = off); got {self.top_k}")
        if not MAX_NEW_TOKENS_RANGE[0] <= int(self.max_new_tokens) <= MAX_NEW_TOKENS_RANGE[1]:
            bad("max_new_tokens", self.max_new_tokens, *MAX_NEW_TOKENS_RANGE)
        if not 0 <= int(self.min_new_tokens) <= int(self.max_new_tokens):
            raise ValueError(f"min_new_tokens must be between 0 and max_new_tokens ({self.max_new_tokens}); "
                             f"got {self.min_new_tokens}")
        if self.seed is not None and not 0 <= int(self.seed) < 2 ** 63:
            raise ValueError(f"seed must be a non-negative 64-bit integer; got {self.seed}")
        return self


@dataclass(frozen=True, eq=False)
class SparkRequest:
    """One synthesis: voice cloning (reference_wav given) or voice creation (gender given)."""

    text: str
    reference_wav: Any = None  # float32 mono 16 kHz samples (numpy), or None for voice creation
    reference_text: str = ""  # transcript of the reference; empty = clone without it
    gender: str | None = None  # voice creation: female | male
    pitch_level: str | None = None  # very_low | low | moderate | high | very_high (default moderate)
    speed_level: str | None = None
    options: SparkOptions = field(default_factory=SparkOptions)
    streaming: bool = False  # chunks of 1 s, then 8 s, then 30 s (upstream's plan); else 30 s windows
    request_id: str | None = None

    @property
    def voice_creation(self) -> bool:
        return self.reference_wav is None

    def validated(self) -> "SparkRequest":
        """Cheap checks that need no model (the reference audio is checked when it is tokenized)."""
        if not isinstance(self.text, str) or not self.text.strip():
            raise ValueError("target_text is empty: give the text to speak")
        self.options.validated()
        if self.reference_wav is None:
            if self.gender is None:
                raise ValueError("give a reference clip to clone, or gender (and pitch_level, speed_level) "
                                 "to create a voice")
            check_voice(self.gender, self.pitch_level or "moderate", self.speed_level or "moderate")
        elif self.gender is not None or self.pitch_level is not None or self.speed_level is not None:
            raise ValueError("voice creation (gender, pitch_level, speed_level) takes no reference audio; "
                             "send one or the other")
        return self


@dataclass
class SparkChunk:
    """One piece of a request's audio, in order. Chunk i > 0 begins with `overlap_samples` samples
    that overlap the end of chunk i - 1 (cross-fade them: `tts.audio.join_chunks`)."""

    request_id: str
    index: int
    wav: np.ndarray  # float32 [n] at 16 kHz
    overlap_samples: int
    final: bool
    info: dict = field(default_factory=dict)


@dataclass
class SparkResult:
    """A whole request's joined audio and its final info."""

    wav: np.ndarray  # float32 [n] at 16 kHz
    info: dict
    chunks: list[SparkChunk] = field(default_factory=list)

    @property
    def sample_rate(self) -> int:
        return int(self.info.get("sample_rate", 16000))
