"""`python -m studio loadtest`: a bounded load run through the page's own API, on loopback.

Drives the page's `/clone` event with `gradio_client` (the way a browser's queue calls reach the
handlers), `--requests` in all with at most `--concurrency` in flight, then stops by itself. Without
`--url` it starts `python app.py` on free loopback ports with demo weights (unless told otherwise)
in a data folder of its own, and stops it at the end. Reports failures (busy answers, naming the
per-client limit, are counted apart), latency percentiles, and the summed proportional set size
(PSS, /proc/PID/smaps_rollup) of the app's tritonserver and its stubs: before, per quarter of the
run, and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from studio.config import PROJECT_ROOT

DEFAULT_TEXT = "The quick brown fox jumps over the lazy dog."
DEFAULT_PROMPT = PROJECT_ROOT / "samples" / "voices" / "en_female.wav"
#: Longest a whole run may take (s) whatever the settings: a load test must stop by itself.
MAX_RUN_S = 1800
#: Cold start of the app on two shared CPU cores (demo weights, every model): ~30-60 s.
START_TIMEOUT_S = 420
BUSY_MARK = "busy:"  # the per-client limit's answer (studio/limits.py ClientSlots)


def add_loadtest_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="a running studio page (http://127.0.0.1:7860); default: start one here")
    p.add_argument("--data-dir", type=Path, help="with --url: the app's data folder, to find its server for PSS")
    p.add_argument("--requests", type=int, default=200, help="requests in all (default 200, at most 10000)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16, at most 64)")
    p.add_argument("--model", choices=("f5", "spark"), default="f5")
    p.add_argument("--mode", choices=("offline", "streaming"), default="offline")
    p.add_argument("--text", default=DEFAULT_TEXT)
    p.add_argument("--prompt", type=Path, default=DEFAULT_PROMPT, help="prompt clip")
    p.add_argument("--prompt-text", default="", help="its transcript (default: the sample voice's)")
    p.add_argument("--nfe", type=int, default=4, help="F5 ODE steps (default 4: a load test, not a quality test)")
    p.add_argument("--max-new-tokens", type=int, default=60, help="Spark tokens per request (default 60)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per request (default 300)")
    p.add_argument("--real-weights", action="store_true", help="the started app resolves real weights")
    p.add_argument("--json", type=Path, help="also write the report as JSON here")


# --- memory --------------------------------------------------------------------------------------
def pss_kib(pid: int) -> int:
    """Proportional set size of one process in KiB (shared pages divided among their users), 0 when gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def server_pids(data_dir: Path) -> list[int]:
    """tritonserver and its stubs for every live run registered under `data_dir`."""
    from studio.server import run_processes

    try:
        registry = json.loads((data_dir / "runs" / "registry.json").read_text())
    except (OSError, ValueError):
        return []
    pids = []
    for run in registry:
        pids += [pid for pid, _ in run_processes(data_dir / "runs" / run)]
    return sorted(set(pids))


def summed_pss_mib(data_dir: Path | None) -> float | None:
    if data_dir is None:
        return None
    pids = server_pids(data_dir)
    return round(sum(pss_kib(p) for p in pids) / 1024, 1) if pids else None


# --- the app ---------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(data_dir: Path, demo: bool, concurrency: int, log: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"),
               # every request of this run comes from one address: let all of them in; Gradio queues
               # them behind the page's generation slots, which is the load being measured
               STUDIO_MAX_CLIENT_REQUESTS=os.environ.get("STUDIO_MAX_CLIENT_REQUESTS", str(concurrency)))
    cmd = [sys.executable, str(PROJECT_ROOT / "app.py"), "--port", str(port), "--data-dir", str(data_dir)]
    if demo:
        cmd += ["--demo-weights", "--no-download"]
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env)
    return proc, f"http://127.0.0.1:{port}"


