"""The Spark decode step on CUDA: `tts.spark.llm.forward_step` replayed from CUDA graphs.

A decode step of a 0.5 B model is a few hundred small kernels for a handful of tokens: launch-bound.
Capturing it once per (rows, keys) bucket and replaying it removes the launch cost; the code run is
`forward_step` itself (gpt-fast / nano-vllm style: the speed comes from where it is called).

    step = GraphedDecodeStep(model, cache)       # the DecodeBatch's static KV cache
    step.warmup()                                # at start-up: one graph per bucket
    logits = step(model, cache, tokens, positions, length)   # forward_step's signature and result

Buckets: rows (running slots 0..R-1) round up to `row_buckets`, keys read (`length`) round up to a
multiple of `length_step`. Padded rows carry token 0 at position 0 of a free slot (slots past the
highest running one are free, and a prefill overwrites a reused slot from position 0), exactly as
free rows inside the batch already do; extra keys are masked by position. So each running row's
logits equal the eager step's up to float rounding. Anything outside the buckets, another model or
cache, or a failed warm-up runs the eager `forward_step`.

Sampling stays outside the graph (per-sequence generators and rules on the host). Modes, from
`STUDIO_SPARK_FAST`: "0"/"off" (eager), "eager" (bucketed static buffers, no graphs: CPU tests),
"graph" (default on CUDA).
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from tts.spark.kv_cache import StaticKVCache
from tts.spark.llm import forward_step

FAST_ENV = "STUDIO_SPARK_FAST"
MODES = ("off", "eager", "graph")
DEFAULT_LENGTH_STEP = 256  # keys are read in multiples of 256 positions (5.1 s of speech tokens at 50/s)
#: Relative L2 of logits (graph vs eager, one step at start-up) above which the fast step turns itself off.
SELF_CHECK_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


@dataclass(frozen=True)
class StepOptions:
    mode: str = "graph"  # one of MODES
    row_buckets: tuple[int, ...] | None = None  # None: powers of two up to the cache's slots, and the slot count
    length_step: int = DEFAULT_LENGTH_STEP  # key-count buckets: multiples of this up to the cache length
    self_check: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"Spark fast-step mode must be one of {MODES}; got {self.mode!r} "
                             f"(set {FAST_ENV}=0|eager|graph)")
        if self.length_step < 1:
            raise ValueError(f"length_step must be >= 1; got {self.length_step}")


def step_options_from_env(env: dict | None = None) -> StepOptions:
    env = os.environ if env is None else env
    raw = env.get(FAST_ENV, "").strip().lower()
    if raw in ("0", "off", "false", "no"):
        return StepOptions(mode="off")
    if raw in ("", "1", "on", "true", "yes", "auto"):
        return StepOptions()
    if raw in MODES:
        return StepOptions(mode=raw)
    raise ValueError(f"{FAST_ENV}={raw!r} is not understood; use 0 (off), eager or graph")


def row_buckets_for(max_rows: int) -> tuple[int, ...]:
    out = [1 << i for i in range(int(math.log2(max_rows)) + 1) if (1 << i) < max_rows]
    return tuple(out + [max_rows])


def _bucket(n: int, buckets: tuple[int, ...]) -> int | None:
    for b in buckets:
        if b >= n:
            return b
    return None


class GraphedDecodeStep:
    """`forward_step(model, cache, tokens, positions, length)`, through one CUDA graph per bucket.

    Bound to one model and one static KV cache (a graph bakes in their addresses): give the
    DecodeBatch this cache for its whole life. Not thread-safe (the decode loop is one thread).
    """

    def __init__(self, model, cache: StaticKVCache, options: StepOptions = StepOptions(),
                 log: Callable[[str], None] | None = None):
        if options.mode == "off":
            raise ValueError("GraphedDecodeStep with mode 'off': call tts.spark.llm.forward_step instead")
        self.model, self.cache, self.options = model, cache, options
        self.device = cache.k.device
        if options.mode == "graph" and self.device.type != "cuda":
            raise ValueError(f"Spark fast-step mode 'graph' needs the model on CUDA (it is on {self.device}); "
                             f"use mode 'eager' or {FAST_ENV}=0")
        self.log = log or (lambda msg: print(f"[spark-fast] {msg}", file=sys.stderr, flush=True))
        self.row_buckets = options.row_buckets or row_buckets_for(cache.max_batch)
        if max(self.row_buckets) > cache.max_batch:
            raise ValueError(f"row bucket {max(self.row_buckets)} exceeds the cache's {cache.max_batch} slots")
        step = options.length_step
        self.length_buckets = tuple(range(step, cache.max_seq_len + 1, step))
        if not self.length_buckets or self.length_buckets[-1] != cache.max_seq_len:
            self.length_buckets += (cache.max_seq_len,)
        rows = max(self.row_buckets)
        vocab = model.lm_head.weight.shape[0]
        with torch.inference_mode(False):  # normal tensors: writable under any grad / inference mode
            self.tokens = torch.zeros(rows, dtype=torch.long, device=self.device)
            self.positions = torch.zeros(rows, dtype=torch.long, device=self.device)
            self.logits = torch.zeros(rows, vocab, dtype=torch.float32, device=self.device)
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.ready = options.mode == "eager"
        self.stats: dict = {"mode": options.mode}

    def bucket(self, rows: int, length: int) -> tuple[int, int] | None:
        r, n = _bucket(rows, self.row_buckets), _bucket(length, self.length_buckets)
        return None if r is None or n is None else (r, n)

    def __call__(self, model, cache: StaticKVCache, tokens: Tensor, positions: Tensor, length: int) -> Tensor:
        rows = tokens.shape[0]
        key = self.bucket(rows, length)
        if not self.ready or model is not self.model or cache is not self.cache or key is None:
            return forward_step(model, cache, tokens, positions, length)
        r, n = key
        self.tokens[:r].zero_()
        self.positions[:r].zero_()
        self.tokens[:rows].copy_(tokens, non_blocking=True)
        self.positions[:rows].copy_(positions, non_blocking=True)
        graph = self._graphs.get(key)
        with torch.no_grad():
            if graph is not None:
                graph.replay()
            else:
                self._static_step(r, n)
        return self.logits[:rows].clone()

    def _static_step(self, rows: int, length: int) -> None:
        """What a graph captures: forward_step on the static inputs, logits into the static output."""
        self.logits[:rows].copy_(forward_step(self.model, self.cache, self.tokens[:rows], self.positions[:rows],
                                              length))

    @torch.no_grad()
    def warmup(self) -> dict:
        """Capture one graph per (rows, length) bucket, largest first in one memory pool; then check
        one step against the eager forward_step. Writes only position 0 of every slot (free at start-up)."""
        t0 = time.perf_counter()
        buckets = sorted(((r, n) for r in self.row_buckets for n in self.length_buckets),
                         key=lambda b: (b[0] * b[1], b), reverse=True)
        if self.options.mode == "graph":
            self._capture(buckets)
            self.stats["graphs"] = len(self._graphs)
            self.stats["capture_s"] = round(time.perf_counter() - t0, 2)
        self.ready = True
        if self.options.self_check:
            self._self_check()
        self.stats["warmup_s"] = round(time.perf_counter() - t0, 2)
        self.log(f"warmup done: {self.stats}")
        return self.stats

    def _capture(self, buckets) -> None:
        dev = self.device
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(device=dev)
        errors = {}
        with torch.cuda.device(dev):
            self.tokens.zero_()
            self.positions.zero_()
            for r, n in buckets:
                try:
                    side.wait_stream(torch.cuda.current_stream(dev))
                    with torch.cuda.stream(side):
                        self._static_step(r, n)
                    torch.cuda.current_stream(dev).wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                        self._static_step(r, n)
                    self._graphs[(r, n)] = graph
                except Exception as exc:  # noqa: BLE001 - that bucket runs uncaptured
                    errors[f"{r}x{n}"] = f"{type(exc).__name__}: {exc}"[:300]
            torch.cuda.synchronize(dev)
        if errors:
            self.stats["capture_errors"] = errors

    def _self_check(self) -> None:
        """Write a short prompt's keys into slot 0 (position 0 onwards), compare one step both ways.
        Slot 0 is free at start-up; its stale keys are overwritten by the next prefill."""
        from tts.spark.llm import forward_prefill

        gen = torch.Generator().manual_seed(0)
        vocab = self.logits.shape[1]
        prompt = torch.randint(0, vocab, (17,), generator=gen)
        forward_prefill(self.model, self.cache, 0, prompt)
        rows = min(2, self.cache.max_batch)
        tokens = torch.randint(0, vocab, (rows,), generator=gen)
        positions = torch.tensor([17] + [0] * (rows - 1))
        fast = self(self.model, self.cache, tokens, positions, 18)[0]
        forward_prefill(self.model, self.cache, 0, prompt)  # the step above wrote position 17: same again
        ref = forward_step(self.model, self.cache, tokens, positions, 18)[0]
        err = float((fast - ref).norm() / ref.norm().clamp_min(1e-12))
        tol = SELF_CHECK_TOL.get(self.model.lm_head.weight.dtype, 3e-2)
        self.stats["self_check_rel_err"] = round(err, 7)
        if not math.isfinite(err) or err > tol:
            self.ready = False
            self._graphs.clear()
            self.stats["self_check_failed"] = f"relative error {err:.3g} > {tol} (eager forward_step serves)"
            self.log(f"SELF-CHECK FAILED: {self.stats['self_check_failed']}")


__all__ = ["FAST_ENV", "GraphedDecodeStep", "StepOptions", "row_buckets_for", "step_options_from_env"]
