"""The DiT's grouped position convolution as one Triton kernel (CUDA only; the fast path's choice).

The position embedding runs two 1-D convolutions (kernel 31, 16 groups of 64 channels, "same"
padding) over channels-last activations [B, T, C]. cuDNN runs them as 16 launches of a generic
kernel, and the matrix-product form (`tts.f5.dit.grouped_conv_as_matmul`) writes and reads back
an intermediate holding 31 copies of the activations (162 MB at 2 x 1,280 frames: ~90 us of
memory traffic per convolution on an H200). This kernel reads each input tile once per tap from
cache and accumulates the 31 taps' products in registers:

    y[b, t, g, o] = bias[g, o] + sum_j sum_c x[b, t + j - K//2, g, c] * w[g, j, c, o]

(zero outside [0, T), as the convolution's zero padding). One program computes BLOCK_T frames of
one group of one row; the reduction over (tap, channel) is K products of [BLOCK_T, Cg] x [Cg, Og]
with float32 accumulation, like a GEMM over K * Cg.

Exposed as the custom op `f5studio::grouped_conv` (opaque to torch.compile, captured by CUDA
graphs like any kernel). Needs Triton, which the CUDA builds of torch bring; `available()` says
whether it can run here.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from tts.triton_kernels import can_run

#: Frames per program: 64 gives ~5 waves of programs over an H200's 132 SMs at 2 x 1,280 frames
#: (40 frame blocks x 16 groups), enough to hide the tap loop's load latency.
BLOCK_T = 64
NUM_WARPS = 4
NUM_STAGES = 3


@functools.lru_cache(maxsize=1)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def grouped_conv_fwd(x_ptr, w_ptr, b_ptr, y_ptr, T, C: tl.constexpr, CG: tl.constexpr, OG: tl.constexpr,
                         K: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr):
        pid_t = tl.program_id(0)
        g = tl.program_id(1)
        row = tl.program_id(2)
        t = pid_t * BLOCK + tl.arange(0, BLOCK)
        ci = tl.arange(0, CG)
        co = tl.arange(0, OG)
        x_row = x_ptr + row.to(tl.int64) * T * C + g * CG
        acc = tl.zeros((BLOCK, OG), dtype=tl.float32)
        for j in range(K):
            src = t + (j - K // 2)
            inside = (src >= 0) & (src < T)
            a = tl.load(x_row + src[:, None] * C + ci[None, :], mask=inside[:, None], other=0.0)
            w = tl.load(w_ptr + ((g * K + j) * CG + ci[:, None]) * OG + co[None, :])
            acc += tl.dot(a, w, input_precision=PRECISION)
        acc += tl.load(b_ptr + g * OG + co).to(tl.float32)[None, :]
        y_row = y_ptr + row.to(tl.int64) * T * (C // CG * OG) + g * OG
        tl.store(y_row + t[:, None] * (C // CG * OG) + co[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(t < T)[:, None])

    return triton, grouped_conv_fwd


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether the kernel can run in this process (CUDA and an importable Triton)."""
    return can_run(_kernel)


def kernel_weights(conv: torch.nn.Conv1d) -> Tensor:
    """conv.weight [C_out, Cg, K] -> [G, K, Cg, Og] contiguous: the layout the kernel reads."""
    c_out, cg, k = conv.weight.shape
    g = conv.groups
    return conv.weight.detach().view(g, c_out // g, cg, k).permute(0, 3, 2, 1).contiguous()


@torch.library.custom_op("f5studio::grouped_conv", mutates_args=())
def grouped_conv(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """x [B, T, C] (channels last) with weight [G, K, Cg, Og] (`kernel_weights`) and bias [G * Og]
    -> [B, T, G * Og]: the odd-kernel "same"-padded grouped convolution, on CUDA."""
    triton, fwd = _kernel()
    x = x.contiguous()
    g, k, cg, og = weight.shape
    b, t, c = x.shape
    if c != g * cg or k % 2 != 1:
        raise ValueError(f"grouped_conv: x has {c} channels for {g} groups of {cg}, kernel {k} (must be odd)")
    y = torch.empty(b, t, g * og, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(t, BLOCK_T), g, b)
    # fp32 (tests, debugging): exact products, not Triton's default TF32 for float32 dots
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    fwd[grid](x, weight, bias, y, t, C=c, CG=cg, OG=og, K=k, BLOCK=BLOCK_T, PRECISION=precision,
              num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return y


@grouped_conv.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0] * weight.shape[3])
