"""Spark-TTS inference pipeline: the loaded models, the prompt cache, request preparation, vocoding.

    pipe = SparkPipeline("…/Spark-TTS-0.5B", device="cuda")
    result = pipe.synthesize(SparkRequest("Hello there.", reference_wav=wav16k, reference_text="…"))
    for chunk in pipe.stream(SparkRequest(..., streaming=True)): ...

A request becomes a `RequestState` (`prepare`): the reference is checked, cut to 30 s, loudness
normalised (per config.yaml) and tokenized, or taken from the prompt cache (keyed by a hash of the
samples); the text is split into segments of at most ~20 s of speech (each one LLM call with the
same global tokens); the seed is fixed (random when absent). `synthesize` / `stream` run one
request alone through the same `Scheduler` the engine uses for many (`tts.spark.engine`).
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from tts.devices import bind_thread, resolve
from tts.spark.audio_tokenizer import SparkAudioTokenizer
from tts.spark.config import load_spark_config
from tts.spark.llm import load_llm
from tts.spark.reference import as_mono
from tts.spark.request import SparkChunk, SparkRequest, SparkResult
from tts.spark.session import ReferenceTokens, RequestState
from tts.spark.streaming import STREAM_PLAN
from tts.spark.text_split import MAX_SEGMENT_WEIGHT, split_text
from tts.spark.tokenizer import SparkTokenizer
from tts.spark.vocode_graphs import VOCODE_GRAPHS_ENV
from tts.switches import switch_from_env

PROMPT_CACHE_SIZE = 64
#: KV cache length per slot: a 30 s reference (1500 tokens) + text + markers, plus 3000 new tokens.
DEFAULT_MAX_SEQ_LEN = 5120
DEFAULT_MAX_BATCH = 16


def _join(chunks: list[np.ndarray], overlaps: list[int]) -> np.ndarray:
    from tts.audio import join_chunks

    return join_chunks(chunks, overlaps)


class PromptCache:
    """LRU of tokenized references, keyed by a hash of the samples and the loudness setting."""

    def __init__(self, size: int = PROMPT_CACHE_SIZE):
        self.size = size
        self._items: OrderedDict[str, ReferenceTokens] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(wav: np.ndarray, volume_normalize: bool) -> str:
        h = hashlib.sha256(np.ascontiguousarray(wav, dtype=np.float32).tobytes())
        h.update(b"vn1" if volume_normalize else b"vn0")
        return h.hexdigest()

    def get(self, key: str) -> ReferenceTokens | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: str, item: ReferenceTokens) -> None:
        with self._lock:
            self._items[key] = item
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class SparkPipeline:
    def __init__(self, model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 demo_weights: bool = False, max_batch_size: int = DEFAULT_MAX_BATCH,
                 max_seq_len: int = DEFAULT_MAX_SEQ_LEN, prompt_cache_size: int = PROMPT_CACHE_SIZE,
                 max_segment_weight: int = MAX_SEGMENT_WEIGHT, cuda_graphs: bool | None = None,
                 llm_transport=None):
        """llm_transport: None runs the LLM here (the torch runtime); else the `trtllm` runtime's
        transport to a TensorRT-LLM model (`tts.spark.trtllm`): the LLM is not loaded, and
        `new_batch` decodes through it. Everything else is the same code in both runtimes."""
        self.device = resolve(device)
        bind_thread(self.device)
        self.llm_transport = llm_transport
        self.config = load_spark_config(model_dir)
        self.model_dir = self.config.model_dir
        self.demo_weights = demo_weights
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        eos = self.config.llm.eos_token_id
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        self.tokenizer = SparkTokenizer(self.config.llm_dir, eos)
        self.codec = SparkAudioTokenizer(self.model_dir, self.device, self.config.top)
        self.llm = load_llm(self.config.llm_dir, self.device, dtype) if llm_transport is None else None
        rows = self.llm.lm_head.weight.shape[0] if self.llm is not None else self.config.llm.vocab_size
        if rows < self.tokenizer.vocab_size:
            raise ValueError(f"{self.config.llm_dir}: the LLM has {rows} output rows "
                             f"but its tokenizer {self.tokenizer.vocab_size} tokens")
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.max_segment_weight = max_segment_weight
        self.prompt_cache = PromptCache(prompt_cache_size)
        self.cuda_graphs = cuda_graphs  # None: on when the device is CUDA
        self._solo_batch = None
        self.vocode_capture_s = None  # seconds the first streamed window's vocoder graph took to capture
        if self.device.type == "cuda" and cuda_graphs is not False and switch_from_env(VOCODE_GRAPHS_ENV):
            self.vocode_capture_s = self.codec.capture_windows((STREAM_PLAN.first_tokens,))

    @property
    def hop(self) -> int:
        return self.codec.hop

    # ---- reference and request preparation ------------------------------------------------------------------
    def reference_tokens(self, wav, use_cache: bool = True, volume_normalize: bool | None = None) -> ReferenceTokens:
        """Tokenize a 16 kHz reference clip (or take it from the prompt cache)."""
        normalize = self.config.top.volume_normalize if volume_normalize is None else bool(volume_normalize)
        wav = as_mono(wav)
        key = PromptCache.key(wav, normalize)
        if use_cache:
            hit = self.prompt_cache.get(key)
            if hit is not None:
                return ReferenceTokens(hit.global_tokens, hit.semantic_tokens, hit.seconds, list(hit.notes), True)
        clip = self.codec.prepare(wav, normalize)
        g, s = self.codec.tokenize_clip(clip)
        item = ReferenceTokens(g, s, clip.seconds, list(clip.notes), False)
        self.prompt_cache.put(key, item)
        return item

    def prepare(self, request: SparkRequest, request_id: str | None = None) -> RequestState:
        """Validate a request and do its up-front work (reference tokens, text segments, seed)."""
        started = time.perf_counter()
        request.validated()
        o = request.options
        seed = int(o.seed) if o.seed is not None else secrets.randbelow(2 ** 31)
        reference, notes = None, []
        if not request.voice_creation:
            reference = self.reference_tokens(request.reference_wav, o.use_prompt_cache, o.volume_normalize)
            notes += reference.notes
        segments = split_text(request.text.strip(), self.max_segment_weight)
        if len(segments) > 1:
            notes.append(f"text split into {len(segments)} segments generated in turn with the same voice")
        if self.demo_weights:
            notes.append("DEMO WEIGHTS: random models, the audio is noise")
        rid = request_id or request.request_id or uuid.uuid4().hex
        state = RequestState(request, rid, seed, segments, self.tokenizer, self.hop, reference, notes,
                            self.demo_weights, started)
        state.prep_ms = (time.perf_counter() - started) * 1000
        return state

    def new_batch(self, max_batch: int, max_seq_len: int):
        """A DecodeBatch on this pipeline's LLM (CUDA graphs on CUDA unless `cuda_graphs=False`)."""
        if self.llm_transport is not None:
            from tts.spark.trtllm import TrtllmBatch

            return TrtllmBatch(self.llm_transport, max_batch, max_seq_len)
        from tts.spark.decode import DecodeBatch, speech_head_from

        return DecodeBatch(self.llm, max_batch, max_seq_len, self.cuda_graphs,
                           head_from=speech_head_from(self.tokenizer.speech_ids_from))

    # ---- vocoder ---------------------------------------------------------------------------------------------
    def vocode(self, global_tokens, semantic_tokens) -> np.ndarray:
        """32 global + N semantic tokens -> float32 [N * 320] at 16 kHz."""
        return self.codec.detokenize(global_tokens, semantic_tokens)

    def vocode_batch(self, global_tokens: list, windows: list) -> list[np.ndarray]:
        """One waveform per window (equal lengths; each with its own 32 global tokens), in one call."""
        if len({len(w) for w in windows}) != 1:
            raise ValueError(f"windows of one length only; got {sorted({len(w) for w in windows})}")
        if len(windows) == 1:
            return [self.vocode(global_tokens[0], windows[0])]
        g = torch.as_tensor(np.stack([np.asarray(x, dtype=np.int64).reshape(-1) for x in global_tokens]))
        s = torch.as_tensor(np.stack([np.asarray(x, dtype=np.int64) for x in windows]))
        return list(self.codec.detokenize_batch(g, s))

    @staticmethod
    def empty_audio() -> np.ndarray:
        return np.zeros(0, dtype=np.float32)

    # ---- one request alone -----------------------------------------------------------------------------------
    def stream(self, request: SparkRequest) -> Iterator[SparkChunk]:
        """Run one request alone; yield its chunks as they are vocoded (the last has `final`)."""
        from tts.spark.scheduler import Scheduler

        out: list[SparkChunk] = []
        errors: list[BaseException] = []
        if self._solo_batch is None:  # kept: on CUDA its graphs are captured once
            self._solo_batch = self.new_batch(1, self.max_seq_len)
        sched = Scheduler(self, 1, self.max_seq_len, lambda st, c: out.append(c), lambda st, e: errors.append(e),
                          batch=self._solo_batch)
        state = self.prepare(request)
        try:
            sched.admit(state)
            while True:
                while out:
                    yield out.pop(0)
                if errors:
                    raise errors[0]
                if not sched.busy:
                    return
                sched.step()
        finally:  # an abandoned stream must leave the reused batch idle
            for seq in sched.batch.running:
                sched.batch.drop(seq)

    def synthesize(self, request: SparkRequest) -> SparkResult:
        """Run one request alone; its chunks joined with `tts.audio.join_chunks`."""
        chunks = list(self.stream(request))
        wav = _join([c.wav for c in chunks], [c.overlap_samples for c in chunks])
        info = dict(chunks[-1].info)
        info.update(overlap_samples=0, chunk_index=len(chunks) - 1, final=True, chunks=len(chunks),
                    audio_s=round(len(wav) / self.config.top.sample_rate, 3))
        return SparkResult(wav, info, chunks)
