"""The studio's own Prometheus metrics, served at GET /metrics on the page's web app.

Every generation the studio sends to Triton passes `StudioClient.synthesize`; the runtime's client
reports each one here when it ends (`StudioMetrics.observe`, the client's `observer`). What is
exported (names as Prometheus sees them; `family` f5|spark, `mode` offline|streaming):

    studio_generations_total{family,mode,outcome}      outcome ok|error|cancelled
    studio_generation_latency_seconds{family,mode}     histogram of latency_s (DESIGN.md "Metrics"), ok only
    studio_generation_first_chunk_seconds{family,mode} histogram of first_chunk_s (offline: = latency), ok only
    studio_generation_rtf{family,mode}                 histogram of rtf = latency_s / audio_s, ok only
    studio_audio_seconds_total{family,mode}            seconds of audio produced, ok only
    studio_queue_depth{state}                          generations waiting for a slot / running (studio.slots)
    studio_generation_slots                            generations allowed at once (STUDIO_CONCURRENCY)

Each `StudioMetrics` has its own `CollectorRegistry` (never prometheus_client's global one), so two
apps or tests in one process keep separate counts. Generations refused before they reach Triton
(429, a bad request, stopped while waiting for a slot) are not counted: they show in the queue gauge
while they wait. Who may read /metrics: see `metrics_allowed`. No torch here.
"""

from __future__ import annotations

import ipaddress
import secrets
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

#: The route, on the page's own port (outside /v1: it is no part of the OpenAI-style API).
METRICS_PATH = "/metrics"
#: Prometheus's text format 0.0.4: every Prometheus version reads it (prometheus_client's own
#: CONTENT_TYPE_LATEST is 1.0.0 from 0.22 on, which older servers do not know; the body is the same).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

FAMILIES = ("f5", "spark")
MODES = ("offline", "streaming")
OUTCOMES = ("ok", "error", "cancelled")

#: Latency edges (s): a short offline request on the GPU answers in ~0.05-0.1 s; long texts on the CPU
#: take minutes, up to the request deadline (STUDIO_REQUEST_DEADLINE_S, 600 s by default).
LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0)
#: First-chunk edges (s): finer at the low end, where streaming's goal lies (Spark's first 50 tokens,
#: F5's first clause: tens of milliseconds on the GPU); offline requests land with their latency.
FIRST_CHUNK_BUCKETS_S = (0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)
#: RTF edges (latency / audio seconds, no unit): ~0.005 on the H100/H200 up to above 1 on a CPU (slower
#: than real time), so roughly two edges per decade from 0.002 to 20; 1.0 marks real time.
RTF_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0)


