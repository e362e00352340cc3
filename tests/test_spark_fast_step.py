"""tts/spark/fast_step.py: the fused decode step and device sampling equal the eager step and the
whole-vocabulary sampler (CPU, float32, tiny Qwen2 in the published layout)."""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.test_spark_fixtures import spark_dir, spark_one_thread  # noqa: F401 - fixtures
from tts.spark import fast_step as FS
from tts.spark.decode import (GRAPH_LENGTHS, GRAPH_ROWS, DecodeBatch, SamplingParams, Sequence, _row_inputs, generate,
                              graph_buckets, pick_bucket, sample_tokens)
from tts.spark.kv_cache import SPARE_POSITIONS, SPARE_SLOTS
from tts.spark.llm import forward_prefill, forward_step, load_llm, new_cache
from tts.spark.tokenizer import SparkTokenizer

pytestmark = pytest.mark.usefixtures("spark_one_thread")
END = (7,)


@pytest.fixture(scope="module")
def llm(spark_dir):
    return load_llm(spark_dir / "LLM")


def _prompt(seed: int, n: int) -> list[int]:
    return torch.randint(300, 12000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _rows(seed: int) -> list[Sequence]:
    configs = [(50, 0.8, 0.95, 0), (1, 0.8, 0.95, 0), (2, 1.3, 1.0, 3), (400, 1.0, 0.5, 0), (0, 1.0, 0.9, 0),
               (20, 0.0, 0.9, 0), (30, 0.7, 0.3, 5)]
    seqs = []
    for r, (k, t, p, mn) in enumerate(configs):
        s = Sequence([1], SamplingParams(temperature=t, top_k=k, top_p=p, min_new_tokens=mn), END, seed=seed * 10 + r)
        s.generated = [5]
        seqs.append(s)
    return seqs


def _inputs(seqs):
    ints = torch.zeros(len(seqs), FS.N_INT, dtype=torch.long)
    floats = torch.zeros(len(seqs), FS.N_FLOAT)
    _row_inputs(seqs, ints.numpy(), floats.numpy())
    return ints, floats


def test_candidate_cut_matches_the_whole_vocabulary():
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        seqs = _rows(seed)
        logits = torch.randn(len(seqs), 3000, generator=g) * 3
        if seed % 2:
            logits = torch.randint(0, 4, logits.shape, generator=g).float()  # ~750 ties at each value
        ints, floats = _inputs(seqs)
        banned, out, _ = FS.sample_rows(logits, ints, floats, FS.N_CAND)
        toks, redo = out.tolist()
        idx = torch.tensor([r for r, f in enumerate(redo) if f], dtype=torch.long)
        if len(idx):
            exact, _, _ = FS.draw(banned[idx], floats[idx], banned.shape[-1])
            for r, t in zip(idx.tolist(), exact.tolist()):
                toks[r] = t
        _, whole, _ = FS.sample_rows(logits, ints, floats, logits.shape[-1])
        assert toks == whole[0].tolist()
        assert redo[4] == 1 and redo[1] == 0  # top_k off always redraws; greedy never
        assert all(t != END[0] for t in (toks[2], toks[6]))  # end token banned before min_new_tokens


@pytest.mark.parametrize("width", [3000, FS.TWO_STAGE_WIDTHS[0], 14357, 40000])
def test_top_candidates_are_topks_values(width):
    """The two-stage selection (speech-head widths) keeps torch.topk's values, with ties and with
    -inf columns, and points at distinct columns holding them."""
    g = torch.Generator().manual_seed(width)
    x = torch.randn(4, width, generator=g) * 3
    x[1] = torch.randint(0, 4, (width,), generator=g).float()  # thousands of ties at the cut
    x[2, : width - 10] = float("-inf")  # fewer finite values than candidates
    vals, idx = FS.top_candidates(x, FS.N_CAND)
    ref, _ = torch.topk(x, FS.N_CAND)
    assert torch.equal(vals.sort(-1).values, ref.sort(-1).values)
    assert torch.equal(x.gather(1, idx), vals) and int(idx.max()) < width
    assert all(len(set(row)) == FS.N_CAND for row in idx[[0, 1, 3]].tolist())


def test_greedy_rows_and_masked_end_rows():
    logits = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 9.0]] * 2)
    seqs = [Sequence([1], SamplingParams(top_k=1, min_new_tokens=2), END, seed=0),  # end token masked
            Sequence([1], SamplingParams(top_k=1), END, seed=0)]
    assert sample_tokens(logits, seqs) == [1, 7]


