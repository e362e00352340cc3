"""studio/client.py: request tensors, response handling, joining and timing.

The first part needs no server. The second (`toy_server`) runs a real tritonserver with toy
Python models under the real names and I/O (`f5_tts`, `f5_tts_stream`, `spark_tts`,
`spark_tts_stream`) that answer with known chunks, errors or delays chosen by the target text,
so the client's protocol handling (final flag, joining, errors, cancel, timeouts) is tested
without model weights.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from studio.client import (FAMILY_PARAMS, PARAM_TYPES, GenerationCancelled, StudioClient, SynthesisError,
                           build_inputs, clean_message, triton_model_name)
from tts.audio import F5_SAMPLE_RATE, SPARK_SAMPLE_RATE, join_chunks

ROOT = Path(__file__).resolve().parent.parent


def tensors(inputs) -> dict:
    """name -> (datatype, shape, numpy data) of built InferInputs."""
    out = {}
    for inp in inputs:
        raw = inp._get_content()
        dtype = inp.datatype()
        if dtype == "BYTES":
            from tritonclient.utils import deserialize_bytes_tensor

            data = deserialize_bytes_tensor(raw).reshape(inp.shape())
        else:
            np_dtype = {"FP32": np.float32, "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_}[dtype]
            data = np.frombuffer(raw, dtype=np_dtype).reshape(inp.shape())
        out[inp.name()] = (dtype, list(inp.shape()), data)
    return out


# --- request building (no server) ---------------------------------------------------------------------
def test_model_names():
    assert triton_model_name("f5", False) == "f5_tts" and triton_model_name("f5", True) == "f5_tts_stream"
    assert triton_model_name("spark", False) == "spark_tts" and triton_model_name("spark", True) == "spark_tts_stream"
    with pytest.raises(ValueError, match="unknown model 'cosyvoice'"):
        triton_model_name("cosyvoice", False)


def test_f5_inputs_names_dtypes_shapes():
    wav = np.linspace(-0.5, 0.5, 1000).astype(np.float64)  # any float dtype becomes FP32
    got = tensors(build_inputs("f5", "Héllo wörld", wav, "réf", {
        "nfe_steps": 16, "cfg_strength": 2, "sway_coef": -1.0, "speed": 1.25, "use_prompt_cache": False,
        "seed": 2**40}))
    assert list(got) == ["reference_wav", "reference_wav_len", "reference_text", "target_text", "nfe_steps",
                         "cfg_strength", "sway_coef", "speed", "use_prompt_cache", "seed"]
    assert got["reference_wav"][:2] == ("FP32", [1, 1000])
    np.testing.assert_allclose(got["reference_wav"][2][0], wav, atol=1e-7)
    assert got["reference_wav_len"][:2] == ("INT32", [1, 1]) and got["reference_wav_len"][2][0, 0] == 1000
    assert got["reference_text"][:2] == ("BYTES", [1, 1]) and got["reference_text"][2][0, 0] == "réf".encode()
    assert got["target_text"][2][0, 0].decode("utf-8") == "Héllo wörld"
    assert got["nfe_steps"][:2] == ("INT32", [1, 1]) and got["nfe_steps"][2][0, 0] == 16
    assert got["cfg_strength"][:2] == ("FP32", [1, 1]) and got["cfg_strength"][2][0, 0] == 2.0
    assert got["speed"][2][0, 0] == pytest.approx(1.25)
    assert got["use_prompt_cache"][:2] == ("BOOL", [1, 1]) and not got["use_prompt_cache"][2][0, 0]
    assert got["seed"][:2] == ("INT64", [1, 1]) and got["seed"][2][0, 0] == 2**40


def test_spark_inputs_and_voice_creation_without_reference():
    got = tensors(build_inputs("spark", "Hi.", None, "", {
        "temperature": 0.8, "top_p": 0.95, "top_k": 1, "max_new_tokens": 300, "min_new_tokens": 300,
        "gender": "female", "pitch_level": "high", "speed_level": "moderate"}))
    assert "reference_wav" not in got and "reference_wav_len" not in got
    assert got["reference_text"][2][0, 0] == b""
    for name in ("temperature", "top_p"):
        assert got[name][:2] == ("FP32", [1, 1])
    for name in ("top_k", "max_new_tokens", "min_new_tokens"):
        assert got[name][:2] == ("INT32", [1, 1])
    for name in ("gender", "pitch_level", "speed_level"):
        assert got[name][:2] == ("BYTES", [1, 1])
    assert got["gender"][2][0, 0] == b"female"


def test_omitted_and_none_params_are_not_sent():
    got = tensors(build_inputs("f5", "x", np.zeros(10, np.float32), "y", {"nfe_steps": None, "seed": None}))
    assert set(got) == {"reference_wav", "reference_wav_len", "reference_text", "target_text"}
    assert tensors(build_inputs("f5", "x", np.zeros((1, 10), np.float32), "y"))["reference_wav"][1] == [1, 10]


def test_every_param_has_a_family():
    assert set(PARAM_TYPES) == set(FAMILY_PARAMS["f5"]) | set(FAMILY_PARAMS["spark"])


@pytest.mark.parametrize("model,ref,params,needle", [
    ("f5", np.zeros(10), {"nfe": 16}, "unknown option"),
    ("f5", np.zeros(10), {"temperature": 0.8}, "do not apply to f5"),
    ("spark", None, {"nfe_steps": 16}, "do not apply to spark"),
    ("f5", None, {}, "prompt clip"),
    ("f5", np.zeros((2, 10)), {}, "mono"),
    ("f5", np.zeros(10), {"nfe_steps": 16.5}, "whole number"),
    ("f5", np.zeros(10), {"nfe_steps": True}, "must be a number"),
    ("f5", np.zeros(10), {"nfe_steps": "16"}, "must be a number"),
    ("f5", np.zeros(10), {"nfe_steps": 2**31}, "INT32"),
    ("f5", np.zeros(10), {"speed": float("nan")}, "finite"),
    ("f5", np.zeros(10), {"use_prompt_cache": 1}, "true or false"),
    ("spark", None, {"gender": 1}, "string"),
], ids=["unknown", "spark-option-for-f5", "f5-option-for-spark", "f5-no-ref", "stereo", "fractional-int",
        "bool-as-int", "string-as-int", "int32-overflow", "nan", "int-as-bool", "int-as-string"])
def test_bad_requests_raise_value_error(model, ref, params, needle):
    with pytest.raises(ValueError, match=needle):
        build_inputs(model, "text", ref, "ref text", params)


def test_whole_floats_are_accepted_for_ints():
    assert tensors(build_inputs("f5", "x", np.zeros(4), "y", {"nfe_steps": 16.0}))["nfe_steps"][2][0, 0] == 16


@pytest.mark.parametrize("raw,want", [
    ("[StatusCode.INTERNAL] the target text is empty", "the target text is empty"),
    ("Failed to process the request(s) for model instance 'f5_tts_0_0', message: ValueError: nfe_steps must be "
     "between 1 and 128, got 0", "nfe_steps must be between 1 and 128, got 0"),
    ("in ensemble 'x', Failed to process the request(s) for model 'y', message: TritonModelException: boom",
     "boom"),
    ("plain words stay", "plain words stay"),
    ("ValueError: bad\nTraceback (most recent call last):\n  File ...", "bad"),
    # seen from tritonserver 2.51 (the wheel's): an exception raised in a Python model's execute
    ("Failed to process the request(s) for model 'f5_tts_0_0', message: ValueError: speed bad\n\nAt:\n"
     "  /tmp/x/run/models/f5_tts/1/model.py(62): offline\n  /tmp/x/run/models/f5_tts/1/model.py(46): execute\n",
     "speed bad"),
    ("[request id: studio-1234] expected number of inputs between 4 and 10 but got 2 inputs for model 'f5_tts'.",
     "expected number of inputs between 4 and 10 but got 2 inputs for model 'f5_tts'."),
    ("", "the server reported an error without a message"),
])
def test_clean_message(raw, want):
    assert clean_message(raw) == want


def test_unreachable_server_is_a_clear_error():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with StudioClient(f"127.0.0.1:{port}") as client:
        assert client.server_ready() is False and client.model_ready("f5_tts") is False
        with pytest.raises(SynthesisError, match=f"cannot reach the Triton server at 127.0.0.1:{port}"):
            client.synthesize("f5", "hi", np.zeros(100, np.float32), "ref", timeout_s=10)
        with pytest.raises(SynthesisError, match="cannot reach"):
            client.synthesize("f5", "hi", np.zeros(100, np.float32), "ref", stream=True, timeout_s=10)
    with pytest.raises(RuntimeError, match="closed"):
        client.synthesize("f5", "hi", np.zeros(100, np.float32), "ref")


def test_unclosed_client_does_not_hang_the_interpreter():
    code = ("import numpy as np\nfrom studio.client import StudioClient\n"
            "c = StudioClient('127.0.0.1:9')\n"
            "try:\n    c.synthesize('f5', 'x', np.zeros(10, np.float32), 'y', stream=True, timeout_s=2)\n"
            "except Exception as e:\n    print(type(e).__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "SynthesisError" in out.stdout


def test_module_does_not_import_torch():
    code = "import sys, studio.client; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


# --- against a real tritonserver with toy models --------------------------------------------------------
TOY_MODEL = r'''
"""Toy model with the studio's I/O: the target text says what to answer (see test_client_unit.py)."""
import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils


