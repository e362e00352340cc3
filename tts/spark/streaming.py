"""Token-chunk plan for vocoding semantic tokens while they are generated (upstream's Triton runtime).

The first chunk is vocoded as soon as 50 tokens (1 s) exist; each later chunk is `growth` times
longer, up to `max_tokens` (upstream: x8, capped at 30 s). A chunk starts with the last
`overlap_tokens` tokens of the previous one, vocoded twice, so the receiver can cross-fade the
`overlap_tokens * 320` overlapping samples linearly (`tts.audio.join_chunks`). When the generation
ends, the tokens left over (at least the overlap) form the final chunk. Joined, the chunks are
exactly `tokens * 320` samples long, the same as vocoding every token at once.

Offline synthesis uses the same machinery with `OFFLINE_PLAN`: one vocoder call for up to 30 s of
speech, and cross-faded 30 s windows beyond that (long multi-sentence texts).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tts.spark.config import TOKENS_PER_SECOND


@dataclass(frozen=True)
class ChunkPlan:
    first_tokens: int = TOKENS_PER_SECOND  # 1 s: upstream's audio_chunk_duration
    growth: float = 8.0  # upstream's audio_chunk_size_scale_factor
    max_tokens: int = 30 * TOKENS_PER_SECOND  # upstream's max_audio_chunk_duration (30 s)
    overlap_tokens: int = 5  # upstream's audio_chunk_overlap_duration (0.1 s)

    def __post_init__(self):
        if not 0 <= self.overlap_tokens < self.first_tokens <= self.max_tokens or self.growth < 1:
            raise ValueError(f"bad chunk plan {self}: need 0 <= overlap < first <= max and growth >= 1")


STREAM_PLAN = ChunkPlan()
OFFLINE_PLAN = ChunkPlan(first_tokens=30 * TOKENS_PER_SECOND, growth=1.0)


class TokenChunker:
    """Accumulates semantic tokens; hands out the token windows to vocode, in order."""

    def __init__(self, plan: ChunkPlan = STREAM_PLAN):
        self.plan = plan
        self.size = plan.first_tokens
        self.buffer: list[int] = []
        self.emitted = 0  # chunks handed out so far
        self.total = 0  # tokens pushed so far

    def overlap_for(self, index: int) -> int:
        """Tokens chunk `index` shares with the previous chunk (0 for the first)."""
        return 0 if index == 0 else self.plan.overlap_tokens

    def until_next(self) -> int:
        """Tokens still to push before the next window is complete."""
        return self.size - len(self.buffer)

    def push(self, tokens) -> list[np.ndarray]:
        """Add tokens; return the chunks that became complete (each int64 [n])."""
        self.buffer.extend(int(t) for t in tokens)
        self.total += len(tokens)
        out = []
        while len(self.buffer) >= self.size:
            out.append(np.asarray(self.buffer[:self.size], dtype=np.int64))
            self.buffer = self.buffer[self.size - self.plan.overlap_tokens:]
            self.size = min(self.plan.max_tokens, int(self.size * self.plan.growth))
            self.emitted += 1
        return out

    def flush(self) -> np.ndarray | None:
        """The final chunk (the leftover tokens), or None when nothing is left to vocode."""
        if not self.buffer:
            return None
        chunk = np.asarray(self.buffer, dtype=np.int64)
        self.buffer = []
        self.emitted += 1
        return chunk
