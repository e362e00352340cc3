"""The Spark LLM decode step on CUDA: fused weights, one compiled forward, sampling on the device,
one CUDA graph per (rows, key length) bucket.

Same math as `tts.spark.llm.forward_step` followed by `tts.spark.decode.sample_tokens`; what changes
is how it is launched (gpt-fast / nano-vllm style):

* q/k/v projections are one matrix product, gate/up another (`fuse_llm`: the transformers modules'
  weights become views of the fused tensors, so prefill keeps using them and no memory is added);
* the forward over all layers never writes the KV cache: each layer attends to the cached keys
  (positions < its own) plus its new key, and the new keys and values of every layer are written
  with one indexed copy afterwards. The forward is then a pure function, its layer compiled once
  with dynamic rows and key length (`torch.compile`, fusing norms, RoPE, residuals and the MLP
  gate; one graph for every bucket);
* sampling (end-token bans, greedy, temperature / top-k / top-p over the best `N_CAND` logits) runs
  on the device inside the same graph; the host draws each row's uniform number from the
  sequence's own generator before the step and reads back one [2, rows] tensor after it;
* each (rows, key length) bucket is captured once at start-up; a step copies two small host
  buffers in, replays, and reads the tokens back (one synchronisation per step).

Rows that need more than the candidate cut (top_k off or above `N_CAND - TIE_MARGIN`, or logits
tied at the cut) are redrawn over the whole vocabulary on the host's request, with the same draw.

The speech head (`head_from` > 0): a Spark LLM only ever keeps ids from its first special token on
(Qwen's specials, the BiCodec global and semantic tokens, Spark's markers: the tail of the
vocabulary, ~14k of its 166k rows). Each step then multiplies by those rows only and samples among
them; after the replay's T steps one matrix product over all T hidden states (the other ~152k rows
read once per replay instead of once per token) gives each step's best logit outside the head. A
step is exact when that logit stays below what the draw kept (the k-th kept value for a sampled
row, after the row's temperature, as the whole-vocabulary top-k compares it; the best value for a
greedy row): the whole vocabulary's top-k set, and so the draw, is then the head's. Otherwise the
step is a miss: the host redraws it over the whole vocabulary from its hidden state (same draw) and
drops the replay's later steps, as for any redrawn row. The real model puts the text rows far below
the speech ones while it speaks; random weights would miss at almost every step, so the random
checkpoints favour speech tokens (`tts.spark.demo`).

Shapes: R rows (slots 0..R-1), L key length (bucket), V vocabulary, D hidden, Dh head width.
"""

from __future__ import annotations

import inspect
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tts.spark import attention_kernel  # registers sparkstudio::decode_attention
from tts.spark.kv_cache import SPARE_POSITIONS, StaticKVCache
from tts.spark.llm import llm_shape

#: Candidates sampled from on the device: default top_k (50) plus a margin for ties at the k-th value.
N_CAND = 64
#: End-token ids per row the graph can ban (Spark uses one or two).
MAX_END_IDS = 4
#: Columns of the float input: temperature (1 for greedy rows), top_k (as float), top_p, the
#: row's uniform draw, greedy flag.
TEMP, TOP_K, TOP_P, UNIFORM, GREEDY = range(5)
N_FLOAT = 5
#: Columns of the int input: token, position, then MAX_END_IDS end ids, then MAX_END_IDS ban flags.
TOKEN, POSITION, END0 = 0, 1, 2
N_INT = 2 + 2 * MAX_END_IDS


# -- fused weights -------------------------------------------------------------------------------

def _fuse(mods: list[nn.Linear], bias: bool) -> tuple[Tensor, Tensor | None]:
    """Concatenate Linear weights (and biases) along the output dim; the modules then hold views."""
    with torch.no_grad():
        w = torch.cat([m.weight.detach() for m in mods], dim=0).contiguous()
        b = torch.cat([m.bias.detach() for m in mods], dim=0).contiguous() if bias else None
        start = 0
        for m in mods:
            n = m.weight.shape[0]
            m.weight.data = w[start:start + n]
            if bias:
                m.bias.data = b[start:start + n]
            start += n
    return w, b


class FusedLayer(nn.Module):
    def __init__(self, layer):
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        has_bias = attn.q_proj.bias is not None
        wqkv, bqkv = _fuse([attn.q_proj, attn.k_proj, attn.v_proj], has_bias)
        wgu, _ = _fuse([mlp.gate_proj, mlp.up_proj], False)
        self.register_buffer("ln1", layer.input_layernorm.weight.detach(), persistent=False)
        self.register_buffer("ln2", layer.post_attention_layernorm.weight.detach(), persistent=False)
        self.register_buffer("wqkv", wqkv, persistent=False)
        self.register_buffer("bqkv", bqkv, persistent=False)
        self.register_buffer("wo", attn.o_proj.weight.detach(), persistent=False)
        self.register_buffer("wgu", wgu, persistent=False)
        self.register_buffer("wd", mlp.down_proj.weight.detach(), persistent=False)


