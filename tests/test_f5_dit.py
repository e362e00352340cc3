"""F5 DiT, sampler and config on tiny CPU configs (no real weights)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from tts.f5.checkpoint import DEMO_CONFIG, load_dit, write_demo_dit
from tts.f5.config import MODEL_CONFIGS, F5Config, load_config
from tts.f5.dit import DiT
from tts.f5.sampler import EPSS_TIMESTEPS, make_noise, min_total_frames, sample, timesteps

TOL = 1e-4  # DESIGN.md "same audio" tolerance (CPU, fp32)
V0_DEMO = replace(DEMO_CONFIG, text_mask_padding=False, pe_attn_head=1)

# (reference frames, text tokens, total frames, seed): three different lengths
ITEMS = [(20, 25, 61, 7), (33, 70, 118, 8), (48, 40, 90, 9)]


@pytest.fixture(scope="module", params=[DEMO_CONFIG, V0_DEMO], ids=["v1", "v0"])
def dit(request, tmp_path_factory):
    cfg = request.param
    path = write_demo_dit(tmp_path_factory.mktemp("f5"), cfg, seed=0)
    return load_dit(path, cfg, "cpu", torch.float32)


def _items(mel_dim: int):
    gen = torch.Generator().manual_seed(123)
    return [(torch.randn(ref, mel_dim, generator=gen), torch.randint(0, 90, (n,), generator=gen), ref, total, seed)
            for ref, n, total, seed in ITEMS]


def _run(dit, items, nfe=8, cfg_strength=2.0, sway=-1.0):
    mel_dim = dit.cfg.mel_dim
    b, frames = len(items), max(it[3] for it in items)
    cond, noise = torch.zeros(b, frames, mel_dim), torch.zeros(b, frames, mel_dim)
    ids = torch.full((b, max(len(it[1]) for it in items)), -1, dtype=torch.long)
    for i, (mel, text, ref, total, seed) in enumerate(items):
        cond[i, :ref], ids[i, : len(text)] = mel, text
        noise[i, :total] = make_noise(seed, total, mel_dim)
    return sample(dit, cond, ids, torch.tensor([it[2] for it in items]), torch.tensor([it[3] for it in items]),
                  noise, nfe, cfg_strength, sway)


# -- timesteps ------------------------------------------------------------------------------------
# Expected values from upstream's formula (model/cfm.py CFM.sample + model/utils.py get_epss_timesteps):
# t = EPSS indices / 32 (nfe 16) or linspace(0, 1, nfe + 1); sway s: t + s * (cos(pi/2 t) - 1 + t),
# which for s = -1 is 1 - cos(pi/2 t). Computed with Python's math module.

def test_timesteps_nfe16_epss_sway():
    t = timesteps(16, -1.0)
    assert t.shape == (17,) and t.dtype == torch.float32
    expected = {0: 0.0, 1: 0.001204543794827595, 2: 0.004815273327803071, 8: 0.07612046748871326,
                9: 0.11807873565164495, 12: 0.2928932188134524, 14: 0.6173165676349102, 16: 1.0}
    for i, v in expected.items():
        assert t[i].item() == pytest.approx(v, abs=1e-6), i


def test_timesteps_nfe32_linspace_sway():
    t = timesteps(32, -1.0)
    assert t.shape == (33,)
    expected = {1: 0.001204543794827595, 2: 0.004815273327803071, 16: 0.2928932188134524,
                24: 0.6173165676349102, 32: 1.0}
    for i, v in expected.items():
        assert t[i].item() == pytest.approx(v, abs=1e-6), i


def test_timesteps_without_sway_and_without_epss():
    assert torch.allclose(timesteps(16, None), torch.tensor(EPSS_TIMESTEPS[16], dtype=torch.float32) / 32)
    assert timesteps(16, None)[9].item() == pytest.approx(10 / 32)
    assert torch.allclose(timesteps(16, None, use_epss=False), torch.linspace(0, 1, 17))
    assert torch.allclose(timesteps(9, None), torch.linspace(0, 1, 10))  # 9 is not in the table
    s = 0.5
    assert timesteps(32, s)[8].item() == pytest.approx(0.25 + s * (math.cos(math.pi / 8) - 1 + 0.25), abs=1e-6)
    with pytest.raises(ValueError):
        timesteps(0, None)


# -- noise ----------------------------------------------------------------------------------------

def test_noise_is_a_function_of_the_seed_and_matches_upstream_cpu_draw():
    a, b = make_noise(5, 40), make_noise(5, 40)
    assert torch.equal(a, b) and a.shape == (40, 100)
    assert not torch.equal(a, make_noise(6, 40))
    with torch.random.fork_rng():
        torch.manual_seed(5)  # upstream CFM.sample: torch.manual_seed(seed); torch.randn(dur, 100)
        assert torch.equal(a, torch.randn(40, 100))
    assert make_noise(5, 40, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_min_total_frames():
    assert min_total_frames(50, 80) == 81
    assert min_total_frames(120, 80) == 121


# -- network --------------------------------------------------------------------------------------

def test_forward_shapes_and_uncond_differs(dit):
    b, t, mel = 2, 30, dit.cfg.mel_dim
    ids = torch.randint(0, 50, (b, 12))
    lens = torch.tensor([30, 22])
    tc, tu = dit.embed_text(ids, lens)
    assert tc.shape == tu.shape == (b, t, dit.cfg.text_dim)
    assert torch.all(tc[1, 22:] == 0) and torch.all(tu[1, 22:] == 0)
    mask = torch.arange(t)[None] < lens[:, None]
    x, cond = torch.randn(b, t, mel), torch.randn(b, t, mel)
    pc, pu = dit(x, cond, tc, tu, torch.tensor([0.3, 0.3]), mask)
    assert pc.shape == pu.shape == (b, t, mel)
    assert (pc - pu).abs().max() > 1e-3  # conditioning matters with demo weights


def test_embed_text_per_item_equals_solo(dit):
    items = [(torch.randint(0, 90, (n,)), total) for n, total in ((10, 40), (50, 70), (30, 25))]
    ids = torch.full((3, 50), -1, dtype=torch.long)
    for i, (text, _) in enumerate(items):
        ids[i, : len(text)] = text
    tc, tu = dit.embed_text(ids, torch.tensor([it[1] for it in items]))
    for i, (text, total) in enumerate(items):
        sc, su = dit.embed_text(text[None], torch.tensor([total]))
        assert (tc[i, :total] - sc[0]).abs().max() <= 1e-5
        assert (tu[i, :total] - su[0]).abs().max() <= 1e-5
        assert torch.all(tc[i, total:] == 0)


def test_packed_text_embedding_equals_the_padded_one(dit):
    """`DiT.embed_text_packed` on `pack_on_host`'s layout (items back to back, gaps between, the
    text cut at each item's frames) gives `embed_text`'s rows for every item, zeros in the gaps
    (v1: text positions kept; v0: all frames kept)."""
    from tts.f5.fast import pack_on_host

    items = _items(dit.cfg.mel_dim)
    texts = [ids.tolist() for _, ids, _, _, _ in items]
    lens = [total for *_, total, _ in items]
    frames = max(lens)
    padded = torch.full((len(items), max(len(t) for t in texts)), -1)
    for i, t in enumerate(texts):
        padded[i, : len(t)] = torch.tensor(t)
    with torch.no_grad():
        cond, uncond = dit.embed_text(padded, torch.tensor(lens), frames=frames)
        host = pack_on_host(texts, [r for _, _, r, _, _ in items], lens, [torch.zeros(t, dit.cfg.mel_dim) for t in lens],
                            4, 512, dit.cfg.text_mask_padding)
        pc, pu = dit.embed_text_packed(host.ids, host.valid, host.keep, host.pos, host.seg, 4)
    for i, (start, t) in enumerate(zip(host.starts, lens)):
        assert (pc[start: start + t] - cond[i, :t]).abs().max() <= TOL
        assert (pu[start: start + t] - uncond[i, :t]).abs().max() <= TOL
    assert pc[~host.valid].abs().max() == 0 and pu[~host.valid].abs().max() == 0
    assert host.ref.sum() == sum(r for _, _, r, _, _ in items) and host.cu_seqlens[-1] == 2 * 512


def test_batch_independence(dit):
    """Each item of a mixed-length batch equals its solo run (upstream issues #1039 / #1179)."""
    items = _items(dit.cfg.mel_dim)
    batched = _run(dit, items)
    for i, (mel, _, ref, total, _) in enumerate(items):
        solo = _run(dit, [items[i]])[0]
        assert solo.shape[0] == total
        assert (batched[i, :total] - solo).abs().max().item() <= TOL, f"item {i}"
        assert torch.equal(batched[i, :ref], mel)  # reference region is the reference mel
        assert torch.all(batched[i, total:] == 0)  # frames past the item are zero
        assert batched[i, ref:total].std() > 0.1  # not trivially zero


def test_sample_is_deterministic_and_uses_the_text(dit):
    items = _items(dit.cfg.mel_dim)[:1]
    a, b = _run(dit, items, nfe=4), _run(dit, items, nfe=4)
    assert torch.equal(a, b)
    mel, text, ref, total, seed = items[0]
    other = _run(dit, [(mel, (text + 1) % 90, ref, total, seed)], nfe=4)
    assert (other - a).abs().max() > 1e-3


def test_ode_step_reaches_data_for_constant_velocity():
    """With cfg 0 and a network predicting v = 1 everywhere, x(1) = x(0) + 1 whatever the grid."""

    class Const(torch.nn.Module):
        cfg = DEMO_CONFIG

        def embed_text(self, ids, lens, frames=None):
            z = torch.zeros(ids.shape[0], frames, 4)
            return z, z

        def forward(self, x, cond, tc, tu, time, mask):
            return torch.ones_like(x), torch.zeros_like(x)

    noise = torch.randn(1, 10, 100)
    out = sample(Const(), torch.zeros(1, 10, 100), torch.zeros(1, 3, dtype=torch.long), torch.tensor([0]),
                 torch.tensor([10]), noise, 16, 0.0, -1.0)
    assert torch.allclose(out, noise + 1, atol=1e-5)
    out = sample(Const(), torch.zeros(1, 10, 100), torch.zeros(1, 3, dtype=torch.long), torch.tensor([0]),
                 torch.tensor([10]), noise, 7, 2.0, None)  # v = 1 + (1 - 0) * 2 = 3
    assert torch.allclose(out, noise + 3, atol=1e-5)


# -- config ---------------------------------------------------------------------------------------

def test_model_configs_match_upstream_yaml_values():
    v1, v0 = MODEL_CONFIGS["F5TTS_v1_Base"], MODEL_CONFIGS["F5TTS_Base"]
    assert (v1.dim, v1.depth, v1.heads, v1.ff_mult, v1.text_dim, v1.conv_layers) == (1024, 22, 16, 2, 512, 4)
    assert v1.text_mask_padding and v1.pe_attn_head is None and v1.qk_norm is None
    assert not v0.text_mask_padding and v0.pe_attn_head == 1
    for small in ("F5TTS_v1_Small", "F5TTS_Small"):
        s = MODEL_CONFIGS[small]
        assert (s.dim, s.depth, s.heads) == (768, 18, 12)


def test_config_round_trip_and_errors(tmp_path):
    cfg = replace(DEMO_CONFIG, qk_norm="rms_norm")
    assert F5Config.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown F5Config keys"):
        F5Config.from_dict({**cfg.to_dict(), "dropout": 0.1})
    with pytest.raises(ValueError, match="F5TTS_v1_Base"):
        load_config("F5TTS_v9", None, None)
    assert load_config("F5TTS_v1_Base", tmp_path, 100).text_num_embeds == 100
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    got = load_config("F5TTS_v1_Base", tmp_path, 77)
    assert got == replace(cfg, text_num_embeds=77)  # config.json wins, the vocab size overrides
    (tmp_path / "config.json").write_text(json.dumps({**cfg.to_dict(), "bogus": 1}))
    with pytest.raises(ValueError, match="bogus"):
        load_config("F5TTS_v1_Base", tmp_path, None)


def test_full_size_dit_builds_on_meta():
    with torch.device("meta"):
        model = DiT(MODEL_CONFIGS["F5TTS_v1_Base"])
    n = sum(p.numel() for p in model.parameters())
    assert 330e6 < n < 345e6  # about 337 M (UPSTREAM.md)


def test_fused_qkv_gives_the_same_velocity_and_state_dict():
    cfg = F5Config(dim=64, depth=2, heads=4, dim_head=16, text_dim=32, conv_layers=1, text_num_embeds=60)
    torch.manual_seed(3)
    plain = DiT(cfg).eval()
    fused = DiT(cfg).eval()
    fused.load_state_dict(plain.state_dict())
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    fused.fuse_qkv().fuse_qkv()  # idempotent
    after = fused.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(2, 30, 100, generator=g), torch.randn(2, 30, 100, generator=g)
    ids = torch.randint(0, 60, (2, 12), generator=g)
    lens = torch.tensor([30, 22])
    mask = torch.arange(30)[None, :] < lens[:, None]
    with torch.no_grad():
        tc, tu = plain.embed_text(ids, lens)
        ref = plain(x, cond, tc, tu, torch.tensor([0.3, 0.3]), mask)
        out = fused(x, cond, tc, tu, torch.tensor([0.3, 0.3]), mask)
    assert torch.allclose(out[0], ref[0], atol=1e-5) and torch.allclose(out[1], ref[1], atol=1e-5)
    assert fused.transformer_blocks[0].attn.to_k.weight.data_ptr() != plain.transformer_blocks[0].attn.to_k.weight.data_ptr()


def test_grouped_conv_as_matmul_equals_the_convolution():
    torch.manual_seed(0)
    from tts.f5.dit import ConvPositionEmbedding, grouped_conv_as_matmul

    cpe = ConvPositionEmbedding(64)
    x = torch.randn(3, 50, 64)
    for conv in (cpe.conv1d[0], cpe.conv1d[2]):
        ref = conv(x.transpose(1, 2)).transpose(1, 2)
        assert torch.allclose(grouped_conv_as_matmul(x, conv), ref, atol=1e-5)
    mask = torch.arange(50)[None, :] < torch.tensor([50, 31, 7])[:, None]
    ref = cpe(x, mask)
    cpe.use_form("matmul")
    assert cpe.form == "matmul"
    out = cpe(x, mask)
    assert torch.allclose(out, ref, atol=1e-5) and not out[1, 31:].any()
    with pytest.raises(ValueError, match="form"):
        cpe.use_form("fft")


def test_conv_kernel_weight_layout():
    """The Triton kernel reads w[g, j, c, o] = conv.weight[g * Og + o, c, j] (it runs on CUDA only;
    its arithmetic against the convolution is a gpu test in tests/test_f5_fast.py)."""
    from tts.f5 import conv_kernel
    from tts.f5.dit import ConvPositionEmbedding

    conv = ConvPositionEmbedding(64).conv1d[0]
    w = conv_kernel.kernel_weights(conv)
    g, k, cg, og = w.shape
    assert (g, k, cg, og) == (conv.groups, 31, 64 // conv.groups, 64 // conv.groups) and w.is_contiguous()
    for gi, j, c, o in [(0, 0, 0, 0), (1, 5, 2, 3), (g - 1, k - 1, cg - 1, og - 1)]:
        assert w[gi, j, c, o] == conv.weight[gi * og + o, c, j]
    if not torch.cuda.is_available():
        assert not conv_kernel.available()


_INTERPRETER_CHECK = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from tts.f5 import conv_kernel
from tts.f5.dit import ConvPositionEmbedding

torch.manual_seed(0)
cpe = ConvPositionEmbedding(256)  # 16 groups of 16 channels: the smallest tile tl.dot takes
worst = 0.0
with torch.no_grad():
    for shape in ((1, 150), (2, 70)):
        x = torch.randn(*shape, 256)
        for conv in (cpe.conv1d[0], cpe.conv1d[2]):
            ref = conv(x.transpose(1, 2)).transpose(1, 2)
            out = conv_kernel.grouped_conv(x, conv_kernel.kernel_weights(conv), conv.bias)
            assert out.shape == ref.shape
            worst = max(worst, float((out - ref).abs().max()))
        mask = torch.arange(shape[1])[None, :] < torch.tensor([shape[1] - 20, 33][:shape[0]])[:, None]
        ref = cpe(x, mask)
        cpe.use_form("kernel")
        out = cpe(x, mask)
        cpe.use_form("conv")
        assert not out[~mask].any()
        worst = max(worst, float((out - ref).abs().max()))
print(worst)
"""


def test_conv_kernel_arithmetic_under_the_triton_interpreter():
    """The Triton position convolution equals nn.Conv1d, run by Triton's CPU interpreter where
    Triton is installed (CUDA builds of torch bring it; the CPU CI does not install it, ~1 GB).
    A child process: the interpreter must be chosen before Triton is first imported. The same
    check on the GPU is tests/test_f5_fast.py::test_grouped_conv_kernel_equals_the_convolution."""
    assert _under_triton_interpreter(_INTERPRETER_CHECK) <= 1e-5


def _under_triton_interpreter(script: str) -> float:
    """Run `script` (argv[1]: the project root) in a child process under Triton's CPU interpreter
    (it must be chosen before Triton is first imported); its last printed line as a float. Skips
    where Triton is not installed."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = str(Path(__file__).resolve().parent.parent)
    done = subprocess.run([sys.executable, "-c", script, root], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return float(done.stdout.strip().splitlines()[-1])


_ATTENTION_INTERPRETER_CHECK = r"""
import itertools, sys
sys.path.insert(0, sys.argv[1])
import torch
from tts.f5 import attention_kernel as AK
from tts.f5.dit import packed_attention
torch.manual_seed(0)
worst = 0.0
# packed items with gaps; a lone item's rows (its padding a sequence, one of them empty); one frame
for lens, heads, dim_head in (([37, 5, 37, 5], 2, 16), ([70, 16, 100, 16, 70, 16, 100, 16], 3, 32),
                              ([64, 0, 64, 0], 2, 16), ([1, 130], 2, 16)):
    n = sum(lens)
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32)
    q, k, v = torch.randn(n, 3, heads, dim_head).unbind(1)  # strided views of a fused projection
    ref = packed_attention(q, k, v, cu, max(lens))
    for config in AK.CONFIGS:
        out = AK.packed_attention_triton(q, k, v, cu, config)
        assert out.shape == q.shape and out.is_contiguous()
        worst = max(worst, float((out - ref).abs().max()))
print(worst)
"""


def test_attention_kernel_arithmetic_under_the_triton_interpreter():
    """The Triton packed attention (`tts.f5.attention_kernel`) equals the masked attention of
    `packed_attention` in every tile config, under Triton's CPU interpreter where Triton is
    installed (a child process, as for the convolution above). On CUDA:
    tests/test_f5_fast.py::test_triton_packed_attention_equals_per_sequence_sdpa."""
    assert _under_triton_interpreter(_ATTENTION_INTERPRETER_CHECK) <= 1e-5
