"""The studio's Triton client: one generation in, joined audio and its timings out (gRPC only).

DESIGN.md's Triton contract from the client side. Offline requests go to `f5_tts` / `spark_tts`
(one response); streaming requests go to the decoupled `f5_tts_stream` / `spark_tts_stream`
over a gRPC stream, one response per audio chunk, then one empty response carrying Triton's
final flag. Chunks are joined with `tts.audio` (the one joining function) and timed:

- `latency_s`: request sent -> last audio received; `first_chunk_s`: -> first audio received
  (offline: equal to latency); `audio_s`: seconds of joined audio; `rtf = latency_s / audio_s`.

No torch here. One `StudioClient` may be shared by threads: offline calls share one gRPC
channel (thread-safe), and each streaming call borrows a gRPC client of its own from a small
pool, because a tritonclient gRPC client carries only one stream at a time.
"""

from __future__ import annotations

import json
import queue
import re
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tts.audio import (F5_CROSSFADE_SAMPLES, F5_SAMPLE_RATE, SPARK_CROSSFADE_SAMPLES, SPARK_SAMPLE_RATE,
                       ChunkJoiner)

#: family -> (offline model, streaming model) in the Triton repository.
TRITON_MODELS = {"f5": ("f5_tts", "f5_tts_stream"), "spark": ("spark_tts", "spark_tts_stream")}
SAMPLE_RATES = {"f5": F5_SAMPLE_RATE, "spark": SPARK_SAMPLE_RATE}
#: Samples a streaming receiver holds back: the largest overlap the family's chunks carry
#: (F5: 0.15 s cross-fade at 24 kHz; Spark: 5 tokens x 320 samples at 16 kHz).
HOLD_BACK = {"f5": F5_CROSSFADE_SAMPLES, "spark": SPARK_CROSSFADE_SAMPLES}

#: Request options (DESIGN.md "Inputs"): name -> Triton datatype. Each is sent as [1, 1].
PARAM_TYPES = {
    "nfe_steps": "INT32", "cfg_strength": "FP32", "sway_coef": "FP32", "speed": "FP32",
    "temperature": "FP32", "top_p": "FP32", "top_k": "INT32", "max_new_tokens": "INT32", "min_new_tokens": "INT32",
    "use_prompt_cache": "BOOL", "seed": "INT64",
    "gender": "BYTES", "pitch_level": "BYTES", "speed_level": "BYTES",
}
FAMILY_PARAMS = {
    "f5": ("nfe_steps", "cfg_strength", "sway_coef", "speed", "use_prompt_cache", "seed"),
    "spark": ("temperature", "top_p", "top_k", "max_new_tokens", "min_new_tokens", "use_prompt_cache", "seed",
              "gender", "pitch_level", "speed_level"),
}
_INT_RANGES = {"INT32": (np.int32, -2**31, 2**31 - 1), "INT64": (np.int64, -2**63, 2**63 - 1)}
OUTPUTS = ("waveform", "info")

#: How often a waiting call looks at its cancel Event and deadline, in seconds.
POLL_S = 0.05
#: Idle streaming clients kept open for reuse; more are closed when returned.
MAX_IDLE_STREAM_CLIENTS = 8
#: How long to wait for the callback's reason when a stream fails to start, in seconds.
STREAM_ERROR_WAIT_S = 1.0
#: Time limit for the small control calls (readiness, statistics, config), in seconds.
CONTROL_TIMEOUT_S = 10.0


#: Triton's answer when the stub process of a Python-backend instance is gone ("f5_tts_0_9":
#: model f5_tts, group 0, instance 9). tritonserver 2.51 never restarts such a stub, so every request
#: routed to that instance fails the same way until the model is reloaded.
DEAD_STUB = re.compile(r"Stub process '(?P<model>\w+?)_\d+_\d+' is not healthy")
#: The engine model (weights, batching) behind each family's front models.
ENGINE_MODELS = {"f5": "f5_engine", "spark": "spark_llm"}
#: Reloading a weightless front model (new stubs for all its instances) took ~1.6 s on the CPU; an
#: engine loads its weights and warms up again (58-110 s measured on the H200 at start-up).
RELOAD_TIMEOUT_S = {"front": 120.0, "engine": 900.0}
#: Reloads one request may trigger before its error is passed on (each after a dead instance).
RECOVERY_ATTEMPTS = 3
#: A client that may not reload models (another process than the studio server's: it lacks the
#: repository secret) waits for the server's own supervisor instead, which finds a dead stub within
#: a second (studio.server.SUPERVISE_S) and reloads its model (a front ~2 s; an engine 20-60 s on a
#: GPU): it sends the request again every SUPERVISOR_RETRY_S for up to this long (capped by the
#: request's own timeout), then passes the error on.
SUPERVISOR_WAIT_S = {"front": 30.0, "engine": 180.0}
SUPERVISOR_RETRY_S = 1.0
#: Repository-API headers by server URL, registered by the embedded server manager (studio.server),
#: so every client of that server in this process can reload a dead model without being told.
_repository_headers: dict[str, dict] = {}
_reloads: dict[tuple[str, str], float] = {}  # (url, model) -> perf_counter when its last reload finished
_reload_locks: dict[tuple[str, str], threading.Lock] = {}
_reload_guard = threading.Lock()


