"""Prometheus metrics: Triton's own (--metrics-port) and the studio's (GET /metrics, studio/metrics.py).

Every scrape is parsed with prometheus_client's text parser. Three real servers' worth of checks:
- a small embedded tritonserver (F5 only, demo weights) with metrics on: Triton's per-model counters
  after one request; the studio's API run in-process over it counts generations exactly, an error
  generation included (the server is started with a lower F5 text limit than the app side checks,
  so the model itself refuses the request, as in test_reliability's fault server);
- a real `python app.py` (metrics off, the default): /metrics over loopback after real generations,
  and its tritonserver listens on its HTTP and gRPC ports only.
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.app_process import base_env, free_port, start_app, stop_app
from tests.conftest import speech_like

F5 = {"nfe_steps": 2}
SHORT = "Hello there, friend."
#: The small server refuses F5 texts over this many characters; the app side allows the default 5000.
SERVER_F5_TEXT_LIMIT = 200
#: How long Triton may take to publish a request in its metrics (it collects every 2 s by default;
#: its request counters are updated as requests end, so this is a bound, not a wait).
TRITON_METRICS_WAIT_S = 30


# --- helpers ------------------------------------------------------------------------------------------
def parse(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a Prometheus text page: (sample name, sorted label items) -> value."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted((k, str(v)) for k, v in labels.items()))), 0.0)


def listening_ports(pid: int) -> dict[int, str]:
    """TCP port -> local address (hex as in /proc/net/tcp*, or dotted IPv4) of every listening socket
    the process `pid` holds (its fds matched to the kernel's socket tables by inode)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            local, state, inode = parts[1], parts[3], parts[9]
            if state == "0A" and inode in inodes:  # 0A: LISTEN
                addr, port = local.split(":")
                found[int(port, 16)] = (socket.inet_ntoa(bytes.fromhex(addr)[::-1]) if len(addr) == 8 else addr)
    return found


def refused(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) != 0


def studio_counts(samples: dict) -> dict:
    """The studio's counters and histogram counts/sums, by (name, family, mode[, outcome])."""
    out = {}
    for (name, labels), val in samples.items():
        d = dict(labels)
        if name == "studio_generations_total":
            out[(name, d["family"], d["mode"], d["outcome"])] = val
        elif name.endswith(("_count", "_sum")) or name == "studio_audio_seconds_total":
            if name.startswith(("studio_generation_", "studio_audio")):
                out[(name, d["family"], d["mode"])] = val
    return out


def delta(before: dict, after: dict) -> dict:
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in set(before) | set(after)
            if abs(after.get(k, 0.0) - before.get(k, 0.0)) > 0}


