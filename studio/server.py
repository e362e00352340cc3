"""The embedded Triton Inference Server: render the model repository, start, watch, restart, stop.

`python app.py` and `python -m studio serve` start their own `tritonserver` (from PATH, else the
one inside the `nvidia-pytriton` wheel) bound to 127.0.0.1 on free ports. Facts this relies on
(seen with the wheel's tritonserver 2.51): the Python backend stub ignores PYTHONPATH, so each
model adds the project root to sys.path itself from a config parameter; the stub picks the
interpreter whose `bin` is first on PATH and needs that interpreter's shared libpython on
LD_LIBRARY_PATH beside the wheel's `nvidia_pytriton.libs`; stubs can outlive a server killed while
models load, so the server runs in its own process group and the whole group is stopped.

Supervision (issue 17):
- The server never outlives the app: a tiny watchdog shell joins the server's process group and
  reads a pipe whose only writer is this process; when this process ends, however it ends
  (SIGKILL included), the pipe closes and the watchdog stops the whole group. (PR_SET_PDEATHSIG
  would fire when the *thread* that started the server exits, and the server is started and
  restarted from short-lived threads.)
- Every run is recorded in `DATA/runs/registry.json` (under a file lock: several studio processes
  may share a data directory) with the app's and the server's pid and process start time. A new
  run clears only runs whose app is gone: their processes (found by the run folder in their
  command line) are stopped, their shared-memory regions removed.
- Readiness counts only when the server answering is this run's: every model carries a per-run
  `run_id` parameter, compared with the model configuration the server reports.
- The repository (model-control) API is restricted on HTTP and gRPC to a per-run secret header,
  which only this process and its `StudioClient`s know.
- A supervisor thread checks every model instance's stub (each records its pid in `RUN/stubs/`)
  every SUPERVISE_S and reloads a model whose stub died, so even an idle death is repaired
  before the next request; the server itself is restarted when it exits.
"""

from __future__ import annotations

import atexit
import fcntl
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path

from studio.config import PROJECT_ROOT, default_data_dir
from studio.runtimes import RuntimeUnavailable, check_runtime, runtime_models, runtime_values
from studio.weights import FamilyWeights, resolve_check_model, resolve_f5, resolve_spark
from tts import switches

MODELS_SRC = PROJECT_ROOT / "triton_models"

#: Models of each family; a family is served only when all of its model folders exist.
FAMILY_MODELS = {
    "f5": ("f5_engine", "f5_tts", "f5_tts_stream"),
    "spark": ("spark_llm", "spark_tts", "spark_tts_stream"),
    "asr": ("asr",),
    "sim": ("speaker_sim",),
}
#: Optional families for transcript fill and objective checks (`--no-asr` leaves both out).
CHECK_FAMILIES = ("asr", "sim")
#: Front models are weightless CPU models; they need one instance per request served at once
#: (tritonserver 2.51 overlaps requests inside a Python model instance only when it is decoupled).
DEFAULT_FRONT_INSTANCES = 16
MAX_RESTARTS = 3
#: How often the supervisor looks for dead stubs and a dead server, in seconds.
SUPERVISE_S = 1.0
#: A failed reload of a dead model is tried again after this, then after twice as long each time up
#: to RELOAD_RETRY_MAX_S: a load that failed because the machine was busy (a new stub that did
#: not come up while other models loaded beside it, seen on 2 cores) mostly succeeds the next time,
#: and a model left dead for a minute fails every request sent to it meanwhile.
RELOAD_RETRY_S = 5.0
RELOAD_RETRY_MAX_S = 60.0
#: Header (lower case: gRPC metadata) carrying the per-run secret of the repository API over HTTP;
#: over gRPC tritonserver expects it with its protocol prefix.
REPOSITORY_HEADER = "studio-repository-key"
GRPC_REPOSITORY_HEADER = f"triton-grpc-protocol-{REPOSITORY_HEADER}"
#: Seconds a stopped server's group gets between SIGTERM and SIGKILL (the server unloads models,
#: removes its shared-memory regions) and seconds a reload of a dead model may take on the supervisor.
TERM_GRACE_S = 10
#: The watchdog: ignores the signals it sends, waits for EOF on stdin (this process gone), then
#: stops its own process group (the server and its stubs): SIGTERM, up to TERM_GRACE_S for the
#: server ($1) to exit, SIGKILL. Ignored signals stay ignored in `sleep`, so it survives the TERM.
WATCHDOG_SH = ("trap '' TERM INT HUP; read _ignored; kill -TERM 0; i=0; "
               f"while [ $i -lt {TERM_GRACE_S * 2} ] && kill -0 \"$1\" 2>/dev/null; do sleep 0.5; i=$((i+1)); done; "
               "kill -KILL 0")
