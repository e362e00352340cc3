"""tts/f5/fast.py: bucketing, padding invariance, the compile plumbing, batched Vocos; CUDA graphs (gpu).

CPU tests run the fast sampler's bucketed static-buffer path without graphs (mode "eager") and the
compile path with torch.compile's cheap "eager" backend: everything but the CUDA graph capture.
Tolerances: CPU float32 "same audio" = max abs difference <= 1e-4 (DESIGN.md). GPU: the graph path
in float32 against the eager sampler, relative L2 <= 1e-4 (only summation order differs); in
bfloat16 (compiled blocks, graphs) relative L2 <= 3e-2 against the eager bf16 sampler (an 8-bit
mantissa, different fusions and kernels, 8 ODE steps).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tts.f5 import fast as F
from tts.f5.checkpoint import DEMO_CONFIG, load_dit, write_demo_dit
from tts.f5.sampler import make_noise, sample, timesteps

VOCAB = 50
SAME_AUDIO = 1e-4


def tiny_dit(tmp_path, depth: int = 2, dtype=torch.float32, device="cpu", **cfg_changes):
    cfg = replace(DEMO_CONFIG, text_num_embeds=VOCAB, depth=depth, **cfg_changes)
    path = write_demo_dit(tmp_path / f"dit{depth}", cfg, seed=0)
    return load_dit(path, cfg, device, dtype)


def batch(lens, refs, frames=None, n_ids=20, seed=0, device="cpu"):
    """A mixed-length batch as the pipeline builds it: noise zero past each length, cond past each reference."""
    gen = torch.Generator().manual_seed(seed)
    frames = frames or max(lens)
    lens_t, refs_t = torch.tensor(lens), torch.tensor(refs)
    noise = torch.zeros(len(lens), frames, 100)
    for i, n in enumerate(lens):
        noise[i, :n] = make_noise(seed + i, n)
    cond = torch.randn(len(lens), frames, 100, generator=gen)
    cond[torch.arange(frames)[None, :] >= refs_t[:, None]] = 0
    ids = torch.randint(0, VOCAB, (len(lens), n_ids), generator=gen)
    ids[-1, n_ids // 2:] = -1  # the last item has a shorter text
    return [t.to(device) for t in (cond, ids, refs_t, lens_t, noise)]


def small_options(**kw):
    base = dict(mode="eager", batch_buckets=(1, 2, 4), length_buckets=(64, 128, 256, 384), self_check=False)
    base.update(kw)
    return F.FastOptions(**base)


# -- bucketing and options -------------------------------------------------------------------------

def test_bucket_for():
    assert F.bucket_for(1, (1, 2, 4, 8)) == 1
    assert F.bucket_for(3, (1, 2, 4, 8)) == 4
    assert F.bucket_for(8, (1, 2, 4, 8)) == 8
    assert F.bucket_for(9, (1, 2, 4, 8)) is None
    assert F.bucket_for(938, F.DEFAULT_LENGTH_BUCKETS) == 960
    assert F.bucket_for(2049, F.DEFAULT_LENGTH_BUCKETS) == 2304


def test_default_length_buckets_cover_the_pipeline_range():
    b = F.DEFAULT_LENGTH_BUCKETS
    assert b[0] == 128 and list(b) == sorted(set(b))
    assert b[-1] >= 8 * (F.MAX_ITEM_FRAMES + F.ITEM_GAP) - F.ITEM_GAP  # 8 items of the largest size
    assert all(t % 64 == 0 for t in b)
    # rounding waste below 2048 frames is at most one 64-frame step, above at most 1/8
    assert max(nxt - cur for cur, nxt in zip(b, b[1:]) if nxt <= 2048) == 64
    assert all((nxt - cur) / cur <= 1 / 8 for cur, nxt in zip(b, b[1:]) if cur >= 2048)


def test_compile_mode_from_the_environment():
    assert F.fast_options_from_env(env={}).compile_mode is None
    assert F.fast_options_from_env(env={F.COMPILE_MODE_ENV: "default"}).compile_mode is None
    opts = F.fast_options_from_env(env={F.COMPILE_MODE_ENV: "max-autotune-no-cudagraphs"})
    assert opts.compile_mode == "max-autotune-no-cudagraphs"
    with pytest.raises(ValueError, match=F.COMPILE_MODE_ENV):
        F.fast_options_from_env(env={F.COMPILE_MODE_ENV: "max-autotune"})  # its own CUDA graphs clash with ours


def test_large_batches_take_the_coarser_length_buckets():
    """Batches of up to FINE_LENGTH_MAX_BATCH items round to 64-frame steps below 2048, larger ones
    to 128-frame steps; both end at the same largest bucket, and every bucket a batch can land in
    is one that warm-up captures."""
    opts = F.fast_options_from_env(env={})
    assert opts.lengths_for(2) == F.DEFAULT_LENGTH_BUCKETS
    assert opts.lengths_for(1) == F.ONE_ITEM_LENGTH_BUCKETS  # a lone item: 32-frame steps over 512-1536
    assert set(F.DEFAULT_LENGTH_BUCKETS) < set(opts.lengths_for(1)) and 544 in opts.lengths_for(1)
    with pytest.raises(ValueError, match="one_item_length_buckets must end where"):
        F.FastOptions(length_buckets=(128, 256), one_item_length_buckets=(128,))
    assert opts.lengths_for(4) == F.DEFAULT_LARGE_BATCH_LENGTH_BUCKETS
    assert all(n % 128 == 0 for n in opts.lengths_for(8) if n < 2048)
    assert max(opts.lengths_for(8)) == max(opts.lengths_for(1))
    with pytest.raises(ValueError, match="must end where"):
        F.FastOptions(length_buckets=(128, 256), large_batch_length_buckets=(128,))
    assert F.FastOptions(length_buckets=(64, 128)).lengths_for(8) == (64, 128)  # no large-batch buckets: the same
    fs = object.__new__(F.FastSampler)  # the bucket arithmetic reads the options only
    fs.options = opts
    captured = set(fs.buckets())
    for items, packed in [(2, 1246), (3, 1246), (4, 1900), (8, 5000), (1, 479), (1, 767)]:
        assert fs.bucket(items, packed) in captured
    assert fs.bucket(2, 1246) == (2, 1280) and fs.bucket(1, 1190) == (1, 1216) and fs.bucket(3, 1190) == (4, 1280)


def test_packed_layout():
    """Items back to back with ITEM_GAP frames after each; per half: item, gap, ..., the last gap to
    the half's end; unused item slots are empty sequences."""
    assert F.ITEM_GAP >= 31 // 2  # the position convolution's half width (kernel 31)
    assert F.packed_length([5, 3]) == 8 + 2 * F.ITEM_GAP
    g = F.ITEM_GAP
    assert F.packed_cu_seqlens([5, 3], 2, 40) == [0, 5, 5 + g, 8 + g, 40, 45, 45 + g, 48 + g, 80]
    assert F.packed_cu_seqlens([5], 2, 40) == [0, 5, 5 + g, 5 + g, 40, 45, 45 + g, 45 + g, 80]


