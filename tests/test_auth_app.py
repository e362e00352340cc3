"""Issue 17 against a real `python app.py`: page login (`--auth`) in Debian's chromium, data routes
refused without it, the app killed with SIGKILL leaving no server behind, and a small bounded
`studio loadtest` through the page's API.

One app process serves the login tests and is then killed with SIGKILL (its own data folder and
ports); only pids this module started are signalled.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.app_process import run_processes_left
from tests.conftest import have_chromium

ROOT = Path(__file__).resolve().parent.parent
USER, PASSWORD = "ann", "s3cret-pass"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu"]
START_TIMEOUT_S = 420


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(url: str, cookie: str | None = None) -> int:
    req = urllib.request.Request(url, headers={"Cookie": cookie} if cookie else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture(scope="module")
def auth_app(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth-app")
    port, http_port, grpc_port = _free_port(), _free_port(), _free_port()
    log = tmp / "app.log"
    cmd = [sys.executable, "app.py", "--port", str(port), "--data-dir", str(tmp / "data"), "--demo-weights",
           "--no-download", "--instances", "1", "--http-port", str(http_port), "--grpc-port", str(grpc_port)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "STUDIO_AUTH": f"{USER}:{PASSWORD}"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        if "Triton ready" in log.read_text(errors="replace") and _status(url + "/") == 200:
            break
        time.sleep(1)
    else:
        proc.kill()
        raise AssertionError(f"app.py not up in {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
    yield {"proc": proc, "url": url, "data": tmp / "data", "log": log, "cmd": cmd, "env": env}
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


@pytest.mark.slow
def test_page_routes_refuse_without_login(auth_app):
    url = auth_app["url"]
    for path in ("/config", "/gradio_api/info", "/gradio_api/queue/status",
                 "/studio_api/stream/" + "a" * 32):
        assert _status(url + path) in (401, 403), path
    r = urllib.request.Request(url + "/gradio_api/call/clone", data=b'{"data": []}', method="POST",
                               headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(r, timeout=30)
    assert err.value.code in (401, 403)


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.skipif(not have_chromium(), reason="needs Debian chromium (apt-get install -y chromium)")
def test_login_in_the_browser(auth_app):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(auth_app["url"] + "/", wait_until="domcontentloaded")
            page.get_by_label("username").fill(USER)
            page.get_by_label("password").fill("wrong")
            page.get_by_role("button", name="Login").click()
            page.get_by_text("Incorrect Credentials").wait_for(timeout=30_000)
            assert page.locator("#tab-clone").count() == 0  # nothing of the studio before the login
            page.get_by_label("username").fill(USER)  # the failed attempt cleared the form
            page.get_by_label("password").fill(PASSWORD)
            page.get_by_role("button", name="Login").click()
            page.get_by_role("tab", name="Clone").wait_for(timeout=60_000)
            cookies = "; ".join(f"{c['name']}={c['value']}" for c in page.context.cookies())
        finally:
            browser.close()
    # the same routes answer with the session cookie
    assert _status(auth_app["url"] + "/config", cookies) == 200


@pytest.mark.slow
def test_app_sigkill_leaves_no_server_and_a_restart_on_the_same_ports_serves(auth_app):
    from studio.server import run_processes

    proc, data = auth_app["proc"], auth_app["data"]
    runs = [p for p in (data / "runs").glob("run-*") if p.is_dir()]
    assert runs and any(run_processes(r) for r in runs)
    proc.kill()
    proc.wait()
    assert not run_processes_left(runs), "tritonserver or stubs outlived the app"
    log = auth_app["log"].with_name("restart.log")
    again = subprocess.Popen(auth_app["cmd"], cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                             env=auth_app["env"])
    auth_app["proc"] = again
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert again.poll() is None, log.read_text()[-3000:]
            if "Triton ready" in log.read_text(errors="replace"):
                break
            time.sleep(1)
        grpc_port = auth_app["cmd"][auth_app["cmd"].index("--grpc-port") + 1]
        from studio.client import StudioClient
        from tests.conftest import speech_like

        with StudioClient(f"127.0.0.1:{grpc_port}") as c:
            r = c.synthesize("f5", "Back again.", speech_like(2, 24000), "Hello there.", params={"nfe_steps": 2},
                             timeout_s=120)
        assert r.audio.size > 0
    finally:
        again.send_signal(signal.SIGTERM)
        again.wait(60)


@pytest.mark.slow
def test_small_bounded_loadtest_through_the_page(tmp_path):
    """CI's small version of the issue's 200 x 16 run (that one is run by hand; figures in the README)."""
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "studio", "loadtest", "--requests", "16", "--concurrency", "4",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["ok"] + report["busy"] == 16 and report["failures"] == 0
    assert report["latency_s"]["p50"] > 0 and report["pss_mib"]["before"] > 0
