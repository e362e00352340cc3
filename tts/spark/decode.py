"""The decode hot path: prefill, one decode step for every running sequence, sampling, generate.

A `DecodeBatch` owns a static KV cache of `max_batch` slots. Sequences join with `add` (prefill
into a free slot, first token sampled) and leave when they finish or are dropped; `step` feeds
every running sequence's last token at its own position and samples the next one. Slots are handed
out lowest-first and each step runs rows 0..highest-running-slot, so the batch stays dense.

Sampling per sequence (upstream's order, as transformers applies it): logits / temperature, keep
the top_k, keep the smallest set of top tokens whose probability reaches top_p, draw. Greedy
(argmax) when top_k == 1 or temperature == 0. Each sequence draws from its own CPU
`torch.Generator` seeded from the request, so its samples do not depend on its batch mates or on
the device. End tokens are masked out until `min_new_tokens` tokens exist.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from tts.spark.kv_cache import StaticKVCache
from tts.spark.llm import forward_prefill, forward_step, new_cache


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 50  # 1 = greedy; 0 = no top-k
    top_p: float = 0.95  # 1.0 = no nucleus filtering
    max_new_tokens: int = 3000
    min_new_tokens: int = 0  # end tokens are ignored until this many tokens exist

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 or self.temperature <= 0


@dataclass(eq=False)
class Sequence:
    """One LLM generation: a prompt and what has been generated for it so far."""

    prompt_ids: list[int]
    params: SamplingParams
    end_ids: tuple[int, ...]
    seed: int
    tag: object = None  # the owner's handle (the engine puts its request state here)
    keep_logits: bool = False  # record every step's logits (tests)
    generated: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    slot: int = -1
    finished: bool = False
    finish_reason: str = ""  # "end", "length", "cache", "cancelled"
    prefill_s: float = 0.0
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self):
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(int(self.seed))

    @property
    def position(self) -> int:
        """Position of the last generated token (the one fed next)."""
        return len(self.prompt_ids) + len(self.generated) - 1

    @property
    def tokens(self) -> list[int]:
        """Generated tokens without a final end token."""
        if self.finish_reason == "end" and self.generated:
            return self.generated[:-1]
        return list(self.generated)


def sample_tokens(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits [R, V] (float32) -> one token per row, using each sequence's params and generator."""
    logits = logits.clone()
    for r, s in enumerate(seqs):
        if s.end_ids and len(s.generated) < s.params.min_new_tokens:
            logits[r, list(s.end_ids)] = float("-inf")
    out = [0] * len(seqs)
    sampled = [r for r, s in enumerate(seqs) if not s.params.greedy]
    greedy = [r for r, s in enumerate(seqs) if s.params.greedy]
    if greedy:  # one device sync for all greedy rows
        picks = logits[torch.tensor(greedy, device=logits.device)].argmax(dim=-1).tolist()
        for r, tok in zip(greedy, picks):
            out[r] = int(tok)
    if not sampled:
        return out
    rows = torch.tensor(sampled, device=logits.device)
    x = logits[rows] / torch.tensor([seqs[r].params.temperature for r in sampled],
                                    device=logits.device).view(-1, 1)
    vals, idx = torch.sort(x, dim=-1, descending=True)
    vocab = x.shape[-1]
    ks = torch.tensor([seqs[r].params.top_k if seqs[r].params.top_k > 0 else vocab for r in sampled],
                      device=logits.device).clamp(max=vocab)
    kth = vals.gather(1, (ks - 1).view(-1, 1))
    vals = vals.masked_fill(vals < kth, float("-inf"))  # ties with the k-th value are kept, as transformers does
    ps = torch.tensor([seqs[r].params.top_p for r in sampled], device=logits.device, dtype=vals.dtype).view(-1, 1)
    probs = torch.softmax(vals, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly more likely tokens
    drop = (before >= ps) & (ps < 1.0)
    drop[:, 0] = False
    vals = vals.masked_fill(drop, float("-inf"))
    probs = torch.softmax(vals, dim=-1)
    u = torch.stack([torch.rand((), generator=seqs[r].generator) for r in sampled]).to(probs.device)
    cdf = torch.cumsum(probs, dim=-1)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1]).view(-1, 1).to(cdf.dtype), right=True).clamp(max=vocab - 1)
    pick = torch.minimum(pick, (probs > 0).sum(dim=-1, keepdim=True) - 1)  # never land on a dropped token
    chosen = idx.gather(1, pick).view(-1).tolist()
    for r, tok in zip(sampled, chosen):
        out[r] = int(tok)
    return out


#: Key lengths a graphed decode step is captured for (and the cache length): the smallest that
#: covers every running position is replayed. Each holds its own [max_batch, vocab] logits buffer.
GRAPH_LENGTHS = (256, 512, 1024, 2048, 4096, 8192)


class GraphedStep:
    """`forward_step` over all `rows` slots and `length` keys, captured once in a CUDA graph.

    Eager decoding of the 0.5B LLM is bound by kernel launches (~900 per step); a replay launches
    them at once. Rows of free slots carry a dummy token (their writes land in free slots only).
    """

    def __init__(self, model, cache: StaticKVCache, rows: int, length: int, pool=None):
        dev = cache.k.device
        self.rows, self.length = rows, length
        self.tokens = torch.zeros(rows, dtype=torch.long, device=dev)
        # Warm-up runs really execute: aim their cache writes at the last position, which no
        # running sequence reads before rewriting it (sequences stop before feeding past it).
        self.positions = torch.full((rows,), cache.max_seq_len - 1, dtype=torch.long, device=dev)
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            for _ in range(2):
                forward_step(model, cache, self.tokens, self.positions, length)
        torch.cuda.current_stream(dev).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # thread-local capture: the engine's preparation thread may use the GPU meanwhile
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.logits = forward_step(model, cache, self.tokens, self.positions, length)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens, non_blocking=True)
        self.positions.copy_(positions, non_blocking=True)
        self.graph.replay()
        return self.logits