def test_capture_spread():
    assert F.capture_spread([]) == {}
    spread = F.capture_spread([(0.02, "1x128"), (0.05, "8x6144"), (0.03, "2x256")])
    assert spread == {"capture_ms_p50": 30.0, "capture_ms_max": 50.0, "capture_slowest": "8x6144"}


def test_buckets_cover_every_batch_once():
    fs_opts = small_options(length_buckets=(64, 128, 256, 384, 512))
    fs = F.FastSampler.__new__(F.FastSampler)
    fs.options = fs_opts
    buckets = fs.buckets()
    assert len(buckets) == len(set(buckets))
    assert (1, 64) in buckets and (4, 512) in buckets
    assert all(n >= b * (F.ITEM_GAP + 1) for b, n in buckets)


def test_batch_buckets_for():
    assert F.batch_buckets_for(8) == (1, 2, 4, 8)
    assert F.batch_buckets_for(6) == (1, 2, 4, 6)
    assert F.batch_buckets_for(1) == (1,)
    with pytest.raises(ValueError):
        F.batch_buckets_for(0)


def test_options_are_validated():
    with pytest.raises(ValueError, match="mode"):
        F.FastOptions(mode="turbo")
    with pytest.raises(ValueError, match="increasing"):
        F.FastOptions(length_buckets=(256, 128))
    with pytest.raises(ValueError, match="increasing"):
        F.FastOptions(batch_buckets=())


@pytest.mark.parametrize("value,mode", [("", "compile"), ("1", "compile"), ("auto", "compile"), ("0", "off"),
                                        ("off", "off"), ("graph", "graph"), ("EAGER", "eager"),
                                        ("compile", "compile")])
def test_options_from_env(value, mode):
    opts = F.fast_options_from_env(max_batch=4, env={F.FAST_ENV: value})
    assert opts.mode == mode and opts.batch_buckets == (1, 2, 4)


def test_options_from_env_rejects_unknown_values():
    with pytest.raises(ValueError, match=F.FAST_ENV):
        F.fast_options_from_env(env={F.FAST_ENV: "fastest"})


def test_fused_gelu_switch(tmp_path):
    """STUDIO_F5_FUSED_GELU picks the feed-forward form the fast path sets on CUDA; on the CPU the
    flag is ignored (ATen's CPU epilogue would apply the erf GELU, not upstream's tanh one)."""
    assert F.fast_options_from_env(env={}).fused_gelu
    assert not F.fast_options_from_env(env={F.FUSED_GELU_ENV: "0"}).fused_gelu
    with pytest.raises(ValueError, match=F.FUSED_GELU_ENV):
        F.fast_options_from_env(env={F.FUSED_GELU_ENV: "maybe"})
    dit = tiny_dit(tmp_path)
    x = torch.randn(2, 7, dit.cfg.dim)
    ff = dit.transformer_blocks[0].ff
    ref = ff(x)
    dit.fuse_gelu()
    assert all(b.ff.fused_gelu for b in dit.transformer_blocks)
    cpe = dit.input_embed.conv_pos_embed
    cpe.use_form("matmul")
    with F.reference_forms(dit):
        assert not any(b.ff.fused_gelu for b in dit.transformer_blocks) and cpe.form == "conv"
    assert all(b.ff.fused_gelu for b in dit.transformer_blocks) and cpe.form == "matmul"  # restored
    cpe.use_form("conv")
    torch.testing.assert_close(ff(x), ref, rtol=0, atol=0)  # CPU: the two-op form regardless
    fs = F.FastSampler(dit.fuse_gelu(False), small_options())
    assert not fs.stats["fused_gelu"] and not ff.fused_gelu  # no graphs on the CPU: nothing switched


