"""Precision of the F5 fast path at full size on CUDA: the bf16 fast path's waveform against the fp32
eager path on the same request (the figure a speed change must not make worse).

Full-size random weights in the published layout (`tools/gpu_make_checkpoints.py`), the benchmark
workload's first request, one seed. SNR = 10 log10(sum ref^2 / sum (out - ref)^2) over the joined
waveform, in dB. Before this test existed the fast path was measured at 43.6 dB against upstream's
fp32 path (whose mel equals the eager path's within 1e-5), upstream's own fp16 path at 48 dB; the
test prints its figure so every run reports it, and fails below SNR_FLOOR_DB. The opt-in FP8
products (`STUDIO_F5_FP8=1`, `tts.f5.fp8`) are measured on the same request in the same run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tts.snr import log_mel_snr_db, snr_db

ROOT = Path(__file__).resolve().parent.parent

#: The fast path's waveform must stay this close to the fp32 eager one (dB): the 43.6 dB measured
#: before, less a margin for run-to-run differences of the kernels chosen at start-up.
SNR_FLOOR_DB = 40.0
#: The opt-in FP8 products are reported, not held to the bf16 floor: e4m3 rounds ~16x coarser, each
#: DiT forward is ~5.5 % off (relative L2 of the velocity, full size, measured on the CPU) and over 16
#: guided ODE steps the random-weight output no longer follows the fp32 one sample by sample
#: (waveform SNR -2.7 dB, log-mel SNR 11.0 dB on this request, fp32 DiT with FP8 products on the
#: CPU). The floors only catch a broken scale or layout: a log-mel SNR near 0 dB or below, audio
#: much louder or quieter than the reference.
FP8_LOG_MEL_SNR_FLOOR_DB = 5.0
FP8_RMS_RATIO = (0.5, 2.0)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_snr_db_on_hand_made_signals():
    ref = np.sin(np.linspace(0, 100, 24000)).astype(np.float32)
    assert snr_db(ref, ref) == float("inf")
    assert snr_db(ref * 1.1, ref) == pytest.approx(20.0, abs=1e-4)  # noise = 0.1 x signal: 20 dB
    assert snr_db(ref + 0.01 * ref, ref[:-10]) == pytest.approx(40.0, abs=1e-4)  # compared over the shorter


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "tools"))
    from gpu_make_checkpoints import write

    root = tmp_path_factory.mktemp("f5-full")
    write(root, tiny=False)
    return root


def _pipeline(checkpoints: Path, dtype, fast: bool, monkeypatch):
    from tts.f5.pipeline import F5Pipeline

    if fast:
        monkeypatch.delenv("STUDIO_F5_FAST", raising=False)
    else:
        monkeypatch.setenv("STUDIO_F5_FAST", "0")
    model = checkpoints / "F5TTS_v1_Base"
    pipe = F5Pipeline(next(model.glob("model_*.safetensors")), model / "vocab.txt", checkpoints / "vocos-mel-24khz",
                      device="cuda", dtype=dtype)
    assert (pipe.fast is not None) == fast
    pipe.warmup()
    return pipe


@pytest.fixture
def no_tf32():
    """fp32 means fp32: no TF32 in cuBLAS or cuDNN for the reference. Set and put back by hand:
    `torch.backends.cuda.matmul` answers `allow_tf32` through its own getattr, which monkeypatch's
    undo cannot put back (torch 2.11)."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    old = matmul.allow_tf32, cudnn.allow_tf32
    matmul.allow_tf32 = cudnn.allow_tf32 = False
    yield
    matmul.allow_tf32, cudnn.allow_tf32 = old


@pytest.mark.gpu
@cuda
def test_fast_path_waveform_snr_against_fp32_eager(checkpoints, monkeypatch, no_tf32):
    import soundfile as sf

    from tts.f5.pipeline import F5Options, synthesize_offline

    item = json.loads((ROOT / "samples" / "bench_workload.jsonl").read_text().splitlines()[0])
    wav, sr = sf.read(ROOT / "samples" / item["prompt"], dtype="float32")
    assert sr == 24000
    opts = F5Options(nfe_steps=16, seed=7)

    def run(pipe):
        request = pipe.make_request(wav, item["reference_text"], item["target_text"], opts)
        audio, _ = synthesize_offline(pipe, request)
        return audio

    eager = _pipeline(checkpoints, torch.float32, fast=False, monkeypatch=monkeypatch)
    ref = run(eager)
    del eager
    torch.cuda.empty_cache()
    fast = _pipeline(checkpoints, torch.bfloat16, fast=True, monkeypatch=monkeypatch)
    out = run(fast)
    del fast
    torch.cuda.empty_cache()
    # the opt-in FP8 products (STUDIO_F5_FP8=1) on the same request, reported in the same run
    monkeypatch.setenv("STUDIO_F5_FP8", "1")
    fp8_pipe = _pipeline(checkpoints, torch.bfloat16, fast=True, monkeypatch=monkeypatch)
    fp8_on = fp8_pipe.fast.stats.get("fp8")
    out8 = run(fp8_pipe)
    assert np.isfinite(out).all() and abs(out.size - ref.size) <= 256  # same frames, same hop
    snr = snr_db(out, ref)
    snr8, mel8 = snr_db(out8, ref), log_mel_snr_db(out8, ref)
    rms_ratio = float(np.sqrt(np.mean(out8.astype(np.float64) ** 2) / np.mean(ref.astype(np.float64) ** 2)))
    where = f"full-size random weights, {item['id']}, seed 7, 16 NFE, over {ref.size / 24000:.2f} s"
    print(f"\n[precision] F5 bf16 fast path vs fp32 eager, {where}: waveform SNR {snr:.1f} dB, "
          f"log-mel SNR {log_mel_snr_db(out, ref):.1f} dB", flush=True)
    print(f"[precision] F5 FP8 fast path (fp8 on: {fp8_on}) vs fp32 eager, {where}: waveform SNR {snr8:.1f} dB, "
          f"log-mel SNR {mel8:.1f} dB, RMS ratio {rms_ratio:.3f} "
          f"(self-check {fp8_pipe.fast.stats.get('self_check_rel_err')})", flush=True)
    assert snr >= SNR_FLOOR_DB
    assert fp8_on is True and np.isfinite(out8).all() and mel8 >= FP8_LOG_MEL_SNR_FLOOR_DB
    assert FP8_RMS_RATIO[0] <= rms_ratio <= FP8_RMS_RATIO[1]


def test_log_mel_snr_on_hand_made_signals():
    ref = (0.1 * np.sin(2 * np.pi * 220 * np.arange(24000) / 24000)).astype(np.float32)
    assert log_mel_snr_db(ref, ref) == float("inf")
    assert log_mel_snr_db(ref * 1.01, ref) > 20  # a 1 % gain moves the log-mel by log(1.01) only
    noise = np.random.default_rng(0).standard_normal(24000).astype(np.float32) * 0.1
    assert log_mel_snr_db(noise, ref) < log_mel_snr_db(ref * 1.01, ref)
