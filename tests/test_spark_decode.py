"""The Spark LLM decode loop: parity with transformers, sampling rules, in-flight batching invariance."""

from __future__ import annotations

import pytest
import torch

from tests.test_spark_fixtures import spark_dir, spark_one_thread  # noqa: F401 - fixtures
from tts.spark.decode import DecodeBatch, SamplingParams, Sequence, generate, sample_tokens
from tts.spark.llm import forward_prefill, forward_step, load_llm, new_cache

pytestmark = pytest.mark.usefixtures("spark_one_thread")

LOGIT_TOL = 1e-4
END = (3,)


@pytest.fixture(scope="module")
def llm(spark_dir):
    return load_llm(spark_dir / "LLM")


def _prompt(seed: int, n: int) -> list[int]:
    return torch.randint(300, 12000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_forward_matches_transformers(llm):
    ids = torch.tensor(_prompt(0, 40))
    with torch.no_grad():
        ref = llm(ids.view(1, -1)).logits[0]
    cache = new_cache(llm, 3, 64)
    assert torch.allclose(forward_prefill(llm, cache, 1, ids[:30]), ref[29], atol=LOGIT_TOL)
    for t in range(30, 40):  # slot 1 decodes; rows 0 and 2 are free slots with a dummy token
        logits = forward_step(llm, cache, torch.tensor([0, int(ids[t]), 0]), torch.tensor([0, t, 0]), t + 1)
        assert torch.allclose(logits[1], ref[t], atol=LOGIT_TOL)
    # a prefill continuing at a later position (the masked path) agrees too
    cache2 = new_cache(llm, 1, 64)
    forward_prefill(llm, cache2, 0, ids[:20])
    assert torch.allclose(forward_prefill(llm, cache2, 0, ids[20:35], start=20), ref[34], atol=LOGIT_TOL)


def test_greedy_generate_matches_transformers_generate(llm):
    prompt = _prompt(1, 25)
    seq = generate(llm, prompt, SamplingParams(top_k=1, max_new_tokens=30), end_ids=END)
    with torch.no_grad():
        hf = llm.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, eos_token_id=list(END),
                          pad_token_id=0)
    assert seq.generated == hf[0, len(prompt):].tolist()
    assert seq.finish_reason == "length" and len(seq.tokens) == 30


def test_sampling_rules():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]])

    def seqs(**kw):
        return [Sequence([1], SamplingParams(**kw), END, seed=0)]

    assert sample_tokens(logits, seqs(top_k=1)) == [1]
    assert sample_tokens(logits, seqs(temperature=0.0, top_k=0)) == [1]
    # top_k 2 only ever draws the two best tokens; a tiny top_p only the best one
    draws = {sample_tokens(logits, [Sequence([1], SamplingParams(top_k=2, top_p=1.0), END, seed=s)])[0]
             for s in range(40)}
    assert draws == {1, 3}
    assert {sample_tokens(logits, [Sequence([1], SamplingParams(top_k=0, top_p=0.01), END, seed=s)])[0]
            for s in range(20)} == {1}
    # min_new_tokens masks the end token even when it is the best one
    end_best = torch.tensor([[0.0, 1.0, 0.0, 9.0]])
    s = Sequence([1], SamplingParams(top_k=1, min_new_tokens=2), END, seed=0)
    assert sample_tokens(end_best, [s]) == [1]
    s.generated = [1, 1]
    assert sample_tokens(end_best, [s]) == [3]


def test_seeded_sampling_is_reproducible(llm):
    prompt = _prompt(2, 20)
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.95, max_new_tokens=20)
    a = generate(llm, prompt, params, END, seed=7).generated
    b = generate(llm, prompt, params, END, seed=7).generated
    c = generate(llm, prompt, params, END, seed=8).generated
    assert a == b and a != c


def test_min_equal_max_gives_exactly_n_tokens(llm):
    end = tuple(range(12608))  # every token ends a sequence unless min_new_tokens holds it off
    seq = generate(llm, _prompt(3, 10), SamplingParams(top_k=1, min_new_tokens=12, max_new_tokens=12), end)
    assert len(seq.generated) == 12 and seq.finish_reason == "length"
    early = generate(llm, _prompt(3, 10), SamplingParams(top_k=1, min_new_tokens=3, max_new_tokens=12), end)
    assert len(early.tokens) == 3 and early.finish_reason == "end"


def test_greedy_tokens_are_the_same_alone_and_in_a_batch_with_joins_and_leaves(llm):
    """Sequences join the running batch mid-way, leave when done, and a later one takes a freed slot."""
    specs = {"a": (_prompt(10, 30), 40), "b": (_prompt(11, 12), 15), "c": (_prompt(12, 50), 30),
             "d": (_prompt(13, 20), 25)}

    def seq(name):
        prompt, n = specs[name]
        return Sequence(prompt, SamplingParams(top_k=1, max_new_tokens=n), END, seed=0, keep_logits=True)

    solo = {}
    for name, (prompt, n) in specs.items():
        solo[name] = generate(llm, prompt, SamplingParams(top_k=1, max_new_tokens=n), END, keep_logits=True)

    batch = DecodeBatch(llm, 3, 128)
    running = {"a": seq("a")}
    batch.add(running["a"])
    joins = {5: "b", 9: "c", 20: "d"}  # step -> new sequence (d arrives after b has left: reuses its slot)
    sizes = []
    for step in range(80):
        if step in joins:
            running[joins[step]] = seq(joins[step])
            batch.add(running[joins[step]])
        if not batch.running:
            break
        sizes.append(len(batch.running))
        batch.step()
    assert max(sizes) == 3 and all(s.finished for s in running.values())
    assert running["d"].slot == running["b"].slot  # the freed slot was reused
    for name, s in running.items():
        assert s.generated == solo[name].generated, name
        got, ref = torch.stack(s.logits), torch.stack(solo[name].logits)
        assert torch.allclose(got, ref, atol=LOGIT_TOL), (name, float((got - ref).abs().max()))