def stop_app(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()  # its watchdog stops the server it leaves behind
        proc.wait(timeout=30)


# --- the run ---------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _request_kwargs(args) -> dict:
    from gradio_client import handle_file

    prompt_text = args.prompt_text
    if not prompt_text:
        txt = Path(args.prompt).with_suffix(".txt")
        prompt_text = txt.read_text("utf-8").strip() if txt.is_file() else "Hello."
    return dict(ref_audio=handle_file(str(args.prompt)), ref_text=prompt_text, text=args.text, model=args.model,
                mode=args.mode, nfe=args.nfe, max_new_tokens=args.max_new_tokens, seed=1, voice_key=None, job_id="",
                api_name="/clone")


def for_endpoint(client, kwargs: dict) -> dict:
    """`kwargs` cut to the parameters the page's /clone event takes, with its objective checks off
    where it has them (they would measure the check models, not the generation)."""
    info = client.view_api(print_info=False, return_format="dict")["named_endpoints"][kwargs["api_name"]]
    names = {p["parameter_name"] for p in info["parameters"]}
    out = {k: v for k, v in kwargs.items() if k in names or k == "api_name"}
    if "checks" in names:
        out["checks"] = False
    return out


def wait_until_serving(url: str, kwargs: dict, proc: subprocess.Popen | None, timeout_s: float) -> None:
    """Until one request succeeds (the page comes up before its Triton server)."""
    from gradio_client import Client

    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the app exited with code {proc.returncode} while starting")
        try:
            client = Client(url + "/", verbose=False)
            client.predict(**for_endpoint(client, kwargs))
            return
        except Exception as exc:  # noqa: BLE001 - not up yet / server still starting
            last = str(exc)[:200]
            time.sleep(2)
    raise RuntimeError(f"the page at {url} did not serve a request within {timeout_s:.0f} s ({last})")


def run_load(url: str, args, data_dir: Path | None) -> dict:
    from gradio_client import Client

    kwargs = _request_kwargs(args)
    n, conc = args.requests, args.concurrency
    pss_before = summed_pss_mib(data_dir)
    lock = threading.Lock()
    next_index = iter(range(n))
    latencies: list[float] = []
    failures: list[str] = []
    busy = [0]
    done = [0]
    samples: list[tuple[int, float]] = []  # (requests done, summed PSS MiB)
    sample_every = max(1, n // 20)
    stop_at = time.monotonic() + min(MAX_RUN_S, args.timeout * (n / max(conc, 1) + 2))

    def worker():
        client = Client(url + "/", verbose=False)
        call = for_endpoint(client, kwargs)
        while time.monotonic() < stop_at:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            t0 = time.perf_counter()
            try:
                job = client.submit(**call)
                job.result(timeout=args.timeout)
                ok, message = True, ""
            except Exception as exc:  # noqa: BLE001 - counted and reported
                ok, message = False, str(exc)
            elapsed = time.perf_counter() - t0
            with lock:
                done[0] += 1
                if ok:
                    latencies.append(elapsed)
                elif BUSY_MARK in message:
                    busy[0] += 1
                else:
                    failures.append(message[:300])
                if done[0] % sample_every == 0:
                    mem = summed_pss_mib(data_dir)
                    if mem is not None:
                        samples.append((done[0], mem))

    started = time.monotonic()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(conc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, stop_at - time.monotonic()) + args.timeout)
    wall = time.monotonic() - started
    time.sleep(2)  # let the server release the last requests' buffers
    pss_after = summed_pss_mib(data_dir)
    quarter = max(1, len(samples) // 4)
    first = [m for _, m in samples[:quarter]]
    last = [m for _, m in samples[-quarter:]]
    first_mean = sum(first) / len(first) if first else None
    last_mean = sum(last) / len(last) if last else None
    growth = round(100 * (last_mean - first_mean) / first_mean, 2) if first and first_mean else None
    return {
        "url": url, "requests": n, "concurrency": conc, "completed": done[0], "ok": len(latencies),
        "busy": busy[0], "failures": len(failures), "not_run": n - done[0], "failure_examples": failures[:5],
        "wall_s": round(wall, 2), "throughput_per_s": round(len(latencies) / wall, 3) if wall else None,
        "latency_s": {f"p{int(q * 100)}": (round(v, 3) if v is not None else None)
                      for q in (0.5, 0.9, 0.99) for v in [percentile(latencies, q)]},
        "pss_mib": {"before": pss_before, "first_quarter": round(first_mean, 1) if first_mean else None,
                    "last_quarter": round(last_mean, 1) if last_mean else None, "after": pss_after,
                    "growth_first_to_last_quarter_pct": growth},
    }


def format_report(r: dict) -> str:
    lat, mem = r["latency_s"], r["pss_mib"]
    lines = [f"loadtest {r['url']}: {r['requests']} requests at concurrency {r['concurrency']} in {r['wall_s']} s",
             f"  ok {r['ok']}, busy {r['busy']}, failed {r['failures']}, not run {r['not_run']}",
             f"  latency p50 {lat['p50']} s, p90 {lat['p90']} s, p99 {lat['p99']} s",
             f"  server PSS (MiB): before {mem['before']}, first quarter {mem['first_quarter']}, last quarter "
             f"{mem['last_quarter']} ({mem['growth_first_to_last_quarter_pct']} %), after {mem['after']}"]
    lines += [f"  failure: {f}" for f in r["failure_examples"]]
    return "\n".join(lines)


def main(args) -> int:
    if not 1 <= args.requests <= 10_000 or not 1 <= args.concurrency <= 64:
        print("error: --requests must be 1-10000 and --concurrency 1-64 (a load test stays bounded)", file=sys.stderr)
        return 2
    if not Path(args.prompt).is_file():
        print(f"error: --prompt {str(args.prompt)!r} does not exist", file=sys.stderr)
        return 2
    proc, tmp, report = None, None, None
    data_dir = args.data_dir
    url = (args.url or "").rstrip("/")
    try:
        if not url:
            tmp = Path(tempfile.mkdtemp(prefix="studio-loadtest-"))
            data_dir = tmp / "data"
            proc, url = start_app(data_dir, not args.real_weights, args.concurrency, tmp / "app.log")
            print(f"started the studio at {url} (log {tmp / 'app.log'})", flush=True)
        wait_until_serving(url, _request_kwargs(args), proc, START_TIMEOUT_S)
        report = run_load(url, args, data_dir)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if proc is not None:
            stop_app(proc)
        if tmp is not None:
            if report is not None and report["failures"] == 0 and report["not_run"] == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            else:  # a failed run keeps the app's and the server's logs for whoever reads the failure
                print(f"kept {tmp} (the app's log, and the server's under data/runs/)", flush=True)
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0 if report["failures"] == 0 and report["not_run"] == 0 else 1