def test_graph_buckets_cover_every_row_count_and_length():
    rows = graph_buckets(GRAPH_ROWS, 12)
    assert rows == [1, 2, 4, 8, 12]
    assert [pick_bucket(rows, n) for n in (1, 3, 8, 9, 12)] == [1, 4, 8, 12, 12]
    assert graph_buckets(GRAPH_LENGTHS, 3000)[-1] == 3000 and graph_buckets(GRAPH_ROWS, 1) == [1]


def test_fused_forward_equals_forward_step_and_writes_the_same_cache(llm):
    ref_cache, cache = new_cache(llm, 3, 64), new_cache(llm, 3, 64)
    decoder = FS.FusedDecoder(llm, 64)  # makes the modules' weights views of the fused ones
    ids = torch.tensor(_prompt(0, 40))
    for c in (ref_cache, cache):
        forward_prefill(llm, c, 1, ids[:30])
        forward_prefill(llm, c, 0, ids[5:12])
    for t in range(30, 40):  # slot 1 at position t, slot 0 at 7 + (t - 30), slot 2 free (dummy at 0)
        tokens = torch.tensor([int(ids[t - 20]), int(ids[t]), 0])
        positions = torch.tensor([7 + t - 30, t, 0])
        ref = forward_step(llm, ref_cache, tokens, positions, t + 1)
        hidden, k_new, v_new = decoder(cache.k, cache.v, tokens, positions, 48)  # a longer bucket
        FS.write_new_kv(cache, positions, k_new, v_new)
        logits = decoder.logits(hidden)
        assert torch.allclose(logits[:2], ref[:2], atol=1e-4)
        assert torch.allclose(cache.k[:, :2, :, : t + 1], ref_cache.k[:, :2, :, : t + 1], atol=1e-5)
        assert torch.allclose(cache.v[:, :2, :, : t + 1], ref_cache.v[:, :2, :, : t + 1], atol=1e-5)


def _head_from(spark_dir, head: str) -> int:
    """"whole": no speech head; "speech": the tokenizer's (the server's); "mid": half the semantic
    tokens outside the head (misses at most steps of the demo model)."""
    tok = SparkTokenizer(spark_dir / "LLM")
    return {"whole": 0, "speech": tok.speech_ids_from, "mid": int(tok.semantic_ids.min()) + 4000}[head]


@pytest.mark.parametrize("tokens_per_replay,head", [(1, "whole"), (4, "whole"), (3, "whole"), (4, "speech"),
                                                    (3, "mid"), (1, "mid")])