def test_capture_warmup_choice():
    """STUDIO_F5_CAPTURE_WARMUP: only the first (largest) bucket of each batch size in capture order
    warmed before its capture (default), or every bucket."""
    assert F.fast_options_from_env(env={}).capture_warmup == "first" == F.FastOptions().capture_warmup
    assert F.fast_options_from_env(env={F.CAPTURE_WARMUP_ENV: "All"}).capture_warmup == "all"
    with pytest.raises(ValueError, match=F.CAPTURE_WARMUP_ENV):
        F.fast_options_from_env(env={F.CAPTURE_WARMUP_ENV: "none"})
    with pytest.raises(ValueError, match="capture_warmup"):
        F.FastOptions(capture_warmup="some")
    order = [(8, 4096), (4, 4096), (8, 2048), (2, 4096), (1, 4096), (2, 128), (1, 64)]
    assert F.buckets_to_warm(order, "all") == set(order)
    assert F.buckets_to_warm(order, "first") == {(8, 4096), (4, 4096), (2, 4096), (1, 4096)}


def test_attention_choice_options_and_cpu():
    """STUDIO_F5_ATTENTION picks the packed-attention kernel; on the CPU nothing is chosen or timed
    (the masked path serves), whatever the setting."""
    from tts.f5 import dit as D

    assert F.fast_options_from_env(env={}).attention == "auto"
    assert F.fast_options_from_env(env={F.ATTENTION_ENV: "CUDNN"}).attention == "cudnn"
    with pytest.raises(ValueError, match=F.ATTENTION_ENV):
        F.fast_options_from_env(env={F.ATTENTION_ENV: "fa3"})
    with pytest.raises(ValueError, match="attention"):
        F.FastOptions(attention="fa3")
    assert F.fast_options_from_env(env={F.CONV_ENV: "matmul"}).conv == "matmul"
    with pytest.raises(ValueError, match=F.CONV_ENV):
        F.fast_options_from_env(env={F.CONV_ENV: "fft"})
    before = dict(D.PACKED_ATTENTION)
    assert F.choose_packed_attention(4, 16, torch.bfloat16, torch.device("cpu")) == {"chosen": before["backend"]}
    assert D.PACKED_ATTENTION == before
    q, k, v = (torch.randn(40, 2, 8) for _ in range(3))
    cu = torch.tensor([0, 12, 20, 33, 40], dtype=torch.int32)
    D.PACKED_ATTENTION["backend"] = "cudnn"
    try:  # CPU tensors take the masked path under either setting
        out = D.packed_attention(q, k, v, cu, 13)
    finally:
        D.PACKED_ATTENTION.update(before)
    torch.testing.assert_close(out, D.packed_attention(q, k, v, cu, 13))


def test_graph_mode_needs_cuda(tmp_path):
    dit = tiny_dit(tmp_path)
    with pytest.raises(ValueError, match="CUDA"):
        F.FastSampler(dit, small_options(mode="graph"))
    with pytest.raises(ValueError, match="off"):
        F.FastSampler(dit, small_options(mode="off"))


def test_static_views_share_one_storage(tmp_path):
    buf = F.StaticBuffers(4, 256, 100, 32, torch.float32, torch.device("cpu"), dim_head=16)
    a, b = buf.views(1, 64), buf.views(4, 256)
    for name in ("x", "cond", "text_cond", "text_uncond", "valid", "pos", "cu_seqlens"):
        va, vb = getattr(a, name), getattr(b, name)
        assert va.is_contiguous() and vb.is_contiguous()
        assert va.data_ptr() == vb.data_ptr()  # a graph's addresses are valid for every bucket
    assert a.x.shape == (64, 100) and b.text_cond.shape == (256, 32) and b.valid.shape == (256,)
    assert a.cu_seqlens.shape == (5,) and b.cu_seqlens.shape == (17,)
    with pytest.raises(ValueError, match="exceeds"):
        buf.views(8, 64)


@pytest.mark.parametrize("nfe,sway", [(16, -1.0), (32, -1.0), (7, None), (9, 0.5)])
def test_step_table_matches_the_sampler_grid(nfe, sway):
    t = timesteps(nfe, sway)
    table = F.step_table(nfe, sway, True, torch.device("cpu"))
    assert table.shape == (nfe, 2) and table.dtype == torch.float32
    assert torch.equal(table[:, 0], t[:-1]) and torch.equal(table[:, 1], t[1:] - t[:-1])


# -- padding to a bucket changes nothing -----------------------------------------------------------

def test_bucketed_path_equals_the_eager_sampler(tmp_path):
    """Mixed lengths, padded to bucket (4, 128): every item equals the plain sampler's result."""
    dit = tiny_dit(tmp_path)
    fs = F.FastSampler(dit, small_options())
    args = batch([100, 70, 33], [30, 20, 10])
    with torch.inference_mode():
        ref = sample(dit, *args, 8, 2.0, -1.0)
        out = fs.sample(dit, *args, 8, 2.0, -1.0)
    assert fs.bucket(3, F.packed_length([100, 70, 33])) == (4, 256)
    assert out.shape == ref.shape == (3, 100, 100) and out.dtype == torch.float32
    assert (out - ref).abs().max() <= SAME_AUDIO
    assert out[2, 33:].abs().max() == 0 and out[1, 70:].abs().max() == 0  # zeros past each length
    assert torch.equal(out[0, :30], args[0][0, :30])  # the reference region is the reference mel


