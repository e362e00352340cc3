"""`python -m studio bench`: load a model through Triton at several concurrencies and report DESIGN.md metrics.

Per concurrency: rtf_aggregate (wall time / sum of audio seconds), latency p50/p90/p99, first-chunk
p50/p90 (streaming), requests/s, audio seconds per second, server compute vs queue time (Triton's
statistics deltas for the engine model), Spark decode tokens/s, and per-GPU peak memory and
utilisation sampled with nvidia-smi. Writes JSON and a PNG plot, prints a table.

With several servers (`--triton-url host1:8001,host2:8001` or a DNS name) one shared `ServerPool`
sends the requests, and each row's `servers` lists per server the requests the pool sent, how
they ended, and the requests Triton itself counted (its statistics' deltas for the front model).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from studio.config import PROJECT_ROOT

DEFAULT_WORKLOAD = PROJECT_ROOT / "samples" / "bench_workload.jsonl"
ENGINE_MODEL = {"f5": "f5_engine", "spark": "spark_llm"}
#: Fields of a stream's first chunk `info` averaged into the row as first_chunk_<field>_mean (those
#: the engine reports: F5 queue_ms and compute_ms; Spark prep_ms, first_token_ms, vocode_ms and
#: compute_ms, all ms).
FIRST_CHUNK_FIELDS = ("queue_ms", "compute_ms", "prep_ms", "first_token_ms", "vocode_ms")


@dataclass
class WorkItem:
    prompt: Path
    reference_text: str
    target_text: str


def load_workload(path: Path) -> list[WorkItem]:
    """JSON lines with `prompt` (path relative to the file), `reference_text`, `target_text`."""
    items = []
    for n, line in enumerate(Path(path).read_text("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt = Path(row["prompt"])
            items.append(WorkItem(prompt if prompt.is_absolute() else Path(path).parent / prompt,
                                  row["reference_text"], row["target_text"]))
        except (KeyError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}:{n}: bad workload line ({exc})") from None
    if not items:
        raise ValueError(f"{path} holds no workload lines")
    return items


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=("f5", "spark"), default="f5")
    p.add_argument("--mode", choices=("offline", "streaming"), default="offline")
    p.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated levels")
    p.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    p.add_argument("--warmup", type=int, default=2, help="untimed requests before each level")
    p.add_argument("--nfe", type=int, default=None, help="F5 ODE steps (16 with EPSS is the fast setting)")
    p.add_argument("--fixed-tokens", type=int, default=None,
                   help="Spark: min_new_tokens = max_new_tokens = N (random weights never emit the end token)")
    p.add_argument("--workload", type=Path, default=DEFAULT_WORKLOAD)
    p.add_argument("--cold-cache", action="store_true", help="send use_prompt_cache=false (cold prompt)")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for JSON and PNG")
    p.add_argument("--label", default="", help="a name for this run in the JSON")
    p.add_argument("--check", action="store_true",
                   help="objective checks after each request (WER/CER, speaker similarity); their time is reported "
                        "per request and counts in the wall time (rtf_aggregate)")
    p.add_argument("--check-tokens", type=int, default=None,
                   help="with --check: recognition decodes exactly this many tokens (random weights never stop)")
    p.add_argument("--gpu-sample-s", type=float, default=GPU_SAMPLE_S,
                   help="seconds between nvidia-smi samples of GPU memory and utilisation (default 0: none; "
                        f"each sample starts a process beside the run, which slowed requests: e.g. {GPU_SAMPLE_ON_S})")


#: Seconds between GPU samples (`GpuSampler`); 0: none, the default. Measured on an H200 (F5 offline,
#: 16 NFE, one request in flight): with nvidia-smi started every 0.2 s beside the run a request took
#: ~12 ms longer on its way into the engine (rtf_aggregate 0.0121 against 0.0099 without), so the
#: utilisation figures cost the figures they sit beside; ask for them with --gpu-sample-s 0.2.
GPU_SAMPLE_S = 0.0
#: An interval for a run that wants utilisation anyway (the F5 sweep's SWEEP_SAMPLED=1 passes it).
GPU_SAMPLE_ON_S = 0.2


class GpuSampler:
    """Samples nvidia-smi every `every_s` seconds: peak memory and mean utilisation per GPU
    (nothing on CPU, nor with every_s = 0)."""

    def __init__(self, every_s: float = GPU_SAMPLE_S):
        self.every_s = every_s
        self.smi = shutil.which("nvidia-smi") if every_s > 0 else None
        self.samples: list[list[tuple[float, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        if self.smi:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run([self.smi, "--query-gpu=memory.used,utilization.gpu",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True,
                                     timeout=5).stdout
                self.samples.append([tuple(float(x) for x in line.split(",")) for line in out.strip().splitlines()])
            except (OSError, ValueError, subprocess.SubprocessError):
                pass
            self._stop.wait(self.every_s)

    def summary(self) -> list[dict]:
        if not self.samples:
            return []
        n = min(len(s) for s in self.samples)
        return [{"gpu": g, "peak_memory_mib": max(s[g][0] for s in self.samples),
                 "mean_utilization_pct": round(float(np.mean([s[g][1] for s in self.samples])), 1)}
                for g in range(n)]


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 4) if values else None


def _engine_stats(client, model: str) -> dict:
    try:
        stats = client.statistics(model)["model_stats"][0]
    except Exception:  # noqa: BLE001 - statistics are optional extras in the report
        return {}
    inf = stats.get("inference_stats", {})
    return {"inference_count": int(stats.get("inference_count", 0)),
            "execution_count": int(stats.get("execution_count", 0)),
            "queue_ns": int(inf.get("queue", {}).get("ns", 0)),
            "compute_ns": sum(int(inf.get(k, {}).get("ns", 0)) for k in ("compute_input", "compute_infer",
                                                                            "compute_output"))}


def build_params(args) -> dict:
    params: dict = {"seed": 1234}
    if args.cold_cache:
        params["use_prompt_cache"] = False
    if args.model == "f5" and args.nfe:
        params["nfe_steps"] = args.nfe
    if args.model == "spark" and args.fixed_tokens:
        params["min_new_tokens"] = params["max_new_tokens"] = args.fixed_tokens
    return params


def _front_counts(client, model: str) -> dict[str, dict]:
    """server url -> {"success", "fail"}: requests Triton counted for `model` (the front model), per server."""
    from studio.pool import is_pool

    answers = client.statistics_by_server(model) if is_pool(client) else {client.url: _quietly(client, model)}
    out = {}
    for url, answer in answers.items():
        try:
            inf = answer["model_stats"][0].get("inference_stats", {})
        except (TypeError, KeyError, IndexError):
            continue  # unreachable or no such model: nothing counted
        out[url] = {k: int(inf.get(k, {}).get("count", 0)) for k in ("success", "fail")}
    return out


#: A decoupled (streaming) model's statistics count a request a moment after its client received the
#: final response (seen on the CPU: the second of two streams counted only later): wait this long at most.
STATS_SETTLE_S = 3.0


def _settled_counts(client, model: str, before: dict, expected: int) -> dict[str, dict]:
    """_front_counts once Triton has counted `expected` more requests (or STATS_SETTLE_S passed)."""
    deadline = time.monotonic() + STATS_SETTLE_S
    while True:
        after = _front_counts(client, model)
        counted = sum(a["success"] + a["fail"] - sum(before.get(url, {}).values()) for url, a in after.items())
        if counted >= expected or time.monotonic() > deadline:
            return after
        time.sleep(0.1)


def _quietly(client, model: str):
    try:
        return client.statistics(model)
    except Exception:  # noqa: BLE001 - statistics are optional extras in the report
        return None


def server_rows(client, before_pool: list[dict], triton_before: dict, triton_after: dict, outcomes: list) -> list[dict]:
    """Per server: requests sent (the pool's counters, or every request for one server), ok, failed,
    moved on (failed there before any audio, served elsewhere), and Triton's own count of requests
    that succeeded / failed on its front model during the timed part."""
    from studio.pool import is_pool

    if is_pool(client):
        was = {s["url"]: s for s in before_pool}
        rows = []
        for s in client.servers():
            b = was.get(s["url"], {})
            rows.append({"url": s["url"], **{k: s[k] - b.get(k, 0) for k in ("sent", "ok", "failed", "failed_over")}})
    else:
        ok = sum(not isinstance(o, Exception) for o in outcomes)
        rows = [{"url": client.url, "sent": len(outcomes), "ok": ok, "failed": len(outcomes) - ok, "failed_over": 0}]
    total = sum(r["sent"] for r in rows)
    for r in rows:
        r["share"] = round(r["sent"] / total, 4) if total else 0.0
        after, before = triton_after.get(r["url"]), triton_before.get(r["url"], {"success": 0, "fail": 0})
        r["triton_success"] = after["success"] - before["success"] if after else None
        r["triton_fail"] = after["fail"] - before["fail"] if after else None
    return rows


def run_level(url: str, args, items, prompts, concurrency: int) -> dict:
    """One concurrency level: `args.requests` requests, `concurrency` in flight at a time."""
    from studio.client import StudioClient, triton_model_name
    from studio.pool import connect, is_pool

    params = build_params(args)
    stream = args.mode == "streaming"
    first = connect(url)
    # several servers: one pool shared by the threads (it sees every request in flight); one server:
    # a client (gRPC channel) per thread, as before
    clients = [first] + ([] if is_pool(first) else [StudioClient(url) for _ in range(concurrency - 1)])
    front = triton_model_name(args.model, stream)
    try:
        def one(i: int):
            """A result, or the exception of a failed request (counted, not fatal: the run goes on)."""
            item = items[i % len(items)]
            c = clients[i % len(clients)]
            try:
                result = c.synthesize(args.model, item.target_text, prompts[item.prompt], item.reference_text,
                                      stream=stream, params=params)
                if getattr(args, "check", False):
                    from studio.objective import run_checks

                    result.checks = run_checks(c, result.audio, result.sample_rate, item.target_text,
                                               prompts[item.prompt], result.sample_rate,
                                               fixed_tokens=getattr(args, "check_tokens", None))
                return result
            except Exception as exc:  # noqa: BLE001 - reported in the row
                return exc

        with ThreadPoolExecutor(concurrency) as pool:
            warm = list(pool.map(one, range(min(args.warmup, args.requests) if args.warmup else 0)))
            before = _engine_stats(clients[0], ENGINE_MODEL[args.model])
            pool_before = first.servers() if is_pool(first) else []
            triton_before = _front_counts(first, front)
            with GpuSampler(getattr(args, "gpu_sample_s", GPU_SAMPLE_S)) as gpus:
                t0 = time.perf_counter()
                outcomes = list(pool.map(one, range(args.requests)))
                wall = time.perf_counter() - t0
            after = _engine_stats(clients[0], ENGINE_MODEL[args.model])
            servers = server_rows(first, pool_before, triton_before, _settled_counts(first, front, triton_before,
                                                                                      len(outcomes)), outcomes)
    finally:
        for c in clients:
            c.close()
    errors = [o for o in warm + outcomes if isinstance(o, Exception)]
    results = [o for o in outcomes if not isinstance(o, Exception)]
    failed = {"failed": len(outcomes) - len(results), "warmup_failed": sum(isinstance(o, Exception) for o in warm),
              "errors": sorted({f"{type(e).__name__}: {e}"[:300] for e in errors})[:5]}
    if not results:
        return {"concurrency": concurrency, "requests": 0, "rtf_aggregate": None, "latency_p50_s": None,
                "demo_weights": False, "servers": servers, **failed}
    lat = [r.latency_s for r in results]
    first = [r.first_chunk_s for r in results]
    audio = sum(r.audio_s for r in results)
    row = {"concurrency": concurrency, "requests": len(results), "wall_s": round(wall, 4),
           "audio_s": round(audio, 3), "rtf_aggregate": round(wall / audio, 5) if audio else None,
           "rtf_mean": round(float(np.mean([r.rtf for r in results])), 5),
           "latency_p50_s": _pct(lat, 50), "latency_p90_s": _pct(lat, 90), "latency_p99_s": _pct(lat, 99),
           "first_chunk_p50_s": _pct(first, 50) if stream else None,
           "first_chunk_p90_s": _pct(first, 90) if stream else None,
           "requests_per_s": round(len(results) / wall, 3), "audio_s_per_s": round(audio / wall, 3),
           "server_compute_ms_mean": round(float(np.mean([r.info.get("compute_ms", 0) for r in results])), 2),
           "gpus": gpus.summary(), "demo_weights": any(r.demo_weights for r in results),
           # wait inside an engine that batches on its own thread (F5 on a GPU; info.queue_ms): there
           # Triton's queue time (engine_queue_ms_mean) misses it
           "server_queue_ms_mean": _mean_of([r.info.get("queue_ms") for r in results]),
           # requests that met a dead instance (front or engine), reloaded by the client before sending again
           "recovered": sum(r.recovered for r in results), "servers": servers, **failed}
    # With failures the wall time still counts the failed requests while the audio does not: the
    # row's figures are then pessimistic and the row says how many failed.
    if before and after:
        n = max(after["inference_count"] - before["inference_count"], 1)
        row["engine_queue_ms_mean"] = round((after["queue_ns"] - before["queue_ns"]) / n / 1e6, 3)
        row["engine_compute_ms_mean"] = round((after["compute_ns"] - before["compute_ns"]) / n / 1e6, 3)
        row["engine_executions"] = after["execution_count"] - before["execution_count"]
    checked = [r.checks for r in results if getattr(r, "checks", None) is not None]
    if checked:
        row["check_ms_p50"] = _pct([c.check_ms for c in checked], 50)
        row["check_ms_p90"] = _pct([c.check_ms for c in checked], 90)
        for key in ("wer", "cer"):
            rates = [c.error_rate for c in checked if c.metric == key and c.error_rate is not None]
            row[f"{key}_mean"] = round(float(np.mean(rates)), 4) if rates else None
        sims = [c.similarity for c in checked if c.similarity is not None]
        row["speaker_sim_mean"] = round(float(np.mean(sims)), 4) if sims else None
    row.update(triton_path_ms(results, stream))
    if stream:
        # where a stream's first chunk went, from the first chunk's info (engine-side ms since the
        # request was prepared: Spark's prep_ms, first_token_ms, vocode_ms; F5's queue and compute)
        for key in FIRST_CHUNK_FIELDS:
            mean = _mean_of([(r.first_info or {}).get(key) for r in results])
            if mean is not None:
                row[f"first_chunk_{key}_mean"] = mean
    if args.model == "spark":
        toks = [r.info.get("tokens", 0) for r in results]
        dec = [r.info.get("decode_ms", 0) for r in results]
        rates = [t / (d / 1000) for t, d in zip(toks, dec) if d]
        row["tokens_mean"] = round(float(np.mean(toks)), 1)
        row["decode_tokens_per_s_per_stream"] = round(float(np.mean(rates)), 1) if rates else None
    return row


def triton_path_ms(results: list, stream: bool) -> dict:
    """The way through Triton split in two from the engine's wall-clock stamps (`engine_in_s` when
    the engine took the request (Spark: began preparing it), `engine_out_s` when it handed the chunk
    to its sender) and the client's send time; valid where client and server share a clock (this bench on the server's
    machine). `path_in_ms_mean`: request sent -> engine has it (gRPC, the front, its BLS request, the
    engine's parse; F5 also `path_to_execute_ms_mean`: up to the engine model's execute, its parse
    excluded); `path_out_ms_mean`: engine hands the audio over -> client has it (the engine's
    send, the front, gRPC), for the whole answer offline and the first chunk streaming. Empty where
    the engine gives no stamps."""
    ins, outs, to_exec = [], [], []
    for r in results:
        info = r.first_info if stream else r.info
        if r.sent_at is None or not info or "engine_in_s" not in info or "engine_out_s" not in info:
            continue
        arrived = r.sent_at + (r.first_chunk_s if stream else r.latency_s)
        ins.append((info["engine_in_s"] - r.sent_at) * 1000)
        outs.append((arrived - info["engine_out_s"]) * 1000)
        if "engine_exec_s" in info:  # F5: when the engine model's execute got it (before its parse)
            to_exec.append((info["engine_exec_s"] - r.sent_at) * 1000)
    if not ins:
        return {}
    out = {"path_in_ms_mean": round(float(np.mean(ins)), 3), "path_out_ms_mean": round(float(np.mean(outs)), 3)}
    if to_exec:
        out["path_to_execute_ms_mean"] = round(float(np.mean(to_exec)), 3)
    return out


def _mean_of(values: list) -> float | None:
    """Mean of the values given (None where no result carried one)."""
    given = [float(v) for v in values if v is not None]
    return round(float(np.mean(given)), 3) if given else None


def print_table(rows: list[dict], model: str, mode: str) -> None:
    cols = ["concurrency", "rtf_aggregate", "latency_p50_s", "latency_p90_s", "latency_p99_s"]
    if mode == "streaming":
        cols += ["first_chunk_p50_s", "first_chunk_p90_s"]
        cols += [f"first_chunk_{k}_mean" for k in FIRST_CHUNK_FIELDS if any(f"first_chunk_{k}_mean" in r for r in rows)]
    cols += ["requests_per_s", "audio_s_per_s", "engine_compute_ms_mean", "engine_queue_ms_mean"]
    if any(r.get("server_queue_ms_mean") is not None for r in rows):
        cols.append("server_queue_ms_mean")
    cols += [c for c in ("path_to_execute_ms_mean", "path_in_ms_mean", "path_out_ms_mean") if any(c in r for r in rows)]
    if model == "spark":
        cols.append("decode_tokens_per_s_per_stream")
    if any("check_ms_p50" in r for r in rows):
        cols += ["check_ms_p50", "check_ms_p90", "wer_mean", "cer_mean", "speaker_sim_mean"]
    cols += ["failed", "recovered"]
    print(" | ".join(cols))
    print(" | ".join("---" for _ in cols))
    for r in rows:
        print(" | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols))
    if any(len(r.get("servers") or []) > 1 for r in rows):
        print("\nper server (sent by the studio: ok / failed / moved on; Triton's own count of the front model's "
              "successful requests)")
        for r in rows:
            for s in r.get("servers") or []:
                print(f"concurrency {r['concurrency']}: {s['url']} {s['sent']} requests ({s['share'] * 100:.0f}%): "
                      f"{s['ok']} ok / {s['failed']} failed / {s['failed_over']} moved on; Triton counted "
                      f"{s['triton_success'] if s['triton_success'] is not None else '?'}")


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("rtf_aggregate") is not None]  # levels where every request failed
    conc = [r["concurrency"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(conc, [r["rtf_aggregate"] for r in rows], "o-")
    a.set(xlabel="concurrency", ylabel="rtf_aggregate", title="RTF (lower is better)", xscale="log", xticks=conc)
    a.set_xticklabels(conc)
    b.plot(conc, [r["latency_p50_s"] for r in rows], "o-", label="latency p50")
    if rows and rows[0].get("first_chunk_p50_s") is not None:
        b.plot(conc, [r["first_chunk_p50_s"] for r in rows], "s-", label="first chunk p50")
    b.set(xlabel="concurrency", ylabel="seconds", title="latency", xscale="log", xticks=conc)
    b.set_xticklabels(conc)
    b.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(args) -> int:
    from studio.audio_io import load_audio
    from studio.cli import make_server
    from tts.audio import F5_SAMPLE_RATE, SPARK_SAMPLE_RATE

    try:
        levels = [int(x) for x in str(args.concurrency).split(",") if x.strip()]
        items = load_workload(args.workload)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sr = F5_SAMPLE_RATE if args.model == "f5" else SPARK_SAMPLE_RATE
    prompts = {item.prompt: load_audio(item.prompt, sr) for item in items}
    server = None
    url = args.triton_url
    if url:
        from studio.pool import parse_spec

        try:
            parse_spec(url)
        except ValueError as exc:
            print(f"error: --triton-url: {exc}", file=sys.stderr)
            return 2
    if not url:
        server = make_server(args, families=[args.model] + (["asr", "sim"] if getattr(args, "check", False) else []))
        server.start()
        url = server.grpc_url
    try:
        rows = []
        for level in levels:
            row = run_level(url, args, items, prompts, level)
            rows.append(row)
            print(f"[bench] concurrency {level}: rtf_aggregate {row['rtf_aggregate']}, "
                  f"latency p50 {row['latency_p50_s']} s" + (f", {row['failed']} of {args.requests} requests FAILED"
                                                             f" ({row['warmup_failed']} warm-up): {row['errors']}"
                                                             if row["failed"] or row["warmup_failed"] else ""),
                  file=sys.stderr, flush=True)
    finally:
        if server is not None:
            server.stop()
    report = {"model": args.model, "mode": args.mode, "label": args.label, "date": time.strftime("%Y-%m-%d"),
              "params": build_params(args), "requests_per_level": args.requests, "workload": str(args.workload),
              "command": " ".join(sys.argv), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_{args.model}_{args.mode}{'_' + args.label if args.label else ''}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    plot(rows, args.out / f"{stem}.png", f"{args.model} {args.mode} {args.label}".strip())
    print_table(rows, args.model, args.mode)
    if rows and rows[0]["demo_weights"]:
        print("note: DEMO WEIGHTS: these figures are for the tiny demo model, not the real one.")
    print(f"wrote {args.out / (stem + '.json')} and .png")
    bad = sum(r["failed"] + r["warmup_failed"] for r in rows)
    if bad:
        print(f"error: {bad} request(s) failed; the rows say which levels", file=sys.stderr)
        return 1
    return 0
