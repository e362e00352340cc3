"""Triton tracing for the way through the server (STUDIO_TRITON_TRACE, tools/trace_legs.py), the
heap freeze and collection log of every model process, and the fronts' imports."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest

from studio.server import TRACE_ENV, trace_args
from tools import trace_legs
from triton_models import shared

ROOT = Path(__file__).resolve().parent.parent


def test_trace_args_only_when_asked():
    assert trace_args("") == []
    args = trace_args("/tmp/run/trace.json")
    assert "--trace-config=triton,file=/tmp/run/trace.json" in args
    assert "--trace-config=level=TIMESTAMPS" in args and "--trace-config=rate=1" in args


class _Request:
    def trace(self):
        return "the trace"


def test_bls_requests_carry_the_trace_only_while_tracing(monkeypatch):
    monkeypatch.setattr(shared, "TRACING", False)
    assert shared.traced(_Request()) == {}
    monkeypatch.setattr(shared, "TRACING", True)
    assert shared.traced(_Request()) == {"trace": "the trace"}
    assert shared.traced(object()) == {}  # a backend without request.trace()


def _records(front_id: int, child_id: int, t0: int, engine_ms: float) -> list[dict]:
    ms = 1_000_000
    front = {"REQUEST_START": 0, "QUEUE_START": 0.05, "COMPUTE_START": 0.2, "COMPUTE_INPUT_END": 0.3,
             "INFER_RESPONSE_COMPLETE": 3 + engine_ms, "GRPC_SEND_START": 3.1 + engine_ms,
             "GRPC_SEND_END": 3.6 + engine_ms, "COMPUTE_END": 4 + engine_ms, "REQUEST_END": 4.1 + engine_ms}
    child = {"REQUEST_START": 1.3, "QUEUE_START": 1.35, "COMPUTE_START": 1.6, "COMPUTE_INPUT_END": 1.7,
             "COMPUTE_OUTPUT_START": 2.2, "COMPUTE_END": 2.25, "REQUEST_END": 2.3}
    out = [{"id": front_id, "model_name": "f5_tts", "model_version": 1, "request_id": f"r{front_id}"},
           {"id": child_id, "model_name": "f5_engine", "model_version": 1, "parent_id": front_id}]
    for tid, events in ((front_id, front), (child_id, child)):
        out += [{"id": tid, "timestamps": [{"name": name, "ns": t0 + int(at * ms)}]} for name, at in events.items()]
    return out


def test_trace_legs_split_a_request_and_tell_lone_requests_from_overlapping_ones(tmp_path):
    ms = 1_000_000
    records = _records(1, 2, 0, 50.0) + _records(3, 4, 100 * ms, 50.0)  # one after the other
    records += _records(5, 6, 200 * ms, 50.0) + _records(7, 8, 210 * ms, 50.0)  # overlapping
    base = tmp_path / "trace.json"
    Path(f"{base}.0").write_text(json.dumps(records[:20]))
    Path(f"{base}.1").write_text(json.dumps(records[20:]))
    table = trace_legs.summarise(trace_legs.requests_from(trace_legs.read_traces(str(base))))
    alone, both = table["f5_tts"]["alone"], table["f5_tts"]["overlapped"]
    assert alone["requests"] == 2 and both["requests"] == 2
    assert alone["front_to_bls"]["p50_ms"] == pytest.approx(1.0)
    assert alone["engine_queue"]["p50_ms"] == pytest.approx(0.25)
    assert alone["engine_execute"]["p50_ms"] == pytest.approx(0.5)
    assert alone["engine_to_response"]["mean_ms"] == pytest.approx(50.8)
    assert alone["grpc_send"]["p50_ms"] == pytest.approx(0.5)
    assert trace_legs.main([str(base), "--json", str(tmp_path / "legs.json")]) == 0
    assert json.loads((tmp_path / "legs.json").read_text()) == table
    assert trace_legs.main([str(tmp_path / "none.json")]) == 1


def test_freeze_heap_takes_the_objects_alive_now_out_of_collections(monkeypatch):
    monkeypatch.delenv(shared.GC_FREEZE_ENV, raising=False)
    try:
        monkeypatch.setenv(shared.GC_FREEZE_ENV, "0")
        shared.freeze_heap()
        assert gc.get_freeze_count() == 0
        monkeypatch.delenv(shared.GC_FREEZE_ENV)
        shared.freeze_heap()
        assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()


def test_long_collections_are_timing_lines(capsys, monkeypatch):
    monkeypatch.setattr(shared, "TIMING_LOG", True)
    monkeypatch.setattr(shared, "GC_LOG_MS", 0.0)
    before = list(gc.callbacks)
    try:
        shared.watch_gc("f5_engine")
        gc.collect()
    finally:
        gc.callbacks[:] = before
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[timing] f5_engine:gc ")]
    assert lines and json.loads(lines[-1].split(" ", 2)[2])["generation"] == 2


def test_a_front_process_imports_its_request_path_with_the_shared_module():
    """A front's first request imports nothing (each of its instances is a process of its own)."""
    code = ("import sys; sys.path.insert(0, '.'); import triton_models.shared; "
            "print('tts.limits' in sys.modules, 'threading' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True", "False"]