# --- unit: the registry, the access rule, the client's observer ---------------------------------------
def test_registry_counts_and_histograms_parse():
    from studio.client import SynthResult
    from studio.metrics import LATENCY_BUCKETS_S, RTF_BUCKETS, StudioMetrics

    depth = {"waiting": 3, "running": 2}
    m = StudioMetrics(queue=lambda: (depth["waiting"], depth["running"]), limit=lambda: 4)
    samples = parse(m.render().decode())
    # every series exists at 0 before any generation
    assert value(samples, "studio_generations_total", family="spark", mode="streaming", outcome="cancelled") == 0
    assert value(samples, "studio_generation_rtf_count", family="f5", mode="offline") == 0
    assert value(samples, "studio_queue_depth", state="waiting") == 3
    assert value(samples, "studio_queue_depth", state="running") == 2
    assert value(samples, "studio_generation_slots") == 4

    import numpy as np

    def result(latency, first, audio_s):
        return SynthResult(np.zeros(int(audio_s * 24000), np.float32), 24000, latency, first, audio_s,
                           latency / audio_s, {})
    m.observe("f5", False, "ok", result(0.3, 0.3, 1.5))
    m.observe("f5", True, "ok", result(2.0, 0.1, 4.0))
    m.observe("f5", True, "ok", result(1.0, 0.2, 2.0))
    m.observe("spark", False, "error")
    m.observe("spark", True, "cancelled")
    depth["waiting"] = 0
    samples = parse(m.render().decode())
    assert value(samples, "studio_generations_total", family="f5", mode="offline", outcome="ok") == 1
    assert value(samples, "studio_generations_total", family="f5", mode="streaming", outcome="ok") == 2
    assert value(samples, "studio_generations_total", family="spark", mode="offline", outcome="error") == 1
    assert value(samples, "studio_generations_total", family="spark", mode="streaming", outcome="cancelled") == 1
    assert value(samples, "studio_generation_latency_seconds_count", family="f5", mode="streaming") == 2
    assert value(samples, "studio_generation_latency_seconds_sum", family="f5", mode="streaming") == pytest.approx(3.0)
    assert value(samples, "studio_generation_first_chunk_seconds_sum", family="f5", mode="streaming") == \
        pytest.approx(0.3)
    assert value(samples, "studio_generation_latency_seconds_count", family="spark", mode="offline") == 0
    assert value(samples, "studio_audio_seconds_total", family="f5", mode="streaming") == pytest.approx(6.0)
    # RTF 0.5 twice: in the 0.5 bucket (le is inclusive) and every one above, not in 0.2
    assert value(samples, "studio_generation_rtf_bucket", family="f5", mode="streaming", le="0.5") == 2
    assert value(samples, "studio_generation_rtf_bucket", family="f5", mode="streaming", le="0.2") == 0
    assert value(samples, "studio_generation_rtf_bucket", family="f5", mode="offline", le="0.2") == 1
    assert value(samples, "studio_queue_depth", state="waiting") == 0
    assert list(LATENCY_BUCKETS_S) == sorted(LATENCY_BUCKETS_S) and list(RTF_BUCKETS) == sorted(RTF_BUCKETS)
    assert RTF_BUCKETS[0] < 0.005 and RTF_BUCKETS[-1] > 1  # GPU to CPU
    # a second registry in the same process counts on its own
    assert value(parse(StudioMetrics().render().decode()), "studio_generations_total", family="f5",
                 mode="offline", outcome="ok") == 0
    with pytest.raises(ValueError):
        m.observe("bark", False, "ok")


