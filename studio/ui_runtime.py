"""What the page runs against: the Triton server (embedded or external), one shared client, the stores.

The page is built before the server exists (a module-level `demo` must import without starting
anything), so handlers reach everything through one `StudioRuntime`, configured by `app.main()`
(or from the environment on first page load, for `gradio app.py`) and started in the background:
the page comes up at once and shows the server's progress through `status()`.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from studio.config import WEIGHTS_LICENCE, default_checkpoints_dir, default_data_dir
from studio.history import HistoryStore
from studio.metrics import StudioMetrics
from studio.slots import GenerationSlots
from studio.ui_stream import Job, JobRegistry
from studio.voices import SAMPLES_DIR, VoiceLibrary

#: family -> (label, offline Triton model, streaming Triton model)
FAMILIES = {
    "f5": ("F5-TTS", "f5_tts", "f5_tts_stream"),
    "spark": ("Spark-TTS", "spark_tts", "spark_tts_stream"),
}
#: The page polls status every second or so; one answer serves every open page for this long (s).
STATUS_TTL_S = 1.0


@dataclass(frozen=True)
class RuntimeOptions:
    data_dir: Path = field(default_factory=default_data_dir)
    triton_url: str | None = None          # existing server(s): gRPC host:port[,...] or a DNS name; None: embedded
    checkpoints: Path | None = field(default_factory=default_checkpoints_dir)
    demo_weights: bool = False
    no_download: bool = False
    gpus: list[int] | None = None
    http_port: int | None = None
    grpc_port: int | None = None
    f5_model: str = "F5TTS_v1_Base"
    instances: int | None = None            # front-end model instances (requests served at once)
    runtime: str = "torch"                  # torch | trtllm (studio.runtimes)
    engines_dir: Path | None = None          # build_engines output, for runtime trtllm
    triton_bind: str = "127.0.0.1"          # where the embedded Triton server listens
    no_asr: bool = False                     # serve neither speech recognition nor speaker similarity
    metrics_port: int | None = None          # the embedded Triton server's Prometheus port (None: off)
    require_weights: bool = False            # refuse demo weights that were not asked for (deployments)
    #: Bearer token GET /metrics requires (None: only loopback connections read it; studio/metrics.py).
    metrics_token: str | None = field(default_factory=lambda: os.environ.get("STUDIO_METRICS_TOKEN") or None)
    #: Bearer key every /v1 route of the HTTP API requires (None: the API is open, like the page).
    api_key: str | None = field(default_factory=lambda: os.environ.get("STUDIO_API_KEY") or None)

    @classmethod
    def from_env(cls) -> "RuntimeOptions":
        """For `gradio app.py` (no command line): STUDIO_DATA_DIR, STUDIO_TRITON_URL, STUDIO_DEMO_WEIGHTS=1,
        STUDIO_CHECKPOINTS, STUDIO_NO_DOWNLOAD=1."""
        flag = lambda name: os.environ.get(name, "").strip().lower() in ("1", "true", "yes")  # noqa: E731
        return cls(triton_url=os.environ.get("STUDIO_TRITON_URL") or None, demo_weights=flag("STUDIO_DEMO_WEIGHTS"),
                   no_download=flag("STUDIO_NO_DOWNLOAD"))


class NotReady(RuntimeError):
    """The server or the chosen model cannot take a generation now; the message says why."""


class StudioRuntime:
    _shared: "StudioRuntime | None" = None

    @classmethod
    def shared(cls) -> "StudioRuntime":
        """The process's runtime. Gradio's reload mode (`gradio app.py`) re-executes app.py in a
        thread; sharing one runtime keeps that from starting a second Triton server."""
        if cls._shared is None:
            cls._shared = cls()
        return cls._shared

    def __init__(self, options: RuntimeOptions | None = None):
        self.options = options or RuntimeOptions()
        self.server = None  # studio.server.TritonServer when embedded
        self._client = None
        self._lock = threading.Lock()
        self._started = False
        self._status_cache: tuple[float, dict] | None = None
        self._seen_demo: dict[str, bool] = {}  # external servers: learnt from each answer's info
        self._last_log = ""  # the embedded server's latest progress line (downloads, model loading)
        self.jobs = JobRegistry(on_played=self._late_first_sound)
        #: STUDIO_CONCURRENCY generations at once, shared by the page and the HTTP API.
        self.slots = GenerationSlots()
        #: The studio's Prometheus metrics (GET /metrics); the shared client reports every generation.
        self.metrics = StudioMetrics(queue=lambda: (self.slots.waiting, self.slots.running),
                                     limit=lambda: self.slots.limit)
        self._stores()

    def _stores(self) -> None:
        self.voices = VoiceLibrary(self.options.data_dir, SAMPLES_DIR)
        self.history = HistoryStore(self.options.data_dir)

    # -- lifecycle ----------------------------------------------------------------------------
    @property
    def started(self) -> bool:
        return self._started

    def start(self, options: RuntimeOptions | None = None) -> bool:
        """Start the embedded server in the background (or just note the external one), optionally with
        new options. Idempotent: returns False when it had started already."""
        with self._lock:
            if self._started:
                return False
            if options is not None:
                self.options = options
                self._stores()
            self._started = True
            Path(self.options.data_dir).expanduser().mkdir(parents=True, exist_ok=True)
            if self.options.triton_url:
                return True
            from studio.server import TritonServer

            o = self.options
            self.server = TritonServer(o.data_dir, http_port=o.http_port, grpc_port=o.grpc_port, gpus=o.gpus,
                                       demo_weights=o.demo_weights, checkpoints=o.checkpoints,
                                       no_download=o.no_download, f5_model=o.f5_model, instances=o.instances,
                                       runtime=o.runtime, engines_dir=o.engines_dir, bind=o.triton_bind,
                                       log=self._server_log, no_asr=o.no_asr, metrics_port=o.metrics_port,
                                       require_weights=o.require_weights)
            self.server.start_in_background()
            return True

    def _server_log(self, message: str) -> None:
        print(f"[studio] {message}", file=sys.stderr, flush=True)
        self._last_log = message.splitlines()[0] if message else ""

    def stop(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
            if self.server is not None:
                self.server.stop()

    @property
    def url(self) -> str | None:
        if self.options.triton_url:
            return self.options.triton_url
        if self.server is not None and self.server.grpc_port:
            return self.server.grpc_url
        return None

    def client(self):
        """The shared client (thread-safe): a StudioClient, or a ServerPool when --triton-url names several
        servers (studio/pool.py); NotReady before the server has an address."""
        url = self.url
        if url is None:
            raise NotReady("the Triton server has not started yet")
        with self._lock:
            if self._client is None or self._client.url != url:
                from studio.pool import connect

                if self._client is not None:
                    self._client.close()
                try:
                    self._client = connect(url, observer=self.metrics.observe)
                except ValueError as exc:
                    raise NotReady(f"--triton-url: {exc}") from None
            return self._client

    def allowed_paths(self) -> list[str]:
        """Folders Gradio may serve directly: only the shipped sample voices. Nothing of the data folder
        is listed (a guessed path would expose it, e.g. batch outputs to a listening-test rater):
        handlers hand the page cache copies instead (`studio/ui_files.py`)."""
        return [str(SAMPLES_DIR.resolve())]

    # -- state for the page -------------------------------------------------------------------
    def status(self) -> dict:
        """Server state, per-family readiness and weights, cached STATUS_TTL_S for all pages.

        {"state": "not started" | "starting" | "ready" | "failed" | "stopped" | "unreachable",
         "message": str, "url": str | None, "external": bool, "device": str, "runtime": str,
         "families": {family: {"label", "served", "offline", "streaming", "demo": bool | None, "licence"}}}
        """
        now = time.monotonic()
        cached = self._status_cache
        if cached and now - cached[0] < STATUS_TTL_S:
            return cached[1]
        st = self._compute_status()
        self._status_cache = (now, st)
        return st

    def invalidate_status(self) -> None:
        self._status_cache = None

    def _compute_status(self) -> dict:
        fams = {f: {"label": label, "served": False, "offline": False, "streaming": False, "demo": None,
                    "licence": WEIGHTS_LICENCE.get(f, "")} for f, (label, _, _) in FAMILIES.items()}
        out = {"state": "not started", "message": "the server starts when the studio launches", "url": self.url,
               "external": bool(self.options.triton_url), "device": "unknown", "runtime": "unknown",
               "families": fams}
        if self.options.triton_url:
            if not self._started:
                return out
            client = None
            try:
                client = self.client()
                ready = client.server_ready()
            except Exception as exc:  # noqa: BLE001 - an unreachable server is a state, not a crash
                ready, out["message"] = False, f"cannot reach {self.options.triton_url}: {exc}"
            if hasattr(client, "servers"):  # several servers (studio/pool.py): each one's state and share
                out["servers"] = client.servers()
            if not ready:
                out.update(state="unreachable", message=out["message"] if out["message"].startswith("cannot")
                           else f"no ready Triton server answers at {self.options.triton_url} (gRPC)")
                return out
            out.update(state="ready", message=f"external Triton server at {self.options.triton_url} (gRPC)")
            if "servers" in out:
                out["message"] = (f"external Triton servers at {self.options.triton_url} (gRPC): "
                                  f"{sum(s['state'] == 'ready' for s in out['servers'])} of {len(out['servers'])} "
                                  "ready")
            for f, (_, off, stream) in FAMILIES.items():
                fams[f]["offline"], fams[f]["streaming"] = client.model_ready(off), client.model_ready(stream)
                fams[f]["served"] = fams[f]["offline"] or fams[f]["streaming"]
                fams[f]["demo"] = self._seen_demo.get(f)
            return out
        if self.server is None:
            return out
        st = self.server.status()
        message = st.get("message", "")
        if st["state"] == "starting" and self._last_log and self._last_log not in message:
            message = f"{message}: {self._last_log}"  # e.g. which checkpoint file is downloading
        out.update(state=st["state"], message=message, device=st.get("device", "unknown"),
                   runtime=st.get("runtime", "unknown"), weights=st.get("weights", {}))
        models = st.get("models", {})
        planned = getattr(self.server, "families", list(FAMILIES))
        for f, (_, off, stream) in FAMILIES.items():
            fams[f]["served"] = f in planned
            fams[f]["offline"], fams[f]["streaming"] = bool(models.get(off)), bool(models.get(stream))
            fams[f]["demo"] = st.get("demo_weights", {}).get(f)
        return out

    def require(self, family: str, stream: bool) -> None:
        """Raise NotReady with what the user can do when `family` cannot take a request in this mode."""
        st = self.status()
        fam = st["families"][family]
        label = fam["label"]
        if st["state"] in ("not started", "starting"):
            raise NotReady(f"The Triton server is still starting ({st['message']}). {label} will be ready "
                           "shortly; the banner at the top shows progress.")
        if st["state"] in ("failed", "stopped", "unreachable"):
            raise NotReady(f"The Triton server is not available: {st['message']}. See the Server tab for its log.")
        if not fam["served"]:
            raise NotReady(f"{label} is not served by this Triton server (its models are missing from the "
                           "model repository). Choose the other model.")
        if not fam["streaming" if stream else "offline"]:
            raise NotReady(f"{label} {'streaming' if stream else 'offline'} is not ready on the server yet; "
                           "try again in a moment or see the Server tab.")

    def note_demo(self, family: str, demo: bool) -> None:
        self._seen_demo[family] = bool(demo)

    def log_tail(self, n: int = 200) -> list[str]:
        if self.server is None:
            return []
        return self.server.log_tail(n)

    # -- jobs ---------------------------------------------------------------------------------
    def _late_first_sound(self, job: Job) -> None:
        """The browser's first-sound report came after the history row was written: append it."""
        if job.record_id and job.played:
            self.history.update(job.record_id, metrics=dict(job.played))