def test_bucketed_item_equals_its_solo_run(tmp_path):
    dit = tiny_dit(tmp_path)
    fs = F.FastSampler(dit, small_options())
    cond, ids, refs, lens, noise = batch([120, 50], [40, 20])
    both = fs.sample(dit, cond, ids, refs, lens, noise, 6, 2.0, -1.0)
    solo = fs.sample(dit, cond[1:, :50], ids[1:], refs[1:], lens[1:], noise[1:, :50], 6, 2.0, -1.0)
    assert fs.bucket(2, F.packed_length([120, 50])) == (2, 256)
    assert fs.bucket(1, F.packed_length([50])) == (1, 64)  # different buckets (a lone item packs without a gap)
    assert (both[1, :50] - solo[0]).abs().max() <= SAME_AUDIO


@pytest.mark.parametrize("frames,rows", [(64, "sdpa"), (62, "sdpa"), (64, "triton"), (50, "triton")])
def test_a_lone_item_that_fills_its_bucket_equals_the_eager_sampler(tmp_path, monkeypatch, frames, rows):
    """A lone item packs without a gap: one of exactly a bucket's length (or within the text
    convolutions' reach of it) ends both halves of the packed axis, where the text embedding's and
    the position convolutions' rows end, and still equals the plain sampler.

    rows "triton": the rows' attention on the packed axis (`PACKED_ATTENTION["rows"]`: the item and
    the padding after it as sequences of their own in each half). On the CPU the packed attention is
    its masked form, so this checks that layout (rows flattened to the packed axis and back,
    per-token rotary angles), not the kernel (tests/test_f5_dit.py under the Triton interpreter,
    test_triton_packed_attention_equals_per_sequence_sdpa on CUDA)."""
    from tts.f5 import dit as D

    monkeypatch.setitem(D.PACKED_ATTENTION, "rows", rows)
    dit = tiny_dit(tmp_path)
    fs = F.FastSampler(dit, small_options())
    args = batch([frames], [20])
    with torch.inference_mode():
        ref = sample(dit, *args, 6, 2.0, -1.0)
        out = fs.sample(dit, *args, 6, 2.0, -1.0)
    assert fs.bucket(1, F.packed_length([frames])) == (1, 64)
    assert (out - ref).abs().max() <= SAME_AUDIO


def test_stale_buffer_contents_do_not_leak(tmp_path):
    """Poison every static buffer (NaN) before a run: the result must not change."""
    dit = tiny_dit(tmp_path)
    fs = F.FastSampler(dit, small_options())
    args = batch([90, 60], [30, 20])
    clean = fs.sample(dit, *args, 4, 2.0, -1.0)
    buf = fs.buffers
    for t in (buf.x, buf.cond, buf.text_cond, buf.text_uncond, buf.step, buf.cfg, buf.mods, buf.joined, buf.rope_cos,
              buf.rope_sin):
        t.fill_(float("nan"))
    buf.valid.fill_(True)
    buf.pos.fill_(7)
    buf.cu_seqlens.fill_(3)
    again = fs.sample(dit, *args, 4, 2.0, -1.0)
    assert torch.isfinite(again).all()
    assert torch.equal(clean, again)
    for t in (buf.joined, buf.rope_cos, buf.rope_sin, buf.x):  # a lone item (two rows) after the poison too
        t.fill_(float("nan"))
    lone = [a[1:] for a in args]
    assert torch.equal(fs.sample(dit, *lone, 4, 2.0, -1.0), fs.sample(dit, *lone, 4, 2.0, -1.0))
    assert torch.isfinite(fs.sample(dit, *lone, 4, 2.0, -1.0)).all()


def test_each_schedule_uses_its_own_time_modulations(tmp_path):
    """The per-step modulations are precomputed per (nfe, sway) schedule: switching schedules on one
    sampler (and back) must give the eager sampler's result each time, and they must be exactly the
    time products the padded forward runs."""
    dit = tiny_dit(tmp_path)
    fs = F.FastSampler(dit, small_options())
    args = batch([90, 60], [30, 20])
    for nfe, sway in ((4, -1.0), (7, None), (4, 0.5), (4, -1.0)):
        assert (fs.sample(dit, *args, nfe, 2.0, sway) - sample(dit, *args, nfe, 2.0, sway)).abs().max() <= SAME_AUDIO
    t = torch.tensor(0.3)
    temb = dit.time_embed(t.reshape(1))
    mods = dit.modulations(t)
    assert mods.shape == (dit.modulation_rows, dit.cfg.dim)
    block = dit.transformer_blocks[1].attn_norm
    assert torch.equal(mods[6:12], block.linear(torch.nn.functional.silu(temb)).view(6, -1))
    assert torch.equal(mods[-2:], dit.norm_out.linear(torch.nn.functional.silu(temb)).view(2, -1))


def test_lengths_beyond_the_batch_frames_are_refused(tmp_path):
    dit = tiny_dit(tmp_path)
    fs = F.FastSampler(dit, small_options())
    cond, ids, refs, lens, noise = batch([60, 40], [20, 10])
    with pytest.raises(ValueError, match="total_lens"):
        fs.sample(dit, cond, ids, refs, torch.tensor([61, 40]), noise, 2, 2.0, -1.0)


def test_guidance_strength_is_a_runtime_input(tmp_path):
    dit = tiny_dit(tmp_path)
    fs = F.FastSampler(dit, small_options())
    args = batch([80], [20])
    for cfg in (0.0, 2.0, 3.5):
        assert (fs.sample(dit, *args, 4, cfg, -1.0) - sample(dit, *args, 4, cfg, -1.0)).abs().max() <= SAME_AUDIO


