"""Micro-benchmarks of the F5 DiT step and sampler: eager vs the fast path (CUDA graphs, torch.compile).

    python tools/gpu_f5_bench.py --checkpoints DIR --out RESULTS [--frames 938] [--modes graph,compile]
    python tools/gpu_f5_bench.py --checkpoints DIR --out RESULTS --tiny --device cpu   # dry run

Measures, on one DiT loaded from DIR/F5TTS_v1_Base (bf16 by default):
  * one ODE step (DiT on the CFG 2B batch + guidance + Euler) at batch 1 x `--frames`: eager (with
    each SDPA backend), the eager step in a CUDA graph ("graph"), compiled blocks in a graph
    ("compile"); with the compute floor (FLOPs / measured-peak) beside it;
  * the whole `sample` (text embedding, inputs, NFE steps) at 16 and 32 NFE, batch 1 and 8;
  * each fast mode's start-up (compile, capture) and its error against the eager sampler;
  * Vocos per item vs `vocode_batch` for 8 items.
Writes RESULTS/micro.json and prints a table. Timings: CUDA events around the region, median of
`--iters` after warm-up (METHOD.md); sample timings use the host clock after a synchronize, as a
request sees them. The compile cache goes to $STUDIO_DATA_DIR/compile-cache, shared with the server.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from tts.f5 import fast as F  # noqa: E402
from tts.f5.checkpoint import load_dit  # noqa: E402
from tts.f5.config import load_config  # noqa: E402
from tts.f5.sampler import make_noise, ode_step  # noqa: E402
from tts.f5.sampler import sample as eager_sample  # noqa: E402
from tts.f5.text import load_vocab  # noqa: E402

MODEL_NAME = "F5TTS_v1_Base"
#: H100 SXM bf16 dense matrix rate measured in this workplace (KINDS.md: 798 TFLOP/s on 8192^3); the
#: script measures its own with one large product and uses that when on CUDA.
FALLBACK_PEAK_TFLOPS = 798.0
CONV_POS_KERNEL, CONV_POS_GROUPS = 31, 16


def step_flops(cfg, batch: int, frames: int) -> float:
    """Matrix FLOPs of one ODE step (DiT on 2*batch items of `frames`): 2 per multiply-add.

    Per token and block: q, k, v, out projections (4 * D * H*Dh) and the feed-forward (2 * D * mult*D);
    attention QK^T and PV: 2 * T * H*Dh per token and block; plus the input projection, the grouped
    convolutional position embedding and the output projection once per token.
    """
    n_tok = 2 * batch * frames
    inner = cfg.heads * cfg.dim_head
    per_block = 4 * cfg.dim * inner + 2 * cfg.dim * cfg.ff_mult * cfg.dim
    once = ((2 * cfg.mel_dim + cfg.text_dim) * cfg.dim + 2 * cfg.dim * (cfg.dim // CONV_POS_GROUPS) * CONV_POS_KERNEL
            + cfg.dim * cfg.mel_dim)
    attn = cfg.depth * 2 * frames * inner
    return 2.0 * n_tok * (cfg.depth * per_block + once + attn)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_events(fn, device, iters: int, warmup: int = 3) -> float:
    """Median milliseconds of fn() (CUDA events, or the host clock on CPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 4)


def time_host(fn, device, iters: int, warmup: int = 1) -> float:
    """Median milliseconds of fn() on the host clock, synchronized (what a caller waits)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 3)


def measured_peak_tflops(device, dtype) -> float:
    if device.type != "cuda":
        return float("nan")
    n = 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    ms = time_events(lambda: a @ b, device, iters=10, warmup=3)
    return round(2 * n ** 3 / (ms / 1000) / 1e12, 1)


def make_batch(cfg, batch: int, frames: int, device, seed: int = 0, n_ids: int = 160):
    """Sampler inputs like the pipeline's: item i has frames - 37*i total frames, a third of them reference."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.tensor([max(frames - 37 * i, 64) for i in range(batch)])
    refs = lens // 3
    noise = torch.zeros(batch, frames, cfg.mel_dim)
    for i, n in enumerate(lens.tolist()):
        noise[i, :n] = make_noise(seed + i, n, cfg.mel_dim)
    cond = torch.randn(batch, frames, cfg.mel_dim, generator=gen) - 4
    cond[torch.arange(frames)[None, :] >= refs[:, None]] = 0
    ids = torch.randint(1, cfg.text_num_embeds, (batch, n_ids), generator=gen)
    return [t.to(device) for t in (cond, ids, refs, lens, noise)]


def step_inputs(dit, batch: int, frames: int, device):
    cfg = dit.cfg
    cond, ids, refs, lens, noise = make_batch(cfg, batch, frames, device)
    tc, tu = dit.embed_text(ids, lens, frames=frames)
    mask = torch.arange(frames, device=device)[None, :] < lens[:, None]
    t = torch.tensor([0.3, 0.05], device=device)
    return (noise, t[0], t[1], cond, tc, tu, mask, 2.0)


