"""Model-repository rendering and server-manager behaviour that needs no running server."""

from __future__ import annotations

import re

import pytest

from studio.server import FAMILY_MODELS, engine_instance_group, render_model_repository
from studio.weights import FamilyWeights


def fake_f5() -> FamilyWeights:
    return FamilyWeights("f5", True, "demo", {"checkpoint": "/w/model.safetensors", "vocab": "/w/vocab.txt",
                                              "model_dir": "/w", "vocos_dir": "/v", "model_name": "F5TTS_Demo"})


@pytest.mark.parametrize("gpus", [[], [0], [0, 1], [0, 1, 2, 3]])
def test_engine_placed_on_every_gpu_fronts_on_cpu(tmp_path, gpus):
    names = render_model_repository(tmp_path, {"f5": fake_f5()}, gpus=gpus, front_instances=7)
    assert names == list(FAMILY_MODELS["f5"])
    engine = (tmp_path / "f5_engine" / "config.pbtxt").read_text()
    if gpus:
        assert "KIND_GPU" in engine and f"gpus: [{', '.join(map(str, gpus))}]" in engine
    else:
        assert "KIND_CPU" in engine and "KIND_GPU" not in engine
    for front in ("f5_tts", "f5_tts_stream"):
        cfg = (tmp_path / front / "config.pbtxt").read_text()
        assert "count: 7 kind: KIND_CPU" in cfg
        assert "${" not in cfg
    assert '"true"' in engine  # demo_weights parameter
    assert "${" not in engine
    assert (tmp_path / "f5_engine" / "1" / "model.py").is_file()


def test_stream_front_is_decoupled_offline_is_not(tmp_path):
    render_model_repository(tmp_path, {"f5": fake_f5()}, gpus=[], front_instances=1)
    decoupled = re.compile(r"decoupled:\s*true")
    assert decoupled.search((tmp_path / "f5_tts_stream" / "config.pbtxt").read_text())
    assert decoupled.search((tmp_path / "f5_engine" / "config.pbtxt").read_text())
    assert not decoupled.search((tmp_path / "f5_tts" / "config.pbtxt").read_text())


def test_engine_instances_per_gpu():
    assert engine_instance_group([0, 1], 2) == "[{ count: 2 kind: KIND_GPU gpus: [0, 1] }]"


def test_missing_template_value_fails_loudly(tmp_path):
    broken = FamilyWeights("f5", True, "demo", {"checkpoint": "/x"})  # no vocab, vocos_dir, ...
    with pytest.raises(KeyError):
        render_model_repository(tmp_path, {"f5": broken}, gpus=[], front_instances=1)


