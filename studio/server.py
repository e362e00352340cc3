"""The embedded Triton Inference Server: render the model repository, start, watch, restart, stop.

`python app.py` and `python -m studio serve` start their own `tritonserver` (from PATH, else the
one inside the `nvidia-pytriton` wheel) bound to 127.0.0.1 on free ports. Facts this relies on
(seen with the wheel's tritonserver 2.51): the Python backend stub ignores PYTHONPATH, so each
model adds the project root to sys.path itself from a config parameter; the stub picks the
interpreter whose `bin` is first on PATH and needs that interpreter's shared libpython on
LD_LIBRARY_PATH beside the wheel's `nvidia_pytriton.libs`; stubs can outlive a server killed while
models load, so the server runs in its own process group and the whole group is stopped.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
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
from studio.weights import FamilyWeights, resolve_f5, resolve_spark

MODELS_SRC = PROJECT_ROOT / "triton_models"

#: Models of each family; a family is served only when all of its model folders exist.
FAMILY_MODELS = {
    "f5": ("f5_engine", "f5_tts", "f5_tts_stream"),
    "spark": ("spark_llm", "spark_tts", "spark_tts_stream"),
}
#: Front models are weightless CPU models; they need one instance per request served at once
#: (tritonserver 2.51 overlaps requests inside a Python model instance only when it is decoupled).
DEFAULT_FRONT_INSTANCES = 16
MAX_RESTARTS = 3


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


def engine_instance_group(gpus: list[int], count_per_gpu: int = 1) -> str:
    """Engine models (the ones holding weights): one instance per GPU, or one on the CPU."""
    if gpus:
        return f"[{{ count: {count_per_gpu} kind: KIND_GPU gpus: [{', '.join(map(str, gpus))}] }}]"
    return "[{ count: 1 kind: KIND_CPU }]"


def render_model_repository(dest: Path, families: dict[str, FamilyWeights], *, gpus: list[int],
                            front_instances: int, runtime: str = "torch", engine_per_gpu: int = 1,
                            engines_dir: Path | None = None) -> list[str]:
    """Copy each family's model folders into `dest`, filling the `${...}` slots of config.pbtxt.

    Returns the model names written. Unknown slots raise (a template typo must fail loudly).
    """
    dest.mkdir(parents=True, exist_ok=True)
    values = {
        "project_root": str(PROJECT_ROOT),
        "front_instances": str(front_instances),
        "engine_instance_group": engine_instance_group(gpus, engine_per_gpu),
        "runtime": runtime,
        # The dynamic batcher holds a lone request for the whole delay before it runs it, so at
        # concurrency 1 the delay is pure latency (1.2 ms of queue time per request measured with
        # 1000 us on the H200). 250 us still groups requests whose front ends forward them together;
        # under load the engine is busy and requests queue during its execute anyway. On the CPU,
        # wait longer for concurrent requests to arrive through their front ends.
        "engine_queue_delay_us": "250" if gpus else "10000",
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


class TritonServer:
    """One embedded tritonserver process group, with readiness, restart-on-death and log access."""

    def __init__(self, data_dir: Path | None = None, *, http_port: int | None = None, grpc_port: int | None = None,
                 gpus: list[int] | None = None, demo_weights: bool = False, checkpoints: Path | None = None,
                 no_download: bool = False, f5_model: str = "F5TTS_v1_Base", instances: int | None = None,
                 runtime: str = "torch", engines_dir: Path | None = None, bind: str = "127.0.0.1",
                 families: list[str] | None = None, engine_per_gpu: int | None = None, log=None):
        self.data_dir = Path(data_dir or default_data_dir()).expanduser()
        self.http_port, self.grpc_port = http_port, grpc_port
        self.gpus = visible_gpus() if gpus is None else list(gpus)
        self.demo_weights, self.checkpoints, self.no_download = demo_weights, checkpoints, no_download
        self.f5_model = f5_model
        self.front_instances = instances or int(os.environ.get("STUDIO_FRONT_INSTANCES", DEFAULT_FRONT_INSTANCES))
        self.families = families or available_families()
        #: engine instances per GPU (weights are loaded once per instance); 1 unless measured otherwise
        self.engine_per_gpu = engine_per_gpu or int(os.environ.get("STUDIO_ENGINE_PER_GPU", 1))
        #: torch | trtllm (studio.runtimes); trtllm serves the engines under engines_dir
        self.runtime, self.engines_dir = runtime, Path(engines_dir) if engines_dir else None
        #: where the embedded server listens (--triton-bind); the studio itself talks to 127.0.0.1
        self.bind = bind
        self._log_fn = log or (lambda msg: print(f"[studio] {msg}", file=sys.stderr, flush=True))
        self._proc: subprocess.Popen | None = None
        self._state, self._message = "stopped", ""
        self._weights: dict[str, FamilyWeights] = {}
        self._lock = threading.Lock()
        self._stopping = False
        self._restarts: list[float] = []
        self.run_dir: Path | None = None
        self.models: list[str] = []
        atexit.register(self.stop)

    # -- public state -------------------------------------------------------------------------
    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def log_path(self) -> Path | None:
        return self.run_dir / "tritonserver.log" if self.run_dir else None

    def status(self) -> dict:
        models = {name: self._model_ready(name) for name in self.models} if self._state == "ready" else \
            {name: False for name in self.models}
        return {"state": self._state, "message": self._message, "models": models,
                "demo_weights": {fam: w.demo for fam, w in self._weights.items()},
                "weights": {fam: asdict(w) for fam, w in self._weights.items()},
                "grpc_url": self.grpc_url if self.grpc_port else None, "gpus": self.gpus,
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
        for fam, w in self._weights.items():
            if w.demo:
                self._log_fn(f"{fam}: DEMO WEIGHTS (random, they produce noise): {w.reason}")

    def _prepare_run_dir(self) -> None:
        runs = self.data_dir / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        old = sorted(runs.glob("run-*"), key=lambda p: p.stat().st_mtime)
        for stale in old[:-4]:  # keep a few recent runs' logs, drop the rest
            shutil.rmtree(stale, ignore_errors=True)
        self.run_dir = runs / f"run-{os.getpid()}-{int(time.time() * 1000)}"
        self.models = render_model_repository(self.run_dir / "models", self._weights, gpus=self.gpus,
                                              front_instances=self.front_instances,
                                              runtime=self.runtime, engines_dir=self.engines_dir,
                                              engine_per_gpu=self.engine_per_gpu)

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
        metrics_port = free_port()
        env = dict(os.environ)
        # The stub runs the interpreter first on PATH; STUDIO_STUB_PYTHON_BIN can name another
        # environment's bin/ (same Python version), e.g. one whose numpy suits the 2.51 stub.
        stub_bin = os.environ.get("STUDIO_STUB_PYTHON_BIN") or os.path.dirname(sys.executable)
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
               f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}", f"--metrics-port={metrics_port}",
               "--allow-metrics=false", "--log-verbose=0", "--exit-timeout-secs=10",
               "--backend-config=python,shm-default-byte-size=4194304",
               "--backend-config=python,shm-growth-byte-size=4194304",
               # explicit model control with every model loaded at start: the same models as the
               # default mode, plus the repository API, so a front model whose instance's stub died
               # (tritonserver 2.51 does not restart it) can be reloaded alone (studio.client)
               "--model-control-mode=explicit", "--load-model=*"]
        if backends:
            cmd.append(f"--backend-directory={backends}")
        self._set("starting", f"starting tritonserver (gRPC {self.grpc_url}, HTTP {self.http_url})")
        log = open(self.log_path, "ab")
        self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                      cwd=self.run_dir)
        log.close()

    def _http_ok(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def _model_ready(self, name: str) -> bool:
        return self._http_ok(f"/v2/models/{name}/ready")

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                tail = "\n".join(self.log_tail(25))
                raise ServerStartError(f"tritonserver exited with code {code} while starting; its log ends:\n{tail}")
            if self._http_ok("/v2/health/ready"):
                self._set("ready", f"Triton ready at {self.grpc_url} (gRPC), {self.http_url} (HTTP)")
                return
            time.sleep(0.25)
        tail = "\n".join(self.log_tail(25))
        raise ServerStartError(f"tritonserver was not ready after {timeout_s:.0f} s; its log ends:\n{tail}")

    def _watch(self) -> None:
        """Restart a server that died on its own (bounded: MAX_RESTARTS within 10 minutes)."""
        proc = self._proc
        while proc is not None and not self._stopping:
            if proc.poll() is None:
                time.sleep(1.0)
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
            except ServerStartError as exc:
                self._set("failed", str(exc))
                return
            proc = self._proc

    def _kill_group(self) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            pgid = os.getpgid(proc.pid)
        except ProcessLookupError:
            pgid = None
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
        self._proc = None