def test_metrics_access_rule_and_route():
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from studio.metrics import StudioMetrics, metrics_allowed, metrics_routes

    assert metrics_allowed(None, "127.0.0.1", "")[0] and metrics_allowed(None, "::1", "")[0]
    assert not metrics_allowed(None, "10.1.2.3", "")[0] and not metrics_allowed(None, None, "")[0]
    assert metrics_allowed("s3cret", "10.1.2.3", "Bearer s3cret")[0]
    assert not metrics_allowed("s3cret", "127.0.0.1", "")[0]  # with a token, loopback needs it too
    assert not metrics_allowed("s3cret", "127.0.0.1", "Bearer wrong")[0]

    class Rt:
        class options:
            metrics_token = None
        metrics = StudioMetrics()

    with TestClient(Starlette(routes=metrics_routes(Rt))) as http:  # its client address is "testclient"
        r = http.get("/metrics")
        assert r.status_code == 403 and "--metrics-token" in r.text
        Rt.options.metrics_token = "s3cret"
        assert http.get("/metrics").status_code == 401
        assert http.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
        r = http.get("/metrics", headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert value(parse(r.text), "studio_generation_slots") == 0


def test_client_observer_sees_every_outcome(monkeypatch):
    from studio.client import GenerationCancelled, StudioClient, SynthesisError

    seen = []
    client = StudioClient("127.0.0.1:1", observer=lambda *a: seen.append(a))
    outcomes = iter([SynthesisError("refused"), GenerationCancelled("stopped"), RuntimeError("bug"), "RESULT"])

    def fake(*args, **kwargs):
        nxt = next(outcomes)
        if isinstance(nxt, BaseException):
            raise nxt
        return nxt
    monkeypatch.setattr(client, "_synthesize", fake)
    try:
        for exc in (SynthesisError, GenerationCancelled, RuntimeError):
            with pytest.raises(exc):
                client.synthesize("spark", "Hi.", None, "", stream=True)
        assert client.synthesize("f5", "Hi.", None, "") == "RESULT"
        with pytest.raises(ValueError):  # an unknown model never reaches the server: not counted
            client.synthesize("bark", "Hi.", None, "")
    finally:
        client.close()
    assert seen == [("spark", True, "error", None), ("spark", True, "cancelled", None),
                    ("spark", True, "error", None), ("f5", False, "ok", "RESULT")]


def test_metrics_port_flag_and_url(monkeypatch, tmp_path):
    import argparse

    from studio.cli import add_server_args, make_server
    from studio.server import TritonServer

    def parsed(*argv):
        p = argparse.ArgumentParser()
        add_server_args(p)
        return p.parse_args(list(argv))
    monkeypatch.delenv("STUDIO_METRICS_PORT", raising=False)
    assert parsed().metrics_port is None
    assert parsed("--metrics-port", "9400").metrics_port == 9400
    monkeypatch.setenv("STUDIO_METRICS_PORT", "9401")
    args = parsed("--demo-weights", "--data-dir", str(tmp_path))
    assert args.metrics_port == 9401 and make_server(args, families=["f5"]).metrics_port == 9401
    def url(**kwargs):
        return TritonServer(tmp_path, families=["f5"], gpus=[], **kwargs).metrics_url
    assert url() is None
    assert url(metrics_port=9402) == "http://127.0.0.1:9402/metrics"
    assert url(metrics_port=9402, bind="0.0.0.0") == "http://127.0.0.1:9402/metrics"  # read through loopback
    assert url(metrics_port=9402, bind="::1") == "http://[::1]:9402/metrics"


# --- a real tritonserver with metrics on ----------------------------------------------------------------
@pytest.fixture(scope="module")
def metrics_server(data_dir):
    """F5 only, demo weights, Triton's metrics on a free port; its models refuse F5 texts over
    SERVER_F5_TEXT_LIMIT characters (the server reads the limit from its environment at launch)."""
    from studio.server import TritonServer

    from tts.f5.engine import LOOP_ENV

    server = TritonServer(data_dir, demo_weights=True, no_download=True, instances=2, gpus=[], families=["f5"],
                          no_asr=True, metrics_port=free_port())
    # the engine thread, as on a GPU (off by default on the CPU): it exports its own queue time
    settings = {"STUDIO_MAX_TEXT_CHARS_F5": str(SERVER_F5_TEXT_LIMIT), LOOP_ENV: "1"}
    old = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        server.start(timeout_s=600)
    finally:
        for name, was in old.items():
            if was is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = was
    yield server
    server.stop()


def scrape_triton(server) -> dict:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
        assert r.status == 200
        return parse(r.read().decode())


def test_triton_metrics_after_one_request(metrics_server):
    from studio.client import StudioClient

    assert metrics_server.metrics_url == f"http://127.0.0.1:{metrics_server.metrics_port}/metrics"
    # bound where the server's other ports are (--triton-bind, 127.0.0.1 by default), nowhere else
    assert listening_ports(metrics_server._proc.pid).get(metrics_server.metrics_port) == "127.0.0.1"
    before = scrape_triton(metrics_server)
    with StudioClient(metrics_server.grpc_url) as client:
        result = client.synthesize("f5", SHORT, speech_like(2.0, 24000), "A few words here.", params=F5)
    assert result.audio.size > 0
    # the engine thread's own queue time (Triton's execute only hands the request over): the counter
    # grew by exactly the wait the engine reported for this request, in microseconds
    queued = {labels: v for (name, labels), v in scrape_triton(metrics_server).items()
              if name == "studio_engine_queue_duration_us_total"}
    assert queued and all(dict(labels)["model"] == "f5_engine" for labels in queued), queued
    queued_before = sum(v for (name, _), v in before.items() if name == "studio_engine_queue_duration_us_total")
    assert sum(queued.values()) - queued_before == pytest.approx(result.info["queue_ms"] * 1000, abs=2)
    deadline = time.monotonic() + TRITON_METRICS_WAIT_S
    while True:
        after = scrape_triton(metrics_server)
        grown = {m: value(after, "nv_inference_request_success_total", model=m, version=1)
                 - value(before, "nv_inference_request_success_total", model=m, version=1)
                 for m in ("f5_tts", "f5_engine")}
        if all(v >= 1 for v in grown.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert grown["f5_tts"] == 1 and grown["f5_engine"] >= 1, grown
    for model in ("f5_tts", "f5_engine"):
        assert ("nv_inference_queue_duration_us_total", (("model", model), ("version", "1"))) in after
    assert value(after, "nv_inference_request_duration_us_total", model="f5_tts", version=1) > 0


def test_studio_api_counts_generations_exactly(metrics_server, tmp_path):
    """The studio's API in-process over the real server: counters and histogram counts move by exactly
    the generations made (offline, streaming, and one the model refuses), the sums by their figures."""
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from studio.api import api_routes
    from studio.metrics import metrics_routes
    from studio.ui_runtime import RuntimeOptions, StudioRuntime

    rt = StudioRuntime(RuntimeOptions(data_dir=tmp_path / "data", triton_url=metrics_server.grpc_url,
                                      metrics_token="scrape-me", api_key=None))
    rt.start()
    auth = {"Authorization": "Bearer scrape-me"}
    body = {"model": "f5-tts", "voice": "alloy", "input": SHORT, "response_format": "wav", **F5}
    try:
        with TestClient(Starlette(routes=api_routes(rt) + metrics_routes(rt))) as http:
            def scrape():
                r = http.get("/metrics", headers=auth)
                assert r.status_code == 200, r.text
                assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
                return parse(r.text)

            before = scrape()
            latencies, audio = [], []
            for _ in range(2):
                r = http.post("/v1/audio/speech", json=body)
                assert r.status_code == 200, r.text
                latencies.append(float(r.headers["x-studio-latency-s"]))
                audio.append(float(r.headers["x-studio-audio-s"]))
            r = http.post("/v1/audio/speech", json={**body, "stream_format": "sse"})
            assert r.status_code == 200, r.text
            done = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")][-1]
            assert done["type"] == "speech.audio.done"
            long_text = "word " * (SERVER_F5_TEXT_LIMIT // 4)  # over the server's limit, under the app's
            r = http.post("/v1/audio/speech", json={**body, "input": long_text})
            assert r.status_code == 400 and "STUDIO_MAX_TEXT_CHARS_F5" in r.json()["error"]["message"], r.text
            after = scrape()
    finally:
        rt.stop()

    moved = delta(studio_counts(before), studio_counts(after))
    assert moved.pop(("studio_generations_total", "f5", "offline", "ok")) == 2
    assert moved.pop(("studio_generations_total", "f5", "streaming", "ok")) == 1
    assert moved.pop(("studio_generations_total", "f5", "offline", "error")) == 1
    for name in ("studio_generation_latency_seconds_count", "studio_generation_first_chunk_seconds_count",
                 "studio_generation_rtf_count"):
        assert moved.pop((name, "f5", "offline")) == 2 and moved.pop((name, "f5", "streaming")) == 1
    # sums: the figures the API reported (rounded to 4 and 6 decimals there)
    assert moved.pop(("studio_generation_latency_seconds_sum", "f5", "offline")) == \
        pytest.approx(sum(latencies), abs=1e-3)
    assert moved.pop(("studio_generation_latency_seconds_sum", "f5", "streaming")) == \
        pytest.approx(done["latency_s"], abs=1e-3)
    assert moved.pop(("studio_generation_first_chunk_seconds_sum", "f5", "streaming")) == \
        pytest.approx(done["first_chunk_s"], abs=1e-3)
    assert moved.pop(("studio_generation_first_chunk_seconds_sum", "f5", "offline")) == \
        pytest.approx(sum(latencies), abs=1e-3)  # offline: first chunk = latency
    assert moved.pop(("studio_audio_seconds_total", "f5", "offline")) == pytest.approx(sum(audio), abs=1e-5)
    assert moved.pop(("studio_audio_seconds_total", "f5", "streaming")) == pytest.approx(done["audio_s"], abs=1e-5)
    assert moved.pop(("studio_generation_rtf_sum", "f5", "offline")) > 0
    assert moved.pop(("studio_generation_rtf_sum", "f5", "streaming")) > 0
    assert moved == {}  # nothing else moved (no Spark, no cancellation)
    assert value(after, "studio_queue_depth", state="waiting") == 0
    assert value(after, "studio_queue_depth", state="running") == 0
    assert value(after, "studio_generation_slots") == rt.slots.limit


# --- a real app.py (Triton's metrics off) ----------------------------------------------------------------
@pytest.fixture(scope="module")
def app(tmp_path_factory, data_dir):
    logs = tmp_path_factory.mktemp("metrics-app")
    port = free_port()
    args = ["--demo-weights", "--no-download", "--data-dir", str(data_dir), "--port", str(port),
            "--http-port", str(free_port()), "--grpc-port", str(free_port()), "--instances", "2", "--no-asr"]
    env = base_env(STUDIO_CONCURRENCY=2)
    for name in ("STUDIO_METRICS_PORT", "STUDIO_METRICS_TOKEN"):
        env.pop(name, None)
    running = start_app(args, env, logs / "app.log", port)
    yield running
    stop_app(running)


def scrape_app(app) -> dict:
    with urllib.request.urlopen(app.url + "/metrics", timeout=30) as r:
        assert r.status == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
        return parse(r.read().decode())


def test_app_metrics_over_loopback_after_real_generations(app):
    """start_app made one F5 and one Spark generation through the API (offline); one streamed Spark
    generation more moves exactly its own series."""
    before = scrape_app(app)
    for fam in ("f5", "spark"):
        assert value(before, "studio_generations_total", family=fam, mode="offline", outcome="ok") == 1
        assert value(before, "studio_generation_latency_seconds_count", family=fam, mode="offline") == 1
    body = {"model": "spark-tts", "voice": "alloy", "input": SHORT, "response_format": "pcm",
            "stream_format": "sse", "max_new_tokens": 60}
    req = urllib.request.Request(app.url + "/v1/audio/speech", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        events = [json.loads(line[6:]) for line in r.read().decode().splitlines() if line.startswith("data: ")]
    done = events[-1]
    assert done["type"] == "speech.audio.done"
    after = scrape_app(app)
    moved = delta(studio_counts(before), studio_counts(after))
    assert moved.pop(("studio_generations_total", "spark", "streaming", "ok")) == 1
    for name in ("studio_generation_latency_seconds_count", "studio_generation_first_chunk_seconds_count",
                 "studio_generation_rtf_count"):
        assert moved.pop((name, "spark", "streaming")) == 1
    assert moved.pop(("studio_generation_first_chunk_seconds_sum", "spark", "streaming")) == \
        pytest.approx(done["first_chunk_s"], abs=1e-3)
    assert moved.pop(("studio_audio_seconds_total", "spark", "streaming")) == pytest.approx(done["audio_s"], abs=1e-5)
    assert set(moved) == {("studio_generation_latency_seconds_sum", "spark", "streaming"),
                          ("studio_generation_rtf_sum", "spark", "streaming")}
    assert value(after, "studio_generation_slots") == 2  # STUDIO_CONCURRENCY


def test_app_triton_metrics_are_off_by_default(app, data_dir):
    """Without --metrics-port the app's tritonserver listens on its HTTP and gRPC ports only, and the
    metrics port it was told (to keep it off 8002) refuses connections."""
    registry = json.loads((data_dir / "runs" / "registry.json").read_text())
    run = next(e for e in registry.values() if e.get("app_pid") == app.proc.pid)
    pid = run["server_pid"]
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    assert "--allow-metrics=false" in argv
    named = int(next(a for a in argv if a.startswith("--metrics-port=")).split("=", 1)[1])
    assert set(listening_ports(pid)) == {run["http_port"], run["grpc_port"]}
    assert refused(named)
