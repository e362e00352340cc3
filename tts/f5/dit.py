"""F5-TTS diffusion transformer (DiT), for inference.

Written from the architecture of upstream F5-TTS (`model/backbones/dit.py`, `model/modules.py`);
parameter names and shapes are upstream's, so the published EMA weights load strictly (without
the checkpoint's `ema_model.transformer.` prefix, see `tts.f5.checkpoint`).

Differences from upstream, all for batching (upstream issues #1039 / #1179):
  * the text is embedded once per request by `embed_text`, each item to its own frame count:
    the text ConvNeXtV2 blocks zero every position past the item's length after each block, and
    their GRN statistic (an L2 norm over time) only counts the item's own frames;
  * attention masks padded keys per item and the convolutional position embedding zeroes padded
    frames, so an item's output never depends on what it is batched with;
  * `forward` always runs the conditional and unconditional (CFG) halves as one 2B batch;
  * rotary and sinusoidal angles are computed in float32 whatever the weight dtype.

Shapes: B batch, T mel frames (93.75 per second), Nt text tokens, D model width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tts.f5 import attention_kernel, conv_kernel
from tts.f5.config import F5Config

ROPE_BASE = 10000.0  # x_transformers RotaryEmbedding default base, as upstream builds it
TEXT_POS_BASE = 10000.0  # upstream precompute_freqs_cis theta for the text positions
TIME_FREQ_DIM = 256  # sinusoidal width of the flow time t before the time MLP
TIME_SCALE = 1000.0  # t in [0, 1] is scaled by 1000 before the sinusoid (upstream SinusPositionEmbedding)
CONV_POS_KERNEL = 31  # ConvPositionEmbedding kernel (31 frames = 0.33 s)
CONV_POS_GROUPS = 16
TEXT_CONV_KERNEL = 7  # ConvNeXtV2 depthwise kernel on the text embedding
NORM_EPS = 1e-6  # every LayerNorm / RMSNorm in the network
GRN_EPS = 1e-6


# -- position encodings (float32) ---------------------------------------------------------------

def rope_inv_freq(dim_head: int, device: torch.device | str | None = None) -> Tensor:
    """x_transformers RotaryEmbedding frequencies: base ** (-2i / dim_head), i < dim_head / 2. [dim_head/2]."""
    return 1.0 / (ROPE_BASE ** (torch.arange(0, dim_head, 2, device=device).float() / dim_head))


def rope_cos_sin(frames: int, dim_head: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles, [frames, dim_head] float32, each frequency repeated for its pair.

    x_transformers pairs adjacent channels (0,1), (2,3), ... so the angle table is interleaved.
    """
    angles = torch.arange(frames, device=device, dtype=torch.float32)[:, None] * rope_inv_freq(dim_head, device)
    angles = angles.repeat_interleave(2, dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent channel pairs of x [B, H, T, Dh] by the angles ([T, Dh]); math in float32."""
    xf = x.float()
    pairs = xf.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (xf * cos + rotated * sin).to(x.dtype)


def text_positions(frames: int, dim: int, device: torch.device | str) -> Tensor:
    """Sinusoidal text positions [frames, dim] float32: cos of all frequencies, then sin (upstream layout)."""
    freqs = 1.0 / (TEXT_POS_BASE ** (torch.arange(0, dim, 2, device=device)[: dim // 2].float() / dim))
    angles = torch.outer(torch.arange(frames, device=device, dtype=torch.float32), freqs)
    return torch.cat((angles.cos(), angles.sin()), dim=-1)


def text_positions_at(pos: Tensor, dim: int) -> Tensor:
    """`text_positions` rows at the frame indices pos [N] (long) -> [N, dim] float32, the same products."""
    freqs = 1.0 / (TEXT_POS_BASE ** (torch.arange(0, dim, 2, device=pos.device)[: dim // 2].float() / dim))
    angles = pos.float()[:, None] * freqs[None, :]
    return torch.cat((angles.cos(), angles.sin()), dim=-1)


def time_sinusoid(time: Tensor, dim: int = TIME_FREQ_DIM) -> Tensor:
    """Flow time t [B] (0 = noise, 1 = data) -> [B, dim] float32: sin of all frequencies, then cos."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=time.device).float() * -(math.log(10000.0) / (half - 1)))
    angles = TIME_SCALE * time.float()[:, None] * freqs[None, :]
    return torch.cat((angles.sin(), angles.cos()), dim=-1)


# -- modules (attribute names = upstream state-dict keys) ---------------------------------------

class RotaryEmbedding(nn.Module):
    """Holds `inv_freq` only because the published checkpoints carry it (x_transformers registers it
    as a persistent buffer). Angles are recomputed in float32 from the same formula, so a bf16/fp16
    cast of the buffer cannot degrade positions; `tts.f5.checkpoint` checks the loaded buffer."""

    def __init__(self, dim_head: int):
        super().__init__()
        self.dim_head = dim_head
        self.register_buffer("inv_freq", rope_inv_freq(dim_head))


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.time_mlp = nn.Sequential(nn.Linear(TIME_FREQ_DIM, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, time: Tensor) -> Tensor:
        """time [B] -> [B, D] in the weights' dtype."""
        return self.time_mlp(time_sinusoid(time).to(self.time_mlp[0].weight.dtype))


class GRN(nn.Module):
    """Global response normalisation over time, counting only each item's valid frames."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        """x [B, T, C]; valid [B, T, 1] bool. Upstream's norm runs over all T frames of a solo item;
        masking keeps a batched item's statistic equal to its solo one."""
        gx = torch.linalg.vector_norm(x.masked_fill(~valid, 0.0), ord=2, dim=1, keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + GRN_EPS)
        return self.gamma * (x * nx) + self.beta + x

    def forward_packed(self, x: Tensor, members: Tensor, seg: Tensor) -> Tensor:
        """Packed items: x [N, C]; members [S, N] float32, 1 where token n is a valid frame of item s;
        seg [N] long, each token's item (S for tokens of none: a zero row). The per-item L2 norm
        over time is a product with `members` (sums of squares in float32, as vector_norm
        accumulates), so no token count or item length is read on the host."""
        gx = (members @ x.float().square()).sqrt().to(x.dtype)  # [S, C]
        nx = gx / (gx.mean(dim=-1, keepdim=True) + GRN_EPS)
        nx = torch.cat((nx, torch.zeros_like(nx[:1])))[seg]  # [N, C]: each token's item statistic
        return self.gamma[0] * (x * nx) + self.beta[0] + x


class ConvNeXtV2Block(nn.Module):
    def __init__(self, dim: int, intermediate_dim: int):
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, TEXT_CONV_KERNEL, padding=TEXT_CONV_KERNEL // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=NORM_EPS)
        self.pwconv1 = nn.Linear(dim, intermediate_dim)
        self.grn = GRN(intermediate_dim)
        self.pwconv2 = nn.Linear(intermediate_dim, dim)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        """x [B, T, C] (zero past each item's length); valid [B, T, 1] bool."""
        h = self.dwconv(x.transpose(1, 2)).transpose(1, 2)
        h = F.gelu(self.pwconv1(self.norm(h)))
        return x + self.pwconv2(self.grn(h, valid))

    def forward_packed(self, x: Tensor, members: Tensor, seg: Tensor, rows: int = 1) -> Tensor:
        """x [N, C] packed items, zero between them (at least TEXT_CONV_KERNEL // 2 tokens apart,
        so the depthwise conv never reaches across); see `GRN.forward_packed`. `rows`: the axis is
        that many independent rows of N / rows tokens (the depthwise conv stops at each row's end,
        so an item may end its row without a gap)."""
        n, c = x.shape
        h = self.dwconv(x.view(rows, n // rows, c).transpose(1, 2)).transpose(1, 2).reshape(n, c)
        h = F.gelu(self.pwconv1(self.norm(h)))
        return x + self.pwconv2(self.grn.forward_packed(h, members, seg))


class TextEmbedding(nn.Module):
    def __init__(self, cfg: F5Config):
        super().__init__()
        # Row 0 is the filler token: ids are shifted by one, batch padding (-1) becomes 0.
        self.text_embed = nn.Embedding(cfg.text_num_embeds + 1, cfg.text_dim)
        if cfg.conv_layers > 0:
            self.text_blocks = nn.Sequential(
                *[ConvNeXtV2Block(cfg.text_dim, cfg.text_dim * 2) for _ in range(cfg.conv_layers)])
        else:
            self.text_blocks = None

    def forward(self, ids: Tensor, valid: Tensor, keep: Tensor) -> Tensor:
        """ids [B, T] shifted ids (0 = filler); valid [B, T] bool: the item's frames; keep [B, T] bool:
        positions kept around each text block -> [B, T, text_dim], zero past each item's length."""
        valid3, keep3 = valid[..., None], keep[..., None]
        x = self.text_embed(ids).masked_fill(~valid3, 0.0)
        if self.text_blocks is None:
            return x
        pos = text_positions(ids.shape[1], x.shape[-1], ids.device).to(x.dtype)
        x = (x + pos).masked_fill(~keep3, 0.0)
        for block in self.text_blocks:
            x = block(x, valid3).masked_fill(~keep3, 0.0)
        return x

    def forward_packed(self, ids: Tensor, valid: Tensor, keep: Tensor, pos: Tensor, seg: Tensor,
                       segments: int, rows: int = 1) -> Tensor:
        """`forward` on packed items: ids, valid, keep [N] as in `forward` but on one token axis;
        pos [N] long: each token's frame index within its item; seg [N] long: its item in
        [0, segments), or `segments` between items; rows: the axis is that many rows of N / rows
        tokens no item crosses. -> [N, text_dim]; a token's values equal `forward`'s for its item
        and frame (items at least TEXT_CONV_KERNEL // 2 tokens apart, or at a row's end)."""
        valid1, keep1 = valid[:, None], keep[:, None]
        x = self.text_embed(ids).masked_fill(~valid1, 0.0)
        if self.text_blocks is None:
            return x
        x = (x + text_positions_at(pos, x.shape[-1]).to(x.dtype)).masked_fill(~keep1, 0.0)
        members = ((seg[None, :] == torch.arange(segments, device=seg.device)[:, None]) & valid[None, :]).float()
        for block in self.text_blocks:
            x = block.forward_packed(x, members, seg, rows).masked_fill(~keep1, 0.0)
        return x


def grouped_conv_as_matmul(x: Tensor, conv: nn.Conv1d) -> Tensor:
    """`conv` (odd kernel K, "same" padding, G groups) on channels-last x [B, T, C] -> [B, T, C_out].

    Per group one product x_g [B*T, C/G] @ W_g [C/G, K * C_out/G] gives every kernel tap's
    contribution at once: z[b, t, g, j] = W_g[:, :, j] x[b, t]; the output at t sums tap j of frame
    t + j - K//2 (zero outside [0, T), as the convolution's zero padding). Same arithmetic as the
    convolution in another order; z holds K copies of the activations (transient)."""
    c_out, cg, k = conv.weight.shape
    g, pad = conv.groups, k // 2
    og = c_out // g
    b, t, _ = x.shape
    w = conv.weight.view(g, og, cg, k).permute(0, 2, 3, 1).reshape(g, cg, k * og)  # [G, Cg, K*og]
    z = torch.bmm(x.reshape(b * t, g, cg).transpose(0, 1), w).view(g, b, t, k, og)
    z = F.pad(z, (0, 0, 0, 0, pad, pad))  # [G, B, T + 2 pad, K, og]
    y = z[:, :, 0:t, 0]
    for j in range(1, k):
        y = y + z[:, :, j: j + t, j]
    return y.permute(1, 2, 0, 3).reshape(b, t, c_out) + conv.bias


class ConvPositionEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        pad = CONV_POS_KERNEL // 2
        self.conv1d = nn.Sequential(
            nn.Conv1d(dim, dim, CONV_POS_KERNEL, groups=CONV_POS_GROUPS, padding=pad), nn.Mish(),
            nn.Conv1d(dim, dim, CONV_POS_KERNEL, groups=CONV_POS_GROUPS, padding=pad), nn.Mish(),
        )

    #: How the two grouped convolutions run (channels last), set by the fast path on CUDA:
    #: "conv" nn.Conv1d (cuDNN: 16 launches of a generic kernel, ~1.25 ms of a ~5 ms step on an H100
    #: at 2 x 768 frames); "matmul" one batched matrix product and a shifted sum per convolution
    #: (`grouped_conv_as_matmul`, fused by inductor; ~0.5 ms there, but its 31-copy intermediate
    #: costs ~90 us of memory traffic per convolution at 2 x 1,280 frames on an H200); "kernel" the
    #: Triton kernel of `tts.f5.conv_kernel` (the taps accumulated in registers), with `kernel_w`
    #: holding both convolutions' weights in its layout.
    form = "conv"
    FORMS = ("conv", "matmul", "kernel")

    def use_form(self, form: str) -> None:
        """Switch the convolution form (see `form`); "kernel" prepares its weight layout (call it
        with the weights on their final device and dtype)."""
        if form not in self.FORMS:
            raise ValueError(f"convolution form must be one of {self.FORMS}; got {form!r}")
        if form == "kernel":
            self.kernel_w = [conv_kernel.kernel_weights(self.conv1d[0]), conv_kernel.kernel_weights(self.conv1d[2])]
        self.form = form

    def _grouped(self, i: int, h: Tensor) -> Tensor:
        """Convolution i (0 or 1) on channels-last h [B, T, D], in the "matmul" or "kernel" form."""
        conv = self.conv1d[2 * i]
        if self.form == "kernel":
            return conv_kernel.grouped_conv(h, self.kernel_w[i], conv.bias)
        return grouped_conv_as_matmul(h, conv)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x [B, T, D], mask [B, T] bool -> [B, T, D]; padded frames are zero before and after each conv."""
        if self.form != "conv":
            m = ~mask[:, :, None]
            h = x.masked_fill(m, 0.0)
            h = self.conv1d[1](self._grouped(0, h).masked_fill(m, 0.0))
            return self.conv1d[3](self._grouped(1, h).masked_fill(m, 0.0))
        m = ~mask[:, None, :]
        h = x.transpose(1, 2).masked_fill(m, 0.0)
        h = self.conv1d[1](self.conv1d[0](h).masked_fill(m, 0.0))
        h = self.conv1d[3](self.conv1d[2](h).masked_fill(m, 0.0))
        return h.transpose(1, 2)


class InputEmbedding(nn.Module):
    def __init__(self, cfg: F5Config):
        super().__init__()
        self.proj = nn.Linear(cfg.mel_dim * 2 + cfg.text_dim, cfg.dim)
        self.conv_pos_embed = ConvPositionEmbedding(cfg.dim)

    def forward(self, x: Tensor, cond: Tensor, text: Tensor, mask: Tensor) -> Tensor:
        """noisy mel x, reference mel cond [B, T, mel], text [B, T, text_dim], mask [B, T] -> [B, T, D]."""
        return self.forward_joined(torch.cat((x, cond, text), dim=-1), mask)

    def forward_joined(self, joined: Tensor, mask: Tensor) -> Tensor:
        """`forward` on the inputs already side by side: joined [B, T, 2 mel + text_dim] (x, cond, text)."""
        h = self.proj(joined)
        return self.conv_pos_embed(h, mask) + h


class AdaLayerNorm(nn.Module):
    """LayerNorm modulated by the time embedding; also returns the feed-forward modulation."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim * 6)

    def modulation(self, emb: Tensor) -> Tensor:
        """Time embedding [B, D] -> [6, B, D]: shift, scale, gate of attention, then of the MLP."""
        return self.linear(F.silu(emb)).unflatten(1, (6, -1)).transpose(0, 1)

    def forward(self, x: Tensor, emb: Tensor | None, mod: Tensor | None = None) -> tuple[Tensor, ...]:
        """x [B, T, D]; emb [B, D], or `mod` [6, B or 1, D] precomputed by `modulation` (it depends
        on the flow time only, so the fast path computes it once per step of its schedule)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(emb) if mod is None else mod
        x = F.layer_norm(x, x.shape[-1:], eps=NORM_EPS) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormFinal(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim * 2)

    def modulation(self, emb: Tensor) -> Tensor:
        """[B, D] -> [2, B, D]: scale, then shift (upstream's order)."""
        return self.linear(F.silu(emb)).unflatten(1, (2, -1)).transpose(0, 1)

    def forward(self, x: Tensor, emb: Tensor | None, mod: Tensor | None = None) -> Tensor:
        scale, shift = self.modulation(emb) if mod is None else mod
        return F.layer_norm(x, x.shape[-1:], eps=NORM_EPS) * (1 + scale)[:, None] + shift[:, None]


def _varlen_attn():
    """torch's flash-attention over packed variable-length sequences, or None (older torch)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


#: Kernel for packed (variable-length) attention on CUDA in fp16 / bf16: "flash" (flash attention's
#: varlen kernel through torch.nn.attention.varlen), "cudnn" (cuDNN's fused attention on ragged
#: sequences, the kernel SDPA uses for nested tensors) or "triton" (`tts.f5.attention_kernel`).
#: "rows": how a lone item's two halves attend (`DiT.forward_packed` runs them as two rows):
#: "sdpa" (SDPA with the key mask on the padded rows; cuDNN's fused kernel on an H100) or "triton"
#: (the packed kernel over the rows' sequences). The fast path times the candidates at start-up and
#: sets the fastest (`tts.f5.fast.choose_packed_attention`); a module global, so torch.compile
#: guards on it and the graphs capture the chosen kernels.
#: "triton_packed" / "triton_rows": the Triton kernel's tiles in each layout (`attention_kernel.CONFIGS`).
PACKED_ATTENTION = {"backend": "flash", "rows": "sdpa", "triton_packed": attention_kernel.DEFAULT_CONFIG,
                    "triton_rows": attention_kernel.DEFAULT_CONFIG}
PACKED_ATTENTION_BACKENDS = ("flash", "cudnn", "triton")
ROW_ATTENTION_BACKENDS = ("sdpa", "triton")


@torch.library.custom_op("f5studio::cudnn_packed_attention", mutates_args=())
def cudnn_packed_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
    """cuDNN fused attention over packed sequences (q, k, v [N, H, Dh] fp16/bf16 on CUDA, cu_seqlens
    int32 [S + 1]) -> [N, H, Dh]. An opaque op for torch.compile (its fake below gives the shape)."""
    out = torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                                  False, 0.0, False, False)[0]
    return out.view_as(q) if out.is_contiguous() else out.reshape(q.shape)


@cudnn_packed_attention.register_fake
def _(q, k, v, cu_seqlens, max_seqlen):
    return torch.empty_like(q)


def packed_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                     kernel: str | None = None, config: str | None = None) -> Tensor:
    """Attention within each sequence of a packed token axis: q, k, v [N, H, Dh]; sequence i holds
    tokens [cu_seqlens[i], cu_seqlens[i + 1]) (int32 [S + 1], cu_seqlens[-1] == N); every token
    belongs to one sequence; max_seqlen bounds the longest. -> [N, H, Dh].

    On CUDA in fp16 / bf16: a varlen kernel, no padding computed and no mask read
    (`PACKED_ATTENTION`: flash attention's, cuDNN's or the Triton kernel of
    `tts.f5.attention_kernel`). Elsewhere (CPU, fp32, a torch without them): SDPA over the whole
    axis with a block-diagonal mask, the same result (used by the CPU tests; N^2 memory). `kernel`
    overrides `PACKED_ATTENTION["backend"]`, `config` the Triton kernel's tiles
    (`PACKED_ATTENTION["triton_packed"]`)."""
    # the varlen kernels run fp16 / bf16 only; an fp32 DiT (tests, debugging) takes the masked path
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        kernel = kernel or PACKED_ATTENTION["backend"]
        if kernel == "triton":
            return attention_kernel.packed_attention_triton(q, k, v, cu_seqlens,
                                                            config or PACKED_ATTENTION["triton_packed"])
        if kernel == "cudnn":
            return cudnn_packed_attention(q, k, v, cu_seqlens, max_seqlen)
        varlen = _varlen_attn()
        if varlen is not None:
            return varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)
    n = q.shape[0]
    seq = torch.searchsorted(cu_seqlens[1:].long(), torch.arange(n, device=q.device), right=True)
    mask = seq[:, None] == seq[None, :]
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                         v.transpose(0, 1)[None], attn_mask=mask[None, None])
    return out[0].transpose(0, 1)


class Attention(nn.Module):
    def __init__(self, cfg: F5Config):
        super().__init__()
        self.heads, self.dim_head, self.pe_heads = cfg.heads, cfg.dim_head, cfg.pe_attn_head
        inner = cfg.heads * cfg.dim_head
        self.to_q = nn.Linear(cfg.dim, inner)
        self.to_k = nn.Linear(cfg.dim, inner)
        self.to_v = nn.Linear(cfg.dim, inner)
        if cfg.qk_norm == "rms_norm":
            self.q_norm = nn.RMSNorm(cfg.dim_head, eps=NORM_EPS)
            self.k_norm = nn.RMSNorm(cfg.dim_head, eps=NORM_EPS)
        else:
            self.q_norm = self.k_norm = None
        self.to_out = nn.ModuleList([nn.Linear(inner, cfg.dim)])  # upstream slot 1 is a parameterless Dropout

    def _rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        if self.pe_heads is None:
            return apply_rope(x, cos, sin)
        n = self.pe_heads  # v0 checkpoints: rotary positions on the first head(s) only
        return torch.cat((apply_rope(x[:, :n], cos, sin), x[:, n:]), dim=1)

    def fuse_qkv(self) -> None:
        """One [3 * inner, D] product instead of three (the fast path: fewer, fuller matrix
        products). to_q / to_k / to_v keep their names and values; their weights become views of
        the fused tensor, so nothing is duplicated and a state dict still saves as upstream's."""
        with torch.no_grad():
            mods = (self.to_q, self.to_k, self.to_v)
            w = torch.cat([m.weight.detach() for m in mods]).contiguous()
            b = torch.cat([m.bias.detach() for m in mods]).contiguous()
            n = self.heads * self.dim_head
            for i, m in enumerate(mods):
                m.weight.data, m.bias.data = w[i * n:(i + 1) * n], b[i * n:(i + 1) * n]
        self.register_buffer("qkv_weight", w, persistent=False)
        self.register_buffer("qkv_bias", b, persistent=False)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, t, _ = x.shape
        if getattr(self, "qkv_fp8", None) is not None:  # `tts.f5.fp8.convert_dit`: the opt-in FP8 products
            q, k, v = self.qkv_fp8(x).chunk(3, dim=-1)
        elif getattr(self, "qkv_weight", None) is not None:
            q, k, v = F.linear(x, self.qkv_weight, self.qkv_bias).chunk(3, dim=-1)
        else:
            q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        return tuple(y.view(b, t, self.heads, self.dim_head).transpose(1, 2) for y in (q, k, v))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, key_mask: Tensor | None,
                cu_seqlens: Tensor | None = None) -> Tensor:
        """x [B, T, D]; cos/sin [T, Dh]; key_mask [B, 1, 1, T] bool (True = attend) -> [B, T, D].

        Packed (`cu_seqlens` given, see `DiT.forward_packed`): x [1, N, D] holds several sequences
        back to back, cos/sin [N, Dh] each token's own angles, key_mask unused."""
        if cu_seqlens is not None:
            return self._forward_packed(x, cos, sin, cu_seqlens)
        b, t, _ = x.shape
        q, k, v = self._project(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        return self.to_out[0](out.transpose(1, 2).reshape(b, t, self.heads * self.dim_head))


    def _forward_packed(self, x: Tensor, cos: Tensor, sin: Tensor, cu_seqlens: Tensor) -> Tensor:
        shape = x.shape  # [1, N, D], or [rows, N / rows, D] (a lone item's halves, `DiT.forward_packed`)
        x = x.reshape(1, -1, shape[-1])
        n = x.shape[1]
        q, k, v = (y[0].transpose(0, 1) for y in self._project(x))  # each [N, H, Dh]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = cos[:, None], sin[:, None]  # [N, 1, Dh]: broadcast over heads
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        # several rows reach here only when the packed kernel serves a lone item's rows (`PACKED_ATTENTION`)
        layout = "rows" if shape[0] > 1 else "packed"
        kernel = PACKED_ATTENTION["rows"] if layout == "rows" else PACKED_ATTENTION["backend"]
        if kernel != "triton":  # the Triton kernel reads strided views; the others want contiguous tensors
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        # a sequence never exceeds the half of the axis it lives in (conditional / unconditional)
        out = packed_attention(q, k, v, cu_seqlens, n // 2, kernel, PACKED_ATTENTION[f"triton_{layout}"])
        return self.to_out[0](out.reshape(*shape[:-1], self.heads * self.dim_head))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int):
        super().__init__()
        inner = dim * mult
        # Indices match upstream: ff.0.0 Linear, ff.0.1 GELU(tanh), ff.1 Dropout (identity here), ff.2 Linear.
        self.ff = nn.Sequential(nn.Sequential(nn.Linear(dim, inner), nn.GELU(approximate="tanh")),
                                nn.Identity(), nn.Linear(inner, dim))
        # Set by the fast path on CUDA (`DiT.fuse_gelu`): bias and tanh GELU in the first product's
        # epilogue (cuBLASLt), so the [rows, inner] hidden is written once instead of written, read
        # and written again by a separate bias+GELU kernel. Only on CUDA: ATen's CPU kernel of the
        # same op applies the exact (erf) GELU, not upstream's tanh one.
        self.fused_gelu = False

    def forward(self, x: Tensor) -> Tensor:
        """x [..., dim] -> [..., dim]."""
        up = self.ff[0][0]
        if self.fused_gelu and x.is_cuda and isinstance(up, nn.Linear):  # not over FP8 products (`tts.f5.fp8`)
            hidden = torch._addmm_activation(up.bias, x.reshape(-1, x.shape[-1]), up.weight.t(), use_gelu=True)
            return self.ff[2](hidden.view(*x.shape[:-1], hidden.shape[-1]))
        return self.ff(x)


class DiTBlock(nn.Module):
    def __init__(self, cfg: F5Config):
        super().__init__()
        self.attn_norm = AdaLayerNorm(cfg.dim)
        self.attn = Attention(cfg)
        self.ff = FeedForward(cfg.dim, cfg.ff_mult)

    def forward(self, x: Tensor, t: Tensor | None, cos: Tensor, sin: Tensor, key_mask: Tensor | None,
                cu_seqlens: Tensor | None = None, mod: Tensor | None = None) -> Tensor:
        """x [B, T, D]; t: time embedding [B, D], or None with `mod` [6, 1, D] (`AdaLayerNorm.modulation`)."""
        norm, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.attn_norm(x, t, mod)
        x = x + gate_msa[:, None] * self.attn(norm, cos, sin, key_mask, cu_seqlens)
        norm = F.layer_norm(x, x.shape[-1:], eps=NORM_EPS) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return x + gate_mlp[:, None] * self.ff(norm)


class DiT(nn.Module):
    """The F5-TTS velocity network: (noisy mel, reference mel, text, t) -> flow velocity."""

    def __init__(self, cfg: F5Config):
        super().__init__()
        self.cfg = cfg
        self.time_embed = TimestepEmbedding(cfg.dim)
        self.text_embed = TextEmbedding(cfg)
        self.input_embed = InputEmbedding(cfg)
        self.rotary_embed = RotaryEmbedding(cfg.dim_head)
        self.transformer_blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.depth)])
        self.norm_out = AdaLayerNormFinal(cfg.dim)
        self.proj_out = nn.Linear(cfg.dim, cfg.mel_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    def fuse_qkv(self) -> "DiT":
        """Fuse every block's q/k/v projections (`Attention.fuse_qkv`); call after loading weights."""
        for block in self.transformer_blocks:
            if getattr(block.attn, "qkv_weight", None) is None:
                block.attn.fuse_qkv()
        return self

    def fuse_gelu(self, on: bool = True) -> "DiT":
        """Every block's feed-forward: bias + GELU in the matrix product's epilogue on CUDA
        (`FeedForward.fused_gelu`; same function, rounding differs), or back to the two-op form."""
        for block in self.transformer_blocks:
            block.ff.fused_gelu = on
        return self

    def embed_text(self, text_ids: Tensor, seq_lens: Tensor, frames: int | None = None) -> tuple[Tensor, Tensor]:
        """Text conditioning for a batch, computed once per request.

        text_ids [B, Nt] long (token ids, batch padding -1); seq_lens [B] long: each item's total
        frames (reference + generated). Returns (cond, uncond), each [B, T, text_dim] with
        T = `frames` or max(seq_lens) (pass `frames` to avoid a host sync); uncond is the dropped
        text (all filler) of upstream's CFG. Each item is embedded to its own length: text past it
        is cut, and frames past it are zero.
        """
        if frames is None:
            frames = int(seq_lens.max())
        ids = text_ids[:, :frames] + 1
        ids = F.pad(ids, (0, frames - ids.shape[1]), value=0)
        valid = torch.arange(frames, device=ids.device)[None, :] < seq_lens.to(ids.device)[:, None]
        ids = ids.masked_fill(~valid, 0)
        # Kept positions: the item's text tokens (v1, text_mask_padding) or all its frames (v0).
        # Upstream takes the filler mask before dropping the text, so uncond keeps cond's mask.
        keep = (ids != 0) & valid if self.cfg.text_mask_padding else valid
        b = ids.shape[0]
        emb = self.text_embed(torch.cat((ids, torch.zeros_like(ids))), torch.cat((valid, valid)),
                              torch.cat((keep, keep)))
        return emb[:b], emb[b:]

    def embed_text_packed(self, ids: Tensor, valid: Tensor, keep: Tensor, pos: Tensor, seg: Tensor,
                          items: int) -> tuple[Tensor, Tensor]:
        """`embed_text` for packed items (`forward_packed`'s layout), with the host's work done:
        ids [N] long: each frame's shifted token id (text id + 1; 0 = filler past the text, between
        items and past the last); valid [N] bool: the items' frames; keep [N] bool: the positions
        `embed_text` keeps (its `keep`); pos [N] long: frame index within the item; seg [N] long:
        item index, `items` between items. Returns (cond, uncond) [N, text_dim], as one doubled
        batch (uncond: all filler, cond's masks), like `embed_text`."""
        n = ids.shape[0]
        emb = self.text_embed.forward_packed(
            torch.cat((ids, torch.zeros_like(ids))), torch.cat((valid, valid)), torch.cat((keep, keep)),
            torch.cat((pos, pos)), torch.cat((seg, torch.where(seg < items, seg + items, 2 * items))), 2 * items,
            rows=2)  # the halves are rows: a lone item may fill its half (`tts.f5.fast.packed_length`)
        return emb[:n], emb[n:]

    def forward(self, x: Tensor, cond: Tensor, text_cond: Tensor, text_uncond: Tensor, time: Tensor,
                mask: Tensor) -> tuple[Tensor, Tensor]:
        """Velocity with and without conditioning, as one 2B batch.

        x: noisy mel [B, T, mel]; cond: reference mel [B, T, mel], zero past the reference;
        text_cond / text_uncond: from `embed_text` [B, T, text_dim]; time: flow time [B] in [0, 1];
        mask: [B, T] bool, True for each item's frames. Returns (pred_cond, pred_uncond) [B, T, mel]
        in the weights' dtype. The unconditional half sees zero audio conditioning and dropped text.
        """
        b, t = x.shape[:2]
        dt = self.dtype
        temb = self.time_embed(time)
        temb = torch.cat((temb, temb))
        mask2 = torch.cat((mask, mask))
        h = self.input_embed(torch.cat((x, x)).to(dt), torch.cat((cond, torch.zeros_like(cond))).to(dt),
                             torch.cat((text_cond, text_uncond)).to(dt), mask2)
        cos, sin = rope_cos_sin(t, self.cfg.dim_head, x.device)
        key_mask = mask2[:, None, None, :]
        for block in self.transformer_blocks:
            h = block(h, temb, cos, sin, key_mask)
        out = self.proj_out(self.norm_out(h, temb))
        return out[:b], out[b:]

    @property
    def modulation_rows(self) -> int:
        """Rows of `modulations`: six per block (AdaLayerNorm), two for the output norm."""
        return 6 * len(self.transformer_blocks) + 2

    def modulations(self, time: Tensor) -> Tensor:
        """Everything the network computes from the flow time alone, for one time (0-d):
        [modulation_rows, D] in the weights' dtype: block i's six AdaLN rows at 6 i, the output
        norm's two last. The same products `forward` computes per step (`AdaLayerNorm.modulation`
        on the time embedding); `forward_packed` takes them precomputed, so a step runs none of the
        2 + depth + 1 small time products."""
        temb = self.time_embed(time.reshape(1))
        rows = [block.attn_norm.modulation(temb)[:, 0] for block in self.transformer_blocks]
        return torch.cat(rows + [self.norm_out.modulation(temb)[:, 0]])

    def packed_rows(self, cu_seqlens: Tensor) -> tuple[int, bool]:
        """(rows, attention on the packed axis) of `forward_packed`'s layout for these sequences.

        One item per half (4 b + 1 == 5 boundaries): the two halves are two rows of the padded
        layout (the item first, its padding after), whose attention is masked SDPA on [2, n] rows
        (cuDNN's fused kernel on an H100) unless `PACKED_ATTENTION["rows"]` is "triton": then the
        rows' four sequences (the item, its padding, in each half) go through the packed kernel.
        (Off CUDA or in fp32 `packed_attention` runs its masked form on those sequences: the same
        result.) Several items: one row, packed."""
        rows = 2 if cu_seqlens.shape[0] == 5 else 1
        return rows, rows == 1 or PACKED_ATTENTION["rows"] == "triton"

    def packed_rope(self, pos: Tensor, cu_seqlens: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin of the rotary angles for `forward_packed`'s layout, float32: [2 N, dim_head],
        each token's from its frame index `pos` [N] (both halves), where attention runs on the packed
        axis; [N, dim_head] by position in the row for the masked rows (`packed_rows`). They depend
        on the layout only, so the fast path computes them once per request (`rope=`)."""
        n = pos.shape[0]
        if not self.packed_rows(cu_seqlens)[1]:
            return rope_cos_sin(n, self.cfg.dim_head, pos.device)  # frame index = position in the row
        # rotary angles per token from its frame index: the same float32 products as rope_cos_sin
        angles = torch.cat((pos, pos)).float()[:, None] * rope_inv_freq(self.cfg.dim_head, pos.device)
        angles = angles.repeat_interleave(2, dim=-1)
        return angles.cos(), angles.sin()

    def packed_inputs(self, cond: Tensor, text_cond: Tensor, text_uncond: Tensor) -> Tensor:
        """The input embedding's inputs side by side for both halves, [2 N, 2 mel + text_dim] in the
        weights' dtype: the noisy-mel columns zero (`forward_packed` writes them each step), the
        reference mel (zero in the unconditional half) and the text. They do not change between
        steps, so the fast path fills them once per request (`joined=`)."""
        dt = self.dtype
        x = torch.zeros(2 * cond.shape[0], cond.shape[1], dtype=dt, device=cond.device)
        return torch.cat((x, torch.cat((cond, torch.zeros_like(cond))).to(dt),
                          torch.cat((text_cond, text_uncond)).to(dt)), dim=-1)

    def forward_packed(self, x: Tensor, cond: Tensor, text_cond: Tensor, text_uncond: Tensor, time: Tensor,
                       valid: Tensor, pos: Tensor, cu_seqlens: Tensor, mods: Tensor | None = None,
                       joined: Tensor | None = None, rope: tuple[Tensor, Tensor] | None = None
                       ) -> tuple[Tensor, Tensor]:
        """`forward` on packed items: every item's frames back to back on one token axis, no padding.

        x, cond [N, mel]; text_cond / text_uncond [N, text_dim]; valid [N] bool (False between
        items); pos [N] long: each token's frame index within its item; time: 0-d flow time (one
        for all items); cu_seqlens int32 [S + 1] over the doubled axis (conditional half, then
        unconditional half, 2N tokens; a gap between items is a sequence of its own). Items must
        be at least CONV_POS_KERNEL // 2 invalid tokens apart, so the position convolution never
        reaches across (`tts.f5.fast.ITEM_GAP`). `mods`: `modulations(time)` when the caller has it
        (then `time` is not read). `joined`: `packed_inputs(cond, text_cond, text_uncond)` and
        `rope`: `packed_rope(pos, cu_seqlens)` when the caller keeps them across steps (then cond,
        text_cond, text_uncond and pos are not read; `joined`'s noisy-mel columns are overwritten).
        Returns (pred_cond, pred_uncond) [N, mel] in the weights' dtype; a token's values equal
        `forward`'s for its item and frame.
        """
        n = x.shape[0]
        dt = self.dtype
        if mods is None:  # every item is at the same flow time: one row of modulations for all
            mods = self.modulations(time)
        rows, on_packed_axis = self.packed_rows(cu_seqlens)
        shape = (rows, 2 * n // rows)
        mask2 = torch.cat((valid, valid)).view(shape)
        if joined is None:
            joined = self.packed_inputs(cond, text_cond, text_uncond)
        mel = x.shape[1]
        joined[:, :mel].view(2, n, mel).copy_(x.to(dt)[None].expand(2, n, mel))  # the same x in both halves
        h = self.input_embed.forward_joined(joined.view(*shape, -1), mask2)
        cos, sin = self.packed_rope(pos, cu_seqlens) if rope is None else rope
        key_mask, packed = (None, cu_seqlens) if on_packed_axis else (mask2[:, None, None, :], None)
        for i, block in enumerate(self.transformer_blocks):
            h = block(h, None, cos, sin, key_mask, packed, mods[6 * i: 6 * i + 6, None])
        out = self.proj_out(self.norm_out(h, None, mods[-2:, None])).reshape(2 * n, -1)
        return out[:n], out[n:]
