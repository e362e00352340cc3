"""What the objective checks add to a generation: Whisper recognition + two speaker embeddings.

    python tools/gpu_check_bench.py --out DIR [--tiny] [--requests 20] [--concurrency 1,8] [--tokens 32]

Writes random checkpoints of the published architectures (Whisper large-v3-turbo, WavLM base-plus
x-vector; `--tiny` writes the demo sizes for a CPU dry run), starts the embedded tritonserver with
only the `asr` and `speaker_sim` models (on the GPU when there is one), and times the calls `run_checks`
makes for a generation: the output (7 s of 24 kHz speech-like audio) read back with a fixed decode
length (a random Whisper never emits end-of-text; 32 tokens is about what 7 s of English speech
needs), and embeddings of the output and a 3 s prompt. Per concurrency level: the wall time per
generation (p50/p90/mean), and the server's compute time of each model. Results: DIR/check_bench.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

OUTPUT_S, PROMPT_S, SR = 7.0, 3.0, 24000


def speech_like(seconds: float, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    phase = 2 * np.pi * np.cumsum(120 + 20 * np.sin(2 * np.pi * 0.7 * t)) / SR
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    return (0.1 * voiced * 0.5 * (1 + np.sin(2 * np.pi * 4 * t)) ** 2 + 0.003 * rng.standard_normal(t.size)
            ).astype(np.float32)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def checks_calls(client, output, prompt, tokens: int) -> tuple[str, float]:
    """The three model calls `studio.objective.run_checks` makes (scoring the text takes microseconds
    and needs jiwer, which the GPU machine lacks): (recognised text, similarity)."""
    import numpy as np

    from studio.audio_io import resample

    out16 = resample(output, SR, 16000)
    text, _ = client.transcribe(out16, 16000, language="en", fixed_tokens=tokens)
    e_prompt, _ = client.embed(resample(prompt, SR, 16000), 16000)
    e_out, _ = client.embed(out16, 16000)
    return text, float(np.dot(e_prompt, e_out))


def bench(client, concurrency: int, requests: int, tokens: int) -> dict:
    outputs = [speech_like(OUTPUT_S, seed=i) for i in range(requests)]
    prompt = speech_like(PROMPT_S, seed=1000)
    times, results, lock = [], [], threading.Lock()
    queue = list(range(requests))

    def worker():
        while True:
            with lock:
                if not queue:
                    return
                i = queue.pop()
            t0 = time.perf_counter()
            res = checks_calls(client, outputs[i], prompt, tokens)
            dt = time.perf_counter() - t0
            with lock:
                times.append(dt)
                results.append(res)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    bad = [r for r in results if not -1.0001 <= r[1] <= 1.0001]
    return {"concurrency": concurrency, "requests": requests, "tokens": tokens, "wall_s": round(wall, 3),
            "per_generation_ms": {"p50": round(1000 * percentile(times, 0.5), 1),
                                  "p90": round(1000 * percentile(times, 0.9), 1),
                                  "mean": round(1000 * statistics.fmean(times), 1)},
            "generations_per_s": round(requests / wall, 2), "incomplete": bad[:3]}


def server_compute(client) -> dict:
    out = {}
    for name in ("asr", "speaker_sim"):
        stats = client.statistics(name).get("model_stats", [{}])[0]
        infer = stats.get("inference_stats", {})
        n = int(infer.get("success", {}).get("count", 0)) or 1
        execs = int(stats.get("execution_count", 0)) or 1
        out[name] = {"requests": n, "executions": execs,
                     "compute_infer_ms_per_request": round(int(infer.get("compute_infer", {}).get("ns", 0)) / n / 1e6, 2),
                     "queue_ms_per_request": round(int(infer.get("queue", {}).get("ns", 0)) / n / 1e6, 2)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tiny", action="store_true", help="demo-size models (CPU dry run)")
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--concurrency", default="1,8")
    p.add_argument("--tokens", type=int, default=32, help="fixed decode length per recognition")
    p.add_argument("--work", type=Path, default=None)
    args = p.parse_args(argv)
    from studio.client import StudioClient
    from studio.server import TritonServer, visible_gpus
    from tts.check_models_demo import WAVLM_DIR, WHISPER_DIR, write_wavlm, write_whisper

    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="check-bench-"))
    ck = work / "ckpt"
    size = "demo" if args.tiny else "full"
    t0 = time.perf_counter()
    write_whisper(ck / WHISPER_DIR, size)
    write_wavlm(ck / WAVLM_DIR, size)
    written_s = time.perf_counter() - t0
    gpus = visible_gpus()
    server = TritonServer(work / "data", checkpoints=ck, no_download=True, families=["asr", "sim"], gpus=gpus)
    t0 = time.perf_counter()
    server.start(timeout_s=900)
    startup_s = time.perf_counter() - t0
    result = {"device": f"cuda:{gpus}" if gpus else "cpu", "size": size, "checkpoints_written_s": round(written_s, 1),
              "server_startup_s": round(startup_s, 1), "output_s": OUTPUT_S, "prompt_s": PROMPT_S, "levels": []}
    try:
        with StudioClient(server.grpc_url) as client:
            bench(client, 1, 3, args.tokens)  # warm-up (CUDA kernels, allocator)
            for level in (int(c) for c in args.concurrency.split(",")):
                result["levels"].append(bench(client, level, args.requests, args.tokens))
                print(json.dumps(result["levels"][-1]), flush=True)
                (args.out / "check_bench.json").write_text(json.dumps(result, indent=2))
            result["server"] = server_compute(client)
    finally:
        server.stop()
    (args.out / "check_bench.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