#: A model configuration parameter changed on every forced reload: tritonserver 2.51 treats a load
#: of an unchanged model as a no-op ("re-load is not necessary"), and a dead stub is no change to it.
RELOAD_PARAMETER = "studio_reload"


def register_repository_headers(url: str, headers: dict) -> None:
    """Headers the server at `url` (gRPC host:port) requires on its repository API."""
    _repository_headers[url] = dict(headers)


#: url -> function(instance names) stopping those stubs before their model is reloaded (embedded server)
_before_reload: dict[str, Callable[[list[str]], None]] = {}


def register_before_reload(url: str, stop_stubs: Callable[[list[str]], None]) -> None:
    """A stub Triton declares unhealthy may still run (measured: a front stub that did not run for
    3 s during a request got "not healthy" and lived on); reloading its model while it can still
    resume crashed tritonserver 2.51 (SIGSEGV in the Python backend). The embedded server manager
    registers how to stop such stubs first."""
    _before_reload[url] = stop_stubs


def dead_stub_instances(message: str) -> list[str]:
    """Every instance named dead in a Triton error message ("f5_tts_0_9")."""
    return re.findall(r"Stub process '(\w+_\d+_\d+)' is not healthy", message or "")


def dead_stub_model(message: str) -> str | None:
    """The model whose instance's stub died, from a Triton error message (None: another error)."""
    m = DEAD_STUB.search(message or "")
    return m.group("model") if m else None


#: The objective-check models (`asr`, `speaker_sim`) take 16 kHz mono audio.
CHECK_RATE = 16000


class SynthesisError(RuntimeError):
    """The server refused or failed a generation; the message is the model's own, without gRPC noise."""

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.status = status


class ReloadRefused(SynthesisError):
    """The server refused this client's reload of a dead model: its repository API needs a secret
    this client was not given (only the process running the studio server holds it)."""


class GenerationCancelled(Exception):
    """The caller's cancel Event was set; the request was cancelled on the server too."""


@dataclass
class SynthResult:
    """One finished generation. Times in seconds, measured by this client (DESIGN.md "Metrics")."""

    audio: np.ndarray  # float32 [N], joined
    sample_rate: int  # Hz
    latency_s: float  # request sent -> last audio received
    first_chunk_s: float  # request sent -> first audio received (offline: = latency_s)
    audio_s: float  # len(audio) / sample_rate
    rtf: float  # latency_s / audio_s
    info: dict  # the last chunk's `info` JSON (running totals: the request's)
    chunk_arrivals_s: list[float] = field(default_factory=list)  # per audio response, from request sent
    seed: int | None = None  # the seed the server used (random when none was asked for)
    demo_weights: bool = False  # the server ran demo (random) weights: the audio is noise
    recovered: bool = False  # sent twice: the first attempt met a dead instance (front or engine), then reloaded
    server: str | None = None  # gRPC host:port of the Triton server that answered (several: studio.pool)
    first_info: dict | None = None  # the first audio chunk's `info` (offline: the same as `info`)
    sent_at: float | None = None  # time.time() when the request was sent (splits the latency with the
    # engine's wall-clock info fields engine_in_s / engine_out_s when client and server share a clock)


# --- request building -------------------------------------------------------------------------------
def family_of(model: str) -> str:
    if model not in TRITON_MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(TRITON_MODELS)}")
    return model


def triton_model_name(model: str, stream: bool) -> str:
    """'f5'/'spark' -> the Triton model serving it offline or streaming."""
    return TRITON_MODELS[family_of(model)][1 if stream else 0]


def _bytes_input(name: str, text: str) -> grpcclient.InferInput:
    if not isinstance(text, str):
        raise ValueError(f"{name} must be text (str), got {type(text).__name__}")
    inp = grpcclient.InferInput(name, [1, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[text.encode("utf-8")]], dtype=np.object_))
    return inp


