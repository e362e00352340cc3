"""`python -m studio bench` on CPU: a short run against the session's real tritonserver (demo
weights), its JSON report and plot, and a run where some requests fail."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SAMPLES, speech_like

ROOT = Path(__file__).resolve().parent.parent
ROW_KEYS = {"concurrency", "requests", "wall_s", "audio_s", "rtf_aggregate", "rtf_mean", "latency_p50_s",
            "latency_p90_s", "latency_p99_s", "first_chunk_p50_s", "first_chunk_p90_s", "requests_per_s",
            "audio_s_per_s", "server_compute_ms_mean", "gpus", "demo_weights", "failed", "warmup_failed", "errors",
            "engine_queue_ms_mean", "engine_compute_ms_mean", "engine_executions", "recovered",
            "server_queue_ms_mean"}


def bench(triton_server, out: Path, *args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "studio", "bench", "--triton-url", triton_server.grpc_url, "--out", str(out),
           "--label", "t", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def report(out: Path, model: str, mode: str) -> dict:
    path = out / f"bench_{model}_{mode}_t.json"
    assert path.is_file() and (out / f"bench_{model}_{mode}_t.png").stat().st_size > 1000
    return json.loads(path.read_text())


@pytest.mark.slow
def test_f5_offline_levels_report(triton_server, tmp_path):
    run = bench(triton_server, tmp_path, "--model", "f5", "--mode", "offline", "--concurrency", "1,2",
                "--requests", "2", "--warmup", "1", "--nfe", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    rep = report(tmp_path, "f5", "offline")
    assert rep["model"] == "f5" and rep["mode"] == "offline" and rep["params"]["nfe_steps"] == 2
    assert [r["concurrency"] for r in rep["rows"]] == [1, 2]
    for row in rep["rows"]:
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert row["requests"] == 2 and row["failed"] == 0 and row["errors"] == []
        assert row["demo_weights"] is True
        assert row["rtf_aggregate"] == pytest.approx(row["wall_s"] / row["audio_s"], rel=1e-3)
        assert 0 < row["latency_p50_s"] <= row["latency_p90_s"] <= row["latency_p99_s"]
        assert row["first_chunk_p50_s"] is None  # offline
        assert row["engine_executions"] >= 1 and row["engine_compute_ms_mean"] > 0
        assert row["server_queue_ms_mean"] >= 0  # the session server's F5 engine batches on its thread
        # the way through Triton from the engine's wall-clock stamps: both legs there, and with the
        # engine's own time they fit in the slowest request's latency
        assert row["path_in_ms_mean"] > 0 and row["path_out_ms_mean"] > 0
        assert 0 < row["path_to_execute_ms_mean"] <= row["path_in_ms_mean"]  # the engine's parse comes after
        engine_ms = row["server_queue_ms_mean"] + row["server_compute_ms_mean"]
        assert row["path_in_ms_mean"] + engine_ms + row["path_out_ms_mean"] <= row["latency_p99_s"] * 1000 + 1
    assert "rtf_aggregate" in run.stdout and "DEMO WEIGHTS" in run.stdout and "server_queue_ms_mean" in run.stdout


@pytest.mark.slow
def test_spark_streaming_fixed_tokens_report(triton_server, tmp_path):
    run = bench(triton_server, tmp_path, "--model", "spark", "--mode", "streaming", "--concurrency", "2",
                "--requests", "2", "--warmup", "0", "--fixed-tokens", "60")
    assert run.returncode == 0, run.stderr[-3000:]
    (row,) = report(tmp_path, "spark", "streaming")["rows"]
    assert report(tmp_path, "spark", "streaming")["params"]["max_new_tokens"] == 60
    assert row["tokens_mean"] == 60 and row["decode_tokens_per_s_per_stream"] > 0
    assert 0 < row["first_chunk_p50_s"] <= row["latency_p50_s"]
    assert row["audio_s"] == pytest.approx(2 * 60 / 50, rel=0.05)  # 50 tokens per second of audio
    # where the first chunk went (engine-side, from its info): preparation, first token, vocoding
    assert 0 < row["first_chunk_prep_ms_mean"] <= row["first_chunk_first_token_ms_mean"]
    # the first chunk's way through Triton, in and out: with the engine's time it fits the slowest first chunk
    assert row["path_in_ms_mean"] > 0 and row["path_out_ms_mean"] > 0
    assert (row["path_in_ms_mean"] + row["first_chunk_compute_ms_mean"] + row["path_out_ms_mean"]
            <= row["first_chunk_p90_s"] * 1000 + 50)
    assert row["first_chunk_first_token_ms_mean"] < row["first_chunk_compute_ms_mean"]
    assert 0 < row["first_chunk_vocode_ms_mean"] < row["first_chunk_compute_ms_mean"]


@pytest.mark.slow
def test_failed_requests_are_counted_and_the_run_goes_on(triton_server, tmp_path):
    """Spark refuses references under 0.5 s: half the workload fails, the report says so, exit 1."""
    import soundfile as sf

    short = tmp_path / "short.wav"
    sf.write(short, speech_like(0.2, 16000), 16000)
    good = SAMPLES / "voices" / "en_female.wav"
    work = tmp_path / "work.jsonl"
    work.write_text("\n".join(json.dumps({"prompt": str(p), "reference_text": "A short prompt.",
                                          "target_text": "Hello there."}) for p in (good, short)))
    run = bench(triton_server, tmp_path, "--model", "spark", "--mode", "offline", "--concurrency", "1",
                "--requests", "2", "--warmup", "0", "--fixed-tokens", "20", "--workload", str(work))
    assert run.returncode == 1
    assert "1 of 2 requests FAILED" in run.stderr and "0.5 s" in run.stderr
    (row,) = report(tmp_path, "spark", "offline")["rows"]
    assert row["requests"] == 1 and row["failed"] == 1 and len(row["errors"]) == 1
    assert np.isfinite(row["rtf_aggregate"])


def test_bad_workload_is_refused_clearly(triton_server, tmp_path):
    work = tmp_path / "bad.jsonl"
    work.write_text('{"prompt": "x.wav"}\n')
    run = bench(triton_server, tmp_path, "--model", "f5", "--workload", str(work), timeout=60)
    assert run.returncode == 2 and "bad workload line" in run.stderr


@pytest.mark.slow
def test_bench_with_objective_checks(triton_server, tmp_path):
    """--check: each request is read back and compared; the row reports the checks' time and means."""
    run = bench(triton_server, tmp_path, "--model", "f5", "--mode", "offline", "--concurrency", "1",
                "--requests", "2", "--warmup", "0", "--nfe", "2", "--check", "--check-tokens", "6")
    assert run.returncode == 0, run.stderr[-3000:]
    row = report(tmp_path, "f5", "offline")["rows"][0]
    assert 0 < row["check_ms_p50"] <= row["check_ms_p90"]
    assert row["wer_mean"] is not None and -1.0 <= row["speaker_sim_mean"] <= 1.0
    assert "check_ms_p50" in run.stdout


def test_gpu_sampling_is_off_unless_asked_for():
    """By default no nvidia-smi process runs beside the run (it slowed the requests measured) and
    no GPU figures are reported; --gpu-sample-s asks for them."""
    from studio.bench import GPU_SAMPLE_ON_S, GPU_SAMPLE_S, GpuSampler

    with GpuSampler() as off:
        pass
    assert GPU_SAMPLE_S == 0 and off.smi is None and off.summary() == [] and not off._thread.is_alive()
    assert GpuSampler(GPU_SAMPLE_ON_S).every_s == GPU_SAMPLE_ON_S > 0