def test_fused_decode_batch_gives_the_eager_tokens_with_joins_and_leaves(llm, spark_dir, tokens_per_replay, head):
    """Several steps per replay: a row that finishes or must be redrawn on the host (top_k off:
    every step) drops the replay's later steps and hands their draws back, so the tokens are the
    eager path's one-step-at-a-time tokens; end tokens stay banned until min_new_tokens in every
    step of a replay. With the speech head (the end id 7 lies outside it) a step whose best logit
    outside the head reaches what the draw kept is redrawn over the whole vocabulary: same tokens,
    greedy and sampled rows alike; the mid head misses, the tokenizer's never on the demo model."""
    params = [SamplingParams(max_new_tokens=12), SamplingParams(top_k=1, max_new_tokens=6),
              SamplingParams(top_k=0, top_p=0.8, max_new_tokens=9), SamplingParams(temperature=1.2, max_new_tokens=7),
              SamplingParams(temperature=1.0, max_new_tokens=13)]
    params[3] = SamplingParams(temperature=1.2, max_new_tokens=7, min_new_tokens=5)  # end id banned in part of a replay
    # the last one ends on an end token in mid-replay: the first new token from its 4th on is its end id
    probe = generate(llm, _prompt(14, 20), params[4], (), seed=4)
    end_at = next(i for i in range(3, 12) if probe.generated[i] not in probe.generated[:i])
    ends = [END, END, END, END, (probe.generated[end_at],)]

    head_from = _head_from(spark_dir, head)
    misses = []

    def run(fused: bool) -> list[list[int]]:
        batch = DecodeBatch(llm, 4, 96, cuda_graphs=False, fused=fused, tokens_per_replay=tokens_per_replay,
                            head_from=head_from)
        assert bool(batch.steps) == fused
        seqs = [Sequence(_prompt(10 + i, 8 + 3 * i), p, e, seed=i) for i, (p, e) in enumerate(zip(params, ends))]
        batch.add(seqs[0])
        batch.add(seqs[1])
        waiting = seqs[2:]
        for n in range(60):  # the late ones join after a step, into the first free slot (a left one's)
            if waiting and n >= 1 and batch.free_slots:
                batch.add(waiting.pop(0))
            batch.step()
        assert all(s.finished for s in seqs)
        assert seqs[4].finish_reason == "end" and len(seqs[4].generated) == end_at + 1
        misses.append(batch.head_misses)
        return [s.generated for s in seqs]

    assert run(True) == run(False)
    assert (misses[0] > 0) == (head == "mid") and misses[1] == 0


def test_speech_head_keeps_the_whole_vocabularys_logits_and_refuses_a_start_outside(llm, spark_dir):
    """keep_logits rows hold the whole vocabulary's banned logits with the head too (those of the
    fused step without it), and a head starting outside the vocabulary is refused with the range."""
    head_from = _head_from(spark_dir, "speech")
    got = {}
    for on, start in ((False, 0), (True, head_from)):
        batch = DecodeBatch(llm, 2, 64, cuda_graphs=False, fused=True, tokens_per_replay=4, head_from=start)
        seq = Sequence(_prompt(3, 10), SamplingParams(max_new_tokens=6, min_new_tokens=3), END, seed=1,
                       keep_logits=True)
        batch.add(seq)
        while not seq.finished:
            batch.step()
        got[on] = (seq.generated, torch.stack(seq.logits))
    assert got[True][0] == got[False][0]
    assert got[True][1].shape == got[False][1].shape
    assert torch.allclose(got[True][1], got[False][1], atol=1e-4)
    assert torch.isinf(got[True][1][1, END[0]])  # banned before min_new_tokens, outside the head
    with pytest.raises(ValueError, match="speech head must start inside the vocabulary"):
        DecodeBatch(llm, 2, 64, cuda_graphs=False, fused=True, head_from=llm.lm_head.weight.shape[0])


def test_sampling_from_the_head_equals_the_whole_vocabulary_unless_the_floor_is_reached():
    """sample_rows over columns offset.. gives the whole vocabulary's token whenever every logit
    before offset, over the row's temperature, stays below the floor it returns; ids come back whole."""
    offset = 1000
    hits = 0
    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        seqs = _rows(seed)
        for s in seqs:
            s.end_ids = (offset + 7,)
        logits = torch.randn(len(seqs), 4000, generator=g) * 3
        logits[:, :offset] -= float(seed % 3) * 3  # from often above the floor to mostly below it
        ints, floats = _inputs(seqs)
        _, head, floor = FS.sample_rows(logits[:, offset:], ints, floats, FS.N_CAND, offset)
        _, whole, _ = FS.sample_rows(logits, ints, floats, FS.N_CAND)
        clear = logits[:, :offset].max(dim=-1).values / floats[:, FS.TEMP] < floor
        for r in range(len(seqs)):
            if clear[r] and not head[1, r] and not whole[1, r]:
                assert int(head[0, r]) == int(whole[0, r])
                hits += 1
    assert hits > 40