class StudioMetrics:
    """The studio's metrics in a registry of their own. `queue()` returns (waiting, running) generations
    and `limit()` the slots at once; both are read at every scrape."""

    def __init__(self, queue: Callable[[], tuple[int, int]] | None = None, limit: Callable[[], int] | None = None):
        self.registry = CollectorRegistry()
        labels = ("family", "mode")
        self.generations = Counter("studio_generations", "Generations sent to Triton, by how they ended",
                                   (*labels, "outcome"), registry=self.registry)
        self.latency = Histogram("studio_generation_latency_seconds",
                                 "Request sent to last audio received, finished generations", labels,
                                 buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.first_chunk = Histogram("studio_generation_first_chunk_seconds",
                                     "Request sent to first audio received (offline: the latency)", labels,
                                     buckets=FIRST_CHUNK_BUCKETS_S, registry=self.registry)
        self.rtf = Histogram("studio_generation_rtf", "Real-time factor, latency / audio seconds", labels,
                             buckets=RTF_BUCKETS, registry=self.registry)
        self.audio = Counter("studio_audio_seconds", "Seconds of audio produced", labels, registry=self.registry)
        # Every series exists from the start at 0, so rate() and increase() see the first generation.
        for fam in FAMILIES:
            for mode in MODES:
                for outcome in OUTCOMES:
                    self.generations.labels(fam, mode, outcome)
                for metric in (self.latency, self.first_chunk, self.rtf, self.audio):
                    metric.labels(fam, mode)
        depth = Gauge("studio_queue_depth", "Generations waiting for a slot, and running (holding one)",
                      ("state",), registry=self.registry)
        self._queue = queue or (lambda: (0, 0))
        depth.labels("waiting").set_function(lambda: self._queue()[0])
        depth.labels("running").set_function(lambda: self._queue()[1])
        slots = Gauge("studio_generation_slots", "Generations allowed at once (STUDIO_CONCURRENCY)",
                      registry=self.registry)
        slots.set_function(limit or (lambda: 0))

    def observe(self, family: str, stream: bool, outcome: str, result=None) -> None:
        """One generation ended: `outcome` ok|error|cancelled; `result` (a SynthResult) when ok."""
        if family not in FAMILIES or outcome not in OUTCOMES:
            raise ValueError(f"unknown family or outcome: {family!r}, {outcome!r}")
        mode = MODES[bool(stream)]
        self.generations.labels(family, mode, outcome).inc()
        if outcome != "ok" or result is None:
            return
        self.latency.labels(family, mode).observe(result.latency_s)
        self.first_chunk.labels(family, mode).observe(result.first_chunk_s)
        if result.audio_s > 0:  # an empty result has no real-time factor (rtf is inf)
            self.rtf.labels(family, mode).observe(result.rtf)
            self.audio.labels(family, mode).inc(result.audio_s)

    def render(self) -> bytes:
        """The registry in Prometheus's text format (CONTENT_TYPE)."""
        return generate_latest(self.registry)


# --- who may read it ------------------------------------------------------------------------------
def is_loopback(host: str | None) -> bool:
    try:
        return ipaddress.ip_address((host or "").split("%")[0]).is_loopback
    except ValueError:
        return host == "localhost"


def metrics_allowed(token: str | None, client_host: str | None, authorization: str) -> tuple[bool, str]:
    """(allowed, why not). With a token (--metrics-token / STUDIO_METRICS_TOKEN) only `Authorization:
    Bearer TOKEN` reads the metrics, from anywhere. Without one, only connections from this machine's
    loopback do (a local Prometheus or agent); the page's --auth login is not asked for, since
    scrapers cannot log in. Behind a reverse proxy on this machine, uvicorn takes the client from the
    proxy's X-Forwarded-For, so forwarded outside requests are refused too."""
    if token:
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() == "bearer" and secrets.compare_digest(given.strip().encode(), token.encode()):
            return True, ""
        return False, "send 'Authorization: Bearer TOKEN' with the studio's --metrics-token"
    if is_loopback(client_host):
        return True, ""
    return False, ("the studio's metrics answer only this machine's loopback unless it was started with "
                   "--metrics-token (STUDIO_METRICS_TOKEN); then send 'Authorization: Bearer TOKEN'")


def metrics_routes(rt) -> list:
    """GET /metrics over runtime `rt` (its `metrics` and `options.metrics_token`), for the page's app."""
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    async def metrics(request):
        token = getattr(rt.options, "metrics_token", None)
        allowed, why = metrics_allowed(token, request.client.host if request.client else None,
                                       request.headers.get("authorization", ""))
        if not allowed:
            headers = {"WWW-Authenticate": "Bearer"} if token else {}
            return PlainTextResponse(why + "\n", status_code=401 if token else 403, headers=headers)
        return Response(rt.metrics.render(), media_type=CONTENT_TYPE)

    return [Route(METRICS_PATH, metrics, methods=["GET"])]


__all__ = ["CONTENT_TYPE", "FIRST_CHUNK_BUCKETS_S", "LATENCY_BUCKETS_S", "METRICS_PATH", "RTF_BUCKETS",
           "StudioMetrics", "metrics_allowed", "metrics_routes"]
