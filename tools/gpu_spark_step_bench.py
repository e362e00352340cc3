"""Micro-benchmark of the Spark LLM decode step: `DecodeBatch.step()` eager and in the fast path's forms.

    python tools/gpu_spark_step_bench.py --out RESULTS [--device cuda] [--tiny]

The Spark-TTS-0.5B LLM's architecture (Qwen2.5-0.5B: 24 layers, hidden 896, 14 heads, 2 KV heads,
vocabulary 166000 with Spark's tokens) with the random weights of the full-size random checkpoint
(`tts.spark.demo.llm_weights`: speech tokens favoured as the real model favours them while it
speaks), built in memory. For 1, 8 and 16 running sequences with ~1000-token prompts, times one
`DecodeBatch.step()` (the decode forward, sampling with the default top-k / top-p, the host round
trip: what the engine's loop pays per token) in each form of `FORMS`: eager, compiled in CUDA graphs
with the attention as matrix products or as the Triton kernels, 4 or 8 tokens a replay, with the
speech head (the server's default) or the whole LM head every step. End tokens are masked
(min_new_tokens) since random weights would emit them at random. Writes RESULTS/spark_step.json with
each form's speech-head misses and a kernel profile of the default form at one row. Times are per
token (a fast-path step() makes tokens_per_replay tokens per row); tokens/s per stream = 1000 / ms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from tts.spark.decode import (ATTENTION_ENV, FAST_ENV, TOKENS_ENV, DecodeBatch,  # noqa: E402
                              SamplingParams, Sequence, speech_head_from)

#: The forms timed: name -> (STUDIO_SPARK_FAST, tokens per replay, STUDIO_SPARK_ATTENTION, speech head).
#: The default first: a run cut off by its time limit has the forms that matter most.
FORMS = {"eager": ("0", 1, "matmul", False), "kernel8": ("compile", 8, "kernel", True),
         "kernel8_whole": ("compile", 8, "kernel", False), "kernel": ("compile", 4, "kernel", False),
         "compile": ("compile", 4, "matmul", False)}
DEFAULT_FORM = "kernel8"
#: A tiny model of the same family for CPU dry runs.
TINY_LLM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2)
NEVER_END = 10 ** 6  # min_new_tokens = max_new_tokens: the end token is ignored


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(batch: DecodeBatch, device, iters: int, warmup: int = 3) -> float:
    """Median ms per token of batch.step() (it returns tokens to the host, so each step ends
    synchronized; a fast-path step makes batch.tokens_per_replay tokens per row)."""
    for _ in range(warmup):
        batch.step()
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        batch.step()
        times.append((time.perf_counter() - t0) * 1000 / batch.tokens_per_replay)
    return round(statistics.median(times), 4)


def profile_steps(batch: DecodeBatch, device, n: int = 20, top: int = 25) -> list[dict]:
    """GPU kernels of `n` steps (graph replays included) by total time per token, with the wall time."""
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            batch.step()
        sync(device)
    n *= batch.tokens_per_replay  # per token from here on
    wall = (time.perf_counter() - t0) * 1000 / n
    events = [e for e in prof.key_averages() if getattr(e, "device_time_total", 0) > 0
              and "cuda" in str(getattr(e, "device_type", "")).lower()]
    total = sum(e.device_time_total for e in events)
    rows = [{"wall_ms_per_step_profiled": round(wall, 3), "gpu_ms_per_step": round(total / 1000 / n, 3),
             "kernel_launches_per_step": sum(e.count for e in events) / n}]
    for e in sorted(events, key=lambda e: e.device_time_total, reverse=True)[:top]:
        rows.append({"name": e.key[:120], "ms_per_step": round(e.device_time_total / 1000 / n, 4),
                     "calls_per_step": e.count / n})
    return rows


def bench_batch(model, tok, name: str, slots: int, seq_len: int, prompt_len: int, rows_list, iters: int, device,
                out: dict) -> None:
    """Time form `name` (`FORMS`) at each row count; tok: the model's SparkTokenizer (end and
    semantic ids, where the speech head starts)."""
    fast, tokens, attention, head = FORMS[name]
    os.environ[FAST_ENV], os.environ[TOKENS_ENV], os.environ[ATTENTION_ENV] = fast, str(tokens), attention
    t0 = time.perf_counter()
    batch = DecodeBatch(model, slots, seq_len, head_from=speech_head_from(tok.speech_ids_from) if head else 0)
    sync(device)
    out[f"{name}_batch_build_s"] = round(time.perf_counter() - t0, 2)
    out[f"{name}_tokens_per_replay"] = batch.tokens_per_replay
    if batch.stats:
        out[f"{name}_stats"] = batch.stats
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(max_new_tokens=NEVER_END, min_new_tokens=NEVER_END)
    semantic = torch.as_tensor(tok.semantic_ids)
    for rows in rows_list:
        seqs = []
        t0 = time.perf_counter()
        for i in range(rows):  # a cloning prompt's shape: text, then the reference's semantic tokens
            text = torch.randint(0, tok.speech_ids_from, (prompt_len // 5,), generator=gen)
            speech = semantic[torch.randint(0, len(semantic), (prompt_len - len(text),), generator=gen)]
            seq = Sequence(torch.cat((text, speech)).tolist(), params, end_ids=tok.end_ids, seed=i)
            batch.add(seq)
            seqs.append(seq)
        sync(device)
        out[f"{name}_prefill_ms_each_r{rows}"] = round((time.perf_counter() - t0) * 1000 / rows, 2)
        out[f"{name}_step_ms_r{rows}"] = time_steps(batch, device, iters)
        if rows == 1 and device.type == "cuda" and name in (DEFAULT_FORM, "kernel8_whole"):
            out[f"{name}_profile_r1"] = profile_steps(batch, device)
        for seq in seqs:
            batch.drop(seq)
        out[f"{name}_head_misses_r{rows}"] = batch.head_misses  # cumulative over the row counts
    if name == DEFAULT_FORM and batch.prefill is not None:
        out["prefill_ms"] = time_prefills(batch, tok, device)
    del batch
    if device.type == "cuda":
        torch.cuda.empty_cache()


#: Prompt lengths whose lone prefill (`DecodeBatch.add`: the prefill and the first token's sampling)
#: is timed from the prefill graphs and eagerly: a ~3 s prompt clip's cloning prompt is ~400 tokens.
PREFILL_LENGTHS = (200, 400, 1000)


def time_prefills(batch: DecodeBatch, tok, device, reps: int = 7) -> dict:
    """Median ms of one lone prompt's `add` (prefill + first token) per PREFILL_LENGTHS, with the
    batch's prefill graphs and without them (the eager prefill)."""
    gen = torch.Generator().manual_seed(5)
    params = SamplingParams(max_new_tokens=NEVER_END, min_new_tokens=NEVER_END)
    graphs, res = batch.prefill, {}
    for n in PREFILL_LENGTHS:
        ids = torch.randint(0, tok.speech_ids_from, (n,), generator=gen).tolist()
        for label, prefill in (("graph", graphs), ("eager", None)):
            batch.prefill = prefill
            times = []
            for _ in range(reps):
                seq = Sequence(ids, params, end_ids=tok.end_ids, seed=0)
                sync(device)
                t0 = time.perf_counter()
                batch.add(seq)
                sync(device)
                times.append((time.perf_counter() - t0) * 1000)
                batch.drop(seq)
            res[f"{label}_{n}"] = round(statistics.median(times[1:]), 3)
    batch.prefill = graphs
    return res


