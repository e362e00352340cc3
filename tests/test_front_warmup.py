"""The front warm-up at server start (studio.front_warmup), against the shared real tritonserver."""

from __future__ import annotations

import pytest

from studio import front_warmup
from tts.audio import F5_SAMPLE_RATE, SPARK_SAMPLE_RATE, validate_waveform


@pytest.mark.parametrize("sr", [F5_SAMPLE_RATE, SPARK_SAMPLE_RATE])
def test_the_warm_prompt_passes_the_prompt_checks(sr):
    wav = front_warmup.warm_prompt(sr)
    validate_waveform(wav, sr)
    assert wav.dtype.name == "float32" and wav.size == int(front_warmup.WARM_PROMPT_S * sr)
    assert 0.1 < abs(wav).max() <= 0.2 + 1e-6


def test_every_front_instance_gets_a_request(triton_server):
    """Each request succeeds, and every instance of the offline F5 front is seen waiting on its
    engine (its busy marker) while the warm-up runs: the requests spread over all instances."""
    import threading
    import time

    from triton_models.shared import BUSY_SUFFIX, is_busy

    lines: list[str] = []
    n = triton_server.front_instances
    markers = sorted((triton_server.run_dir / "stubs").glob(f"f5_tts_0_*{BUSY_SUFFIX}"))
    assert len(markers) == n
    seen: set[str] = set()
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen.update(p.name for p in markers if is_busy(p))
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        done = front_warmup.warm_fronts(triton_server.grpc_url, ["f5", "spark", "asr"], n, log=lines.append)
    finally:
        stop.set()
        watcher.join(5)
    assert done == {"f5_tts": n, "f5_tts_stream": n, "spark_tts": n, "spark_tts_stream": n}, lines
    assert len(lines) == 4 and all(f"{n} of {n} instances" in line and "failed" not in line for line in lines)
    assert seen == {p.name for p in markers}, "every f5_tts instance took one of the requests"


def test_failed_warm_up_requests_are_logged_not_raised():
    lines: list[str] = []
    done = front_warmup.warm_fronts("127.0.0.1:1", ["f5"], 2, log=lines.append)  # nothing listens there
    assert done == {"f5_tts": 0, "f5_tts_stream": 0}
    assert all("0 of 2 instances" in line and "2 failed" in line for line in lines), lines


def test_the_switch_and_its_defaults(tmp_path, monkeypatch):
    from studio.server import TritonServer

    server = TritonServer(tmp_path, demo_weights=True, no_download=True, gpus=[], families=["f5"])
    monkeypatch.delenv(front_warmup.WARM_FRONTS_ENV, raising=False)
    assert server._warm_fronts_wanted() is False, "off by default on the CPU"
    server.gpus = [0]
    assert server._warm_fronts_wanted() is False, "off by default with GPUs too"
    monkeypatch.setenv(front_warmup.WARM_FRONTS_ENV, "0")
    assert server._warm_fronts_wanted() is False
    server.gpus = []
    monkeypatch.setenv(front_warmup.WARM_FRONTS_ENV, "1")
    assert server._warm_fronts_wanted() is True
    monkeypatch.setenv(front_warmup.WARM_FRONTS_ENV, "sometimes")
    with pytest.raises(ValueError, match=front_warmup.WARM_FRONTS_ENV):
        server._warm_fronts_wanted()
    with pytest.raises(Exception, match=front_warmup.WARM_FRONTS_ENV):
        server.start(timeout_s=5)  # refused before any weights are resolved or models loaded
    assert server.status()["state"] == "failed" and not (tmp_path / "runs").exists()


def test_a_failing_warm_up_never_stops_the_server(tmp_path, monkeypatch):
    from studio.server import TritonServer

    calls, lines = [], []
    server = TritonServer(tmp_path, demo_weights=True, no_download=True, gpus=[], families=["f5"],
                          log=lines.append)
    monkeypatch.setattr(front_warmup, "warm_fronts", lambda *a, **k: calls.append(a))
    monkeypatch.delenv(front_warmup.WARM_FRONTS_ENV, raising=False)
    server._warm_fronts()
    assert calls == [], "not wanted: nothing sent"
    monkeypatch.setenv(front_warmup.WARM_FRONTS_ENV, "1")
    server._warm_fronts()
    assert calls == [(server.grpc_url, ["f5"], server.front_instances)]

    def broken(*a, **k):
        raise RuntimeError("no channel")
    monkeypatch.setattr(front_warmup, "warm_fronts", broken)
    server._warm_fronts()
    assert lines[-1] == "front warm-up failed: RuntimeError: no channel"
