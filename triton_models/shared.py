"""Helpers the thin Triton adapters share: parameters, input parsing, JSON info, BLS forwarding.

Imported by `model.py` files after they put the project root on sys.path (the Python backend stub
ignores PYTHONPATH). Importing `triton_python_backend_utils` works only inside a stub.
"""

from __future__ import annotations

import gc
import itertools
import json
import mmap
import os
import threading
import time
import uuid

import numpy as np

# Imported here, not where first used: a front model has many instances (a stub process each), and
# an import inside the request path runs on each instance's first request (tts.limits alone took
# ~7 ms on the CPU, dataclasses included: half the requests of a 32-request run at concurrency 1
# land on a fresh instance of the 16).
from tts.limits import ENV as LIMIT_ENV, current_limits
from tts.switches import TRACE_ENV

#: `STUDIO_TIMING_LOG=1`: every front and engine request prints one `[timing] MODEL {json}` line
#: (milliseconds) to the server log: where a request's time goes between the stubs (tools/gpu_timing.py).
TIMING_LOG = os.environ.get("STUDIO_TIMING_LOG", "") == "1"


def timing_log(model: str, **fields) -> None:
    if TIMING_LOG:
        print(f"[timing] {model} {json.dumps(fields)}", flush=True)


#: A garbage collection at least this long is a timing line (`watch_gc`).
GC_LOG_MS = 1.0


def watch_gc(model: str) -> None:
    """With STUDIO_TIMING_LOG: a `[timing] <model>:gc` line for every collection of this process
    that took GC_LOG_MS or more (generation, milliseconds, objects collected): a collection runs on
    whichever thread allocates at that moment, so a long one sits on some request's path."""
    if not TIMING_LOG:
        return
    started = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        ms = (time.perf_counter() - started[0]) * 1000
        if ms >= GC_LOG_MS:
            timing_log(f"{model}:gc", generation=info.get("generation"), ms=round(ms, 3),
                       collected=info.get("collected"))

    gc.callbacks.append(on_gc)


def ms_since(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 3)


CUDA_LIBRARIES = ("libcudnn.", "libcudnn_graph", "libcublas.", "libcublasLt", "libcudart", "libnvrtc")


def loaded_libraries(prefixes=CUDA_LIBRARIES) -> list[str]:
    """Paths of the shared libraries this process has mapped whose names start with `prefixes`
    (from /proc/self/maps; empty elsewhere): which cuDNN / cuBLAS an engine really loaded."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/" in line}
    except OSError:
        return []
    return sorted(p for p in paths if os.path.basename(p).startswith(prefixes))


def profile_summary(prof, prefix: str = "f5.") -> dict:
    """A finished torch.profiler run in numbers: device kernels, the time the device was busy (their
    union) and the span from the first kernel's start to the last one's end (ms), and host / device
    ms and calls of each `record_function` range whose name starts with `prefix`."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if "cuda" in str(getattr(e, "device_type", "")).lower()
                   and e.time_range.end > e.time_range.start)
    busy, cur = 0.0, None
    for s, e in spans:
        if cur is None or s > cur[1]:
            busy += (cur[1] - cur[0]) if cur else 0.0
            cur = [s, e]
        else:
            cur[1] = max(cur[1], e)
    busy += (cur[1] - cur[0]) if cur else 0.0
    return {"kernels": len(spans), "device_busy_ms": round(busy / 1000, 3),
            "device_span_ms": round((spans[-1][1] - spans[0][0]) / 1000, 3) if spans else 0.0,
            "ranges": {e.key: {"host_ms": round(e.cpu_time_total / 1000, 3), "calls": e.count,
                               "device_ms": round(getattr(e, "device_time_total", 0) / 1000, 3)}
                       for e in prof.key_averages() if e.key.startswith(prefix)}}


