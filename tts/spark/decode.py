"""The decode hot path: prefill, one decode step for every running sequence, sampling, generate.

A `DecodeBatch` owns a static KV cache of `max_batch` slots. Sequences join with `add` (prefill
into a free slot, first token sampled) and leave when they finish or are dropped; `step` feeds
every running sequence's last token at its own position and samples the next one. Slots are handed
out lowest-first and each step runs rows 0..highest-running-slot, so the batch stays dense.

Sampling per sequence (upstream's order, as transformers applies it): logits / temperature, keep
the top_k, keep the smallest set of top tokens whose probability reaches top_p, draw (inverse CDF
over the candidates in stable-sort order: equal logits by token id). Only the best top_k +
TIE_MARGIN candidates are sorted on the device; the host reads the tokens once per step. Greedy
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


#: Extra top-k candidates taken beyond the largest top_k of a step, so that logits tied with the k-th
#: value (kept, as transformers keeps them) are still among the candidates. bf16 logits tie often;
#: a row whose last candidate still ties its k-th value is redone over the whole vocabulary.
TIE_MARGIN = 16
#: k for rows with top_k off (0): larger than any vocabulary, exact in float32 (2**24).
NO_TOP_K = float(2 ** 24)
#: Columns of `SamplingPlan.params`.
TEMP, TOP_K, TOP_P, UNIFORM, GREEDY = range(5)


@dataclass(frozen=True)
class SamplingPlan:
    """One step's per-row sampling inputs, drawn on the host before the logits exist.

    params [R, 5] float32, columns TEMP (1 for greedy rows), TOP_K (NO_TOP_K when off), TOP_P,
    UNIFORM (the row's draw from its own generator, 0 for greedy rows), GREEDY (1/0).
    bans [2, B] int64: (row, token) pairs set to -inf (end tokens before min_new_tokens); B may be 0.
    max_k: the largest top_k over sampled rows (0 when every row is greedy).
    """

    params: torch.Tensor
    bans: torch.Tensor
    max_k: float

    def to(self, device, non_blocking: bool = False) -> "SamplingPlan":
        return SamplingPlan(self.params.to(device, non_blocking=non_blocking),
                            self.bans.to(device, non_blocking=non_blocking), self.max_k)


def plan_sampling(seqs: list[Sequence]) -> SamplingPlan:
    """Each row's params and its uniform draw: one per sampled row per step, in row order."""
    rows, ban_rows, ban_ids, max_k = [], [], [], 0.0
    for r, s in enumerate(seqs):
        p = s.params
        if s.end_ids and len(s.generated) < p.min_new_tokens:
            ban_rows += [r] * len(s.end_ids)
            ban_ids += list(s.end_ids)
        if p.greedy:
            rows.append((1.0, 1.0, 1.0, 0.0, 1.0))
            continue
        k = float(p.top_k) if p.top_k > 0 else NO_TOP_K
        max_k = max(max_k, k)
        u = torch.rand((), generator=s.generator).item()
        rows.append((p.temperature, k, p.top_p, u, 0.0))
    return SamplingPlan(torch.tensor(rows, dtype=torch.float32),
                        torch.tensor([ban_rows, ban_ids], dtype=torch.long).view(2, -1), max_k)


def _draw(x: torch.Tensor, prm: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, V] logits, prm [R, 5] -> (tokens [R] int64, overflow [R] bool); no host sync.

    Candidates in (value descending, index ascending) order, the order of a stable sort; keep the
    top k (ties with the k-th value kept), then the smallest prefix whose probability reaches
    top_p; inverse-CDF draw with u. With n < V only the best n candidates are considered:
    `overflow` marks rows whose last candidate ties their k-th value (ties may have been cut).
    """
    vocab = x.shape[-1]
    x = x / prm[:, TEMP].view(-1, 1)
    if n < vocab:
        vals, idx = torch.topk(x, n, dim=-1)  # ties in no particular order: put them by index
        idx, perm = torch.sort(idx, dim=-1)
        vals, perm = torch.sort(vals.gather(1, perm), dim=-1, descending=True, stable=True)
        idx = idx.gather(1, perm)
    else:
        vals, idx = torch.sort(x, dim=-1, descending=True, stable=True)
    ks = prm[:, TOP_K].clamp(max=n).long().view(-1, 1)
    kth = vals.gather(1, ks - 1)
    overflow = (vals[:, -1:] == kth).view(-1) & (n < vocab)
    vals = vals.masked_fill(vals < kth, float("-inf"))  # ties with the k-th value are kept, as transformers does
    ps = prm[:, TOP_P].view(-1, 1)
    probs = torch.softmax(vals, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly more likely tokens
    drop = (before >= ps) & (ps < 1.0)
    drop[:, 0] = False
    probs = torch.softmax(vals.masked_fill(drop, float("-inf")), dim=-1)
    cdf = torch.cumsum(probs, dim=-1)
    u = prm[:, UNIFORM].view(-1, 1)
    pick = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=n - 1)
    pick = torch.minimum(pick, (probs > 0).sum(dim=-1, keepdim=True) - 1)  # never land on a dropped token
    return idx.gather(1, pick).view(-1), overflow


def sample_on_device(logits: torch.Tensor, plan: SamplingPlan, full: bool = False) -> torch.Tensor:
    """logits [R, V] (float32) -> [2, R] int64 on the logits' device: tokens, overflow flags (0/1).

    No host synchronisation when `plan` is already on the logits' device (the caller reads both rows
    with one copy: `finish_sampling`). `full` sorts the whole vocabulary (no overflow possible).
    """
    dev = logits.device
    prm, bans = plan.params.to(dev), plan.bans.to(dev)
    if bans.shape[1]:
        logits = logits.clone()
        logits[bans[0], bans[1]] = float("-inf")
    greedy = logits.argmax(dim=-1)
    if not plan.max_k:
        return torch.stack([greedy, torch.zeros_like(greedy)])
    vocab = logits.shape[-1]
    n = vocab if full else int(min(vocab, plan.max_k + TIE_MARGIN))
    tok, overflow = _draw(logits, prm, n)
    tok = torch.where(prm[:, GREEDY] > 0, greedy, tok)
    return torch.stack([tok, overflow.long()])


def finish_sampling(logits: torch.Tensor, plan: SamplingPlan, out: torch.Tensor) -> list[int]:
    """`sample_on_device`'s result -> tokens on the host (one sync); rows flagged as overflowing
    (rare ties at the candidate cut) are redrawn over the whole vocabulary with the same draws."""
    toks, overflow = out.tolist()
    if any(overflow):
        exact = sample_on_device(logits, plan, full=True)[0].tolist()
        toks = [e if o else t for t, e, o in zip(toks, exact, overflow)]
    return [int(t) for t in toks]


def sample_tokens(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits [R, V] (float32) -> one token per row, using each sequence's params and generator."""
    plan = plan_sampling(seqs)
    return finish_sampling(logits, plan, sample_on_device(logits, plan))


