"""Spark-TTS end to end through Triton on the GPU machine, one command.

    python tools/gpu_spark_sweep.py --out $OUT [--tokens 500] [--offline 1,4,16] [--streaming 1,8]
        [--requests 16] [--eager-requests 2] [--attention matmul|kernel] [--ab-levers]
        [--variant LABEL:NAME=VALUE,...] [--tiny]

Writes a full-size random-weight Spark-TTS-0.5B folder in the published layout, starts the embedded
Triton server with the Spark models only (start-up time recorded), and runs `python -m studio
bench` offline and streaming with `--fixed-tokens` (random weights never emit the end token).
Then (unless --eager-requests 0) the same server with the fast path off (STUDIO_SPARK_FAST=0, the
eager decode step) for a short offline run at concurrency 1: the same-run eager comparison.
--ab-levers adds, in the same run, the fast server with the engine's vocoder thread, joint
prefill, first-chunk single steps, prefill graphs, the first window's vocoder graph and the
vocoder's batches off (STUDIO_SPARK_VOCODE_THREAD=0, STUDIO_SPARK_JOIN_PREFILL=0,
STUDIO_SPARK_ALIGN_FIRST_CHUNK=0, STUDIO_SPARK_PREFILL_GRAPHS=0, STUDIO_SPARK_VOCODE_GRAPHS=0,
STUDIO_SPARK_VOCODE_BATCH=0) at the highest offline level and every streaming level (the
single steps matter most to the first chunk at c=1; bench label `levers-off`). --attention sets the decode step's
attention form (STUDIO_SPARK_ATTENTION) of the fast servers. Each --variant adds the fast server
with its own settings, streaming levels only (one lever at a time). All JSON lands in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, default=Path("/tmp/spark-sweep"))
    p.add_argument("--tokens", type=int, default=500)
    p.add_argument("--offline", default="1,4,16", help="offline concurrency levels ('' = none)")
    p.add_argument("--streaming", default="1,8", help="streaming concurrency levels ('' = none)")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--eager-requests", type=int, default=2, help="requests of the eager run (0 = no eager run)")
    p.add_argument("--tiny", action="store_true", help="CPU dry run: the tiny demo checkpoint")
    p.add_argument("--no-restart", action="store_true",
                   help="skip the second start of the fast server (same data folder: warm compile cache)")
    p.add_argument("--attention", choices=("matmul", "kernel"), default=None,
                   help="STUDIO_SPARK_ATTENTION of the fast servers (default: the engine's default)")
    p.add_argument("--ab-levers", action="store_true",
                   help="also the fast server with the engine levers off (vocoder thread and batching, joint "
                        "prefill, first-chunk single steps, prefill and vocoder graphs; same run)")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL:NAME=VALUE[,NAME=VALUE]",
                   help="also the fast server with these settings (SWEPT_ENV names), streaming levels only, "
                        "under bench label LABEL (repeatable; e.g. vocode-off:STUDIO_SPARK_VOCODE_THREAD=0)")
    args = p.parse_args()
    variants = [parse_variant(v) for v in args.variant]
    args.out.mkdir(parents=True, exist_ok=True)
    ck = args.work / "ckpt"
    t0 = time.perf_counter()
    if not (ck / "Spark-TTS-0.5B" / "config.yaml").is_file():
        from tts.spark.demo import FULL_SIZE, write_demo_checkpoint

        if args.tiny:
            write_demo_checkpoint(ck / "Spark-TTS-0.5B", seed=0)
        else:
            write_demo_checkpoint(ck / "Spark-TTS-0.5B", seed=0, size=FULL_SIZE)
    print(f"random Spark checkpoint ready in {time.perf_counter() - t0:.1f} s", flush=True)
    runs = [("offline", args.offline, args.requests, "fast", 2), ("streaming", args.streaming, args.requests,
                                                                  "fast", 2)]
    fast = {"STUDIO_SPARK_FAST": os.environ.get("STUDIO_SPARK_FAST"), "STUDIO_SPARK_ATTENTION": args.attention}
    top = [lv.split(",")[-1] for lv in (args.offline, args.streaming)]
    levers_off = [("offline", top[0], args.requests, "levers-off", 2),
                  ("streaming", args.streaming, args.requests, "levers-off", 2)] if args.ab_levers else []
    startup = {}
    plan = [("fast", fast, runs, "fast"), ("fast-restart", fast, [], "fast"),
            ("levers-off", fast | {"STUDIO_SPARK_VOCODE_THREAD": "0", "STUDIO_SPARK_JOIN_PREFILL": "0",
                                   "STUDIO_SPARK_ALIGN_FIRST_CHUNK": "0", "STUDIO_SPARK_PREFILL_GRAPHS": "0",
                                   "STUDIO_SPARK_VOCODE_GRAPHS": "0", "STUDIO_SPARK_VOCODE_BATCH": "0"}, levers_off,
             "fast"),
            *[(label, fast | env, [("streaming", args.streaming, args.requests, label, 2)], "fast")
              for label, env in variants],
            ("eager", {"STUDIO_SPARK_FAST": "0"}, [("offline", "1", args.eager_requests, "eager", 1)], "eager")]
    for label, env, todo, data in plan:
        todo = [r for r in todo if r[1] and r[2] > 0]
        if label == "fast-restart":  # start-up again on the first start's compile cache, no benches
            if args.no_restart or startup.get("fast") is None:
                continue
        elif not todo:
            continue
        startup[label] = serve_and_bench(args, ck, label, env, todo, data)
        (args.out / "spark_startup.json").write_text(json.dumps({f"startup_s_{k}": v for k, v in startup.items()}
                                                                | {"startup_s": startup.get("fast")}))
    return 0


def parse_variant(text: str) -> tuple[str, dict]:
    """'LABEL:NAME=VALUE,NAME=VALUE' -> (LABEL, {NAME: VALUE}); names must be SWEPT_ENV's."""
    label, _, rest = text.partition(":")
    env = dict(item.split("=", 1) for item in rest.split(",") if "=" in item)
    unknown = sorted(set(env) - set(SWEPT_ENV))
    if not label or not env or unknown:
        raise SystemExit(f"--variant {text!r}: want LABEL:NAME=VALUE[,NAME=VALUE] with names from {SWEPT_ENV}"
                         + (f" (unknown: {unknown})" if unknown else ""))
    return label, env


