"""Summarise a tools/gpu_sweep.sh results folder: markdown tables for BENCHMARKS.md and target checks.

    python tools/gpu_summary.py RESULTS --out OUT

Reads RESULTS/micro.json (tools/gpu_f5_bench.py), RESULTS/startup_<label>.json (tools/gpu_serve.py)
and RESULTS/bench_f5_<mode>_<label>.json (`python -m studio bench`); writes OUT/summary.md and
OUT/summary.json and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

#: The speed targets (F5, 16 NFE, ~3 s prompt + ~7 s output, end to end through Triton, H100).
TARGET_RTF_C1 = 0.009  # must
TARGET_RTF_C8 = 0.007  # must
AIM_RTF_C1 = 0.007
AIM_RTF_C8 = 0.005
TARGET_STARTUP_S = 120.0  # cold start-up including all compilation and graph capture
TARGET_WARM_STARTUP_S = 30.0  # a second start on the same data folder (warm compile cache), must


def load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def micro_section(m: dict) -> list[str]:
    lines = [f"### DiT step and sampler ({m.get('device_name', m.get('device'))}, {m.get('dtype')}, "
             f"CFG batch 2 x {m.get('frames')} frames per item, torch {m.get('torch')})", ""]
    lines.append(f"Compute floor of one step at batch 1: {m.get('step_gflop_b1')} GFLOP / "
                 f"{m.get('peak_tflops_measured')} TFLOP/s measured = {m.get('step_floor_ms_b1')} ms "
                 f"(batch 8: {m.get('step_floor_ms_b8')} ms).")
    lines.append("")
    head = ["path", "step ms (b1)", "TFLOP/s", "16 NFE b1 ms", "32 NFE b1 ms", "16 NFE b8 ms", "32 NFE b8 ms",
            "rel err vs eager (16 NFE b1)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in ("eager", "fast_graph", "fast_compile"):
        if not any(k.startswith(name + "_") for k in m):
            continue
        row = [name, fmt(m.get(f"{name}_step_ms")), fmt(m.get(f"{name}_step_tflops"), 1)]
        row += [fmt(m.get(f"{name}_sample_ms_b{b}_nfe{n}"), 1) for b, n in ((1, 16), (1, 32), (8, 16), (8, 32))]
        row.append(fmt(m.get(f"{name}_vs_eager_rel_err_b1_nfe16"), 5) if name != "eager" else "")
        lines.append("| " + " | ".join(row) + " |")
    sdpa = {k.rsplit("_", 1)[1]: v for k, v in m.items() if k.startswith("eager_step_ms_sdpa_")}
    if sdpa:
        lines += ["", "Eager step by SDPA backend (ms): " + ", ".join(f"{k} {fmt(v)}" for k, v in sdpa.items())]
    for name in ("fast_graph", "fast_compile"):
        w = m.get(f"{name}_warmup")
        if w:
            lines.append(f"- {name} start-up ({w.get('buckets')} buckets): " + ", ".join(
                f"{k} {w[k]}" for k in ("mode", "compile_s", "capture_s", "self_check_rel_err", "wall_s",
                                        "compile_error", "self_check_failed") if k in w))
        if m.get(f"{name}_error"):
            lines.append(f"- {name} FAILED: {m[f'{name}_error'][:500]}")
    if "vocos_per_item_ms_8x650" in m:
        lines.append(f"- Vocos, 8 items of ~650 frames: per item {fmt(m['vocos_per_item_ms_8x650'], 1)} ms, "
                     f"batched {fmt(m.get('vocos_batched_ms_8x650'), 1)} ms; one item "
                     f"{fmt(m.get('vocos_one_item_ms_650'), 1)} ms")
    return lines + [""]


def startup_section(starts: dict[str, dict]) -> list[str]:
    head = ["server", "STUDIO_F5_FAST", "ready after s", "mode", "compile s", "capture s", "graphs",
            "self-check rel err", "problems"]
    lines = ["### Server start-up (process start -> Triton ready, warm-up included)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, s in sorted(starts.items()):
        w = (s.get("warmup") or [{}])[0]
        problems = s.get("error", "")[:200] or w.get("compile_error", "")[:200] or w.get("self_check_failed", "")
        env = s.get("fast_env") if s.get("fast_env") is not None else "(unset)"
        lines.append("| " + " | ".join([label, env, fmt(s.get("startup_s"), 1), str(w.get("mode", "")),
                                        fmt(w.get("compile_s"), 1), fmt(w.get("capture_s"), 1), fmt(w.get("graphs")),
                                        fmt(w.get("self_check_rel_err"), 5), problems.replace("|", "/")]) + " |")
    return lines + [""]


def bench_section(benches: dict[str, dict]) -> list[str]:
    """compute ms: the engine's own figure per request (info.compute_ms: the wall time of the
    batches its chunks ran in); execute ms / execute queue ms: Triton's statistics of the engine
    model (time in `execute`, time queued before it). With the F5 engine thread, `execute` only
    parses and hands over, so those two no longer hold the synthesis or the wait for it: engine
    queue ms is then the wait inside the engine (info.queue_ms), empty without the thread. path in /
    out ms: request sent -> engine has it, engine hands the audio over -> client has it (the bench's
    `triton_path_ms`; offline the whole answer, streaming the first chunk)."""
    head = ["run", "mode", "NFE", "c", "rtf_aggregate", "latency p50 s", "p90 s", "first chunk p50 s",
            "req/s", "compute ms", "execute ms", "execute queue ms", "engine queue ms", "path in ms", "path out ms",
            "GPU util %", "failed", "recovered"]
    lines = ["### End to end through Triton (`python -m studio bench`)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, b in sorted(benches.items()):
        nfe = b.get("params", {}).get("nfe_steps", "")
        label = b.get("label", "") + (" (cold prompt)" if b.get("params", {}).get("use_prompt_cache") is False else "")
        for r in b.get("rows", []):
            util = ", ".join(fmt(g.get("mean_utilization_pct"), 0) for g in r.get("gpus", []))
            lines.append("| " + " | ".join([label, b.get("mode", ""), str(nfe), str(r["concurrency"]),
                                            fmt(r.get("rtf_aggregate"), 4), fmt(r.get("latency_p50_s")),
                                            fmt(r.get("latency_p90_s")), fmt(r.get("first_chunk_p50_s")),
                                            fmt(r.get("requests_per_s"), 2), fmt(r.get("server_compute_ms_mean"), 1),
                                            fmt(r.get("engine_compute_ms_mean"), 1),
                                            fmt(r.get("engine_queue_ms_mean"), 1),
                                            fmt(r.get("server_queue_ms_mean"), 1),
                                            fmt(r.get("path_in_ms_mean"), 1), fmt(r.get("path_out_ms_mean"), 1), util,
                                            fmt(r.get("failed")), fmt(r.get("recovered"))]) + " |")
    return lines + [""]


def spark_section(s: dict) -> list[str]:
    lines = [f"### Spark LLM `DecodeBatch.step()` ({s.get('device_name', s.get('device'))}, {s.get('dtype')}, "
             f"{s.get('parameters_m')} M parameters, ~{s.get('keys')} keys per row, sampling included)", "",
             "| rows | eager ms | CUDA graphs ms | tokens/s per stream | prefill ms per 1000-token prompt |",
             "|---|---|---|---|---|"]
    for rows in (1, 4, 8, 16):
        e, g = s.get(f"eager_step_ms_r{rows}"), s.get(f"graph_step_ms_r{rows}")
        if e or g:
            best = g or e
            lines.append(f"| {rows} | {fmt(e)} | {fmt(g)} | {fmt(1000 / best, 1)} | "
                         f"{fmt(s.get(f'graph_prefill_ms_each_r{rows}') or s.get(f'eager_prefill_ms_each_r{rows}'), 1)} |")
    for key in ("graph_batch_build_s", "graph_error"):
        if key in s:
            lines.append(f"- {key}: {s[key]}")
    return lines + [""]


def rtf_at(benches: dict, label: str, mode: str, concurrency: int):
    for b in benches.values():
        if b.get("label") == label and b.get("mode") == mode:
            for r in b.get("rows", []):
                if r["concurrency"] == concurrency:
                    return r.get("rtf_aggregate")
    return None


def checks(benches: dict, starts: dict) -> list[dict]:
    rtf1, rtf8 = rtf_at(benches, "fast", "offline", 1), rtf_at(benches, "fast", "offline", 8)
    startup = (starts.get("fast") or {}).get("startup_s")
    warm = (starts.get("fast-restart") or {}).get("startup_s")

    def verdict(value, limit):
        return "n/a" if value is None else ("PASS" if value <= limit else "FAIL")

    return [
        {"check": f"F5 offline 16 NFE rtf_aggregate at c=1 <= {TARGET_RTF_C1} (must)", "value": rtf1,
         "result": verdict(rtf1, TARGET_RTF_C1)},
        {"check": f"F5 offline 16 NFE rtf_aggregate at c=8 <= {TARGET_RTF_C8} (must)", "value": rtf8,
         "result": verdict(rtf8, TARGET_RTF_C8)},
        {"check": f"aim: rtf_aggregate at c=1 <= {AIM_RTF_C1}", "value": rtf1, "result": verdict(rtf1, AIM_RTF_C1)},
        {"check": f"aim: rtf_aggregate at c=8 <= {AIM_RTF_C8}", "value": rtf8, "result": verdict(rtf8, AIM_RTF_C8)},
        {"check": f"server start-up incl. compile + capture < {TARGET_STARTUP_S:.0f} s (must)", "value": startup,
         "result": verdict(startup, TARGET_STARTUP_S)},
        {"check": f"server start-up with a warm compile cache <= {TARGET_WARM_STARTUP_S:.0f} s (must)", "value": warm,
         "result": verdict(warm, TARGET_WARM_STARTUP_S)},
    ] + [  # the same Musts on every other server of the sweep (variants, the first server measured again)
        {"check": f"[{label}] F5 offline 16 NFE rtf_aggregate at c={c} <= {limit} (must)", "value": value,
         "result": verdict(value, limit)}
        for label in sorted({b.get("label") for b in benches.values()} - {"fast", None})
        for c, limit in ((1, TARGET_RTF_C1), (8, TARGET_RTF_C8))
        if (value := rtf_at(benches, label, "offline", c)) is not None
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    res = args.results
    micro = load(res / "micro.json")
    starts = {f.stem[len("startup_"):]: load(f) for f in sorted(res.glob("startup_*.json"))}
    starts = {k: v for k, v in starts.items() if v}
    benches = {f.stem: load(f) for f in sorted(res.glob("bench_f5_*.json"))}
    benches = {k: v for k, v in benches.items() if v}
    gpu = (res / "gpu.txt").read_text().strip() if (res / "gpu.txt").is_file() else "unknown device"
    lines = [f"## F5 speed sweep: {gpu}", ""]
    if micro:
        lines += micro_section(micro)
    if starts:
        lines += startup_section(starts)
    if benches:
        lines += bench_section(benches)
        if any(r.get("demo_weights") for b in benches.values() for r in b.get("rows", [])):
            lines += ["Note: the server ran on DEMO weights (tiny model): these figures are not the real model's.", ""]
    spark = load(res / "spark_step.json")
    if spark:
        lines += spark_section(spark)
    verdicts = checks(benches, starts)
    lines += ["### Targets", ""] + [f"- {c['result']}: {c['check']} (measured: {c['value']})" for c in verdicts]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "summary.md").write_text(text)
        (args.out / "summary.json").write_text(json.dumps(
            {"gpu": gpu, "micro": micro, "startup": starts, "checks": verdicts,
             "bench": {k: {kk: v[kk] for kk in ("model", "mode", "label", "params", "rows") if kk in v}
                       for k, v in benches.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