class ExecuteProfile:
    """`STUDIO_PROFILE_DIR=DIR`: torch.profiler over executes number `STUDIO_PROFILE_SKIP` (default 8)
    to skip + `STUDIO_PROFILE_COUNT` (default 3) of one engine instance, written to DIR as a gzipped
    chrome trace and a JSON summary (device busy time and span, named ranges). Off by default; the
    engine imports torch anyway, this module does not."""

    def __init__(self, name: str):
        self.name = name
        self.dir = os.environ.get("STUDIO_PROFILE_DIR", "")
        self.skip = int(os.environ.get("STUDIO_PROFILE_SKIP", "8"))
        self.count = int(os.environ.get("STUDIO_PROFILE_COUNT", "3"))
        self.seen = 0
        self._prof = None

    def __enter__(self):
        self.seen += 1
        if self.dir and self.skip < self.seen <= self.skip + self.count:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        prof, self._prof = self._prof, None
        if prof is None:
            return False
        import gzip
        from pathlib import Path

        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        prof.__exit__(None, None, None)
        out = Path(self.dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"{self.name}_{os.getpid()}_{self.seen}"
        summary = profile_summary(prof)
        Path(f"{stem}.json").write_text(json.dumps(summary, indent=1))
        trace = f"{stem}.trace.json"
        prof.export_chrome_trace(trace)
        with open(trace, "rb") as src, gzip.open(trace + ".gz", "wb") as dst:
            dst.write(src.read())
        os.unlink(trace)
        print(f"[profile] {self.name} {json.dumps({k: v for k, v in summary.items() if k != 'ranges'})}", flush=True)
        return False


#: Inputs a front end passes on to its engine (DESIGN.md's Triton contract).
F5_INPUTS = ["reference_wav", "reference_wav_len", "reference_text", "target_text", "nfe_steps", "cfg_strength",
             "sway_coef", "speed", "use_prompt_cache", "seed"]
SPARK_INPUTS = ["reference_wav", "reference_wav_len", "reference_text", "target_text", "temperature", "top_p",
                "top_k", "max_new_tokens", "min_new_tokens", "use_prompt_cache", "seed", "gender", "pitch_level",
                "speed_level"]


def model_params(args: dict) -> dict:
    """The model config from `initialize` args and its string parameters."""
    config = json.loads(args["model_config"])
    params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
    return {"config": config, "params": params}


def get_scalar(pb_utils, request, name: str, default=None):
    """First element of an optional [1]-shaped input (batch dim first), or `default` when absent."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    value = tensor.as_numpy().reshape(-1)
    if value.size == 0:
        return default
    value = value[0]
    if isinstance(value, (bytes, np.bytes_)):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


def get_text(pb_utils, request, name: str, required: bool = True) -> str:
    value = get_scalar(pb_utils, request, name)
    if value is None:
        if required:
            raise ValueError(f"the request has no `{name}` input")
        return ""
    return value if isinstance(value, str) else str(value)


def get_wav(pb_utils, request, required: bool = True, name: str = "reference_wav",
            length_name: str = "reference_wav_len") -> np.ndarray | None:
    """`name` (the prompt clip by default) cut to `length_name` (clients may zero-pad), as float32 mono."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        if required:
            raise ValueError(f"the request has no `{name}` input" + (" (the prompt clip)" if name == "reference_wav" else ""))
        return None
    wav = tensor.as_numpy().astype(np.float32).reshape(-1)
    length = get_scalar(pb_utils, request, length_name)
    if length is not None:
        length = int(length)
        if not 0 <= length <= wav.size:
            raise ValueError(f"{length_name} is {length} but {name} has {wav.size} samples")
        wav = wav[:length]
    return wav


def info_tensor(pb_utils, info: dict):
    return pb_utils.Tensor("info", np.array([[json.dumps(info).encode("utf-8")]], dtype=np.object_))


def wave_tensor(pb_utils, wav: np.ndarray):
    return pb_utils.Tensor("waveform", np.asarray(wav, dtype=np.float32).reshape(1, -1))


def audio_response(pb_utils, wav: np.ndarray, info: dict):
    """`waveform` first (upstream clients read the first output), then `info`."""
    return pb_utils.InferenceResponse(output_tensors=[wave_tensor(pb_utils, wav), info_tensor(pb_utils, info)])


#: Prefix an engine puts on the message of an invalid-request error: in 2.51 the status code of a
#: decoupled model's error does not survive BLS (the front saw INTERNAL), the message does. The
#: front removes it and answers with the invalid-argument status itself.
INVALID_MARK = "[invalid argument] "


def error_response(pb_utils, message: str, invalid: bool = False, code=None):
    """An error response; `invalid` marks the client's mistake (HTTP 400 / gRPC INVALID_ARGUMENT for
    the offline models, INVALID_MARK on the message for a front calling this model through BLS; a
    decoupled model's stream client sees the message only)."""
    if invalid:
        message, code = INVALID_MARK + message, pb_utils.TritonError.INVALID_ARG
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


def forward_error(pb_utils, error):
    """A BLS response's error as this model's answer: invalid-argument when the engine marked it so."""
    message = error.message()
    if message.startswith(INVALID_MARK):
        message = message[len(INVALID_MARK):]
        return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(
            message, pb_utils.TritonError.INVALID_ARG))
    return error_response(pb_utils, message)