def test_shapes_beyond_the_buckets_run_the_eager_sampler(tmp_path):
    dit = tiny_dit(tmp_path)
    fs = F.FastSampler(dit, small_options(length_buckets=(64,)))
    args = batch([100], [20])
    assert fs.bucket(1, F.packed_length([100])) is None
    assert torch.equal(fs.sample(dit, *args, 3, 2.0, -1.0), sample(dit, *args, 3, 2.0, -1.0))
    assert dict(fs.served) == {"eager": 1}, "counted as served by the eager sampler"
    other = tiny_dit(tmp_path / "other")  # a different DiT object is never run through the buffers
    args = batch([40], [10])
    assert torch.equal(fs.sample(other, *args, 3, 2.0, -1.0), sample(other, *args, 3, 2.0, -1.0))


def test_failed_self_check_turns_the_fast_path_off(tmp_path, monkeypatch):
    dit = tiny_dit(tmp_path)
    monkeypatch.setitem(F.SELF_CHECK_TOL, torch.float32, -1.0)  # nothing can pass
    fs = F.FastSampler(dit, small_options(self_check=True))
    stats = fs.warmup()
    assert not fs.ready and "self_check_failed" in stats
    args = batch([50], [10])
    before = fs.served["eager"]
    assert torch.equal(fs.sample(dit, *args, 3, 2.0, -1.0), sample(dit, *args, 3, 2.0, -1.0))
    assert fs.served["eager"] == before + 1


def test_self_check_passes_on_the_eager_path(tmp_path):
    fs = F.FastSampler(tiny_dit(tmp_path), small_options(self_check=True))
    stats = fs.warmup()
    assert fs.ready and stats["self_check_rel_err"] <= 1e-5 and "self_check_failed" not in stats


# -- the graph protocol, with a stand-in for CUDA graphs -------------------------------------------

class FakeGraph:
    """Records the step a capture would record; replay runs it on whatever the buffers hold then."""

    capturing = None

    def __init__(self):
        self.step = None
        self.replays = 0

    def replay(self):
        self.replays += 1
        self.step()


class FakeCuda:
    """Just enough of torch.cuda for FastSampler._capture_all on a CPU tensor."""

    @staticmethod
    def graph(g, pool=None, capture_error_mode=None):
        from contextlib import contextmanager

        @contextmanager
        def ctx():
            FakeGraph.capturing = g
            try:
                yield
            finally:
                FakeGraph.capturing = None
        return ctx()


