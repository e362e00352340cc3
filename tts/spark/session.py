"""One request's generation state: its segments, prompts, token routing, chunking and running info.

The scheduler drives it: `next_sequence()` gives the LLM call for the next text segment, `feed()`
routes each generated token (global tokens complete the voice in voice creation; semantic tokens go
to the chunker) and returns the token windows ready to vocode, `end_segment()` closes a segment,
`finish()` returns the last window. Nothing here touches a model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from tts.spark import prompts
from tts.spark.config import GLOBAL_TOKENS, SAMPLE_RATE
from tts.spark.decode import SamplingParams, Sequence
from tts.spark.request import SparkChunk, SparkRequest
from tts.spark.streaming import OFFLINE_PLAN, STREAM_PLAN, TokenChunker
from tts.spark.tokenizer import SparkTokenizer


#: Voice creation whose LLM wrote no global tokens (never seen with the real weights; the demo LLM
#: does it) falls back to this token repeated: FSQ code 2730 = digits (2, 2, 2, 2, 2, 2), the
#: middle level of every dimension.
FALLBACK_GLOBAL_TOKEN = 2730


@dataclass
class ReferenceTokens:
    """A tokenized reference clip (what the prompt cache keeps)."""

    global_tokens: np.ndarray  # int64 [32]
    semantic_tokens: np.ndarray  # int64 [N], 50 per second
    seconds: float
    notes: list[str] = field(default_factory=list)
    cache_hit: bool = False


class RequestState:
    def __init__(self, request: SparkRequest, request_id: str, seed: int, segments: list[str],
                 tokenizer: SparkTokenizer, hop: int, reference: ReferenceTokens | None = None,
                 notes: list[str] | None = None, demo_weights: bool = False, started: float | None = None):
        self.request, self.request_id, self.seed = request, request_id, int(seed)
        self.segments, self.tokenizer, self.hop = segments, tokenizer, hop
        self.reference = reference
        self.notes = list(notes or [])
        self.demo_weights = demo_weights
        self.started = started if started is not None else time.perf_counter()
        self.creation = reference is None
        self.global_tokens = None if self.creation else np.asarray(reference.global_tokens, dtype=np.int64)
        self.ref_text = None if self.creation else (request.reference_text
                                                    if prompts.has_transcript(request.reference_text) else None)
        self.chunker = TokenChunker(STREAM_PLAN if request.streaming else OFFLINE_PLAN)
        self.segment = -1  # index of the segment being generated
        self.generated_globals: list[int] = []
        self.tokens = 0  # LLM tokens generated (end tokens excluded), all segments
        self.semantic_count = 0
        self.prompt_tokens = 0
        self.prefill_ms = 0.0
        self.head_misses = 0  # decode steps redrawn over the whole vocabulary (speech-head misses)
        self.decode_ms = 0.0
        self.prep_ms: float | None = None  # the pipeline's preparation (reference tokens, prompt), ms
        self.first_token_ms: float | None = None  # from `started` to the first generated token, ms
        self.chunk_index = 0
        self.cancelled = False
        self.done = False
        self.finish_reasons: list[str] = []

    # ---- LLM calls -------------------------------------------------------------------------------------------
    def sampling(self) -> SamplingParams:
        o = self.request.options
        return SamplingParams(temperature=float(o.temperature), top_k=int(o.top_k), top_p=float(o.top_p),
                              max_new_tokens=int(o.max_new_tokens), min_new_tokens=int(o.min_new_tokens))

    def prompt(self, index: int) -> str:
        text = self.segments[index]
        if self.global_tokens is None:  # voice creation, first segment: the LLM writes the voice
            r = self.request
            return prompts.creation_prompt(text, r.gender, r.pitch_level or "moderate", r.speed_level or "moderate")
        if self.creation:  # later segments keep the created voice, as a clone without transcript
            return prompts.clone_prompt(text, self.global_tokens)
        return prompts.clone_prompt(text, self.global_tokens, self.ref_text, self.reference.semantic_tokens)

    def next_sequence(self) -> Sequence | None:
        """The LLM call for the next segment, or None when every segment is done."""
        if self.cancelled or self.segment + 1 >= len(self.segments):
            return None
        self.segment += 1
        ids = self.tokenizer.encode(self.prompt(self.segment))
        self.prompt_tokens += len(ids)
        return Sequence(ids, self.sampling(), self.tokenizer.end_ids, self.seed + self.segment, tag=self,
                        tokens_due=self.tokens_to_first_chunk if self.request.streaming else None)

    def tokens_to_first_chunk(self) -> int | None:
        """Semantic tokens still to come before the first streamed chunk can be vocoded; None once
        it was handed out, or while a created voice's speaker tokens are still being written."""
        if self.chunker.emitted or self.global_tokens is None:
            return None
        return self.chunker.until_next()

    # ---- token routing ---------------------------------------------------------------------------------------
    def feed(self, token: int, seq: Sequence) -> list[np.ndarray]:
        """Route one generated token; returns semantic-token windows that are ready to vocode."""
        if seq.finished and seq.finish_reason == "end" and token in seq.end_ids:
            return []
        if self.first_token_ms is None:
            self.first_token_ms = (time.perf_counter() - self.started) * 1000
        self.tokens += 1
        tok = self.tokenizer
        if 0 <= token < len(tok.semantic_of) and tok.semantic_of[token] >= 0:
            self.semantic_count += 1
            s = int(tok.semantic_of[token])
            if self.global_tokens is None:  # the voice ends where the speech begins
                return self._complete_voice() + self.chunker.push([s])
            return self.chunker.push([s])
        if self.global_tokens is None and 0 <= token < len(tok.global_of) and tok.global_of[token] >= 0:
            self.generated_globals.append(int(tok.global_of[token]))
            if len(self.generated_globals) == GLOBAL_TOKENS:
                return self._voice_ready()
        return []

    def _voice_ready(self) -> list[np.ndarray]:
        self.global_tokens = np.asarray(self.generated_globals[:GLOBAL_TOKENS], dtype=np.int64)
        return []

    def end_segment(self, seq: Sequence) -> list[np.ndarray]:
        """A segment's LLM call finished; in voice creation the voice must be complete by now."""
        self.finish_reasons.append(seq.finish_reason)
        self.prefill_ms += seq.prefill_s * 1000
        self.head_misses += seq.head_misses
        if seq.finish_reason == "cache":
            self.notes.append(f"segment {self.segment + 1} stopped at the decoder's context limit")
        if self.global_tokens is not None:
            return []
        return self._complete_voice()

    def _complete_voice(self) -> list[np.ndarray]:
        """Fix the created voice from the global tokens written so far (32 normally)."""
        got = len(self.generated_globals)
        if got == 0:
            self.notes.append(f"the model wrote no speaker tokens; a fallback voice (global tokens "
                              f"{FALLBACK_GLOBAL_TOKEN}) was used")
            self.generated_globals = [FALLBACK_GLOBAL_TOKEN] * GLOBAL_TOKENS
        else:
            self.notes.append(f"the model wrote {got} of {GLOBAL_TOKENS} speaker tokens; they were repeated")
            self.generated_globals = [self.generated_globals[i % got] for i in range(GLOBAL_TOKENS)]
        return self._voice_ready()

    def finish(self) -> np.ndarray | None:
        """The last window (leftover tokens), or None."""
        return self.chunker.flush()

    # ---- responses -------------------------------------------------------------------------------------------
    def overlap_samples(self, index: int) -> int:
        return self.chunker.overlap_for(index) * self.hop

    def info(self, final: bool, overlap_samples: int, extra: dict | None = None) -> dict:
        since = time.perf_counter() - self.started
        wall = time.time()
        out = {
            "request_id": self.request_id, "sample_rate": SAMPLE_RATE, "seed": self.seed,
            "demo_weights": self.demo_weights, "compute_ms": round(since * 1000, 3),
            # wall clock: the engine began preparing / hands this chunk over (a client on the same
            # machine splits its latency with them: studio.bench.triton_path_ms)
            "engine_in_s": round(wall - since, 6), "engine_out_s": round(wall, 6),
            "chunk_index": self.chunk_index, "final": final, "overlap_samples": overlap_samples,
            "tokens": self.tokens, "semantic_tokens": self.semantic_count, "prompt_tokens": self.prompt_tokens,
            "prefill_ms": round(self.prefill_ms, 3), "decode_ms": round(self.decode_ms, 3),
            "segments": len(self.segments), "mode": "voice_creation" if self.creation else "voice_cloning",
            "streaming": bool(self.request.streaming), "notes": list(self.notes),
        }
        for key in ("prep_ms", "first_token_ms"):
            if getattr(self, key) is not None:
                out[key] = round(getattr(self, key), 3)
        if self.reference is not None:
            out.update(reference_s=round(self.reference.seconds, 3), prompt_cache_hit=self.reference.cache_hit,
                       reference_tokens=int(len(self.reference.semantic_tokens)))
        if final:
            out.update(finish_reasons=list(self.finish_reasons), head_misses=self.head_misses)
        if extra:
            out.update(extra)
        return out

    def chunk(self, wav: np.ndarray, final: bool, vocode_ms: float | None = None) -> SparkChunk:
        """Wrap the vocoded window number `chunk_index` (windows and chunks correspond one to one);
        vocode_ms: how long its vocoding took (reported in its info)."""
        overlap = self.overlap_samples(self.chunk_index) if len(wav) else 0
        extra = None if vocode_ms is None else {"vocode_ms": round(vocode_ms, 3)}
        c = SparkChunk(self.request_id, self.chunk_index, np.asarray(wav, dtype=np.float32), overlap, final,
                       self.info(final, overlap, extra))
        self.chunk_index += 1
        return c
