"""The decode step's attention as two Triton kernels (split-K "flash decoding"; CUDA only).

One new query per row over its slot's cached keys plus its own new key, grouped-query heads (Qwen2:
14 query heads share 2 KV heads). The matrix-product form in `tts.spark.fast_step.decode_layer`
costs ~8 kernels a layer (scores, mask, the new key's score, concatenation, softmax, a contiguous
copy of the probabilities, the value product, the new value's term): ~190 of the ~600 launches of
a 24-layer step at one row, each a few microseconds of mostly idle GPU. Here:

1. `partials`: program (row r, KV head g, split s) takes keys [s*CHUNK, (s+1)*CHUNK) of slot r
   that `cached[r]` marks, for the REP query heads sharing g: scores q.k * scale in float32, and
   the split's running max m, sum of exponentials l and weighted value sum acc (online softmax);
2. `combine`: program (r, query head) merges the splits with the new key's score and value:

       out = (sum_s e^(m_s - M) acc_s + e^(x_new - M) v_new) / (sum_s e^(m_s - M) l_s + e^(x_new - M))

   with M the largest of the m_s and x_new (the new key is always there, so M is finite).

Same function as the matrix-product form (`reference` below); float32 accumulation and
probabilities throughout (the matrix-product form rounds scores and probabilities to the model
dtype first), so in bfloat16 the two agree to that rounding, in float32 to ~1e-6.

Exposed as the custom op `sparkstudio::decode_attention` (opaque to torch.compile, captured by CUDA
graphs like any kernel). `available()` says whether it can run here (CUDA and Triton); the
Triton interpreter runs it on the CPU for tests (TRITON_INTERPRET=1).

Shapes: R rows (slots 0..R-1), H query heads, KV heads, REP = H / KV, D head width, B cache slots,
S cache positions, L keys looked at (the bucket).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from tts.triton_kernels import can_run

#: Keys per program: 64 keys x 64 dims of K and V (16 KB in bf16) in one block. At one row a
#: 1,000-key bucket is then 16 splits x 2 KV heads = 32 programs, each a single block: the step is
#: latency-bound, so more programs with one load each beat fewer looping ones.
CHUNK = 64
#: Splits `combine` loads at once: one load of each up to 32 x CHUNK = 2,048 keys. A program per
#: query head (14 at one row) instead of one per KV head looping over the splits one at a time: that
#: form took ~11 us a layer at one row (H100, `spark-step` profile, 0.27 ms of a 1.4 ms step), its
#: two programs waiting on a chain of dependent loads.
COMBINE_SPLITS = 32
#: Query heads per KV head padded to tl.dot's smallest tile (Qwen2.5-0.5B has 7).
REP_PAD = 16
NUM_WARPS = 4


@functools.lru_cache(maxsize=1)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def partials(q_ptr, q_sr, q_sh, k_ptr, v_ptr, c_sb, c_sg, c_ss, mask_ptr, mask_sr, length,
                 m_ptr, l_ptr, acc_ptr, scale, KV: tl.constexpr, REP: tl.constexpr, RP: tl.constexpr,
                 D: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr, NSPLIT: tl.constexpr,
                 PRECISION: tl.constexpr):
        rg = tl.program_id(0)
        s = tl.program_id(1)
        r = rg // KV
        g = rg % KV
        hi = tl.arange(0, RP)
        d = tl.arange(0, DP)
        dm = d < D
        n = s * BLOCK + tl.arange(0, BLOCK)
        q = tl.load(q_ptr + r * q_sr + (g * REP + hi)[:, None] * q_sh + d[None, :],
                    mask=(hi < REP)[:, None] & dm[None, :], other=0.0)
        valid = tl.load(mask_ptr + r * mask_sr + n, mask=n < length, other=0) != 0
        base = r.to(tl.int64) * c_sb + g * c_sg
        kvm = valid[:, None] & dm[None, :]
        kt = tl.load(k_ptr + base + n[:, None] * c_ss + d[None, :], mask=kvm, other=0.0)
        x = tl.dot(q, tl.trans(kt), input_precision=PRECISION) * scale  # [RP, BLOCK] float32
        x = tl.where(valid[None, :], x, float("-inf"))
        m = tl.max(x, axis=1)
        m_safe = tl.where(m == float("-inf"), 0.0, m)  # a split with no cached key: l = 0, acc = 0
        p = tl.exp(x - m_safe[:, None])
        l = tl.sum(p, axis=1)
        vt = tl.load(v_ptr + base + n[:, None] * c_ss + d[None, :], mask=kvm, other=0.0)
        acc = tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)  # [RP, DP]
        at = (rg * NSPLIT + s) * RP + hi
        tl.store(m_ptr + at, m)
        tl.store(l_ptr + at, l)
        tl.store(acc_ptr + at[:, None] * DP + d[None, :], acc)

    @triton.jit
    def combine(q_ptr, q_sr, q_sh, kn_ptr, kn_sr, kn_sh, vn_ptr, vn_sr, vn_sh, m_ptr, l_ptr, acc_ptr,
                out_ptr, n_split, scale, KV: tl.constexpr, REP: tl.constexpr, RP: tl.constexpr,
                D: tl.constexpr, DP: tl.constexpr, NSPLIT: tl.constexpr, SB: tl.constexpr):
        pid = tl.program_id(0)  # (row, KV head, query head of the group)
        rg = pid // REP
        h = pid % REP
        r = rg // KV
        g = rg % KV
        head = g * REP + h
        d = tl.arange(0, DP)
        dm = d < D
        q = tl.load(q_ptr + r * q_sr + head * q_sh + d, mask=dm, other=0.0).to(tl.float32)
        kn = tl.load(kn_ptr + r * kn_sr + g * kn_sh + d, mask=dm, other=0.0).to(tl.float32)
        vn = tl.load(vn_ptr + r * vn_sr + g * vn_sh + d, mask=dm, other=0.0).to(tl.float32)
        x_new = tl.sum(q * kn, axis=0) * scale
        sb = tl.arange(0, SB)
        big = x_new
        for s0 in range(0, n_split, SB):  # SB splits a load: one iteration up to SB * CHUNK keys
            s = s0 + sb
            ms = tl.load(m_ptr + (rg * NSPLIT + s) * RP + h, mask=s < n_split, other=float("-inf"))
            big = tl.maximum(big, tl.max(ms, axis=0))
        w_new = tl.exp(x_new - big)
        den = w_new
        num = w_new * vn
        for s0 in range(0, n_split, SB):
            s = s0 + sb
            live = s < n_split
            at = (rg * NSPLIT + s) * RP + h
            w = tl.exp(tl.load(m_ptr + at, mask=live, other=float("-inf")) - big)  # 0 for a split with no key
            den += tl.sum(w * tl.load(l_ptr + at, mask=live, other=0.0), axis=0)
            acc = tl.load(acc_ptr + at[:, None] * DP + d[None, :], mask=live[:, None], other=0.0)
            num += tl.sum(w[:, None] * acc, axis=0)
        out = num / den
        tl.store(out_ptr + (r * KV * REP + head) * D + d, out.to(out_ptr.dtype.element_ty), mask=dm)

    return triton, partials, combine


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether the kernels can run in this process (CUDA and an importable Triton)."""
    return can_run(_kernels)


