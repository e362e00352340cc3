"""Precision of the F5 fast path at full size on CUDA: the bf16 fast path's waveform against the fp32
eager path on the same request (the figure a speed change must not make worse).

Full-size random weights in the published layout (`tools/gpu_make_checkpoints.py`), the benchmark
workload's first request, one seed. SNR = 10 log10(sum ref^2 / sum (out - ref)^2) over the joined
waveform, in dB, and the same over log-mel frames. The run prints, against the fp32 eager output
(whose mel equals upstream's fp32 path within 1e-5): the bf16 fast path, plain bf16 eager, fp16
eager (upstream's own inference precision) and the opt-in FP8 products (`STUDIO_F5_FP8=1`,
`tts.f5.fp8`); it fails when the fast path is less precise than plain bf16 (BF16_MARGIN_DB).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from tts.snr import log_mel_snr_db, snr_db

ROOT = Path(__file__).resolve().parent.parent

#: The bf16 fast path may be this much (dB) less close to the fp32 eager output than plain bf16
#: eager arithmetic on the same weights is. Not an absolute floor: on random weights the 16 guided
#: ODE steps do not pull rounding errors back in as trained weights do, so any bf16 run ends far from
#: the fp32 one (H100, this request: the fast path at 6.2 dB waveform, 16.5 dB log-mel SNR; the 43.6
#: dB quoted before was not measured on these weights). What a speed change must not do is make the
#: fast path less precise than bf16 itself; the margin covers run-to-run kernel choices.
BF16_MARGIN_DB = 3.0
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

    def fresh(dtype, fast: bool):
        pipe = _pipeline(checkpoints, dtype, fast=fast, monkeypatch=monkeypatch)
        try:
            before = Counter(pipe.fast.served) if fast else Counter()
            audio = run(pipe)
            if fast:  # the figure is the fast path's only if its captured graphs produced it
                served = dict(pipe.fast.served - before)
                assert served == {"graph": 1}, (served, pipe.fast.stats)
            return audio, (pipe.fast.stats if pipe.fast is not None else {})
        finally:
            del pipe
            torch.cuda.empty_cache()

    ref, _ = fresh(torch.float32, fast=False)
    out, stats = fresh(torch.bfloat16, fast=True)
    plain, _ = fresh(torch.bfloat16, fast=False)  # plain bf16 torch arithmetic: the bar for the fast path
    half, _ = fresh(torch.float16, fast=False)  # upstream's own inference precision
    # the opt-in FP8 products (STUDIO_F5_FP8=1) on the same request, reported in the same run
    monkeypatch.setenv("STUDIO_F5_FP8", "1")
    out8, stats8 = fresh(torch.bfloat16, fast=True)
    for a in (out, plain, out8):  # (fp16 is only reported: random weights may overflow its range)
        assert np.isfinite(a).all() and abs(a.size - ref.size) <= 256  # same frames, same hop
    figures = {name: (snr_db(a, ref), log_mel_snr_db(a, ref)) for name, a in
               (("bf16 fast path", out), ("bf16 eager", plain), ("fp16 eager", half), ("FP8 fast path", out8))}
    rms_ratio = float(np.sqrt(np.mean(out8.astype(np.float64) ** 2) / np.mean(ref.astype(np.float64) ** 2)))
    where = f"full-size random weights, {item['id']}, seed 7, 16 NFE, over {ref.size / 24000:.2f} s"
    for name, (wave, mel) in figures.items():
        extra = (f", RMS ratio {rms_ratio:.3f} (fp8 on: {stats8.get('fp8')}, self-check "
                 f"{stats8.get('self_check_rel_err')})" if name.startswith("FP8") else
                 f" (self-check {stats.get('self_check_rel_err')}, attention "
                 f"{stats.get('attention', {}).get('chosen')})" if name == "bf16 fast path" else "")
        print(f"\n[precision] F5 {name} vs fp32 eager, {where}: waveform SNR {wave:.1f} dB, log-mel SNR "
              f"{mel:.1f} dB{extra}", flush=True)
    (fast_wave, fast_mel), (plain_wave, plain_mel) = figures["bf16 fast path"], figures["bf16 eager"]
    assert fast_wave >= plain_wave - BF16_MARGIN_DB and fast_mel >= plain_mel - BF16_MARGIN_DB, figures
    mel8 = figures["FP8 fast path"][1]
    assert stats8.get("fp8") is True and mel8 >= FP8_LOG_MEL_SNR_FLOOR_DB
    assert FP8_RMS_RATIO[0] <= rms_ratio <= FP8_RMS_RATIO[1]


def test_log_mel_snr_on_hand_made_signals():
    ref = (0.1 * np.sin(2 * np.pi * 220 * np.arange(24000) / 24000)).astype(np.float32)
    assert log_mel_snr_db(ref, ref) == float("inf")
    assert log_mel_snr_db(ref * 1.01, ref) > 20  # a 1 % gain moves the log-mel by log(1.01) only
    noise = np.random.default_rng(0).standard_normal(24000).astype(np.float32) * 0.1
    assert log_mel_snr_db(noise, ref) < log_mel_snr_db(ref * 1.01, ref)
