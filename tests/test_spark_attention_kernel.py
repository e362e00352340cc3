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
from tts.spark.llm import load_llm

ROOT = Path(__file__).resolve().parent.parent


def _inputs(rows=3, heads=14, kv=2, d=64, slots=5, positions=200, length=150, seed=0, dtype=torch.float32):
    """q, k_new, v_new as views of one [R, (H + 2 KV) D] projection (as the step has them), a cache
    with more slots and positions than looked at, and a mask with a full row, a partial one and an
    empty one."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(rows, (heads + 2 * kv) * d, generator=g).to(dtype)
    q = qkv[:, : heads * d].view(rows, heads, d)
    k = qkv[:, heads * d: (heads + kv) * d].view(rows, kv, d)
    v = qkv[:, (heads + kv) * d:].view(rows, kv, d)
    keys = torch.randn(slots, kv, positions, d, generator=g).to(dtype)
    values = torch.randn(slots, kv, positions, d, generator=g).to(dtype)
    counts = torch.tensor([length, length // 3 + 1, 0, 7][:rows])
    cached = torch.arange(length).view(1, -1) < counts.view(-1, 1)
    return q, k, v, keys, values, cached


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
    including a row with no cached key (only its own new key: output = v_new)."""
    q, k, v, keys, values, cached = _inputs()
    ref = AK.reference(q, k, v, keys, values, cached, q.shape[-1] ** -0.5)
    assert torch.allclose(ref, _matmul_form(q, k, v, keys, values, cached), atol=1e-5)
    assert torch.allclose(ref[2], v[2].repeat_interleave(7, dim=0), atol=1e-6)


def test_decode_layer_kernel_form_calls_the_op_with_the_steps_tensors(spark_dir, monkeypatch):
    """decode_layer's "kernel" form hands the op the roped q, the new k and v, the whole cache and
    the mask; with the op swapped for the reference, the layer equals the matmul form (float32)."""
    llm = load_llm(spark_dir / "LLM")
    decoder = FS.FusedDecoder(llm, 64)
    s, ly = decoder.shape, decoder.layers[0]
    g = torch.Generator().manual_seed(3)
    rows, length = 3, 40
    h = torch.randn(rows, s.hidden, generator=g)
    ks = torch.randn(rows + 2, s.n_kv_heads, 70, s.head_dim, generator=g)
    vs = torch.randn(rows + 2, s.n_kv_heads, 70, s.head_dim, generator=g)
    positions = torch.tensor([40, 13, 0])
    cos, sin = decoder.cos[positions], decoder.sin[positions]
    cached = torch.arange(length).view(1, -1) < positions.view(-1, 1)
    calls = []

    def fake_op(*args):
        calls.append(args)
        return AK.reference(*args)

    monkeypatch.setattr(torch.ops.sparkstudio, "decode_attention", fake_op)
    args = (h, ks, vs, cos, sin, cached, ly.ln1, ly.wqkv, ly.bqkv, ly.wo, ly.ln2, ly.wgu, ly.wd, decoder.eps,
            s.n_heads, s.n_kv_heads)
    with torch.no_grad():
        want = FS.decode_layer(*args, "matmul")
        got = FS.decode_layer(*args, "kernel")
    assert len(calls) == 1 and calls[0][3] is ks and calls[0][5] is cached
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5)


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
    q, k, v, keys, values, cached = _inputs()
    with pytest.raises(ValueError, match="KV dividing H"):
        AK._check(q[:, :13], k, v, keys, values, cached)
    with pytest.raises(ValueError, match="cache"):
        AK._check(q, k, v, keys[:2], values[:2], cached)
    with pytest.raises(ValueError, match="at most"):
        AK._check(torch.zeros(3, 34, 64), k, v, keys, values, cached)
    with pytest.raises(ValueError, match="positions"):
        AK._check(q, k, v, keys, values, torch.ones(3, 300, dtype=torch.bool))


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
    q, k, v, keys, values, cached = _inputs(**kw)
    scale = q.shape[-1] ** -0.5
    out = AK.decode_attention(q, k, v, keys, values, cached, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    worst = max(worst, float((out - AK.reference(q, k, v, keys, values, cached, scale)).abs().max()))
print(worst)
"""


def test_kernels_under_the_triton_interpreter():
    """The two kernels equal the reference (float32) under Triton's CPU interpreter, where Triton
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
compiled, stats = FS.compile_decoder(decoder, backend=sys.argv[2])
assert stats["compiled"], stats
worst = 0.0
with torch.no_grad():
    for rows, length in ((4, 64), (3, 48), (1, 16)):
        tokens = torch.arange(rows) + 300
        positions = torch.arange(rows) * 3 + 5
        decoder.attention = "matmul"
        ref = decoder(cache.k, cache.v, tokens, positions, length)
        decoder.attention = "kernel"
        out = compiled(cache.k, cache.v, tokens, positions, length)
        worst = max(worst, max(float((a - b).abs().max()) for a, b in zip(out, ref)))
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