@pytest.mark.parametrize("due_at", [11, 2])
def test_single_step_replays_up_to_a_first_chunk_keep_the_tokens(llm, due_at):
    """A sequence fewer than T tokens from its first chunk (`tokens_due`) makes the batch replay
    single steps until that token exists: the host sees the chunk's last token in the step that made
    it, not up to T - 1 steps later; the tokens of every row are those of T-step replays."""
    def run(align: bool):
        batch = DecodeBatch(llm, 4, 96, cuda_graphs=False, fused=True, tokens_per_replay=4, align_first_chunk=align)
        params = SamplingParams(temperature=1.0, max_new_tokens=24, min_new_tokens=24)
        seqs = [Sequence(_prompt(10 + i, 8 + 3 * i), params, END, seed=i) for i in range(2)]
        seqs[0].tokens_due = lambda s=seqs[0]: due_at - len(s.generated) if len(s.generated) < due_at else None
        for s in seqs:
            batch.add(s)
        counts = [len(seqs[0].generated)]  # the first sequence's tokens after its prefill, then after each step
        while not all(s.finished for s in seqs):
            batch.step()
            counts.append(len(seqs[0].generated))
        return [s.generated for s in seqs], counts, batch.short_replays

    (tokens, counts, short), (tokens_off, counts_off, short_off) = run(True), run(False)
    assert tokens == tokens_off and all(len(t) == 24 for t in tokens)
    assert short_off == 0 and counts_off[:4] == [1, 5, 9, 13]
    if due_at == 11:  # 1, 5, 9 by replays of four, then 10 and 11 one at a time, then four again
        assert short == 2 and counts[:6] == [1, 5, 9, 10, 11, 15]
    else:  # due after the prefill's token: one single step, then replays of four
        assert short == 1 and counts[:3] == [1, 2, 6]


def test_speech_head_setting_and_alignment(monkeypatch):
    """The head starts at the first special token rounded down to HEAD_ALIGN rows (151643 ->
    151640: the other rows' product gets an aligned width); "0" turns it off; nonsense is refused."""
    from tts.spark.decode import HEAD_ALIGN, SPEECH_HEAD_ENV, speech_head_from

    monkeypatch.delenv(SPEECH_HEAD_ENV, raising=False)
    assert speech_head_from(151643) == 151640 and 151640 % HEAD_ALIGN == 0 and speech_head_from(256) == 256
    monkeypatch.setenv(SPEECH_HEAD_ENV, "0")
    assert speech_head_from(151643) == 0
    monkeypatch.setenv(SPEECH_HEAD_ENV, "perhaps")
    with pytest.raises(ValueError, match=SPEECH_HEAD_ENV):
        speech_head_from(151643)


def test_align_first_chunk_setting(monkeypatch, llm):
    from tts.spark.decode import ALIGN_ENV

    monkeypatch.setenv(ALIGN_ENV, "0")
    batch = DecodeBatch(llm, 2, 64, cuda_graphs=False, fused=True, tokens_per_replay=4)
    assert all(step.single is None for step in batch.steps.values())
    monkeypatch.delenv(ALIGN_ENV)
    batch = DecodeBatch(llm, 2, 64, cuda_graphs=False, fused=True, tokens_per_replay=4)
    assert all(step.single is not None and step.single.tokens == 1 for step in batch.steps.values())
    one = DecodeBatch(llm, 2, 64, cuda_graphs=False, fused=True, tokens_per_replay=1)
    assert all(step.single is None for step in one.steps.values())  # nothing to align with one step a replay
    monkeypatch.setenv(ALIGN_ENV, "sometimes")
    with pytest.raises(ValueError, match=ALIGN_ENV):
        DecodeBatch(llm, 2, 64, cuda_graphs=False, fused=True, tokens_per_replay=4)


