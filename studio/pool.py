"""Several Triton servers behind one client: spread requests, keep streams, fail over before audio.

`connect(spec)` is how the studio opens its Triton client. `spec` is `--triton-url`:

- one literal address (`127.0.0.1:8001`, `[::1]:8001`, `localhost:8001`): a plain `StudioClient`,
  exactly the single-server behaviour (a dead instance is reloaded and the request sent again);
- a comma list (`host1:8001,host2:8001`) and/or a DNS name (`triton-headless:8001`, which a
  Kubernetes headless Service resolves to one address per ready pod): a `ServerPool`, one
  `StudioClient` per address, names resolved again every RESOLVE_S.

A `ServerPool` offers the methods the studio calls on a `StudioClient`. Per request it takes the
ready server (server and model readiness, polled every HEALTH_POLL_S) with the fewest requests in
flight, the least recently chosen one among equals. A request that fails on a server before any
audio reached the caller (unreachable, connection lost, a dead model instance) is sent to the next
server at once; a stream that already delivered audio stays on its server and ends with a message
naming it. A dead instance on a server whose repository key this process knows (a server it
started) is reloaded there in the background. A server whose new requests fail
FAILURES_TO_SET_ASIDE times in a row is set aside for a back-off (doubling up to MAX_SET_ASIDE_S),
then tried again. Per-server counters feed the Server tab and `studio bench`.
"""

from __future__ import annotations

import copy
import ipaddress
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from studio.client import (RELOAD_TIMEOUT_S, TRITON_MODELS, GenerationCancelled, StudioClient, SynthesisError,
                           SynthResult, _repository_headers, clean_message, dead_stub_model, family_of,
                           triton_model_name)

#: Port of an address given without one: Triton's default gRPC port.
DEFAULT_GRPC_PORT = 8001
#: How often each server (and each model of POLLED_MODELS) is asked whether it is ready, in seconds.
HEALTH_POLL_S = 2.0
#: Time limit of one readiness question: an unreachable host must not hold its poll up (s).
HEALTH_TIMEOUT_S = 1.0
#: How often a DNS name is resolved again, in seconds (a headless Service's addresses change as pods
#: come and go; a removed pod's address fails over meanwhile, so this bounds only how soon new pods get work).
RESOLVE_S = 30.0
#: Longest wait between gRPC's reconnection attempts to a server that went away (gRPC's default grows
#: to 120 s, so a server back after a long outage would stay unseen that long).
RECONNECT_BACKOFF_S = 2.0
#: New requests failing in a row on one server (as server faults) that set it aside.
FAILURES_TO_SET_ASIDE = 3
#: A set-aside server's first back-off (s); it doubles each time the server fails again after it,
#: up to MAX_SET_ASIDE_S. After the back-off the server takes requests again when it reports ready.
SET_ASIDE_S = 10.0
MAX_SET_ASIDE_S = 120.0
#: Models whose readiness is polled: the front models of both families and the check models.
POLLED_MODELS = tuple(m for pair in TRITON_MODELS.values() for m in pair) + ("asr", "speaker_sim")

#: gRPC statuses that mean the server failed, not the request: unreachable, the connection lost, or
#: the call ended by the server (the caller's own cancel raises GenerationCancelled instead).
_FAULT_STATUSES = ("StatusCode.UNAVAILABLE", "StatusCode.CANCELLED")
#: An INTERNAL status can also be a lost connection.
_LOST_CONNECTION = re.compile(r"Socket closed|RST_STREAM|Connection reset|Broken pipe|Stream removed", re.I)
#: A server that is up but cannot take this model now (not loaded there, or loading).
_MODEL_UNAVAILABLE = re.compile(r"Request for unknown model|is not at ready state|has no available versions")