def _param_array(name: str, value) -> np.ndarray:
    """A request option as its DESIGN.md dtype, shaped [1, 1]; ValueError for a wrong kind of value."""
    dtype = PARAM_TYPES[name]
    if dtype == "BYTES":
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r}")
        return np.array([[value.encode("utf-8")]], dtype=np.object_)
    if dtype == "BOOL":
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return np.array([[bool(value)]], dtype=np.bool_)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if dtype == "FP32":
        if not np.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        return np.array([[value]], dtype=np.float32)
    np_type, low, high = _INT_RANGES[dtype]
    if isinstance(value, (float, np.floating)):
        if not float(value).is_integer():
            raise ValueError(f"{name} must be a whole number, got {value!r}")
        value = int(value)
    if not low <= int(value) <= high:
        raise ValueError(f"{name} = {value} does not fit in {dtype}")
    return np.array([[int(value)]], dtype=np_type)


def build_inputs(model: str, text: str, ref_audio: np.ndarray | None, ref_text: str,
                 params: dict | None = None) -> list[grpcclient.InferInput]:
    """The request tensors, batch dimension first (DESIGN.md "Inputs").

    reference_wav FP32 [1, N] and reference_wav_len INT32 [1, 1] (only with a prompt clip; F5
    requires one, Spark without one is voice creation), reference_text and target_text BYTES
    [1, 1] (UTF-8), then each option in `params` with its own dtype as [1, 1]. Options set to
    None are left out, so the server's defaults apply; unknown options, or options of the other
    family, raise ValueError.
    """
    family = family_of(model)
    params = {k: v for k, v in (params or {}).items() if v is not None}
    unknown = sorted(k for k in params if k not in PARAM_TYPES)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(PARAM_TYPES)}")
    foreign = sorted(k for k in params if k not in FAMILY_PARAMS[family])
    if foreign:
        raise ValueError(f"option(s) {', '.join(foreign)} do not apply to {family}; it takes "
                         f"{', '.join(FAMILY_PARAMS[family])}")
    inputs = []
    if ref_audio is None:
        if family == "f5":
            raise ValueError("F5-TTS needs a prompt clip (reference audio) to clone a voice")
    else:
        wav = np.asarray(ref_audio, dtype=np.float32)
        if wav.ndim == 2 and wav.shape[0] == 1:
            wav = wav[0]
        if wav.ndim != 1:
            raise ValueError(f"the prompt clip must be mono, shaped [samples]; got {wav.shape}")
        wav = np.ascontiguousarray(wav).reshape(1, -1)
        wav_in = grpcclient.InferInput("reference_wav", list(wav.shape), "FP32")
        wav_in.set_data_from_numpy(wav)
        len_in = grpcclient.InferInput("reference_wav_len", [1, 1], "INT32")
        len_in.set_data_from_numpy(np.array([[wav.shape[1]]], dtype=np.int32))
        inputs += [wav_in, len_in]
    inputs.append(_bytes_input("reference_text", "" if ref_text is None else ref_text))
    inputs.append(_bytes_input("target_text", text))
    for name, value in params.items():
        arr = _param_array(name, value)
        inp = grpcclient.InferInput(name, [1, 1], PARAM_TYPES[name])
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs


# --- responses and errors ----------------------------------------------------------------------------
def read_result(result) -> tuple[np.ndarray | None, dict | None]:
    """(waveform float32 [N], info dict) of a response, or (None, None) for an empty one."""
    wav = result.as_numpy("waveform")
    raw = result.as_numpy("info")
    if wav is None or raw is None:
        return None, None
    raw = raw.reshape(-1)[0]
    info = json.loads(raw.decode("utf-8") if isinstance(raw, (bytes, np.bytes_)) else raw)
    return np.ascontiguousarray(wav.reshape(-1), dtype=np.float32), info


def is_final(result) -> bool:
    """Whether a streamed response carries Triton's final flag (requested with enable_empty_final_response)."""
    params = result.get_response().parameters
    return "triton_final_response" in params and bool(params["triton_final_response"].bool_param)


#: Wrappers the server and the Python backend put around a model's own message.
_NOISE = [
    re.compile(r"^\[StatusCode\.[A-Z_]+\]\s*"),
    re.compile(r"^\[request id: [^\]]*\]\s*"),
    re.compile(r"^Failed to process the request\(s\) for model(?: instance)? '[^']*', message:\s*"),
    re.compile(r"^in ensemble '[^']*', "),
    re.compile(r"^(?:TritonModelException|pb_utils\.TritonError|TritonError|ValueError|RuntimeError):\s*"),
    re.compile(r"^\[invalid argument\]\s*"),  # triton_models.shared.INVALID_MARK, should one reach a client
]

_TRAILERS = ("\n\nAt:\n", "\nAt:\n  ", "\nTraceback (most recent call last)")


#: An absolute path of two or more parts (a server's temp folder, a model file): shown as its last part.
_PATH = re.compile(r"(?<![\w.:/])/(?:[\w.+@~-]+/)+([\w.+@~-]+)")