#: A run's processes name its folder in their command lines; their shared memory is named there too.
SHM_REGION = "triton_python_backend_shm_region_"


class ServerStartError(RuntimeError):
    """The embedded server could not start; the message says why and quotes its log."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_tritonserver() -> tuple[Path, Path | None, Path | None]:
    """(tritonserver binary, python backend dir, wheel libs dir or None). PATH wins over the wheel."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return Path(on_path), None, None
    # find_spec, not import: importing pytriton pulls in gevent, zmq and more that only its own API needs
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.origin:
        raise ServerStartError("no `tritonserver` on PATH and the nvidia-pytriton wheel is not installed "
                               "(pip install nvidia-pytriton==0.7.0)")
    root = Path(spec.origin).parent / "tritonserver"
    return root / "bin" / "tritonserver", root, root.parent.parent / "nvidia_pytriton.libs"


def visible_gpus() -> list[int]:
    """GPU indices visible to this process, without importing torch (nvidia-smi; none on a CPU machine)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    count = sum(1 for line in out.splitlines() if line.startswith("GPU "))
    return list(range(count))


#: STUDIO_TRITON_TRACE=FILE: Triton traces every request's timestamps (gRPC receipt, queue, the
#: model's execute, each BLS child request: `tools/trace_legs.py` splits a request's way through
#: Triton with them) into FILE.0, FILE.1, ... (TRACE_LOG_FREQUENCY traces a file; the last few may
#: be lost at shutdown). A diagnosis tool: off by default, as every traced request costs the server work.
TRACE_ENV = switches.TRACE_ENV
TRACE_LOG_FREQUENCY = 8


def trace_args(path: str) -> list[str]:
    """tritonserver options for STUDIO_TRITON_TRACE (none when `path` is empty)."""
    if not path:
        return []
    return [f"--trace-config=triton,file={path}", f"--trace-config=triton,log-frequency={TRACE_LOG_FREQUENCY}",
            "--trace-config=level=TIMESTAMPS", "--trace-config=rate=1", "--trace-config=count=-1"]


#: STUDIO_ENGINE_QUEUE_DELAY_US overrides the engines' dynamic-batcher delay (microseconds).
QUEUE_DELAY_ENV = "STUDIO_ENGINE_QUEUE_DELAY_US"


def engine_queue_delay_us(gpu: bool, own_thread: bool = False) -> int:
    """The engines' `max_queue_delay_microseconds`. The dynamic batcher holds a lone request for the
    whole delay before it runs it, so at concurrency 1 the delay is pure latency (1.2 ms of queue
    time per request measured with 1000 us on the H200; 0.38 ms with 250 us in a traced H100 run).
    250 us still groups requests whose front ends forward them together; under load the engine is
    busy and requests queue during its execute anyway. An engine that batches on a thread of its
    own (`own_thread`: the F5 engine on a GPU) gains nothing from grouping (its execute only hands
    requests over; the thread batches whatever has arrived), so it gets none. On the CPU, wait
    longer for concurrent requests to arrive through their front ends."""
    from tts.switches import number_from_env

    default = (0 if own_thread else 250) if gpu else 10000
    return int(number_from_env(QUEUE_DELAY_ENV, default, 0, 1_000_000, "microseconds (a whole number)", whole=True))


def engine_instance_group(gpus: list[int], count_per_gpu: int = 1) -> str:
    """Engine models (the ones holding weights): one instance per GPU, or one on the CPU."""
    if gpus:
        return f"[{{ count: {count_per_gpu} kind: KIND_GPU gpus: [{', '.join(map(str, gpus))}] }}]"
    return "[{ count: 1 kind: KIND_CPU }]"


def render_model_repository(dest: Path, families: dict[str, FamilyWeights], *, gpus: list[int],
                            front_instances: int, runtime: str = "torch", engine_per_gpu: int = 1,
                            engines_dir: Path | None = None,
                            run_id: str = "") -> list[str]:
    """Copy each family's model folders into `dest`, filling the `${...}` slots of config.pbtxt.

    Returns the model names written. Unknown slots raise (a template typo must fail loudly).
    """
    dest.mkdir(parents=True, exist_ok=True)
    values = {
        "project_root": str(PROJECT_ROOT),
        "front_instances": str(front_instances),
        "engine_instance_group": engine_instance_group(gpus, engine_per_gpu),
        "runtime": runtime,
        "run_id": run_id,  # readiness checks compare it: the server answering is this run's
        "engine_queue_delay_us": str(engine_queue_delay_us(bool(gpus))),
        "f5_engine_queue_delay_us": str(engine_queue_delay_us(bool(gpus), switches.f5_engine_loop(bool(gpus)))),
    }
    values.update(runtime_values(runtime, engines_dir, families, gpus))  # --runtime trtllm: engine slots
    for fam, weights in families.items():
        values[f"{fam}_demo_weights"] = "true" if weights.demo else "false"
        for key, val in weights.paths.items():
            values[f"{fam}_{key}"] = val
    written = []
    for fam in families:
        for name in FAMILY_MODELS[fam] + runtime_models(runtime, fam):
            src = MODELS_SRC / name
            shutil.copytree(src, dest / name, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            cfg = dest / name / "config.pbtxt"
            cfg.write_text(string.Template(cfg.read_text()).substitute(values))
            written.append(name)
    return written


def available_families() -> list[str]:
    return [fam for fam, names in FAMILY_MODELS.items()
            if all((MODELS_SRC / n / "config.pbtxt").is_file() and (MODELS_SRC / n / "1" / "model.py").is_file()
                   for n in names)]


# --- processes and the run registry ----------------------------------------------------------------
def process_start_time(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (None: no such live process); with the pid it
    names one process even after pid reuse."""
    from triton_models.shared import process_start_time as start_time

    return start_time(pid)


