"""Where one F5 ODE step's time goes on the GPU: kernel profile, attention backends, fused QKV.

    python tools/gpu_f5_profile.py --out RESULTS [--buckets 2x768,1x1024] [--tiny --device cpu]

F5TTS_v1_Base's architecture with random weights (bf16 on CUDA). For each bucket (batch x frames):
the step through the fast path as the server runs it (compiled blocks in a CUDA graph, `FastSampler`;
a bucket BxN is B items packed into N frames),
timed with CUDA events; then the same step compiled but not captured, under torch.profiler, with
the kernels that take the most GPU time. Also SDPA alone at one layer's shape, per backend, with
the key mask the DiT uses (and flash without a mask, which the DiT cannot use, for scale).
Writes RESULTS/f5_profile.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tts.f5 import fast as FF  # noqa: E402
from tts.f5.config import F5Config, load_config  # noqa: E402
from tts.f5.dit import DiT  # noqa: E402

TINY = F5Config(dim=64, depth=2, heads=4, dim_head=16, text_dim=32, conv_layers=1, text_num_embeds=60)


def cuda_ms(fn, iters: int, device) -> float:
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) * 1000 / iters
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return round(statistics.median(times), 4)


def sdpa_backends(cfg: F5Config, b: int, t: int, device, dtype) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(device="cpu").manual_seed(0)
    shape = (2 * b, cfg.heads, t, cfg.dim_head)
    q, k, v = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(3))
    lens = torch.full((2 * b,), t - t // 7)
    mask = (torch.arange(t)[None, :] < lens[:, None]).to(device)[:, None, None, :]
    out = {}
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            continue
        for masked in (True, False):
            key = f"{name.lower()}{'' if masked else '_nomask'}"
            try:
                with sdpa_kernel([backend]):
                    m = mask if masked else None
                    out[key] = cuda_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=m), 20, device)
            except Exception as exc:  # noqa: BLE001 - backend not available for this shape
                out[key] = f"{type(exc).__name__}: {str(exc)[:120]}"
    return out


def conv_variants(dit, b: int, t: int, device, dtype) -> dict:
    """The convolutional position embedding (two grouped conv1d, kernel 31, 16 groups) alone, per
    implementation: ms for the whole module and the largest difference from the current one."""
    cpe = dit.input_embed.conv_pos_embed
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2 * b, t, dit.cfg.dim, generator=g).to(device, dtype)
    mask = (torch.arange(t)[None, :] < torch.full((2 * b, 1), t - t // 7)).to(device)
    ref = cpe(x, mask)
    convs = [cpe.conv1d[0], cpe.conv1d[2]]
    m = ~mask[:, :, None]

    def cl2d(h):  # [B, T, C] -> conv2d on a channels-last [B, C, 1, T] view (no layout copies)
        for conv in convs:
            w = conv.weight.unsqueeze(2).contiguous(memory_format=torch.channels_last)
            h4 = h.masked_fill(m, 0.0).transpose(1, 2).unsqueeze(2)
            y = F.conv2d(h4, w, conv.bias, padding=(0, conv.padding[0]), groups=conv.groups)
            h = F.mish(y.squeeze(2).transpose(1, 2).masked_fill(m, 0.0))
        return h

    def as_matmul(h):  # per group x @ W' -> [B, T, G, K, Cg], then the shifted sum over K
        for conv in convs:
            c_out, cg, k = conv.weight.shape
            grp = conv.groups
            pad = conv.padding[0]
            w = conv.weight.view(grp, c_out // grp, cg, k).permute(0, 2, 3, 1).reshape(grp, cg, k * (c_out // grp))
            hb, ht, _ = h.shape
            xg = h.masked_fill(m, 0.0).view(hb * ht, grp, cg).transpose(0, 1)  # [G, BT, Cg]
            z = torch.bmm(xg, w).view(grp, hb, ht, k, c_out // grp)
            z = F.pad(z, (0, 0, 0, 0, pad, pad))
            y = sum(z[:, :, j: j + ht, j] for j in range(k))  # [G, B, T, Cg]
            y = y.permute(1, 2, 0, 3).reshape(hb, ht, c_out) + conv.bias
            h = F.mish(y.masked_fill(m, 0.0))
        return h

    out = {}
    variants = {"conv1d": lambda: cpe(x, mask), "conv2d_channels_last": lambda: cl2d(x),
                "matmul_shift_sum": lambda: as_matmul(x)}
    for bench in (False, True):
        torch.backends.cudnn.benchmark = bench
        for name, fn in variants.items():
            if bench and name == "matmul_shift_sum":
                continue
            key = name + ("_cudnn_benchmark" if bench else "")
            try:
                y = fn()
                err = float((y - ref).abs().max()) if name != "conv1d" else 0.0
                out[key] = {"ms": cuda_ms(fn, 20, device), "max_abs_diff": round(err, 5)}
            except Exception as exc:  # noqa: BLE001
                out[key] = f"{type(exc).__name__}: {str(exc)[:200]}"
    torch.backends.cudnn.benchmark = False
    try:
        comp = torch.compile(as_matmul, dynamic=False)
        comp(x)
        out["matmul_shift_sum_compiled"] = {"ms": cuda_ms(lambda: comp(x), 20, device),
                                            "max_abs_diff": round(float((comp(x) - ref).abs().max()), 5)}
    except Exception as exc:  # noqa: BLE001
        out["matmul_shift_sum_compiled"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return out


def varlen_vs_sdpa(cfg: F5Config, lens: list[int], t: int, device, dtype) -> dict:
    """Attention for one layer over sequences of `lens` frames (cond and uncond rows): padded to t
    with SDPA and the key mask (what the DiT runs), and packed with flash varlen (no padding)."""
    out: dict = {}
    g = torch.Generator(device="cpu").manual_seed(0)
    h, dh = cfg.heads, cfg.dim_head
    n = sum(lens)
    q, k, v = (torch.randn(n, h, dh, generator=g).to(device, dtype) for _ in range(3))
    cu = torch.tensor([0] + list(__import__("itertools").accumulate(lens)), dtype=torch.int32, device=device)
    try:
        from torch.nn.attention.varlen import varlen_attn
        out["varlen_ms"] = cuda_ms(lambda: varlen_attn(q, k, v, cu, cu, max(lens), max(lens)), 20, device)
    except Exception as exc:  # noqa: BLE001
        out["varlen_ms"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    try:
        fa = torch.ops.aten._flash_attention_forward
        out["aten_flash_varlen_ms"] = cuda_ms(lambda: fa(q, k, v, cu, cu, max(lens), max(lens), 0.0, False, False), 20, device)
    except Exception as exc:  # noqa: BLE001
        out["aten_flash_varlen_ms"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    from tts.f5 import attention_kernel as AK

    if AK.available():
        for config in AK.CONFIGS:  # in a CUDA graph, as the server runs it (no Python launch cost)
            try:
                out[f"triton_{config}_graph_ms"] = round(FF.graph_us(
                    lambda c=config: AK.packed_attention_triton(q, k, v, cu, c), device, 20) / 1000, 4)
            except Exception as exc:  # noqa: BLE001
                out[f"triton_{config}_graph_ms"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    qp, kp, vp = (torch.randn(len(lens), h, t, dh, generator=g).to(device, dtype) for _ in range(3))
    mask = (torch.arange(t)[None, :] < torch.tensor(lens)[:, None]).to(device)[:, None, None, :]
    out["sdpa_masked_padded_ms"] = cuda_ms(lambda: F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask), 20, device)
    if device.type == "cuda":
        out["sdpa_masked_padded_graph_ms"] = round(FF.graph_us(
            lambda: F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask), device, 20) / 1000, 4)
        try:
            from torch.nn.attention.varlen import varlen_attn
            out["varlen_graph_ms"] = round(FF.graph_us(
                lambda: varlen_attn(q, k, v, cu, cu, max(lens), max(lens)), device, 20) / 1000, 4)
        except Exception as exc:  # noqa: BLE001
            out["varlen_graph_ms"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return out


def sample_and_vocos(dit, sampler, jobs: list[tuple[int, int]], device, dtype, vocos_dir) -> dict:
    """One request's whole DiT work as the server runs it: FastSampler.sample on chunks of
    (reference, total) frames at 16 NFE (text embedding, input copies, graph replays), and Vocos."""
    cfg = dit.cfg
    g = torch.Generator(device="cpu").manual_seed(0)
    b, frames = len(jobs), max(tot for _, tot in jobs)
    refs = torch.tensor([r for r, _ in jobs], device=device)
    tots = torch.tensor([tot for _, tot in jobs], device=device)
    cond = torch.randn(b, frames, cfg.mel_dim, generator=g).to(device)
    noise = torch.randn(b, frames, cfg.mel_dim, generator=g).to(device)
    ids = torch.randint(0, cfg.text_num_embeds, (b, 120), generator=g).to(device)
    run = lambda: sampler.sample(dit, cond, ids, refs, tots, noise, 16, 2.0, -1.0)  # noqa: E731
    out = {"jobs": jobs, "bucket": sampler.bucket(b, FF.packed_length([tot for _, tot in jobs])),
           "sample_16nfe_ms": cuda_ms(run, 5, device)}
    if vocos_dir is not None:
        from tts.f5.vocos import Vocos
        vocos = Vocos.from_dir(vocos_dir, device=device)
        mels = [torch.randn(100, tot - r, generator=g).to(device) for r, tot in jobs]
        out["vocode_batch_ms"] = cuda_ms(lambda: FF.vocode_batch(vocos, mels), 5, device)
    return out


def full_bucket(sampler, b: int, t: int):
    """The bucket's static buffers holding items that fill it as the server's do (a lone item
    within 14 frames of its row, packed items their share less the gap), the prologue run: the
    attention then covers what a request's does (random shorter items would flatter kernels that
    skip padding against masked SDPA, which computes it)."""
    v = sampler.buffers.views(b, t)
    lens = [t - 14] if b == 1 else [t // b - FF.ITEM_GAP] * b
    sampler._fill_dummy(v, lens=lens)
    with FF.step_context():
        FF.static_prologue(sampler.dit, v)
    return v


def profile_step(dit, sampler, b: int, t: int, device, top: int = 30) -> list[dict]:
    """The compiled (uncaptured) step under torch.profiler: kernels by total GPU time."""
    from torch.profiler import ProfilerActivity, profile

    v = full_bucket(sampler, b, t)
    step = lambda: FF.static_step(dit, v, sampler.buffers.step, sampler.buffers.cfg, sampler.buffers.mods)  # noqa: E731
    with FF.step_context():
        for _ in range(3):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(5):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    rows = []
    attr = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    if device.type == "cuda":  # kernels only (no CPU-side op rows)
        events = [e for e in events if getattr(e, "device_type", None) is not None and "cuda" in str(e.device_type).lower()]
    total = sum(getattr(e, attr) for e in events) or 1
    for e in sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:top]:
        rows.append({"name": e.key[:140], "ms_per_step": round(getattr(e, attr) / 1000 / 5, 4),
                     "calls_per_step": e.count / 5, "share": round(getattr(e, attr) / total, 4)})
    launches = sum(e.count for e in events) / 5
    return [{"total_ms_per_step": round(total / 1000 / 5, 3), "kernels": len(events),
             "launches_per_step": launches}] + rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--buckets", default="2x768,1x1024")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--vocos", type=Path, default=None, help="a vocos-mel-24khz folder (times vocode_batch)")
    p.add_argument("--requests", default="280:850|280:470,280:665|280:665",
                   help="requests as ref:total frames per chunk, chunks by ',', requests by '|'")
    p.add_argument("--no-profile", action="store_true", help="skip the torch.profiler run")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = TINY if args.tiny else load_config("F5TTS_v1_Base", vocab_size=2545)
    torch.manual_seed(0)
    dit = DiT(cfg).to(device, dtype).eval().requires_grad_(False)
    buckets = [tuple(int(x) for x in s.split("x")) for s in args.buckets.split(",")]
    out: dict = {"torch": torch.__version__, "device": str(device), "dtype": str(dtype), "buckets": buckets}
    if device.type == "cuda":
        out["device_name"] = torch.cuda.get_device_name(device)
    mode = "compile"
    opts = FF.FastOptions(mode=mode, batch_buckets=tuple(sorted({b for b, _ in buckets})),
                          length_buckets=tuple(sorted({t for _, t in buckets})), self_check=False,
                          compile_backend="inductor" if device.type == "cuda" else "eager")
    sampler = FF.FastSampler(dit, opts)
    t0 = time.perf_counter()
    out["warmup"] = sampler.warmup(buckets)
    out["warmup_s"] = round(time.perf_counter() - t0, 2)
    for b, t in buckets:
        key = f"{b}x{t}"
        res: dict = {}
        graph = sampler._graphs.get((b, t))
        if graph is not None:
            full_bucket(sampler, b, t)
            res["graph_step_ms"] = cuda_ms(graph.replay, 30, device)
        if not args.no_profile:
            res["profile"] = profile_step(dit, sampler, b, t, device)
        with torch.no_grad():
            res["conv_pos_embed"] = conv_variants(dit, b, t, device, dtype)
        if device.type == "cuda":
            res["sdpa_one_layer_ms"] = sdpa_backends(cfg, b, t, device, dtype)
        out[key] = res
        print(key, json.dumps(res, indent=1)[:3000], flush=True)
    for spec in args.requests.split("|"):
        jobs = [tuple(int(x) for x in c.split(":")) for c in spec.split(",")]
        key = "request_" + spec
        try:
            out[key] = sample_and_vocos(dit, sampler, jobs, device, dtype, args.vocos)
            lens = [tot for _, tot in jobs] * 2
            if device.type == "cuda":
                out[key]["attention_one_layer"] = varlen_vs_sdpa(cfg, lens, max(lens), device, dtype)
        except Exception as exc:  # noqa: BLE001
            out[key] = f"{type(exc).__name__}: {str(exc)[:300]}"
        print(key, json.dumps(out[key]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "f5_profile.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
