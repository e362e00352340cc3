"""The F5-TTS fast path on CUDA: bucketed shapes, one CUDA graph per bucket, optional torch.compile.

Nothing here is a second model. The ODE step (`static_step`) is the arithmetic of
`tts.f5.sampler.ode_step`, the function the CPU path runs, on the same DiT weights; what changes is
how a batch is laid out and where the step is called (gpt-fast / nano-vllm style):

* the items of a batch are packed back to back on one token axis (`DiT.forward_packed`), each
  followed by ITEM_GAP empty frames, so no frame is computed for padding: a request's two chunks
  (~470 and ~740 frames) cost 2 x 1,280 tokens per step instead of 4 x 768 padded. Attention runs
  per item (a varlen kernel on CUDA: flash attention's, cuDNN's or the project's Triton kernel,
  `tts.f5.attention_kernel`, whichever measures fastest at start-up, `choose_packed_attention`),
  the position convolution sees zeros in the gaps, so an item's result equals its solo run. A
  one-item bucket runs its two CFG halves as two padded rows instead; their attention is masked
  SDPA (cuDNN's kernel) or the Triton kernel over the rows' sequences, again the faster.
* shapes are rounded up to a bucket (items in `batch_buckets`, packed frames in `length_buckets`),
  so a hundred-odd fixed shapes cover every request; the tail past the last item is one more gap.
* each bucket's step (DiT forward on the conditional and unconditional halves, guidance, Euler
  update into the state) reads static buffers and is captured once in a CUDA graph at start-up; a
  request copies its inputs into the buffers and replays the graph `nfe` times. The step's flow
  time and width come from a device table, so the loop never waits on the host.
* mode "compile" first compiles each DiT block (regional compilation: one block's code serves all
  `depth` blocks) and the convolutional position embedding (its grouped convolutions as one Triton
  kernel, `tts.f5.conv_kernel`, when it matches nn.Conv1d at start-up, `choose_conv_form`; else
  as matrix products, `tts.f5.dit.grouped_conv_as_matmul`) with dynamic sizes, so a few compiles
  (`_prime_shapes`) cover every bucket; the graphs then capture the compiled kernels. Inductor's
  on-disk caches live under the data directory, so a restart reuses compiled code. On CUDA the
  feed-forward's bias and GELU run in its first product's epilogue (`DiT.fuse_gelu`).
* everything is compiled and captured by `warmup()` when the server starts; a request never pays
  for it. A shape larger than the largest bucket runs the plain eager sampler (correct, slower).

The text embedding runs once per batch, eagerly, outside the step loop. `vocode_batch` runs Vocos
on a whole batch at once with per-item masks, so each item's audio equals its solo decode.

Modes (`STUDIO_F5_FAST`, see `fast_options_from_env`):
  "off"     no fast path: the pipeline calls `tts.f5.sampler.sample` (the CPU code path, on CUDA);
  "eager"   bucketed static buffers, no graphs, no compile (CPU tests; debugging);
  "graph"   the eager step captured in CUDA graphs;
  "compile" DiT blocks torch.compile'd (default inductor mode), then captured in CUDA graphs
            (on a CPU DiT: compiled, no graphs; used by the tests with a cheap backend).

Shapes: B batch, T mel frames (93.75 per second), C mel channels (100), N packed frames (items + gaps).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.profiler import record_function

from tts.compile_cache import CACHE_SUBDIR, DATA_DIR_ENV, configure_compile_cache, default_cache_dir  # noqa: F401
from tts.f5 import attention_kernel, conv_kernel, fp8
from tts.f5.dit import PACKED_ATTENTION, PACKED_ATTENTION_BACKENDS, DiT, packed_attention
from tts.f5.sampler import guided_euler, timesteps
from tts.f5.sampler import sample as eager_sample
from tts.switches import switch_from_env

FAST_ENV = "STUDIO_F5_FAST"
FUSED_GELU_ENV = "STUDIO_F5_FUSED_GELU"  # 0: the feed-forward's GELU as its own kernel (for comparisons)
FP8_ENV = "STUDIO_F5_FP8"  # 1: the DiT blocks' large products in FP8 (`tts.f5.fp8`; opt-in, lower SNR)
ATTENTION_ENV = "STUDIO_F5_ATTENTION"  # attention kernels: auto (measured at start-up), flash, cudnn, triton
ATTENTION_CHOICES = ("auto",) + PACKED_ATTENTION_BACKENDS
#: Items (frames) of the shapes `choose_packed_attention` times: a request's two chunks at
#: concurrency 1 (the benchmark workload's typical 474 + 740) and eight first chunks.
ATTENTION_PROBES = ((474, 740), (480,) * 8)
#: (item frames, row frames) of the lone item `choose_packed_attention` times in the rows layout:
#: the benchmark workload's typical request at concurrency 1 (one chunk of ~850 frames).
ROW_ATTENTION_PROBE = (850, 864)
#: Largest relative L2 difference accepted between the two kernels' outputs (bf16 rounding).
ATTENTION_AGREE_TOL = 2e-2
CONV_ENV = "STUDIO_F5_CONV"  # position convolutions: auto, kernel (Triton), matmul (product + shifted sum)
CONV_CHOICES = ("auto", "kernel", "matmul")
#: Frames of the packed row `choose_conv_form` checks the kernel on (a request's two chunks, CFG halves).
CONV_PROBE_FRAMES = 2 * 1280
#: Largest relative L2 difference accepted between the kernel and nn.Conv1d (bf16 rounding; 2.9e-3
#: measured on the H200).
CONV_AGREE_TOL = 2e-2
MODES = ("off", "eager", "graph", "compile")
#: inductor's mode for the DiT blocks: unset = its default (matrix products through cuBLAS, pointwise
#: work fused around them), or "max-autotune-no-cudagraphs" (products as autotuned Triton templates
#: that can take the pointwise work into their epilogues; a far longer first compile, kept in the
#: compile cache). Not measured end to end yet.
COMPILE_MODE_ENV = "STUDIO_F5_COMPILE_MODE"
COMPILE_MODE_CHOICES = ("default", "max-autotune-no-cudagraphs")
#: Which buckets run once uncaptured before their capture (lazy initialisation, kernel specialisation):
#: "first" (the first, largest, bucket of each batch size; a capture that then fails is warmed and
#: retried; the default) or "all" (every bucket). On the host a warm-up costs about what a capture
#: does (Python launches through 22 blocks): in one H100 call (commit d8dbe1e) a start on a warm
#: compile cache took 22.6 s with "first" (capture 10.1 s) against 29.5 s with "all" (14.8 s), same
#: speed afterwards (offline c=1 rtf 0.0118 against 0.0118-0.0123).
CAPTURE_WARMUP_ENV = "STUDIO_F5_CAPTURE_WARMUP"
CAPTURE_WARMUP_CHOICES = ("first", "all")  # the first is the default
#: Env values that switch the fast path off / pick the default mode.
OFF_VALUES = ("0", "off", "false", "no")
DEFAULT_VALUES = ("", "1", "on", "true", "yes", "auto")
DEFAULT_MODE = "compile"

#: Batch buckets: the pipeline batches at most 8 chunks (F5Pipeline max_batch).
DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8)
#: Packed-frame buckets (all items of a batch plus their gaps): every 64 frames (0.68 s) up to 2048
#: (one 12 s prompt plus a ~10 s chunk, the pipeline's budget for one item), then coarser steps
#: up to 34816 (8 items of 4096 frames and their gaps; 4096 was the padded layout's per-item limit).
#: Rounding costs at most 64 frames below 2048 (the benchmark workload's requests pack to 1,167-1,373
#: frames: 2.3 % of padding on average at 64-frame steps, 5.5 % at 128), at most 1/8 above. Each
#: length below 2048 is one more graph per batch bucket at start-up (~0.1 s to capture; no compile).
DEFAULT_LENGTH_BUCKETS = (tuple(range(128, 2048 + 1, 64)) + tuple(range(2048 + 256, 4096 + 1, 256))
                          + tuple(range(4096 + 512, 8192 + 1, 512)) + tuple(range(8192 + 1024, 16384 + 1, 1024))
                          + tuple(range(16384 + 2048, 34816 + 1, 2048)))
#: Batches of more items than this take the 128-frame steps below 2048 only
#: (`FastOptions.large_batch_length_buckets`): their items rarely pack under 2048 frames, and the
#: 64-frame steps there would add 32 buckets (64 graphs, ~5 s of start-up) for little.
FINE_LENGTH_MAX_BATCH = 2
DEFAULT_LARGE_BATCH_LENGTH_BUCKETS = tuple(n for n in DEFAULT_LENGTH_BUCKETS if n >= 2048 or n % 128 == 0)
#: A lone item (one request at a time: the CFG pair runs as two rows of this length) takes 32-frame
#: steps where single requests mostly land (a 3-8 s prompt and a chunk of up to ~8 s: 512-1536
#: frames) and packs without a gap (`packed_length`). On the benchmark workload (767-942 frames)
#: the rows then hold 1.7 % more frames than the items instead of 5.2 % (64-frame steps after a
#: 16-frame gap); 16 more buckets of the smallest batch, 32 small graphs at start-up.
ONE_ITEM_LENGTH_BUCKETS = tuple(sorted(set(DEFAULT_LENGTH_BUCKETS) | set(range(512, 1536 + 1, 32))))
#: Frames a single item may have in a bucket's graph (buckets (b, n) with n > b * this are not captured).
MAX_ITEM_FRAMES = 4096
#: Empty frames after every packed item: at least the position convolution's half width
#: (CONV_POS_KERNEL // 2 = 15), so no item's convolution reads another item's frames.
ITEM_GAP = 16
#: Relative L2 error (graph path vs the eager sampler, one small batch at start-up) above which the
#: fast path disables itself. fp32: only summation order differs. bf16/fp16: kernel choice and
#: fusion change rounding (bf16 has an 8-bit mantissa, ~4e-3 per op) and a few ODE steps add up.
SELF_CHECK_TOL = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 2e-2}
#: With FP8 products both sides of the self-check quantise their activations, and a rounding
#: difference before a quantisation can move a value to the next e4m3 step (6 % apart), so the
#: compiled step and the eager one differ more than in bf16.
SELF_CHECK_TOL_FP8 = 1e-1
SELF_CHECK_NFE = 4
WARMUP_LOG_PREFIX = "warmup done:"  # followed by the stats as JSON (tools/gpu_summary.py reads the server log)


@dataclass(frozen=True)
class FastOptions:
    """How the fast sampler is built (frozen: one per pipeline)."""

    mode: str = DEFAULT_MODE  # one of MODES (see the module docstring)
    batch_buckets: tuple[int, ...] = DEFAULT_BATCH_BUCKETS  # batch sizes captured; larger batches run eagerly
    length_buckets: tuple[int, ...] = DEFAULT_LENGTH_BUCKETS  # frame counts captured; longer runs eagerly
    cache_dir: str | None = None  # compile caches; None: $STUDIO_DATA_DIR (or ~/.cache/voice-studio)/compile-cache
    compile_backend: str = "inductor"  # torch.compile backend ("eager"/"aot_eager" test the plumbing on CPU)
    compile_mode: str | None = None  # inductor mode: None (default) or "max-autotune-no-cudagraphs"
    self_check: bool = True  # compare one graph-path sample with the eager sampler at start-up
    fused_gelu: bool = True  # on CUDA: feed-forward bias + GELU in the GEMM epilogue (`DiT.fuse_gelu`)
    fp8: bool = False  # the DiT blocks' large products in FP8 (`tts.f5.fp8`), where the device has FP8 tensor cores
    # attention kernels on CUDA: "auto" (the fastest, measured at start-up), "flash", "cudnn", "triton"
    attention: str = "auto"
    conv: str = "auto"  # position convolutions on CUDA: "auto" (the Triton kernel if it runs and agrees), "kernel", "matmul"
    capture_warmup: str = "first"  # which buckets are warmed before their capture: CAPTURE_WARMUP_CHOICES
    #: length buckets of batches of more than FINE_LENGTH_MAX_BATCH items (None: `length_buckets`);
    #: `fast_options_from_env` sets DEFAULT_LARGE_BATCH_LENGTH_BUCKETS. Same largest bucket.
    large_batch_length_buckets: tuple[int, ...] | None = None
    #: length buckets of a lone item (None: `length_buckets`); `fast_options_from_env` sets
    #: ONE_ITEM_LENGTH_BUCKETS. Same largest bucket.
    one_item_length_buckets: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"fast-path mode must be one of {MODES}; got {self.mode!r} "
                             f"(set {FAST_ENV}=0|eager|graph|compile)")
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention must be one of {ATTENTION_CHOICES}; got {self.attention!r} "
                             f"(set {ATTENTION_ENV}={'|'.join(ATTENTION_CHOICES)})")
        if self.conv not in CONV_CHOICES:
            raise ValueError(f"conv must be one of {CONV_CHOICES}; got {self.conv!r} (set {CONV_ENV}=auto|kernel|matmul)")
        if self.capture_warmup not in CAPTURE_WARMUP_CHOICES:
            raise ValueError(f"capture_warmup must be one of {CAPTURE_WARMUP_CHOICES}; got {self.capture_warmup!r} "
                             f"(set {CAPTURE_WARMUP_ENV}=all|first)")
        for name, values in (("batch_buckets", self.batch_buckets), ("length_buckets", self.length_buckets),
                             ("large_batch_length_buckets", self.large_batch_length_buckets or (1,)),
                             ("one_item_length_buckets", self.one_item_length_buckets or (1,))):
            if not values or any(int(v) < 1 for v in values) or list(values) != sorted(set(values)):
                raise ValueError(f"{name} must be strictly increasing positive integers; got {values}")
        for name, values in (("large_batch_length_buckets", self.large_batch_length_buckets),
                             ("one_item_length_buckets", self.one_item_length_buckets)):
            if values and max(values) != max(self.length_buckets):
                raise ValueError(f"{name} must end where length_buckets end ({max(self.length_buckets)}); "
                                 f"got {max(values)}")

    def lengths_for(self, batch_bucket: int) -> tuple[int, ...]:
        """The length buckets of batches of `batch_bucket` items."""
        if batch_bucket > FINE_LENGTH_MAX_BATCH and self.large_batch_length_buckets:
            return self.large_batch_length_buckets
        if batch_bucket == 1 and self.one_item_length_buckets:
            return self.one_item_length_buckets
        return self.length_buckets


def fast_options_from_env(max_batch: int = 8, env: dict | None = None, **overrides) -> FastOptions:
    """Options from `STUDIO_F5_FAST` (0/off, eager, graph, compile; unset/1 = compile), with batch
    buckets the powers of two up to `max_batch` plus `max_batch` itself."""
    env = os.environ if env is None else env
    raw = env.get(FAST_ENV, "").strip().lower()
    if raw in OFF_VALUES:
        mode = "off"
    elif raw in DEFAULT_VALUES:
        mode = DEFAULT_MODE
    elif raw in MODES:
        mode = raw
    else:
        raise ValueError(f"{FAST_ENV}={raw!r} is not understood; use 0 (off), eager, graph or compile")
    gelu = env.get(FUSED_GELU_ENV, "").strip().lower()
    if gelu not in OFF_VALUES + DEFAULT_VALUES:
        raise ValueError(f"{FUSED_GELU_ENV}={gelu!r} is not understood; use 0 (off) or 1 (on, the default)")
    overrides.setdefault("fused_gelu", gelu not in OFF_VALUES)
    overrides.setdefault("fp8", switch_from_env(FP8_ENV, default=False, env=env))
    overrides.setdefault("attention", _env_choice(env, ATTENTION_ENV, ATTENTION_CHOICES))
    overrides.setdefault("conv", _env_choice(env, CONV_ENV, CONV_CHOICES))
    overrides.setdefault("capture_warmup", _env_choice(env, CAPTURE_WARMUP_ENV, CAPTURE_WARMUP_CHOICES))
    compile_mode = _env_choice(env, COMPILE_MODE_ENV, COMPILE_MODE_CHOICES)
    overrides.setdefault("compile_mode", None if compile_mode == "default" else compile_mode)
    overrides.setdefault("large_batch_length_buckets", DEFAULT_LARGE_BATCH_LENGTH_BUCKETS)
    overrides.setdefault("one_item_length_buckets", ONE_ITEM_LENGTH_BUCKETS)
    return FastOptions(mode=mode, batch_buckets=batch_buckets_for(max_batch), **overrides)


def _env_choice(env: dict, name: str, choices: tuple[str, ...]) -> str:
    """`env[name]` lower-cased, one of `choices` (unset or empty: the first)."""
    value = env.get(name, "").strip().lower() or choices[0]
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not understood; use one of {', '.join(choices)}")
    return value


def buckets_to_warm(buckets: list[tuple[int, int]], choice: str) -> set[tuple[int, int]]:
    """The (batch, frames) buckets warmed before capture, of `buckets` in capture order: all of
    them, or ("first") the first of each batch size."""
    if choice == "all":
        return set(buckets)
    first: dict[int, tuple[int, int]] = {}
    for b, t in buckets:
        first.setdefault(b, (b, t))
    return set(first.values())


def batch_buckets_for(max_batch: int) -> tuple[int, ...]:
    """Powers of two below `max_batch`, then `max_batch` (8 -> 1, 2, 4, 8; 6 -> 1, 2, 4, 6)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1; got {max_batch}")
    out = [1 << i for i in range(int(math.log2(max_batch)) + 1) if (1 << i) < max_batch]
    return tuple(out + [max_batch])


