"""Several Triton servers behind one client (studio/pool.py).

Fast tests: fake per-server clients (injected `client_factory`), an injected resolver, and real
unreachable addresses. Slow tests: two real embedded tritonservers (F5 on demo weights) in this
module, one of them killed (by the pid this module started) and started again.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import speech_like
from tts.audio import F5_SAMPLE_RATE

ROOT = Path(__file__).resolve().parent.parent


# --- fakes -----------------------------------------------------------------------------------------------
class FakeServer:
    """What one address answers: `up`, its ready models, and `behave(call)` for each synthesis."""

    def __init__(self):
        self.up = True
        self.models = {"f5_tts", "f5_tts_stream", "spark_tts", "spark_tts_stream"}
        self.behave = None  # call dict -> None (answer) or raises
        self.calls: list[dict] = []
        self.reloads: list[str] = []


class FakeClient:
    servers: dict[str, FakeServer] = {}

    def __init__(self, url, repository_headers=None):
        self.url = url
        self.repository_headers = dict(repository_headers or {})
        self.closed = False
        self.srv = self.servers.setdefault(url, FakeServer())

    def close(self):
        self.closed = True

    def server_ready(self, timeout_s=1.0):
        return self.srv.up

    def model_ready(self, name, timeout_s=1.0):
        return self.srv.up and name in self.srv.models

    def synthesize(self, model, text, ref_audio, ref_text, stream=False, params=None, on_chunk=None, cancel=None,
                   timeout_s=None, recover=True):
        from studio.client import SynthesisError, SynthResult

        call = {"model": model, "text": text, "stream": stream, "recover": recover, "on_chunk": on_chunk}
        self.srv.calls.append(call)
        if not self.srv.up:
            raise SynthesisError(f"cannot reach the Triton server at {self.url} (is it running?): Connection refused",
                                 "StatusCode.UNAVAILABLE")
        if self.srv.behave is not None:
            self.srv.behave(call)
        audio = np.zeros(2400, np.float32)
        if on_chunk is not None:
            on_chunk(audio, {})
        return SynthResult(audio=audio, sample_rate=24000, latency_s=0.1, first_chunk_s=0.1, audio_s=0.1, rtf=1.0,
                           info={"text": text}, chunk_arrivals_s=[0.1], server=self.url)

    def statistics(self, model=None):
        from studio.client import SynthesisError

        if not self.srv.up:
            raise SynthesisError("unreachable", "StatusCode.UNAVAILABLE")
        n = str(len(self.srv.calls))
        return {"model_stats": [{"name": "f5_tts", "version": "1", "last_inference": n, "inference_count": n,
                                 "inference_stats": {"success": {"count": n, "ns": "1000"}}}]}

    def reload_model(self, name, failed_at=None, cause="", timeout_s=0):
        self.srv.reloads.append(name)


@pytest.fixture()
def fakes():
    FakeClient.servers = {}
    yield FakeClient.servers
    FakeClient.servers = {}


def pool_of(*urls, **kw):
    from studio.pool import ServerPool

    kw.setdefault("watch", False)
    return ServerPool(",".join(urls), client_factory=FakeClient, **kw)


def say(pool, text="Hello.", **kw):
    return pool.synthesize("f5", text, np.zeros(100, np.float32), "ref", timeout_s=30, **kw)


def unavailable(url):
    from studio.client import SynthesisError

    def behave(call):
        raise SynthesisError(f"cannot reach the Triton server at {url} (is it running?): Socket closed",
                             "StatusCode.UNAVAILABLE")
    return behave


# --- addresses -------------------------------------------------------------------------------------------
def test_parse_spec_and_connect_kinds():
    from studio.client import StudioClient
    from studio.pool import ServerPool, connect, parse_spec

    assert [(e.host, e.port, e.literal) for e in parse_spec(" 10.0.0.1:8001, [::1]:9000,triton:8001,localhost")] == [
        ("10.0.0.1", 8001, True), ("::1", 9000, True), ("triton", 8001, False), ("localhost", 8001, True)]
    assert [e.text for e in parse_spec("10.0.0.1:8001,10.0.0.1:8001,[::1]:7")] == ["10.0.0.1:8001", "[::1]:7"]
    for bad, why in (("", "no Triton address"), ("grpc://h:1", "without a scheme"), ("h:x", "no port number"),
                     ("h:70000", "outside 1-65535")):
        with pytest.raises(ValueError, match=why):
            parse_spec(bad)
    single = connect("127.0.0.1:1")
    assert type(single) is StudioClient and single.url == "127.0.0.1:1"  # one literal: unchanged behaviour
    single.close()
    with connect("127.0.0.1:1,127.0.0.1:2", watch=False) as pool:
        assert isinstance(pool, ServerPool) and [s["url"] for s in pool.servers()] == ["127.0.0.1:1", "127.0.0.1:2"]
    with connect("triton-headless:8001", resolver=lambda host, port: ["10.1.0.7", "10.1.0.8"], watch=False) as pool:
        assert [(s["url"], s["source"]) for s in pool.servers()] == [("10.1.0.7:8001", "triton-headless:8001"),
                                                                     ("10.1.0.8:8001", "triton-headless:8001")]


def test_default_resolver_prefers_ipv4_and_dedupes():
    from studio.pool import resolve_addresses

    assert resolve_addresses("localhost", 8001) == ["127.0.0.1"]
    with pytest.raises(OSError):
        resolve_addresses("no-such-host.invalid", 8001)


def test_dns_name_is_resolved_again_and_leavers_close_when_idle(fakes):
    answers = {"now": ["10.0.0.1", "10.0.0.2"]}

    def resolver(host, port):
        assert (host, port) == ("triton", 8001)
        if answers["now"] is None:
            raise socket.gaierror("temporary failure in name resolution")
        return list(answers["now"])

    pool = pool_of("triton:8001", resolver=resolver)
    try:
        pool.poll_now()
        first = {s["url"] for s in pool.servers()}
        assert first == {"10.0.0.1:8001", "10.0.0.2:8001"}
        # a request in flight on .1 while the name stops listing it
        hold, entered = threading.Event(), threading.Event()
        fakes["10.0.0.1:8001"].behave = lambda call: (entered.set(), hold.wait(10))
        fakes["10.0.0.2:8001"].behave = lambda call: (entered.set(), hold.wait(10))
        worker = threading.Thread(target=say, args=(pool,))
        worker.start()
        assert entered.wait(5)
        busy = next(s["url"] for s in pool.servers() if s["outstanding"])
        answers["now"] = [u.split(":")[0] for u in first - {busy}] + ["10.0.0.3"]
        pool.resolve_now()
        states = {s["url"]: s["state"] for s in pool.servers()}
        assert states[busy] == "leaving" and "10.0.0.3:8001" in states
        leaver = FakeClient.servers[busy]
        hold.set()
        worker.join(10)
        assert busy not in {s["url"] for s in pool.servers()}  # closed once its request ended
        # a failed lookup keeps the addresses it had
        answers["now"] = None
        pool.resolve_now()
        assert len(pool.servers()) == 2 and "does not resolve" in pool.resolve_error
        assert leaver is not None
    finally:
        pool.close()


def test_periodic_resolution_in_the_background(fakes):
    answers = {"now": ["10.0.0.1"]}
    pool = pool_of("triton:8001", resolver=lambda h, p: list(answers["now"]), watch=True, resolve_s=0.1, poll_s=0.05)
    try:
        answers["now"] = ["10.0.0.1", "10.0.0.9"]
        deadline = time.monotonic() + 10
        while len(pool.servers()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert {s["url"] for s in pool.servers()} == {"10.0.0.1:8001", "10.0.0.9:8001"}
        while any(s["state"] != "ready" for s in pool.servers()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(s["state"] == "ready" for s in pool.servers())  # each server's health thread polled it
    finally:
        pool.close()


def test_a_name_with_no_address_says_so(fakes):
    from studio.client import SynthesisError

    with pool_of("triton:8001", resolver=lambda h, p: []) as pool:
        with pytest.raises(SynthesisError, match="triton:8001 gives no address.*resolves to no address"):
            say(pool)


# --- choosing a server ------------------------------------------------------------------------------------
def test_requests_spread_by_least_outstanding_then_round_robin(fakes):
    with pool_of("10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1") as pool:
        pool.poll_now()
        servers = [say(pool).server for _ in range(9)]
        assert {u: servers.count(u) for u in set(servers)} == {"10.0.0.1:1": 3, "10.0.0.2:1": 3, "10.0.0.3:1": 3}
        # concurrent: each new request goes where the fewest are in flight
        hold = threading.Event()
        for srv in fakes.values():
            srv.behave = lambda call: hold.wait(10)
        workers = [threading.Thread(target=say, args=(pool,)) for _ in range(6)]
        for w in workers:
            w.start()
        deadline = time.monotonic() + 5
        while sum(s["outstanding"] for s in pool.servers()) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [s["outstanding"] for s in pool.servers()] == [2, 2, 2]
        hold.set()
        for w in workers:
            w.join(10)
        assert [s["share"] for s in pool.servers()] == [pytest.approx(1 / 3, abs=0.01)] * 3


def test_model_readiness_steers_requests(fakes):
    with pool_of("10.0.0.1:1", "10.0.0.2:1") as pool:
        fakes["10.0.0.1:1"].models.discard("f5_tts")  # .1 serves Spark only
        pool.poll_now()
        assert {say(pool).server for _ in range(4)} == {"10.0.0.2:1"}
        assert pool.model_ready("spark_tts") and pool.model_ready("f5_tts") and not pool.model_ready("asr")


def test_failover_before_audio_and_the_failed_server_leaves_rotation(fakes):
    with pool_of("10.0.0.1:1", "10.0.0.2:1") as pool:
        pool.poll_now()
        fakes["10.0.0.1:1"].behave = unavailable("10.0.0.1:1")
        results = [say(pool) for _ in range(4)]
        assert {r.server for r in results} == {"10.0.0.2:1"}
        failed = [r for r in results if r.recovered]
        assert len(failed) == 1  # only the first met .1; it then left the rotation
        assert "after 10.0.0.1:1: cannot reach" in failed[0].info["notes"][-1]
        a, b = pool.servers()
        assert (a["state"], a["sent"], a["failed"], a["failed_over"]) == ("not ready", 1, 1, 1)
        assert (b["sent"], b["ok"]) == (4, 4)
        # a stream is retried elsewhere too while nothing of it was played
        r = say(pool, stream=True)
        assert r.server == "10.0.0.2:1"


def test_stream_failing_after_audio_stays_on_its_server_with_a_clear_message(fakes):
    from studio.client import SynthesisError

    with pool_of("10.0.0.1:1", "10.0.0.2:1") as pool:
        pool.poll_now()

        def half_then_die(call):
            call["on_chunk"](np.zeros(10, np.float32), {})
            unavailable("10.0.0.1:1")(call)
        fakes["10.0.0.1:1"].behave = half_then_die
        heard = []
        with pytest.raises(SynthesisError) as err:
            say(pool, stream=True, on_chunk=lambda a, i: heard.append(a.size))
        msg = str(err.value)
        assert "stream stopped" in msg and "10.0.0.1:1" in msg and "cannot move to another" in msg
        assert heard == [10] and not fakes["10.0.0.2:1"].calls  # never sent again (the audio would repeat)


def test_request_errors_are_not_failed_over(fakes):
    from studio.client import GenerationCancelled, SynthesisError

    with pool_of("10.0.0.1:1", "10.0.0.2:1") as pool:
        pool.poll_now()

        def refuse(call):
            raise SynthesisError("target_text is longer than 5000 characters", "StatusCode.INVALID_ARGUMENT")
        for srv in fakes.values():
            srv.behave = refuse
        with pytest.raises(SynthesisError, match="longer than"):
            say(pool)
        assert sum(len(s.calls) for s in fakes.values()) == 1
        cancel = threading.Event()
        cancel.set()

        def cancelled(call):
            raise GenerationCancelled("generation cancelled")
        for srv in fakes.values():
            srv.behave = cancelled
        with pytest.raises(GenerationCancelled):
            say(pool, cancel=cancel)
        assert all(s["failed"] == 0 and s["state"] == "ready" for s in pool.servers())
        assert sum(s["errors"] for s in pool.servers()) == 2


def test_dead_instance_moves_on_and_reloads_in_the_background_where_the_key_is_known(fakes):
    from studio.client import SynthesisError, register_repository_headers

    def dead(call):
        raise SynthesisError("Stub process 'f5_tts_0_1' is not healthy.", "StatusCode.INTERNAL")

    register_repository_headers("10.0.0.1:1", {"key": "secret"})  # as the embedded server manager does
    try:
        with pool_of("10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1") as pool:
            pool.poll_now()
            fakes["10.0.0.1:1"].behave = dead
            fakes["10.0.0.3:1"].behave = dead
            r = say(pool)
            assert r.server == "10.0.0.2:1" and r.recovered
            assert fakes["10.0.0.1:1"].calls[0]["recover"] is False  # no foreground reload: others were ready
            deadline = time.monotonic() + 5
            while not fakes["10.0.0.1:1"].reloads and time.monotonic() < deadline:
                time.sleep(0.01)
            assert fakes["10.0.0.1:1"].reloads == ["f5_tts"]
            for _ in range(3):
                say(pool)
            assert fakes["10.0.0.3:1"].calls and not fakes["10.0.0.3:1"].reloads  # no key: no reload there
    finally:
        from studio.client import _repository_headers

        _repository_headers.pop("10.0.0.1:1", None)


def test_a_lone_server_keeps_the_single_server_recovery(fakes):
    with pool_of("10.0.0.1:1", "10.0.0.2:1") as pool:
        fakes["10.0.0.2:1"].up = False
        pool.poll_now()
        say(pool)
        assert fakes["10.0.0.1:1"].calls[-1]["recover"] is True  # nothing else ready: reload and resend there


def test_a_server_that_keeps_failing_is_set_aside_then_probed_again(fakes):
    from studio.client import SynthesisError

    def dead(call):  # and no repository key here: nothing reloads it
        raise SynthesisError("Stub process 'f5_tts_0_1' is not healthy.", "StatusCode.INTERNAL")

    with pool_of("10.0.0.1:1", "10.0.0.2:1", set_aside_s=0.5) as pool:
        pool.poll_now()
        fakes["10.0.0.1:1"].behave = dead  # it still says it is ready
        for _ in range(8):
            assert say(pool).server == "10.0.0.2:1"
        a = pool.servers()[0]
        assert a["state"] == "set aside" and a["failed"] == 3 and 0 < a["set_aside_s"] <= 0.5
        fakes["10.0.0.1:1"].behave = None  # repaired
        time.sleep(0.6)
        assert {say(pool).server for _ in range(4)} == {"10.0.0.1:1", "10.0.0.2:1"}
        assert pool.servers()[0]["state"] == "ready"


def test_a_missing_model_moves_requests_without_setting_the_server_aside(fakes):
    from studio.client import SynthesisError

    def model_gone(call):
        if not call["stream"]:
            raise SynthesisError("Request for unknown model: 'f5_tts' is not found", "StatusCode.NOT_FOUND")

    with pool_of("10.0.0.1:1", "10.0.0.2:1") as pool:
        pool.poll_now()
        fakes["10.0.0.1:1"].behave = model_gone  # f5_tts unloaded there since the last poll
        assert {say(pool).server for _ in range(5)} == {"10.0.0.2:1"}
        assert len(fakes["10.0.0.1:1"].calls) == 1  # out for this model until its poll says otherwise
        assert pool.servers()[0]["state"] == "ready" and pool.servers()[0]["failed"] == 1
        assert say(pool, stream=True).server == "10.0.0.1:1"  # its other models still take requests


def test_requests_in_flight_when_a_server_fails_count_as_one_failure(fakes):
    with pool_of("10.0.0.1:1", "10.0.0.2:1") as pool:
        pool.poll_now()
        go = threading.Event()
        fakes["10.0.0.1:1"].behave = lambda call: (go.wait(10), unavailable("10.0.0.1:1")(call))
        fakes["10.0.0.2:1"].behave = lambda call: go.wait(10)
        workers = [threading.Thread(target=say, args=(pool,)) for _ in range(8)]
        for w in workers:
            w.start()
        deadline = time.monotonic() + 5
        while len(fakes["10.0.0.1:1"].calls) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        go.set()
        for w in workers:
            w.join(10)
        a, b = pool.servers()
        assert a["failed"] == 4 and a["state"] == "not ready" and b["ok"] == 8  # not set aside: one incident


def test_statistics_are_summed_and_kept_per_server(fakes):
    from studio.pool import merge_statistics

    one = {"model_stats": [{"name": "f5_tts", "version": "1", "last_inference": "5", "inference_count": "2",
                            "inference_stats": {"success": {"count": "2", "ns": "10"}},
                            "batch_stats": [{"batch_size": "1", "compute_infer": {"count": "2", "ns": "8"}}]}]}
    two = {"model_stats": [{"name": "f5_tts", "version": "1", "last_inference": "9", "inference_count": "3",
                            "inference_stats": {"success": {"count": "3", "ns": "30"}, "fail": {"count": "1"}},
                            "batch_stats": [{"batch_size": "1", "compute_infer": {"count": "1", "ns": "2"}},
                                            {"batch_size": "2", "compute_infer": {"count": "1", "ns": "4"}}]},
                           {"name": "asr", "version": "1", "inference_count": "1"}]}
    merged = merge_statistics([one, two])
    f5, asr = sorted(merged["model_stats"], key=lambda m: m["name"] != "f5_tts")
    assert f5["inference_count"] == "5" and f5["last_inference"] == "9"
    assert f5["inference_stats"] == {"success": {"count": "5", "ns": "40"}, "fail": {"count": "1"}}
    assert f5["batch_stats"] == [{"batch_size": "1", "compute_infer": {"count": "3", "ns": "10"}},
                                 {"batch_size": "2", "compute_infer": {"count": "1", "ns": "4"}}]
    assert asr["inference_count"] == "1"
    with pool_of("10.0.0.1:1", "10.0.0.2:1") as pool:
        pool.poll_now()
        for _ in range(3):
            say(pool)
        fakes["10.0.0.2:1"].up = False
        pool.poll_now()
        per = pool.statistics_by_server("f5_tts")
        assert per["10.0.0.2:1"] == "not ready" and isinstance(per["10.0.0.1:1"], dict)
        assert pool.statistics()["model_stats"][0]["inference_count"] == "2"


def test_unreachable_addresses_fail_fast_and_name_every_server():
    from studio.client import SynthesisError
    from studio.pool import ServerPool

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])  # closed again: nothing listens there
    urls = [f"127.0.0.1:{p}" for p in ports]
    with ServerPool(",".join(urls), watch=False) as pool:
        t0 = time.monotonic()
        with pytest.raises(SynthesisError) as err:
            pool.synthesize("f5", "Hello.", np.zeros(100, np.float32), "ref", timeout_s=30)
        assert time.monotonic() - t0 < 10
        assert all(u in str(err.value) for u in urls) and "no Triton server could take" in str(err.value)
        assert err.value.status == "StatusCode.UNAVAILABLE"
        assert not pool.server_ready()
        pool.poll_now()
        assert [s["state"] for s in pool.servers()] == ["not ready", "not ready"]


def test_server_tab_lists_every_server(tmp_path):
    """The page's runtime with two addresses (nothing listens): both rows, their state and share."""
    from studio.ui_runtime import RuntimeOptions, StudioRuntime
    from studio.ui_views import server_md

    urls = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            urls.append(f"127.0.0.1:{s.getsockname()[1]}")
    rt = StudioRuntime(RuntimeOptions(data_dir=tmp_path, triton_url=",".join(urls)))
    rt.start()
    try:
        st = rt.status()
        assert st["state"] == "unreachable" and [s["url"] for s in st["servers"]] == urls
        md = server_md(st)
        assert "**Servers**" in md and all(f"`{u}`" in md for u in urls) and "| share |" in md
    finally:
        rt.stop()