#: Key lengths a graphed decode step is captured for (and the cache length): the smallest that
#: covers every running position is replayed. Each holds its own [rows, vocab] logits buffer.
GRAPH_LENGTHS = (256, 512, 1024, 2048, 4096, 8192)
#: Row counts a graphed step is captured for (and max_batch): the smallest that covers the highest
#: running slot is replayed. A graph over all 16 slots cost one running sequence 4.6 ms a step on an
#: H100 where a one-row graph of the same model is measured at ~2.1 ms (per-row work in every layer).
GRAPH_ROWS = (1, 2, 4, 8, 16, 32, 64)


def graph_buckets(sizes: tuple[int, ...], limit: int) -> list[int]:
    """The sizes below `limit`, and `limit` itself: the buckets captured for a dimension of at most `limit`."""
    return sorted({min(n, limit) for n in sizes} | {limit})


def pick_bucket(buckets, need: int) -> int:
    """The smallest bucket >= need (the last bucket is the dimension's limit, so one always exists)."""
    return min(b for b in buckets if b >= need)


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

    On CUDA (unless `cuda_graphs=False`) every step replays a captured graph over a bucketed row count
    (`GRAPH_ROWS`, covering the highest running slot) and key length (`GRAPH_LENGTHS`); elsewhere it runs eagerly over slots 0..highest running
    with the exact length.
    """

    def __init__(self, model, max_batch: int, max_seq_len: int, cuda_graphs: bool | None = None):
        self.model = model
        self.cache: StaticKVCache = new_cache(model, max_batch, max_seq_len)
        self.slots: list[Sequence | None] = [None] * max_batch
        on_cuda = self.cache.k.device.type == "cuda"
        self.graphs: dict[tuple[int, int], GraphedStep] = {}  # (rows, length) -> graph
        if on_cuda if cuda_graphs is None else cuda_graphs:
            if not on_cuda:
                raise ValueError("cuda_graphs=True needs the model on a CUDA device")
            pool = torch.cuda.graph_pool_handle()
            with torch.no_grad():
                self.graphs = {(r, n): GraphedStep(model, self.cache, r, n, pool)
                               for r in graph_buckets(GRAPH_ROWS, max_batch)
                               for n in graph_buckets(GRAPH_LENGTHS, max_seq_len)}

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
        """One token for every running sequence; finished ones leave their slot. Returns (seq, token).

        Host work (inputs, each row's draw from its generator) and its copies happen before the
        forward is launched; sampling runs on the device; one copy brings the tokens back.
        """
        running = self.running
        if not running:
            return []
        rows = running[-1].slot + 1
        if self.graphs:
            rows = pick_bucket({r for r, _ in self.graphs}, rows)
        tok_list, pos_list = [0] * rows, [0] * rows
        for s in running:
            tok_list[s.slot] = s.generated[-1]
            pos_list[s.slot] = s.position
        length = max(pos_list) + 1
        tokens = torch.tensor(tok_list, dtype=torch.long)
        positions = torch.tensor(pos_list, dtype=torch.long)
        dev = self.cache.k.device
        plan = plan_sampling(running).to(dev, non_blocking=True)
        if self.graphs:
            graph = self.graphs[rows, pick_bucket({n for _, n in self.graphs}, length)]
            logits = graph(tokens, positions)
        else:
            logits = forward_step(self.model, self.cache, tokens.to(dev), positions.to(dev), length)
        active = [s.slot for s in running]
        if active[-1] == len(active) - 1:  # slots 0..n-1 (the usual case: slots are handed out lowest-first)
            logits = logits[:len(active)]
        else:
            logits = logits[torch.tensor(active, device=logits.device)]
        toks = finish_sampling(logits, plan, sample_on_device(logits, plan))
        self._accept_rows(running, logits, toks)
        return list(zip(running, toks))

    def _accept(self, seq: Sequence, logits: torch.Tensor) -> list[int]:
        toks = sample_tokens(logits, [seq])
        self._accept_rows([seq], logits, toks)
        return toks

    def _accept_rows(self, seqs: list[Sequence], logits: torch.Tensor, toks: list[int]) -> None:
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
