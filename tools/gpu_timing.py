"""Summarise the `[timing]` lines a server run with `STUDIO_TIMING_LOG=1` wrote to its log.

    python tools/gpu_timing.py tritonserver.log [more logs] [--json OUT.json]

Per model (engine, offline front, streaming front): how many requests, and medians of each field
in milliseconds. Engine lines give `parse` (inputs and request building), per chunk `sends`
(ms since execute began, ms the send took, the request's compute so far) and `total`; front lines
give the `arrivals` of the engine's responses (ms since the front's BLS call began) and, streaming,
how long each forward took. From these: the engine's time outside synthesis, and the hop from an
engine's send to the front's receipt (front arrival minus the engine's send time, when both sides
of one request line up). Collection lines (`<model>:gc`, `triton_models.shared.watch_gc`) give
how many collections took 1 ms or more, by generation, their median, longest and summed time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def read(paths: list[Path]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            at = line.find("[timing] ")
            if at < 0:
                continue
            try:
                model, raw = line[at + 9:].split(" ", 1)
                out.setdefault(model, []).append(json.loads(raw))
            except ValueError:
                continue
    return out


def med(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def summarise(lines: dict[str, list[dict]]) -> dict:
    res: dict = {}
    for model, rows in lines.items():
        if model.endswith(":gc"):
            ms = [r["ms"] for r in rows if r.get("ms") is not None]
            res[model] = {"n": len(rows), "ms_p50": med(ms), "ms_max": max(ms, default=None),
                          "ms_sum": round(sum(ms), 3),
                          "by_generation": {str(g): sum(1 for r in rows if r.get("generation") == g)
                                            for g in sorted({r.get("generation") for r in rows}, key=str)}}
            continue
        s: dict = {"n": len(rows), "total_ms_p50": med(r.get("total") for r in rows)}
        if model.endswith("_engine"):
            s["parse_ms_p50"] = med(r.get("parse") for r in rows)
            s["send_ms_p50"] = med(x[1] for r in rows for x in r.get("sends", []))
            first = [r["sends"][0] for r in rows if r.get("sends")]
            s["first_send_at_ms_p50"] = med(x[0] for x in first)
            # execute time not spent in synthesis (compute_ms) or sends
            s["outside_compute_ms_p50"] = med(
                r["total"] - r["sends"][-1][2] - sum(x[1] for x in r["sends"]) for r in rows if r.get("sends"))
        else:
            s["first_arrival_ms_p50"] = med(r["arrivals"][0] for r in rows if r.get("arrivals"))
            s["last_arrival_ms_p50"] = med(r["arrivals"][-1] for r in rows if r.get("arrivals"))
            if any("sends" in r for r in rows):
                s["forward_send_ms_p50"] = med(x for r in rows for x in r.get("sends", []))
        res[model] = s
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("logs", type=Path, nargs="+")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    res = summarise(read(args.logs))
    text = json.dumps(res, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0 if res else 1


if __name__ == "__main__":
    sys.exit(main())