def request_error_response(pb_utils, exc: Exception):
    """The response for a request that failed validation or a limit: the message, marked invalid."""
    return error_response(pb_utils, str(exc), invalid=isinstance(exc, ValueError))


#: Set by the studio's server for `STUDIO_TRITON_TRACE` (tts.switches.TRACE_ENV): the fronts then
#: hand each request's trace to their BLS request, so the engine's part shows in the same trace.
TRACING = bool(os.environ.get(TRACE_ENV))


def traced(request) -> dict:
    """Keyword arguments for a BLS request made on behalf of `request`: its trace while tracing."""
    return {"trace": request.trace()} if TRACING and hasattr(request, "trace") else {}


def forward_inputs(pb_utils, request, names: list[str]) -> list:
    """The request's present inputs among `names`, passed on to a BLS request as they are.

    (Not re-wrapped through numpy: with numpy 2 the 2.51 stub mis-serialises a BYTES tensor built
    from `as_numpy()` of another BYTES tensor.)
    """
    out = []
    for name in names:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is not None:
            out.append(tensor)
    return out


def response_audio(pb_utils, response) -> tuple[np.ndarray | None, dict | None]:
    """(waveform, info) of a BLS response, or (None, None) for an empty (final-flag) response."""
    wav = pb_utils.get_output_tensor_by_name(response, "waveform")
    info = pb_utils.get_output_tensor_by_name(response, "info")
    if wav is None or info is None:
        return None, None
    raw = info.as_numpy().reshape(-1)[0]
    return wav.as_numpy().reshape(-1), json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)


def _cancelled(request) -> bool:
    check = getattr(request, "is_cancelled", None)
    return bool(check()) if check else False


class CancelCheck:
    """Whether the client went away (`request.is_cancelled()`), asked at most every POLL_S while a
    front waits on its engine (`pump_responses`); calls `on_cancel` once when it finds out, so the
    engine drops the request. Polled from one thread only (not thread-safe)."""

    POLL_S = 0.02

    def __init__(self, request, on_cancel=None):
        self.request, self.on_cancel = request, on_cancel
        self.fired = False
        self._next = 0.0

    def poll(self) -> bool:
        """True once the request is cancelled (asks the server at most every POLL_S)."""
        if self.fired:
            return True
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self.POLL_S
        if _cancelled(self.request):
            self.fired = True
            if self.on_cancel is not None:
                _quietly(self.on_cancel)
        return self.fired


#: Prometheus counter (microseconds; labels model, version, instance) of the time requests wait in an engine that
#: batches on a thread of its own (the F5 engine on a GPU): its Triton execute only hands a request
#: over, so Triton's `nv_inference_queue_duration_us` no longer holds that wait. The autoscaler's
#: queue-time metric sums both (deploy/kubernetes/prometheus-adapter/values.yaml).
ENGINE_QUEUE_METRIC = "studio_engine_queue_duration_us"


class EngineQueueCounter:
    """`ENGINE_QUEUE_METRIC` for one engine instance, through the Python backend's custom metrics
    (labels model, version and instance: one series per instance, as an engine runs one per GPU)."""

    def __init__(self, pb_utils, model: str, instance: str):
        self.family = pb_utils.MetricFamily(
            name=ENGINE_QUEUE_METRIC, kind=pb_utils.MetricFamily.COUNTER,
            description="Cumulative time requests waited inside the engine for their first batch (us)")
        self.metric = self.family.Metric(labels={"model": model, "version": "1", "instance": instance})

    def add_ms(self, ms: float) -> None:
        self.metric.increment(max(ms, 0.0) * 1000.0)