def scrub_paths(text: str) -> str:
    """`text` with every absolute path replaced by its file name: messages never show server paths."""
    return _PATH.sub(lambda m: m.group(1), text or "")


def clean_message(message: str) -> str:
    """The model's own words from a Triton/gRPC error text (wrapping prefixes, the stack trailer and
    server paths removed)."""
    text = (message or "").strip()
    changed = True
    while changed:
        changed = False
        for pattern in _NOISE:
            stripped = pattern.sub("", text, count=1)
            if stripped != text:
                text, changed = stripped.strip(), True
    for marker in _TRAILERS:  # the Python backend appends the raising stack ("At:" + frames)
        cut = text.find(marker)
        if cut > 0:
            text = text[:cut].strip()
    return scrub_paths(text) or "the server reported an error without a message"


def _status(exc) -> str | None:
    status = exc.status() if isinstance(exc, InferenceServerException) else None
    return str(status) if status else None


def to_synthesis_error(exc, url: str, model_name: str, timeout_s: float) -> SynthesisError:
    """An InferenceServerException as a SynthesisError a person can act on."""
    status = _status(exc)
    raw = exc.message() if isinstance(exc, InferenceServerException) else str(exc)
    if status == "StatusCode.UNAVAILABLE":
        return SynthesisError(f"cannot reach the Triton server at {url} (is it running?): {clean_message(raw)}",
                              status)
    if status == "StatusCode.DEADLINE_EXCEEDED":
        return SynthesisError(f"{model_name} gave no complete answer within {timeout_s:g} s", status)
    return SynthesisError(clean_message(raw), status)


# --- the client ----------------------------------------------------------------------------------------
def _close_all(clients: list, lock: threading.Lock) -> None:
    with lock:
        pending, clients[:] = list(clients), []
    for c in pending:
        try:
            c.stop_stream(cancel_requests=True)
            c.close()
        except Exception:  # noqa: BLE001 - closing must never raise (runs at exit too)
            pass


