"""The DiT's attention over packed sequences as one Triton kernel (CUDA; a fast-path choice).

The fast path puts every item's frames back to back on one token axis (conditional half, then
unconditional half) and attends within each sequence of `cu_seqlens` (`tts.f5.dit.packed_attention`).
Measured on an H200 (torch 2.11, bf16, 16 heads of 64): one request at concurrency 1 is two rows
of ~860 frames, and cuDNN's fused SDPA kernel on the padded rows ran at ~180 TFLOP/s (34 us a
layer, 29 % of a 2.6 ms ODE step); at concurrency 8 flash attention's varlen kernel ran at ~140
TFLOP/s (34 % of a 15 ms step). Both spend much of their time outside the products at these short
sequences. This kernel is the textbook online-softmax loop (one program: BLOCK_M queries of one
head of one sequence; keys and values in BLOCK_N blocks; float32 running max, sum and output)
with two choices that suit the DiT's shapes:

- the grid covers the *tiles that exist*: program t of a head scans `cu_seqlens` (at most 33
  entries) and finds its sequence and query block, so a bucket's graph launches
  ~N / BLOCK_M + S programs per head, whatever the items' lengths in that bucket, instead of
  (longest sequence / BLOCK_M) x S;
- q, k, v are read through their strides (a view of the fused q/k/v projection works as it is),
  and the output is written as [N, heads, dim_head], the layout the output projection reads.

    out[i] = softmax(q[i] . k[j] / sqrt(dim_head) over j in i's sequence) @ v[j]

Exposed as the custom op `f5studio::packed_attention_triton` (opaque to torch.compile, captured by
CUDA graphs like any kernel). `available()` says whether it can run here; the fast path times it
against the other kernels at start-up (`tts.f5.fast.choose_packed_attention`) and keeps it only
where it is faster and agrees with them.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from tts.triton_kernels import can_run

#: Tile shapes and launch settings, by name: the start-up probe times each on the real shapes and
#: keeps the fastest (`CONFIGS` order is only the tie-break). 64-query tiles give more programs for
#: the short sequences of one request (2 x ~860 frames x 16 heads: ~450 programs over 132 SMs);
#: 128-query tiles halve the key/value reads per query at larger batches.
CONFIGS: dict[str, dict] = {
    "m64n64": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    "m128n64": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
    "m128n128": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
}
DEFAULT_CONFIG = "m64n64"

#: Sequence slots every program scans (a compile-time size): 64 holds the 4 b + 1 boundaries of
#: any batch bucket up to 15 items, so one compile per tile config serves every bucket (each
#: distinct size would be a compile of its own at start-up).
MIN_S_PAD = 64

LOG2E = 1.4426950408889634  # the softmax runs in base 2 (exp2): scores are scaled by log2(e) first


@functools.lru_cache(maxsize=1)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def packed_attn_fwd(q_ptr, k_ptr, v_ptr, o_ptr, cu_ptr, S, sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, so_n, so_h,
                        qk_scale, D: tl.constexpr, S_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
        tile = tl.program_id(0)
        head = tl.program_id(1)
        # which sequence and query block this program serves: tiles are numbered sequence by sequence
        idx = tl.arange(0, S_PAD)
        starts = tl.load(cu_ptr + idx, mask=idx < S, other=0)
        ends = tl.load(cu_ptr + idx + 1, mask=idx < S, other=0)
        blocks = (ends - starts + BLOCK_M - 1) // BLOCK_M
        last = tl.cumsum(blocks, 0)  # inclusive: tiles of sequences 0..s
        seq = tl.sum((last <= tile).to(tl.int32), 0)
        if seq < S:
            here = idx == seq
            start = tl.sum(tl.where(here, starts, 0), 0)
            length = tl.sum(tl.where(here, ends - starts, 0), 0)
            m0 = (tile - tl.sum(tl.where(here, last - blocks, 0), 0)) * BLOCK_M
            offs_m = m0 + tl.arange(0, BLOCK_M)
            offs_n = tl.arange(0, BLOCK_N)
            offs_d = tl.arange(0, D)
            rows_ok = offs_m < length
            tok_m = (start + offs_m).to(tl.int64)
            q = tl.load(q_ptr + tok_m[:, None] * sq_n + head * sq_h + offs_d[None, :], mask=rows_ok[:, None],
                        other=0.0)
            m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
            l_i = tl.zeros((BLOCK_M,), tl.float32)
            acc = tl.zeros((BLOCK_M, D), tl.float32)
            for n0 in range(0, length, BLOCK_N):
                cols = n0 + offs_n
                cols_ok = cols < length
                tok_n = (start + cols).to(tl.int64)
                k = tl.load(k_ptr + tok_n[:, None] * sk_n + head * sk_h + offs_d[None, :], mask=cols_ok[:, None],
                            other=0.0)
                v = tl.load(v_ptr + tok_n[:, None] * sv_n + head * sv_h + offs_d[None, :], mask=cols_ok[:, None],
                            other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
                s = tl.where(cols_ok[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every block holds a key of the sequence
                p = tl.exp2(s - m_new[:, None])
                alpha = tl.exp2(m_i - m_new)
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
                m_i = m_new
            out = acc / l_i[:, None]
            tl.store(o_ptr + tok_m[:, None] * so_n + head * so_h + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
                     mask=rows_ok[:, None])

    return triton, packed_attn_fwd


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether the kernel can run in this process (CUDA and an importable Triton)."""
    return can_run(_kernel)


def tiles_bound(tokens: int, sequences: int, block_m: int) -> int:
    """Programs per head that cover any split of `tokens` into `sequences` sequences: each sequence
    needs ceil(len / block_m) query tiles, and sum(ceil(len_i / m)) <= tokens / m + sequences."""
    return -(-tokens // block_m) + sequences


@torch.library.custom_op("f5studio::packed_attention_triton", mutates_args=())
def packed_attention_triton(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor,
                            config: str = DEFAULT_CONFIG) -> Tensor:
    """Attention within each sequence of a packed token axis, on CUDA: q, k, v [N, H, Dh] (any
    strides with a unit last stride), cu_seqlens int32 [S + 1] (cu_seqlens[-1] == N) -> [N, H, Dh]
    contiguous; `config` names the tiles (`CONFIGS`). The same arithmetic as
    `tts.f5.dit.packed_attention` (scale 1 / sqrt(Dh))."""
    triton, fwd = _kernel()
    n, h, d = q.shape
    if k.shape != q.shape or v.shape != q.shape or d & (d - 1) or d < 16:
        raise ValueError(f"packed_attention_triton: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         f"must agree, with a power-of-two head size of at least 16")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if config not in CONFIGS:
        raise ValueError(f"packed_attention_triton: config must be one of {tuple(CONFIGS)}; got {config!r}")
    cfg = CONFIGS[config]
    s = cu_seqlens.shape[0] - 1
    out = torch.empty(n, h, d, device=q.device, dtype=q.dtype)
    grid = (tiles_bound(n, s, cfg["BLOCK_M"]), h)
    # fp32 (tests, debugging): exact products, not Triton's default TF32 for float32 dots
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    fwd[grid](q, k, v, out, cu_seqlens, s, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
              v.stride(1), out.stride(0), out.stride(1), LOG2E / math.sqrt(d), D=d,
              S_PAD=max(MIN_S_PAD, triton.next_power_of_2(s + 1)), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
              PRECISION=precision, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


@packed_attention_triton.register_fake
def _(q, k, v, cu_seqlens, config=DEFAULT_CONFIG):
    return q.new_empty(q.shape)