def _check(q: Tensor, k_new: Tensor, v_new: Tensor, keys: Tensor, values: Tensor, cached: Tensor) -> None:
    r, h, d = q.shape
    kv = k_new.shape[1]
    if h % kv or k_new.shape != (r, kv, d) or v_new.shape != (r, kv, d):
        raise ValueError(f"decode_attention: q {tuple(q.shape)}, k_new {tuple(k_new.shape)}, "
                         f"v_new {tuple(v_new.shape)} are not [R, H, D], [R, KV, D] with KV dividing H")
    if keys.shape != values.shape or keys.shape[1] != kv or keys.shape[3] != d or keys.shape[0] < r:
        raise ValueError(f"decode_attention: cache {tuple(keys.shape)} is not [B >= {r}, {kv}, S, {d}]")
    if cached.shape[0] != r or cached.shape[1] > keys.shape[2] or keys.stride(3) != 1 or values.stride() != keys.stride():
        raise ValueError(f"decode_attention: mask {tuple(cached.shape)} for a cache of {keys.shape[2]} positions "
                         "(the cache must be contiguous in D and keys and values laid out alike)")
    if h // kv > REP_PAD:
        raise ValueError(f"decode_attention: {h // kv} query heads per KV head; the kernels take at most {REP_PAD}")


