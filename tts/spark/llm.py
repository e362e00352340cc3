"""The Spark-TTS LLM (a Qwen2 causal LM): weights through transformers, our own forward over a static cache.

`LLM/` is loaded with `transformers.Qwen2ForCausalLM` (embedding, decoder layers, RMSNorms, rotary
table and the tied output projection are its modules). The forward pass is written here because
the decode loop needs what generate() does not offer: one static KV cache shared by sequences that
join and leave between steps, each at its own position. Three entry points:

    forward_prefill(llm, cache, slot, ids [T], start)            -> logits [V] of the last position
    forward_prefill_many(llm, cache, slots [N], [ids [T_i]])     -> logits [N, V], one forward for N prompts
    forward_step(llm, cache, tokens [R], positions [R], length)  -> logits [R, V]

Rows of `forward_step` are slots 0..R-1 (free slots in between carry a dummy token at position 0,
which only ever attends to itself). Every row attends to keys 0..positions[r] of its own slot, so
its logits do not depend on the other rows beyond float rounding.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

import torch
import torch.nn.functional as F

from tts.spark.kv_cache import StaticKVCache


@dataclass(frozen=True)
class LLMShape:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden: int
    vocab: int


def llm_shape(model) -> LLMShape:
    cfg = model.config
    attn = model.model.layers[0].self_attn
    return LLMShape(n_layers=len(model.model.layers), n_heads=cfg.num_attention_heads,
                    n_kv_heads=cfg.num_key_value_heads, head_dim=attn.head_dim, hidden=cfg.hidden_size,
                    vocab=model.lm_head.weight.shape[0])


def load_llm(llm_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Qwen2ForCausalLM from `LLM/` (safetensors), eval mode, on `device` in `dtype`."""
    from transformers import Qwen2ForCausalLM

    llm_dir = Path(llm_dir)
    if not (llm_dir / "config.json").is_file():
        raise ValueError(f"LLM folder {llm_dir} has no config.json")
    model = Qwen2ForCausalLM.from_pretrained(str(llm_dir), dtype=dtype)
    types = set(getattr(model.config, "layer_types", None) or ["full_attention"])
    if types != {"full_attention"}:
        raise ValueError(f"{llm_dir}: layer types {sorted(types)}; only full attention is supported")
    return model.eval().to(device)


