"""A lone prompt's prefill padded to a bucket and replayed from CUDA graphs (tts.spark.prefill_graphs):
the padded forward gives the prompt's own logits and cache (the CPU runs it eagerly), the decode
batch takes it where a prompt fits and the eager prefill elsewhere, with the same tokens; on CUDA
the captured graphs against the eager prefill."""

from __future__ import annotations

import pytest
import torch

from tests.test_spark_decode import END, _prompt, llm  # noqa: F401 - the decode tests' model fixture
from tests.test_spark_fixtures import spark_dir, spark_one_thread  # noqa: F401 - fixtures
from tts.spark import decode
from tts.spark.decode import DecodeBatch, SamplingParams, Sequence
from tts.spark.llm import forward_prefill, load_llm, new_cache
from tts.spark.prefill_graphs import PREFILL_BUCKETS, PREFILL_GRAPHS_ENV, PrefillGraphs

pytestmark = pytest.mark.usefixtures("spark_one_thread")


@pytest.mark.parametrize("n", [1, 21, 32, 33, 64])
def test_padded_prefill_gives_the_prompts_own_logits_and_cache(llm, n):
    """Padded to the next bucket (16, 32 or 64), the prompt's last logits and its keys and values
    at positions 0..T-1 are the unpadded prefill's; the other slots are untouched."""
    ids = _prompt(n, n)
    ref_cache, cache = new_cache(llm, 3, 80), new_cache(llm, 3, 80)
    prefill = PrefillGraphs(llm, cache, buckets=(16, 32, 64, 128), graphs=False)
    assert prefill.buckets == (16, 32, 64)  # 128 is past the cache's 80 positions
    with torch.no_grad():
        want = forward_prefill(llm, ref_cache, 2, torch.tensor(ids))
        got = prefill(2, ids)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-4)
    assert torch.allclose(cache.k[:, 2, :, :n], ref_cache.k[:, 2, :, :n], atol=1e-5)
    assert torch.allclose(cache.v[:, 2, :, :n], ref_cache.v[:, 2, :, :n], atol=1e-5)
    assert not cache.k[:, :2].any() and not cache.k[:, 3:].any()


def test_prompts_outside_the_buckets_are_refused(llm):
    prefill = PrefillGraphs(llm, new_cache(llm, 2, 80), buckets=(16, 32), graphs=False)
    assert prefill.fits(32) and not prefill.fits(33) and not prefill.fits(0)
    with pytest.raises(ValueError, match="outside the prefill buckets"):
        prefill(0, _prompt(0, 40))
    assert PREFILL_BUCKETS[0] == 64 and all(b % 64 == 0 for b in PREFILL_BUCKETS)


def test_decode_batch_takes_the_padded_prefill_where_a_prompt_fits(llm, monkeypatch):
    """A batch over a 96-position cache has the 64 bucket: a 40-token prompt (add, and add_many of
    one) goes through it, an 80-token one through the eager prefill; every sequence's tokens, greedy
    and sampled, equal those of a batch without it, as do the cache rows."""
    calls = []
    real = decode.forward_prefill
    monkeypatch.setattr(decode, "forward_prefill", lambda *a, **k: calls.append(a[3].shape[0]) or real(*a, **k))

    def run(prefill_graphs: bool):
        batch = DecodeBatch(llm, 4, 96, prefill_graphs=prefill_graphs)
        seqs = [Sequence(_prompt(1, 40), SamplingParams(top_k=1, max_new_tokens=12), END, seed=1),
                Sequence(_prompt(2, 80), SamplingParams(temperature=0.9, top_k=50, max_new_tokens=10), END, seed=2),
                Sequence(_prompt(3, 33), SamplingParams(temperature=1.1, top_k=0, top_p=0.9, max_new_tokens=8),
                         END, seed=3)]
        batch.add(seqs[0])
        batch.add(seqs[1])
        batch.step()
        batch.add_many([seqs[2]])
        while any(not s.finished for s in seqs):
            batch.step()
        return [s.generated for s in seqs], batch.cache.k[:, :3, :, :40].clone(), batch.prefill

    tokens, cache, prefill = run(True)
    assert prefill is not None and calls == [80]  # only the long prompt went eager
    calls.clear()
    want_tokens, want_cache, none = run(False)
    assert none is None and calls == [40, 80]  # add_many of one packs through forward_prefill_many
    assert tokens == want_tokens
    assert torch.allclose(cache, want_cache, atol=1e-4)


def test_prefill_graphs_setting(monkeypatch, llm):
    """On the CPU the batch has no prefill graphs unless asked (the switch only turns them off on CUDA)."""
    monkeypatch.setenv(PREFILL_GRAPHS_ENV, "0")
    assert DecodeBatch(llm, 2, 64).prefill is None
    assert DecodeBatch(llm, 2, 64, prefill_graphs=True).prefill is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_captured_prefill_equals_the_eager_prefill_on_cuda(spark_dir, dtype):
    """The graphs replay the padded forward: the logits and the prompt's cache rows equal the eager
    prefill's to the dtype's rounding (fp32: 1e-4 of the largest value), for prompts in several
    buckets, one after another into different slots (each replay's inputs are its own); the greedy
    tokens that follow are the same in fp32."""
    model = load_llm(spark_dir / "LLM").to("cuda", dtype)
    cache, ref_cache = new_cache(model, 4, 512), new_cache(model, 4, 512)
    prefill = PrefillGraphs(model, cache)
    assert set(prefill.graphs) == {b for b in PREFILL_BUCKETS if b <= 512} and prefill.capture_s > 0
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for slot, n in ((0, 5), (2, 130), (1, 64), (3, 500)):
        ids = _prompt(n, n)
        with torch.no_grad():
            want = forward_prefill(model, ref_cache, slot, torch.tensor(ids))
            got = prefill(slot, ids).clone()
        assert float((got - want).abs().max()) <= tol * float(want.abs().max())
        k, ref_k = cache.k[:, slot, :, :n].float(), ref_cache.k[:, slot, :, :n].float()
        assert float((k - ref_k).abs().max()) <= tol * float(ref_k.abs().max())
    if dtype == torch.float32:
        def greedy(prefill_graphs):
            batch = DecodeBatch(model, 2, 512, cuda_graphs=False, prefill_graphs=prefill_graphs)
            seq = Sequence(_prompt(7, 300), SamplingParams(top_k=1, max_new_tokens=20), END, seed=0)
            batch.add(seq)
            while not seq.finished:
                batch.step()
            return seq.generated
        assert greedy(True) == greedy(False)
