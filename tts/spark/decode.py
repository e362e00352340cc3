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

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from tts.spark import fast_step as FS
from tts.spark.kv_cache import SPARE_POSITIONS, StaticKVCache
from tts.spark.llm import forward_prefill, forward_prefill_many, forward_step, new_cache
from tts.spark.prefill_graphs import PREFILL_GRAPHS_ENV, PrefillGraphs
from tts.switches import number_from_env, switch_from_env


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
    head_misses: int = 0  # fast-path steps redrawn over the whole vocabulary after a speech-head miss
    generator: torch.Generator = field(init=False, repr=False)
    # uniform numbers drawn ahead for a multi-step replay but not used (the row was redrawn on the
    # host first): they are the next ones drawn, so every path consumes the same stream
    returned_uniforms: list[float] = field(default_factory=list, repr=False)
    # the owner's count of tokens still to generate before it can hand out audio (its first
    # streamed chunk), None when no such wait is pending: the fast path then replays single steps
    # for the last few tokens instead of finishing a longer replay first (`DecodeBatch._fast_step`)
    tokens_due: Callable[[], int | None] | None = field(default=None, repr=False)

    def __post_init__(self):
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(int(self.seed))

    def next_uniform(self) -> float:
        """The next uniform number of this sequence's stream (one per sampled token)."""
        if self.returned_uniforms:
            return self.returned_uniforms.pop(0)
        return torch.rand((), generator=self.generator).item()

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


def _row_inputs(seqs: list[Sequence | None], ints, floats, ahead: int = 0) -> None:
    """Fill one step's per-row inputs (numpy views [R, N_INT] int64, [R, N_FLOAT] float32) for the
    sequences in their rows (None = a free row: greedy on a dummy token at position 0), `ahead`
    steps after the next one (position, end-token ban as they will be then; the token column only
    matters at ahead = 0: later steps feed the token sampled before them). Draws each sampled row's
    uniform number from its sequence's stream (one per row per step, in row order)."""
    ints[:] = 0
    floats[:] = (1.0, 1.0, 1.0, 0.0, 1.0)
    for r, s in enumerate(seqs):
        if s is None:
            continue
        p = s.params
        ints[r, FS.TOKEN] = s.generated[-1] if s.generated else 0
        ints[r, FS.POSITION] = max(s.position, 0) + ahead
        ends = list(s.end_ids)[:FS.MAX_END_IDS]
        if ends:
            ints[r, FS.END0: FS.END0 + FS.MAX_END_IDS] = (ends * FS.MAX_END_IDS)[:FS.MAX_END_IDS]
            if len(s.generated) + ahead < p.min_new_tokens:
                ints[r, FS.END0 + FS.MAX_END_IDS: FS.END0 + 2 * FS.MAX_END_IDS] = 1
        if p.greedy:
            continue
        floats[r] = (p.temperature, float(p.top_k) if p.top_k > 0 else FS.NO_TOP_K, p.top_p, s.next_uniform(), 0.0)