def new_cache(model, max_batch: int, max_seq_len: int) -> StaticKVCache:
    shape = llm_shape(model)
    p = model.lm_head.weight
    return StaticKVCache(shape.n_layers, max_batch, shape.n_kv_heads, max_seq_len, shape.head_dim,
                         dtype=p.dtype, device=p.device)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q, k [B, H, T, D]; cos, sin [B, T, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _qkv(attn, x: torch.Tensor, head_dim: int):
    b, t, _ = x.shape
    q = attn.q_proj(x).view(b, t, -1, head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(b, t, -1, head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(b, t, -1, head_dim).transpose(1, 2)
    return q, k, v


def _sdpa_backends():
    """Prefill attention backends: cuDNN's plans are rebuilt for every new length (tens of ms each)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One query per row over its slot's keys: q [R, H, 1, D], keys/values [R, KV, L, D], mask [R, L] (bool).

    Plain matmuls (grouped-query heads folded into the batch), softmax in float32 as transformers'
    eager attention does; no backend choice, and capturable in a CUDA graph.
    """
    r, h, _, d = q.shape
    kv = keys.shape[1]
    scores = torch.matmul(q.view(r, kv, h // kv, d), keys.transpose(-1, -2)) * d ** -0.5  # [R, KV, rep, L]
    scores = scores.masked_fill(~mask.view(r, 1, 1, -1), float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(probs, values).view(r, h, 1, d)


def _layers(model, h: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
    """Run all decoder layers; `attend(layer_index, q, k, v) -> [B, H, T, D]` owns cache writes and masks."""
    cos, sin = model.model.rotary_emb(h, positions)
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        q, k, v = _qkv(attn, layer.input_layernorm(h), attn.head_dim)
        q, k = _rope(q, k, cos, sin)
        out = attend(i, q, k, v)
        b, _, t, _ = out.shape
        h = h + attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.model.norm(h)


@torch.no_grad()
def forward_prefill(model, cache: StaticKVCache, slot: int, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Write `ids` [T] into `slot` at positions start..start+T-1; return the last position's logits [V] (float32)."""
    t = ids.shape[0]
    if start + t > cache.max_seq_len:
        raise ValueError(f"prompt of {start + t} tokens exceeds the KV cache length {cache.max_seq_len}")
    device = cache.k.device
    ids = ids.to(device).view(1, t)
    positions = torch.arange(start, start + t, device=device).view(1, t)
    h = model.model.embed_tokens(ids)

    def attend(i, q, k, v):
        cache.write_prefill(i, slot, start, k, v)
        if start == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        keys, values = cache.slot_view(i, slot, start + t)
        mask = torch.arange(start + t, device=device).view(1, -1) <= positions.view(-1, 1)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)

    with _sdpa_backends():
        h = _layers(model, h, positions, attend)
    return model.lm_head(h[:, -1]).float()[0]


@functools.lru_cache(maxsize=1)
def _causal_varlen():
    """(varlen_attn, its keyword arguments for causal attention with grouped-query heads, whether it
    takes fewer KV heads) or None: torch's flash attention over packed sequences, whose signature
    changed between releases (2.11: is_causal; later: window_size=(-1, 0) and enable_gqa)."""
    import inspect

    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        kw = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        kw = {"is_causal": True}
    else:
        return None
    gqa = "enable_gqa" in params
    if gqa:
        kw["enable_gqa"] = True
    return varlen_attn, kw, gqa


def packed_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Causal attention within each of several prompts packed on one axis: q [1, H, N, D], k / v
    [1, KV, N, D] (N = sum(lengths), prompt i's tokens after prompt i - 1's) -> [1, H, N, D].

    On CUDA in bf16 / fp16: flash attention's varlen kernel (no N x N work). Elsewhere (CPU, fp32):
    SDPA over the whole axis with a block-diagonal causal mask, the same function (N^2 memory)."""
    n = q.shape[2]
    varlen = _causal_varlen() if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else None
    if varlen is not None:
        fn, kw, gqa = varlen
        rep = q.shape[1] // k.shape[1]
        qs, ks, vs = (x[0].transpose(0, 1) for x in (q, k, v))  # [N, heads, D]
        if not gqa and rep > 1:
            ks, vs = ks.repeat_interleave(rep, dim=1), vs.repeat_interleave(rep, dim=1)
        cu = torch.tensor([0, *accumulate(lengths)], device=q.device, dtype=torch.int32)
        out = fn(qs.contiguous(), ks.contiguous(), vs.contiguous(), cu, cu, max(lengths), max(lengths), **kw)
        return out.transpose(0, 1)[None]
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=q.device), torch.tensor(lengths, device=q.device))
    pos = torch.arange(n, device=q.device)
    mask = (seq[:, None] == seq[None, :]) & (pos[None, :] <= pos[:, None])
    with _sdpa_backends():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None], enable_gqa=True)


@torch.no_grad()
def forward_prefill_many(model, cache: StaticKVCache, slots: list[int], prompts: list[torch.Tensor]) -> torch.Tensor:
    """Prefill several new sequences in one forward: prompt i (int64 [T_i]) into slot slots[i] at
    positions 0..T_i-1. Returns each prompt's last-position logits [N, V] (float32), what
    `forward_prefill` gives for each alone (to float rounding).

    Why: sequences joining the running batch are prefilled between two decode steps, and every
    running sequence waits meanwhile. Alone, a ~400-token prefill is hundreds of small kernel
    launches for little arithmetic; several joining prompts packed on one token axis cost about
    the launches of one."""
    if len(slots) != len(prompts) or not prompts:
        raise ValueError(f"{len(slots)} slots for {len(prompts)} prompts")
    lengths = [int(p.shape[0]) for p in prompts]
    if min(lengths) < 1 or max(lengths) > cache.max_seq_len:
        raise ValueError(f"prompt lengths {lengths}: each must be 1..{cache.max_seq_len} (the KV cache length)")
    device = cache.k.device
    ids = torch.cat([p.view(-1) for p in prompts]).to(device).view(1, -1)
    positions = torch.cat([torch.arange(n) for n in lengths]).to(device)
    slot_of = torch.repeat_interleave(torch.tensor(slots), torch.tensor(lengths)).to(device)
    h = model.model.embed_tokens(ids)

    def attend(i, q, k, v):
        cache.k[i, slot_of, :, positions] = k[0].transpose(0, 1)  # [N, KV, D] -> (slot, position) of each token
        cache.v[i, slot_of, :, positions] = v[0].transpose(0, 1)
        return packed_causal_attention(q, k, v, lengths)

    h = _layers(model, h, positions.view(1, -1), attend)
    last = torch.tensor(lengths, device=device).cumsum(0) - 1
    return model.lm_head(h[0, last]).float()


@torch.no_grad()
def forward_step(model, cache: StaticKVCache, tokens: torch.Tensor, positions: torch.Tensor,
                 length: int) -> torch.Tensor:
    """One token per slot 0..R-1 (R = len(tokens)) at `positions`; keys 0..length-1 are read.

    tokens, positions [R] (int64) -> logits [R, V] (float32). `length` must exceed every position
    that is read (a row whose position is >= length writes its key and attends to keys 0..length-1).
    No host synchronisation: on CUDA it can be captured in a graph (`tts.spark.decode.GraphedStep`).
    """
    device = cache.k.device
    rows = tokens.shape[0]
    tokens, positions = tokens.to(device), positions.to(device)
    h = model.model.embed_tokens(tokens.view(rows, 1))
    mask = torch.arange(length, device=device).view(1, -1) <= positions.view(-1, 1)  # [R, L]

    def attend(i, q, k, v):
        cache.write_step(i, rows, positions, k, v)
        keys, values = cache.view(i, rows, length)
        return decode_attention(q, keys, values, mask)

    h = _layers(model, h, positions.view(rows, 1), attend)
    return model.lm_head(h[:, 0]).float()