def random_llm(folder: Path, tiny: bool, device, dtype):
    """The full-size (or tiny) random Spark LLM of `tts.spark.demo` and its tokenizer (written to folder)."""
    from transformers import Qwen2ForCausalLM

    from tts.spark.demo import DEMO_LLM, FULL_SIZE, llm_weights
    from tts.spark.tokenizer import SparkTokenizer

    arch, vocab, text = (DEMO_LLM | TINY_LLM, None, 0) if tiny else (FULL_SIZE.llm, FULL_SIZE.llm_vocab,
                                                                     FULL_SIZE.text_tokens)
    cfg, state, _ = llm_weights(folder, torch.Generator().manual_seed(1), arch, vocab, text)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg)
    model.load_state_dict(state, strict=False)  # lm_head: tied to the embedding
    model = model.to(dtype).eval().requires_grad_(False)
    return model, SparkTokenizer(folder, (cfg.eos_token_id,))


def save(folder: Path, out: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spark_step.json").write_text(json.dumps(out, indent=2))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tiny", action="store_true", help="tiny model, short prompts (CPU dry run, eager only)")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    slots, seq_len, prompt_len, iters = (16, 2048, 1000, 30) if not args.tiny else (4, 256, 50, 5)
    rows_list = [r for r in (1, 8, 16) if r <= slots] or [slots]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        model, tok = random_llm(Path(folder), args.tiny, device, dtype)
    built_s = round(time.perf_counter() - t0, 1)
    out = {"torch": torch.__version__, "device": str(device), "dtype": args.dtype, "keys": prompt_len,
           "model_built_s": built_s, "speech_ids_from": tok.speech_ids_from,
           "slots": slots, "parameters_m": round(sum(x.numel() for x in model.parameters()) / 1e6, 1)}
    if device.type == "cuda":
        out["device_name"] = torch.cuda.get_device_name(device)
    with torch.inference_mode():
        bench_batch(model, tok, "eager", slots, seq_len, prompt_len, rows_list, iters, device, out)
        save(args.out, out)
        for name in ([n for n in FORMS if n != "eager"] if device.type == "cuda" else ()):
            try:
                bench_batch(model, tok, name, slots, seq_len, prompt_len, rows_list, iters, device, out)
            except Exception as exc:  # noqa: BLE001 - recorded in the results
                out[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:1000]}"
                traceback.print_exc()
            save(args.out, out)  # a run cut off by a time limit keeps what it measured
    save(args.out, out)
    print(f"\nSpark LLM DecodeBatch.step ({out.get('device_name', device)}, {args.dtype}, ~{prompt_len} keys)")
    names = list(FORMS)
    print("rows | " + " | ".join(f"{n} ({FORMS[n][1]} a replay, {FORMS[n][2]}"
                                 f"{', speech head' if FORMS[n][3] else ''})" for n in names)
          + " | tokens/s per stream (best)   (ms per token)")
    for rows in rows_list:
        ms = [out.get(f"{n}_step_ms_r{rows}") for n in names]
        best = min((x for x in ms if x), default=None)
        print(f"{rows} | " + " | ".join(str(x) for x in ms) + f" | {round(1000 / best, 1) if best else ''}")
    for n in names:
        for key in (f"{n}_batch_build_s", f"{n}_error"):
            if key in out:
                print(f"{key}: {out[key]}")
        stats = out.get(f"{n}_stats") or {}
        if "attention" in stats:
            print(f"{n}: attention {stats['attention']} {stats.get('attention_note', '')} "
                  f"check {stats.get('attention_check_rel_error', '')}")
        misses = [out[k] for k in (f"{n}_head_misses_r{r}" for r in rows_list) if k in out]
        if FORMS[n][3] and misses:
            print(f"{n}: speech-head misses (cumulative over the row counts) {misses}")
        if n == DEFAULT_FORM and "prefill_ms" in out:
            print(f"{n}: one prompt's add (prefill + first token), ms: {out['prefill_ms']}")
        prof = out.get(f"{n}_profile_r1")
        if prof:
            print(f"{n} profile at one row: {prof[0]}; top kernels:")
            for row in prof[1:9]:
                print(f"    {row['ms_per_step']:.4f} ms x{row['calls_per_step']:.1f}  {row['name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