# --- two real tritonservers --------------------------------------------------------------------------------
REF = speech_like(2.5, F5_SAMPLE_RATE)
REF_TEXT = "Some call me nature, others call me mother nature."
LONG = ("I don't really care what you call me. I've been a silent spectator, watching species evolve, "
        "empires rise and fall. But always remember, I am mighty and enduring.")
#: Bounds of the waits below (generous: two shared cores).
READY_WITHIN_S = 60
REQUEST_TIMEOUT_S = 120


def f5(pool, text="Hello there.", stream=False, nfe=4, **kw):
    return pool.synthesize("f5", text, REF, REF_TEXT, stream=stream, params={"nfe_steps": nfe, "seed": 1},
                           timeout_s=REQUEST_TIMEOUT_S, **kw)


def front_success(server, model="f5_tts") -> int:
    """Requests Triton counted as succeeded on `server`'s model (its own statistics)."""
    from studio.client import StudioClient

    with StudioClient(server.grpc_url) as c:
        stats = c.statistics(model)["model_stats"][0]
    return int(stats.get("inference_stats", {}).get("success", {}).get("count", 0))


def settled_success(server, within_s=10) -> int:
    """front_success once two reads 0.3 s apart agree (requests just answered are counted a moment later)."""
    deadline = time.monotonic() + within_s
    last = front_success(server)
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = front_success(server)
        if now == last:
            return now
        last = now
    return last