def test_graph_protocol_with_a_stand_in_for_cuda_graphs(tmp_path, monkeypatch):
    """Capture one step per bucket, then per request: load buffers, set (t0, dt), replay nfe times.
    A stand-in graph re-runs the captured step on the live buffers, as a CUDA graph reads them."""
    from contextlib import nullcontext

    def recording(real):
        def run(*args):
            if FakeGraph.capturing is not None:  # a capture records work, it does not run it
                FakeGraph.capturing.step = lambda: real(*args)
                return
            real(*args)
        return run

    monkeypatch.setattr(F, "static_step", recording(F.static_step))
    monkeypatch.setattr(F, "static_prologue", recording(F.static_prologue))
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: type("S", (), {"wait_stream": lambda self, s: None})())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: type("S", (), {"wait_stream": lambda self, s: None})())
    monkeypatch.setattr(torch.cuda, "device", lambda d: nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", FakeCuda.graph)
    dit = tiny_dit(tmp_path)
    fs = F.FastSampler(dit, small_options(self_check=True))
    fs.use_graphs, fs.mode = True, "graph"
    stats = fs.warmup()
    assert stats["graphs"] == len(fs.buckets()) and "capture_errors" not in stats and fs.ready
    assert 0 <= stats["capture_ms_p50"] <= stats["capture_ms_max"]
    assert stats["capture_slowest"] in {f"{b}x{t}" for b, t in fs.buckets()}
    assert stats["self_check_rel_err"] <= 1e-5
    args = batch([100, 70, 33], [30, 20, 10])
    graph, prologue = fs._graphs[(4, 256)], fs._prologues[(4, 256)]
    before, before_prologue, served = graph.replays, prologue.replays, dict(fs.served)
    out = fs.sample(dit, *args, 8, 2.0, -1.0)
    assert graph.replays - before == 8 and prologue.replays - before_prologue == 1
    assert fs.served["graph"] == served.get("graph", 0) + 1 and fs.served["eager"] == served.get("eager", 0)
    assert (out - sample(dit, *args, 8, 2.0, -1.0)).abs().max() <= SAME_AUDIO


# -- the compile plumbing (cheap backend on CPU) ---------------------------------------------------

def test_regional_compile_traces_once_for_every_bucket(tmp_path):
    """Two priming calls compile the block (static, then dynamic in batch and frames); after that no
    bucket compiles again, and the compiled step gives the eager result."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    dit = tiny_dit(tmp_path, depth=3)
    fs = F.FastSampler(dit, small_options(mode="compile", compile_backend="eager",
                                          length_buckets=(64, 128, 256, 384, 768), cache_dir=str(tmp_path / "cache")))
    counters.clear()
    stats = fs.warmup()
    assert stats["mode"] == "compile" and "compile_error" not in stats
    # 3 blocks share their graphs: one-item buckets (two padded rows) and packed buckets, each
    # compiled static then dynamic (4); the position convolutions: static, dynamic frames, then
    # dynamic rows too (3)
    assert counters["stats"]["unique_graphs"] == 7
    for lens, refs in (([100, 70, 33], [30, 20, 10]), ([60], [15]), ([300, 200], [90, 50]), ([350], [100])):
        args = batch(lens, refs)
        assert fs.bucket(len(lens), F.packed_length(lens)) is not None  # the fast path serves it
        with torch.inference_mode():  # the pipeline's mode: must not trigger a recompile either
            out = fs.sample(dit, *args, 3, 2.0, -1.0)
        with F.eager_stance():
            ref = sample(dit, *args, 3, 2.0, -1.0)
        assert (out - ref).abs().max() <= SAME_AUDIO
    assert counters["stats"]["unique_graphs"] == 7  # no request compiled anything
    torch._dynamo.reset()


def test_compile_failure_falls_back(tmp_path):
    dit = tiny_dit(tmp_path)
    fs = F.FastSampler(dit, small_options(mode="compile", compile_backend="no_such_backend",
                                          cache_dir=str(tmp_path / "cache")))
    stats = fs.warmup()
    assert "compile_error" in stats and fs.mode == "eager" and fs.ready
    assert all(b._compiled_call_impl is None for b in dit.transformer_blocks)
    args = batch([50], [10])
    assert (fs.sample(dit, *args, 3, 2.0, -1.0) - sample(dit, *args, 3, 2.0, -1.0)).abs().max() <= SAME_AUDIO


def test_compile_cache_goes_under_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.setenv(F.DATA_DIR_ENV, str(tmp_path / "data"))
    root = F.configure_compile_cache(None)
    import os

    assert root == tmp_path / "data" / F.CACHE_SUBDIR and root.is_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(root / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(root / "triton")


# -- Vocos on a whole batch ------------------------------------------------------------------------

def test_vocode_batch_equals_solo_decodes(tmp_path):
    from tts.f5.vocos import Vocos, write_demo_vocos

    write_demo_vocos(tmp_path / "vocos", seed=0, tiny=True)
    vocos = Vocos.from_dir(tmp_path / "vocos")
    gen = torch.Generator().manual_seed(0)
    mels = [torch.randn(100, n, generator=gen) * 2 - 4 for n in (57, 120, 2, 90)]
    batched = F.vocode_batch(vocos, mels)
    for m, wav in zip(mels, batched):
        solo = vocos.decode(m[None])[0]
        assert wav.shape == solo.shape == ((m.shape[1] - 1) * 256,)
        assert (wav - solo).abs().max() <= SAME_AUDIO
    assert F.vocode_batch(vocos, []) == []
    with pytest.raises(ValueError, match="mels of shape"):
        F.vocode_batch(vocos, [torch.zeros(80, 10)])


# -- CUDA ------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
def test_graph_path_equals_eager_fp32(tmp_path, monkeypatch):
    # fp32 throughout: cuDNN's convolutions would otherwise run in TF32 (torch's default for cuDNN),
    # whose rounding differs between the packed and padded shapes (1.06e-4 here on an H200)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    dit = tiny_dit(tmp_path, depth=4, dtype=torch.float32, device="cuda")
    fs = F.FastSampler(dit, small_options(mode="graph", self_check=True, length_buckets=(128, 256, 384, 768)))
    stats = fs.warmup()
    assert fs.ready and stats["graphs"] == len(fs.buckets())
    args = batch([300, 200, 70], [90, 60, 20], device="cuda")
    assert fs.bucket(3, F.packed_length([300, 200, 70])) == (4, 768)  # packed, varlen attention
    assert fs.bucket(1, F.packed_length([70])) == (1, 128)  # one item: two padded rows
    assert stats["fused_gelu"] and dit.transformer_blocks[0].ff.fused_gelu
    out = fs.sample(dit, *args, 8, 2.0, -1.0)
    # the eager sampler with the same feed-forward form (its fused form has its own test below):
    # in fp32 only summation order may differ between the graphs and the eager step
    ref = sample(dit, *args, 8, 2.0, -1.0)
    assert float((out - ref).norm() / ref.norm()) <= 1e-4
    solo = fs.sample(dit, *[a[2:] for a in args], 8, 2.0, -1.0)
    assert float((out[2] - solo[0]).norm() / solo[0].norm()) <= 1e-4


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("mode", ["graph", "compile"])
def test_lone_item_filling_its_bucket_equals_eager_fp32_on_cuda(tmp_path, monkeypatch, mode):
    """A lone item packed without a gap, exactly a bucket long: its captured step (two padded
    rows, the text convolutions stopping at each row's end) equals the eager sampler. Every
    bucket is warmed before its capture, so nothing compiles inside one."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    dit = tiny_dit(tmp_path, depth=4, dtype=torch.float32, device="cuda")
    fs = F.FastSampler(dit, small_options(mode=mode, self_check=False, cache_dir=str(tmp_path / "cache"),
                                          length_buckets=(128, 256), capture_warmup="all"))
    stats = fs.warmup()
    args = batch([128], [40], device="cuda")
    assert fs.ready and fs.bucket(1, F.packed_length([128])) == (1, 128)
    assert "capture_errors" not in stats and (1, 128) in fs._graphs, stats
    out = fs.sample(dit, *args, 8, 2.0, -1.0)
    ref = sample(dit, *args, 8, 2.0, -1.0)
    assert float((out - ref).norm() / ref.norm()) <= 1e-4


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("mode", ["graph", "compile"])
def test_capture_with_first_bucket_warmup_equals_eager_fp32(tmp_path, monkeypatch, mode):
    """Capturing without a warm-up for all but each batch size's first bucket gives the same samples
    (every bucket captured, none retried or failed) as the eager sampler."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    dit = tiny_dit(tmp_path, depth=4, dtype=torch.float32, device="cuda")
    fs = F.FastSampler(dit, small_options(mode=mode, self_check=True, capture_warmup="first",
                                          cache_dir=str(tmp_path / "cache"), length_buckets=(128, 256, 384, 768)))
    stats = fs.warmup()
    print(f"[capture] warmup first: {stats}")
    assert fs.ready and stats["graphs"] == len(fs.buckets()) and "capture_errors" not in stats, stats
    assert stats["warmed_buckets"] == len({b for b, _ in fs.buckets()}) < len(fs.buckets())
    args = batch([300, 200, 70], [90, 60, 20], device="cuda")
    out = fs.sample(dit, *args, 8, 2.0, -1.0)
    ref = sample(dit, *args, 8, 2.0, -1.0)
    assert float((out - ref).norm() / ref.norm()) <= 1e-4


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("mode", ["graph", "compile"])
def test_graph_path_equals_eager_bf16(tmp_path, mode):
    dit = tiny_dit(tmp_path, depth=4, dtype=torch.bfloat16, device="cuda", dim=256, heads=4, dim_head=64,
                   text_dim=128)
    fs = F.FastSampler(dit, small_options(mode=mode, self_check=True, cache_dir=str(tmp_path / "cache"),
                                          length_buckets=(128, 256, 384, 768)))
    stats = fs.warmup()
    assert fs.ready and stats["mode"] == mode, stats
    args = batch([300, 200, 70], [90, 60, 20], device="cuda")
    assert fs.bucket(3, F.packed_length([300, 200, 70])) is not None
    out = fs.sample(dit, *args, 8, 2.0, -1.0)
    with F.eager_stance(), F.reference_forms(dit):
        ref = sample(dit, *args, 8, 2.0, -1.0)
    assert torch.isfinite(out).all()
    assert float((out - ref).norm() / ref.norm()) <= 3e-2
    solo = fs.sample(dit, *[a[2:] for a in args], 8, 2.0, -1.0)[0, :70]  # one item: the padded-rows path
    assert float((solo - ref[2, :70]).norm() / ref[2, :70].norm()) <= 3e-2


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_gelu_feed_forward_equals_two_op_form(dtype):
    """The epilogue form (cuBLASLt bias + tanh GELU) computes upstream's feed-forward: at the
    full-size width and a request's row count (CFG halves of 2 x 1,280 packed frames)."""
    from tts.f5.dit import FeedForward

    torch.manual_seed(0)
    ff = FeedForward(1024, 2).to("cuda", dtype)
    x = torch.randn(2, 1280, 1024, device="cuda", dtype=dtype)
    with torch.no_grad():
        ref = ff(x)
        ff.fused_gelu = True
        out = ff(x)
    assert out.shape == ref.shape and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the hidden rounds once instead of twice
    assert float((out.float() - ref.float()).norm() / ref.float().norm()) <= tol


@pytest.mark.gpu
@cuda
def test_cudnn_packed_attention_equals_flash_and_per_sequence_sdpa():
    """cuDNN's ragged attention on the packed layout (two items, their gaps, both CFG halves) gives
    each sequence's own attention, as flash's varlen kernel does; the start-up choice times both."""
    from tts.f5 import dit as D

    torch.manual_seed(0)
    lens = [300, 170]
    n = F.packed_length(lens) + 30  # a tail gap too
    cu_list = F.packed_cu_seqlens(lens, 2, n)
    cu = torch.tensor(cu_list, dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(2 * n, 16, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    before = dict(D.PACKED_ATTENTION)
    try:
        outs = {}
        for backend in D.PACKED_ATTENTION_BACKENDS:
            D.PACKED_ATTENTION["backend"] = backend
            outs[backend] = D.packed_attention(q, k, v, cu, n).float()
        for a, b in zip(cu_list[:-1], cu_list[1:]):
            if b == a:
                continue
            ref = torch.nn.functional.scaled_dot_product_attention(
                *(t[a:b].transpose(0, 1).float() for t in (q, k, v))).transpose(0, 1)
            for backend, out in outs.items():
                err = float((out[a:b] - ref).norm() / ref.norm())
                assert err <= 1e-2, (backend, a, b, err)
        stats = F.choose_packed_attention(16, 64, torch.bfloat16, torch.device("cuda"))
        print(f"[attention] start-up choice: {stats}")
        assert stats["chosen"].partition(":")[0] in D.PACKED_ATTENTION_BACKENDS and "flash" in stats["packed_us"], stats
        assert stats["rows"].partition(":")[0] in D.ROW_ATTENTION_BACKENDS and "sdpa" in stats["rows_us"], stats
        assert any(name.startswith("triton:") for name in stats["packed_us"]), stats  # the kernel ran and agreed
        assert D.PACKED_ATTENTION["backend"] == stats["chosen"].partition(":")[0]
        assert D.PACKED_ATTENTION["rows"] == stats["rows"].partition(":")[0]
    finally:
        D.PACKED_ATTENTION.update(before)


@pytest.mark.gpu
@cuda
@torch.no_grad()
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_triton_packed_attention_equals_per_sequence_sdpa(dtype, tol):
    """The Triton kernel (`tts.f5.attention_kernel`) in each tile config gives every sequence its
    own attention: the packed layout of three items with their gaps, a lone item's rows (its
    padding a sequence of its own; one empty when the item fills its row), inputs read through the
    strides of a fused q/k/v projection."""
    from tts.f5 import attention_kernel as AK

    assert AK.available()
    torch.manual_seed(0)
    layouts = []
    lens = [300, 170, 555]
    n = F.packed_length(lens) + 30
    layouts.append((F.packed_cu_seqlens(lens, 3, n), n))
    for item, row in ((850, 864), (864, 864), (1, 64)):
        layouts.append((F.packed_cu_seqlens([item], 1, row), row))
    for cu_list, n in layouts:
        qkv = torch.randn(2 * n, 3, 16, 64, device="cuda", dtype=dtype)
        q, k, v = qkv.unbind(1)  # strided views, as the projection's output is read
        cu = torch.tensor(cu_list, dtype=torch.int32, device="cuda")
        for config in AK.CONFIGS:
            out = AK.packed_attention_triton(q, k, v, cu, config).float()
            assert out.shape == q.shape and out.is_contiguous()
            for a, b in zip(cu_list[:-1], cu_list[1:]):
                if b == a:
                    continue
                ref = torch.nn.functional.scaled_dot_product_attention(
                    *(t[a:b].transpose(0, 1).double() for t in (q, k, v))).transpose(0, 1)
                err = float((out[a:b].double() - ref).norm() / ref.norm())
                assert err <= tol, (config, n, a, b, err)


@pytest.mark.gpu
@cuda
@torch.no_grad()
def test_grouped_conv_kernel_equals_the_convolution(monkeypatch):
    """The Triton position convolution (`tts.f5.conv_kernel`) computes nn.Conv1d's grouped "same"
    convolution, at the full-size width on the packed row of a request and on two padded rows."""
    from tts.f5 import conv_kernel
    from tts.f5.dit import ConvPositionEmbedding

    assert conv_kernel.available()
    torch.manual_seed(0)
    # the fp32 reference in fp32: cuDNN runs convolutions in TF32 by default (3e-4 off here)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 1e-2)):
        cpe = ConvPositionEmbedding(1024).to("cuda", dtype)
        for shape in ((1, 2560), (2, 700)):
            x = torch.randn(*shape, 1024, device="cuda", dtype=dtype)
            for conv in (cpe.conv1d[0], cpe.conv1d[2]):
                ref = conv(x.transpose(1, 2)).transpose(1, 2).float()
                out = conv_kernel.grouped_conv(x, conv_kernel.kernel_weights(conv), conv.bias).float()
                assert float((out - ref).norm() / ref.norm()) <= tol, (dtype, shape)
            mask = torch.arange(shape[1], device="cuda")[None, :] < torch.tensor([shape[1] - 40, 300][:shape[0]],
                                                                                  device="cuda")[:, None]
            ref = cpe(x, mask).float()
            cpe.use_form("kernel")
            out = cpe(x, mask).float()
            cpe.use_form("conv")
            assert float((out - ref).norm() / ref.norm()) <= tol and not out[~mask].any()


@pytest.mark.gpu
@cuda
def test_vocode_batch_on_cuda(tmp_path):
    from tts.f5.vocos import Vocos, write_demo_vocos

    write_demo_vocos(tmp_path / "vocos", seed=0, tiny=True)
    vocos = Vocos.from_dir(tmp_path / "vocos", device="cuda")
    mels = [torch.randn(100, n, device="cuda") - 4 for n in (300, 120)]
    for m, wav in zip(mels, F.vocode_batch(vocos, mels)):
        solo = vocos.decode(m[None])[0]
        assert float((wav - solo).norm() / solo.norm()) <= 1e-4


# -- a drop-in for the pipeline's sampler ----------------------------------------------------------

def test_fast_sample_is_a_drop_in_for_the_pipeline(tmp_path, monkeypatch):
    """The pipeline's own batch (chunks of mixed lengths, its noise and reference mels) through its
    fast branch (host inputs into `FastSampler.sample_items`, then `vocode_batch`) gives the audio
    of the plain path; so does the padded entry `FastSampler.sample` in the plain path's place."""
    import numpy as np

    from tests.conftest import speech_like
    from tts.demo_weights import DEMO_F5_NAME, write_f5
    from tts.f5 import pipeline as P

    write_f5(tmp_path)
    d = tmp_path / DEMO_F5_NAME
    pipe = P.F5Pipeline(next(d.glob("*.safetensors")), d / "vocab.txt", tmp_path / "vocos-mel-24khz", DEMO_F5_NAME)
    req = pipe.make_request(speech_like(2.5, 24000), "The quiet harbour wakes up slowly.",
                            "Short one. Then a much longer second sentence follows, with a clause or two in it.",
                            P.F5Options(nfe_steps=6, seed=3), streaming=True)
    assert len(req.jobs) >= 2 and len({j.total_frames for j in req.jobs}) >= 2
    plain = pipe.synthesize(req.jobs)
    fs = F.FastSampler(pipe.dit, small_options(length_buckets=(256, 512, 1024, 2048)))
    pipe.fast = fs
    fast = pipe.synthesize(req.jobs)
    assert fs.bucket(len(req.jobs), F.packed_length([j.total_frames for j in req.jobs])) is not None
    pipe.fast = None
    monkeypatch.setattr(P, "sample", fs.sample)
    padded = pipe.synthesize(req.jobs)
    for a, b, c in zip(plain, fast, padded):
        assert a.shape == b.shape == c.shape and np.abs(a - b).max() <= SAME_AUDIO and np.abs(a - c).max() <= SAME_AUDIO