def rms_norm(x: Tensor, w: Tensor, eps: float) -> Tensor:
    """transformers' Qwen2RMSNorm: statistics in float32, scaled in the input dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class FusedDecoder(nn.Module):
    """The decode forward of a Qwen2 LM over a static cache, without writing it.

    forward(keys, values, tokens [R], positions [R], length) -> (hidden [R, D] after the final norm,
    k_new [layers, R, KV, Dh], v_new [layers, R, KV, Dh]); `logits` applies the LM head (all of it
    or the rows from head_from on). keys/values are the whole cache
    [layers, B, KV, S, Dh]; row r attends to keys 0..positions[r]-1 of slot r (< length) and to its
    own new key.
    """

    def __init__(self, model, max_seq_len: int):
        super().__init__()
        shape = llm_shape(model)
        self.shape = shape
        cfg = model.config
        self.eps = float(cfg.rms_norm_eps)
        act = getattr(cfg, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"the fused decode step supports hidden_act 'silu' only; got {act!r}")
        self.layers = nn.ModuleList([FusedLayer(layer) for layer in model.model.layers])
        p = model.lm_head.weight
        self.register_buffer("embed", model.model.embed_tokens.weight.detach(), persistent=False)
        self.register_buffer("norm", model.model.norm.weight.detach(), persistent=False)
        self.register_buffer("lm_head", p.detach(), persistent=False)
        # RoPE tables from the model's own rotary module (same values forward_step computes per call)
        with torch.no_grad():
            pos = torch.arange(max_seq_len, device=p.device).view(1, -1)
            cos, sin = model.model.rotary_emb(torch.zeros(1, device=p.device, dtype=p.dtype), pos)
        self.register_buffer("cos", cos[0].contiguous(), persistent=False)  # [S, Dh] model dtype
        self.register_buffer("sin", sin[0].contiguous(), persistent=False)
        self.attention = "matmul"  # `decode_layer`'s attention form (`choose_attention` sets it)

    def logits(self, hidden: Tensor, head_from: int = 0) -> Tensor:
        """hidden [R, D] (final-normed) -> float32 logits [R, V - head_from] of ids head_from.. ."""
        return F.linear(hidden, self.lm_head[head_from:]).float()

    def rest_max(self, hidden: Tensor, head_from: int) -> Tensor:
        """hidden [N, D] -> the best float32 logit among ids 0..head_from-1 [N] (one matrix product)."""
        return F.linear(hidden, self.lm_head[:head_from]).amax(dim=-1).float()

    def forward(self, keys: Tensor, values: Tensor, tokens: Tensor, positions: Tensor, length: int):
        s = self.shape
        rows = tokens.shape[0]
        dh = s.head_dim
        h = F.embedding(tokens, self.embed)  # [R, D]
        cos, sin = self.cos[positions], self.sin[positions]  # [R, Dh]
        cached = torch.arange(length, device=tokens.device).view(1, -1) < positions.view(-1, 1)  # [R, L]
        k_out, v_out = [], []
        for i, ly in enumerate(self.layers):
            h, k, v = self.layer_fn(h, keys[i], values[i], cos, sin, cached,
                                    ly.ln1, ly.wqkv, ly.bqkv, ly.wo, ly.ln2, ly.wgu, ly.wd, self.eps,
                                    s.n_heads, s.n_kv_heads, self.attention)
            k_out.append(k)
            v_out.append(v)
        return rms_norm(h, self.norm, self.eps), torch.stack(k_out), torch.stack(v_out)

    layer_fn = staticmethod(lambda *a: decode_layer(*a))  # replaced by the compiled layer (compile_decoder)


def decode_layer(h: Tensor, ks: Tensor, vs: Tensor, cos: Tensor, sin: Tensor, cached: Tensor, ln1: Tensor,
                 wqkv: Tensor, bqkv: Tensor | None, wo: Tensor, ln2: Tensor, wgu: Tensor, wd: Tensor, eps: float,
                 n_heads: int, n_kv: int, attention: str = "matmul") -> tuple[Tensor, Tensor, Tensor]:
    """One decoder layer for one new token per row. h [R, D]; ks/vs [B, KV, S, Dh] this layer's
    whole cache, of which slots 0..R-1 and their first L = cached.shape[-1] keys are looked at and
    only those with `cached` [R, L] true are read (positions before the row's own); cos/sin [R, Dh]. Returns
    (h [R, D], this token's k and v [R, KV, Dh]). A free function of tensors, so one compiled graph
    serves every layer (regional compilation).

    Why the cache comes in whole, is sliced here and the size-1 axes are literals: compiled with
    every axis a symbol, dynamo specialised on facts about them, each fact a guard and a recompile
    (six compiles for the 30 buckets, counted on the CPU; each a cold compile at start-up on the
    GPU): R equal to the slab's slot count, a [R, KV, L, Dh] view contiguous when L was the slab
    length, a broadcast [R, 1, Dh] axis, R = 1. Now only R and L are symbols (`compile_decoder`
    marks them), the slab is static and has slots and positions past any bucket
    (`kv_cache.SPARE_SLOTS`, `SPARE_POSITIONS`: a slice never spans a whole axis), the 1s are
    literals, and R is unbacked where torch allows it: one graph for every bucket.

    attention: "matmul" (the products below) or "kernel" (`tts.spark.attention_kernel`: two Triton
    kernels in place of the ~8 launches of the products, CUDA only); a constant to the compiler."""
    rows, dh = h.shape[0], ks.shape[-1]
    rep = n_heads // n_kv
    scale = dh ** -0.5
    length = cached.shape[-1]
    cos, sin = cos.view(rows, 1, dh), sin.view(rows, 1, dh)
    qkv = F.linear(rms_norm(h, ln1, eps), wqkv, bqkv)
    q = qkv[:, : n_heads * dh].view(rows, n_heads, dh)
    k = qkv[:, n_heads * dh: (n_heads + n_kv) * dh].view(rows, n_kv, dh)
    v = qkv[:, (n_heads + n_kv) * dh:].view(rows, n_kv, dh)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    if attention == "kernel":
        out = torch.ops.sparkstudio.decode_attention(q, k, v, ks, vs, cached, scale)
        return _layer_tail(h, out.view(rows, n_heads * dh), wo, ln2, wgu, wd, eps), k, v
    ks, vs = ks[:rows, :, :length], vs[:rows, :, :length]
    cached = cached.view(rows, 1, 1, length)
    qg = q.view(rows, n_kv, rep, dh)
    old = torch.matmul(qg, ks.transpose(-1, -2)) * scale  # [R, KV, rep, L]
    old = old.masked_fill(~cached, float("-inf"))
    new = (qg * k.view(rows, n_kv, 1, dh)).sum(-1, keepdim=True) * scale  # [R, KV, rep, 1]
    probs = torch.softmax(torch.cat((old, new), dim=-1).float(), dim=-1).to(h.dtype)
    # The cached keys' probabilities as their own contiguous [R, KV, rep, L] buffer: as a view of the
    # [.., L + 1] softmax its row stride is odd, and cuBLAS then picked an unvectorised sm75 WMMA
    # kernel for this product (profiled on an H200: 47 us a layer, 1.1 ms of a 2.5 ms step).
    p_old = probs[..., :length].contiguous()
    out = torch.matmul(p_old, vs) + probs[..., length:] * v.view(rows, n_kv, 1, dh)
    return _layer_tail(h, out.reshape(rows, n_heads * dh), wo, ln2, wgu, wd, eps), k, v


def _layer_tail(h: Tensor, attn: Tensor, wo: Tensor, ln2: Tensor, wgu: Tensor, wd: Tensor, eps: float) -> Tensor:
    """The attention's output projection and residual, then the MLP and its residual: h, attn [R, D]."""
    h = h + F.linear(attn, wo)
    g, u = F.linear(rms_norm(h, ln2, eps), wgu).chunk(2, dim=-1)
    return h + F.linear(F.silu(g) * u, wd)


def write_new_kv(cache: StaticKVCache, positions: Tensor, k_new: Tensor, v_new: Tensor) -> None:
    """k_new, v_new [layers, R, KV, Dh] -> slot r, position positions[r] of every layer (two kernels)."""
    rows = positions.shape[0]
    idx = torch.arange(rows, device=positions.device)
    cache.k[:, idx, :, positions] = k_new.transpose(0, 1)
    cache.v[:, idx, :, positions] = v_new.transpose(0, 1)


# -- sampling on the device ---------------------------------------------------------------------

def ban_ends(logits: Tensor, ints: Tensor, offset: int = 0) -> Tensor:
    """Set each row's banned end ids to -inf (ints columns END0.. hold ids, then ban flags); logits
    [R, V'] hold ids offset..offset+V'-1 (end ids below offset are not among them)."""
    ids = ints[:, END0: END0 + MAX_END_IDS] - offset
    ban = ints[:, END0 + MAX_END_IDS: END0 + 2 * MAX_END_IDS] > 0
    if offset:
        ban = ban & (ids >= 0)
        ids = ids.clamp(min=0)
    vals = torch.where(ban, float("-inf"), logits.gather(1, ids))
    return logits.scatter(1, ids, vals)


#: Columns of one slice of `top_candidates`' first selection.
TOPK_SLICE = 1024
#: Row widths `top_candidates` selects in two stages: torch.topk takes one thread block a row below
#: ~20k columns (its single-block radix select), which over the speech head's 14,357 columns took
#: 80 us a step at one row (H100, `spark-step` profile) against ~40 us for the whole vocabulary's
#: 166k columns in its multi-block form.
TWO_STAGE_WIDTHS = (4 * TOPK_SLICE, 65536)


def top_candidates(x: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The n largest values of each row of x [R, V] and their column indices (torch.topk's result
    up to the order of ties). Rows of TWO_STAGE_WIDTHS columns: the best n of each TOPK_SLICE
    columns, then the best n of those (the same values: every overall best lies in its slice's best)."""
    rows, width = x.shape
    if not TWO_STAGE_WIDTHS[0] <= width <= TWO_STAGE_WIDTHS[1] or n > TOPK_SLICE:
        return torch.topk(x, n, dim=-1)
    slices = -(-width // TOPK_SLICE)
    padded = F.pad(x, (0, slices * TOPK_SLICE - width), value=float("-inf"))
    vals, idx = torch.topk(padded.view(rows, slices, TOPK_SLICE), n, dim=-1)  # [R, slices, n]
    idx = idx + torch.arange(0, slices * TOPK_SLICE, TOPK_SLICE, device=x.device).view(1, -1, 1)
    vals, pick = torch.topk(vals.view(rows, -1), n, dim=-1)
    # a padding column (-inf) is only ever among them with fewer than n finite values, and never drawn
    return vals, idx.view(rows, -1).gather(1, pick).clamp(max=width - 1)


def draw(x: Tensor, prm: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """x [R, V] logits, prm [R, N_FLOAT] -> (tokens [R] int64, overflow [R] bool, kth [R] float32:
    the k-th best logit after the temperature, the lowest value the draw keeps); no host sync.

    Candidates in (value descending, index ascending) order, the order of a stable sort; keep the
    top k (ties with the k-th value kept, as transformers keeps them), then the smallest prefix whose
    probability reaches top_p; inverse-CDF draw with the row's uniform number. With n < V only the
    best n candidates are considered: `overflow` marks rows whose last candidate ties their k-th
    value (ties may have been cut; the caller redraws those over the whole vocabulary).
    """
    vocab = x.shape[-1]
    x = x / prm[:, TEMP].view(-1, 1)
    if n < vocab:
        vals, idx = top_candidates(x, n)  # ties in no particular order: put them by index
        idx, perm = torch.sort(idx, dim=-1)
        vals, perm = torch.sort(vals.gather(1, perm), dim=-1, descending=True, stable=True)
        idx = idx.gather(1, perm)
    else:
        vals, idx = torch.sort(x, dim=-1, descending=True, stable=True)
    ks = prm[:, TOP_K].clamp(min=1, max=n).long().view(-1, 1)
    kth = vals.gather(1, ks - 1)
    overflow = (vals[:, -1:] == kth).view(-1) & (n < vocab)
    vals = vals.masked_fill(vals < kth, float("-inf"))
    ps = prm[:, TOP_P].view(-1, 1)
    probs = torch.softmax(vals, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly more likely tokens
    drop = (before >= ps) & (ps < 1.0)
    drop[:, 0] = False
    probs = torch.softmax(vals.masked_fill(drop, float("-inf")), dim=-1)
    cdf = torch.cumsum(probs, dim=-1)
    u = prm[:, UNIFORM].view(-1, 1)
    pick = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=n - 1)
    # never land on a dropped token; clamp at 0 for rows with nothing left (all banned: greedy rows
    # whose result is replaced, and never an out-of-range index on the device)
    pick = torch.minimum(pick, (probs > 0).sum(dim=-1, keepdim=True) - 1).clamp(min=0)
    return idx.gather(1, pick).view(-1), overflow, kth.view(-1)


def sample_rows(logits: Tensor, ints: Tensor, prm: Tensor, n: int, offset: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """logits [R, V'] of ids offset.. -> (banned logits, [2, R] int64 (token id, needs-the-whole-
    vocabulary flag), floor [R] float32). floor: what a logit from outside these columns, divided by
    the row's temperature (1 for greedy rows), must stay below for the token to be the one the whole
    vocabulary gives (the k-th kept value; a greedy row's best value)."""
    logits = ban_ends(logits, ints, offset)
    best, greedy = logits.max(dim=-1)
    tok, overflow, kth = draw(logits, prm, min(n, logits.shape[-1]))
    is_greedy = prm[:, GREEDY] > 0
    tok = torch.where(is_greedy, greedy, tok) + offset
    redo = (overflow | (prm[:, TOP_K] > n - TIE_MARGIN)) & ~is_greedy
    return logits, torch.stack((tok, redo.long())), torch.where(is_greedy, best, kth)


#: Rows whose top_k is above N_CAND - TIE_MARGIN (or off) are redrawn over the whole vocabulary.
TIE_MARGIN = 14
#: top_k value standing for "off" in the float input (exact in float32, larger than any vocabulary).
NO_TOP_K = float(2 ** 24)


# -- the graphed step ---------------------------------------------------------------------------

def fused_step(decoder: "FusedDecoder", cache: StaticKVCache, ints: Tensor, floats: Tensor, length: int,
               n: int = N_CAND, forward: Callable | None = None,
               head_from: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The whole step on device tensors: forward (`forward`, default the decoder itself), KV write,
    the LM head (rows head_from..), sampling -> (banned logits [R, V - head_from], [2, R],
    hidden [R, D], floor [R] (`sample_rows`))."""
    tokens, positions = ints[:, TOKEN], ints[:, POSITION]
    hidden, k_new, v_new = (forward or decoder)(cache.k, cache.v, tokens, positions, length)
    write_new_kv(cache, positions, k_new, v_new)
    logits, out, floor = sample_rows(decoder.logits(hidden, head_from), ints, floats, n, head_from)
    return logits, out, hidden, floor


def fused_steps(decoder: "FusedDecoder", cache: StaticKVCache, ints: Tensor, floats: Tensor, length: int,
                n: int = N_CAND, forward: Callable | None = None,
                head_from: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """T steps in a row on the device: ints [T, R, N_INT], floats [T, R, N_FLOAT] hold each step's
    inputs (positions, end-token bans, uniform draws: all known ahead); the token fed at step t > 0
    is the one sampled at step t - 1, never leaving the device. Returns (banned logits [T, R, V'],
    [T, 3, R] int64 (token, redraw flag, head miss flag), hidden [T, R, D]). Keys of step t are
    cached before step t + 1 reads them (`fused_step` writes them). head_from > 0: the speech head
    (module docstring); a miss sets the redraw flag too."""
    logits, outs, hidden, floors = [], [], [], []
    tok = ints[0, :, TOKEN]
    for t in range(ints.shape[0]):
        step_ints = torch.cat((tok.view(-1, 1), ints[t, :, TOKEN + 1:]), dim=1)
        lg, out, hn, floor = fused_step(decoder, cache, step_ints, floats[t], length, n, forward, head_from)
        logits.append(lg)
        outs.append(out)
        hidden.append(hn)
        floors.append(floor)
        tok = out[0]
    outs, hidden = torch.stack(outs), torch.stack(hidden)
    if head_from:
        steps, rows, width = hidden.shape
        rest = decoder.rest_max(hidden.view(steps * rows, width), head_from).view(steps, rows)
        miss = (rest / floats[:, :, TEMP] >= torch.stack(floors)).long()
    else:
        miss = torch.zeros_like(outs[:, 1])
    outs = torch.stack((outs[:, 0], outs[:, 1] | miss, miss), dim=1)
    return torch.stack(logits), outs, hidden


def warmup_inputs(cache: StaticKVCache, rows: int, tokens: int = 1) -> tuple[Tensor, Tensor]:
    """The inputs a bucket is warmed up and captured with (int [T, R, N_INT], float [T, R, N_FLOAT],
    T = tokens, on the cache's device). Warm-up runs really execute: their cache writes go to the
    spare positions past every sequence's range, so capturing while sequences are cached cannot
    touch them."""
    if not 1 <= tokens <= SPARE_POSITIONS:
        raise ValueError(f"tokens per replay must be 1..{SPARE_POSITIONS} (the KV cache's spare positions)")
    dev = cache.k.device
    ints = torch.zeros(tokens, rows, N_INT, dtype=torch.long, device=dev)
    ints[:, :, POSITION] = cache.scratch_position + torch.arange(tokens, device=dev).view(-1, 1)
    return ints, torch.ones(tokens, rows, N_FLOAT, dtype=torch.float32, device=dev)


class _Replay:
    """What both step forms share: the last replay's inputs and outputs, and the whole vocabulary's
    logits and tokens for rows of it that must be redrawn."""

    decoder: FusedDecoder
    head_from: int
    ints: Tensor  # [T, R, N_INT] on the device, as the last replay read them (END columns per step)
    floats: Tensor  # [T, R, N_FLOAT]
    logits: Tensor  # [T, R, V - head_from] banned
    hidden: Tensor  # [T, R, D]

    def full_logits(self, steps: list[int], rows: list[int]) -> Tensor:
        """Banned float32 logits over the whole vocabulary [n, V] of (step, row) pairs of the last replay."""
        ti = torch.tensor(steps, device=self.logits.device)
        ri = torch.tensor(rows, device=self.logits.device)
        if not self.head_from:
            return self.logits[ti, ri]
        return ban_ends(self.decoder.logits(self.hidden[ti, ri]), self.ints[ti, ri])

    def exact_tokens(self, steps: list[int], rows: list[int]) -> list[int]:
        """Those pairs' tokens drawn over the whole vocabulary with the replay's own draws."""
        full = self.full_logits(steps, rows)
        ti = torch.tensor(steps, device=full.device)
        ri = torch.tensor(rows, device=full.device)
        _, out, _ = sample_rows(full, self.ints[ti, ri], self.floats[ti, ri], full.shape[-1])
        return [int(t) for t in out[0].tolist()]

    @staticmethod
    def _split(out: Tensor) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
        rows = out.tolist()  # the replay's one synchronisation
        return [o[0] for o in rows], [o[1] for o in rows], [o[2] for o in rows]


class EagerFusedStep(_Replay):
    """`FastStep`'s interface without a graph (any device): tests the fused path on the CPU."""

    def __init__(self, decoder: FusedDecoder, cache: StaticKVCache, rows: int, length: int, tokens: int = 1,
                 forward: Callable | None = None, head_from: int = 0):
        self.decoder, self.forward, self.head_from = decoder, forward, head_from
        self.cache, self.rows, self.length, self.tokens = cache, rows, length, tokens
        self.single: EagerFusedStep | None = None  # the same bucket one step a replay (`build_steps`)
        self.host_ints = torch.zeros(tokens, rows, N_INT, dtype=torch.long)
        self.host_floats = torch.zeros(tokens, rows, N_FLOAT, dtype=torch.float32)
        self.logits = self.floats = self.ints = self.hidden = None

    def __call__(self) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
        dev = self.cache.k.device
        self.ints, self.floats = self.host_ints.to(dev), self.host_floats.to(dev)
        self.logits, out, self.hidden = fused_steps(self.decoder, self.cache, self.ints, self.floats, self.length,
                                                    forward=self.forward, head_from=self.head_from)
        return self._split(out)


class FastStep(_Replay):
    """One (rows, length) bucket: static inputs, T steps of the forward, the KV write and sampling in
    one CUDA graph (T = tokens: one replay and one read-back per T tokens of every row)."""

    def __init__(self, decoder: FusedDecoder, cache: StaticKVCache, rows: int, length: int, pool=None,
                 tokens: int = 1, forward: Callable | None = None, head_from: int = 0):
        dev = cache.k.device
        self.decoder, self.head_from = decoder, head_from
        self.rows, self.length, self.tokens = rows, length, tokens
        self.single: FastStep | None = None  # the same bucket one step a replay (`build_steps`)
        self.ints, self.floats = warmup_inputs(cache, rows, tokens)
        self.host_ints = torch.zeros(tokens, rows, N_INT, dtype=torch.long).pin_memory()
        self.host_floats = torch.zeros(tokens, rows, N_FLOAT, dtype=torch.float32).pin_memory()

        def run():
            return fused_steps(decoder, cache, self.ints, self.floats, length, forward=forward, head_from=head_from)

        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            for _ in range(2):
                run()
        torch.cuda.current_stream(dev).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.logits, self.out, self.hidden = run()

    def __call__(self) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
        """Replay with the host buffers' contents; returns (tokens [T][R], redraw flags [T][R],
        head miss flags [T][R]) (one sync)."""
        self.ints.copy_(self.host_ints, non_blocking=True)
        self.floats.copy_(self.host_floats, non_blocking=True)
        self.graph.replay()
        return self._split(self.out)


#: The row-count hint the compiler tunes for while R is an unbacked size (a typical batch).
ROWS_HINT = 8


def unbacked_rows_supported() -> bool:
    """Whether this torch can mark R unbacked with one shared symbol and bounds (`mark_unbacked`'s
    shape_id, min and max); older ones get a backed R, compiled apart for R = 1."""
    mark = getattr(torch._dynamo.decorators, "mark_unbacked", None)
    if mark is None:
        return False
    params = inspect.signature(mark).parameters
    return all(name in params for name in ("shape_id", "min", "max"))


def _row_marker(unbacked: bool) -> Callable[[tuple[Tensor, ...], int], None]:
    """A function marking dim 0 (R) of every tensor it gets dynamic. A backed size is never 0 or 1
    in the compiled graph, so R = 1 compiles a second graph; an unbacked one (value unknown to the
    compiler, all tensors sharing one symbol, 1 <= R < slab slots) serves every R with one graph."""
    if not unbacked:
        def mark_backed(tensors: tuple[Tensor, ...], slots: int) -> None:
            for t in tensors:
                torch._dynamo.mark_dynamic(t, 0)
        return mark_backed
    mark = torch._dynamo.decorators.mark_unbacked
    extra = {"hint_override": ROWS_HINT} if "hint_override" in inspect.signature(mark).parameters else {}

    def mark_unbacked(tensors: tuple[Tensor, ...], slots: int) -> None:
        for t in tensors:
            mark(t, 0, shape_id="decode_rows", min=1, max=slots - 1, **extra)
    return mark_unbacked


def compile_decoder(decoder: FusedDecoder, log: Callable[[str], None] | None = None,
                    backend="inductor", unbacked_rows: bool | None = None) -> tuple[Callable, dict]:
    """Regional compilation: `decode_layer` through torch.compile, shared by all layers; the few
    ops around the layers stay eager (they are captured in the CUDA graph all the same). Compiling
    the whole 24-layer forward at once took minutes on an H100 (measured: not done after 150 s); one
    layer compiles in seconds. Only the row count R and the key length L are dynamic (marked on
    each call's h, cos, sin and mask; weights and cache slabs are static), so every (R, L) bucket
    replays one graph: one compile at start-up, two where R is backed (see `decode_layer` for what
    used to recompile).
    Returns a forward callable; compilation happens at its first call (the first capture).
    `backend` is torch.compile's (tests pass a counting one); unbacked_rows: None = where this
    torch supports it (`unbacked_rows_supported`), False = a backed R (`build_steps` retries so if
    the unbacked graph fails)."""
    unbacked = unbacked_rows_supported() if unbacked_rows is None else unbacked_rows
    stats: dict = {"unbacked_rows": unbacked}
    try:
        from tts.compile_cache import configure_compile_cache

        stats["cache_dir"] = str(configure_compile_cache())  # a restart reuses this start's compiled code
        compiled = torch.compile(decode_layer, dynamic=None, fullgraph=True, backend=backend)
        stats["compiled"] = True
        mark_rows = _row_marker(unbacked)

        def layer(h, ks, vs, cos, sin, cached, *rest):
            mark_rows((h, cos, sin, cached), ks.shape[0])
            torch._dynamo.mark_dynamic(cached, 1)  # L
            return compiled(h, ks, vs, cos, sin, cached, *rest)

        def forward(*args):
            decoder.layer_fn = layer
            try:
                return decoder(*args)
            finally:
                decoder.layer_fn = FusedDecoder.layer_fn
        return forward, stats
    except Exception as exc:  # noqa: BLE001 - keep serving, uncompiled
        stats["compile_error"] = f"{type(exc).__name__}: {exc}"[:500]
        if log:
            log(f"torch.compile of the decode step failed; eager fused step: {stats['compile_error']}")
        return decoder, stats


#: Largest difference the attention kernel may show against its plain-torch form at start-up, as a
#: fraction of the outputs' largest magnitude: bf16 outputs round at 2^-8 (0.4 %); a wrong kernel is off
#: by the order of the values themselves.
KERNEL_CHECK_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def check_attention_kernel(decoder: FusedDecoder, device: torch.device, rows: int = 3, length: int = 300) -> float:
    """The attention kernel against `attention_kernel.reference` on random inputs shaped like the
    model's (rows, length keys, part of them masked); returns max |difference| / max |reference|."""
    s = decoder.shape
    dtype = decoder.embed.dtype
    gen = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    q, kn, vn = rnd(rows, s.n_heads, s.head_dim), rnd(rows, s.n_kv_heads, s.head_dim), rnd(rows, s.n_kv_heads, s.head_dim)
    keys, values = rnd(rows + 1, s.n_kv_heads, length + 64, s.head_dim), rnd(rows + 1, s.n_kv_heads, length + 64, s.head_dim)
    cached = torch.arange(length, device=device).view(1, -1) < torch.tensor([length, length // 3, 0], device=device)[:rows].view(-1, 1)
    scale = s.head_dim ** -0.5
    out = attention_kernel.decode_attention(q, kn, vn, keys, values, cached, scale).float()
    ref = attention_kernel.reference(q, kn, vn, keys, values, cached, scale).float()
    return float((out - ref).abs().max() / ref.abs().max().clamp(min=1e-12))


def choose_attention(decoder: FusedDecoder, device: torch.device, wanted: str,
                     log: Callable[[str], None] | None = None) -> dict:
    """Set decoder.attention: "kernel" where wanted, Triton runs here and the kernel passes
    `check_attention_kernel`; else "matmul". Returns what was chosen and why."""
    chosen: dict = {"attention": "matmul", "attention_wanted": wanted}
    if wanted == "kernel":
        if device.type != "cuda" or not attention_kernel.available():
            chosen["attention_note"] = "Triton kernels need CUDA and Triton here"
        else:
            try:
                err = check_attention_kernel(decoder, device)
                chosen["attention_check_rel_error"] = round(err, 6)
                if err <= KERNEL_CHECK_TOLERANCE.get(decoder.embed.dtype, 2e-2):
                    chosen["attention"] = "kernel"
                else:
                    chosen["attention_note"] = "kernel differs from the plain-torch form"
            except Exception as exc:  # noqa: BLE001 - keep serving with the matrix products
                chosen["attention_note"] = f"{type(exc).__name__}: {exc}"[:300]
        if chosen["attention"] != "kernel" and log:
            log(f"attention kernel not used ({chosen['attention_note']}); matrix products instead")
    decoder.attention = chosen["attention"]
    return chosen


def build_steps(model, cache: StaticKVCache, row_buckets: list[int], length_buckets: list[int],
                compile_: bool = True, log: Callable[[str], None] | None = None,
                tokens: int = 1, attention: str = "matmul", single_steps: bool = False,
                head_from: int = 0) -> tuple[dict, dict]:
    """Fuse, compile and capture every bucket (`tokens` steps per replay); returns
    ({(rows, length): FastStep}, stats). single_steps: each bucket also gets the one-step form as
    its `.single` (replayed for the last tokens before a streamed first chunk, `tts.spark.decode`).
    head_from > 0: the speech head from that id (module docstring); 0: the whole LM head.
    On a CPU cache: the fused steps uncompiled and without graphs (`EagerFusedStep`, for tests)."""
    t0 = time.perf_counter()
    decoder = getattr(model, "_fused_decoder", None)  # one per model: later batches share its weights
    if decoder is None or decoder.cos.shape[0] < cache.slab_positions:  # RoPE rows for the spare ones too
        decoder = FusedDecoder(model, cache.slab_positions)
        model._fused_decoder = decoder
    with torch.no_grad():
        chosen = choose_attention(decoder, cache.k.device, attention, log)
    if cache.k.device.type != "cuda":
        steps = {(r, n): EagerFusedStep(decoder, cache, r, n, tokens, head_from=head_from)
                 for r in row_buckets for n in length_buckets}
        if single_steps:
            for (r, n), step in steps.items():
                step.single = EagerFusedStep(decoder, cache, r, n, 1, head_from=head_from)
        return steps, {"compiled": False, "graphs": 0, "tokens_per_replay": tokens, "single_steps": single_steps,
                       "head_from": head_from, **chosen}
    pool = torch.cuda.graph_pool_handle()
    step_s: dict[str, float] = {}  # each bucket's build; the compiles happen inside the first ones

    def capture_all(forward) -> dict:
        step_s.clear()
        built = {}
        for r in sorted(row_buckets, reverse=True):
            for n in sorted(length_buckets, reverse=True):
                t_step = time.perf_counter()
                built[r, n] = FastStep(decoder, cache, r, n, pool, tokens, forward, head_from)
                if single_steps:
                    built[r, n].single = FastStep(decoder, cache, r, n, pool, 1, forward, head_from)
                step_s[f"{r}x{n}"] = round(time.perf_counter() - t_step, 2)
        return built

    # what to try, best first: one compiled graph (unbacked R), a graph for R = 1 and one for R > 1
    # (backed R), then the uncompiled fused step (still in CUDA graphs)
    attempts = []
    if compile_:
        if unbacked_rows_supported():
            attempts.append(lambda: compile_decoder(decoder, log, unbacked_rows=True))
        attempts.append(lambda: compile_decoder(decoder, log, unbacked_rows=False))
    attempts.append(lambda: (decoder, {"compiled": False}))
    errors = []
    with torch.no_grad():
        for attempt in attempts:
            forward, stats = attempt()
            try:
                steps = capture_all(forward)
                break
            except Exception as exc:  # noqa: BLE001 - this form failed at capture: the next one
                if forward is decoder:
                    raise
                errors.append(f"{type(exc).__name__}: {exc}"[:500])
                if log:
                    log(f"compiled decode step failed at capture ({stats}); next form: {errors[-1]}")
                torch.cuda.synchronize(cache.k.device)
                torch._dynamo.reset()
    if errors:
        stats["capture_errors"] = errors
    slow = {k: v for k, v in step_s.items() if v >= 1.0}  # where start-up goes: builds that compiled
    stats.update(graphs=len(steps) * (2 if single_steps else 1), tokens_per_replay=tokens, single_steps=single_steps,
                 head_from=head_from,
                 build_s=round(time.perf_counter() - t0, 2), **chosen, slow_buckets_s=slow,
                 other_buckets_s=round(sum(v for v in step_s.values() if v < 1.0), 2))
    if log:
        log(f"decode steps ready: {stats}")
    return steps, stats