def wait_for(predicate, within_s, what):
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} within {within_s} s")


def states(pool) -> dict[str, str]:
    return {s["url"]: s["state"] for s in pool.servers()}


@pytest.fixture(scope="module")
def two_servers(tmp_path_factory):
    """Two embedded tritonservers, F5 only on demo weights, started side by side."""
    from studio.server import TritonServer

    servers = [TritonServer(tmp_path_factory.mktemp(f"pool-{n}"), demo_weights=True, no_download=True, instances=4,
                            gpus=[], families=["f5"]) for n in "ab"]
    errors = []

    def start(s):
        try:
            s.start(timeout_s=600)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=start, args=(s,)) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(660)
    try:
        assert not errors, errors
        yield servers
    finally:
        for s in servers:
            s.stop()


@pytest.fixture()
def pool(two_servers):
    from studio.pool import connect

    p = connect(",".join(s.grpc_url for s in two_servers))
    wait_for(lambda: set(states(p).values()) == {"ready"}, READY_WITHIN_S, "both servers ready")
    yield p
    p.close()


@pytest.mark.slow
def test_requests_spread_over_both_servers(two_servers, pool):
    before = [front_success(s) for s in two_servers]
    stream_before = [front_success(s, "f5_tts_stream") for s in two_servers]
    done = []
    workers = [threading.Thread(target=lambda: done.append(f5(pool))) for _ in range(8)]
    for i, w in enumerate(workers):
        w.start()
        if i % 2:  # two at a time
            workers[i - 1].join(REQUEST_TIMEOUT_S)
            w.join(REQUEST_TIMEOUT_S)
    streams = [f5(pool, stream=True) for _ in range(2)]
    assert len(done) == 8 and all(r.audio.size for r in done + streams)
    # Triton counts a request when it releases it, a moment after the client has the answer
    wait_for(lambda: sum(front_success(s) for s in two_servers) - sum(before) == 8, 10, "8 requests counted")
    counted = [front_success(s) - b for s, b in zip(two_servers, before)]
    assert min(counted) >= 2, counted  # Triton's own counts: both served
    # a decoupled model counts a request a moment after the client has its final response
    wait_for(lambda: [front_success(s, "f5_tts_stream") - b for s, b in zip(two_servers, stream_before)] == [1, 1],
             10, "one stream counted on each server")
    by_pool = {s["url"]: s["ok"] for s in pool.servers()}
    assert [by_pool[s.grpc_url] for s in two_servers] == [c + 1 for c in counted]  # + one stream each
    assert {r.server for r in done} == {s.grpc_url for s in two_servers}