def bucket_for(n: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket >= n, or None when n exceeds the largest."""
    for b in buckets:
        if b >= n:
            return b
    return None


@contextmanager
def step_context():
    """Grad off and inference mode off around every step call, at start-up and per request alike:
    compiled code guards on whether its tensors are inference tensors, so a step that ran under
    `torch.inference_mode` (the pipeline's) would recompile. The static buffers are normal tensors."""
    with torch.inference_mode(False), torch.no_grad():
        yield


@contextmanager
def eager_stance():
    """Run compiled modules eagerly inside (no compile or recompile on a request's path)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:
        yield
        return
    with set_stance("force_eager"):
        yield


@contextmanager
def reference_forms(dit: DiT):
    """The DiT in its plain forms for the duration (the self-check's reference): feed-forwards
    with bias + GELU as their own op, position convolutions through nn.Conv1d. Restores the
    attributes as they were (the kernel-form weights stay the tensors the graphs captured)."""
    cpe = dit.input_embed.conv_pos_embed
    was = [block.ff.fused_gelu for block in dit.transformer_blocks], cpe.form
    dit.fuse_gelu(False)
    cpe.form = "conv"
    try:
        yield
    finally:
        for block, on in zip(dit.transformer_blocks, was[0]):
            block.ff.fused_gelu = on
        cpe.form = was[1]


def device_us(fn: Callable[[], object], device: torch.device, iters: int) -> float:
    """Mean device time of one `fn()` call over `iters` back-to-back calls (CUDA events), in us."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / iters * 1000


def max_rel_diff(outs: list[Tensor], refs: list[Tensor]) -> float:
    """The largest relative L2 difference between paired outputs (in float32)."""
    return max(float((a.float() - b.float()).norm() / b.float().norm()) for a, b in zip(outs, refs))


#: A candidate kernel whose first timed call per probe is already this many times slower than the
#: fastest so far is not timed further (cuDNN's ragged attention took ~150 ms a call on the H200:
#: `iters` more calls would add seconds to start-up for a kernel that cannot win).
HOPELESS_FACTOR = 10


def graph_us(fn: Callable[[], object], device: torch.device, iters: int) -> float:
    """Device time of one `fn()` in microseconds as the server's graphs run it: `iters` calls
    captured in one CUDA graph and replayed (no host launch cost in the figure: a kernel launched
    from Python can take longer to launch than to run)."""
    fn()
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / iters * 1000


def _attention_candidates(layout: str, choice: str) -> list[str]:
    """Kernels `choose_packed_attention` times for a layout ("packed" or "rows"), the reference
    (flash / sdpa) first; Triton's as "triton:<config>" (`attention_kernel.CONFIGS`), where it runs."""
    ref = "flash" if layout == "packed" else "sdpa"
    triton = [f"triton:{c}" for c in attention_kernel.CONFIGS] if attention_kernel.available() else []
    if choice == "auto":
        return [ref] + (["cudnn"] if layout == "packed" else []) + triton
    if choice == "triton":
        return [ref] + triton
    return [ref] + ([choice] if layout == "packed" and choice != ref else [])


def choose_packed_attention(heads: int, dim_head: int, dtype: torch.dtype, device: torch.device,
                            choice: str = "auto", iters: int = 20) -> dict:
    """Set `tts.f5.dit.PACKED_ATTENTION` for this process and say why.

    Two layouts: "packed" (several items on one axis: flash's varlen kernel, cuDNN's ragged one or
    the Triton kernel of `tts.f5.attention_kernel` in each of its tile configs) on the packed shapes
    of ATTENTION_PROBES, and "rows" (a lone item's halves as two padded rows: SDPA with the key mask,
    or the Triton kernel over the rows' sequences) on ROW_ATTENTION_PROBE. Each candidate runs
    `iters` calls in a CUDA graph (`graph_us`; one eager call first: a kernel whose eager call takes
    HOPELESS_FACTOR times the fastest eager call so far is not timed further), must agree with the layout's reference
    (flash, SDPA) within ATTENTION_AGREE_TOL, and the fastest is kept. `choice` "flash" / "cudnn"
    sets that packed kernel (checked against flash) and SDPA for rows; "triton" the Triton kernel
    for both, in its fastest config. Off CUDA or in fp32 nothing is chosen (the masked path serves).
    Returns stats: {"chosen" (packed kernel), "rows", "<layout>_us": {candidate: us summed over the
    layout's probes}, "max_rel_diff": {candidate: difference to the reference}, "error": ...}.
    """
    stats: dict = {"chosen": PACKED_ATTENTION["backend"]}
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return stats
    gen = torch.Generator(device="cpu").manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device, dtype)  # noqa: E731
    packed_probes = []
    for lens in ATTENTION_PROBES:
        n = packed_length(list(lens))
        cu = torch.tensor(packed_cu_seqlens(list(lens), len(lens), n), dtype=torch.int32, device=device)
        packed_probes.append((rand(2 * n, heads, dim_head), rand(2 * n, heads, dim_head), rand(2 * n, heads, dim_head),
                              cu, n))
    item, n = ROW_ATTENTION_PROBE
    q, k, v = (rand(2, heads, n, dim_head) for _ in range(3))  # SDPA's [rows, heads, frames, dim_head]
    key_mask = (torch.arange(n, device=device) < item)[None, None, None, :].expand(2, 1, 1, n)
    cu_rows = torch.tensor(packed_cu_seqlens([item], 1, n), dtype=torch.int32, device=device)
    flat = [t.transpose(1, 2).reshape(2 * n, heads, dim_head) for t in (q, k, v)]  # the rows' packed axis
    valid = torch.cat([torch.arange(n, device=device) < item] * 2)

    def run(layout: str, name: str) -> list[Tensor]:
        kernel, _, config = name.partition(":")
        if layout == "packed":
            return [packed_attention(*probe, kernel=kernel, config=config or None) for probe in packed_probes]
        if kernel == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
            return [out.transpose(1, 2).reshape(2 * n, heads, dim_head)]
        return [packed_attention(*flat, cu_rows, n, kernel=kernel, config=config)]

    def compared(layout: str, outs: list[Tensor]) -> list[Tensor]:  # the padding's rows differ by design
        return outs if layout == "packed" else [out[valid] for out in outs]

    chosen: dict[str, str] = {}
    for layout in ("packed", "rows"):
        timings: dict[str, float] = {}
        first_calls: dict[str, float] = {}  # one eager call each (launch cost included), for the hopeless test
        diffs: dict[str, float] = {}
        ref_out: list[Tensor] | None = None
        for name in _attention_candidates(layout, choice):
            try:
                outs = compared(layout, run(layout, name))  # (the timed calls below leave out the masking: no sync)
                if ref_out is None:
                    ref_out = outs
                else:
                    diff = max_rel_diff(outs, ref_out)
                    diffs[name] = round(diff, 6)
                    if not math.isfinite(diff) or diff > ATTENTION_AGREE_TOL:
                        stats.setdefault("error", {})[name] = f"disagrees with the reference ({diff:.3g})"
                        continue
                call = lambda layout=layout, name=name: run(layout, name)  # noqa: E731
                first = device_us(call, device, 1)
                if first_calls and first > HOPELESS_FACTOR * min(first_calls.values()):
                    stats.setdefault("error", {})[name] = f"hopeless (one call {first:.0f} us, > 10x the fastest)"
                    continue
                first_calls[name] = first
                timings[name] = round(graph_us(call, device, iters), 1)
            except Exception as exc:  # noqa: BLE001 - a kernel this torch / cuDNN / Triton cannot run: not chosen
                stats.setdefault("error", {})[name] = f"{type(exc).__name__}: {exc}"[:300]
        stats[f"{layout}_us"], stats.setdefault("max_rel_diff", {})[layout] = timings, diffs
        forced = [t for t in timings if choice != "auto" and t.partition(":")[0] == choice]
        pool = forced or list(timings)
        chosen[layout] = min(pool, key=timings.get) if pool else ("flash" if layout == "packed" else "sdpa")
    for layout, name in chosen.items():
        kernel, _, config = name.partition(":")
        PACKED_ATTENTION["backend" if layout == "packed" else "rows"] = kernel
        if config:
            PACKED_ATTENTION[f"triton_{layout}"] = config
    stats.update(chosen=chosen["packed"], rows=chosen["rows"])
    return stats


@torch.no_grad()
def choose_conv_form(dit: DiT, choice: str = "auto", iters: int = 20) -> dict:
    """Set the DiT's position-convolution form for the compiled fast path and say why.

    "kernel" / "auto": the Triton kernel (`tts.f5.conv_kernel`) if it runs here and matches
    nn.Conv1d on a probe row of CONV_PROBE_FRAMES frames (relative L2 within CONV_AGREE_TOL);
    otherwise, and for "matmul", the product form. Stats carry both convolutions' device time per
    call in the kernel and in cuDNN's nn.Conv1d (CUDA events, mean of `iters`), for the record.
    """
    cpe = dit.input_embed.conv_pos_embed
    stats: dict = {}
    chosen = "matmul"
    if choice != "matmul":
        try:
            if not conv_kernel.available():
                raise RuntimeError("Triton is not available")
            gen = torch.Generator(device="cpu").manual_seed(0)
            device = next(dit.parameters()).device
            x = torch.randn(1, CONV_PROBE_FRAMES, dit.cfg.dim, generator=gen).to(device, dit.dtype)
            convs = (cpe.conv1d[0], cpe.conv1d[2])
            weights = [conv_kernel.kernel_weights(c) for c in convs]
            runs = {"kernel": lambda: [conv_kernel.grouped_conv(x, w, c.bias) for w, c in zip(weights, convs)],
                    "cudnn": lambda: [c(x.transpose(1, 2)).transpose(1, 2) for c in convs]}
            diff = max_rel_diff(runs["kernel"](), runs["cudnn"]())
            stats["max_rel_diff"] = round(diff, 6)
            for name, run in runs.items():
                stats[f"{name}_us"] = round(device_us(run, device, iters), 1)
            if not math.isfinite(diff) or diff > CONV_AGREE_TOL:
                raise RuntimeError(f"the kernel disagrees with nn.Conv1d (relative difference {diff:.3g})")
            chosen = "kernel"
        except Exception as exc:  # noqa: BLE001 - no Triton, a failing or wrong kernel: the product form
            stats["error"] = f"{type(exc).__name__}: {exc}"[:500]
    cpe.use_form(chosen)
    stats["chosen"] = chosen
    return stats


# -- static buffers -----------------------------------------------------------------------------

@dataclass
class BucketViews:
    """Contiguous views of the heads of the flat static buffers for one (items b, packed n) bucket."""

    x: Tensor  # [n, C] float32 ODE state, items packed
    cond: Tensor  # [n, C] float32 reference mel, zero past each reference and in the gaps
    text_cond: Tensor  # [n, text_dim] DiT dtype
    text_uncond: Tensor  # [n, text_dim]
    valid: Tensor  # [n] bool, True on the items' frames
    pos: Tensor  # [n] long, each frame's index within its item (0 in the gaps)
    cu_seqlens: Tensor  # [4 b + 1] int32 over the doubled axis: per half, item then gap, b times
    ids: Tensor  # [n] long, each frame's shifted text id (0 = filler), `DiT.embed_text_packed`
    keep: Tensor  # [n] bool, the positions the text embedding keeps
    seg: Tensor  # [n] long, each frame's item (b in the gaps)
    ref: Tensor  # [n] bool, True on the reference frames (the result keeps the reference mel there)
    # per request, filled by the prologue (`static_prologue`), read by every step:
    joined: Tensor  # [2 n, 2 C + text_dim] DiT dtype, `DiT.packed_inputs`
    cos: Tensor  # [2 n, dim_head] float32, `DiT.packed_rope` (its first n rows for the masked rows)
    sin: Tensor


class StaticBuffers:
    """Inputs every captured graph reads, allocated once at the largest bucket.

    A graph bakes in its tensors' addresses; a bucket's views start at each flat buffer's first
    element, so all graphs share one set of buffers (they never run at the same time).
    """

    def __init__(self, max_b: int, max_n: int, mel_dim: int, text_dim: int, text_dtype: torch.dtype,
                 device: torch.device, mod_rows: int = 0, mod_dim: int = 0, *, dim_head: int):
        self.max_b, self.max_n, self.mel_dim, self.text_dim = max_b, max_n, mel_dim, text_dim
        self.joined_dim, self.dim_head = 2 * mel_dim + text_dim, dim_head
        self.joined = torch.zeros(2 * max_n * self.joined_dim, dtype=text_dtype, device=device)
        self.rope_cos = torch.zeros(2 * max_n * dim_head, dtype=torch.float32, device=device)
        self.rope_sin = torch.zeros(2 * max_n * dim_head, dtype=torch.float32, device=device)
        self.x = torch.zeros(max_n * mel_dim, dtype=torch.float32, device=device)
        self.cond = torch.zeros(max_n * mel_dim, dtype=torch.float32, device=device)
        self.text_cond = torch.zeros(max_n * text_dim, dtype=text_dtype, device=device)
        self.text_uncond = torch.zeros(max_n * text_dim, dtype=text_dtype, device=device)
        self.valid = torch.zeros(max_n, dtype=torch.bool, device=device)
        self.pos = torch.zeros(max_n, dtype=torch.long, device=device)
        self.cu_seqlens = torch.zeros(4 * max_b + 1, dtype=torch.int32, device=device)
        self.ids = torch.zeros(max_n, dtype=torch.long, device=device)
        self.keep = torch.zeros(max_n, dtype=torch.bool, device=device)
        self.seg = torch.zeros(max_n, dtype=torch.long, device=device)
        self.ref = torch.zeros(max_n, dtype=torch.bool, device=device)
        self.step = torch.zeros(2, dtype=torch.float32, device=device)  # (t0, dt) of the step to run
        self.mods = torch.zeros(mod_rows, mod_dim, dtype=text_dtype, device=device)  # DiT.modulations(t0)
        self.cfg = torch.zeros((), dtype=torch.float32, device=device)  # guidance strength

    def views(self, b: int, n: int) -> BucketViews:
        if b > self.max_b or n > self.max_n:
            raise ValueError(f"bucket ({b}, {n}) exceeds the static buffers ({self.max_b}, {self.max_n})")
        return BucketViews(self.x[: n * self.mel_dim].view(n, self.mel_dim),
                           self.cond[: n * self.mel_dim].view(n, self.mel_dim),
                           self.text_cond[: n * self.text_dim].view(n, self.text_dim),
                           self.text_uncond[: n * self.text_dim].view(n, self.text_dim),
                           self.valid[:n], self.pos[:n], self.cu_seqlens[: 4 * b + 1], self.ids[:n],
                           self.keep[:n], self.seg[:n], self.ref[:n],
                           self.joined[: 2 * n * self.joined_dim].view(2 * n, self.joined_dim),
                           self.rope_cos[: 2 * n * self.dim_head].view(2 * n, self.dim_head),
                           self.rope_sin[: 2 * n * self.dim_head].view(2 * n, self.dim_head))


def capture_spread(took: list[tuple[float, str]]) -> dict:
    """How the buckets' capture times spread (ms per bucket: median, the slowest and which bucket):
    start-ups on one machine took 10.3-17.2 s to capture the same 193 buckets, and these tell a
    uniformly slower capture from a few slow buckets."""
    if not took:
        return {}
    slowest = max(took)
    return {"capture_ms_p50": round(1000 * float(np.median([sec for sec, _ in took])), 1), "capture_ms_max": round(1000 * slowest[0], 1),
            "capture_slowest": slowest[1]}


def packed_length(lens: list[int]) -> int:
    """Packed frames of items of these lengths: each item, then ITEM_GAP empty frames; a lone item
    needs no gap (its conditional and unconditional halves run as two rows, `DiT.forward_packed`,
    where the convolutions see the row's end as upstream's zero padding)."""
    if len(lens) == 1:
        return int(lens[0])
    return sum(int(n) + ITEM_GAP for n in lens)


def packed_cu_seqlens(lens: list[int], b: int, n: int) -> list[int]:
    """Sequence boundaries [4 b + 1] over the doubled axis (2 n tokens) for items of `lens` packed
    in an (b, n) bucket: per half, each item then its gap (the last gap runs to the half's end);
    unused item slots are empty sequences."""
    bounds, start = [0], 0
    for half in range(2):
        for i in range(b):
            length = int(lens[i]) if i < len(lens) else 0
            gap_end = (half + 1) * n if i == b - 1 else start + length + (ITEM_GAP if i < len(lens) else 0)
            bounds += [start + length, gap_end]
            start = gap_end
    return bounds


@dataclass
class HostPack:
    """One batch packed on the host for an (b, n) bucket: what `FastSampler` copies into its static
    buffers (views of a `HostStaging`, pinned when the sampler is on CUDA)."""

    x: Tensor  # [n, C] float32: each item's noise, zero elsewhere
    ids: Tensor  # [n] long: text id + 1 on each item's first min(len(text), T_i) frames, 0 elsewhere
    valid: Tensor  # [n] bool
    keep: Tensor  # [n] bool
    pos: Tensor  # [n] long
    seg: Tensor  # [n] long: item index, b in the gaps
    ref: Tensor  # [n] bool: reference frames
    cu_seqlens: Tensor  # [4 b + 1] int32
    starts: list[int]  # each item's first token

    def copy_into(self, v: "BucketViews", non_blocking: bool = False) -> None:
        """Everything but the reference mel into a bucket's static buffers."""
        for dst, src in ((v.x, self.x), (v.ids, self.ids), (v.valid, self.valid), (v.keep, self.keep),
                         (v.pos, self.pos), (v.seg, self.seg), (v.ref, self.ref), (v.cu_seqlens, self.cu_seqlens)):
            dst.copy_(src, non_blocking=non_blocking)


class HostStaging:
    """Host buffers a batch is packed into, allocated once at the largest bucket (pinned on CUDA, so
    the copies to the device are asynchronous). Written through numpy views: in the Triton stub,
    per-request pinned allocations (cudaHostAlloc, ~3 ms) and torch's CPU copies (thread-pool
    start-up, ~6 ms) cost more than the whole batch's arithmetic (H200, 2026-12-02). `ready`, when
    set, is the CUDA event after the last copies out of them; it is waited for before they are
    written again."""

    def __init__(self, max_b: int, max_n: int, mel_dim: int, pin: bool = False):
        self.x = torch.zeros(max_n, mel_dim, dtype=torch.float32, pin_memory=pin)
        self.ints = torch.zeros(3, max_n, dtype=torch.long, pin_memory=pin)  # ids, pos, seg
        self.flags = torch.zeros(3, max_n, dtype=torch.bool, pin_memory=pin)  # valid, keep, ref
        self.cu = torch.zeros(4 * max_b + 1, dtype=torch.int32, pin_memory=pin)
        self.x_np, self.ints_np, self.flags_np, self.cu_np = (t.numpy() for t in (self.x, self.ints, self.flags, self.cu))
        self.ready = None


def pack_on_host(text_ids: list[list[int]], ref_lens: list[int], total_lens: list[int], noises: list[Tensor],
                 b: int, n: int, text_mask_padding: bool, into: HostStaging | None = None) -> HostPack:
    """Lay items out as `DiT.forward_packed` / `DiT.embed_text_packed` read them: item i at
    sum_{j<i} (T_j + ITEM_GAP). noises[i]: [>= T_i, C] float32 on the host. The text is cut at the
    item's frames and `keep` follows `DiT.embed_text` (the text's positions with
    text_mask_padding, else all the item's frames). Writes into `into` (default: fresh buffers)."""
    st = into if into is not None else HostStaging(b, n, noises[0].shape[-1])
    if st.ready is not None:
        st.ready.synchronize()  # the previous batch's copies out of these buffers are done
    x, (ids, pos, seg), (valid, keep, ref) = st.x_np[:n], st.ints_np[:, :n], st.flags_np[:, :n]
    x.fill(0.0)
    ids.fill(0)
    pos.fill(0)
    seg.fill(b)
    valid.fill(False)
    ref.fill(False)
    starts, start = [], 0
    for i, (text, r, t) in enumerate(zip(text_ids, ref_lens, total_lens)):
        k = min(len(text), t)
        x[start: start + t] = noises[i][:t].numpy()
        ids[start: start + k] = np.asarray(text[:k], dtype=np.int64) + 1
        valid[start: start + t] = True
        pos[start: start + t] = np.arange(t)
        seg[start: start + t] = i
        ref[start: start + r] = True
        starts.append(start)
        start += t + ITEM_GAP
    np.logical_and(ids != 0, valid, out=keep) if text_mask_padding else np.copyto(keep, valid)
    st.cu_np[: 4 * b + 1] = packed_cu_seqlens(list(total_lens), b, n)
    return HostPack(st.x[:n], st.ints[0, :n], st.flags[0, :n], st.flags[1, :n], st.ints[1, :n], st.ints[2, :n],
                    st.flags[2, :n], st.cu[: 4 * b + 1], starts)


def static_prologue(dit: DiT, v: BucketViews) -> None:
    """What each bucket's prologue graph captures (once per request, before the steps): the text
    embedding of the bucket's packed items into its static buffers, then what the steps share and
    would otherwise each recompute (about 15 small kernels a step): the input embedding's reference
    and text columns (`DiT.packed_inputs`) and the rotary angles (`DiT.packed_rope`)."""
    items = (v.cu_seqlens.shape[0] - 1) // 4
    cond, uncond = dit.embed_text_packed(v.ids, v.valid, v.keep, v.pos, v.seg, items)
    v.text_cond.copy_(cond)
    v.text_uncond.copy_(uncond)
    v.joined.copy_(dit.packed_inputs(v.cond, v.text_cond, v.text_uncond))
    cos, sin = dit.packed_rope(v.pos, v.cu_seqlens)
    v.cos[: cos.shape[0]].copy_(cos)
    v.sin[: sin.shape[0]].copy_(sin)


def step_rope(dit: DiT, v: BucketViews) -> tuple[Tensor, Tensor]:
    """The views of `v.cos` / `v.sin` the steps read (`DiT.packed_rope`'s shape for this layout)."""
    m = v.cos.shape[0] if dit.packed_rows(v.cu_seqlens)[1] else v.cos.shape[0] // 2
    return v.cos[:m], v.sin[:m]


def static_step(dit: DiT, v: BucketViews, step: Tensor, cfg: Tensor, mods: Tensor | None = None) -> None:
    """One Euler step on a bucket's static buffers, in place: what each CUDA graph captures.

    `step` [2] float32 holds (t0, dt); `cfg` is a 0-d tensor so one graph serves every guidance
    strength (it is rounded to the DiT dtype inside the guidance product: 2.0, 1.5, 2.5 are exact);
    `mods` [DiT.modulation_rows, D]: `dit.modulations(t0)`, precomputed per schedule (`mod_table`;
    None computes them in the step); the input columns and rotary angles come from the prologue
    (`static_prologue`). The same arithmetic as
    `tts.f5.sampler.ode_step`; frames between items stay zero.
    """
    pred, null = dit.forward_packed(v.x, v.cond, v.text_cond, v.text_uncond, step[0], v.valid, v.pos, v.cu_seqlens,
                                    mods, joined=v.joined, rope=step_rope(dit, v))
    v.x.copy_(torch.where(v.valid[:, None], guided_euler(v.x, pred, null, step[1], cfg), 0.0))


def step_table(nfe: int, sway: float | None, use_epss: bool, device: torch.device) -> Tensor:
    """[nfe, 2] float32 on device: row i = (t[i], t[i+1] - t[i]), computed as `sample` computes them."""
    t = timesteps(nfe, sway, use_epss).to(device)
    return torch.stack((t[:-1], t[1:] - t[:-1]), dim=1).contiguous()


@torch.no_grad()
def mod_table(dit: DiT, table: Tensor) -> Tensor:
    """[nfe, DiT.modulation_rows, D] in the DiT's dtype: `dit.modulations` at each step's flow time
    (one time at a time, exactly the product a step would run), for `step_table`'s rows."""
    return torch.stack([dit.modulations(t0) for t0 in table[:, 0]]).contiguous()


# -- the sampler ----------------------------------------------------------------------------------

class FastSampler:
    """`sample(...)` with `tts.f5.sampler.sample`'s signature and results, through bucketed CUDA graphs.

    Build it once per DiT (weights on their final device and dtype), call `warmup()` at start-up,
    then `sample(...)` per batch. Not thread-safe: one batch at a time (Triton runs one `execute`
    per model instance at a time).
    """

    def __init__(self, dit: DiT, options: FastOptions = FastOptions(), log: Callable[[str], None] | None = None):
        if options.mode == "off":
            raise ValueError("FastSampler with mode 'off': use tts.f5.sampler.sample instead")
        self.dit = dit.fuse_qkv()  # one q/k/v product per block (same values; weights become views)
        self.options = options
        self.device = next(dit.parameters()).device
        self.mode = options.mode
        if self.mode == "graph" and self.device.type != "cuda":
            raise ValueError(f"fast-path mode 'graph' needs the DiT on CUDA (it is on {self.device}); "
                             f"use mode 'eager' or {FAST_ENV}=0")
        # CUDA graphs on CUDA; "compile" on a CPU DiT compiles without graphs (tests the plumbing).
        self.use_graphs = self.device.type == "cuda" and self.mode in ("graph", "compile")
        if self.use_graphs and options.fused_gelu:
            dit.fuse_gelu()
        self.log = log or (lambda msg: print(f"[f5-fast] {msg}", file=sys.stderr, flush=True))
        self.fp8 = False
        if options.fp8:
            why_not = fp8.supported(self.device)
            if why_not is None:
                self.fp8 = fp8.convert_dit(dit) > 0
            else:
                self.log(f"{FP8_ENV}: FP8 products are off: {why_not}")
        cfg = dit.cfg
        with torch.inference_mode(False):  # normal tensors even if built under inference mode (see step_context)
            self.buffers = StaticBuffers(max(options.batch_buckets), max(options.length_buckets), cfg.mel_dim,
                                         cfg.text_dim, dit.dtype, self.device, dit.modulation_rows, cfg.dim,
                                         dim_head=cfg.dim_head)
        self.staging = HostStaging(max(options.batch_buckets), max(options.length_buckets), cfg.mel_dim,
                                   pin=self.device.type == "cuda")
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # each bucket's step
        self._prologues: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # each bucket's text embedding
        self._tables: dict[tuple[int, float | None, bool], tuple[Tensor, Tensor]] = {}
        self._compiled = False
        self.ready = self.mode == "eager"  # the other modes become ready in warmup()
        #: Batches handed to a path so far (counted as they start): "graph" (a captured bucket's
        #: graphs), "uncaptured" (a bucket without a graph: its capture failed, or this mode captures
        #: none, as "eager" or "compile" on a CPU: the static step run directly), "eager" (beyond the
        #: buckets, another DiT, or the fast path not ready: the eager sampler). Tests read it to know
        #: which path produced an output.
        self.served: Counter = Counter()
        self.stats: dict = {"mode": self.mode, "fused_gelu": bool(self.use_graphs and options.fused_gelu and not self.fp8),
                            "fp8": self.fp8}
        if options.compile_mode:
            self.stats["compile_mode"] = options.compile_mode

    # -- public ---------------------------------------------------------------------------------
    def bucket(self, batch: int, packed: int) -> tuple[int, int] | None:
        """The (items, packed frames) bucket a batch runs in (`packed_length` of its item lengths),
        or None when it exceeds the largest."""
        b = bucket_for(batch, self.options.batch_buckets)
        n = None if b is None else bucket_for(packed, self.options.lengths_for(b))
        return None if b is None or n is None else (b, n)

    def buckets(self) -> list[tuple[int, int]]:
        """Every (b, n) a batch can land in: n at least b small items, at most b items of
        MAX_ITEM_FRAMES (the smallest n above that included)."""
        out = []
        for b in self.options.batch_buckets:
            lengths = self.options.lengths_for(b)
            top = bucket_for(b * (MAX_ITEM_FRAMES + ITEM_GAP), lengths) or max(lengths)
            out += [(b, n) for n in lengths if b * (ITEM_GAP + 1) <= n <= top]
        return out

    @torch.no_grad()
    def warmup(self, buckets: list[tuple[int, int]] | None = None) -> dict:
        """Compile (mode "compile") and capture one CUDA graph per bucket; returns timing stats.

        Captures the largest bucket first so all graphs share one memory pool. Any compile failure
        falls back to capturing the eager step; a failed self-check turns the fast path off (the
        eager sampler then serves), with the reason logged and kept in `stats`.
        """
        t_start = time.perf_counter()
        buckets = sorted(buckets or self.buckets(), key=lambda bt: (bt[0] * bt[1], bt), reverse=True)
        stats = self.stats
        stats.update(buckets=len(buckets), dtype=str(self.dit.dtype).replace("torch.", ""),
                     device=str(self.device))
        if self.use_graphs:  # before compiling: the compiled blocks and the graphs take the chosen kernel
            stats["attention"] = choose_packed_attention(self.dit.cfg.heads, self.dit.cfg.dim_head, self.dit.dtype,
                                                         self.device, self.options.attention)
        if self.mode == "compile" and self.use_graphs:
            stats["conv"] = choose_conv_form(self.dit, self.options.conv)
        if self.mode == "compile":
            stats["cache_dir"] = str(configure_compile_cache(self.options.cache_dir))
            t0 = time.perf_counter()
            try:
                try:
                    self._compile_blocks()
                except Exception as exc:  # noqa: BLE001 - the Triton convolution inside: retry without it
                    if self.dit.input_embed.conv_pos_embed.form != "kernel":
                        raise
                    stats["conv"].update(chosen="matmul", compile_error=f"{type(exc).__name__}: {exc}"[:1000])
                    self.log(f"compiling with the Triton convolution failed, retrying with the product form: "
                             f"{stats['conv']['compile_error']}")
                    self._uncompile_blocks()  # back to nn.Conv1d; _compile_blocks then takes the product form
                    self._compile_blocks()
                stats["compile_s"] = round(time.perf_counter() - t0, 2)
            except Exception as exc:  # noqa: BLE001 - any compiler failure: keep serving, uncompiled
                self._uncompile_blocks()
                self.mode = stats["mode"] = "graph" if self.use_graphs else "eager"
                stats["compile_error"] = f"{type(exc).__name__}: {exc}"[:2000]
                self.log(f"torch.compile failed, capturing the eager step instead: {stats['compile_error']}")
        if self.use_graphs:
            t0 = time.perf_counter()
            self._capture_all(buckets)
            stats["capture_s"] = round(time.perf_counter() - t0, 2)
            stats["graphs"] = len(self._graphs)
        self.ready = True
        if self.options.self_check:
            self._self_check(stats)
        stats["warmup_s"] = round(time.perf_counter() - t_start, 2)
        self.log(f"{WARMUP_LOG_PREFIX} {json.dumps(stats)}")
        return stats

    @torch.no_grad()
    def sample(self, dit: DiT, cond_mel: Tensor, text_ids: Tensor, ref_lens: Tensor, total_lens: Tensor,
               noise: Tensor, nfe: int, cfg_strength: float, sway: float | None, use_epss: bool = True) -> Tensor:
        """Same arguments, shapes and result as `tts.f5.sampler.sample` (float32 [B, T, mel]).

        The padded layout's entry (tests, the self-check, tools): it reads the batch back to the
        host and runs `sample_items`; the pipeline calls `sample_items` with host inputs directly."""
        b, frames, mel_dim = noise.shape
        lens = [int(n) for n in total_lens.tolist()]
        if dit is not self.dit or self.bucket(b, packed_length(lens)) is None or not self.ready:
            self.served["eager"] += 1
            with eager_stance():
                return eager_sample(dit, cond_mel, text_ids, ref_lens, total_lens, noise, nfe, cfg_strength,
                                    sway, use_epss)
        if cond_mel.shape != noise.shape or text_ids.shape[0] != b:
            raise ValueError(f"batch shapes disagree: cond_mel {tuple(cond_mel.shape)}, noise {tuple(noise.shape)}, "
                             f"text_ids {tuple(text_ids.shape)}")
        if max(lens) > frames or min(lens) < 1:
            raise ValueError(f"total_lens {lens} must lie in [1, {frames}] (the batch's frame count)")
        refs = [int(r) for r in ref_lens.tolist()]
        ids = [[int(t) for t in row if t >= 0] for row in text_ids.cpu().tolist()]
        noise_h, cond_h = noise.float().cpu(), cond_mel.float().cpu()
        mels = self.sample_items(ids, [cond_h[i, :r] for i, r in enumerate(refs)], lens,
                                 [noise_h[i] for i in range(b)], nfe, cfg_strength, sway, use_epss)
        out = torch.zeros(b, frames, mel_dim, dtype=torch.float32, device=self.device)
        for i, m in enumerate(mels):
            out[i, : lens[i]] = m
        return out

    @torch.no_grad()
    def sample_items(self, text_ids: list[list[int]], ref_mels: list[Tensor], total_lens: list[int],
                     noises: list[Tensor], nfe: int, cfg_strength: float, sway: float | None,
                     use_epss: bool = True) -> list[Tensor]:
        """The batch as items: text_ids[i] token ids (reference + target text); ref_mels[i]
        [R_i, mel] reference mel (any device); total_lens[i] frames (R_i < T_i); noises[i] [>= T_i,
        mel] on the host (`make_noise`). Returns per item float32 [T_i, mel] on the sampler's
        device: the reference mel, then the generated frames; equal to `sample`'s rows.

        Per request the host packs the batch (`pack_on_host`), copies it into the static buffers
        without waiting for the stream, replays the bucket's prologue graph (text embedding) and
        its step graph `nfe` times; nothing reads back from the device."""
        b = len(total_lens)
        lens = [int(t) for t in total_lens]
        refs = [int(m.shape[0]) for m in ref_mels]
        if not (len(text_ids) == len(ref_mels) == len(noises) == b) or b == 0:
            raise ValueError(f"sample_items needs one text, reference and noise per item; got {len(text_ids)}, "
                             f"{len(ref_mels)}, {len(noises)} for {b} lengths")
        if nfe < 1:
            raise ValueError(f"nfe must be >= 1; got {nfe}")
        if any(not 0 <= r < t for r, t in zip(refs, lens)) or any(nz.shape[0] < t for nz, t in zip(noises, lens)):
            raise ValueError(f"total_lens {lens} must exceed the reference lengths {refs} and fit the noise "
                             f"({[int(nz.shape[0]) for nz in noises]} frames)")
        key = self.bucket(b, packed_length(lens))
        if key is None or not self.ready:
            self.served["eager"] += 1
            return self._eager_items(text_ids, ref_mels, lens, noises, nfe, cfg_strength, sway, use_epss)
        v = self.buffers.views(*key)
        with record_function("f5.load_inputs"):  # names for tools/gpu_f5_request_profile.py
            host = pack_on_host(text_ids, refs, lens, noises, key[0], key[1], self.dit.cfg.text_mask_padding,
                                into=self.staging)
            host.copy_into(v, non_blocking=True)
            if self.device.type == "cuda":
                self.staging.ready = torch.cuda.Event()
                self.staging.ready.record()
            v.cond.zero_()
            for start, m in zip(host.starts, ref_mels):
                v.cond[start: start + m.shape[0]].copy_(m, non_blocking=True)
            table, mods = self._step_table(nfe, sway, use_epss)
            self.buffers.cfg.fill_(float(cfg_strength))
        buf = self.buffers
        graph, prologue = self._graphs.get(key), self._prologues.get(key)
        self.served["graph" if graph is not None else "uncaptured"] += 1
        with step_context(), record_function("f5.steps"):
            if prologue is not None:
                prologue.replay()
            else:
                static_prologue(self.dit, v)
            for i in range(nfe):
                buf.step.copy_(table[i])
                buf.mods.copy_(mods[i])
                if graph is not None:
                    graph.replay()
                else:
                    static_step(self.dit, v, buf.step, buf.cfg, buf.mods)
            out = torch.where(v.ref[:, None], v.cond, v.x)  # a new tensor: the buffers are reused
        return [out[start: start + t] for start, t in zip(host.starts, lens)]

    # -- internals ------------------------------------------------------------------------------
    def _eager_items(self, text_ids, ref_mels, lens, noises, nfe, cfg_strength, sway, use_epss) -> list[Tensor]:
        """`sample_items` through the eager sampler (shapes beyond the buckets, fast path not ready)."""
        dev, b, frames = self.device, len(lens), max(lens)
        mel_dim = noises[0].shape[-1]
        cond = torch.zeros(b, frames, mel_dim, dtype=torch.float32, device=dev)
        noise = torch.zeros(b, frames, mel_dim, dtype=torch.float32, device=dev)
        ids = torch.full((b, max(len(t) for t in text_ids) or 1), -1, dtype=torch.long)
        for i, (m, t) in enumerate(zip(ref_mels, lens)):
            cond[i, : m.shape[0]] = m.to(dev)
            noise[i, :t] = noises[i][:t].to(dev)
            ids[i, : len(text_ids[i])] = torch.as_tensor(list(text_ids[i]), dtype=torch.long)
        refs = torch.tensor([int(m.shape[0]) for m in ref_mels])
        with eager_stance():
            out = eager_sample(self.dit, cond, ids.to(dev), refs, torch.tensor(lens), noise, nfe, cfg_strength,
                               sway, use_epss)
        return [out[i, :t] for i, t in enumerate(lens)]

    def _step_table(self, nfe: int, sway: float | None, use_epss: bool) -> tuple[Tensor, Tensor]:
        """(step_table, mod_table) of a schedule, made once per (nfe, sway, EPSS) and kept."""
        key = (int(nfe), None if sway is None else float(sway), bool(use_epss))
        tables = self._tables.get(key)
        if tables is None:
            table = step_table(nfe, sway, use_epss, self.device)
            with step_context():  # normal tensors (not inference tensors), like the static buffers
                tables = self._tables[key] = (table, mod_table(self.dit, table))
        return tables

    def _fill_dummy(self, v: BucketViews, seed: int = 0, lens: list[int] | None = None) -> None:
        """Plausible (non-zero, finite) packed inputs for compiling and capturing; values do not
        matter. `lens`: the items' frames (default: random, half to all of an item's share)."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        n, b = v.valid.shape[0], (v.cu_seqlens.shape[0] - 1) // 4
        per = max(n // b - ITEM_GAP, 1)
        if lens is None:
            lens = [int(torch.randint(max(per // 2, 1), per + 1, (1,), generator=gen)) for _ in range(b)]
        v.cond.copy_(torch.randn(n, v.cond.shape[-1], generator=gen))
        v.text_cond.copy_(torch.randn(n, v.text_cond.shape[-1], generator=gen))
        v.text_uncond.copy_(torch.randn(n, v.text_uncond.shape[-1], generator=gen))
        texts = [torch.randint(0, self.dit.cfg.text_num_embeds, (max(t // 2, 1),), generator=gen).tolist() for t in lens]
        noises = [torch.randn(t, v.x.shape[-1], generator=gen) for t in lens]
        host = pack_on_host(texts, [t // 3 for t in lens], lens, noises, b, n, self.dit.cfg.text_mask_padding)
        host.copy_into(v)  # x: each item's noise, zero in the gaps, as a request lays it out
        self.buffers.step.copy_(torch.tensor([0.25, 0.05]))
        self.buffers.cfg.fill_(2.0)
        self.buffers.mods.copy_(self.dit.modulations(self.buffers.step[0]))

    def _prime_shapes(self) -> list[tuple[int, int]]:
        """Buckets that compile every variant of the blocks once: one-item buckets run the halves as
        two padded rows (`DiT.forward_packed`), others packed; per variant two buckets that differ
        in size, the first compiles static, the second recompiles dynamic (torch's automatic dynamic
        shapes), after which every bucket of that variant reuses one graph. Fixed (so the on-disk
        cache keys repeat across start-ups), with sizes that never coincide (sizes that coincide
        would be tied into one symbol)."""
        bs, ts = self.options.batch_buckets, self.options.length_buckets
        t_pool = [t for t in ts if t >= 256] or list(ts)
        t0, t1 = t_pool[0], (t_pool[1] if len(t_pool) > 1 else t_pool[0])
        shapes = [(1, t0), (1, t1)] if bs[0] == 1 else []
        many = [b for b in bs if b > 1]
        if many:
            shapes += [(many[0], t0), (many[1] if len(many) > 1 else many[0], t1)]
        return shapes

    def _compile_blocks(self) -> None:
        """Regional compilation: each DiT block's call goes through torch.compile (same code for all
        blocks, so one compiled graph serves the whole stack), dynamic in batch and frames."""
        kwargs = {"backend": self.options.compile_backend}
        if self.options.compile_mode and self.options.compile_backend == "inductor":
            kwargs["mode"] = self.options.compile_mode
        for block in self.dit.transformer_blocks:
            block.compile(**kwargs)
        # the position convolutions in the form chosen at start-up (see ConvPositionEmbedding.form)
        cpe = self.dit.input_embed.conv_pos_embed
        if cpe.form == "conv":
            cpe.use_form("matmul")
        cpe.compile(**kwargs)
        self._compiled = True
        for i, (b, t) in enumerate(self._prime_shapes()):
            v = self.buffers.views(b, t)
            self._fill_dummy(v, seed=i)
            with step_context():
                static_step(self.dit, v, self.buffers.step, self.buffers.cfg, self.buffers.mods)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _uncompile_blocks(self) -> None:
        cpe = self.dit.input_embed.conv_pos_embed
        cpe.use_form("conv")
        for module in [*self.dit.transformer_blocks, cpe]:
            module._compiled_call_impl = None  # what nn.Module.compile() set: back to the plain call
        self._compiled = False

    def _capture_all(self, buckets: list[tuple[int, int]]) -> None:
        """Two graphs per bucket (its step and its prologue, the text embedding), largest bucket
        first, all in one memory pool (no tensor outlives a capture, and graphs never run at once,
        so they can share it). A bucket whose capture fails is logged and runs uncaptured (correct,
        slower)."""
        dev = self.device
        # One pool for every graph; a capture that fails may leave the allocator recording into
        # its pool (seen on an H100 in a test: every later capture into that pool then failed with
        # "beginAllocateToPool: already recording to mempool_id"), so later captures take a new one.
        pools = [torch.cuda.graph_pool_handle()]
        side = torch.cuda.Stream(device=dev)
        errors: dict[str, str] = {}
        warm = buckets_to_warm(buckets, self.options.capture_warmup)
        retried = 0

        def warm_up(v: BucketViews) -> None:  # off the capture: lazy inits, kernel specialisation, cuBLAS
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                static_step(self.dit, v, self.buffers.step, self.buffers.cfg, self.buffers.mods)
                static_prologue(self.dit, v)
            torch.cuda.current_stream(dev).wait_stream(side)

        def capture(v: BucketViews) -> tuple[torch.cuda.CUDAGraph, torch.cuda.CUDAGraph]:
            graph, prologue = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=pools[-1], capture_error_mode="thread_local"):
                    static_step(self.dit, v, self.buffers.step, self.buffers.cfg, self.buffers.mods)
                with torch.cuda.graph(prologue, pool=pools[-1], capture_error_mode="thread_local"):
                    static_prologue(self.dit, v)
            except Exception:
                pools.append(torch.cuda.graph_pool_handle())
                raise
            return graph, prologue

        took: list[tuple[float, str]] = []  # (seconds, bucket) of each bucket's warm-up and capture
        with torch.cuda.device(dev), step_context():
            for b, t in buckets:
                v = self.buffers.views(b, t)
                self._fill_dummy(v)
                t0 = time.perf_counter()
                try:
                    if (b, t) in warm:
                        warm_up(v)
                        graphs = capture(v)
                    else:
                        try:
                            graphs = capture(v)
                        except Exception:  # noqa: BLE001 - it needed its warm-up after all: warm, capture again
                            torch.cuda.synchronize(dev)
                            retried += 1
                            warm_up(v)
                            graphs = capture(v)
                    self._graphs[(b, t)], self._prologues[(b, t)] = graphs
                except Exception as exc:  # noqa: BLE001 - keep the other buckets
                    errors[f"{b}x{t}"] = f"{type(exc).__name__}: {exc}"[:500]
                    torch.cuda.synchronize(dev)
                took.append((time.perf_counter() - t0, f"{b}x{t}"))
            torch.cuda.synchronize(dev)
        self.stats.update(capture_warmup=self.options.capture_warmup, warmed_buckets=len(warm),
                          capture_retries=retried, **capture_spread(took))
        if errors:
            self.stats["capture_errors"] = errors
            self.log(f"{len(errors)} bucket(s) not captured (they run uncaptured): {errors}")

    def _self_check(self, stats: dict) -> None:
        """One small batch through the fast path and through the eager sampler; a mismatch (or a
        non-finite result) switches the fast path off rather than serve wrong audio."""
        dit, dev = self.dit, self.device
        cfg = dit.cfg
        frames = min(300, max(max(self.options.length_buckets) // 2 - ITEM_GAP, 2))
        lens = torch.tensor([frames, max(frames * 2 // 3, 2)])
        if self.bucket(2, packed_length(lens.tolist())) is None:
            return
        gen = torch.Generator(device="cpu").manual_seed(1234)
        refs = lens // 3
        noise = torch.randn(2, frames, cfg.mel_dim, generator=gen)
        noise[1, lens[1]:] = 0
        cond = torch.randn(2, frames, cfg.mel_dim, generator=gen)
        cond[(torch.arange(frames)[None, :] >= refs[:, None])] = 0
        ids = torch.randint(0, cfg.text_num_embeds, (2, 40), generator=gen)
        args = (cond.to(dev), ids.to(dev), refs, lens, noise.to(dev), SELF_CHECK_NFE, 2.0, -1.0)
        fast = self.sample(dit, *args)  # two items: the packed layout
        # and the second item alone: a one-item bucket (the two halves as padded rows)
        n1 = int(lens[1])
        solo = self.sample(dit, cond[1:, :n1].to(dev), ids[1:].to(dev), refs[1:], lens[1:], noise[1:, :n1].to(dev),
                           SELF_CHECK_NFE, 2.0, -1.0)
        with eager_stance(), reference_forms(dit):  # the plain feed-forward and convolutions
            ref = eager_sample(dit, *args)
        fast = torch.cat((fast.flatten(), solo.flatten()))
        ref = torch.cat((ref.flatten(), ref[1, :n1].flatten()))
        err = float((fast - ref).norm() / ref.norm().clamp_min(1e-12))
        tol = SELF_CHECK_TOL_FP8 if self.fp8 else SELF_CHECK_TOL.get(dit.dtype, 5e-2)
        stats["self_check_rel_err"] = round(err, 6)
        if not math.isfinite(err) or err > tol:
            self.ready = False
            self._graphs.clear()
            self._prologues.clear()
            stats["self_check_failed"] = f"relative error {err:.3g} > {tol} (fast path off; eager sampler serves)"
            self.log(f"SELF-CHECK FAILED: {stats['self_check_failed']}")


# -- Vocos on a whole batch ---------------------------------------------------------------------

@torch.no_grad()
def vocode_batch(vocos, mels: list[Tensor]) -> list[Tensor]:
    """Vocos on several mels at once; each result equals `vocos.decode(mel[None])[0]` (float rounding).

    mels: each [mel_dim, T_i] (T_i >= 2). Returns float32 audio [(T_i - 1) * hop] per item on the
    vocoder's device. Only the depthwise convolutions mix frames, and a solo decode zero-pads each
    conv's input past T_i; so every conv input is zeroed past each item's length here, and the
    inverse STFT leaves each item's frames past T_i out of its audio and window envelope
    (`tts.f5.vocos.centered_istft`).
    """
    if not mels:
        return []
    cfg = vocos.config
    param = vocos.head.out.weight
    lens = [int(m.shape[-1]) for m in mels]
    for m in mels:
        if m.dim() != 2 or m.shape[0] != cfg.input_channels or m.shape[1] < 2:
            raise ValueError(f"vocode_batch takes mels of shape [{cfg.input_channels}, T >= 2]; got {tuple(m.shape)}")
    if len(mels) == 1:
        return [vocos.decode(mels[0][None])[0]]
    t_max = max(lens)
    x = torch.zeros(len(mels), cfg.input_channels, t_max, device=param.device, dtype=param.dtype)
    for i, m in enumerate(mels):
        x[i, :, : lens[i]] = m.to(device=param.device, dtype=param.dtype)
    # lengths to the device without a stream sync: a blocking copy would wait for the DiT steps
    # queued before it, and the vocoder's launches would then start on an idle GPU (a pageable
    # non-blocking copy is staged by the driver at once, with no sync)
    lens_t = torch.tensor(lens).to(param.device, non_blocking=True)
    keep = (torch.arange(t_max, device=param.device)[None, :] < lens_t[:, None])[:, None, :]  # [B, 1, T]
    bb = vocos.backbone
    h = bb.embed(x)  # x is already zero past each length
    h = bb.norm(h.transpose(1, 2)).transpose(1, 2)
    for block in bb.convnext:
        r = block.dwconv(h.masked_fill(~keep, 0.0)).transpose(1, 2)
        r = block.pwconv2(block.act(block.pwconv1(block.norm(r))))
        if block.gamma is not None:
            r = block.gamma * r
        h = h + r.transpose(1, 2)
    spec = vocos.head.spectrum(bb.final_layer_norm(h.transpose(1, 2)))  # [B, bins, T] complex64
    audio = vocos.head.istft(spec, lens_t)  # per item: its own frames and window envelope
    return [audio[i, : (lens[i] - 1) * cfg.hop_length] for i in range(len(mels))]


__all__ = ["FAST_ENV", "ITEM_GAP", "MODES", "FastOptions", "FastSampler", "StaticBuffers", "BucketViews", "bucket_for",
           "packed_cu_seqlens", "packed_length",
           "batch_buckets_for", "configure_compile_cache", "default_cache_dir", "eager_stance", "step_context",
           "fast_options_from_env", "mod_table", "static_step", "step_table", "vocode_batch"]
