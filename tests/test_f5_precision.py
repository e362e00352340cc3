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

ROOT = Path(__file__).resolve().parent.parent

#: The fast path's waveform must stay this close to the fp32 eager one (dB): the 43.6 dB measured
#: before, less a margin for run-to-run differences of the kernels chosen at start-up.
SNR_FLOOR_DB = 40.0
#: The opt-in FP8 products are reported, not held to the bf16 floor (e4m3 rounds ~16x coarser);
#: this floor only catches a broken scale or layout, which gives an SNR near 0 dB.
FP8_SNR_FLOOR_DB = 10.0

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def snr_db(out: np.ndarray, ref: np.ndarray) -> float:
    """Signal-to-noise ratio of `out` against `ref` (same length), in dB."""
    n = min(out.size, ref.size)
    out, ref = out[:n].astype(np.float64), ref[:n].astype(np.float64)
    noise = float(np.sum((out - ref) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(float(np.sum(ref ** 2)) / noise)


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


@pytest.mark.gpu
@cuda
def test_fast_path_waveform_snr_against_fp32_eager(checkpoints, monkeypatch):
    import soundfile as sf

    from tts.f5.pipeline import F5Options, synthesize_offline

    # fp32 means fp32: no TF32 in cuBLAS or cuDNN for the reference
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
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
    snr8 = snr_db(out8, ref)
    where = f"full-size random weights, {item['id']}, seed 7, 16 NFE, over {ref.size / 24000:.2f} s"
    print(f"\n[precision] F5 bf16 fast path vs fp32 eager, {where}: waveform SNR {snr:.1f} dB", flush=True)
    print(f"[precision] F5 FP8 fast path (fp8 on: {fp8_on}) vs fp32 eager, {where}: waveform SNR {snr8:.1f} dB "
          f"(self-check {fp8_pipe.fast.stats.get('self_check_rel_err')})", flush=True)
    assert snr >= SNR_FLOOR_DB
    assert fp8_on is True and np.isfinite(out8).all() and snr8 >= FP8_SNR_FLOOR_DB