def process_alive(pid: int | None, start: int | None) -> bool:
    return bool(pid) and start is not None and process_start_time(pid) == start


def run_processes(run_dir: Path) -> list[tuple[int, list[str]]]:
    """(pid, argv) of every process whose command line names `run_dir` (a run's server and stubs)."""
    needle = (str(run_dir) + os.sep).encode()  # run-1-2/ must not match run-1-23/
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if any(needle in a for a in argv):
            found.append((int(entry), [a.decode("utf-8", "replace") for a in argv if a]))
    return found


def stop_run_processes(run_dir: Path, grace_s: float = 5.0) -> int:
    """Stop what is left of a run (SIGTERM, then SIGKILL after `grace_s`) and remove the shared-memory
    regions its stubs named. Returns how many processes were found."""
    procs = run_processes(run_dir)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, _ in procs:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 2.0)
        while time.monotonic() < deadline and any(process_start_time(pid) for pid, _ in procs):
            time.sleep(0.1)
    for _, argv in procs:
        for arg in argv:
            if arg.startswith(SHM_REGION) and "/" not in arg:
                try:
                    os.unlink(f"/dev/shm/{arg}")
                except OSError:
                    pass
    return len(procs)


class RunRegistry:
    """`DATA/runs/registry.json`: the runs started on this data directory, each with its app's and
    server's pid and start time. Read and written only under an exclusive lock on
    `registry.lock`, because several studio processes may share the data directory."""

    def __init__(self, runs_dir: Path):
        self.runs_dir = runs_dir
        self.path = runs_dir / "registry.json"

    def _locked(self):
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        fh = open(self.runs_dir / "registry.lock", "a+")
        fcntl.flock(fh, fcntl.LOCK_EX)
        return fh

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write(self, data: dict) -> None:
        tmp = self.path.with_name(f".registry.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)

    def update(self, run: str, **fields) -> None:
        with self._locked():
            data = self._read()
            data.setdefault(run, {}).update(fields)
            self._write(data)

    def remove(self, run: str) -> None:
        with self._locked():
            data = self._read()
            if data.pop(run, None) is not None:
                self._write(data)

    def clear_orphans(self, log) -> set[str]:
        """Stop the leftovers of every run whose app no longer runs; return the runs still live
        (their folders must be kept). Run folders never registered (older versions) count as
        dead when no process names them."""
        with self._locked():
            data = self._read()
            live = set()
            for run, entry in list(data.items()):
                if process_alive(entry.get("app_pid"), entry.get("app_start")):
                    live.add(run)
                    continue
                found = stop_run_processes(self.runs_dir / run)
                if found:
                    log(f"stopped {found} process(es) left by an earlier run ({run}, app pid {entry.get('app_pid')} "
                        "is gone)")
                del data[run]
            self._write(data)
            return live


class TritonServer:
    """One embedded tritonserver process group, with readiness, restart-on-death and log access."""

    def __init__(self, data_dir: Path | None = None, *, http_port: int | None = None, grpc_port: int | None = None,
                 gpus: list[int] | None = None, demo_weights: bool = False, checkpoints: Path | None = None,
                 no_download: bool = False, f5_model: str = "F5TTS_v1_Base", instances: int | None = None,
                 runtime: str = "torch", engines_dir: Path | None = None, bind: str = "127.0.0.1",
                 families: list[str] | None = None, engine_per_gpu: int | None = None, log=None,
                 no_asr: bool = False, metrics_port: int | None = None, require_weights: bool = False):
        self.data_dir = Path(data_dir or default_data_dir()).expanduser()
        self.http_port, self.grpc_port = http_port, grpc_port
        self.gpus = visible_gpus() if gpus is None else list(gpus)
        self.demo_weights, self.checkpoints, self.no_download = demo_weights, checkpoints, no_download
        #: refuse to start on demo weights that were not asked for (a deployment must never serve noise)
        self.require_weights = require_weights or os.environ.get("STUDIO_REQUIRE_WEIGHTS", "0") in ("1", "true")
        self.f5_model = f5_model
        self.front_instances = instances or int(os.environ.get("STUDIO_FRONT_INSTANCES", DEFAULT_FRONT_INSTANCES))
        self._start_env: dict[str, str] | None = None  # os.environ at start(), for every launch it makes
        self.families = families or available_families()
        if no_asr or os.environ.get("STUDIO_NO_ASR", "0") in ("1", "true"):
            self.families = [f for f in self.families if f not in CHECK_FAMILIES]
        #: engine instances per GPU (weights are loaded once per instance); 1 unless measured otherwise
        self.engine_per_gpu = engine_per_gpu or int(os.environ.get("STUDIO_ENGINE_PER_GPU", 1))
        #: torch | trtllm (studio.runtimes); trtllm serves the engines under engines_dir
        self.runtime, self.engines_dir = runtime, Path(engines_dir) if engines_dir else None
        #: where the embedded server listens (--triton-bind); the studio itself talks to 127.0.0.1
        self.bind = bind
        #: Triton's Prometheus metrics on this port at the bind address (--metrics-port); None: disabled
        self.metrics_port = metrics_port
        self._log_fn = log or (lambda msg: print(f"[studio] {msg}", file=sys.stderr, flush=True))
        self._proc: subprocess.Popen | None = None
        self._state, self._message = "stopped", ""
        self._weights: dict[str, FamilyWeights] = {}
        self._lock = threading.Lock()
        self._stopping = False
        self._restarts: list[float] = []
        self.run_dir: Path | None = None
        self.models: list[str] = []
        #: Compared with every model's `run_id` parameter: readiness counts only for this run's server.
        self.run_id = secrets.token_hex(8)
        #: The repository API's per-run secret (load/unload), sent as REPOSITORY_HEADER.
        self.repository_secret = secrets.token_urlsafe(24)
        self._pgid: int | None = None
        self._watchdog: subprocess.Popen | None = None
        self._registry = RunRegistry(self.data_dir / "runs")
        # model -> (monotonic time of its last failed reload, seconds to wait before the next try)
        self._reload_failed: dict[str, tuple[float, float]] = {}
        #: (model, wall time) of every reload the supervisor made, for the Server tab and tests
        self.reloads: list[tuple[str, float]] = []
        atexit.register(self.stop)

    # -- public state -------------------------------------------------------------------------
    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str | None:
        """Triton's Prometheus endpoint, http://HOST:PORT/metrics (None: metrics off). A wildcard bind
        (0.0.0.0, ::) is read through loopback, like the other ports."""
        if not self.metrics_port:
            return None
        host = "127.0.0.1" if self.bind in ("", "0.0.0.0", "::", "[::]") else self.bind
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{self.metrics_port}/metrics"

    @property
    def repository_headers(self) -> dict[str, str]:
        """gRPC metadata the repository (model-control) API requires from this run's clients."""
        return {GRPC_REPOSITORY_HEADER: self.repository_secret}

    @property
    def http_repository_headers(self) -> dict[str, str]:
        """The same over HTTP."""
        return {REPOSITORY_HEADER: self.repository_secret}

    @property
    def log_path(self) -> Path | None:
        return self.run_dir / "tritonserver.log" if self.run_dir else None

    def status(self) -> dict:
        models = {name: self._model_ready(name) for name in self.models} if self._state == "ready" else \
            {name: False for name in self.models}
        return {"state": self._state, "message": self._message, "models": models,
                "demo_weights": {fam: w.demo for fam, w in self._weights.items()},
                "weights": {fam: asdict(w) for fam, w in self._weights.items()},
                "grpc_url": self.grpc_url if self.grpc_port else None, "metrics_url": self.metrics_url,
                "gpus": self.gpus,
                "device": f"cuda:{','.join(map(str, self.gpus))}" if self.gpus else "cpu", "runtime": self.runtime}

    def log_tail(self, n: int = 100) -> list[str]:
        path = self.log_path
        if not path or not path.is_file():
            return []
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 200_000))
            return fh.read().decode("utf-8", "replace").splitlines()[-n:]

    # -- lifecycle ----------------------------------------------------------------------------
    def start_in_background(self, timeout_s: float = 600) -> threading.Thread:
        thread = threading.Thread(target=self._start_quietly, args=(timeout_s,), daemon=True, name="triton-start")
        thread.start()
        return thread

    def _start_quietly(self, timeout_s: float) -> None:
        try:
            self.start(timeout_s)
        except ServerStartError:
            pass  # state and message already say why

    def start(self, timeout_s: float = 600) -> None:
        """Resolve weights, render the repository, launch, and block until every model is ready."""
        with self._lock:
            self._stopping = False
            try:
                # the environment of this start, kept for a supervised restart: a restarted server is
                # the same server (its limits, switches), whatever the caller's environment is by then
                self._start_env = dict(os.environ)
                self._warm_fronts_wanted()  # a bad value is said before anything loads
                self._set("starting", "resolving weights")
                try:  # before any weights move: a missing TensorRT or engine is said at once
                    check_runtime(self.runtime, self.engines_dir, self.families, self.f5_model)
                except RuntimeUnavailable as exc:
                    raise ServerStartError(str(exc)) from None
                self._resolve_weights()
                self._set("starting", "rendering the model repository")
                self._prepare_run_dir()
                self._launch()
                self._wait_ready(timeout_s)
                self._warm_fronts()
            except ServerStartError as exc:
                self._set("failed", str(exc))
                self._kill_group()
                raise
            except Exception as exc:
                self._set("failed", f"{type(exc).__name__}: {exc}")
                self._kill_group()
                raise ServerStartError(self._message) from exc
        threading.Thread(target=self._watch, daemon=True, name="triton-watch").start()

    def stop(self) -> None:
        self._stopping = True
        self._kill_group()
        if self.run_dir is not None:
            self._registry.remove(self.run_dir.name)
        if self._state != "failed":
            self._set("stopped", "stopped")

    # -- internals ----------------------------------------------------------------------------
    def _set(self, state: str, message: str) -> None:
        self._state, self._message = state, message
        if message:
            self._log_fn(message)

    def _resolve_weights(self) -> None:
        ck = self.checkpoints
        if "f5" in self.families and "f5" not in self._weights:
            self._weights["f5"] = resolve_f5(self.data_dir, checkpoints=ck, model_name=self.f5_model,
                                             demo=self.demo_weights, no_download=self.no_download, log=self._log_fn)
        if "spark" in self.families and "spark" not in self._weights:
            self._weights["spark"] = resolve_spark(self.data_dir, checkpoints=ck, demo=self.demo_weights,
                                                   no_download=self.no_download, log=self._log_fn)
        for fam in CHECK_FAMILIES:
            if fam in self.families and fam not in self._weights:
                self._weights[fam] = resolve_check_model(fam, self.data_dir, checkpoints=ck, demo=self.demo_weights,
                                                         no_download=self.no_download, log=self._log_fn)
        for fam, w in self._weights.items():
            if w.demo:
                self._log_fn(f"{fam}: DEMO WEIGHTS (random, they produce noise): {w.reason}")
        missing = {fam: w.reason for fam, w in self._weights.items() if w.demo and not self.demo_weights}
        if self.require_weights and missing:
            raise ServerStartError("real weights are required (--require-weights) but " + "; ".join(
                f"{fam}: {reason}" for fam, reason in sorted(missing.items())))

    def _prepare_run_dir(self) -> None:
        runs = self.data_dir / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        live = self._registry.clear_orphans(self._log_fn)
        old = sorted((p for p in runs.glob("run-*") if p.name not in live), key=lambda p: p.stat().st_mtime)
        for stale in old[:-4]:  # keep a few recent runs' logs, drop the rest (never a live run's)
            if not run_processes(stale):
                shutil.rmtree(stale, ignore_errors=True)
        self.run_dir = runs / f"run-{os.getpid()}-{int(time.time() * 1000)}"
        self._registry.update(self.run_dir.name, app_pid=os.getpid(), app_start=process_start_time(os.getpid()))
        self.models = render_model_repository(self.run_dir / "models", self._weights, gpus=self.gpus,
                                              front_instances=self.front_instances,
                                              runtime=self.runtime, engines_dir=self.engines_dir,
                                              engine_per_gpu=self.engine_per_gpu, run_id=self.run_id)

    def _backend_dir(self, wheel_root: Path | None) -> Path | None:
        """The wheel ships stubs per Python version; the backend folder needs this interpreter's."""
        if wheel_root is None:
            return None
        dest = self.run_dir / "backends" / "python"
        dest.mkdir(parents=True, exist_ok=True)
        src = wheel_root / "backends" / "python"
        for item in src.iterdir():
            if item.is_file() and not (dest / item.name).exists():
                os.symlink(item, dest / item.name)
        ver = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = wheel_root / "python_backend_stubs" / ver / "triton_python_backend_stub"
        if not stub.is_file():
            raise ServerStartError(f"the nvidia-pytriton wheel has no Python backend stub for Python {ver}")
        if not (dest / "triton_python_backend_stub").exists():  # a restart reuses it (stubs may still run it)
            shutil.copy2(stub, dest / "triton_python_backend_stub")
        return dest.parent

    def _libpython_dir(self) -> str:
        """A folder holding only this interpreter's libpython (links), for the stub's LD_LIBRARY_PATH.

        The wheel's stub links against libpython, which lives in sysconfig's LIBDIR. Putting LIBDIR
        itself on LD_LIBRARY_PATH also puts every other library there ahead of the RUNPATHs torch's
        own libraries are found by (LD_LIBRARY_PATH wins over RUNPATH); on the H200 image the
        engines then ran masked attention on the slow memory-efficient kernel instead of cuDNN's
        (2026-12-02: 48 ms of a 118 ms request). Only libpython goes on the path; LIBDIR itself only
        when no libpython file is found there."""
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        names = {sysconfig.get_config_var(k) for k in ("INSTSONAME", "LDLIBRARY")} - {None, ""}
        found = [Path(libdir) / n for n in sorted(names) if n.startswith("libpython") and (Path(libdir) / n).exists()]
        if not found:
            return libdir
        folder = self.run_dir / "libpython"
        folder.mkdir(parents=True, exist_ok=True)
        for src in found:
            link = folder / src.name
            if not link.exists():
                link.symlink_to(src.resolve())
        return str(folder)

    def _launch(self) -> None:
        binary, wheel_root, libs = find_tritonserver()
        backends = self._backend_dir(wheel_root)
        self.http_port = self.http_port or free_port()
        self.grpc_port = self.grpc_port or free_port()
        if self.metrics_port:
            # GPU and CPU metrics as Triton decides (on where it can read them)
            metrics = ["--allow-metrics=true", f"--metrics-address={self.bind}", f"--metrics-port={self.metrics_port}"]
        else:  # off (the default); a free port is named all the same, never the default 8002
            metrics = ["--allow-metrics=false", f"--metrics-port={free_port()}"]
        env = dict(self._start_env if self._start_env is not None else os.environ)
        # The stub runs the interpreter first on PATH; STUDIO_STUB_PYTHON_BIN can name another
        # environment's bin/ (same Python version), e.g. one whose numpy suits the 2.51 stub.
        stub_bin = env.get("STUDIO_STUB_PYTHON_BIN") or os.path.dirname(sys.executable)
        env["PATH"] = stub_bin + os.pathsep + env.get("PATH", "")
        libdirs = [str(libs)] if libs else []
        libdirs.append(self._libpython_dir())
        env["LD_LIBRARY_PATH"] = os.pathsep.join([d for d in libdirs if d] + [env.get("LD_LIBRARY_PATH", "")])
        env["PYTHONUNBUFFERED"] = "1"
        env["STUDIO_DATA_DIR"] = str(self.data_dir)  # the engines' compile caches live under it
        if self.gpus:
            env.setdefault("CUDA_VISIBLE_DEVICES", env.get("CUDA_VISIBLE_DEVICES", ""))
            if not env["CUDA_VISIBLE_DEVICES"]:
                env.pop("CUDA_VISIBLE_DEVICES")
        cmd = [str(binary), f"--model-repository={self.run_dir / 'models'}",
               f"--http-address={self.bind}", f"--grpc-address={self.bind}",
               f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}", *metrics,
               "--log-verbose=0", "--exit-timeout-secs=10",
               "--backend-config=python,shm-default-byte-size=4194304",
               "--backend-config=python,shm-growth-byte-size=4194304",
               # explicit model control with every model loaded at start: the same models as the
               # default mode, plus the repository API, so a front model whose instance's stub died
               # (tritonserver 2.51 does not restart it) can be reloaded alone (studio.client)
               "--model-control-mode=explicit", "--load-model=*",
               # only this process may load or unload models (a reload of a dead stub); the load API
               # also takes file overrides, which would run code in the server
               f"--http-restricted-api=model-repository:{REPOSITORY_HEADER}={self.repository_secret}",
               f"--grpc-restricted-protocol=model-repository:{REPOSITORY_HEADER}={self.repository_secret}"]
        if backends:
            cmd.append(f"--backend-directory={backends}")
        cmd += trace_args(env.get(TRACE_ENV, ""))
        self._set("starting", f"starting tritonserver (gRPC {self.grpc_url}, HTTP {self.http_url}"
                              + (f", metrics {self.metrics_url})" if self.metrics_url else ")"))
        log = open(self.log_path, "ab")
        # A process group of its own (Ctrl-C in a terminal does not reach it; stopping it reaches
        # every stub), in this session so that the watchdog can join it.
        self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, process_group=0,
                                      cwd=self.run_dir)
        log.close()
        self._pgid = self._proc.pid
        self._watchdog = subprocess.Popen(["sh", "-c", WATCHDOG_SH, "studio-watchdog", str(self._proc.pid)],
                                          stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, process_group=self._pgid)
        from studio.client import register_before_reload, register_repository_headers

        register_repository_headers(self.grpc_url, self.repository_headers)
        register_before_reload(self.grpc_url, self.stop_stubs)
        self._registry.update(self.run_dir.name, server_pid=self._proc.pid,
                              server_start=process_start_time(self._proc.pid),
                              grpc_port=self.grpc_port, http_port=self.http_port)

    def _http_ok(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def _model_ready(self, name: str) -> bool:
        return self._http_ok(f"/v2/models/{name}/ready")

    def _is_ours(self) -> bool:
        """Whether the server answering on our port serves this run's repository (run_id parameter)."""
        if not self.models:
            return False
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/models/{self.models[0]}/config", timeout=2) as r:
                config = json.loads(r.read())
        except (OSError, ValueError):
            return False
        return config.get("parameters", {}).get("run_id", {}).get("string_value") == self.run_id

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                tail = "\n".join(self.log_tail(25))
                raise ServerStartError(f"tritonserver exited with code {code} while starting; its log ends:\n{tail}")
            if self._http_ok("/v2/health/ready") and self._is_ours():
                self._set("ready", f"Triton ready at {self.grpc_url} (gRPC), {self.http_url} (HTTP)")
                return
            time.sleep(0.25)
        tail = "\n".join(self.log_tail(25))
        raise ServerStartError(f"tritonserver was not ready after {timeout_s:.0f} s; its log ends:\n{tail}")

    def _warm_fronts_wanted(self) -> bool:
        """Whether to warm the front instances: STUDIO_WARM_FRONTS=0|1 in the start's environment
        (default off: studio.front_warmup says why; ValueError naming the variable for anything else)."""
        from studio.front_warmup import WARM_FRONTS_ENV
        from tts.switches import switch_from_env

        return switch_from_env(WARM_FRONTS_ENV, default=False, env=self._start_env)

    def _warm_fronts(self) -> None:
        """One request through every front instance (studio.front_warmup), when wanted. Never
        fatal: the server is ready and serving already; a warm-up that fails is only logged."""
        from studio.front_warmup import warm_fronts

        if not self._warm_fronts_wanted():
            return
        try:
            warm_fronts(self.grpc_url, list(self.families), self.front_instances, log=self._log_fn)
        except Exception as exc:  # noqa: BLE001 - the server serves without it
            self._log_fn(f"front warm-up failed: {type(exc).__name__}: {exc}")

    def _watch(self) -> None:
        """Reload models whose stub died; restart a server that died on its own (bounded:
        MAX_RESTARTS within 10 minutes)."""
        proc = self._proc
        while proc is not None and not self._stopping:
            if proc.poll() is None:
                time.sleep(SUPERVISE_S)
                if self._state == "ready" and not self._stopping:
                    self._reload_dead_models()
                continue
            if self._stopping:
                return
            now = time.monotonic()
            self._restarts = [t for t in self._restarts if now - t < 600] + [now]
            if len(self._restarts) > MAX_RESTARTS:
                self._set("failed", f"tritonserver died {MAX_RESTARTS + 1} times in 10 minutes; not restarting")
                return
            self._set("starting", f"tritonserver exited with code {proc.returncode}; restarting")
            self._kill_group()
            try:
                with self._lock:
                    self._launch()
                    self._wait_ready(600)
                    self._warm_fronts()
            except ServerStartError as exc:
                self._set("failed", str(exc))
                return
            proc = self._proc

    def dead_instances(self) -> dict[str, list[str]]:
        """model -> its instances whose stub process died (from the stubs' records in RUN/stubs)."""
        from triton_models.shared import dead_instances

        folder = self.run_dir / "stubs" if self.run_dir else None
        if folder is None or not folder.is_dir():
            return {}
        found = {name: dead_instances(folder, name) for name in self.models}
        return {name: dead for name, dead in found.items() if dead}

    def stop_stubs(self, instances: list[str]) -> None:
        """SIGKILL the recorded stub processes of `instances` (e.g. f5_tts_0_3) that still run: called
        before their model is reloaded, because 2.51 crashed when a stub it had declared unhealthy
        resumed after the reload."""
        from triton_models.shared import read_stub

        if self.run_dir is None:
            return
        for inst in instances:
            record = read_stub(self.run_dir / "stubs" / inst)
            if record is not None and process_alive(*record):
                self._log_fn(f"{inst}: declared unhealthy but still running; stopping it before the reload")
                os.kill(record[0], signal.SIGKILL)

    def _reload_dead_models(self) -> None:
        """Reload each model with a dead stub (engines first: fronts wait on them). A model whose
        reload failed is tried again after RELOAD_RETRY_S, doubling up to RELOAD_RETRY_MAX_S."""
        from studio.client import ENGINE_MODELS, StudioClient, SynthesisError

        from triton_models.shared import BUSY_SUFFIX, is_busy, read_stub

        dead = self.dead_instances()
        stubs = self.run_dir / "stubs"
        engines = set(ENGINE_MODELS.values())
        stuck = {}  # engine -> its stub records before the reload (their processes may be blocked)
        for name in list(dead):
            busy = [inst for inst in dead[name] if is_busy(stubs / (inst + BUSY_SUFFIX))]
            engine = next((e for fam, e in ENGINE_MODELS.items() if name in FAMILY_MODELS.get(fam, ())), None)
            if busy and engine and name != engine and engine in self.models:
                # a front died while it waited on its engine: the engine is blocked in a send to it
                self._log_fn(f"{', '.join(busy)} died during a request; {engine} is reloaded too")
                dead.setdefault(engine, [])
                stuck[engine] = [r for r in (read_stub(p) for p in stubs.glob(f"{engine}_*")) if r]
            for inst in busy:
                (stubs / (inst + BUSY_SUFFIX)).unlink(missing_ok=True)
        now = time.monotonic()
        order = sorted(dead, key=lambda name: name not in engines)
        for name in order:
            failed_at, wait_s = self._reload_failed.get(name, (-1e9, 0.0))
            if now - failed_at < wait_s:
                continue
            self._log_fn(f"{', '.join(dead[name])}: stub process died; reloading {name}"
                         if dead[name] else f"reloading {name} (blocked by a front that died)")
            started = time.monotonic()
            try:
                with StudioClient(self.grpc_url, repository_headers=self.repository_headers) as client:
                    client.reload_model(name, failed_at=time.perf_counter(), cause=f"{name} stub died")
            except (SynthesisError, OSError) as exc:
                wait_s = min(RELOAD_RETRY_MAX_S, 2 * wait_s) if wait_s else RELOAD_RETRY_S
                self._reload_failed[name] = (time.monotonic(), wait_s)
                self._log_fn(f"reloading {name} failed (next try in {wait_s:.0f} s): {exc}")
                continue
            self._reload_failed.pop(name, None)
            self.reloads.append((name, time.time()))
            self._log_fn(f"{name} reloaded in {time.monotonic() - started:.1f} s")
            for pid, start in stuck.get(name, []):
                # the replaced engine's blocked stub would hold its memory (GPU memory too) for good
                if process_alive(pid, start):
                    os.kill(pid, signal.SIGKILL)

    def _kill_group(self) -> None:
        proc, pgid, watchdog = self._proc, self._pgid, self._watchdog
        self._watchdog = None
        if watchdog is not None and watchdog.stdin is not None:
            try:
                watchdog.stdin.close()  # the watchdog would stop the group too; we do it here first
            except OSError:
                pass
        if proc is None:
            return
        # The pgid was remembered at launch: a server that already exited (and was reaped) has no
        # pgid to ask for, but its stubs still run in its group (the watchdog keeps it alive).
        if pgid is not None:
            for sig, wait_s in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait_s)
                except subprocess.TimeoutExpired:
                    continue
                # The server is gone; stubs in its group may linger a moment: make sure they go too.
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                break
        if watchdog is not None:
            try:
                watchdog.wait(timeout=5)
            except subprocess.TimeoutExpired:
                watchdog.kill()
        if self.run_dir is not None:
            stop_run_processes(self.run_dir, grace_s=2.0)  # anything that left the group
        self._proc = None