def engine_queue_counter(pb_utils, args: dict, model: str) -> EngineQueueCounter | None:
    """The counter of this instance (`args`: initialize's), or None (with a log line) where the
    server has metrics turned off."""
    try:
        return EngineQueueCounter(pb_utils, model, args.get("model_instance_name", model))
    except Exception as exc:  # noqa: BLE001 - metrics are an extra: serving goes on without them
        print(f"[{model}] engine queue metric unavailable ({type(exc).__name__}: {exc})", flush=True)
        return None


def release_memory() -> None:
    """Hand freed heap memory back to the system (glibc's malloc_trim): after a large request an
    engine otherwise keeps its peak (measured with demo weights: +190 MiB PSS after one request at
    the 5000-character limit, kept through later small requests). A few milliseconds; no-op where
    glibc is absent."""
    global _LIBC
    if _LIBC is None:
        import ctypes

        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


# --- stub liveness ------------------------------------------------------------------------------------
# tritonserver 2.51 never restarts a dead stub, its readiness ignores stub death, and a BLS response
# iterator waits forever on a dead engine. So every model instance records its stub's pid and start
# time in `<run>/stubs/<instance name>` when it initialises: front models bound their waits on an
# engine by checking those files, and the studio's server manager (studio/server.py) reloads a
# model whose instance's stub is gone.
#: How often a front waiting on its engine checks that the engine's stubs live, in seconds.
LIVENESS_POLL_S = 0.5


