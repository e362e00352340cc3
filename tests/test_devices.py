"""tts/devices.py: every thread that does an engine's device work names the engine's GPU first
(CUDA's current device is per thread and 0 in a new one). No GPU needed: set_device is recorded."""

from __future__ import annotations

import threading

import torch

from tests.test_f5_engine import FakePipeline, ListSink, request
from tts import devices
from tts.f5.engine import F5Engine


def record_set_device(monkeypatch) -> list:
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device",
                        lambda device: calls.append((threading.current_thread().name, torch.device(device))))
    return calls


def test_bind_thread(monkeypatch):
    calls = record_set_device(monkeypatch)
    devices.bind_thread(None)
    devices.bind_thread("cpu")
    assert calls == []
    devices.bind_thread("cuda")  # no index: the thread's current GPU, nothing to set
    assert calls == []
    devices.bind_thread("cuda:1")
    assert calls == [(threading.current_thread().name, torch.device("cuda", 1))]


def test_resolve_fills_in_the_current_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert devices.resolve("cuda") == torch.device("cuda", 3)
    assert devices.resolve("cuda:1") == torch.device("cuda", 1)
    assert devices.resolve("cpu") == torch.device("cpu")


def test_f5_engine_thread_binds_the_pipeline_device(monkeypatch):
    calls = record_set_device(monkeypatch)
    pipe = FakePipeline()
    pipe.device = torch.device("cuda", 1)
    engine = F5Engine(pipe, demo_weights=False, log=lambda msg: None)
    try:
        sink = ListSink()
        engine.submit("a", request("a", 1), False, sink)
        assert sink.finished.wait(10)
    finally:
        engine.close()
    assert ("f5-engine", torch.device("cuda", 1)) in calls


def test_spark_vocode_worker_binds_its_device(monkeypatch):
    from tts.spark import vocode_worker

    calls = record_set_device(monkeypatch)
    monkeypatch.setattr(vocode_worker, "_side_stream", lambda device: __import__("contextlib").nullcontext())
    worker = vocode_worker.VocodeWorker(device="cuda:2", name="vocode-test")
    done = threading.Event()
    worker.submit("x", done.set)
    assert done.wait(10)
    worker.close()
    assert ("vocode-test", torch.device("cuda", 2)) in calls
