"""tts/f5/fp8.py: the opt-in FP8 products of the DiT blocks, on ATen's CPU `_scaled_mm`.

The CPU runs the same e4m3 rounding and the same per-row / per-channel scaling as the CUDA
kernels, so the arithmetic is checked here; the speed and the waveform SNR on CUDA come from
`tools/gpu_bench.sh f5-serve` and `tests/test_f5_precision.py` (gpu).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tts.f5 import fast as F
from tts.f5 import fp8
from tts.f5.sampler import sample

from tests.test_f5_fast import batch, small_options, tiny_dit

#: e4m3 keeps 3 mantissa bits: a value rounds to within half a step, 1/16 of its power of two.
E4M3_HALF_STEP = 1 / 16
#: The bucketed path against the eager one on the same FP8 DiT (relative L2 of a 3-step sample).
FP8_LAYOUT_TOL = 2e-2


def test_quantize_rows_round_trip():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, generator=gen) * torch.logspace(-3, 3, 8)[:, None]  # rows six decades apart
    x[3] = 0  # a gap row between packed items
    q, scale = fp8.quantize_rows(x)
    assert q.dtype == fp8.FP8_DTYPE and scale.shape == (8, 1) and scale.dtype == torch.float32
    back = q.float() * scale
    assert torch.equal(back[3], torch.zeros(64))  # zeros stay zeros, no NaN from a zero scale
    # every row uses the top of the range, and each value is within half an e4m3 step of itself
    assert torch.allclose(q.float().abs().amax(dim=1)[[0, 1, 2, 4, 5, 6, 7]], torch.tensor(fp8.E4M3_MAX))
    normal = x.abs() >= scale * 2 ** -6  # e4m3's smallest normal power: subnormals round coarser
    rel = ((back - x).abs() / x.abs().clamp_min(1e-30))[normal]
    assert rel.max() <= E4M3_HALF_STEP + 1e-6
    assert rel.mean() > 1e-3  # it really rounds


def test_fp8_linear_is_the_product_of_the_quantised_operands():
    gen = torch.Generator().manual_seed(1)
    lin = nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 64, generator=gen) * 0.05)
    x = torch.randn(2, 5, 64, generator=gen)
    layer = fp8.Fp8Linear(lin.weight, lin.bias)
    lin.requires_grad_(False)
    y = layer(x)
    assert y.shape == (2, 5, 48) and y.dtype == torch.float32
    qx, sx = fp8.quantize_rows(x.reshape(-1, 64))
    expected = (qx.float() * sx) @ fp8.dequantized_weight(layer).t() + lin.bias
    assert (y.reshape(-1, 48) - expected).abs().max() <= 1e-4  # the same arithmetic, fp32 accumulation
    exact = lin(x)
    rel = float((y - exact).norm() / exact.norm())
    assert 1e-3 < rel < 0.06  # e4m3's ~3.5 % product error, not a broken scale
    with torch.no_grad():
        assert layer(x.bfloat16()).dtype == torch.bfloat16  # the output takes the activations' dtype


def test_fp8_linear_refuses_unaligned_shapes():
    with pytest.raises(ValueError, match="multiples of 16"):
        fp8.Fp8Linear(torch.zeros(40, 64), None)


def test_supported(monkeypatch):
    assert fp8.supported(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    assert "no FP8 tensor cores" in fp8.supported(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8.supported(torch.device("cuda", 0)) is None


def test_convert_dit_swaps_the_four_products_of_every_block(tmp_path):
    dit = tiny_dit(tmp_path, depth=3)
    args = batch([100, 70], [30, 20])
    with torch.no_grad():
        ref = sample(dit, *args, 4, 2.0, -1.0)
    dit.fuse_gelu(True)  # the fused epilogue must give way to the FP8 product
    assert fp8.convert_dit(dit) == 4 * 3
    assert fp8.convert_dit(dit) == 0  # already converted
    for block in dit.transformer_blocks:
        assert isinstance(block.attn.qkv_fp8, fp8.Fp8Linear) and not block.ff.fused_gelu
        assert isinstance(block.attn.to_out[0], fp8.Fp8Linear)
        assert isinstance(block.ff.ff[0][0], fp8.Fp8Linear) and isinstance(block.ff.ff[2], fp8.Fp8Linear)
    with torch.no_grad():
        out = sample(dit, *args, 4, 2.0, -1.0)
    rel = float((out - ref).norm() / ref.norm())
    assert torch.isfinite(out).all()
    assert 1e-4 < rel < 0.1  # a whole 4-step sample: the FP8 error, small next to the signal


def test_fast_sampler_with_fp8_gives_the_eager_fp8_result(tmp_path):
    """The option converts the DiT; the bucketed path and its compile then give what the eager
    sampler gives on the same FP8 DiT (the compile plumbing with the cheap backend)."""
    torch._dynamo.reset()
    dit = tiny_dit(tmp_path, depth=2)
    fs = F.FastSampler(dit, small_options(mode="compile", compile_backend="eager", fp8=True,
                                          cache_dir=str(tmp_path / "cache")))
    stats = fs.warmup()
    assert stats["fp8"] is True and "compile_error" not in stats
    assert isinstance(dit.transformer_blocks[0].ff.ff[2], fp8.Fp8Linear)
    args = batch([100, 70, 33], [30, 20, 10])
    with torch.inference_mode():
        out = fs.sample(dit, *args, 3, 2.0, -1.0)
    with F.eager_stance():
        ref = sample(dit, *args, 3, 2.0, -1.0)
    rel = float((out - ref).norm() / ref.norm())
    print(f"fast vs eager FP8 sample: relative L2 {rel:.2e}, max abs {float((out - ref).abs().max()):.3g}")
    # not equal within SAME_AUDIO as in fp32: a 1e-7 difference of summation order before a
    # quantisation can move a value one e4m3 step (6 %), and the ODE carries it on
    assert rel <= FP8_LAYOUT_TOL
    torch._dynamo.reset()


def test_fp8_option_from_the_environment(tmp_path, monkeypatch):
    assert F.fast_options_from_env(env={}).fp8 is False
    assert F.fast_options_from_env(env={F.FP8_ENV: "1"}).fp8 is True
    assert F.fast_options_from_env(env={F.FP8_ENV: "0"}).fp8 is False
    with pytest.raises(ValueError, match=F.FP8_ENV):
        F.fast_options_from_env(env={F.FP8_ENV: "e5m2"})
    # a device without FP8 products: said in the log, the DiT stays as it was
    monkeypatch.setattr(fp8, "supported", lambda device: "no FP8 here")
    logs = []
    dit = tiny_dit(tmp_path)
    fs = F.FastSampler(dit, small_options(fp8=True), log=logs.append)
    assert fs.stats["fp8"] is False and any("no FP8 here" in line for line in logs)
    assert isinstance(dit.transformer_blocks[0].ff.ff[2], nn.Linear)