def rel_err(a, b) -> float:
    return round(float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)), 6)


def bench_eager_step(dit, args, device, out: dict) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    x, t0, dt, cond, tc, tu, mask, cfg = step_inputs(dit, 1, args.frames, device)
    run = lambda: ode_step(dit, x, t0, dt, cond, tc, tu, mask, cfg)  # noqa: E731
    out["eager_step_ms"] = time_events(run, device, args.iters)
    backends = {"efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "math": SDPBackend.MATH} if device.type == "cuda" else {}
    for name, backend in backends.items():
        try:
            with sdpa_kernel([backend]):
                out[f"eager_step_ms_sdpa_{name}"] = time_events(run, device, max(args.iters // 2, 3))
        except Exception as exc:  # noqa: BLE001 - a backend that refuses these inputs is a finding too
            out[f"eager_step_ms_sdpa_{name}"] = f"{type(exc).__name__}: {str(exc)[:160]}"


def bench_sampler(name: str, run_sample, dit, args, device, out: dict, batches, nfes) -> dict:
    """Time `run_sample(dit, *batch_args, nfe, cfg, sway)` per (batch, nfe); returns the outputs at nfe 16."""
    results = {}
    for b in batches:
        batch_args = make_batch(dit.cfg, b, args.frames, device, seed=b)
        for nfe in nfes:
            fn = lambda: run_sample(dit, *batch_args, nfe, 2.0, -1.0)  # noqa: E731
            iters = args.sample_iters if name != "eager" else max(args.sample_iters // 2, 1)  # eager is slow
            out[f"{name}_sample_ms_b{b}_nfe{nfe}"] = time_host(fn, device, iters)
        results[b] = run_sample(dit, *batch_args, nfes[0], 2.0, -1.0)
    return results


def bench_fast(mode: str, dit, args, device, out: dict, reference: dict) -> None:
    """One fast mode: start-up, graph replay per step, whole samples, error against the eager sampler.
    Keys are prefixed `fast_<mode>_` (the plain sampler's are `eager_`)."""
    name = f"fast_{mode}"
    exact = F.packed_length([args.frames])  # one item of exactly --frames: a bucket of its own
    lengths = tuple(sorted(set(F.DEFAULT_LENGTH_BUCKETS) | {exact}))
    opts = F.FastOptions(mode=mode, batch_buckets=F.DEFAULT_BATCH_BUCKETS, length_buckets=lengths,
                         compile_mode=args.compile_mode, self_check=True)
    if mode == "compile" and device.type == "cpu":
        opts = replace(opts, compile_backend="eager")  # the dry run checks the plumbing, not inductor
    fs = F.FastSampler(dit, opts, log=lambda m: print(f"[{mode}] {m}", file=sys.stderr, flush=True))
    # the exact frame count (the figures quoted in BENCHMARKS.md) and the production bucket it rounds up to
    prod = F.bucket_for(exact, F.DEFAULT_LENGTH_BUCKETS) or exact
    buckets = sorted({(b, F.bucket_for(F.packed_length([args.frames] * b), lengths) or lengths[-1])
                      for b in (1, 2) + tuple(args.batches)} | {(1, exact), (1, prod)})
    t0 = time.perf_counter()
    stats = fs.warmup(buckets=buckets)
    stats["wall_s"] = round(time.perf_counter() - t0, 2)
    out[f"{name}_warmup"] = stats
    if not fs.ready:
        print(f"[{mode}] fast path is off after warmup: {stats}", file=sys.stderr)
        return
    key = fs.bucket(1, exact)
    graph = fs._graphs.get(key)
    fs._fill_dummy(fs.buffers.views(*key))
    fs.buffers.step.copy_(torch.tensor([0.3, 0.0]))  # dt 0: repeated replays keep the state finite and real
    if graph is not None:
        out[f"{name}_step_ms"] = time_events(graph.replay, device, args.iters * 2)
        prod_graph = fs._graphs.get((1, prod))
        if prod_graph is not None:
            out[f"{name}_step_ms_bucket{prod}"] = time_events(prod_graph.replay, device, args.iters * 2)
    else:
        v = fs.buffers.views(*key)
        out[f"{name}_step_ms"] = time_events(
            lambda: F.static_step(dit, v, fs.buffers.step, fs.buffers.cfg, fs.buffers.mods), device, args.iters)
    results = bench_sampler(name, fs.sample, dit, args, device, out, args.batches, args.nfe)
    for b, res in results.items():
        out[f"{name}_vs_eager_rel_err_b{b}_nfe{args.nfe[0]}"] = rel_err(res, reference[b])
    if device.type == "cuda":
        out[f"{name}_max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if mode == "compile":
        fs._uncompile_blocks()
    del fs, graph
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_vocos(args, device, out: dict) -> None:
    from tts.f5.vocos import Vocos

    vocos = Vocos.from_dir(args.checkpoints / "vocos-mel-24khz", device=device)
    mels = [torch.randn(100, 650 - 20 * i, device=device) - 4 for i in range(8)]
    out["vocos_per_item_ms_8x650"] = time_host(lambda: [vocos.decode(m[None]) for m in mels], device, 5)
    out["vocos_batched_ms_8x650"] = time_host(lambda: F.vocode_batch(vocos, mels), device, 5)
    out["vocos_one_item_ms_650"] = time_host(lambda: vocos.decode(mels[0][None]), device, 5)


def print_table(out: dict) -> None:
    print("\nF5 micro-benchmarks", out.get("device_name", ""), out.get("dtype", ""), f"frames {out.get('frames')}")
    print(f"{'metric':<44} value")
    for key, value in out.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            print(f"{key:<44} {value}")
    for mode in ("eager", "graph", "compile"):
        w = out.get(f"fast_{mode}_warmup")
        if w:
            print(f"{'fast_' + mode + '_warmup':<44} " + ", ".join(f"{k}={v}" for k, v in w.items()
                                                       if k in ("mode", "compile_s", "capture_s", "graphs",
                                                                "self_check_rel_err", "wall_s", "compile_error",
                                                                "self_check_failed")))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="F5 step / sampler micro-benchmarks")
    p.add_argument("--checkpoints", type=Path, required=True, help="folder with F5TTS_v1_Base/ and vocos-mel-24khz/")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--frames", type=int, default=938, help="frames per item (938 = 10 s: 3 s prompt + 7 s)")
    p.add_argument("--modes", default="graph,compile", help="fast modes to measure (graph, compile, eager)")
    p.add_argument("--compile-mode", default=None, help="inductor mode, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--nfe", default="16,32")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--sample-iters", type=int, default=5)
    p.add_argument("--tiny", action="store_true", help="dry run: fewer iterations (use with tiny checkpoints)")
    args = p.parse_args(argv)
    args.batches = [int(x) for x in args.batches.split(",")]
    args.nfe = [int(x) for x in args.nfe.split(",")]
    if args.tiny:
        args.iters, args.sample_iters, args.nfe = 3, 1, [2, 4]
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    args.out.mkdir(parents=True, exist_ok=True)
    out: dict = {"torch": torch.__version__, "device": str(device), "dtype": args.dtype, "frames": args.frames}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        out["device_name"] = torch.cuda.get_device_name(device)
    model_dir = args.checkpoints / MODEL_NAME
    vocab = load_vocab(model_dir / "vocab.txt")
    cfg = load_config(MODEL_NAME, model_dir, len(vocab))
    t0 = time.perf_counter()
    dit = load_dit(model_dir / "model_1250000.safetensors", cfg, device, dtype)
    out["load_s"] = round(time.perf_counter() - t0, 2)
    out["dit_parameters_m"] = round(sum(x.numel() for x in dit.parameters()) / 1e6, 2)
    peak = measured_peak_tflops(device, dtype) if dtype != torch.float32 else float("nan")
    out["peak_tflops_measured"] = peak
    flops = step_flops(cfg, 1, args.frames)
    out["step_gflop_b1"] = round(flops / 1e9, 1)
    rate = peak if peak == peak else FALLBACK_PEAK_TFLOPS
    out["step_floor_ms_b1"] = round(flops / (rate * 1e12) * 1000, 3)
    out["step_gflop_b8"] = round(step_flops(cfg, 8, args.frames) / 1e9, 1)
    out["step_floor_ms_b8"] = round(step_flops(cfg, 8, args.frames) / (rate * 1e12) * 1000, 3)

    def save():
        (args.out / "micro.json").write_text(json.dumps(out, indent=2))

    with torch.inference_mode():
        bench_eager_step(dit, args, device, out)
    save()
    reference = {}
    with torch.inference_mode():
        eager_batches = [b for b in args.batches]
        reference = bench_sampler("eager", eager_sample, dit, args, device, out, eager_batches, args.nfe[:1])
    save()
    for mode in [m for m in args.modes.split(",") if m]:
        if mode in ("graph",) and device.type != "cuda":
            continue
        try:
            with torch.inference_mode():
                bench_fast(mode, dit, args, device, out, reference)
        except Exception as exc:  # noqa: BLE001 - record and go on to the next mode
            out[f"fast_{mode}_error"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
            print(f"[{mode}] FAILED: {out[f'fast_{mode}_error']}", file=sys.stderr)
        save()
    with torch.inference_mode():
        bench_vocos(args, device, out)
    for name in ("eager", "fast_eager", "fast_graph", "fast_compile"):
        ms = out.get(f"{name}_step_ms")
        if isinstance(ms, float) and ms > 0 and peak == peak:
            out[f"{name}_step_tflops"] = round(flops / (ms / 1000) / 1e12, 1)
    save()
    print_table(out)
    print(f"wrote {args.out / 'micro.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