#: The settings a sweep's servers are started with; each server gets all of them (unset: the default).
SWEPT_ENV = ("STUDIO_SPARK_FAST", "STUDIO_SPARK_ATTENTION", "STUDIO_SPARK_VOCODE_THREAD", "STUDIO_SPARK_JOIN_PREFILL",
             "STUDIO_SPARK_ALIGN_FIRST_CHUNK", "STUDIO_SPARK_SPEECH_HEAD", "STUDIO_SPARK_PREFILL_GRAPHS",
             "STUDIO_SPARK_VOCODE_GRAPHS", "STUDIO_SPARK_VOCODE_BATCH")


def serve_and_bench(args, ck: Path, label: str, env: dict, runs: list, data: str) -> float | None:
    """Start the Spark-only server with the settings `env` (SWEPT_ENV names; None or absent: unset)
    on data folder `data-{data}`, run the benches, stop it; start-up s."""
    from studio.server import TritonServer

    for name in SWEPT_ENV:
        if env.get(name) is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = env[name]
    print(f"server '{label}': " + " ".join(f"{k}={os.environ.get(k, '')}" for k in SWEPT_ENV), flush=True)
    server = TritonServer(args.work / f"data-{data}", checkpoints=ck, no_download=True, families=["spark"],
                          instances=16)
    t0 = time.perf_counter()
    try:
        server.start(timeout_s=400)
    except Exception as exc:  # noqa: BLE001 - recorded; the sweep goes on
        (args.out / f"spark_tritonserver_{label}.log").write_text("\n".join(server.log_tail(3000)))
        print(f"server '{label}' did not start: {exc}", flush=True)
        server.stop()
        return None
    startup = round(time.perf_counter() - t0, 2)
    print(f"server '{label}' ready in {startup:.1f} s", flush=True)
    try:
        for mode, levels, n, tag, warmup in runs:
            cmd = [sys.executable, "-m", "studio", "bench", "--model", "spark", "--mode", mode, "--concurrency", levels,
                   "--requests", str(n), "--warmup", str(warmup), "--fixed-tokens",
                   str(args.tokens), "--triton-url", server.grpc_url, "--out", str(args.out),
                   "--label", f"{tag}{args.tokens}"]
            print(" ".join(cmd), flush=True)
            try:
                subprocess.run(cmd, timeout=240)
            except subprocess.TimeoutExpired:
                print(f"bench {mode} {levels} ({label}) ran past 240 s", flush=True)
    finally:
        lines = server.log_tail(20000)
        keep = [ln for ln in lines if any(w in ln.lower() for w in ("error", "unhealthy", "not healthy", "traceback",
                                                                   "exception", "killed", "[spark-fast]", "ready on", "fatal",
                                                                   "thread 0x", "file \""))]
        (args.out / f"spark_server_{label}.txt").write_text("\n".join(keep[:400] + ["----- last lines -----"]
                                                                      + lines[-150:]))
        server.stop()
    return startup


if __name__ == "__main__":
    raise SystemExit(main())
