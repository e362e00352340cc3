"""Shared fixtures: one real tritonserver with demo weights for the whole session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A data directory shared by the session (demo weights are written once into it)."""
    return tmp_path_factory.mktemp("studio-data")


@pytest.fixture(scope="session")
def triton_server(data_dir):
    """A real embedded tritonserver on free ports, serving every family whose models exist, on demo weights."""
    from studio.server import TritonServer
    from tts.f5.engine import LOOP_ENV

    # The F5 engine's continuous batching is off by default on the CPU (on on a GPU): this server
    # turns it on, so every test through it covers the engine thread (apps the browser tests start,
    # and tests/test_f5_engine.py's `serve`, cover the CPU's default order).
    was = os.environ.get(LOOP_ENV)
    os.environ[LOOP_ENV] = "1"
    try:
        server = TritonServer(data_dir, demo_weights=True, no_download=True, instances=4, gpus=[])
        server.start(timeout_s=600)
    finally:
        if was is None:
            os.environ.pop(LOOP_ENV, None)
        else:
            os.environ[LOOP_ENV] = was
    yield server
    server.stop()


@pytest.fixture()
def client(triton_server):
    from studio.client import StudioClient

    c = StudioClient(triton_server.grpc_url)
    yield c
    c.close()


def speech_like(seconds: float, sr: int, seed: int = 0):
    """A deterministic speech-like test signal: voiced harmonics with a syllable-rate envelope."""
    import numpy as np

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 120 + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 4 * t)) ** 2
    wav = 0.1 * voiced * envelope + 0.003 * rng.standard_normal(t.size)
    return wav.astype(np.float32)


def have_chromium() -> bool:
    return shutil.which("chromium") is not None


os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def no_tf32():
    """fp32 means fp32: no TF32 in cuBLAS or cuDNN for the reference. Set and put back by hand:
    `torch.backends.cuda.matmul` answers `allow_tf32` through its own getattr, which monkeypatch's
    undo cannot put back (torch 2.11)."""
    import torch

    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    old = matmul.allow_tf32, cudnn.allow_tf32
    matmul.allow_tf32 = cudnn.allow_tf32 = False
    yield
    matmul.allow_tf32, cudnn.allow_tf32 = old


def engine_stream(grpc_url: str, model: str, ref, ref_text: str, text: str, params: dict,
                  timeout_s: float = 300.0) -> list[tuple[bool, bool]]:
    """One streaming request straight to an engine model (as its front sends it: `streaming` and a
    `request_key` added); returns (carries audio, carries the final flag) for every response."""
    import queue
    import uuid

    import numpy as np
    import tritonclient.grpc as grpcclient

    from studio.client import build_inputs, is_final

    family = "f5" if model.startswith("f5") else "spark"
    inputs = build_inputs(family, text, ref, ref_text, params)
    for name, dtype, value in (("streaming", "BOOL", np.array([[True]])),
                               ("request_key", "BYTES", np.array([[uuid.uuid4().hex.encode()]], dtype=object))):
        extra = grpcclient.InferInput(name, [1, 1], dtype)
        extra.set_data_from_numpy(value)
        inputs.append(extra)
    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        client.start_stream(callback=lambda result, error: answers.put(error or result))
        client.async_stream_infer(model, inputs, outputs=[grpcclient.InferRequestedOutput("waveform")],
                                  enable_empty_final_response=True)
        seen = []
        while not seen or not seen[-1][1]:
            result = answers.get(timeout=timeout_s)
            assert not isinstance(result, Exception), result
            wav = result.as_numpy("waveform")
            seen.append((wav is not None and wav.size > 0, is_final(result)))
        client.stop_stream()
    finally:
        client.close()
    return seen
