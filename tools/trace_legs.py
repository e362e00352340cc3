"""Split requests' way through Triton into legs, from the traces of a server run with
`STUDIO_TRITON_TRACE=FILE` (tts.switches.TRACE_ENV: timestamps of every request, the fronts'
BLS requests to their engine traced as children).

    python tools/trace_legs.py FILE [--json out.json]

Reads FILE.0, FILE.1, ... (and FILE itself if present) and prints, per front model, the median and
mean of each leg in milliseconds, separately for requests that ran alone (no other request of any
front model overlapped them: a concurrency-1 run) and for the rest:

- front_queue: the front's REQUEST_START to its COMPUTE_START (Triton's queue and the instance's
  hand-over)
- front_input: the front's COMPUTE_START to COMPUTE_INPUT_END (its inputs into the stub's memory)
- front_to_bls: the front's COMPUTE_INPUT_END to its BLS request's REQUEST_START (the stub waking
  up, the front's own Python up to `exec`, the BLS request's way into Triton)
- engine_queue: the engine request's QUEUE_START to COMPUTE_START (the dynamic batcher's delay, a
  busy engine instance)
- engine_input: the engine's COMPUTE_START to COMPUTE_INPUT_END (inputs into its stub's memory)
- engine_execute: the engine's COMPUTE_INPUT_END to COMPUTE_OUTPUT_START (its stub's execute:
  waking up, the model's Python `execute`, the answer to Triton)
- engine_to_response: the engine request's COMPUTE_OUTPUT_START to the front's
  INFER_RESPONSE_COMPLETE (for an engine answering from its own thread: the work itself, its
  response's way back through the front)
- grpc_send: the front's GRPC_SEND_START to GRPC_SEND_END (the answer onto the wire)
- front_after_send: the front's INFER_RESPONSE_COMPLETE to its COMPUTE_END (the front still busy
  after its answer went out; off the request's path)

Timestamps are Triton's monotonic clock, so legs inside the server only; the client's side of the
way (`studio bench`'s path_in_ms_mean and path_to_execute_ms_mean) closes the split.
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
from collections import defaultdict
from pathlib import Path

LEGS = {  # name: ((model, event) from, (model, event) to); model "front" or "engine"
    "front_queue": (("front", "REQUEST_START"), ("front", "COMPUTE_START")),
    "front_input": (("front", "COMPUTE_START"), ("front", "COMPUTE_INPUT_END")),
    "front_to_bls": (("front", "COMPUTE_INPUT_END"), ("engine", "REQUEST_START")),
    "engine_queue": (("engine", "QUEUE_START"), ("engine", "COMPUTE_START")),
    "engine_input": (("engine", "COMPUTE_START"), ("engine", "COMPUTE_INPUT_END")),
    "engine_execute": (("engine", "COMPUTE_INPUT_END"), ("engine", "COMPUTE_OUTPUT_START")),
    "engine_to_response": (("engine", "COMPUTE_OUTPUT_START"), ("front", "INFER_RESPONSE_COMPLETE")),
    "grpc_send": (("front", "GRPC_SEND_START"), ("front", "GRPC_SEND_END")),
    "front_after_send": (("front", "INFER_RESPONSE_COMPLETE"), ("front", "COMPUTE_END")),
}


def read_traces(path: str) -> list[dict]:
    """Every trace record of FILE and FILE.N (Triton writes one JSON list per file)."""
    records: list[dict] = []
    files = sorted(glob.glob(glob.escape(path) + ".*"), key=_file_index) + ([path] if Path(path).is_file() else [])
    for name in files:
        text = Path(name).read_text().strip()
        if text:
            records.extend(json.loads(text))
    return records


def _file_index(name: str) -> int:
    tail = name.rsplit(".", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def requests_from(records: list[dict]) -> list[dict]:
    """One dict per front request: {"model", "id", "front": {event: ns}, "engine": {event: ns} or {}}.
    A request's first timestamp of each event name counts (a decoupled model may repeat some)."""
    meta: dict[int, dict] = {}
    events: dict[int, dict[str, int]] = defaultdict(dict)
    for rec in records:
        if "model_name" in rec:
            meta[rec["id"]] = rec
        for stamp in rec.get("timestamps", []):
            events[rec["id"]].setdefault(stamp["name"], int(stamp["ns"]))
    children: dict[int, int] = {}
    for tid, m in meta.items():
        if "parent_id" in m:
            children.setdefault(m["parent_id"], tid)
    out = []
    for tid, m in meta.items():
        if "parent_id" in m:
            continue
        child = children.get(tid)
        out.append({"model": m["model_name"], "id": tid, "front": events[tid],
                    "engine": events[child] if child is not None else {},
                    "engine_model": meta[child]["model_name"] if child is not None else None})
    return out


def _end(front: dict) -> int | None:
    """When the client's part of a request ended: its answer complete (a front may stay busy after)."""
    return front.get("INFER_RESPONSE_COMPLETE", front.get("REQUEST_END"))


def alone(requests: list[dict]) -> set[int]:
    """Ids of the requests no other request overlapped (REQUEST_START to the answer complete)."""
    spans = sorted((r["front"]["REQUEST_START"], _end(r["front"]), r["id"]) for r in requests
                   if "REQUEST_START" in r["front"] and _end(r["front"]) is not None)
    lonely, latest_end = set(), None  # the latest end among the spans before this one
    for i, (start, end, tid) in enumerate(spans):
        after = spans[i + 1][0] if i + 1 < len(spans) else None
        if (latest_end is None or latest_end < start) and (after is None or after > end):
            lonely.add(tid)
        latest_end = end if latest_end is None else max(latest_end, end)
    return lonely


def legs_of(request: dict) -> dict[str, float]:
    got = {}
    for name, ((m0, e0), (m1, e1)) in LEGS.items():
        a, b = request[m0].get(e0), request[m1].get(e1)
        if a is not None and b is not None:
            got[name] = (b - a) / 1e6
    return got


def summarise(requests: list[dict]) -> dict:
    """{model: {"alone" | "overlapped": {"requests": n, leg: {"p50_ms", "mean_ms"}}}}."""
    lonely = alone(requests)
    table: dict = {}
    for r in requests:
        group = "alone" if r["id"] in lonely else "overlapped"
        slot = table.setdefault(r["model"], {}).setdefault(group, {"requests": 0, "_legs": defaultdict(list)})
        slot["requests"] += 1
        for name, ms in legs_of(r).items():
            slot["_legs"][name].append(ms)
    for groups in table.values():
        for slot in groups.values():
            values = slot.pop("_legs")
            for name in LEGS:
                if values.get(name):
                    slot[name] = {"p50_ms": round(statistics.median(values[name]), 3),
                                  "mean_ms": round(statistics.fmean(values[name]), 3)}
    return table


def render(table: dict) -> str:
    lines = []
    for model, groups in sorted(table.items()):
        for group, slot in sorted(groups.items()):
            lines.append(f"{model} ({group}, {slot['requests']} requests)")
            for name in LEGS:
                if name in slot:
                    lines.append(f"  {name:<20} p50 {slot[name]['p50_ms']:9.3f} ms   mean {slot[name]['mean_ms']:9.3f} ms")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace", help="the STUDIO_TRITON_TRACE file name (FILE.0, FILE.1, ... are read)")
    ap.add_argument("--json", type=Path, help="also write the table as JSON here")
    args = ap.parse_args(argv)
    records = read_traces(args.trace)
    if not records:
        print(f"no trace records at {args.trace}(.N)")
        return 1
    table = summarise(requests_from(records))
    print(render(table))
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
