"""Streaming fronts under bursts of chunks, through a real tritonserver 2.51 (CPU).

A front forwards its engine's responses as they come (`triton_models.shared.stream_front`). When
the front sent them from its main thread while a helper thread iterated the BLS responses, the
front's stub corrupted its heap and died within ~30 s of eight streams of 30 back-to-back chunks
("double free or corruption", then "Stub process ... is not healthy"): the streaming failures seen
on the H100s. Here an engine sends 30 chunks of 100k samples per request as fast as it can from a
thread of its own (as the F5 and Spark engines do) to eight fronts running the real
`stream_front`; every stream must end complete and in order, and no stub may die.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from studio.server import TritonServer

ROOT = Path(__file__).resolve().parent.parent
CHUNKS = 30
SAMPLES = 100_000
STREAMS = 8
SECONDS = 25

ENGINE_CONFIG = """
name: "burst_engine"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "chunks" data_type: TYPE_INT32 dims: [ 1, 1 ] },
        { name: "streaming" data_type: TYPE_BOOL dims: [ 1, 1 ] optional: true } ]
output [ { name: "waveform" data_type: TYPE_FP32 dims: [ 1, -1 ] },
         { name: "info" data_type: TYPE_STRING dims: [ 1, 1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
parameters [ { key: "project_root" value: { string_value: "%(root)s" } },
             { key: "run_id" value: { string_value: "%(run_id)s" } } ]
"""

#: Both models' start: the project on sys.path (the stub ignores PYTHONPATH), triton_models.shared.
MODEL_START = """
import json, queue, sys, threading
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        sys.path.insert(0, json.loads(args["model_config"])["parameters"]["project_root"]["string_value"])
        from triton_models import shared

        self.shared = shared
        self.started()

    def started(self):
        pass
"""

ENGINE = MODEL_START + """
    def started(self):
        self.jobs = queue.SimpleQueue()
        threading.Thread(target=self.loop, daemon=True).start()

    def loop(self):  # the engines' way: every chunk sent from a thread of its own, the last with the final flag
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        while True:
            sender, n = self.jobs.get()
            for i in range(n):
                wav = np.full(%(samples)d, i, dtype=np.float32)
                response = self.shared.audio_response(pb_utils, wav, {"chunk_index": i, "final": i == n - 1})
                sender.send(response, flags=final if i == n - 1 else 0)

    def execute(self, requests):
        for request in requests:
            n = int(pb_utils.get_input_tensor_by_name(request, "chunks").as_numpy().reshape(-1)[0])
            self.jobs.put((request.get_response_sender(), n))
        return None
"""

FRONT_CONFIG = """
name: "burst_front"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "chunks" data_type: TYPE_INT32 dims: [ 1, 1 ] } ]
output [ { name: "waveform" data_type: TYPE_FP32 dims: [ 1, -1 ] },
         { name: "info" data_type: TYPE_STRING dims: [ 1, 1 ] } ]
instance_group [ { count: %(streams)d kind: KIND_CPU } ]
parameters [ { key: "project_root" value: { string_value: "%(root)s" } },
             { key: "run_id" value: { string_value: "%(run_id)s" } } ]
"""

FRONT = MODEL_START + """
    def execute(self, requests):
        for request in requests:
            self.shared.stream_front(pb_utils, request, "burst_engine", ["chunks"])
        return None
"""


class BurstServer(TritonServer):
    """The embedded server's launcher and readiness over the two burst models only."""

    def _resolve_weights(self) -> None:
        pass

    def _prepare_run_dir(self) -> None:
        self.run_dir = self.data_dir / "runs" / "run-burst"
        values = {"root": str(ROOT), "run_id": self.run_id, "samples": SAMPLES, "streams": STREAMS}
        for name, config, code in (("burst_front", FRONT_CONFIG, FRONT), ("burst_engine", ENGINE_CONFIG, ENGINE)):
            folder = self.run_dir / "models" / name
            (folder / "1").mkdir(parents=True, exist_ok=True)
            (folder / "config.pbtxt").write_text(config % values)
            (folder / "1" / "model.py").write_text(code % values)
        self.models = ["burst_front", "burst_engine"]


def _stream(url: str, deadline: float, results: list, errors: list) -> None:
    import tritonclient.grpc as grpcclient

    while time.monotonic() < deadline:
        client = grpcclient.InferenceServerClient(url)
        answers: queue.SimpleQueue = queue.SimpleQueue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        chunks = grpcclient.InferInput("chunks", [1, 1], "INT32")
        chunks.set_data_from_numpy(np.array([[CHUNKS]], dtype=np.int32))
        client.async_stream_infer("burst_front", [chunks], enable_empty_final_response=True)
        got = []
        try:
            while True:
                result, error = answers.get(timeout=30)
                if error is not None:
                    errors.append(str(error)[:300])
                    return
                wav = result.as_numpy("waveform")
                if wav is not None:
                    got.append(int(wav.reshape(-1)[0]))
                final = result.get_response().parameters.get("triton_final_response")
                if final is not None and final.bool_param:
                    break
        except queue.Empty:
            errors.append(f"no response for 30 s after {len(got)} chunks")
            return
        finally:
            client.stop_stream()
            client.close()
        results.append(got)


@pytest.mark.slow
def test_streaming_fronts_survive_bursts_of_chunks(tmp_path):
    server = BurstServer(tmp_path / "data", families=["f5"], gpus=[])
    server.start(timeout_s=120)
    try:
        results: list[list[int]] = []
        errors: list[str] = []
        deadline = time.monotonic() + SECONDS
        threads = [threading.Thread(target=_stream, args=(server.grpc_url, deadline, results, errors), daemon=True)
                   for _ in range(STREAMS)]
        for t in threads:
            t.start()
        for t in threads:  # a stream whose front died can hang its client: bounded here
            t.join(timeout=max(deadline + 60 - time.monotonic(), 1))
        log = "\n".join(server.log_tail(40))
        hung = sum(t.is_alive() for t in threads)
        assert not errors and not hung, (f"{len(errors)} streams failed, e.g. {errors[:3]}; {hung} hung; "
                                         f"server log:\n{log}")
        assert len(results) >= STREAMS * 3  # several rounds per stream in the time given
        assert all(got == list(range(CHUNKS)) for got in results)
        for pattern in ("double free", "corrupted", "not healthy"):
            assert pattern not in log
    finally:
        server.stop()