def test_dead_server_is_restarted(triton_server):
    """Kill the server process group from outside: the watchdog brings it back on the same ports."""
    import os
    import signal
    import time

    old_pid = triton_server._proc.pid
    os.killpg(os.getpgid(old_pid), signal.SIGKILL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        proc = triton_server._proc
        if proc is not None and proc.pid != old_pid and triton_server.status()["state"] == "ready":
            break
        time.sleep(0.5)
    assert triton_server._proc is not None and triton_server._proc.pid != old_pid
    assert triton_server.status()["state"] == "ready"
    # the restart launched with the environment of the start (the fixture set the engine loop switch
    # only while starting; its limits and switches would otherwise be lost on a restart)
    from tts.f5.engine import LOOP_ENV

    assert os.environ.get(LOOP_ENV) is None
    with open(f"/proc/{triton_server._proc.pid}/environ", "rb") as f:
        launched = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    assert launched.get(LOOP_ENV.encode()) == b"1"
    from studio.client import StudioClient

    with StudioClient(triton_server.grpc_url) as c:  # the restarted server serves on the same ports
        assert c.server_ready()


def test_stub_library_path_holds_only_libpython(tmp_path, monkeypatch):
    """The stub's LD_LIBRARY_PATH gets a folder of links to libpython, never Python's whole LIBDIR
    (a cuDNN there beat torch's own on the H200 image)."""
    import sysconfig

    from studio.server import TritonServer

    libdir = tmp_path / "lib"
    libdir.mkdir()
    (libdir / "libpython3.99.so.1.0").write_bytes(b"")
    (libdir / "libcudnn.so.9").write_bytes(b"")  # must not reach the stub
    fake = {"LIBDIR": str(libdir), "INSTSONAME": "libpython3.99.so.1.0", "LDLIBRARY": "libpython3.99.so"}
    monkeypatch.setattr(sysconfig, "get_config_var", lambda k: fake.get(k))
    server = TritonServer(tmp_path / "data", gpus=[], demo_weights=True)
    server.run_dir = tmp_path / "run"
    folder = server._libpython_dir()
    assert folder != str(libdir)
    assert sorted(p.name for p in (tmp_path / "run" / "libpython").iterdir()) == ["libpython3.99.so.1.0"]
    assert (tmp_path / "run" / "libpython" / "libpython3.99.so.1.0").resolve() == libdir / "libpython3.99.so.1.0"
    fake["INSTSONAME"] = fake["LDLIBRARY"] = None  # no libpython found: LIBDIR as before
    assert server._libpython_dir() == str(libdir)


def test_require_weights_refuses_a_demo_fallback(data_dir, tmp_path):
    """--require-weights: a family without real weights stops the start with its reason, before any
    tritonserver runs; demo weights asked for by name are still allowed."""
    from studio.server import ServerStartError, TritonServer

    server = TritonServer(data_dir, no_download=True, checkpoints=tmp_path / "empty", families=["f5", "spark"],
                          gpus=[], require_weights=True, log=lambda msg: None)
    with pytest.raises(ServerStartError) as err:
        server.start(timeout_s=30)
    text = str(err.value)
    assert "--require-weights" in text and "f5: real weights not found and downloads are off" in text
    assert "spark: real weights not found" in text
    assert server._proc is None and server.status()["state"] == "failed"
    asked = TritonServer(data_dir, demo_weights=True, families=["f5"], gpus=[], require_weights=True,
                         log=lambda msg: None)
    asked._resolve_weights()  # no error: the demo weights were asked for
    assert asked._weights["f5"].demo


def test_a_failed_reload_of_a_dead_model_is_retried_soon_then_less_often(tmp_path, monkeypatch):
    """The supervisor retries a dead model's failed reload after RELOAD_RETRY_S, doubling up to
    RELOAD_RETRY_MAX_S, and forgets the back-off once a reload succeeds."""
    import studio.client as client_mod
    from studio import server as server_mod
    from studio.client import SynthesisError

    server = server_mod.TritonServer(tmp_path / "data", gpus=[], demo_weights=True, families=["f5"])
    server.run_dir = tmp_path / "run"
    (server.run_dir / "stubs").mkdir(parents=True)
    clock = [1000.0]
    monkeypatch.setattr(server_mod.time, "monotonic", lambda: clock[0])
    tries, outcomes = [], iter([False, False, False, True])
    monkeypatch.setattr(server, "dead_instances", lambda: {} if server.reloads else {"f5_engine": ["f5_engine_0_0"]})

    class FakeClient:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def reload_model(self, name, **kw):
            tries.append(clock[0])
            if not next(outcomes):
                raise SynthesisError("Stub process 'f5_engine_0_0' is not healthy")

    monkeypatch.setattr(client_mod, "StudioClient", FakeClient)
    logs = []
    monkeypatch.setattr(server, "_log_fn", logs.append)
    for _ in range(60):  # one supervision pass a second for a minute
        server._reload_dead_models()
        clock[0] += 1.0
    first = 1000.0
    assert tries == [first, first + server_mod.RELOAD_RETRY_S, first + 3 * server_mod.RELOAD_RETRY_S,
                     first + 7 * server_mod.RELOAD_RETRY_S]
    assert server.reloads and server.reloads[-1][0] == "f5_engine" and "f5_engine" not in server._reload_failed
    assert any("next try in 5 s" in line for line in logs)