def test_f5_warmup_loads_the_text_front_ends_dictionaries(tmp_path, monkeypatch):
    """The first Chinese request of a fresh server must not load rjieba's and pypinyin's
    dictionaries (266 ms on this CPU): the pipeline's warm-up converts a Chinese text first."""
    from tts.demo_weights import DEMO_F5_NAME, write_f5
    from tts.f5 import pipeline as P

    write_f5(tmp_path)
    d = tmp_path / DEMO_F5_NAME
    pipe = P.F5Pipeline(next(d.glob("*.safetensors")), d / "vocab.txt", tmp_path / "vocos-mel-24khz", DEMO_F5_NAME)
    seen = []
    real = P.text_mod.text_to_units
    monkeypatch.setattr(P.text_mod, "text_to_units", lambda text: seen.append(text) or real(text))
    pipe.warmup()
    assert any(any(P.text_mod._is_chinese(ch) for ch in text) for text in seen)


def test_engine_queue_delay_defaults_and_override(monkeypatch, tmp_path):
    from studio.server import QUEUE_DELAY_ENV, engine_queue_delay_us
    from tts.switches import F5_ENGINE_LOOP_ENV, f5_engine_loop

    monkeypatch.delenv(QUEUE_DELAY_ENV, raising=False)
    monkeypatch.delenv(F5_ENGINE_LOOP_ENV, raising=False)
    assert engine_queue_delay_us(True) == 250 and engine_queue_delay_us(False) == 10000
    # the F5 engine batches on its own thread on a GPU (unless switched off): no batcher delay there
    assert f5_engine_loop(True) and not f5_engine_loop(False)
    assert engine_queue_delay_us(True, own_thread=True) == 0 and engine_queue_delay_us(False, own_thread=False) == 10000
    monkeypatch.setenv(F5_ENGINE_LOOP_ENV, "0")
    assert not f5_engine_loop(True)
    monkeypatch.delenv(F5_ENGINE_LOOP_ENV)
    rendered = _render_f5(tmp_path / "gpu", gpus=[0])
    assert "max_queue_delay_microseconds: 0 " in rendered["f5_engine"]
    assert "max_queue_delay_microseconds: 10000 " in _render_f5(tmp_path / "cpu", gpus=[])["f5_engine"]
    monkeypatch.setenv(QUEUE_DELAY_ENV, "0")
    assert engine_queue_delay_us(True) == 0
    monkeypatch.setenv(QUEUE_DELAY_ENV, "-5")
    with pytest.raises(ValueError, match=QUEUE_DELAY_ENV):
        engine_queue_delay_us(True)


def _render_f5(dest, gpus):
    """The F5 models' rendered config.pbtxt texts, by model name (demo weights)."""
    from studio.server import render_model_repository
    from tests.test_server_config import fake_f5

    names = render_model_repository(dest, {"f5": fake_f5()}, gpus=gpus, front_instances=2)
    return {name: (dest / name / "config.pbtxt").read_text() for name in names}