def _random_cache(llm, slots: int, length: int):
    cache = new_cache(llm, slots, length)
    cache.k.normal_()
    cache.v.normal_()
    return cache


def _compare(compiled, decoder, cache, buckets, atol: float) -> None:
    """The compiled forward equals the eager one (logits, new keys, new values) in every bucket."""
    with torch.no_grad():
        for rows, length in buckets:
            tokens = torch.arange(rows) + 300
            positions = torch.arange(rows) * 3 + 5
            out = compiled(cache.k, cache.v, tokens, positions, length)
            ref = decoder(cache.k, cache.v, tokens, positions, length)
            for a, b in zip(out, ref):
                assert torch.allclose(a, b, atol=atol)


@pytest.mark.parametrize("unbacked", [True, False])
def test_the_fused_forward_compiles_one_graph_for_every_bucket(llm, unbacked):
    """fullgraph (a graph break raises) and no recompile across the buckets the server captures,
    including one row, every slot (rows equal to max_batch) and the longest key length (the whole
    sequence range); each compiled result equals the eager one. A backed row count (the fallback,
    and older torch) compiles one row apart: two graphs."""
    if unbacked and not FS.unbacked_rows_supported():
        pytest.skip("this torch cannot mark the row count unbacked with a shared symbol")
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    decoder = FS.FusedDecoder(llm, 64)
    compiled, stats = FS.compile_decoder(decoder, backend=counting_backend, unbacked_rows=unbacked)
    cache = _random_cache(llm, 4, 64)
    torch._dynamo.reset()
    _compare(compiled, decoder, cache, [(r, n) for r in (4, 3, 1) for n in (64, 48, 16)], atol=1e-5)
    assert stats["compiled"] and stats["unbacked_rows"] == unbacked
    assert len(graphs) == (1 if unbacked else 2)
    # the spare slot and position past what sequences use
    assert (cache.max_batch, cache.max_seq_len) == (4, 64)
    assert cache.k.shape[1:4:2] == (4 + SPARE_SLOTS, 64 + SPARE_POSITIONS)


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="inductor's CPU code needs a C++ compiler")
def test_the_compiled_step_lowers_through_inductor_with_one_graph(llm, tmp_path, monkeypatch):
    """The real backend (inductor, C++ on the CPU; Triton on the GPU shares the lowering): the
    unbacked row count must survive lowering and code generation, not only tracing."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("STUDIO_DATA_DIR", str(tmp_path))
    decoder = FS.FusedDecoder(llm, 64)
    compiled, stats = FS.compile_decoder(decoder)
    cache = _random_cache(llm, 2, 64)
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    _compare(compiled, decoder, cache, [(2, 64), (1, 48), (2, 16)], atol=1e-4)
    assert stats["compiled"]
    assert counters["stats"]["unique_graphs"] - before == (1 if stats["unbacked_rows"] else 2)


@pytest.mark.parametrize("tokens", [1, SPARE_POSITIONS])
def test_warm_up_runs_touch_only_the_spare_positions(llm, tokens):
    """A captured bucket's warm-up really runs its steps (FastStep, on the GPU): with the decoder
    build_steps makes, its inputs must be in range (the RoPE tables cover the spare positions) and
    its cache writes must leave every position a sequence can use unchanged."""
    cache = _random_cache(llm, 3, 64)
    FS.build_steps(llm, cache, [1, 3], [64], compile_=False, tokens=tokens)
    decoder = llm._fused_decoder
    k0, v0 = cache.k.clone(), cache.v.clone()
    for rows in (1, 3):
        ints, floats = FS.warmup_inputs(cache, rows, tokens)
        FS.fused_steps(decoder, cache, ints, floats, 64)
    used = slice(0, cache.max_seq_len)
    assert torch.equal(cache.k[:, :, :, used], k0[:, :, :, used]) and torch.equal(cache.v[:, :, :, used], v0[:, :, :, used])
    last = cache.scratch_position + tokens - 1
    assert not torch.equal(cache.k[:, :3, :, last], k0[:, :3, :, last])
    with pytest.raises(ValueError, match="tokens per replay"):
        FS.warmup_inputs(cache, 1, SPARE_POSITIONS + 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attention,head", [("matmul", "whole"), ("kernel", "mid"), ("kernel", "speech")])
def test_compiled_graphs_give_the_eager_tokens_on_cuda(spark_dir, tmp_path, monkeypatch, attention, head):
    """The server's path on CUDA (fused step compiled, one CUDA graph per bucket, device sampling)
    against the eager step, in float32 with TF32 off (only summation order differs), with
    joins, leaves and every row bucket; and one compiled graph (two where R is backed). With both
    attention forms (the Triton kernels must pass their start-up check and be used)."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("STUDIO_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("STUDIO_SPARK_FAST", raising=False)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32 (restored below)
    try:
        _compare_compiled_and_eager_on_cuda(spark_dir, counters, attention, head)
    finally:
        torch.set_float32_matmul_precision(precision)