def chunk(seed, i, n):
    return (0.1 * np.random.default_rng(seed + i).standard_normal(n)).astype(np.float32)


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        self.decoupled = cfg.get("model_transaction_policy", {}).get("decoupled", False)
        self.sr = int(cfg["parameters"]["sample_rate"]["string_value"])
        self.names = [i["name"] for i in cfg["input"]]

    def received(self, request):
        out = {}
        for name in self.names:
            t = pb_utils.get_input_tensor_by_name(request, name)
            if t is None:
                continue
            a = t.as_numpy()
            v = float(a.astype(np.float64).sum()) if name == "reference_wav" else a.reshape(-1)[0]
            if isinstance(v, bytes):
                v = v.decode("utf-8")
            elif isinstance(v, np.generic):
                v = v.item()
            out[name] = [str(a.dtype), list(a.shape), v]
        return out

    def respond(self, request, i, n, length, overlap, seed):
        info = {"sample_rate": self.sr, "seed": seed, "demo_weights": True, "compute_ms": 1.5, "chunk_index": i,
                "final": i == n - 1, "overlap_samples": overlap if i else 0, "chunks": n,
                "received": self.received(request)}
        wav = pb_utils.Tensor("waveform", chunk(seed, i, length).reshape(1, -1))
        text = pb_utils.Tensor("info", np.array([[json.dumps(info).encode()]], dtype=np.object_))
        return pb_utils.InferenceResponse(output_tensors=[wav, text])

    def execute(self, requests):
        if not self.decoupled:
            return [self.offline(r) for r in requests]
        for r in requests:
            self.stream(r)
        return None

    def command(self, request):
        text = pb_utils.get_input_tensor_by_name(request, "target_text").as_numpy().reshape(-1)[0].decode()
        seed_t = pb_utils.get_input_tensor_by_name(request, "seed")
        seed = int(seed_t.as_numpy().reshape(-1)[0]) if seed_t is not None else 4242
        return text.split(" "), seed

    def offline(self, request):
        words, seed = self.command(request)
        if words[0] == "error":
            return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(" ".join(words[1:])))
        if words[0] == "raise":
            raise ValueError(" ".join(words[1:]))
        if words[0] == "sleep":
            time.sleep(float(words[1]))
        return self.respond(request, 0, 1, 4000, 0, seed)

    def stream(self, request):
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        sender = request.get_response_sender()
        words, seed = self.command(request)
        if words[0] == "error":
            sender.send(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(" ".join(words[1:]))),
                        flags=final)
            return
        # "chunks N LENGTH OVERLAP [DELAY_S] [ERROR_AFTER]"
        n, length, overlap = int(words[1]), int(words[2]), int(words[3])
        delay = float(words[4]) if len(words) > 4 else 0.0
        error_after = int(words[5]) if len(words) > 5 else -1
        for i in range(n):
            if i == error_after:
                sender.send(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(
                    f"chunk {i} failed")), flags=final)
                return
            if delay:
                time.sleep(delay)
            if getattr(request, "is_cancelled", lambda: False)():
                sender.send(flags=final)
                return
            sender.send(self.respond(request, i, n, length, overlap, seed))
        sender.send(flags=final)
