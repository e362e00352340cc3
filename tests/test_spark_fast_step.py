"""tts/spark/fast_step.py: the bucketed decode step equals forward_step; the graph protocol; CUDA (gpu).

Tolerance: logits within 1e-4 (DESIGN.md "same tokens" on CPU float32). The padded rows and the
extra, masked keys of a bucket must not change a running row's logits.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import pytest
import torch

from tts.spark import fast_step as S
from tts.spark.llm import forward_prefill, forward_step, new_cache

LOGIT_TOL = 1e-4


def tiny_llm(device="cpu", dtype=torch.float32):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg).eval().to(device=device, dtype=dtype)


def prefilled(llm, slots=4, length=64, device="cpu"):
    """A cache with slot 0 (20 tokens) and slot 2 (9 tokens) prefilled; slots 1 and 3 free."""
    cache = new_cache(llm, slots, length)
    gen = torch.Generator().manual_seed(1)
    prompts = {0: torch.randint(0, 300, (20,), generator=gen), 2: torch.randint(0, 300, (9,), generator=gen)}
    for slot, ids in prompts.items():
        forward_prefill(llm, cache, slot, ids)
    return cache, {s: len(p) for s, p in prompts.items()}


def clone_cache(cache):
    new = type(cache).__new__(type(cache))
    torch.nn.Module.__init__(new)
    new.register_buffer("k", cache.k.clone(), persistent=False)
    new.register_buffer("v", cache.v.clone(), persistent=False)
    return new


def test_options_and_buckets():
    assert S.row_buckets_for(16) == (1, 2, 4, 8, 16) and S.row_buckets_for(6) == (1, 2, 4, 6)
    assert S.step_options_from_env({}).mode == "graph"
    assert S.step_options_from_env({S.FAST_ENV: "0"}).mode == "off"
    assert S.step_options_from_env({S.FAST_ENV: "eager"}).mode == "eager"
    with pytest.raises(ValueError, match=S.FAST_ENV):
        S.step_options_from_env({S.FAST_ENV: "warp"})
    llm = tiny_llm()
    cache = new_cache(llm, 4, 600)
    step = S.GraphedDecodeStep(llm, cache, S.StepOptions(mode="eager"))
    assert step.row_buckets == (1, 2, 4) and step.length_buckets[-1] == 600 and step.length_buckets[0] == 256
    assert step.bucket(3, 257) == (4, 512) and step.bucket(5, 10) is None and step.bucket(1, 601) is None
    with pytest.raises(ValueError, match="CUDA"):
        S.GraphedDecodeStep(llm, cache, S.StepOptions(mode="graph"))


def run_steps(step_fn, llm, cache, lens, n=5):
    """Decode n steps for slots 0 and 2 (slot 1 a free row with a dummy token), feeding fixed tokens
    (both paths see the same inputs even where rounding would flip an argmax); returns the logits."""
    pos = dict(lens)
    feed = torch.randint(0, 300, (n, 2), generator=torch.Generator().manual_seed(3)).tolist()
    out = []
    for a, b in feed:
        tokens = torch.tensor([a, 0, b])
        positions = torch.tensor([pos[0], 0, pos[2]])
        logits = step_fn(llm, cache, tokens, positions, max(pos.values()) + 1)
        out.append(logits[[0, 2]])
        pos = {s: p + 1 for s, p in pos.items()}
    return torch.stack(out)


def test_bucketed_step_equals_forward_step():
    llm = tiny_llm()
    cache, lens = prefilled(llm)
    ref_cache = clone_cache(cache)
    step = S.GraphedDecodeStep(llm, cache, S.StepOptions(mode="eager", length_step=16, self_check=False))
    with torch.inference_mode():
        fast = run_steps(step, llm, cache, lens)
        ref = run_steps(forward_step, llm, ref_cache, lens)
    assert step.bucket(3, 21) == (4, 32)  # padded rows and masked extra keys
    assert (fast - ref).abs().max() <= LOGIT_TOL
    # the running slots' caches hold the same keys; padded row 3 only touched position 0 of a free slot
    assert torch.allclose(cache.k[:, [0, 2], :, :25], ref_cache.k[:, [0, 2], :, :25], atol=1e-6)


def test_other_cache_or_oversize_runs_forward_step():
    llm = tiny_llm()
    cache, lens = prefilled(llm)
    step = S.GraphedDecodeStep(llm, cache, S.StepOptions(mode="eager", length_step=16, self_check=False))
    other, _ = prefilled(llm)
    tokens, positions = torch.tensor([5, 0, 7]), torch.tensor([20, 0, 9])
    assert torch.equal(step(llm, other, tokens, positions, 21), forward_step(llm, clone_cache(cache), tokens,
                                                                             positions, 21))


class FakeGraph:
    capturing = None

    def __init__(self):
        self.fn, self.replays = None, 0

    def replay(self):
        self.replays += 1
        self.fn()


def test_graph_protocol_with_a_stand_in_for_cuda_graphs(monkeypatch):
    llm = tiny_llm()
    cache, lens = prefilled(llm)
    ref_cache = clone_cache(cache)
    real = S.GraphedDecodeStep._static_step

    def recording(self, rows, length):
        if FakeGraph.capturing is not None:
            FakeGraph.capturing.fn = lambda: real(self, rows, length)
            return
        real(self, rows, length)

    @contextmanager
    def fake_graph(g, pool=None, capture_error_mode=None):
        FakeGraph.capturing = g
        try:
            yield
        finally:
            FakeGraph.capturing = None

    stream = type("S", (), {"wait_stream": lambda self, s: None})
    monkeypatch.setattr(S.GraphedDecodeStep, "_static_step", recording)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: stream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: nullcontext())
    monkeypatch.setattr(torch.cuda, "device", lambda d: nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_graph)
    step = S.GraphedDecodeStep(llm, cache, S.StepOptions(mode="eager", length_step=16, self_check=False))
    step.options = S.StepOptions(mode="graph", length_step=16, self_check=False)
    stats = step.warmup()
    assert stats["graphs"] == 3 * 4 and "capture_errors" not in stats
    # warm-up wrote position 0 of every slot: restore the prefilled state, as a new prefill would
    cache.k.copy_(ref_cache.k)
    cache.v.copy_(ref_cache.v)
    fast = run_steps(step, llm, cache, lens)
    ref = run_steps(forward_step, llm, ref_cache, lens)
    assert step._graphs[(4, 32)].replays >= 1
    assert (fast - ref).abs().max() <= LOGIT_TOL


def test_self_check_runs_and_passes():
    llm = tiny_llm()
    cache = new_cache(llm, 2, 64)
    step = S.GraphedDecodeStep(llm, cache, S.StepOptions(mode="eager", length_step=16))
    stats = step.warmup()
    assert step.ready and stats["self_check_rel_err"] <= 1e-5


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_cuda_graph_step_equals_forward_step(dtype, tol):
    llm = tiny_llm("cuda", dtype)
    cache = new_cache(llm, 4, 64)
    step = S.GraphedDecodeStep(llm, cache, S.StepOptions(mode="graph", length_step=16))
    stats = step.warmup()
    assert step.ready and stats["graphs"] == 3 * 4, stats
    cache2, lens = prefilled(llm, device="cuda")
    cache.k.copy_(cache2.k)
    cache.v.copy_(cache2.v)
    fast = run_steps(step, llm, cache, lens)
    ref = run_steps(forward_step, llm, clone_cache(cache2), lens)
    assert float((fast - ref).float().norm() / ref.float().norm()) <= tol