def _compare_compiled_and_eager_on_cuda(spark_dir, counters, attention: str, head: str) -> None:
    head_from = _head_from(spark_dir, head)
    model = load_llm(spark_dir / "LLM").to("cuda", torch.float32)
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]

    def run(graphs: bool) -> tuple[list[list[int]], dict]:
        batch = DecodeBatch(model, 4, 300, cuda_graphs=graphs, attention=attention, head_from=head_from)
        params = [SamplingParams(max_new_tokens=40), SamplingParams(top_k=1, max_new_tokens=12),
                  SamplingParams(top_k=0, top_p=0.8, max_new_tokens=25), SamplingParams(temperature=1.2, max_new_tokens=20)]
        seqs = [Sequence(_prompt(10 + i, 8 + 3 * i), p, END, seed=i) for i, p in enumerate(params)]
        # a first chunk due at 30 tokens: single-step graphs replayed before it (the default)
        seqs[0].tokens_due = lambda s=seqs[0]: 30 - len(s.generated) if len(s.generated) < 30 else None
        batch.add(seqs[0])
        for n in range(60):
            if n in (2, 5):
                batch.add(seqs[1 if n == 2 else 2])
            if n == 15:  # seqs[1] has left: the late one takes its slot
                batch.add(seqs[3])
            batch.step()
        assert all(s.finished for s in seqs)
        return [s.generated for s in seqs], dict(batch.stats, short_replays=batch.short_replays,
                                                 head_misses=batch.head_misses)

    fast, stats = run(True)
    assert stats["compiled"] and not stats.get("capture_errors"), stats
    assert stats["attention"] == attention, stats
    assert stats["single_steps"] and stats["short_replays"] > 0, stats
    assert stats["head_from"] == head_from and (stats["head_misses"] > 0) == (head == "mid"), stats
    assert stats["graphs"] == 2 * len(graph_buckets(GRAPH_ROWS, 4)) * len(graph_buckets(GRAPH_LENGTHS, 300))
    assert counters["stats"]["unique_graphs"] - before == (1 if stats["unbacked_rows"] else 2)
    eager, _ = run(False)
    assert fast == eager


def test_tokens_per_replay_setting(monkeypatch):
    from tts.spark.decode import TOKENS_ENV, TOKENS_PER_REPLAY, tokens_per_replay_from_env

    monkeypatch.delenv(TOKENS_ENV, raising=False)
    assert tokens_per_replay_from_env() == TOKENS_PER_REPLAY
    monkeypatch.setenv(TOKENS_ENV, "2")
    assert tokens_per_replay_from_env() == 2
    for bad in ("0", "abc", str(SPARE_POSITIONS + 1), "-1"):
        monkeypatch.setenv(TOKENS_ENV, bad)
        with pytest.raises(ValueError, match=TOKENS_ENV):
            tokens_per_replay_from_env()
