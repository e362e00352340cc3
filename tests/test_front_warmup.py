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
    lines: list[str] = []
    n = triton_server.front_instances
    done = front_warmup.warm_fronts(triton_server.grpc_url, ["f5", "spark", "asr"], n, log=lines.append)
    assert done == {"f5_tts": n, "f5_tts_stream": n, "spark_tts": n, "spark_tts_stream": n}, lines
    assert len(lines) == 4 and all(f"{n} of {n} instances" in line and "failed" not in line for line in lines)


def test_failed_warm_up_requests_are_logged_not_raised():
    lines: list[str] = []
    done = front_warmup.warm_fronts("127.0.0.1:1", ["f5"], 2, log=lines.append)  # nothing listens there
    assert done == {"f5_tts": 0, "f5_tts_stream": 0}
    assert all("0 of 2 instances" in line and "2 failed" in line for line in lines), lines


def test_the_switch_turns_it_off(tmp_path, monkeypatch):
    from studio.server import TritonServer

    calls = []
    monkeypatch.setattr(front_warmup, "warm_fronts", lambda *a, **k: calls.append(a))
    server = TritonServer(tmp_path, demo_weights=True, no_download=True, gpus=[], families=["f5"])
    monkeypatch.delenv(front_warmup.WARM_FRONTS_ENV, raising=False)
    server._warm_fronts()
    assert calls == [], "off by default on the CPU"
    server.gpus = [0]
    server._warm_fronts()
    assert len(calls) == 1, "on by default with GPUs"
    calls.clear()
    monkeypatch.setenv(front_warmup.WARM_FRONTS_ENV, "0")
    server._warm_fronts()
    assert calls == []
    server.gpus = []
    monkeypatch.setenv(front_warmup.WARM_FRONTS_ENV, "1")
    server._warm_fronts()
    assert calls == [(server.grpc_url, ["f5"], server.front_instances)]
    monkeypatch.setenv(front_warmup.WARM_FRONTS_ENV, "sometimes")
    with pytest.raises(ValueError, match=front_warmup.WARM_FRONTS_ENV):
        server._warm_fronts()
