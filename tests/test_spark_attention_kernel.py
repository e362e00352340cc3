"""The decode step's Triton attention (tts.spark.attention_kernel): its plain-torch reference
against the matrix-product form the fast step uses, the form's selection, and the kernels
themselves under Triton's CPU interpreter where Triton is installed (on CUDA:
tests/test_spark_fast_step.py::test_compiled_graphs_give_the_eager_tokens_on_cuda[kernel])."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_spark_fixtures import spark_dir, spark_one_thread  # noqa: F401 - fixtures
from tts.spark import attention_kernel as AK
from tts.spark import fast_step as FS
from tts.spark.decode import ATTENTION_ENV, DEFAULT_ATTENTION, attention_from_env
from tts.spark.kv_cache import StaticKVCache
from tts.spark.llm import load_llm

ROOT = Path(__file__).resolve().parent.parent


def _inputs(rows=3, heads=14, kv=2, d=64, slots=5, positions=200, length=150, seed=0, dtype=torch.float32):
    """q, k_new, v_new as views of one [R, (H + 2 KV) D] projection (as the step has them), a cache
    with more slots and positions than looked at, a mask with a full row, a partial one and an
    empty one, and each row's position (its cached count: the position the new key goes to)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(rows, (heads + 2 * kv) * d, generator=g).to(dtype)
    q = qkv[:, : heads * d].view(rows, heads, d)
    k = qkv[:, heads * d: (heads + kv) * d].view(rows, kv, d)
    v = qkv[:, (heads + kv) * d:].view(rows, kv, d)
    keys = torch.randn(slots, kv, positions, d, generator=g).to(dtype)
    values = torch.randn(slots, kv, positions, d, generator=g).to(dtype)
    # a row's position must exist in the cache: a full row at the cache's last position (length = positions)
    counts = torch.tensor([min(length, positions - 1), length // 3 + 1, 0, 7][:rows])
    cached = torch.arange(length).view(1, -1) < counts.view(-1, 1)
    return q, k, v, keys, values, cached, counts


def _matmul_form(q, k, v, keys, values, cached):
    """The fast step's matrix-product attention, taken from decode_layer with identity weights around it."""
    rows, heads, d = q.shape
    scale = d ** -0.5
    kv = k.shape[1]
    rep = heads // kv
    length = cached.shape[1]
    ks, vs = keys[:rows, :, :length], values[:rows, :, :length]
    qg = q.view(rows, kv, rep, d)
    old = (torch.matmul(qg, ks.transpose(-1, -2)) * scale).masked_fill(~cached.view(rows, 1, 1, length), float("-inf"))
    new = (qg * k.view(rows, kv, 1, d)).sum(-1, keepdim=True) * scale
    probs = torch.softmax(torch.cat((old, new), dim=-1).float(), dim=-1).to(q.dtype)
    return (torch.matmul(probs[..., :length].contiguous(), vs) + probs[..., length:] * v.view(rows, kv, 1, d)).reshape(rows, heads, d)


def test_reference_is_the_fast_steps_matmul_attention():
    """What the kernels are checked against is the attention the step computes today (float32),
    including a row with no cached key (only its own new key: output = v_new), and the cache write
    the step did after its forward (`write_new_kv`): the new key and value at each row's position,
    nothing else."""
    q, k, v, keys, values, cached, positions = _inputs()
    want = _matmul_form(q, k, v, keys, values, cached)
    k2, v2 = keys.clone(), values.clone()
    ref = AK.reference(q, k, v, k2, v2, cached, positions, q.shape[-1] ** -0.5)
    assert torch.allclose(ref, want, atol=1e-5)
    assert torch.allclose(ref[2], v[2].repeat_interleave(7, dim=0), atol=1e-6)
    cache = StaticKVCache(1, keys.shape[0] - 1, keys.shape[1], keys.shape[2] - 8, keys.shape[3])
    cache.k[0], cache.v[0] = keys, values
    FS.write_new_kv(cache, positions, k[None], v[None])
    assert torch.equal(k2, cache.k[0]) and torch.equal(v2, cache.v[0]) and not torch.equal(k2, keys)


def test_the_forwards_kernel_form_calls_the_op_with_the_steps_tensors(spark_dir, monkeypatch):
    """FusedDecoder.forward's "kernel" form hands the op each layer's roped q, new k and v, that
    layer's whole cache, the mask and the positions; with the op swapped for the reference, it gives
    the matmul form's hidden state and leaves the cache as the matmul form's forward followed by
    `write_new_kv` does (float32)."""
    llm = load_llm(spark_dir / "LLM")
    decoder = FS.FusedDecoder(llm, 72)
    s = decoder.shape
    g = torch.Generator().manual_seed(3)
    rows, length = 3, 40
    shape = (len(decoder.layers), rows + 2, s.n_kv_heads, 72, s.head_dim)
    keys, values = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    tokens, positions = torch.tensor([5, 9, 11]), torch.tensor([39, 13, 0])
    calls = []

    def fake_op(*args):
        calls.append(args)
        return AK.reference(*args)

    with torch.no_grad():
        decoder.attention = "matmul"
        want, k_new, v_new = decoder(keys, values, tokens, positions, length)
        cache = StaticKVCache(shape[0], rows + 1, shape[2], 64, shape[4])
        cache.k.copy_(keys)
        cache.v.copy_(values)
        FS.write_new_kv(cache, positions, k_new, v_new)
        monkeypatch.setattr(torch.ops.sparkstudio, "decode_attention", fake_op)
        decoder.attention = "kernel"
        got, none_k, none_v = decoder(keys, values, tokens, positions, length)
    assert none_k is None and none_v is None and len(calls) == len(decoder.layers)
    assert calls[1][3].data_ptr() == keys[1].data_ptr() and calls[0][6] is positions
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(keys, cache.k, atol=1e-6) and torch.allclose(values, cache.v, atol=1e-6)


def test_attention_form_setting_and_cpu_fallback(spark_dir, monkeypatch):
    monkeypatch.delenv(ATTENTION_ENV, raising=False)
    assert attention_from_env() == DEFAULT_ATTENTION
    monkeypatch.setenv(ATTENTION_ENV, "Kernel")
    assert attention_from_env() == "kernel"
    monkeypatch.setenv(ATTENTION_ENV, "flash")
    with pytest.raises(ValueError, match=ATTENTION_ENV):
        attention_from_env()
    decoder = FS.FusedDecoder(load_llm(spark_dir / "LLM"), 64)
    logs = []
    chosen = FS.choose_attention(decoder, torch.device("cpu"), "kernel", logs.append)
    assert chosen["attention"] == decoder.attention == "matmul" and "CUDA" in chosen["attention_note"]
    assert logs and "matrix products" in logs[0]
    assert FS.choose_attention(decoder, torch.device("cpu"), "matmul") == {"attention": "matmul",
                                                                          "attention_wanted": "matmul"}


def test_the_op_rejects_shapes_it_cannot_take():
    q, k, v, keys, values, cached, positions = _inputs()
    with pytest.raises(ValueError, match="KV dividing H"):
        AK._check(q[:, :13], k, v, keys, values, cached, positions)
    with pytest.raises(ValueError, match="cache"):
        AK._check(q, k, v, keys[:2], values[:2], cached, positions)
    with pytest.raises(ValueError, match="at most"):
        AK._check(torch.zeros(3, 34, 64), k, v, keys, values, cached, positions)
    with pytest.raises(ValueError, match="positions"):
        AK._check(q, k, v, keys, values, torch.ones(3, 300, dtype=torch.bool), positions)
    with pytest.raises(ValueError, match="positions"):
        AK._check(q, k, v, keys, values, cached, positions[:2])


_INTERPRETER_CHECK = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from tests.test_spark_attention_kernel import _inputs
from tts.spark import attention_kernel as AK
worst = 0.0
for kw in (dict(), dict(length=64, rows=2), dict(length=1, rows=1), dict(heads=4, kv=2, d=16, length=130, rows=4),
           dict(heads=4, kv=2, d=8, length=70, rows=3),
           dict(length=200, positions=200, rows=1),
           dict(heads=4, kv=2, d=16, length=2200, positions=2300, rows=2)):
    q, k, v, keys, values, cached, positions = _inputs(**kw)
    scale = q.shape[-1] ** -0.5
    k2, v2 = keys.clone(), values.clone()
    out = AK.decode_attention(q, k, v, keys, values, cached, positions, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    worst = max(worst, float((out - AK.reference(q, k, v, k2, v2, cached, positions, scale)).abs().max()))
    assert torch.equal(keys, k2) and torch.equal(values, v2), "the kernel wrote another cache"
print(worst)
"""


def test_kernels_under_the_triton_interpreter():
    """The two kernels equal the reference (float32, the cache they write included) under Triton's CPU interpreter, where Triton
    is installed (CUDA builds of torch bring it; the CPU CI does not install it, ~1 GB): full,
    partial, single-key and empty rows, a length that is not a multiple of the split, a length
    equal to the cache's, one past what `combine` loads at once (COMBINE_SPLITS splits), and other
    head shapes (a head width of 8, padded to tl.dot's 16, is the
    tests' demo LLM's). A child process: the interpreter must be chosen
    before Triton is first imported."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", _INTERPRETER_CHECK, str(ROOT)], env=env, capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.strip().splitlines()[-1]) <= 1e-5


_COMPILED_CHECK = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from transformers import Qwen2Config, Qwen2ForCausalLM
from tts.spark import fast_step as FS
from tts.spark.demo import DEMO_LLM
from tts.spark.llm import new_cache
torch.manual_seed(0)
cfg = {k: v for k, v in DEMO_LLM.items() if k in Qwen2Config().to_dict()}
llm = Qwen2ForCausalLM(Qwen2Config(**cfg, vocab_size=400)).eval()
decoder = FS.FusedDecoder(llm, 64)
cache = new_cache(llm, 4, 64)
cache.k.normal_()
cache.v.normal_()
ref_cache = new_cache(llm, 4, 64)
compiled, stats = FS.compile_decoder(decoder, backend=sys.argv[2])
assert stats["compiled"], stats
worst = 0.0
with torch.no_grad():
    for rows, length in ((4, 64), (3, 48), (1, 16)):
        tokens = torch.arange(rows) + 300
        positions = torch.arange(rows) * 3 + 5
        ref_cache.k.copy_(cache.k)
        ref_cache.v.copy_(cache.v)
        decoder.attention = "matmul"
        ref, k_new, v_new = decoder(ref_cache.k, ref_cache.v, tokens, positions, length)
        FS.write_new_kv(ref_cache, positions, k_new, v_new)
        decoder.attention = "kernel"
        out, none_k, _ = compiled(cache.k, cache.v, tokens, positions, length)
        assert none_k is None
        worst = max(worst, float((out - ref).abs().max()), float((cache.k - ref_cache.k).abs().max()),
                    float((cache.v - ref_cache.v).abs().max()))
print(worst)
"""


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_compiled_decoder_with_the_kernel_form_under_the_triton_interpreter(backend, tmp_path):
    """The fused decoder compiled (fullgraph, unbacked rows where torch allows) with the kernel form
    traces and runs the op and equals the uncompiled matrix-product form in every bucket (float32,
    Triton's CPU interpreter; inductor lowers the rest to C++ here, to Triton on the GPU)."""
    pytest.importorskip("triton")
    if backend == "inductor" and not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("inductor's CPU code needs a C++ compiler")
    env = dict(os.environ, TRITON_INTERPRET="1", STUDIO_DATA_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", _COMPILED_CHECK, str(ROOT), backend], env=env, capture_output=True,
                          text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.strip().splitlines()[-1]) <= 1e-4