def server_fault(exc: BaseException) -> str | None:
    """What a failed call says about its server: 'unreachable', 'dead instance', 'model unavailable',
    or None when the request itself failed (a bad input, a deadline): another server would fail it too."""
    if not isinstance(exc, SynthesisError):
        return None
    message = str(exc)
    if dead_stub_model(message):
        return "dead instance"
    if exc.status in _FAULT_STATUSES:
        return "unreachable"
    if exc.status == "StatusCode.INTERNAL" and _LOST_CONNECTION.search(message):
        return "unreachable"
    if _MODEL_UNAVAILABLE.search(message):
        return "model unavailable"
    return None


# --- addresses -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One comma-separated part of `--triton-url`."""

    host: str  # name or IP literal (IPv6 without brackets)
    port: int
    literal: bool  # an IP address or `localhost`: used as given, never resolved

    @property
    def text(self) -> str:
        return join_address(self.host, self.port)


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_literal(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def parse_spec(spec: str) -> list[Entry]:
    """`host:port[,host:port...]` as entries (a missing port is DEFAULT_GRPC_PORT); ValueError says what is wrong."""
    entries: list[Entry] = []
    for part in (spec or "").split(","):
        part = part.strip()
        if not part:
            continue
        if part.startswith("["):  # [IPv6]:port
            host, _, rest = part[1:].partition("]")
            port_text = rest[1:] if rest.startswith(":") else ""
            if rest and not rest.startswith(":"):
                raise ValueError(f"cannot read the Triton address {part!r}; write [IPv6]:PORT")
        elif part.count(":") > 1:  # a bare IPv6 address, no port
            host, port_text = part, ""
        else:
            host, _, port_text = part.partition(":")
        if "://" in part or "/" in host or not host:
            raise ValueError(f"cannot read the Triton address {part!r}; write HOST:PORT (gRPC), without a scheme")
        try:
            port = int(port_text) if port_text else DEFAULT_GRPC_PORT
        except ValueError:
            raise ValueError(f"the Triton address {part!r} has no port number after its host") from None
        if not 0 < port < 65536:
            raise ValueError(f"the Triton address {part!r} has port {port}, outside 1-65535")
        entry = Entry(host, port, _is_literal(host))
        if entry not in entries:
            entries.append(entry)
    if not entries:
        raise ValueError("no Triton address given; write HOST:PORT, several separated by commas, or a DNS name")
    return entries


def resolve_addresses(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to (getaddrinfo), IPv4 ones when there are any: a dual-stack name
    would otherwise count each server twice. Raises OSError (socket.gaierror) when it does not resolve."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    v4 = [i[4][0] for i in infos if i[0] == socket.AF_INET]
    v6 = [i[4][0] for i in infos if i[0] == socket.AF_INET6]
    return list(dict.fromkeys(v4 or v6))


def connect(spec: str, repository_headers: dict | None = None,
            resolver: Callable[[str, int], list[str]] | None = None, observer: Callable | None = None,
            **pool_options):
    """The studio's client for `--triton-url`: a `StudioClient` for one literal address, else a `ServerPool`.

    repository_headers: the repository-API key of the server(s) (a pool otherwise uses the keys the
    embedded servers of this process registered, per address). resolver(host, port) -> addresses
    replaces DNS (tests). observer: told of each generation (StudioClient's; once per request, not per
    server tried). pool_options: ServerPool's keyword arguments. ValueError for an unreadable spec.
    """
    entries = parse_spec(spec)
    if len(entries) == 1 and entries[0].literal:
        return StudioClient(spec.strip(), repository_headers=repository_headers, observer=observer)
    return ServerPool(spec, repository_headers=repository_headers, resolver=resolver, observer=observer,
                      **pool_options)


def _member_client(url: str, repository_headers: dict | None = None) -> StudioClient:
    return StudioClient(url, repository_headers=repository_headers, max_reconnect_backoff_s=RECONNECT_BACKOFF_S)


def is_pool(client) -> bool:
    return isinstance(client, ServerPool)


# --- the pool --------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Server:
    """One Triton server of a pool, with its readiness and this pool's counters for it."""

    url: str  # gRPC host:port
    source: str  # the --triton-url part it came from (a DNS name, or the address itself)
    client: StudioClient
    ready: bool | None = None  # None: not asked yet
    models: dict = field(default_factory=dict)  # model -> ready, from the last poll
    polled_at: float | None = None  # monotonic
    sent: int = 0  # requests (attempts) sent to it
    ok: int = 0
    failed: int = 0  # server faults: unreachable, a dead instance, the model unavailable
    errors: int = 0  # requests it refused or failed for their own reasons (bad input, deadline, cancel)
    outstanding: int = 0
    failed_over: int = 0  # requests it failed that another server then served
    fails_in_row: int = 0
    last_fault_at: float = float("-inf")  # monotonic
    aside_until: float = 0.0  # monotonic; set aside until then
    aside_s: float = 0.0  # the current back-off (0: not set aside since its last success)
    last_error: str = ""
    picked: int = 0  # pick order, for round robin among equals
    leaving: bool = False  # its name no longer resolves to it: no new requests, closed when idle
    wake: threading.Event = field(default_factory=threading.Event)

    def state(self, now: float) -> str:
        if self.leaving:
            return "leaving"
        if self.aside_until > now:
            return "set aside"
        return {None: "unknown", True: "ready", False: "not ready"}[self.ready]


class ServerPool:
    """Several Triton servers used as one (see the module docstring). Thread-safe; close() when done."""

    def __init__(self, spec: str, *, repository_headers: dict | None = None,
                 resolver: Callable[[str, int], list[str]] | None = None,
                 client_factory: Callable[..., StudioClient] | None = None, poll_s: float = HEALTH_POLL_S,
                 resolve_s: float = RESOLVE_S, set_aside_s: float = SET_ASIDE_S, watch: bool = True,
                 observer: Callable[[str, bool, str, SynthResult | None], None] | None = None):
        """watch=False: no background threads (tests call poll_now() and resolve_now() themselves).
        observer(family, stream, outcome, result): as StudioClient's, once per synthesize call."""
        self.url = spec.strip()
        self.observer = observer
        self.entries = parse_spec(spec)
        self._resolver = resolver or resolve_addresses
        self._headers = dict(repository_headers) if repository_headers else None
        self._factory = client_factory or _member_client
        self.poll_s, self.resolve_s, self.set_aside_s = poll_s, resolve_s, set_aside_s
        self._lock = threading.Lock()
        self._servers: dict[str, Server] = {}
        self._leaving: list[Server] = []
        self._picks = 0
        self._closed = False
        self._stop = threading.Event()
        self._watch = watch
        self.resolve_error = ""
        self.resolved_at: float | None = None
        self.resolve_now()
        if watch and any(not e.literal for e in self.entries):
            threading.Thread(target=self._resolve_loop, daemon=True, name="pool-resolve").start()

    # -- lifecycle ----------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the background threads and close every server's client (cancels streams still running)."""
        with self._lock:
            self._closed = True
            servers = list(self._servers.values()) + self._leaving
            self._leaving = []
        self._stop.set()
        for s in servers:
            s.wake.set()
            s.client.close()

    def __enter__(self) -> "ServerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this ServerPool is closed")

    def __repr__(self) -> str:
        return f"ServerPool({self.url!r}, servers={list(self._servers)})"

    # -- addresses ----------------------------------------------------------------------------------
    def resolve_now(self) -> None:
        """Resolve every name again: new addresses join, vanished ones leave (closed once idle). A name
        that does not resolve keeps its earlier addresses (a DNS hiccup must not empty the pool)."""
        wanted: dict[str, str] = {}
        errors = []
        for e in self.entries:
            if e.literal:
                wanted.setdefault(e.text, e.text)
                continue
            try:
                found = [join_address(a, e.port) for a in self._resolver(e.host, e.port)]
            except OSError as exc:
                errors.append(f"{e.host} does not resolve ({exc})")
                found = [s.url for s in self._servers.values() if s.source == e.text]
            if not found and not errors:
                errors.append(f"{e.host} resolves to no address")
            for url in found:
                wanted.setdefault(url, e.text)
        with self._lock:
            if self._closed:
                return
            new = [url for url in wanted if url not in self._servers]
        created = {url: Server(url, wanted[url], self._factory(url, repository_headers=self._headers)) for url in new}
        with self._lock:
            for url, server in created.items():
                self._servers[url] = server
                if self._watch:
                    threading.Thread(target=self._watch_server, args=(server,), daemon=True,
                                     name=f"pool-health-{url}").start()
            for url in [u for u in self._servers if u not in wanted]:
                gone = self._servers.pop(url)
                gone.leaving = True
                self._leaving.append(gone)
            self.resolve_error = "; ".join(errors)
            self.resolved_at = time.monotonic()
        self._close_idle_leavers()

    def _close_idle_leavers(self) -> None:
        with self._lock:
            idle = [s for s in self._leaving if s.outstanding == 0]
            self._leaving = [s for s in self._leaving if s.outstanding > 0]
        for s in idle:
            s.wake.set()
            s.client.close()

    def _resolve_loop(self) -> None:
        while not self._stop.wait(self.resolve_s):
            try:
                self.resolve_now()
            except Exception as exc:  # noqa: BLE001 - the loop must outlive a bad answer
                self.resolve_error = f"resolving failed: {exc}"

    # -- health -------------------------------------------------------------------------------------
    def poll_now(self) -> None:
        """Ask every server, and its models, whether it is ready (in parallel; each question bounded)."""
        threads = [threading.Thread(target=self._probe, args=(s,), daemon=True) for s in self._snapshot()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(HEALTH_TIMEOUT_S * (len(POLLED_MODELS) + 1) + 1)
        self._close_idle_leavers()

    def _snapshot(self) -> list[Server]:
        with self._lock:
            return list(self._servers.values())

    def _probe(self, s: Server) -> None:
        try:
            ready = s.client.server_ready(timeout_s=HEALTH_TIMEOUT_S)
            models = {m: s.client.model_ready(m, timeout_s=HEALTH_TIMEOUT_S) for m in POLLED_MODELS} if ready else {}
        except RuntimeError:  # closed meanwhile
            return
        with self._lock:
            s.ready, s.models, s.polled_at = ready, models, time.monotonic()

    def _watch_server(self, s: Server) -> None:
        while not self._closed and not s.leaving:
            self._probe(s)
            s.wake.wait(self.poll_s)
            s.wake.clear()

    # -- choosing and accounting --------------------------------------------------------------------
    def _take(self, model: str, tried: set[str]) -> tuple[Server | None, int]:
        """The server for the next attempt and how many other candidates remain; counts it as sent.

        Candidates: servers not tried yet, not set aside, not known to be down, whose `model` is not
        known to be unready. When there are none, the others are tried anyway (their readiness may be
        stale; a request then fails with each server's own reason)."""
        with self._lock:
            self._check_open()
            now = time.monotonic()
            left = [s for s in self._servers.values() if s.url not in tried]
            good = [s for s in left if s.aside_until <= now and s.ready is not False
                    and s.models.get(model) is not False]
            pool = good or left
            if not pool:
                return None, 0
            # known ready first, then the fewest in flight, then the least recently chosen
            pool.sort(key=lambda s: (not (s.ready and s.models.get(model)), s.aside_until > now, s.outstanding,
                                     s.picked))
            chosen = pool[0]
            self._picks += 1
            chosen.picked, chosen.sent, chosen.outstanding = self._picks, chosen.sent + 1, chosen.outstanding + 1
            return chosen, len(pool) - 1

    def _begin(self, s: Server) -> None:
        with self._lock:
            s.sent += 1
            s.outstanding += 1

    def _finish(self, s: Server, began: float, outcome: str, message: str = "", model: str = "") -> None:
        """outcome: 'ok', 'error' (the request's own), or a server_fault() kind."""
        with self._lock:
            s.outstanding -= 1
            now = time.monotonic()
            if outcome == "ok":
                s.ok += 1
                s.fails_in_row, s.aside_s = 0, 0.0
            elif outcome == "error":
                s.errors += 1
            else:
                s.failed += 1
                s.last_error = f"{time.strftime('%H:%M:%S')} {clean_message(message)}"[:300]
                if outcome == "unreachable":
                    s.ready = False  # out of rotation until its poll finds it ready again
                    s.wake.set()
                if outcome == "model unavailable":
                    # the model's absence there, not the server's health: out until its poll finds it ready
                    s.models[model] = False
                elif began > s.last_fault_at:  # requests in flight when it failed: one incident, not several
                    s.fails_in_row += 1
                if outcome != "model unavailable":
                    s.last_fault_at = now
                if s.fails_in_row >= FAILURES_TO_SET_ASIDE:
                    s.aside_s = min(max(s.aside_s * 2, self.set_aside_s), max(MAX_SET_ASIDE_S, self.set_aside_s))
                    s.aside_until = now + s.aside_s
                    s.fails_in_row = 0  # the probe after the back-off starts a new count
        if s.leaving:
            self._close_idle_leavers()

    def _reload_in_background(self, s: Server, message: str) -> bool:
        """Reload the model whose instance died on `s` (only with its repository key: a server this
        process started, or one whose key was given). Returns whether a reload was started."""
        dead = dead_stub_model(message)
        headers = self._headers or _repository_headers.get(s.url) or s.client.repository_headers
        if not dead or not headers:
            return False
        s.client.repository_headers = dict(headers)
        engine = dead in ("f5_engine", "spark_llm")
        failed_at = time.perf_counter()

        def reload():
            try:
                s.client.reload_model(dead, failed_at=failed_at, cause=message,
                                      timeout_s=RELOAD_TIMEOUT_S["engine" if engine else "front"])
            except (SynthesisError, RuntimeError):
                pass  # its next request meets the dead instance, fails over and counts against it

        threading.Thread(target=reload, daemon=True, name=f"pool-reload-{dead}").start()
        return True

    # -- the one request loop -----------------------------------------------------------------------
    def _run(self, model: str, call: Callable[[StudioClient, float, bool], object], timeout_s: float,
             delivered: list | None = None, what: str = "request"):
        """call(client, seconds left, recover) on one server after another until one answers.

        A server fault moves the request on unless audio already reached the caller (`delivered`);
        any other error (the request's own, a deadline, a cancel) is passed on at once."""
        self._check_open()
        started = time.monotonic()
        deadline = started + timeout_s
        tried: set[str] = set()
        failures: list[str] = []
        dead: list[Server] = []  # servers with a dead instance: tried once more, with a reload, at the end
        last: SynthesisError | None = None
        while True:
            server, others = self._take(model, tried)
            second_try = False
            if server is None:
                # Nothing else left: a server with a dead instance gets the single-server treatment
                # (reload that model in the foreground and send again), as a one-server studio would.
                server = dead.pop(0) if dead else None
                if server is None:
                    break
                self._begin(server)
                second_try, others = True, 0
            tried.add(server.url)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._finish(server, time.monotonic(), "error")
                break
            began = time.monotonic()
            try:
                result = call(server.client, remaining, others == 0)
            except SynthesisError as exc:
                kind = server_fault(exc)
                self._finish(server, began, kind or "error", str(exc), model)
                if kind is None:
                    raise
                if delivered:
                    raise self._stream_lost(server, exc, kind) from None
                last = exc
                failures.append(f"{server.url}: {clean_message(str(exc))}")
                if kind == "dead instance" and not second_try:
                    self._reload_in_background(server, str(exc))
                    dead.append(server)
                continue
            except BaseException:
                self._finish(server, began, "error")
                raise
            self._finish(server, began, "ok")
            if failures:
                with self._lock:
                    for s in self._servers.values():
                        if s.url in tried and s is not server:
                            s.failed_over += 1
            return self._annotate(result, server, began - started, failures)
        if not self._servers:
            raise SynthesisError(f"no Triton server to send the {what} to: {self.url} gives no address"
                                 + (f" ({self.resolve_error})" if self.resolve_error else ""),
                                 "StatusCode.UNAVAILABLE")
        if last is None:
            raise SynthesisError(f"the {what} ran out of time before a Triton server could take it",
                                 "StatusCode.DEADLINE_EXCEEDED")
        raise SynthesisError(f"no Triton server could take the {what} ({model}); tried "
                             + "; ".join(failures), last.status)

    @staticmethod
    def _stream_lost(server: Server, exc: SynthesisError, kind: str) -> SynthesisError:
        reason = clean_message(str(exc))
        more = ""
        if kind == "dead instance":
            more = f" {dead_stub_model(str(exc))} is being reloaded there."
        return SynthesisError(f"the stream stopped: the Triton server at {server.url} failed after part of its "
                              f"audio had arrived ({reason}). A stream stays on the server that started it, so "
                              f"it cannot move to another one; send it again and a ready server takes it.{more}",
                              exc.status)

    @staticmethod
    def _annotate(result, server: Server, lost: float, failures: list[str]):
        if not isinstance(result, SynthResult):
            return result
        result.server = server.url
        if not failures:
            return result
        result.info = dict(result.info, notes=list(result.info.get("notes", [])) + [
            f"sent to the Triton server at {server.url} after {'; '.join(failures)}: {lost:.2f} s of this "
            "request's latency"])
        result.latency_s += lost
        result.first_chunk_s += lost
        result.chunk_arrivals_s = [t + lost for t in result.chunk_arrivals_s]
        result.rtf = result.latency_s / result.audio_s if result.audio_s else float("inf")
        result.recovered = True
        return result

    # -- what the studio calls (StudioClient's surface) ---------------------------------------------
    def synthesize(self, model: str, text: str, ref_audio, ref_text: str, stream: bool = False,
                   params: dict | None = None, on_chunk: Callable | None = None,
                   cancel: threading.Event | None = None, timeout_s: float | None = None) -> SynthResult:
        """StudioClient.synthesize on a ready server; `result.server` says which one answered."""
        if timeout_s is None:
            from tts.limits import current_limits

            timeout_s = current_limits().request_deadline_s
        family = family_of(model)
        delivered: list = []

        def tracked(samples, info):
            delivered.append(True)
            if on_chunk is not None:
                on_chunk(samples, info)

        def call(client, remaining, recover):
            return client.synthesize(family, text, ref_audio, ref_text, stream=stream, params=params,
                                     on_chunk=tracked, cancel=cancel, timeout_s=remaining, recover=recover)

        def run():
            return self._run(triton_model_name(family, stream), call, timeout_s, delivered,
                             "stream" if stream else "request")

        if self.observer is None:
            return run()
        try:
            result = run()
        except GenerationCancelled:
            self.observer(family, stream, "cancelled", None)
            raise
        except Exception:
            self.observer(family, stream, "error", None)
            raise
        self.observer(family, stream, "ok", result)
        return result

    def transcribe(self, wav, sr: int, language: str | None = None, fixed_tokens: int | None = None,
                   timeout_s: float = 120):
        return self._run("asr", lambda c, left, _: c.transcribe(wav, sr, language=language, fixed_tokens=fixed_tokens,
                                                                timeout_s=left), timeout_s)

    def embed(self, wav, sr: int, timeout_s: float = 60):
        return self._run("speaker_sim", lambda c, left, _: c.embed(wav, sr, timeout_s=left), timeout_s)

    def _ordered(self) -> list[Server]:
        """Servers, those last seen ready first."""
        return sorted(self._snapshot(), key=lambda s: s.ready is not True)

    def server_ready(self, timeout_s: float = HEALTH_TIMEOUT_S) -> bool:
        """Whether at least one server is ready now."""
        self._check_open()
        return any(s.client.server_ready(timeout_s=timeout_s) for s in self._ordered())

    def model_ready(self, name: str, timeout_s: float = HEALTH_TIMEOUT_S) -> bool:
        """Whether `name` is ready on at least one server now."""
        self._check_open()
        return any(s.client.model_ready(name, timeout_s=timeout_s) for s in self._ordered())

    def model_config(self, name: str) -> dict:
        """The model's configuration from the first server that answers."""
        self._check_open()
        errors = []
        for s in self._ordered():
            try:
                return s.client.model_config(name)
            except SynthesisError as exc:
                errors.append(str(exc))
        raise SynthesisError("; ".join(errors) or f"no Triton server at {self.url}")

    def statistics_by_server(self, model: str | None = None) -> dict[str, dict | str]:
        """Each server's own Triton statistics (JSON), or why it gave none; a server known to be down
        is not asked (an unreachable host would hold the answer up for the control calls' time limit)."""
        self._check_open()
        out: dict[str, dict | str] = {}
        for s in self._snapshot():
            if s.ready is False:
                out[s.url] = "not ready"
                continue
            try:
                out[s.url] = s.client.statistics(model)
            except SynthesisError as exc:
                out[s.url] = str(exc)
        return out

    def statistics(self, model: str | None = None) -> dict:
        """Triton's statistics summed over the servers that answer, in Triton's own JSON shape."""
        answers = self.statistics_by_server(model)
        good = [a for a in answers.values() if isinstance(a, dict)]
        if not good:
            raise SynthesisError(f"no Triton server at {self.url} answered for statistics: "
                                 + "; ".join(f"{u}: {a}" for u, a in answers.items()))
        return merge_statistics(good)

    def servers(self) -> list[dict]:
        """Each server's state and this pool's counters for it (share: of the requests sent by this pool)."""
        with self._lock:
            now = time.monotonic()
            rows = list(self._servers.values()) + self._leaving
            total = sum(s.sent for s in rows)
            return [{"url": s.url, "source": s.source, "state": s.state(now), "ready": bool(s.ready),
                     "models": {m: r for m, r in s.models.items() if r},
                     "sent": s.sent, "ok": s.ok, "failed": s.failed, "errors": s.errors,
                     "outstanding": s.outstanding, "failed_over": s.failed_over,
                     "share": round(s.sent / total, 4) if total else 0.0,
                     "set_aside_s": round(max(s.aside_until - now, 0.0), 1), "last_error": s.last_error}
                    for s in rows]


# --- statistics of several servers ---------------------------------------------------------------------
def merge_statistics(answers: list[dict]) -> dict:
    """Triton statistics JSON of several servers as one: counts and times summed per model and version,
    `last_inference` the latest, `batch_stats` summed per batch size."""
    merged: dict[tuple, dict] = {}
    for answer in answers:
        for m in answer.get("model_stats", []):
            key = (m.get("name", ""), m.get("version", ""))
            merged[key] = _sum(merged[key], m) if key in merged else copy.deepcopy(m)
    return {"model_stats": [merged[k] for k in sorted(merged)]}


def _sum(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, y in b.items():
        x = out.get(key)
        if x is None:
            out[key] = copy.deepcopy(y)
        elif key in ("name", "version", "batch_size"):
            continue
        elif key == "last_inference":
            out[key] = str(max(int(x), int(y)))
        elif key == "batch_stats":
            by_size = {str(s.get("batch_size")): s for s in x}
            for s in y:
                size = str(s.get("batch_size"))
                by_size[size] = _sum(by_size[size], s) if size in by_size else copy.deepcopy(s)
            out[key] = [by_size[k] for k in sorted(by_size, key=lambda k: int(k) if k.isdigit() else 0)]
        elif isinstance(x, dict) and isinstance(y, dict):
            out[key] = _sum(x, y)
        elif isinstance(x, list) and isinstance(y, list):
            out[key] = x + copy.deepcopy(y)
        elif _is_count(x) and _is_count(y):
            total = int(x) + int(y)
            out[key] = str(total) if isinstance(x, str) else total  # int64s arrive as strings
    return out


def _is_count(v) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, str) and v.isdigit())
