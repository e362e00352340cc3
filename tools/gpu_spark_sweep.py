"""Spark-TTS end to end through Triton on the GPU machine (issue 5), one command.

    python tools/gpu_spark_sweep.py --out $OUT [--tokens 500]

Writes a full-size random-weight Spark-TTS-0.5B folder in the published layout, starts the embedded
Triton server with the Spark models only (start-up time recorded), and runs `python -m studio
bench` offline and streaming with `--fixed-tokens` (random weights never emit the end token).
All JSON lands in --out; a summary table is printed.
"""

from __future__ import annotations

import argparse
import json
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
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ck = args.work / "ckpt"
    t0 = time.perf_counter()
    if not (ck / "Spark-TTS-0.5B" / "config.yaml").is_file():
        from tts.spark.demo import FULL_SIZE, write_demo_checkpoint

        write_demo_checkpoint(ck / "Spark-TTS-0.5B", seed=0, size=FULL_SIZE)
    print(f"full-size random Spark checkpoint ready in {time.perf_counter() - t0:.1f} s", flush=True)

    from studio.server import TritonServer

    server = TritonServer(args.work / "data", checkpoints=ck, no_download=True, families=["spark"], instances=16)
    t0 = time.perf_counter()
    try:
        server.start(timeout_s=400)
    except Exception:
        (args.out / "spark_tritonserver.log").write_text("\n".join(server.log_tail(3000)))
        raise
    startup = time.perf_counter() - t0
    print(f"server ready in {startup:.1f} s", flush=True)
    runs = [("offline", "1,4,16", 16), ("streaming", "1,8", 16)]
    try:
        for mode, levels, n in runs:
            cmd = [sys.executable, "-m", "studio", "bench", "--model", "spark", "--mode", mode, "--concurrency", levels,
                   "--requests", str(n), "--warmup", "2", "--fixed-tokens", str(args.tokens), "--triton-url",
                   server.grpc_url, "--out", str(args.out), "--label", f"random{args.tokens}"]
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, timeout=240)
    finally:
        (args.out / "spark_tritonserver.log").write_text("\n".join(server.log_tail(3000)))
        server.stop()
    (args.out / "spark_startup.json").write_text(json.dumps({"startup_s": round(startup, 2)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