def process_start_time(pid: int) -> int | None:
    """The start time of process `pid` in clock ticks since boot (/proc/PID/stat field 22), or None
    when no such process runs (or it is a zombie). Pid and start time together name one process:
    a pid alone may have been reused."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    if not fields or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def stubs_dir(args: dict):
    """`<run>/stubs`: one file per model instance (its stub's pid and start time)."""
    from pathlib import Path

    folder = Path(args["model_repository"]).resolve().parent.parent / "stubs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


#: Suffix of the marker beside the stub's record that says whether a front waits on its engine
#: through BLS (`BusyMarker`): one byte, BUSY_YES or BUSY_NO.
BUSY_SUFFIX = ".busy"
BUSY_YES, BUSY_NO = b"1", b"0"
#: This stub's busy marker (`_BusyFlag`), set by register_stub.
_BUSY: "_BusyFlag | None" = None


class _BusyFlag:
    """One stub's busy marker: a one-byte file holding BUSY_NO or BUSY_YES, mapped shared into the
    process, so marking a request costs no system call (creating and removing a marker file per
    request took 0.3-0.4 ms inside a front's stub, CPU, traced c=1 run; 9 us in a plain process). What
    the process writes into the mapping is what a reader of the file sees, also after the process
    died. Where the file system refuses a shared mapping, each change is one write to the file."""

    def __init__(self, path, pid: int):
        tmp = path.with_name(f".{path.name}.{pid}")
        tmp.write_bytes(BUSY_NO)
        os.replace(tmp, path)  # a fresh marker, never half written
        self.fd: int | None = os.open(path, os.O_RDWR)
        try:
            self.map: mmap.mmap | None = mmap.mmap(self.fd, len(BUSY_NO))
        except (OSError, ValueError):
            self.map = None  # written through the descriptor instead
        else:
            os.close(self.fd)  # the mapping holds the file
            self.fd = None

    def set(self, busy: bool) -> None:
        value = BUSY_YES if busy else BUSY_NO
        if self.map is not None:
            self.map[:] = value
        else:
            os.pwrite(self.fd, value, 0)


def register_stub(args: dict) -> None:
    """Record this stub process under its instance name (called last in every model's
    `initialize`), create its busy marker (BUSY_NO), then freeze the heap built so far
    (`freeze_heap`) and, with STUDIO_TIMING_LOG, log long garbage collections (`watch_gc`)."""
    global _BUSY
    pid = os.getpid()
    path = stubs_dir(args) / args["model_instance_name"]
    _BUSY = _BusyFlag(path.with_name(path.name + BUSY_SUFFIX), pid)
    tmp = path.with_name(f".{path.name}.{pid}")
    tmp.write_text(f"{pid} {process_start_time(pid)}\n")
    os.replace(tmp, path)  # atomic: a reader never sees half a record
    freeze_heap()
    watch_gc(args.get("model_name", path.name))


def is_busy(path) -> bool:
    """Whether the busy marker at `path` says its front was waiting on its engine (False when absent)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(BUSY_YES)) == BUSY_YES
    except OSError:
        return False


#: STUDIO_GC_FREEZE=0 leaves the collector scanning every object (for comparisons).
GC_FREEZE_ENV = "STUDIO_GC_FREEZE"


def freeze_heap() -> None:
    """Move every object alive now (modules, weights' wrappers, compiled code, CUDA graphs: what a
    model builds in `initialize`) out of the garbage collector's reach (`gc.freeze`), so a full
    collection later scans only what requests allocate. Measured without it on the CPU (F5 engine,
    tiny weights, eager): two full collections of 134 and 141 ms, collecting nothing, inside one
    request's parse; the compiled fast path on a GPU holds more objects still (on an H100, though,
    no collection of 1 ms or more ran in the engine during a 64-request run, with or without the
    freeze). Objects frozen here are still freed when their reference count drops; only cycles among
    them are never collected. Called last in `initialize` (through `register_stub`)."""
    from tts.switches import switch_from_env

    if not switch_from_env(GC_FREEZE_ENV, default=True):
        return
    gc.collect()
    gc.freeze()


class BusyMarker:
    """The stub's busy marker says BUSY_YES while a front waits on its engine. Measured in 2.51
    (issue 17): when a front's stub dies during a BLS request, the engine blocks for good in its
    next send to that request; so the server manager reloads the engine too when a dead front was
    busy (`is_busy`)."""

    def __enter__(self):
        if _BUSY is not None:
            _BUSY.set(True)
        return self

    def __exit__(self, *exc):
        if _BUSY is not None:
            _BUSY.set(False)


def read_stub(path) -> tuple[int, int] | None:
    try:
        pid, start = path.read_text().split()
        return int(pid), int(start)
    except (OSError, ValueError):
        return None


def _instance_records(folder, model: str):
    """(instance name, its record or None when unreadable) for each of `model`'s stub records in
    `folder` (names `<model>_<group>_<index>`; another model whose name starts like this one, as
    f5_tts_stream for f5_tts, is skipped)."""
    for path in folder.glob(f"{model}_*"):
        rest = path.name[len(model) + 1:].split("_")
        if len(rest) == 2 and all(part.isdigit() for part in rest):
            yield path.name, read_stub(path)


def dead_instances(folder, model: str) -> list[str]:
    """Instances of `model` whose recorded stub process no longer runs."""
    return sorted(name for name, record in _instance_records(folder, model)
                  if record is None or process_start_time(record[0]) != record[1])


#: (folder, model) -> (the folder's mtime in ns, records) for `engine_records`.
_RECORDS: dict[tuple[str, str], tuple[int, dict]] = {}
#: A folder changed this recently is read again on every call: its mtime comes from a coarse clock
#: (a few ms), so two changes inside one tick leave the same mtime behind.
RECORDS_SETTLE_NS = 1_000_000_000


def engine_records(folder, model: str) -> dict:
    """instance name -> (pid, start time) of `model`'s recorded stubs (do not modify the dict).

    Read again only when the folder changed (a stub registered: its record and marker are written
    aside and moved in, which changes the folder's mtime), else kept: globbing and reading the
    records took ~0.4-0.5 ms of each request inside a front's stub (CPU, traced c=1 run)."""
    now = time.time_ns()  # before the stat: a change after it can only make the folder look newer
    try:
        stamp = os.stat(folder).st_mtime_ns
    except OSError:
        stamp = None
    key = (str(folder), model)
    kept = _RECORDS.get(key)
    if stamp is not None and kept is not None and kept[0] == stamp:
        return kept[1]
    out = {name: record for name, record in _instance_records(folder, model) if record is not None}
    if stamp is not None and now - stamp > RECORDS_SETTLE_NS:
        _RECORDS[key] = (stamp, out)
    else:
        _RECORDS.pop(key, None)
    return out


#: Request keys: a random prefix per process and a counter. A key names a request's cancel marker
#: and its entry in the engine; unique across the server's processes, and no system call per
#: request (uuid4 reads the OS's random source: 0.04-0.2 ms inside a front's stub, CPU).
_KEY_PREFIX = uuid.uuid4().hex[:16]
_KEY_COUNT = itertools.count()


def request_key() -> str:
    """A new request key (32 hex digits or more)."""
    return f"{_KEY_PREFIX}{next(_KEY_COUNT):016x}"


def dead_stub_message(instances: list[str]) -> str:
    """Worded like Triton's own answer for a dead stub, which the studio client recognises."""
    return " ".join(f"Stub process '{name}' is not healthy." for name in instances)


class EngineDied(RuntimeError):
    """The engine instance(s) a front waits on died; the message names them as Triton would."""


class DeadlineExceeded(RuntimeError):
    """A request ran past the request deadline (tts.limits)."""


def pump_responses(bls, on_response, engine: str, folder, deadline: float, check: "CancelCheck | None" = None) -> None:
    """Iterate the BLS request's (decoupled) responses on a helper thread and hand each to
    `on_response` on that same thread (it returns False to stop early), but never wait without end:
    this thread checks every LIVENESS_POLL_S that the engine's stubs still live (EngineDied
    otherwise) and that `deadline` (time.monotonic) has not passed (DeadlineExceeded), and every
    CancelCheck.POLL_S whether the client went away (`check`, which tells the engine; the engine
    then ends the stream); it re-raises what the helper raised. A helper left blocked on a dead
    engine's iterator stays parked; the instance itself is free for the next request. `folder`
    None: no liveness check. `on_response` must not poll `check` (read `check.fired`).

    Why the forwarding happens on the iterating thread: with tritonserver 2.51's Python backend, a
    stub whose main thread sent responses while another thread iterated a BLS response stream
    corrupted its heap and died ("double free or corruption", "malloc(): unsorted double linked list
    corrupted", then "Stub process ... is not healthy"). Reproduced on a CPU with a thread sending
    30 chunks back to back per request to 8 concurrent streaming fronts: the stub died within ~30 s
    with or without the cancel checks; iterating and sending on one thread ran clean. This was the
    mid-request death of streaming fronts seen on the H100s (F5 and Spark).

    The same holds for the helper's last moments: returning from its loop frees the response
    iterator and the last response (the backend's objects) on that thread. So the caller resumes
    (and may send) only once the helper thread has ended (`join`), not when its loop is done: an
    offline front (the H100, 2026-12-08, 1 of 32 requests at c=8) and a streaming one died at that
    point, each with its busy marker already cleared, i.e. after the engine's answer was in.
    EngineDied and DeadlineExceeded leave the helper running (it carries it as `exc.helper`; after
    a deadline the caller cancels, then `settle_helper`). Exceptions to the one-thread rule that
    remain: a cancel sent through BLS (Spark's fronts) goes out from the waiting thread while the
    helper iterates, and a helper whose engine died stays parked in its iterator."""
    failure: list[BaseException] = []

    def pump():
        try:
            for response in bls.exec(decoupled=True):
                if on_response(response) is False:
                    break
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            failure.append(exc)

    on_timeout = _wait_checks(engine, folder, deadline, check)
    helper = threading.Thread(target=pump, daemon=True, name=f"bls-{engine}")
    helper.start()
    wait_s = CancelCheck.POLL_S if check is not None else LIVENESS_POLL_S
    try:
        while True:
            helper.join(wait_s)
            if not helper.is_alive():  # ended, its frame and the thread's references to it released
                break
            on_timeout()
    except (EngineDied, DeadlineExceeded) as exc:
        exc.helper = helper  # still running: `settle_helper` lets it end before the caller sends
        raise
    if failure:
        raise failure[0]


#: How long a front whose request ran past its deadline lets its helper thread end (the engine, told
#: to drop the request, ends its stream within a batch or a decode step) before it sends its error.
HELPER_GRACE_S = 1.0


def settle_helper(exc: BaseException) -> None:
    """After a deadline and the cancel sent to the engine: wait up to HELPER_GRACE_S for the helper
    thread of `pump_responses` to end, so the front's error is not sent while it still iterates.
    (A dead engine's helper never ends: it stays parked, as `pump_responses` says.)"""
    helper = getattr(exc, "helper", None)
    if helper is not None:
        helper.join(HELPER_GRACE_S)


def _wait_checks(engine: str, folder, deadline: float, check: "CancelCheck | None"):
    """What a front does each time its wait on an engine times out: poll `check`, and every
    LIVENESS_POLL_S raise EngineDied if a stub serving the engine now (taken here, before the
    request goes out: a reload replaces the records, but this request stays with the processes that
    took it) is gone, DeadlineExceeded past `deadline`. An engine that records no stubs (e.g.
    another runtime's) is waited on without the liveness check."""
    serving = engine_records(folder, engine) if folder is not None else {}
    next_liveness = [time.monotonic() + LIVENESS_POLL_S]

    def on_timeout() -> None:
        if check is not None:
            check.poll()
        if time.monotonic() < next_liveness[0]:
            return
        next_liveness[0] = time.monotonic() + LIVENESS_POLL_S
        dead = [name for name, (pid, start) in serving.items() if process_start_time(pid) != start]
        if dead:
            raise EngineDied(dead_stub_message(dead)) from None
        if time.monotonic() > deadline:
            raise DeadlineExceeded() from None
    return on_timeout


def deadline_message(engine: str) -> str:
    return (f"the request took longer than the request deadline of {current_limits().request_deadline_s:g} s "
            f"({LIMIT_ENV['request_deadline_s']}) and was stopped")


def request_deadline() -> float:
    return time.monotonic() + current_limits().request_deadline_s


def cancel_dir(args: dict):
    """A folder shared by a model repository's models, for cancel markers (`<repo>/../cancel`)."""
    from pathlib import Path

    folder = Path(args["model_repository"]).resolve().parent.parent / "cancel"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def cancel_via_bls(pb_utils, engine: str, key: str) -> None:
    """Ask an engine to drop request `key` from its running batch (a request carrying only `cancel_key`)."""
    request = pb_utils.InferenceRequest(model_name=engine, inputs=[key_tensor(pb_utils, "cancel_key", key)],
                                        requested_output_names=["waveform", "info"])
    for _ in request.exec(decoupled=True):
        pass


def key_tensor(pb_utils, name: str, key: str):
    return pb_utils.Tensor(name, np.array([[key.encode()]], dtype=np.object_))


def send_final(pb_utils, request, response) -> None:
    """Answer a non-decoupled request through its response sender (`execute` then returns None).

    Measured with the wheel's tritonserver 2.51: a response returned from `execute` reached the
    gRPC client ~27 ms (H100, 2026-11-24) to ~45 ms (H200, 2026-12-02: front done at 125 ms, client
    at 172 ms) after `execute` ended, whatever its size; sent through the sender it arrives ~1-3 ms
    after. Clients see no difference (one response, then the end)."""
    request.get_response_sender().send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


def offline_front(pb_utils, request, engine: str, input_names: list[str], join, extra: list | None = None,
                  on_cancel=None, stubs=None):
    """Call a decoupled engine through BLS, join its chunk responses, return one response (an error
    response when anything fails); the caller answers with `send_final`.

    `on_cancel()` tells the engine when the client goes away (a closed HTTP connection or a
    cancelled gRPC call marks the request cancelled). With `stubs` (the run's stubs folder) the
    wait on the engine is bounded: a dead engine stub ends it within LIVENESS_POLL_S with Triton's
    dead-stub wording, so the client reloads the engine and sends again."""
    try:
        with BusyMarker():
            return _offline_front(pb_utils, request, engine, input_names, join, extra, stubs,
                                  CancelCheck(request, on_cancel))
    except EngineDied as exc:
        return error_response(pb_utils, f"{engine} stopped while serving this request: {exc}")
    except DeadlineExceeded as exc:
        if on_cancel is not None:
            _quietly(on_cancel)
        settle_helper(exc)
        return error_response(pb_utils, deadline_message(engine))
    except Exception as exc:  # noqa: BLE001 - one bad request must not take the instance down
        return error_response(pb_utils, f"{engine} request failed: {exc}")


def _quietly(fn) -> None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - best effort
        print(f"[front] cancel failed: {exc}", flush=True)


def _offline_front(pb_utils, request, engine, input_names, join, extra, stubs, watch):
    t0 = time.perf_counter()
    arrivals = []
    inputs = forward_inputs(pb_utils, request, input_names) + (extra or [])
    inputs.append(pb_utils.Tensor("streaming", np.array([[False]], dtype=bool)))
    bls = pb_utils.InferenceRequest(model_name=engine, inputs=inputs, requested_output_names=["waveform", "info"],
                                    **traced(request))
    chunks, overlaps = [], []
    got: dict = {"info": None, "whole": None, "error": None}

    def collect(response) -> bool:  # on the iterating thread; nothing is sent until it is done
        arrivals.append(ms_since(t0))
        if watch.fired:
            return False
        if response.has_error():
            got["error"] = forward_error(pb_utils, response.error())
            return False
        wav, chunk_info = response_audio(pb_utils, response)
        if wav is not None:
            chunks.append(wav)
            overlaps.append(int(chunk_info.get("overlap_samples", 0)))
            got["info"] = chunk_info
            got["whole"] = response if chunk_info.get("final") and len(chunks) == 1 else None
        return True

    pump_responses(bls, collect, engine, stubs, request_deadline(), watch)
    info, whole = got["info"], got["whole"]
    if watch.fired:
        return error_response(pb_utils, "the client went away; the request was cancelled")
    if got["error"] is not None:
        return got["error"]
    if info is None:
        return error_response(pb_utils, f"{engine} returned no audio")
    if whole is not None:  # the engine joined the request itself (F5): forward its tensors as they are
        out = pb_utils.InferenceResponse(output_tensors=[pb_utils.get_output_tensor_by_name(whole, name)
                                                         for name in ("waveform", "info")])
    else:
        info.update(overlap_samples=0, chunk_index=len(chunks) - 1, final=True)
        out = audio_response(pb_utils, join(chunks, overlaps), info)
    timing_log(f"{engine}:offline_front", arrivals=arrivals, total=ms_since(t0))
    return out


def stream_front(pb_utils, request, engine: str, input_names: list[str], extra: list | None = None,
                 on_cancel=None, stubs=None) -> None:
    """Forward a decoupled engine's chunk responses; audio responses never carry the final flag.

    The engine's responses are forwarded on the thread that iterates them (`pump_responses`: a
    send from this thread meanwhile corrupted the stub's heap); this thread only sends once that
    thread is done, or when the wait ends without it (a dead engine, the deadline; `closed` then
    stops any later forward). When the client closes its stream, `on_cancel()` tells the engine
    (BLS response-iterator cancel is newer than tritonserver 2.51) and forwarding stops. With
    `stubs` the waits are bounded as in `offline_front` (a dead engine ends the stream with its
    dead-stub message).
    """
    final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
    sender = request.get_response_sender()
    inputs = forward_inputs(pb_utils, request, input_names) + (extra or [])
    inputs.append(pb_utils.Tensor("streaming", np.array([[True]], dtype=bool)))
    bls = pb_utils.InferenceRequest(model_name=engine, inputs=inputs, requested_output_names=["waveform", "info"],
                                    **traced(request))
    t0 = time.perf_counter()
    arrivals, sends = [], []
    lock = threading.Lock()
    state = {"closed": False}
    watch = CancelCheck(request, on_cancel)

    def forward(response) -> bool:
        arrivals.append(ms_since(t0))
        with lock:
            if state["closed"] or watch.fired:
                return False
            if response.has_error():
                state["closed"] = True
                sender.send(forward_error(pb_utils, response.error()), flags=final)
                return False
            wav, info = response_audio(pb_utils, response)
            if wav is not None:
                t_send = time.perf_counter()
                sender.send(audio_response(pb_utils, wav, info))
                sends.append(ms_since(t_send))
        return True

    def close(response=None) -> None:
        with lock:
            if state["closed"]:
                return
            state["closed"] = True
        try:
            sender.send(response, flags=final) if response is not None else sender.send(flags=final)
        except Exception:  # noqa: BLE001 - the client may already be gone (cancelled)
            pass

    try:
        with BusyMarker():
            pump_responses(bls, forward, engine, stubs, request_deadline(), watch)
    except EngineDied as exc:
        close(error_response(pb_utils, f"{engine} stopped while serving this request: {exc}"))
        return
    except DeadlineExceeded as exc:
        if on_cancel is not None:
            _quietly(on_cancel)
        settle_helper(exc)
        close(error_response(pb_utils, deadline_message(engine)))
        return
    except Exception as exc:  # noqa: BLE001 - one bad request must not take the instance down
        close(error_response(pb_utils, f"streaming failed: {exc}"))
        return
    close()
    timing_log(f"{engine}:stream_front", arrivals=arrivals, sends=sends, total=ms_since(t0))