@pytest.mark.slow
def test_bench_reports_per_server_counts(two_servers, tmp_path):
    urls = ",".join(s.grpc_url for s in two_servers)
    run = subprocess.run([sys.executable, "-m", "studio", "bench", "--triton-url", urls, "--out", str(tmp_path),
                          "--label", "t", "--model", "f5", "--mode", "offline", "--concurrency", "2", "--requests", "6",
                          "--warmup", "0", "--nfe", "2"], cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    (row,) = json.loads((tmp_path / "bench_f5_offline_t.json").read_text())["rows"]
    servers = {s["url"]: s for s in row["servers"]}
    assert set(servers) == {s.grpc_url for s in two_servers}
    assert sum(s["sent"] for s in servers.values()) == 6 and all(s["sent"] >= 1 for s in servers.values())
    assert all(s["triton_success"] == s["ok"] == s["sent"] for s in servers.values())  # Triton agrees
    assert sum(s["share"] for s in servers.values()) == pytest.approx(1.0)
    assert "per server" in run.stdout and all(u in run.stdout for u in servers)


@pytest.mark.slow
def test_server_tab_with_two_real_servers(two_servers, tmp_path):
    from studio.ui import Handlers
    from studio.ui_runtime import RuntimeOptions, StudioRuntime

    urls = [s.grpc_url for s in two_servers]
    rt = StudioRuntime(RuntimeOptions(data_dir=tmp_path, triton_url=",".join(urls)))
    rt.start()
    try:
        client = rt.client()
        wait_for(lambda: set(states(client).values()) == {"ready"}, READY_WITHIN_S, "both servers ready")
        for _ in range(2):
            f5(client)
        counted = sum(front_success(s) for s in two_servers)
        view = {}

        def summed():  # the tab's f5_tts row: Triton's statistics summed over both servers
            rt.invalidate_status()
            view["md"], rows, _ = Handlers(rt, autostart=False).server_view()
            return next(r for r in rows if r[0] == "f5_tts")[1] == counted
        wait_for(summed, 10, "the Server tab's statistics summed over both servers")
        md = view["md"]
        assert "2 of 2 ready" in md and all(f"`{u}` | ready | 1 | 50%" in md for u in urls), md
    finally:
        rt.stop()


@pytest.mark.slow
def test_killing_a_server_mid_run_loses_no_request_without_audio(two_servers, pool):
    """A stream receiving audio and several offline requests in flight; the stream's server killed
    (SIGKILL to the tritonserver this module started): the offline requests are served by the other
    server, the stream ends with a clear message, new requests all go to the survivor; started again,
    the killed server is back in rotation."""
    from studio.client import SynthesisError

    by_url = {s.grpc_url: s for s in two_servers}
    first_audio = threading.Event()
    out: dict = {}

    def run(key, fn):
        try:
            out[key] = fn()
        except Exception as exc:  # noqa: BLE001 - inspected below
            out[key] = exc

    stream = threading.Thread(target=run, args=("stream", lambda: f5(pool, " ".join([LONG] * 6), stream=True,
                                                                     nfe=32, on_chunk=lambda *_: first_audio.set())))
    stream.start()
    assert first_audio.wait(REQUEST_TIMEOUT_S), "the stream sent no audio"
    busy = [s for s in pool.servers() if s["outstanding"]]
    assert len(busy) == 1
    victim, survivor = by_url[busy[0]["url"]], next(s for s in two_servers if s.grpc_url != busy[0]["url"])
    offline = [threading.Thread(target=run, args=(i, lambda: f5(pool, LONG, nfe=32))) for i in range(6)]
    for t in offline:
        t.start()
    wait_for(lambda: sum(s["outstanding"] for s in pool.servers()) == 7, 10, "7 requests in flight")
    on_victim = next(s["outstanding"] for s in pool.servers() if s["url"] == victim.grpc_url) - 1
    assert on_victim >= 2 and stream.is_alive()
    # The supervisor would restart the server within seconds; keep it down until this test restarts it.
    victim._stopping = True
    os.kill(victim._proc.pid, signal.SIGKILL)
    for t in offline + [stream]:
        t.join(REQUEST_TIMEOUT_S)
        assert not t.is_alive(), "a request did not end"
    results = [out[i] for i in range(6)]
    assert not [r for r in results if isinstance(r, Exception)], results
    assert {r.server for r in results} <= {survivor.grpc_url, victim.grpc_url}
    moved = [r for r in results if r.recovered]
    assert moved and all(r.server == survivor.grpc_url and "after " + victim.grpc_url in r.info["notes"][-1]
                         for r in moved)
    err = out["stream"]
    assert isinstance(err, SynthesisError), err
    assert "stream stopped" in str(err) and victim.grpc_url in str(err) and "send it again" in str(err)
    # new requests: all on the survivor
    wait_for(lambda: states(pool)[victim.grpc_url] == "not ready", 10, "the killed server out of rotation")
    sent_before = {s["url"]: s["sent"] for s in pool.servers()}
    counted = settled_success(survivor)
    fresh = [f5(pool) for _ in range(4)]
    assert {r.server for r in fresh} == {survivor.grpc_url} and not any(r.recovered for r in fresh)
    wait_for(lambda: front_success(survivor) - counted == 4, 10, "Triton on the survivor counting the 4")
    assert {s["url"]: s["sent"] for s in pool.servers()}[victim.grpc_url] == sent_before[victim.grpc_url]
    # started again (same object, same ports): back in rotation
    victim.stop()
    victim.start(timeout_s=300)
    wait_for(lambda: states(pool)[victim.grpc_url] == "ready", READY_WITHIN_S, "the restarted server in rotation")
    warmed = settled_success(victim)  # its start-up sent one request through each front instance
    again = [f5(pool) for _ in range(4)]
    assert {r.server for r in again} == {victim.grpc_url, survivor.grpc_url}
    served = sum(r.server == victim.grpc_url for r in again)
    wait_for(lambda: front_success(victim) - warmed == served, 10, "the restarted server's own statistics")