def test_prompt_longer_than_the_cache_is_refused(llm):
    batch = DecodeBatch(llm, 1, 16)
    with pytest.raises(ValueError, match="KV cache"):
        batch.add(Sequence(_prompt(0, 20), SamplingParams(), END, seed=0))


def test_generation_stops_at_the_cache_end(llm):
    batch = DecodeBatch(llm, 1, 24)
    s = Sequence(_prompt(0, 20), SamplingParams(top_k=1, max_new_tokens=100), END, seed=0)
    batch.add(s)
    while not s.finished:
        batch.step()
    assert s.finish_reason == "cache" and s.position == 24


def _run_to_end(batch: DecodeBatch, seqs: list[Sequence]) -> list[list[int]]:
    while any(not s.finished for s in seqs):
        batch.step()
    return [s.generated for s in seqs]


def _joiners(seed: int) -> list[Sequence]:
    params = [SamplingParams(top_k=1, max_new_tokens=12), SamplingParams(temperature=0.9, top_k=50, top_p=0.9,
                                                                          max_new_tokens=15),
              SamplingParams(temperature=1.2, top_k=0, top_p=0.8, max_new_tokens=9),
              SamplingParams(top_k=1, max_new_tokens=1)]
    return [Sequence(_prompt(seed + i, 7 + 11 * i), p, END, seed=i) for i, p in enumerate(params)]


@pytest.mark.parametrize("cap", [1000, 30])
def test_packed_prefill_gives_each_sequence_what_its_own_prefill_gives(llm, monkeypatch, cap):
    """add_many (one packed forward, or several when the prompts exceed the cap) writes the same
    cache and draws the same tokens as add() for each in turn, joining a batch that already runs a
    sequence in slot 0 (so the joiners take slots 1..4), through to the end of generation."""
    from tts.spark import decode

    monkeypatch.setitem(decode.MAX_PACKED_TOKENS, "cpu", cap)
    calls = []
    real = decode.forward_prefill_many
    monkeypatch.setattr(decode, "forward_prefill_many", lambda *a: calls.append(len(a[2])) or real(*a))
    out = []
    for packed in (False, True):
        batch = DecodeBatch(llm, 6, 96)
        first = Sequence(_prompt(99, 10), SamplingParams(top_k=1, max_new_tokens=20), END, seed=9)
        batch.add(first)
        batch.step()
        seqs = _joiners(5)
        toks = batch.add_many(seqs) if packed else [batch.add(s) for s in seqs]
        assert toks == [s.generated[0] for s in seqs]
        assert [s.slot for s in seqs] == [1, 2, 3, 4] and seqs[3].finished  # one token only: done at once
        out.append((_run_to_end(batch, [first, *seqs]), batch.cache.k[:, 1:5, :, :40].clone()))
    assert out[0][0] == out[1][0]
    assert torch.allclose(out[0][1], out[1][1], atol=1e-5)
    assert calls == ([4] if cap == 1000 else [2, 1, 1])  # prompts of 7, 18, 29, 40 tokens; cap 30: 7 + 18, 29, 40


def test_packed_prefill_refuses_before_taking_any_slot(llm, monkeypatch):
    from tts.spark import decode

    batch = DecodeBatch(llm, 4, 64)
    seqs = _joiners(1)[:2] + [Sequence(_prompt(3, 80), SamplingParams(), END, seed=0)]
    with pytest.raises(ValueError, match="KV cache holds 64"):
        batch.add_many(seqs)
    assert batch.free_slots == 4 and all(not s.generated for s in seqs)
    with pytest.raises(RuntimeError, match="free decode slots"):
        batch.add_many(_joiners(2) + _joiners(3)[:1])
    monkeypatch.setitem(decode.MAX_PACKED_TOKENS, "cpu", 20)
    calls = []

    def failing(*a):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory")
        return decode.forward_prefill(*a[:2], a[2][0], a[3][0]).view(1, -1)

    monkeypatch.setattr(decode, "forward_prefill_many", failing)
    seqs = _joiners(4)[:2]
    with pytest.raises(RuntimeError, match="out of memory"):
        batch.add_many(seqs)
    assert batch.free_slots == 4 and all(not s.generated and s.slot < 0 for s in seqs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_prefill_equals_one_prefill_each_on_cuda(spark_dir, dtype):
    """On CUDA: bf16 takes flash attention's varlen kernel (causal, grouped-query heads), fp32 the
    masked SDPA; both give each prompt's own prefill (logits and cache) to the dtype's rounding."""
    from tts.spark.llm import forward_prefill_many

    model = load_llm(spark_dir / "LLM").to("cuda", dtype)
    prompts = [torch.tensor(_prompt(20 + i, n)) for i, n in enumerate((33, 5, 61))]
    slots = [3, 0, 1]
    one, packed = new_cache(model, 4, 128), new_cache(model, 4, 128)
    ref = torch.stack([forward_prefill(model, one, s, p) for s, p in zip(slots, prompts)])
    out = forward_prefill_many(model, packed, slots, prompts)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    scale = float(ref.abs().max())
    assert float((out - ref).abs().max()) <= tol * scale
    assert float((one.k.float() - packed.k.float()).abs().max()) <= tol * float(one.k.float().abs().max())
