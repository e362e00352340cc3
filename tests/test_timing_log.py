"""tools/gpu_timing.py: the `[timing]` lines the engines and fronts write with STUDIO_TIMING_LOG=1."""

from __future__ import annotations

import json

from tools import gpu_timing
from triton_models import shared


def test_timing_lines_are_written_only_when_asked(capsys, monkeypatch):
    monkeypatch.setattr(shared, "TIMING_LOG", False)
    shared.timing_log("f5_engine", total=1.0)
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(shared, "TIMING_LOG", True)
    shared.timing_log("f5_engine", parse=1.5, sends=[[80.0, 1.0, 75.0]], total=82.0)
    line = capsys.readouterr().out.strip()
    assert line.startswith("[timing] f5_engine ") and json.loads(line.split(" ", 2)[2])["total"] == 82.0


def test_summary_of_a_log(tmp_path):
    log = tmp_path / "tritonserver.log"
    engine = [{"requests": 1, "parse": p, "sends": [[t - 2, 1.0, t - 4], [t, 2.0, t - 4]], "total": t + 1}
              for p, t in ((1.0, 80.0), (2.0, 90.0), (3.0, 100.0))]
    front = [{"arrivals": [a, a + 1], "total": a + 3} for a in (81.0, 91.0, 101.0)]
    lines = ["I1202 some server line", "[timing] f5_engine {not json"]
    lines += [f"[timing] f5_engine {json.dumps(r)}" for r in engine]
    lines += [f"[timing] f5_engine:offline_front {json.dumps(r)}" for r in front]
    log.write_text("\n".join(lines) + "\n")
    res = gpu_timing.summarise(gpu_timing.read([log]))
    e, f = res["f5_engine"], res["f5_engine:offline_front"]
    assert e["n"] == 3 and e["parse_ms_p50"] == 2.0 and e["total_ms_p50"] == 91.0
    assert e["first_send_at_ms_p50"] == 88.0 and e["send_ms_p50"] == 1.5
    assert e["outside_compute_ms_p50"] == 2.0  # total - compute - sends = (t + 1) - (t - 4) - 3
    assert f["n"] == 3 and f["first_arrival_ms_p50"] == 91.0 and f["last_arrival_ms_p50"] == 92.0
    assert gpu_timing.main([str(log), "--json", str(tmp_path / "t.json")]) == 0
    assert json.loads((tmp_path / "t.json").read_text()) == res


def test_profile_summary_counts_named_ranges():
    """The summary the engine's STUDIO_PROFILE_DIR files and the request-profile tool share."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            with record_function("f5.steps"):
                torch.ones(64, 64) @ torch.ones(64, 64)
        with record_function("other"):
            torch.zeros(3)
    s = shared.profile_summary(prof)
    assert s["kernels"] == 0 and s["device_busy_ms"] == 0.0 and s["device_span_ms"] == 0.0  # CPU only
    assert set(s["ranges"]) == {"f5.steps"} and s["ranges"]["f5.steps"]["calls"] == 2
    assert s["ranges"]["f5.steps"]["host_ms"] > 0


def test_summary_of_collection_lines(tmp_path):
    log = tmp_path / "tritonserver.log"
    rows = [{"generation": 2, "ms": 134.0, "collected": 0}, {"generation": 0, "ms": 1.5, "collected": 3},
            {"generation": 2, "ms": 140.5, "collected": 0}]
    log.write_text("\n".join(f"[timing] f5_engine:gc {json.dumps(r)}" for r in rows) + "\n")
    gc_summary = gpu_timing.summarise(gpu_timing.read([log]))["f5_engine:gc"]
    assert gc_summary == {"n": 3, "ms_p50": 134.0, "ms_max": 140.5, "ms_sum": 276.0,
                          "by_generation": {"0": 1, "2": 2}}