'''

F5_INPUTS = """
  { name: "reference_wav" data_type: TYPE_FP32 dims: [ -1 ] allow_ragged_batch: true },
  { name: "reference_wav_len" data_type: TYPE_INT32 dims: [ 1 ] },
  { name: "reference_text" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "target_text" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "nfe_steps" data_type: TYPE_INT32 dims: [ 1 ] optional: true },
  { name: "cfg_strength" data_type: TYPE_FP32 dims: [ 1 ] optional: true },
  { name: "sway_coef" data_type: TYPE_FP32 dims: [ 1 ] optional: true },
  { name: "speed" data_type: TYPE_FP32 dims: [ 1 ] optional: true },
  { name: "use_prompt_cache" data_type: TYPE_BOOL dims: [ 1 ] optional: true },
  { name: "seed" data_type: TYPE_INT64 dims: [ 1 ] optional: true }"""
SPARK_INPUTS = """
  { name: "reference_wav" data_type: TYPE_FP32 dims: [ -1 ] optional: true allow_ragged_batch: true },
  { name: "reference_wav_len" data_type: TYPE_INT32 dims: [ 1 ] optional: true },
  { name: "reference_text" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "target_text" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "temperature" data_type: TYPE_FP32 dims: [ 1 ] optional: true },
  { name: "top_p" data_type: TYPE_FP32 dims: [ 1 ] optional: true },
  { name: "top_k" data_type: TYPE_INT32 dims: [ 1 ] optional: true },
  { name: "max_new_tokens" data_type: TYPE_INT32 dims: [ 1 ] optional: true },
  { name: "min_new_tokens" data_type: TYPE_INT32 dims: [ 1 ] optional: true },
  { name: "use_prompt_cache" data_type: TYPE_BOOL dims: [ 1 ] optional: true },
  { name: "seed" data_type: TYPE_INT64 dims: [ 1 ] optional: true },
  { name: "gender" data_type: TYPE_STRING dims: [ 1 ] optional: true },
  { name: "pitch_level" data_type: TYPE_STRING dims: [ 1 ] optional: true },
  { name: "speed_level" data_type: TYPE_STRING dims: [ 1 ] optional: true }"""


def toy_config(name: str, inputs: str, decoupled: bool, sr: int) -> str:
    return f"""name: "{name}"
backend: "python"
max_batch_size: 1
{"model_transaction_policy { decoupled: true }" if decoupled else ""}
input [{inputs}
]
output [
  {{ name: "waveform" data_type: TYPE_FP32 dims: [ -1 ] }},
  {{ name: "info" data_type: TYPE_STRING dims: [ 1 ] }}
]
instance_group [ {{ count: 2 kind: KIND_CPU }} ]
parameters [ {{ key: "sample_rate" value: {{ string_value: "{sr}" }} }} ]
"""


TOY_MODELS = {"f5_tts": (F5_INPUTS, False, F5_SAMPLE_RATE), "f5_tts_stream": (F5_INPUTS, True, F5_SAMPLE_RATE),
              "spark_tts": (SPARK_INPUTS, False, SPARK_SAMPLE_RATE),
              "spark_tts_stream": (SPARK_INPUTS, True, SPARK_SAMPLE_RATE)}


def toy_chunk(seed: int, i: int, n: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed + i).standard_normal(n)).astype(np.float32)


@pytest.fixture(scope="module")
def toy_server(tmp_path_factory):
    from studio.server import ServerStartError, TritonServer, find_tritonserver

    try:
        find_tritonserver()
    except ServerStartError as exc:
        pytest.skip(str(exc))
    repo = tmp_path_factory.mktemp("toy-repo")
    for name, (inputs, decoupled, sr) in TOY_MODELS.items():
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(toy_config(name, inputs, decoupled, sr))
        (repo / name / "1" / "model.py").write_text(TOY_MODEL)

    class ToyServer(TritonServer):
        """The embedded server manager, serving the toy repository instead of the project's models."""

        def _resolve_weights(self) -> None:
            pass

        def _prepare_run_dir(self) -> None:
            self.run_dir = self.data_dir / "run"
            shutil.copytree(repo, self.run_dir / "models")
            self.models = list(TOY_MODELS)
            for name in self.models:  # readiness counts only for a server carrying this run's id
                cfg = self.run_dir / "models" / name / "config.pbtxt"
                cfg.write_text(cfg.read_text().replace(
                    "parameters [ ", f'parameters [ {{ key: "run_id" value: {{ string_value: "{self.run_id}" }} }}, '))

    server = ToyServer(tmp_path_factory.mktemp("toy-data"), gpus=[], instances=1, log=lambda msg: None)
    server.start(timeout_s=120)
    yield server
    server.stop()


@pytest.fixture()
def toy(toy_server):
    with StudioClient(toy_server.grpc_url) as client:
        yield client


REF = (0.1 * np.sin(np.arange(24000) / 5)).astype(np.float32)


def test_toy_server_state(toy):
    assert toy.server_ready() and toy.model_ready("f5_tts_stream") and not toy.model_ready("nope")
    assert toy.model_config("f5_tts_stream")["model_transaction_policy"]["decoupled"] is True
    stats = toy.statistics("f5_tts")
    assert stats["model_stats"][0]["name"] == "f5_tts"
    assert {m["name"] for m in toy.statistics()["model_stats"]} >= set(TOY_MODELS)


def test_offline_result_metrics_and_sent_tensors(toy):
    seen = []
    r = toy.synthesize("f5", "chunks", REF, "ref", params={"nfe_steps": 8, "speed": 1.5, "use_prompt_cache": False,
                                                           "seed": 99}, on_chunk=lambda s, i: seen.append(s))
    np.testing.assert_array_equal(r.audio, toy_chunk(99, 0, 4000))
    assert r.audio.dtype == np.float32 and r.sample_rate == F5_SAMPLE_RATE
    assert r.audio_s == pytest.approx(4000 / F5_SAMPLE_RATE)
    assert r.latency_s > 0 and r.first_chunk_s == r.latency_s and r.rtf == pytest.approx(r.latency_s / r.audio_s)
    assert r.chunk_arrivals_s == [r.latency_s] and r.seed == 99 and r.demo_weights is True
    assert len(seen) == 1 and np.array_equal(seen[0], r.audio)
    got = r.info["received"]
    assert got["reference_wav"][:2] == ["float32", [1, REF.size]]
    assert got["reference_wav"][2] == pytest.approx(float(REF.astype(np.float64).sum()), abs=1e-3)
    assert got["reference_wav_len"] == ["int32", [1, 1], REF.size]
    assert got["reference_text"] == ["object", [1, 1], "ref"]
    assert got["nfe_steps"] == ["int32", [1, 1], 8]
    assert got["speed"] == ["float32", [1, 1], 1.5]
    assert got["use_prompt_cache"] == ["bool", [1, 1], False]
    assert got["seed"] == ["int64", [1, 1], 99]
    assert "cfg_strength" not in got  # omitted: server default


def test_spark_voice_creation_sends_no_reference(toy):
    r = toy.synthesize("spark", "chunks", None, "", params={"gender": "male", "pitch_level": "low", "top_k": 1})
    got = r.info["received"]
    assert "reference_wav" not in got and got["gender"] == ["object", [1, 1], "male"]
    assert got["top_k"] == ["int32", [1, 1], 1]
    assert r.sample_rate == SPARK_SAMPLE_RATE and r.seed == 4242


@pytest.mark.parametrize("family,overlap", [("f5", 3600), ("spark", 1600), ("f5", 0)])
def test_stream_joins_chunks_and_times_them(toy, family, overlap):
    n, length = 5, 6000
    released, infos = [], []
    r = toy.synthesize(family, f"chunks {n} {length} {overlap} 0.05", REF, "ref", stream=True,
                       params={"seed": 10}, on_chunk=lambda s, info: (released.append(s), infos.append(info)))
    want = join_chunks([toy_chunk(10, i, length) for i in range(n)], [overlap] * n)
    np.testing.assert_array_equal(r.audio, want)
    assert r.audio.size == n * length - (n - 1) * overlap
    assert [i["chunk_index"] for i in infos] == list(range(n))  # one call per chunk
    np.testing.assert_array_equal(np.concatenate(released), want)  # released samples add up to the audio
    assert released[0].size == length - (overlap if family == "f5" else 1600) or overlap == 0
    assert len(r.chunk_arrivals_s) == n and r.chunk_arrivals_s == sorted(r.chunk_arrivals_s)
    assert r.first_chunk_s == r.chunk_arrivals_s[0] and r.latency_s == r.chunk_arrivals_s[-1]
    assert r.latency_s - r.first_chunk_s >= 0.04 * (n - 1)  # the toy sleeps 50 ms per chunk
    assert r.info["chunk_index"] == n - 1 and r.info["final"] is True and r.seed == 10


def test_streams_reuse_clients_and_run_concurrently(toy):
    results = [None] * 4

    def run(i):
        results[i] = toy.synthesize("f5", "chunks 3 3000 100 0.2", REF, "ref", stream=True, params={"seed": i})

    t0 = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    for i, r in enumerate(results):
        np.testing.assert_array_equal(r.audio, join_chunks([toy_chunk(i, k, 3000) for k in range(3)], [0, 100, 100]))
    assert wall < 4 * 0.6, f"4 streams of 0.6 s took {wall:.2f} s: they did not run at once"
    again = toy.synthesize("f5", "chunks 2 3000 100", REF, "ref", stream=True, params={"seed": 0})
    assert again.audio.size == 5900


@pytest.mark.parametrize("stream", [False, True], ids=["offline", "stream"])
def test_server_error_message_reaches_the_caller_cleanly(toy, stream):
    with pytest.raises(SynthesisError) as err:
        toy.synthesize("f5", "error the reference text is empty: type what the clip says", REF, "ref", stream=stream)
    assert str(err.value) == "the reference text is empty: type what the clip says"
    # the model carries on (the toy's offline answer is always 4000 samples)
    assert toy.synthesize("f5", "chunks 1 100 0", REF, "ref", stream=stream).audio.size == (100 if stream else 4000)


def test_exception_inside_a_model_is_readable(toy):
    with pytest.raises(SynthesisError) as err:
        toy.synthesize("f5", "raise speed must be between 0.3 and 3", REF, "ref")
    assert str(err.value) == "speed must be between 0.3 and 3"  # no status, wrapper or backend stack


def test_error_in_the_middle_of_a_stream(toy):
    seen = []
    with pytest.raises(SynthesisError, match="chunk 2 failed"):
        toy.synthesize("f5", "chunks 4 3000 100 0 2", REF, "ref", stream=True,
                       on_chunk=lambda s, i: seen.append(i["chunk_index"]))
    assert seen == [0, 1]


@pytest.mark.parametrize("stream", [False, True], ids=["offline", "stream"])
def test_cancel(toy, stream):
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    text = "chunks 20 1000 0 0.2" if stream else "sleep 3"
    t0 = time.perf_counter()
    with pytest.raises(GenerationCancelled):
        toy.synthesize("f5", text, REF, "ref", stream=stream, cancel=cancel)
    assert time.perf_counter() - t0 < 1.5
    assert toy.synthesize("f5", "chunks 2 100 10", REF, "ref", stream=True).audio.size == 190


@pytest.mark.parametrize("stream", [False, True], ids=["offline", "stream"])
def test_timeout(toy, stream):
    text = "chunks 10 1000 0 0.5" if stream else "sleep 3"
    t0 = time.perf_counter()
    with pytest.raises(SynthesisError, match="no complete answer"):
        toy.synthesize("f5", text, REF, "ref", stream=stream, timeout_s=0.5)
    assert time.perf_counter() - t0 < 2.5


def test_on_chunk_exception_stops_the_stream(toy):
    def boom(samples, info):
        raise KeyError("ui went away")

    with pytest.raises(KeyError):
        toy.synthesize("f5", "chunks 5 1000 0 0.1", REF, "ref", stream=True, on_chunk=boom)
    assert toy.synthesize("f5", "chunks 1 100 0", REF, "ref", stream=True).audio.size == 100


def test_info_is_json_object(toy):
    r = toy.synthesize("f5", "chunks 2 500 50", REF, "ref", stream=True)
    assert json.loads(json.dumps(r.info))["overlap_samples"] == 50


def test_unclosed_client_after_streams_exits_promptly(toy_server):
    """A script that streams and never closes its client must still exit (gRPC threads would block it)."""
    code = ("import numpy as np\nfrom studio.client import StudioClient\n"
            f"c = StudioClient({toy_server.grpc_url!r})\n"
            "ref = np.full(1000, 0.1, np.float32)\n"
            "print(c.synthesize('f5', 'chunks 3 1000 100', ref, 'r', stream=True).audio.size)\n"
            "print(c.synthesize('f5', 'chunks', ref, 'r').audio.size)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2800", "4000"]


@pytest.mark.parametrize("message, model", [
    ("Stub process 'f5_tts_0_9' is not healthy.", "f5_tts"),
    ("Stub process 'spark_tts_stream_0_12' is not healthy.", "spark_tts_stream"),
    ("f5_engine request failed: Stub process 'f5_engine_0_0' is not healthy.", "f5_engine"),
    ("the reference clip is too short", None),
    ("", None),
])
def test_dead_stub_model(message, model):
    from studio.client import dead_stub_model

    assert dead_stub_model(message) == model


class _CountingLoads:
    def __init__(self, fail: bool | str = False):
        self.loads, self.fail = [], fail

    def get_model_config(self, name, as_json=False, client_timeout=None):
        return {"config": {"name": name, "parameters": {"run_id": {"string_value": "r"}}}}

    def load_model(self, name, headers=None, config=None, client_timeout=None):
        from tritonclient.utils import InferenceServerException

        # a forced reload: the model's own config with the reload parameter changed
        assert json.loads(config)["parameters"]["studio_reload"]["string_value"]
        if self.fail == "restricted":  # the studio server's answer to a client without its secret
            raise InferenceServerException("This protocol is restricted, expecting header "
                                           "'triton-grpc-protocol-studio-repository-key'")
        if self.fail:
            raise InferenceServerException("explicit model load / unload is not allowed if polling is enabled")
        time.sleep(0.05)
        self.loads.append(name)


def test_reload_model_once_for_clients_meeting_the_same_dead_instance():
    """Failures seen before a reload finished share that reload; a later failure reloads again."""
    c = StudioClient("127.0.0.1:1")  # never connects: only the repository call is exercised
    try:
        fake = _CountingLoads()
        c._client = fake
        failed_at = time.perf_counter()
        threads = [threading.Thread(target=c.reload_model, args=("f5_tts", failed_at)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert fake.loads == ["f5_tts"]
        c.reload_model("f5_tts", failed_at=time.perf_counter())
        assert fake.loads == ["f5_tts", "f5_tts"]
    finally:
        c.close()


def test_reload_impossible_says_restart_the_server():
    c = StudioClient("127.0.0.1:1")
    try:
        c._client = _CountingLoads(fail=True)
        with pytest.raises(SynthesisError, match="restart the server") as err:
            c.reload_model("spark_tts", cause="Stub process 'spark_tts_0_2' is not healthy.")
        assert "spark_tts_0_2" in str(err.value) and "polling" in str(err.value)
    finally:
        c.close()


class _DyingFronts(StudioClient):
    """A client whose offline call meets `deaths` dead front instances in a row, then is served."""

    def __init__(self, deaths: list[str]):
        super().__init__("127.0.0.1:1")
        self.deaths = list(deaths)
        self.calls = 0
        self._client = _CountingLoads()

    def _offline(self, family, name, inputs, request_id, on_chunk, cancel, timeout_s):
        from studio.client import _result

        self.calls += 1
        if self.deaths:
            raise SynthesisError(f"Stub process '{self.deaths.pop(0)}' is not healthy.")
        time.sleep(0.01)
        return _result(family, np.zeros(24000, np.float32), {"sample_rate": 24000, "compute_ms": 5.0}, 0.01, 0.01,
                       [0.01])


def test_several_dead_instances_in_a_row_are_each_reloaded():
    """Several front instances can die together (H200): each failure reloads and retries, up to
    RECOVERY_ATTEMPTS; the result counts the lost time and names the reloads."""
    from studio.client import RECOVERY_ATTEMPTS

    ref = np.zeros(24000, np.float32)
    c = _DyingFronts(["f5_tts_0_10", "f5_tts_0_9"])
    try:
        r = c.synthesize("f5", "Hello there.", ref, "A reference.")
        assert r.recovered and c.calls == 3 and c._client.loads == ["f5_tts", "f5_tts"]
        assert r.latency_s >= 0.1  # two reloads of 0.05 s each (the fake's load time) are counted
        assert any("f5_tts instance and a f5_tts instance had died" in n for n in r.info["notes"])
    finally:
        c.close()
    c = _DyingFronts(["f5_tts_0_1"] * (RECOVERY_ATTEMPTS + 1))
    try:
        with pytest.raises(SynthesisError, match="f5_tts_0_1"):
            c.synthesize("f5", "Hello there.", ref, "A reference.")
        assert c.calls == RECOVERY_ATTEMPTS + 1 and len(c._client.loads) == RECOVERY_ATTEMPTS
    finally:
        c.close()
    c = _DyingFronts(["spark_tts_0_1"])  # another model's instance: not this request's, passed on
    try:
        with pytest.raises(SynthesisError, match="spark_tts_0_1"):
            c.synthesize("f5", "Hello there.", ref, "A reference.")
        assert c._client.loads == []
    finally:
        c.close()


def test_a_client_without_the_repository_secret_waits_for_the_server_to_replace_the_instance(monkeypatch):
    """A client of another process may not reload (the studio server refuses it the repository
    API): it sends again every SUPERVISOR_RETRY_S while the server's supervisor replaces the stub."""
    import studio.client as client_mod

    monkeypatch.setattr(client_mod, "SUPERVISOR_RETRY_S", 0.05)
    ref = np.zeros(24000, np.float32)
    c = _DyingFronts(["f5_engine_0_0"] * 3)  # the engine: every try fails until it is replaced
    c._client.fail = "restricted"
    try:
        r = c.synthesize("f5", "Hello there.", ref, "A reference.")
        assert r.recovered and c.calls == 4 and c._client.loads == []
        assert r.latency_s >= 0.15  # three waits of 0.05 s, counted in the request's latency
        assert any("sent again while the server replaced it" in n for n in r.info["notes"])
    finally:
        c.close()
    monkeypatch.setitem(client_mod.SUPERVISOR_WAIT_S, "engine", 0.3)
    c = _DyingFronts(["f5_engine_0_0"] * 100)  # never replaced: the error comes within the bound
    c._client.fail = "restricted"
    try:
        t0 = time.monotonic()
        with pytest.raises(SynthesisError, match="did not replace the instance within 0.3 s") as err:
            c.synthesize("f5", "Hello there.", ref, "A reference.")
        assert time.monotonic() - t0 < 2.0 and "f5_engine_0_0" in str(err.value)
        assert not isinstance(err.value, client_mod.ReloadRefused)
    finally:
        c.close()


def test_cancelling_while_waiting_for_the_server(monkeypatch):
    import studio.client as client_mod

    monkeypatch.setattr(client_mod, "SUPERVISOR_RETRY_S", 5.0)
    c = _DyingFronts(["f5_engine_0_0"] * 100)
    c._client.fail = "restricted"
    cancel = threading.Event()
    threading.Timer(0.2, cancel.set).start()
    try:
        t0 = time.monotonic()
        with pytest.raises(client_mod.GenerationCancelled):
            c.synthesize("f5", "Hello there.", np.zeros(24000, np.float32), "A reference.", cancel=cancel)
        assert time.monotonic() - t0 < 2.0 and c.calls == 1, "the wait ends with the cancel, nothing sent again"
    finally:
        c.close()


def test_a_refused_reload_is_told_apart():
    from studio.client import ReloadRefused

    c = StudioClient("127.0.0.1:1")
    try:
        c._client = _CountingLoads(fail="restricted")
        with pytest.raises(ReloadRefused, match="restart the server"):
            c.reload_model("f5_tts", cause="Stub process 'f5_tts_0_2' is not healthy.")
        c._client = _CountingLoads(fail=True)
        with pytest.raises(SynthesisError) as err:
            c.reload_model("f5_tts", cause="Stub process 'f5_tts_0_2' is not healthy.")
        assert not isinstance(err.value, ReloadRefused)
    finally:
        c.close()
