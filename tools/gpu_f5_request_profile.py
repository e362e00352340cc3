"""Where one F5 request's engine time goes: `F5Pipeline.synthesize` phase by phase, on the GPU.

    python tools/gpu_f5_request_profile.py --checkpoints DIR --out RESULTS [--requests 4] [--device cuda]

DIR holds the full-size random checkpoints of tools/gpu_make_checkpoints.py. Builds the pipeline
the engine builds (fast path on, warm-up at start), takes the first `--requests` items of the
benchmark workload with a warm prompt cache, and for each: the whole `synthesize` of its chunks
as one batch (offline) and of chunk 0 alone (streaming's first wave), wall time with a device sync;
then the same offline call under torch.profiler: host time and device time per named range
(`record_function` labels in the pipeline), the top host ops, and the device's busy time and span
inside the call (`triton_models.shared.profile_summary`). Writes RESULTS/f5_request_profile.json and the profiler's trace (gzipped).
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import soundfile as sf  # noqa: E402
from triton_models.shared import profile_summary  # noqa: E402
from tts.f5.pipeline import F5Options, F5Pipeline  # noqa: E402


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_ms(fn, device, iters: int) -> float:
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 2)


def feed_forward_forms(dim: int, mult: int, rows: int, device, dtype, iters: int = 50) -> dict:
    """Device time of one feed-forward in its two forms at a request's row count: the first
    product then bias + GELU as their own kernel (`FeedForward.fused_gelu` False), and bias + GELU
    in the product's epilogue (True). CUDA events around `iters` calls, after a warm-up."""
    from tts.f5.dit import FeedForward
    from tts.f5.fast import device_us

    ff = FeedForward(dim, mult).to(device, dtype)
    x = torch.randn(rows, dim, device=device, dtype=dtype)
    out = {"rows": rows, "dim": dim, "inner": dim * mult}
    for fused in (False, True):
        ff.fused_gelu = fused
        with torch.no_grad():
            for _ in range(5):
                ff(x)
            timed = round(device_us(lambda: ff(x), device, iters), 2) if device.type == "cuda" else None
        out[("fused" if fused else "two_op") + "_us"] = timed  # None: no device timer off CUDA
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--device", default="cuda")
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ck = args.checkpoints
    model = ck / "F5TTS_v1_Base"
    t0 = time.perf_counter()
    pipe = F5Pipeline(next(model.glob("model_*.safetensors")), model / "vocab.txt", ck / "vocos-mel-24khz",
                      device=str(device), dtype=dtype)
    out: dict = {"torch": torch.__version__, "device": str(device), "dtype": str(dtype),
                 "load_s": round(time.perf_counter() - t0, 2)}
    if device.type == "cuda":
        out["device_name"] = torch.cuda.get_device_name(device)
    out["warmup"] = pipe.warmup()
    cfg = pipe.dit.cfg
    out["feed_forward_forms"] = [feed_forward_forms(cfg.dim, cfg.ff_mult, rows, device, dtype)
                                 for rows in (2 * 512, 2 * 1280, 8 * 2 * 640)]  # first chunk, c=1, c=8
    print("feed_forward_forms", json.dumps(out["feed_forward_forms"]), flush=True)
    items = [json.loads(line) for line in (ROOT / "samples" / "bench_workload.jsonl").read_text().splitlines()
             if line.strip()][: args.requests]
    opts = F5Options(nfe_steps=16, seed=7)
    rows = []
    for item in items:
        wav, sr = sf.read(ROOT / "samples" / item["prompt"], dtype="float32")  # the workload's clips are 24 kHz
        req = pipe.make_request(wav, item["reference_text"], item["target_text"], opts)
        pipe.make_request(wav, item["reference_text"], item["target_text"], opts)  # warm prompt cache
        jobs = req.jobs
        frames = [(j.ref.frames, j.total_frames) for j in jobs]
        audio_s = sum(j.total_frames - j.ref.frames for j in jobs) * 256 / 24000
        row = {"id": item["id"], "chunks_ref_total_frames": frames, "audio_s": round(audio_s, 3),
               "offline_ms": wall_ms(lambda: pipe.synthesize(jobs), device, args.iters),
               "chunk0_ms": wall_ms(lambda: pipe.synthesize(jobs[:1]), device, args.iters)}
        if len(jobs) > 1:
            row["rest_ms"] = wall_ms(lambda: pipe.synthesize(jobs[1:]), device, args.iters)
        row["offline_rtf"] = round(row["offline_ms"] / 1000 / audio_s, 5)
        rows.append(row)
        print(json.dumps(row), flush=True)
    out["requests"] = rows
    from torch.profiler import ProfilerActivity, profile

    wav, _ = sf.read(ROOT / "samples" / items[0]["prompt"], dtype="float32")
    jobs = pipe.make_request(wav, items[0]["reference_text"], items[0]["target_text"], opts).jobs
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for name, js in (("offline", jobs), ("chunk0", jobs[:1])):
        pipe.synthesize(js)
        sync(device)
        with profile(activities=acts) as prof:
            pipe.synthesize(js)
            sync(device)
        host = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:25]
        summary = profile_summary(prof)  # the same summary as the engine's STUDIO_PROFILE_DIR files
        summary["top_host_ops"] = [{"name": e.key[:100], "self_host_ms": round(e.self_cpu_time_total / 1000, 3),
                                    "calls": e.count} for e in host]
        out[f"profile_{name}"] = summary
        print(name, json.dumps({k: v for k, v in summary.items() if k != "top_host_ops"}), flush=True)
        trace = args.out / f"trace_{name}.json"
        args.out.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
        with open(trace, "rb") as src, gzip.open(str(trace) + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        trace.unlink()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "f5_request_profile.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
