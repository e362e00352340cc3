"""One prompt's prefill replayed from CUDA graphs, one graph per prompt-length bucket.

Why: a request that starts alone (one request in flight, the streaming first chunk's case) is
prefilled eagerly: ~35 kernels a layer through transformers' modules, each launched from Python,
for a ~400-token prompt whose arithmetic (~0.4 TFLOP) takes well under a millisecond on an H100.
The launches are the cost (the first token came 27 ms after the request was prepared, H100,
`spark-serve`). A graph launches the same kernels without Python in between.

How: the prompt is padded at its end to the bucket's length N with token 0 and run through the
same layers as `tts.spark.llm.forward_prefill` (causal attention, so the real tokens' values do not
depend on the padding); its keys and values go into the slot at positions 0..N-1, the logits are
taken at the prompt's last real position. The padding's keys and values at positions T..N-1 are
never read: a decode step at position p reads positions below p only, and writes p before any
later step reads it. So buckets stop at the cache's length (`max_seq_len`), longer prompts and
several prompts at once (`forward_prefill_many`) stay eager.

Shapes: T prompt tokens, N bucket length (T <= N), V vocabulary.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor

from tts.spark.kv_cache import StaticKVCache
from tts.spark.llm import _layers, _sdpa_backends

#: Prompt lengths a graph is captured for: every 64 tokens up to 1,024 (a ~3 s prompt clip with its
#: text is ~250-450 tokens; 1,024 covers ~15 s of prompt audio at BiCodec's 50 tokens a second).
#: Padding wastes at most 63 tokens' arithmetic, a few microseconds at these lengths.
PREFILL_BUCKETS = tuple(range(64, 1024 + 1, 64))
PREFILL_GRAPHS_ENV = "STUDIO_SPARK_PREFILL_GRAPHS"  # "0": eager prefill always


def padded_prefill(model, cache: StaticKVCache, slot: Tensor, ids: Tensor, last: Tensor) -> Tensor:
    """ids [1, N] (the prompt then padding), slot [1] and last [1] (the prompt's last index) int64
    on the cache's device -> float32 logits [1, V] at `last`; keys and values of all N positions
    written to the slot. No host synchronisation (capturable)."""
    n = ids.shape[1]
    positions = torch.arange(n, device=ids.device).view(1, n)
    h = model.model.embed_tokens(ids)

    def attend(i, q, k, v):
        cache.k[i, :, :, :n][slot] = k  # [1, KV, N, D] into slot `slot`
        cache.v[i, :, :, :n][slot] = v
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    with _sdpa_backends():
        h = _layers(model, h, positions, attend)
    return model.lm_head(h[0].index_select(0, last)).float()


class PrefillGraphs:
    """`padded_prefill` captured per bucket (CUDA), or run eagerly where there is no CUDA (tests)."""

    def __init__(self, model, cache: StaticKVCache, buckets: tuple[int, ...] = PREFILL_BUCKETS, graphs: bool = True):
        dev = cache.k.device
        self.model, self.cache = model, cache
        self.buckets = tuple(sorted(b for b in buckets if b <= cache.max_seq_len))
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)
        self.last = torch.zeros(1, dtype=torch.long, device=dev)
        self.ids = {n: torch.zeros(1, n, dtype=torch.long, device=dev) for n in self.buckets}
        self.out: dict[int, Tensor] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.capture_s = 0.0
        if graphs and dev.type == "cuda" and self.buckets:
            self._capture()

    def fits(self, n: int) -> bool:
        return bool(self.buckets) and 1 <= n <= self.buckets[-1]

    def __call__(self, slot: int, ids: list[int]) -> Tensor:
        """Prefill `ids` into `slot`; returns float32 logits [V] of its last position (a view of a
        buffer the next call overwrites)."""
        t = len(ids)
        if not self.fits(t):
            raise ValueError(f"a prompt of {t} tokens is outside the prefill buckets (1..{self.buckets[-1]})")
        n = min(b for b in self.buckets if b >= t)
        # a fresh host tensor each call: a reused pinned buffer could be rewritten by the next call
        # while its non-blocking copy is still in flight
        self.ids[n][0].copy_(F.pad(torch.tensor(ids, dtype=torch.long), (0, n - t)))
        self.slot.fill_(slot)
        self.last.fill_(t - 1)
        graph = self.graphs.get(n)
        if graph is None:
            return padded_prefill(self.model, self.cache, self.slot, self.ids[n], self.last)[0]
        graph.replay()
        return self.out[n][0]

    def _capture(self) -> None:
        """Capture every bucket, longest first, into one memory pool (one graph runs at a time). The
        warm-up and capture runs write into the spare slot past max_batch, which no sequence owns."""
        t0 = time.perf_counter()
        dev = self.cache.k.device
        self.slot.fill_(self.cache.max_batch)  # the spare slot
        pool = torch.cuda.graph_pool_handle()
        with torch.no_grad():
            for n in sorted(self.buckets, reverse=True):
                self.last.fill_(n - 1)
                stream = torch.cuda.Stream(dev)
                stream.wait_stream(torch.cuda.current_stream(dev))
                with torch.cuda.stream(stream):
                    padded_prefill(self.model, self.cache, self.slot, self.ids[n], self.last)
                torch.cuda.current_stream(dev).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    self.out[n] = padded_prefill(self.model, self.cache, self.slot, self.ids[n], self.last)
                self.graphs[n] = graph
        torch.cuda.synchronize(dev)
        self.capture_s = round(time.perf_counter() - t0, 2)