def _channel_args(max_reconnect_backoff_s: float | None) -> list | None:
    """gRPC channel options: tritonclient's own defaults (None), or those plus a bounded reconnect
    back-off (channel_args replaces tritonclient's list, so its entries are repeated here)."""
    if not max_reconnect_backoff_s:
        return None
    keep = grpcclient.KeepAliveOptions()
    ms = max(int(max_reconnect_backoff_s * 1000), 100)
    return [("grpc.max_send_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
            ("grpc.max_receive_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
            ("grpc.keepalive_time_ms", keep.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", keep.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", keep.keepalive_permit_without_calls),
            ("grpc.http2.max_pings_without_data", keep.http2_max_pings_without_data),
            ("grpc.initial_reconnect_backoff_ms", min(ms, 1000)),
            ("grpc.min_reconnect_backoff_ms", min(ms, 1000)),
            ("grpc.max_reconnect_backoff_ms", ms)]


class StudioClient:
    """A gRPC client of the studio's Triton server (`host:port` of its gRPC endpoint)."""

    def __init__(self, url: str = "127.0.0.1:8001", repository_headers: dict | None = None,
                 observer: Callable[[str, bool, str, "SynthResult | None"], None] | None = None,
                 max_reconnect_backoff_s: float | None = None):
        """`repository_headers`: what the server's restricted repository API requires for a reload
        (the embedded server's `TritonServer.repository_headers`); without them a reload is refused.
        `observer(family, stream, outcome, result)`: told when each `synthesize` call ends, outcome
        ok|error|cancelled, result only when ok (the studio's metrics, studio/metrics.py).
        `max_reconnect_backoff_s`: the longest wait between gRPC's reconnection attempts to a server that
        went away (gRPC's default grows to 120 s; studio.pool keeps it short, so a restarted server is
        seen again within seconds)."""
        self.url = url
        self.max_reconnect_backoff_s = max_reconnect_backoff_s
        self.observer = observer
        self.repository_headers = dict(repository_headers or _repository_headers.get(url, {}))
        self._lock = threading.Lock()
        self._clients: list = []  # every tritonclient client this object opened, for close()
        self._idle_stream: list = []
        self._closed = False
        self._client = self._open()
        # Unclosed gRPC clients with stream threads can hang the interpreter at exit.
        self._finalizer = weakref.finalize(self, _close_all, self._clients, self._lock)

    # -- lifecycle --------------------------------------------------------------------------------
    def _open(self):
        client = grpcclient.InferenceServerClient(url=self.url, verbose=False,
                                                  channel_args=_channel_args(self.max_reconnect_backoff_s))
        with self._lock:
            self._clients.append(client)
        return client

    def close(self) -> None:
        """Close every gRPC channel (cancels streams still running). Safe to call twice."""
        self._closed = True
        with self._lock:
            self._idle_stream.clear()
        self._finalizer()

    def __enter__(self) -> "StudioClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this StudioClient is closed")

    # -- server state -----------------------------------------------------------------------------
    def server_ready(self, timeout_s: float = CONTROL_TIMEOUT_S) -> bool:
        self._check_open()
        try:
            return bool(self._client.is_server_ready(client_timeout=timeout_s))
        except InferenceServerException:
            return False

    def model_ready(self, name: str, timeout_s: float = CONTROL_TIMEOUT_S) -> bool:
        self._check_open()
        try:
            return bool(self._client.is_model_ready(name, client_timeout=timeout_s))
        except InferenceServerException:
            return False

    # -- the objective-check models (optional: `asr`, `speaker_sim`) --------------------------------
    def _check_call(self, name: str, wav: np.ndarray, sr: int, extra: list, outputs: list[str],
                    timeout_s: float) -> tuple[dict, dict]:
        """One request to a 16 kHz check model: the named outputs as numpy, and its info."""
        self._check_open()
        if sr != CHECK_RATE:
            raise SynthesisError(f"{name} takes {CHECK_RATE} Hz audio, got {sr} Hz")
        wav = np.asarray(wav, dtype=np.float32).reshape(1, -1)
        audio = grpcclient.InferInput("audio", list(wav.shape), "FP32")
        audio.set_data_from_numpy(wav)
        length = grpcclient.InferInput("audio_len", [1, 1], "INT32")
        length.set_data_from_numpy(np.array([[wav.shape[1]]], dtype=np.int32))
        try:
            result = self._client.infer(name, [audio, length] + extra, client_timeout=timeout_s,
                                        outputs=[grpcclient.InferRequestedOutput(o) for o in outputs + ["info"]])
        except InferenceServerException as exc:
            raise to_synthesis_error(exc, self.url, name, timeout_s) from None
        info = json.loads(result.as_numpy("info").reshape(-1)[0].decode("utf-8"))
        return {o: result.as_numpy(o) for o in outputs}, info

    def transcribe(self, wav: np.ndarray, sr: int, language: str | None = None, fixed_tokens: int | None = None,
                   timeout_s: float = 120) -> tuple[str, dict]:
        """Text of `wav` (mono float32 at 16 kHz) from the `asr` model, and its info (language,
        compute_ms, tokens, demo_weights). Raises SynthesisError with the model's message."""
        extra = []
        if language:
            extra.append(_bytes_input("language", language))
        if fixed_tokens:
            tokens = grpcclient.InferInput("fixed_tokens", [1, 1], "INT32")
            tokens.set_data_from_numpy(np.array([[fixed_tokens]], dtype=np.int32))
            extra.append(tokens)
        out, info = self._check_call("asr", wav, sr, extra, ["text"], timeout_s)
        return out["text"].reshape(-1)[0].decode("utf-8", "replace"), info

    def embed(self, wav: np.ndarray, sr: int, timeout_s: float = 60) -> tuple[np.ndarray, dict]:
        """Speaker embedding of `wav` (mono float32 at 16 kHz) from the `speaker_sim` model, and its info."""
        out, info = self._check_call("speaker_sim", wav, sr, [], ["embedding"], timeout_s)
        return out["embedding"].reshape(-1).astype(np.float32), info

    def statistics(self, model: str | None = None) -> dict:
        """Triton's cumulative inference statistics (all models, or one), as JSON (int64s are strings)."""
        self._check_open()
        try:
            return self._client.get_inference_statistics(model_name=model or "", as_json=True,
                                                         client_timeout=CONTROL_TIMEOUT_S)
        except InferenceServerException as exc:
            raise to_synthesis_error(exc, self.url, model or "statistics", CONTROL_TIMEOUT_S) from None

    def model_config(self, name: str) -> dict:
        """The model's configuration as JSON (the `config` object of Triton's answer)."""
        self._check_open()
        try:
            answer = self._client.get_model_config(name, as_json=True, client_timeout=CONTROL_TIMEOUT_S)
        except InferenceServerException as exc:
            raise to_synthesis_error(exc, self.url, name, CONTROL_TIMEOUT_S) from None
        return answer.get("config", answer)

    # -- generation -------------------------------------------------------------------------------
    def synthesize(self, model: str, text: str, ref_audio: np.ndarray | None, ref_text: str, stream: bool = False,
                   params: dict | None = None, on_chunk: Callable[[np.ndarray, dict], None] | None = None,
                   cancel: threading.Event | None = None, timeout_s: float | None = None,
                   recover: bool = True) -> SynthResult:
        """Speak `text` in the voice of `ref_audio` (mono float32 at the family's rate) with `model`.

        model: 'f5' or 'spark'. stream: use the decoupled model and receive audio chunk by chunk.
        params: request options by DESIGN.md name (None values and absent names: server default).
        on_chunk(samples, info): called in this thread with the samples that just became final
        (streaming: once per audio chunk, the held-back cross-fade tail with the last chunk;
        offline: once with all the audio); their concatenation is `result.audio`.
        cancel: set it from another thread to stop; raises GenerationCancelled.
        timeout_s: default the request deadline (tts.limits, STUDIO_REQUEST_DEADLINE_S).
        recover: reload a model whose instance died and send again (below); False passes the dead-stub
        error on at once (studio.pool sends the request to another server instead).
        Raises SynthesisError with the server's message when the request fails.
        """
        family = family_of(model)
        observer = self.observer
        if observer is None:
            return self._synthesize(family, text, ref_audio, ref_text, stream, params, on_chunk, cancel, timeout_s,
                                    recover)
        try:
            result = self._synthesize(family, text, ref_audio, ref_text, stream, params, on_chunk, cancel,
                                      timeout_s, recover)
        except GenerationCancelled:
            observer(family, stream, "cancelled", None)
            raise
        except Exception:
            observer(family, stream, "error", None)
            raise
        observer(family, stream, "ok", result)
        return result

    def _synthesize(self, family, text, ref_audio, ref_text, stream, params, on_chunk, cancel,
                    timeout_s, recover=True) -> SynthResult:
        self._check_open()
        if timeout_s is None:
            from tts.limits import current_limits

            timeout_s = current_limits().request_deadline_s
        inputs = build_inputs(family, text, ref_audio, ref_text, params)
        name = triton_model_name(family, stream)
        delivered = []

        def tracked(samples, info):
            delivered.append(True)
            if on_chunk is not None:
                on_chunk(samples, info)

        def attempt(limit_s: float):
            request_id = f"studio-{uuid.uuid4().hex[:16]}"
            if stream:
                return self._stream(family, name, inputs, request_id, tracked, cancel, limit_s)
            return self._offline(family, name, inputs, request_id, tracked, cancel, limit_s)

        started = time.perf_counter()
        deadline = started + timeout_s  # what waiting for the server's supervisor may not pass
        reloaded: list[str] = []
        waited: dict[str, float] = {}  # model -> when this request began waiting for the server to replace it
        while True:
            tried_at = time.perf_counter()
            try:
                # after a reload a retry gets the whole timeout again (the reload was not the request's
                # doing); while waiting on the server's supervisor the request keeps its own deadline
                result = attempt(max(deadline - tried_at, 0.001) if waited else timeout_s)
                break
            except SynthesisError as exc:
                # An instance whose stub died answers every request routed to it with this error (the
                # front's own, or the engine's through BLS): reload that model alone (a front: new
                # stubs, the engine untouched; the engine: its weights again) and try again, unless
                # audio already reached the caller. Several instances can die together (seen on the
                # H200: a retry met a second dead front), hence up to RECOVERY_ATTEMPTS reloads.
                dead = dead_stub_model(str(exc))
                if not recover or dead not in (name, ENGINE_MODELS[family]) or len(reloaded) >= RECOVERY_ATTEMPTS:
                    raise
                if delivered:
                    # Audio already reached the caller: sending again would repeat it. End this
                    # request now with a clear error and reload in the background, so the next
                    # request is served (the embedded server's supervisor reloads it as well).
                    threading.Thread(target=self._reload_quietly, args=(dead, time.perf_counter(), str(exc)),
                                     daemon=True, name=f"reload-{dead}").start()
                    raise SynthesisError(f"{clean_message(str(exc))} The request stopped after part of its audio; "
                                         f"{dead} is being reloaded, so the next request will be served.",
                                         exc.status) from None
                kind = "engine" if dead == ENGINE_MODELS[family] else "front"
                try:
                    self.reload_model(dead, failed_at=time.perf_counter(), cause=str(exc),
                                      timeout_s=RELOAD_TIMEOUT_S[kind])
                    reloaded.append(dead)
                except ReloadRefused:
                    # Not ours to reload: the studio server's supervisor replaces the dead stub. Send
                    # again until it has (a dead front: the next try mostly lands on a live instance).
                    now = time.perf_counter()
                    since = waited.setdefault(dead, now)
                    bound_at = min(since + SUPERVISOR_WAIT_S[kind], deadline)
                    if now + SUPERVISOR_RETRY_S > bound_at:
                        raise SynthesisError(
                            f"{clean_message(str(exc))} This client may not reload models (the studio server's "
                            f"process holds the repository secret), and the server did not replace the instance "
                            f"within {bound_at - since:.3g} s: restart the server.", exc.status) from None
                    if cancel is not None and cancel.wait(SUPERVISOR_RETRY_S):
                        raise GenerationCancelled("cancelled while waiting for the server to replace a dead "
                                                  f"{dead} instance") from None
                    if cancel is None:
                        time.sleep(SUPERVISOR_RETRY_S)
        result.server = self.url
        if not reloaded and not waited:
            return result
        lost = tried_at - started  # the failed attempts, reloads and waits before the one that served
        died = " and ".join(f"a {m} instance" for m in reloaded + [m for m in waited if m not in reloaded])
        how = ("the model was reloaded and the request sent again" if not waited else
               "the request was sent again while the server replaced it" if not reloaded else
               "the models were reloaded or replaced by the server and the request sent again")
        result.info = dict(result.info, notes=list(result.info.get("notes", [])) + [
            f"{died} had died (its stub process was gone); {how}: {lost:.2f} s of this request's latency"])
        result.latency_s += lost
        result.first_chunk_s += lost
        result.chunk_arrivals_s = [t + lost for t in result.chunk_arrivals_s]
        result.rtf = result.latency_s / result.audio_s if result.audio_s else float("inf")
        result.recovered = True
        return result

    def _reload_quietly(self, name: str, failed_at: float, cause: str) -> None:
        engine = name in ENGINE_MODELS.values()
        try:
            self.reload_model(name, failed_at=failed_at, cause=cause,
                              timeout_s=RELOAD_TIMEOUT_S["engine" if engine else "front"])
        except (SynthesisError, RuntimeError):
            pass  # the next request meets the dead instance and says so

    def reload_model(self, name: str, failed_at: float | None = None, cause: str = "",
                     timeout_s: float = RELOAD_TIMEOUT_S["front"]) -> None:
        """Reload model `name` through Triton's repository API (the server runs in explicit model
        control mode), with new stubs for every instance. Several clients meeting the same dead
        instance reload it once: a reload that finished after `failed_at` (perf_counter of the
        failure) counts. The load carries the model's own configuration with RELOAD_PARAMETER
        changed, which forces the reload (an unchanged model's load is a no-op in 2.51)."""
        key = (self.url, name)
        with _reload_guard:
            lock = _reload_locks.setdefault(key, threading.Lock())
        with lock:
            if failed_at is not None and _reloads.get(key, float("-inf")) > failed_at:
                return
            stop = _before_reload.get(self.url)
            dead = [inst for inst in dead_stub_instances(cause) if inst.rsplit("_", 2)[0] == name]
            if stop is not None and dead:
                stop(dead)
            try:
                config = self._client.get_model_config(name, as_json=True, client_timeout=CONTROL_TIMEOUT_S)
                config = config.get("config", config)
                config.setdefault("parameters", {})[RELOAD_PARAMETER] = {"string_value": uuid.uuid4().hex}
                self._client.load_model(name, headers=self.repository_headers or None, config=json.dumps(config),
                                        client_timeout=timeout_s)
            except InferenceServerException as exc:
                refused = "protocol is restricted" in (exc.message() or "")
                raise (ReloadRefused if refused else SynthesisError)(
                    f"{clean_message(cause) or name + ' failed'}; reloading {name} to replace the dead instance "
                    f"failed too ({clean_message(exc.message())}): restart the server") from None
            _reloads[key] = time.perf_counter()

    def _offline(self, family, name, inputs, request_id, on_chunk, cancel, timeout_s) -> SynthResult:
        answers: queue.SimpleQueue = queue.SimpleQueue()
        outputs = [grpcclient.InferRequestedOutput(o) for o in OUTPUTS]
        sent, sent_at = time.perf_counter(), time.time()
        call = self._client.async_infer(
            name, inputs, callback=lambda result, error: answers.put((time.perf_counter(), result, error)),
            outputs=outputs, request_id=request_id, client_timeout=timeout_s)
        try:
            received, result, error = _wait(answers, cancel, timeout_s, name)
        except BaseException:
            call.cancel()
            raise
        if error is not None:
            raise to_synthesis_error(error, self.url, name, timeout_s)
        wav, info = read_result(result)
        if wav is None:
            raise SynthesisError(f"{name} answered without audio")
        if on_chunk is not None:
            on_chunk(wav, info)
        latency = received - sent
        return _result(family, wav, info, latency, latency, [latency], sent_at=sent_at)

    def _stream(self, family, name, inputs, request_id, on_chunk, cancel, timeout_s) -> SynthResult:
        answers: queue.SimpleQueue = queue.SimpleQueue()
        outputs = [grpcclient.InferRequestedOutput(o) for o in OUTPUTS]
        joiner = ChunkJoiner(hold_back=HOLD_BACK[family])
        arrivals: list[float] = []
        info: dict | None = None
        first_info: dict | None = None
        client = self._take_stream_client()
        completed = False
        try:
            sent, sent_at = time.perf_counter(), time.time()
            try:
                client.start_stream(callback=lambda result, error: answers.put((time.perf_counter(), result, error)),
                                    stream_timeout=timeout_s)
                client.async_stream_infer(name, inputs, outputs=outputs, request_id=request_id,
                                          enable_empty_final_response=True)
            except InferenceServerException as exc:
                raise to_synthesis_error(_stream_failure(answers, exc), self.url, name, timeout_s) from None
            deadline = time.monotonic() + timeout_s
            while True:
                received, result, error = _wait(answers, cancel, deadline - time.monotonic(), name)
                if error is not None:
                    raise to_synthesis_error(error, self.url, name, timeout_s)
                wav, chunk_info = read_result(result)
                if wav is not None:
                    arrivals.append(received - sent)
                    info = chunk_info
                    first_info = chunk_info if first_info is None else first_info
                    new = self._join(joiner, wav, chunk_info, name)
                    if chunk_info.get("final"):
                        new = np.concatenate([new, joiner.finish()])
                    if on_chunk is not None:
                        on_chunk(new, chunk_info)
                if is_final(result):
                    break
            completed = True
        finally:
            self._give_back_stream_client(client, healthy=completed)
        if info is None:
            raise SynthesisError(f"{name} ended the stream without sending audio")
        rest = np.zeros(0, np.float32) if joiner.finished else joiner.finish()
        if rest.size and on_chunk is not None:  # no chunk was marked final: hand out the held-back tail
            on_chunk(rest, info)
        return _result(family, joiner.joined, info, arrivals[-1], arrivals[0], arrivals, first_info, sent_at)

    @staticmethod
    def _join(joiner: ChunkJoiner, wav: np.ndarray, info: dict, name: str) -> np.ndarray:
        overlap = int(info.get("overlap_samples", 0)) if joiner.chunks else 0
        try:
            return joiner.add(wav, overlap)
        except ValueError as exc:
            raise SynthesisError(f"{name} sent a chunk this client cannot join: {exc}") from None

    # -- the pool of streaming clients ------------------------------------------------------------
    def _take_stream_client(self):
        with self._lock:
            if self._closed:
                raise RuntimeError("this StudioClient is closed")
            if self._idle_stream:
                return self._idle_stream.pop()
        return self._open()

    def _give_back_stream_client(self, client, healthy: bool) -> None:
        """Stop its stream (cancelling the request unless it completed) and keep it for reuse or close it."""
        try:
            client.stop_stream(cancel_requests=not healthy)
        except Exception:  # noqa: BLE001 - a broken stream means a broken client: close it below
            healthy = False
        with self._lock:
            if healthy and not self._closed and len(self._idle_stream) < MAX_IDLE_STREAM_CLIENTS:
                self._idle_stream.append(client)
                return
            if client in self._clients:
                self._clients.remove(client)
        try:
            client.close()
        except Exception:  # noqa: BLE001
            pass


def _wait(answers: queue.SimpleQueue, cancel: threading.Event | None, timeout_s: float, name: str):
    """The next (time, result, error) from a callback queue, watching `cancel` and the deadline."""
    deadline = time.monotonic() + max(timeout_s, 0.0)
    while True:
        if cancel is not None and cancel.is_set():
            raise GenerationCancelled("generation cancelled")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise SynthesisError(f"{name} gave no complete answer in time (client timeout)",
                                 "StatusCode.DEADLINE_EXCEEDED")
        try:
            return answers.get(timeout=min(POLL_S, remaining) if cancel is not None else remaining)
        except queue.Empty:
            continue


def _stream_failure(answers: queue.SimpleQueue, exc: InferenceServerException):
    """A stream that failed to start reports its reason through the callback: prefer that one."""
    try:
        _, _, error = answers.get(timeout=STREAM_ERROR_WAIT_S)
    except queue.Empty:
        return exc
    return error if error is not None else exc


def _result(family: str, audio: np.ndarray, info: dict, latency: float, first: float,
            arrivals: list[float], first_info: dict | None = None, sent_at: float | None = None) -> SynthResult:
    sr = int(info.get("sample_rate", SAMPLE_RATES[family]))
    audio_s = audio.size / sr
    seed = info.get("seed")
    return SynthResult(audio=audio, sample_rate=sr, latency_s=latency, first_chunk_s=first, audio_s=audio_s,
                       rtf=latency / audio_s if audio_s > 0 else float("inf"), info=info,
                       chunk_arrivals_s=list(arrivals), seed=None if seed is None else int(seed),
                       demo_weights=bool(info.get("demo_weights", False)),
                       first_info=info if first_info is None else first_info, sent_at=sent_at)