class DecodeBatch:
    """Running sequences over one static KV cache (not thread-safe: one driver thread).

    On CUDA (unless `cuda_graphs=False`) every step replays a captured graph over all slots with a
    bucketed key length (`GRAPH_LENGTHS`); elsewhere it runs eagerly over slots 0..highest running
    with the exact length.
    """

    def __init__(self, model, max_batch: int, max_seq_len: int, cuda_graphs: bool | None = None):
        self.model = model
        self.cache: StaticKVCache = new_cache(model, max_batch, max_seq_len)
        self.slots: list[Sequence | None] = [None] * max_batch
        on_cuda = self.cache.k.device.type == "cuda"
        self.graphs: dict[int, GraphedStep] = {}
        if on_cuda if cuda_graphs is None else cuda_graphs:
            if not on_cuda:
                raise ValueError("cuda_graphs=True needs the model on a CUDA device")
            pool = torch.cuda.graph_pool_handle()
            lengths = sorted({min(n, max_seq_len) for n in GRAPH_LENGTHS} | {max_seq_len})
            with torch.no_grad():
                self.graphs = {n: GraphedStep(model, self.cache, max_batch, n, pool) for n in lengths}

    @property
    def max_batch(self) -> int:
        return len(self.slots)

    @property
    def max_seq_len(self) -> int:
        return self.cache.max_seq_len

    @property
    def running(self) -> list[Sequence]:
        return [s for s in self.slots if s is not None]

    @property
    def free_slots(self) -> int:
        return sum(s is None for s in self.slots)

    def add(self, seq: Sequence) -> int:
        """Prefill `seq` into the lowest free slot and sample its first token; returns that token."""
        if not seq.prompt_ids:
            raise ValueError("empty prompt")
        if len(seq.prompt_ids) + 1 > self.max_seq_len:
            raise ValueError(f"the prompt has {len(seq.prompt_ids)} tokens but the decoder's KV cache holds "
                             f"{self.max_seq_len}; use a shorter reference clip or text")
        try:
            slot = self.slots.index(None)
        except ValueError:
            raise RuntimeError("no free decode slot") from None
        t0 = time.perf_counter()
        logits = forward_prefill(self.model, self.cache, slot, torch.tensor(seq.prompt_ids, dtype=torch.long))
        seq.slot = slot
        self.slots[slot] = seq
        tok = self._accept(seq, logits.view(1, -1))[0]
        seq.prefill_s = time.perf_counter() - t0
        return tok

    def drop(self, seq: Sequence, reason: str = "cancelled") -> None:
        if 0 <= seq.slot < len(self.slots) and self.slots[seq.slot] is seq:
            self.slots[seq.slot] = None
        if not seq.finished:
            seq.finished, seq.finish_reason = True, reason

    def step(self) -> list[tuple[Sequence, int]]:
        """One token for every running sequence; finished ones leave their slot. Returns (seq, token)."""
        running = self.running
        if not running:
            return []
        rows = self.max_batch if self.graphs else max(s.slot for s in running) + 1
        tokens = torch.zeros(rows, dtype=torch.long)
        positions = torch.zeros(rows, dtype=torch.long)
        for s in running:
            tokens[s.slot] = s.generated[-1]
            positions[s.slot] = s.position
        length = int(positions.max()) + 1
        if self.graphs:
            graph = self.graphs[min(n for n in self.graphs if n >= length)]
            logits = graph(tokens, positions)
        else:
            logits = forward_step(self.model, self.cache, tokens, positions, length)
        active = [s.slot for s in running]
        toks = self._accept_rows(running, logits[active])
        return list(zip(running, toks))

    def _accept(self, seq: Sequence, logits: torch.Tensor) -> list[int]:
        return self._accept_rows([seq], logits)

    def _accept_rows(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        toks = sample_tokens(logits, seqs)
        for s, tok, row in zip(seqs, toks, logits):
            if s.keep_logits:
                s.logits.append(row.detach().cpu())
            s.generated.append(tok)
            if tok in s.end_ids and len(s.generated) > s.params.min_new_tokens:
                self._finish(s, "end")
            elif len(s.generated) >= s.params.max_new_tokens:
                self._finish(s, "length")
            elif s.position >= self.max_seq_len:  # the next feed would not fit in the cache
                self._finish(s, "cache")
        return toks

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finished, seq.finish_reason = True, reason
        if 0 <= seq.slot < len(self.slots) and self.slots[seq.slot] is seq:
            self.slots[seq.slot] = None


def generate(model, prompt_ids: list[int], params: SamplingParams, end_ids: tuple[int, ...], seed: int = 0,
             max_seq_len: int | None = None, keep_logits: bool = False) -> Sequence:
    """One sequence alone, start to finish (a one-slot DecodeBatch)."""
    max_seq_len = max_seq_len or len(prompt_ids) + params.max_new_tokens + 1
    batch = DecodeBatch(model, 1, max_seq_len)
    seq = Sequence(list(prompt_ids), params, tuple(end_ids), seed, keep_logits=keep_logits)
    batch.add(seq)
    while not seq.finished:
        batch.step()
    return seq