@torch.library.custom_op("sparkstudio::decode_attention", mutates_args=())
def decode_attention(q: Tensor, k_new: Tensor, v_new: Tensor, keys: Tensor, values: Tensor, cached: Tensor,
                     scale: float) -> Tensor:
    """q [R, H, D] (after RoPE), this token's k_new / v_new [R, KV, D], one layer's whole cache
    keys / values [B, KV, S, D] (row r reads slot r), cached [R, L] bool (which of keys 0..L-1 row r
    attends to) -> [R, H, D] in q's dtype: softmax(q.k * scale) over the cached keys and the new one."""
    triton, partials, combine = _kernels()
    _check(q, k_new, v_new, keys, values, cached)
    r, h, d = q.shape
    kv = k_new.shape[1]
    length = cached.shape[1]
    n_split = triton.cdiv(length, CHUNK)
    nsplit = triton.cdiv(keys.shape[2], CHUNK)  # the most any bucket of this cache needs
    dp = max(16, triton.next_power_of_2(d))  # tl.dot's smallest tile; a padded width reads masked zeros
    part = torch.empty(r * kv * nsplit * REP_PAD * (2 + dp), device=q.device, dtype=torch.float32)
    m, l_sum, acc = part.split([r * kv * nsplit * REP_PAD] * 2 + [r * kv * nsplit * REP_PAD * dp])
    out = torch.empty(r, h, d, device=q.device, dtype=q.dtype)
    # fp32 (tests, the exactness checks): exact products, not Triton's default TF32 for float32 dots
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    if cached.dtype == torch.bool:
        cached = cached.view(torch.uint8)  # Triton loads bytes
    partials[(r * kv, n_split)](q, q.stride(0), q.stride(1), keys, values, keys.stride(0), keys.stride(1),
                                keys.stride(2), cached, cached.stride(0), length, m, l_sum, acc, scale, KV=kv,
                                REP=h // kv, RP=REP_PAD, D=d, DP=dp, BLOCK=CHUNK, NSPLIT=nsplit, PRECISION=precision,
                                num_warps=NUM_WARPS)
    combine[(r * h,)](q, q.stride(0), q.stride(1), k_new, k_new.stride(0), k_new.stride(1), v_new,
                      v_new.stride(0), v_new.stride(1), m, l_sum, acc, out, n_split, scale, KV=kv, REP=h // kv,
                      RP=REP_PAD, D=d, DP=dp, NSPLIT=nsplit, SB=COMBINE_SPLITS, num_warps=NUM_WARPS)
    return out


@decode_attention.register_fake
def _(q, k_new, v_new, keys, values, cached, scale):
    return q.new_empty(q.shape)


def reference(q: Tensor, k_new: Tensor, v_new: Tensor, keys: Tensor, values: Tensor, cached: Tensor,
              scale: float) -> Tensor:
    """`decode_attention` in plain torch, float32 throughout (what the tests compare the kernels with)."""
    r, h, d = q.shape
    kv = k_new.shape[1]
    length = cached.shape[1]
    qg = q.float().view(r, kv, h // kv, d)
    ks, vs = keys[:r, :, :length].float(), values[:r, :, :length].float()
    old = torch.matmul(qg, ks.transpose(-1, -2)) * scale  # [R, KV, REP, L]
    old = old.masked_fill(~cached.view(r, 1, 1, length), float("-inf"))
    new = (qg * k_new.float().view(r, kv, 1, d)).sum(-1, keepdim=True) * scale
    probs = torch.softmax(torch.cat((old, new), dim=-1), dim=-1)
    out = torch.matmul(probs[..., :length], vs) + probs[..., length:] * v_new.float().view(r, kv, 1, d)
    return out.reshape(r, h, d).to(q.dtype)
