"""FP8 matrix products for the DiT's large linear layers: an opt-in precision of the F5 fast path.

Every DiT block spends most of its arithmetic in four products over all tokens: the fused q/k/v
projection (D -> 3 D), the attention output (D -> D) and the feed-forward's two (D -> 2 D -> D).
With `convert_dit` each becomes `Fp8Linear`: the weight is stored once as float8 e4m3 with one
scale per output channel, and the activations are quantised per token (one scale per row) right
before the product, so `torch._scaled_mm` multiplies e4m3 by e4m3 on the tensor cores (twice the
bf16 rate on Hopper and Ada) and writes the result in the activations' dtype with both scales
applied. Under `torch.compile` the per-token quantisation fuses into the kernel that produces the
activations (the norm and modulation before q/k/v, the GELU before the last product).

What it costs in accuracy: e4m3 keeps 3 mantissa bits, so each product is off by ~3.5 % (relative
Frobenius error measured on Gaussian inputs here) where bf16 is off by ~0.3 %; the waveform's SNR
against the fp32 eager path is what decides, and `tests/test_f5_precision.py` reports it on CUDA.
The small products (time embedding, modulations, input and output projections, text embedding)
stay in the DiT's dtype: they are a few percent of the work and sit where errors matter most.

Shapes: M rows (tokens), K inputs, N outputs; K and N multiples of 16 (the FP8 kernels' rule).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

#: float8 e4m3 (the "fn" variant: no infinities), the format of both operands.
FP8_DTYPE = torch.float8_e4m3fn
#: Its largest finite value, 448: a row's largest magnitude maps onto it.
E4M3_MAX = float(torch.finfo(FP8_DTYPE).max)
#: A row of zeros (the gaps between packed items) gets this amax instead, so its scale is not zero
#: (0 / 0 would give NaN); any tiny positive value gives the same zero row back.
AMAX_FLOOR = 1e-12
#: FP8 tensor cores: compute capability 8.9 (Ada) and 9.0 (Hopper) onward.
MIN_CUDA_CAPABILITY = (8, 9)
#: The kernels' alignment rule for K and N.
ALIGN = 16


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [M, K] (any float dtype) -> (q [M, K] e4m3, scale [M, 1] float32) with x ~= q * scale.

    One scale per row: a row's largest magnitude becomes E4M3_MAX, so no value overflows and each
    row uses the format's whole range (activations differ by orders of magnitude between tokens)."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=AMAX_FLOOR)
    scale = amax / E4M3_MAX
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE), scale


def supported(device: torch.device) -> str | None:
    """None when FP8 products run on `device`, else why not (a sentence for the start-up log).

    On the CPU ATen's own `_scaled_mm` runs them (slow; the tests use it); on CUDA the card needs
    FP8 tensor cores."""
    if not hasattr(torch, "_scaled_mm"):
        return f"this torch ({torch.__version__}) has no torch._scaled_mm"
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < MIN_CUDA_CAPABILITY:
            return (f"{torch.cuda.get_device_name(device)} (compute capability {cap[0]}.{cap[1]}) has no FP8 "
                    f"tensor cores (needs {MIN_CUDA_CAPABILITY[0]}.{MIN_CUDA_CAPABILITY[1]} or newer)")
    elif device.type != "cpu":
        return f"FP8 products are not set up for {device.type} devices"
    return None


class Fp8Linear(nn.Module):
    """`nn.Linear` with an e4m3 weight (per output channel scales) and per-token e4m3 activations.

    Built from a linear layer's weight [N, K] and bias [N] (kept in their dtype); the output has the
    input's dtype. The quantised weight is kept as [N, K] row-major, which `_scaled_mm` reads as the
    column-major [K, N] operand it wants (`.t()` is a view)."""

    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__()
        n, k = weight.shape
        if n % ALIGN or k % ALIGN:
            raise ValueError(f"FP8 products need both weight dimensions to be multiples of {ALIGN}; got {n} x {k}")
        with torch.no_grad():
            q, scale = quantize_rows(weight.detach())
        self.register_buffer("weight_fp8", q)
        self.register_buffer("weight_scale", scale.reshape(1, n).contiguous())  # [1, N] float32
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.in_features, self.out_features = k, n

    def forward(self, x: Tensor) -> Tensor:
        """x [..., K] -> [..., N] in x's dtype."""
        rows = x.reshape(-1, self.in_features)
        q, scale = quantize_rows(rows)
        # the bias is added here, not by _scaled_mm: its fused bias is not offered for every
        # scaling mode and dtype, and inductor folds this add into the product's consumer anyway
        y = torch._scaled_mm(q, self.weight_fp8.t(), scale_a=scale, scale_b=self.weight_scale, out_dtype=x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3"


def dequantized_weight(layer: Fp8Linear) -> Tensor:
    """The weight the layer multiplies by, [N, K] float32 (tests; error figures)."""
    return layer.weight_fp8.float() * layer.weight_scale.reshape(-1, 1)


def convert_dit(dit: nn.Module) -> int:
    """Give every DiT block FP8 products (fused q/k/v, attention output, both feed-forward
    products); returns how many layers were converted. Call after loading the weights, on their
    final device; fuses q/k/v first if it was not done. The converted layers' own weights are
    dropped (the fused q/k/v tensor stays: to_q/to_k/to_v are views of it), so the state dict no
    longer has upstream's keys: save weights before converting, never after. The feed-forward's
    fused bias + GELU epilogue (`DiT.fuse_gelu`) has no FP8 form: the GELU then runs on its own
    (inside the compiled block on the fast path)."""
    dit.fuse_qkv()
    n = 0
    for block in dit.transformer_blocks:
        attn, ff = block.attn, block.ff
        if getattr(attn, "qkv_fp8", None) is None:
            attn.qkv_fp8 = Fp8Linear(attn.qkv_weight, attn.qkv_bias)
            n += 1
        if not isinstance(attn.to_out[0], Fp8Linear):
            attn.to_out[0] = Fp8Linear(attn.to_out[0].weight, attn.to_out[0].bias)
            n += 1
        up, down = ff.ff[0][0], ff.ff[2]
        if not isinstance(up, Fp8Linear):
            ff.ff[0][0] = Fp8Linear(up.weight, up.bias)
            n += 1
        if not isinstance(down, Fp8Linear):
            ff.ff[2] = Fp8Linear(down.weight, down.bias)
            n += 1
        ff.fused_gelu = False
    return n
