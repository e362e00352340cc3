"""Micro-benchmark of the Spark LLM decode step: eager `forward_step` vs `GraphedDecodeStep` (CUDA graphs).

    python tools/gpu_spark_step_bench.py --out RESULTS [--device cuda] [--tiny]

The Spark-TTS-0.5B LLM's architecture (Qwen2.5-0.5B: 24 layers, hidden 896, 14 heads, 2 KV heads,
vocabulary 166000 with Spark's tokens) with random weights, built in place (no checkpoint needed),
a static KV cache of 16 slots x 2048 positions filled with random keys. Times one decode step at
1, 8 and 16 running rows with 1000 keys each: eager, then replayed from the graphs; also the graph
warm-up. Writes RESULTS/spark_step.json and prints a table. Decode tokens/s per stream = 1000 / ms.
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

from tts.spark.fast_step import GraphedDecodeStep, StepOptions  # noqa: E402
from tts.spark.llm import forward_step, new_cache  # noqa: E402

#: Qwen2.5-0.5B as Spark-TTS-0.5B's LLM/config.json has it (vocabulary grown by Spark's tokens).
SPARK_LLM = dict(vocab_size=166000, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                 rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
TINY_LLM = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True)


def time_ms(fn, device, iters=30, warmup=3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 4)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tiny", action="store_true", help="tiny model on the CPU, bucketed path without graphs")
    args = p.parse_args(argv)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    slots, seq_len, keys = (16, 2048, 1000) if not args.tiny else (4, 512, 100)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(Qwen2Config(**(TINY_LLM if args.tiny else SPARK_LLM)))
    model = model.to(dtype).eval().requires_grad_(False)
    cache = new_cache(model, slots, seq_len)
    with torch.no_grad():
        cache.k.normal_(0, 1)
        cache.v.normal_(0, 1)
    out = {"torch": torch.__version__, "device": str(device), "dtype": args.dtype, "keys": keys, "slots": slots,
           "parameters_m": round(sum(x.numel() for x in model.parameters()) / 1e6, 1)}
    if device.type == "cuda":
        out["device_name"] = torch.cuda.get_device_name(device)
    mode = "eager" if device.type != "cuda" else "graph"
    step = GraphedDecodeStep(model, cache, StepOptions(mode=mode))
    t0 = time.perf_counter()
    with torch.inference_mode():
        out["warmup"] = step.warmup()
    out["warmup_wall_s"] = round(time.perf_counter() - t0, 2)
    with torch.inference_mode():
        for rows in (1, 8, 16):
            rows = min(rows, slots)
            tokens = torch.randint(0, model.config.vocab_size, (rows,))
            positions = torch.full((rows,), keys - 1)
            out[f"eager_step_ms_r{rows}"] = time_ms(lambda: forward_step(model, cache, tokens, positions, keys), device)
            out[f"fast_step_ms_r{rows}"] = time_ms(lambda: step(model, cache, tokens, positions, keys), device)
            ref = forward_step(model, cache, tokens, positions, keys)
            fast = step(model, cache, tokens, positions, keys)
            out[f"fast_vs_eager_rel_err_r{rows}"] = round(float((fast - ref).norm() / ref.norm()), 6)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "spark_step.json").write_text(json.dumps(out, indent=2))
    print(f"\nSpark LLM decode step ({out.get('device_name', device)}, {args.dtype}, {keys} keys)")
    print("rows | eager ms | graph ms | tokens/s per stream (graph) | rel err")
    for rows in sorted({min(r, slots) for r in (1, 8, 16)}):
        g = out[f"fast_step_ms_r{rows}"]
        print(f"{rows} | {out[f'eager_step_ms_r{rows}']} | {g} | {round(1000 / g, 1)} | "
              f"{out[f'fast_vs_eager_rel_err_r{rows}']}")
    print(f"warm-up: {out['warmup']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
