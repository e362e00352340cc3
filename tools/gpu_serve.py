"""Start the embedded Triton server with the F5 models only, time its start-up, serve until stopped.

    python tools/gpu_serve.py --checkpoints DIR --data-dir D --grpc-port P --http-port Q \
        --ready-file startup.json [--label fast] [--log-copy tritonserver.log]

The start-up time runs from this process's start (before weights are resolved) to Triton's
readiness, which the F5 engine reaches only after its fast-path warm-up (compile and CUDA-graph
capture): exactly what a user waits after `python app.py`. When ready it writes the ready file
(JSON: startup_s, the engine's "[f5-fast] warmup done" stats from the server log, the fast-path
env), then serves until SIGTERM / SIGINT and stops the whole server process group.
Used by tools/gpu_sweep.sh; benches then connect with `python -m studio bench --triton-url`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

T_START = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FAST_LOG_TAG = "[f5-fast]"
ENGINE_LOG_TAG = "[f5_engine]"


def find_wheel_without_importing_it() -> str | None:
    """Kept for the sweep's log line; no workaround is needed any more."""
    return None  # studio.server now finds the wheel with importlib.util.find_spec, importing nothing


def warmup_stats(lines: list[str]) -> list[dict]:
    """The JSON stats of every "[f5-fast] warmup done: {...}" line (one per engine instance)."""
    from tts.f5.fast import WARMUP_LOG_PREFIX

    found = []
    for line in lines:
        if FAST_LOG_TAG in line and WARMUP_LOG_PREFIX in line:
            try:
                found.append(json.loads(line.split(WARMUP_LOG_PREFIX, 1)[1].strip()))
            except json.JSONDecodeError:
                found.append({"unparsed": line[-500:]})
    return found


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)  # the sweep polls for this file: it must appear whole


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--ready-file", type=Path, required=True)
    p.add_argument("--label", default="")
    p.add_argument("--log-copy", type=Path, default=None, help="copy tritonserver.log here when stopping")
    p.add_argument("--instances", type=int, default=None, help="front-end instances (default: the server's)")
    p.add_argument("--timeout", type=float, default=600)
    args = p.parse_args(argv)

    wheel_note = find_wheel_without_importing_it()
    if wheel_note:
        print(f"note: {wheel_note}", file=sys.stderr, flush=True)
    from studio.server import ServerStartError, TritonServer

    os.environ.setdefault("STUDIO_DATA_DIR", str(args.data_dir))  # the engine's compile cache goes under it
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server = TritonServer(args.data_dir, http_port=args.http_port, grpc_port=args.grpc_port,
                          checkpoints=args.checkpoints, no_download=True, instances=args.instances,
                          families=["f5"])
    info = {"label": args.label, "fast_env": os.environ.get("STUDIO_F5_FAST"), "grpc_url": server.grpc_url,
            "wheel_note": wheel_note}
    try:
        server.start(timeout_s=args.timeout)
    except ServerStartError as exc:
        info.update(ok=False, error=str(exc)[-4000:], startup_s=round(time.perf_counter() - T_START, 2))
        write_json(args.ready_file, info)
        print(f"server failed to start: {exc}", file=sys.stderr)
        return 1
    startup = time.perf_counter() - T_START
    lines = server.log_tail(5000)
    status = server.status()
    info.update(ok=True, startup_s=round(startup, 2), gpus=status["gpus"], demo_weights=status["demo_weights"],
                warmup=warmup_stats(lines),
                engine_lines=[ln[-400:] for ln in lines if FAST_LOG_TAG in ln or ENGINE_LOG_TAG in ln][-20:])
    write_json(args.ready_file, info)
    print(f"ready in {startup:.1f} s at {server.grpc_url}", flush=True)
    try:
        while not stop.wait(2.0):
            if server.status()["state"] == "failed":
                print("server failed while serving", file=sys.stderr)
                break
    finally:
        if args.log_copy and server.log_path and server.log_path.is_file():
            shutil.copy(server.log_path, args.log_copy)
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
