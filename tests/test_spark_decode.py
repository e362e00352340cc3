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