def sample_tokens(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits [R, V] (float32) -> one token per row, using each sequence's params and generator.

    The whole vocabulary is sorted (the graphed step's candidate cut gives the same tokens; rows
    where it could not are redrawn here)."""
    if any(len(s.end_ids) > FS.MAX_END_IDS for s in seqs):  # the row inputs hold a few; ban them all here
        logits = logits.clone()
        for r, s in enumerate(seqs):
            if s.end_ids and len(s.generated) < s.params.min_new_tokens:
                logits[r, list(s.end_ids)] = float("-inf")
    ints = torch.zeros(len(seqs), FS.N_INT, dtype=torch.long)
    floats = torch.zeros(len(seqs), FS.N_FLOAT, dtype=torch.float32)
    _row_inputs(list(seqs), ints.numpy(), floats.numpy())
    dev = logits.device
    _, out, _ = FS.sample_rows(logits, ints.to(dev), floats.to(dev), logits.shape[-1])
    return [int(t) for t in out[0].tolist()]


#: Key lengths a graphed decode step is captured for (and the cache length): the smallest that
#: covers every running position is replayed.
GRAPH_LENGTHS = (256, 512, 1024, 2048, 4096, 8192)
#: Row counts a graphed step is captured for (and max_batch): the smallest that covers the highest
#: running slot is replayed (a graph over all slots costs a lone sequence the other rows' work).
GRAPH_ROWS = (1, 2, 4, 8, 16, 32, 64)
FAST_ENV = "STUDIO_SPARK_FAST"  # "0"/"off": eager steps; "graph": fused step in graphs; else compiled + graphs
#: Decode steps per graph replay (and per host round trip) on the fast path: the host reads the
#: tokens back once per replay, so its per-token share (~0.4 ms of a 1.85 ms step at one row,
#: measured on an H200) shrinks T-fold; a finished or redrawn row drops the replay's later steps.
#: 8: with the Triton attention, 1.64 / 1.85 / 2.03 ms a token at 1 / 8 / 16 rows against 1.67 /
#: 1.88 / 2.19 at 4 a replay (H100, `tools/gpu_bench.sh spark-step`, BENCHMARKS.md). A request
#: joining the batch waits at most one replay (~13 ms at one row).
TOKENS_PER_REPLAY = 8
TOKENS_ENV = "STUDIO_SPARK_STEP_TOKENS"  # 1..kv_cache.SPARE_POSITIONS
#: Single-step replays up to a streamed request's first chunk (on by default with more than one
#: step a replay; "0" turns them off). With T steps a replay a row's 50th token comes out of the
#: replay that holds it, up to T - 1 steps after it was sampled: the prefill gives token 1 and
#: replays of 8 give tokens 2-9, ..., 50-57, so the first chunk waited for 7 more tokens (~11 ms at
#: one row on an H100). Each bucket also gets a one-step graph; while a running sequence is fewer
#: than T tokens from its first chunk, the batch replays that one instead. Tokens are the same either
#: way (each step draws its row's next uniform number in order).
ALIGN_ENV = "STUDIO_SPARK_ALIGN_FIRST_CHUNK"
#: The fast step's attention: "matmul" (batched matrix products, ~8 launches a layer) or "kernel"
#: (`tts.spark.attention_kernel`, two Triton launches a layer; checked against the plain-torch form
#: at start-up, which it falls back to on a mismatch or where Triton cannot run).
ATTENTION_ENV = "STUDIO_SPARK_ATTENTION"
#: The speech head on the fast path (`tts.spark.fast_step`: each step multiplies by the LM head's
#: rows from the first special token on, ~14k of 166k, and checks the others once per replay); on by
#: default, "0" multiplies by the whole head every step. Same tokens either way.
SPEECH_HEAD_ENV = "STUDIO_SPARK_SPEECH_HEAD"
#: Most prompt tokens prefilled in one packed forward (`DecodeBatch.add_many`). On CUDA the
#: attention is flash varlen (linear memory): 8 joining prompts of ~500 tokens go in one forward.
#: Elsewhere it is a dense block-diagonal mask (N^2: 16 MB of float32 scores a head at 2048).
MAX_PACKED_TOKENS = {"cuda": 4096, "cpu": 2048}
ATTENTION_FORMS = ("matmul", "kernel")
#: The kernels measured faster at every row count: 1.67 / 1.88 / 2.19 ms a token at 1 / 8 / 16 rows
#: against 1.77 / 2.44 / 2.52 with the matrix products (H100, 4 steps a replay, `spark-step`).
DEFAULT_ATTENTION = "kernel"


def _log(msg: str) -> None:
    print(f"[spark-fast] {msg}", file=sys.stderr, flush=True)


def min_due(seqs: list[Sequence]) -> int:
    """The fewest tokens any of `seqs` still needs before its owner hands out audio (`tokens_due`);
    a large number when none waits."""
    due = [d for d in (s.tokens_due() for s in seqs if s.tokens_due is not None) if d is not None]
    return min(due, default=1 << 30)


def graph_buckets(sizes: tuple[int, ...], limit: int) -> list[int]:
    """The sizes below `limit`, and `limit` itself: the buckets captured for a dimension of at most `limit`."""
    return sorted({min(n, limit) for n in sizes} | {limit})


def pick_bucket(buckets, need: int) -> int:
    """The smallest bucket >= need (the last bucket is the dimension's limit, so one always exists)."""
    return min(b for b in buckets if b >= need)


def tokens_per_replay_from_env() -> int:
    return number_from_env(TOKENS_ENV, TOKENS_PER_REPLAY, 1, SPARE_POSITIONS, "a whole number", whole=True)


def attention_from_env() -> str:
    raw = os.environ.get(ATTENTION_ENV, "").strip().lower() or DEFAULT_ATTENTION
    if raw not in ATTENTION_FORMS:
        raise ValueError(f"{ATTENTION_ENV}={raw!r} is not understood; use one of {', '.join(ATTENTION_FORMS)}")
    return raw


#: The speech head starts at a multiple of this many rows: the other rows' product then has an
#: aligned width (151,640 rather than 151,643 columns). With an odd width cuBLAS ran it on an
#: unaligned sm75 kernel (H100 `spark-step` profile, 33 us a replay at one row). The few text rows
#: this adds to the head are sampled from like any other (the split is exact wherever it falls).
HEAD_ALIGN = 8


def speech_head_from(first_special_id: int) -> int:
    """The id the fast step's speech head starts at: `first_special_id` (the tokenizer's first
    special token) rounded down to HEAD_ALIGN, unless SPEECH_HEAD_ENV turns the head off (0: the
    whole vocabulary)."""
    return first_special_id - first_special_id % HEAD_ALIGN if switch_from_env(SPEECH_HEAD_ENV) else 0


def fast_mode_from_env() -> str:
    raw = os.environ.get(FAST_ENV, "").strip().lower()
    if raw in ("0", "off", "false", "no", "eager"):
        return "off"
    if raw in ("graph",):
        return "graph"
    if raw in ("", "1", "on", "true", "yes", "compile", "auto"):
        return "compile"
    raise ValueError(f"{FAST_ENV}={raw!r} is not understood; use 0 (eager), graph or compile")


class DecodeBatch:
    """Running sequences over one static KV cache (not thread-safe: one driver thread).

    On CUDA (unless `cuda_graphs=False` or STUDIO_SPARK_FAST=0) every step replays the fused step
    of `tts.spark.fast_step` captured for a bucketed row count (`GRAPH_ROWS`, covering the highest
    running slot) and key length (`GRAPH_LENGTHS`); elsewhere it runs `forward_step` eagerly over
    slots 0..highest running with the exact length and samples with `sample_tokens`.
    """

    def __init__(self, model, max_batch: int, max_seq_len: int, cuda_graphs: bool | None = None,
                 fused: bool = False, log=None, tokens_per_replay: int | None = None,
                 attention: str | None = None, align_first_chunk: bool | None = None, head_from: int = 0,
                 prefill_graphs: bool | None = None):
        """cuda_graphs: None = the fast path on CUDA as STUDIO_SPARK_FAST says (default compile +
        graphs), True = required, False = eager `forward_step`. fused=True on a CPU model runs the
        fused step without graphs (tests compare it with the eager step). tokens_per_replay: decode
        steps per fast-path step() (None = STUDIO_SPARK_STEP_TOKENS, default TOKENS_PER_REPLAY);
        the eager path always makes one. attention: the fast step's attention form (None =
        STUDIO_SPARK_ATTENTION, default DEFAULT_ATTENTION; see `ATTENTION_FORMS`). align_first_chunk:
        one-step replays up to a sequence's `tokens_due` (None = ALIGN_ENV, default on; only with
        more than one step a replay). head_from: the fast step's speech head starts at this id
        (`tts.spark.fast_step`; 0 = the whole LM head; see `speech_head_from`). prefill_graphs: a
        lone prompt's prefill from CUDA graphs (`tts.spark.prefill_graphs`; None = on with the fast
        path on CUDA unless PREFILL_GRAPHS_ENV is 0; True on the CPU runs the same padded
        prefill eagerly, for tests)."""
        self.model = model
        self.cache: StaticKVCache = new_cache(model, max_batch, max_seq_len)
        self.slots: list[Sequence | None] = [None] * max_batch
        on_cuda = self.cache.k.device.type == "cuda"
        self.steps: dict = {}  # (rows, length) -> FS.FastStep (or FS.EagerFusedStep on the CPU)
        self.stats: dict = {}
        mode = fast_mode_from_env() if cuda_graphs is None else ("compile" if cuda_graphs else "off")
        if cuda_graphs and not on_cuda:
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        self.tokens_per_replay = 1
        vocab = model.lm_head.weight.shape[0]
        if not 0 <= head_from < vocab:
            raise ValueError(f"the speech head must start inside the vocabulary (0..{vocab - 1}); got {head_from}")
        self.head_misses = 0  # fast-path steps redrawn over the whole vocabulary after a speech-head miss
        if (on_cuda and mode != "off") or fused:
            self.tokens_per_replay = tokens_per_replay or tokens_per_replay_from_env()
            align = switch_from_env(ALIGN_ENV) if align_first_chunk is None else align_first_chunk
            self.steps, self.stats = FS.build_steps(model, self.cache, graph_buckets(GRAPH_ROWS, max_batch),
                                                    graph_buckets(GRAPH_LENGTHS, max_seq_len),
                                                    compile_=mode == "compile", log=log or _log,
                                                    tokens=self.tokens_per_replay,
                                                    attention=attention or attention_from_env(),
                                                    single_steps=align and self.tokens_per_replay > 1,
                                                    head_from=head_from)
        self.short_replays = 0  # one-step replays made for a first chunk (`tokens_due`)
        self.prefill: PrefillGraphs | None = None
        if prefill_graphs if prefill_graphs is not None else (on_cuda and mode != "off"
                                                                and switch_from_env(PREFILL_GRAPHS_ENV)):
            self.prefill = PrefillGraphs(model, self.cache)
            self.stats.update(prefill_graphs=len(self.prefill.graphs), prefill_capture_s=self.prefill.capture_s)
        self._row_buckets = sorted({r for r, _ in self.steps})
        self._len_buckets = sorted({n for _, n in self.steps})

    @property
    def graphs(self) -> dict:
        return self.steps

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

    def _check_new(self, seq: Sequence) -> None:
        if not seq.prompt_ids:
            raise ValueError("empty prompt")
        if self.steps and len(seq.end_ids) > FS.MAX_END_IDS:
            raise ValueError(f"at most {FS.MAX_END_IDS} end token ids per sequence")
        if len(seq.prompt_ids) + 1 > self.max_seq_len:
            raise ValueError(f"the prompt has {len(seq.prompt_ids)} tokens but the decoder's KV cache holds "
                             f"{self.max_seq_len}; use a shorter reference clip or text")

    def add_many(self, seqs: list[Sequence]) -> list[int]:
        """Prefill several sequences into the lowest free slots in packed forwards (of at most
        MAX_PACKED_TOKENS prompt tokens each) and sample each one's first token; returns them.
        The same cache contents and tokens as `add` for each in turn (to float rounding). Raises
        ValueError, before anything is written, if any of them could not be added."""
        for seq in seqs:
            self._check_new(seq)
        free = [i for i, s in enumerate(self.slots) if s is None]
        if len(free) < len(seqs):
            raise RuntimeError(f"{len(seqs)} sequences for {len(free)} free decode slots")
        cap = MAX_PACKED_TOKENS["cuda" if self.cache.k.device.type == "cuda" else "cpu"]
        groups, total = [[]], 0
        for seq in seqs:  # consecutive packs of at most `cap` tokens (a longer prompt goes alone)
            n = len(seq.prompt_ids)
            if groups[-1] and total + n > cap:
                groups.append([])
                total = 0
            groups[-1].append(seq)
            total += n
        # every forward first: if one fails, no slot is taken and no sequence has drawn a number
        t0 = time.perf_counter()
        done = []
        for group in groups:
            slots, free = free[:len(group)], free[len(group):]
            if len(group) == 1 and self.prefill is not None and self.prefill.fits(len(group[0].prompt_ids)):
                logits = self.prefill(slots[0], group[0].prompt_ids).view(1, -1).clone()  # next group reuses it
            else:
                logits = forward_prefill_many(self.model, self.cache, slots,
                                              [torch.tensor(s.prompt_ids, dtype=torch.long) for s in group])
            done.append((group, slots, logits))
        tokens = []
        for group, slots, logits in done:
            for seq, slot in zip(group, slots):
                seq.slot = slot
                self.slots[slot] = seq
            toks = sample_tokens(logits, group)
            for seq, tok, row in zip(group, toks, logits):
                self._accept(seq, tok, row)
                seq.prefill_s = time.perf_counter() - t0
            tokens.extend(toks)
        return tokens

    def add(self, seq: Sequence) -> int:
        """Prefill `seq` into the lowest free slot and sample its first token; returns that token."""
        self._check_new(seq)
        try:
            slot = self.slots.index(None)
        except ValueError:
            raise RuntimeError("no free decode slot") from None
        t0 = time.perf_counter()
        if self.prefill is not None and self.prefill.fits(len(seq.prompt_ids)):
            logits = self.prefill(slot, seq.prompt_ids)
        else:
            logits = forward_prefill(self.model, self.cache, slot, torch.tensor(seq.prompt_ids, dtype=torch.long))
        seq.slot = slot
        self.slots[slot] = seq
        logits = logits.view(1, -1)
        tok = sample_tokens(logits, [seq])[0]
        self._accept(seq, tok, logits[0])
        seq.prefill_s = time.perf_counter() - t0
        return tok

    def drop(self, seq: Sequence, reason: str = "cancelled") -> None:
        if 0 <= seq.slot < len(self.slots) and self.slots[seq.slot] is seq:
            self.slots[seq.slot] = None
        if not seq.finished:
            seq.finished, seq.finish_reason = True, reason

    def step(self) -> list[tuple[Sequence, int]]:
        """One token for every running sequence (up to tokens_per_replay on the fast path); finished
        ones leave their slot. Returns (seq, token) pairs, a sequence's tokens in order."""
        running = self.running
        if not running:
            return []
        top = max(s.slot for s in running) + 1
        if self.steps:
            return self._fast_step(running, top)
        tokens = torch.zeros(top, dtype=torch.long)
        positions = torch.zeros(top, dtype=torch.long)
        for s in running:
            tokens[s.slot] = s.generated[-1]
            positions[s.slot] = s.position
        length = int(positions.max()) + 1
        logits = forward_step(self.model, self.cache, tokens, positions, length)
        rows = logits[[s.slot for s in running]]
        toks = sample_tokens(rows, running)
        for s, tok, row in zip(running, toks, rows):
            self._accept(s, tok, row)
        return list(zip(running, toks))

    def _fast_step(self, running: list[Sequence], top: int) -> list[tuple[Sequence, int]]:
        t_steps = self.tokens_per_replay
        rows = pick_bucket(self._row_buckets, top)
        # every step of the replay must see its keys: positions up to the last one + T; past the
        # longest bucket only steps after a sequence has filled the cache (discarded) would miss any
        need = min(max(s.position for s in running) + t_steps, self._len_buckets[-1])
        step = self.steps[rows, pick_bucket(self._len_buckets, need)]
        if step.single is not None and 0 < min_due(running) < step.tokens:
            step = step.single  # a row is fewer than T tokens from its first chunk: one step at a time
            self.short_replays += 1
        t_steps = step.tokens
        by_row: list[Sequence | None] = [None] * rows
        for s in running:
            by_row[s.slot] = s
        ints, floats = step.host_ints.numpy(), step.host_floats.numpy()
        for t in range(t_steps):
            _row_inputs(by_row, ints[t], floats[t], ahead=t)
        toks, redo, miss = step()
        # ties at the candidate cut, top_k beyond it, or a speech-head miss: the whole vocabulary,
        # same draw. Only a row's first such step counts (its later steps are dropped), so one
        # batched draw serves all.
        first_redo = {s.slot: next((t for t in range(t_steps) if redo[t][s.slot]), None) for s in running}
        first_redo = {r: t for r, t in first_redo.items() if t is not None}
        if first_redo:
            exact = step.exact_tokens(list(first_redo.values()), list(first_redo))
            for r, tok in zip(first_redo, exact):
                toks[first_redo[r]][r] = tok
                self.head_misses += miss[first_redo[r]][r]
                self.slots[r].head_misses += miss[first_redo[r]][r]
        out = []
        for s in running:
            r = s.slot
            for t in range(t_steps):
                tok = int(toks[t][r])
                self._accept(s, tok, step.full_logits([t], [r])[0] if s.keep_logits else None)
                out.append((s, tok))
                if s.finished or redo[t][r]:
                    # the replay's later steps fed another token (or the sequence is done): drop
                    # them, and hand their unused draws back to the stream
                    if not s.finished and not s.params.greedy:
                        s.returned_uniforms[:0] = [float(floats[u][r][FS.UNIFORM]) for u in range(t + 1, t_steps)]
                    break
        return out

    def _accept(self, s: Sequence, tok: int, row: torch.Tensor | None) -> None:
        if s.keep_logits and row is not None:
            s.logits.append(row.detach().float().cpu())
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
