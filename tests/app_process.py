"""A real `python app.py` in a subprocess on free loopback ports, for tests that talk HTTP to it.

`start_app` waits until the page answers and both families generate (the embedded tritonserver
starts in the background, so the page comes first); `stop_app` sends SIGTERM to the one process it
started (app.py stops its tritonserver on SIGTERM) and, only if that process does not exit, kills the
process group it was started in (its own session, so nothing else is in it).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Cold start on two shared CPU cores: writing demo weights and loading every model took 30-60 s on a
#: quiet machine and over 7 minutes while other suites ran (load average 11); under pytest-timeout's 900 s.
START_TIMEOUT_S = 780


#: How long the processes of a killed app's runs (tritonserver, its stubs) may take to go (s).
RUNS_GONE_TIMEOUT_S = 30.0


def run_processes_left(runs: list[Path], timeout_s: float = RUNS_GONE_TIMEOUT_S) -> list:
    """Wait (bounded) until no process of the server runs `runs` lives; what still lives then."""
    from studio.server import run_processes

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(run_processes(r) for r in runs):
        time.sleep(0.5)
    return [p for r in runs for p in run_processes(r)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class App:
    proc: subprocess.Popen
    url: str              # http://127.0.0.1:PORT (no trailing slash)
    log: Path
    api_key: str | None = None

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.is_file() else ""


def _post_json(url: str, body: dict, headers: dict, timeout: float) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def start_app(args: list[str], env: dict, log: Path, port: int, api_key: str | None = None,
              timeout_s: float = START_TIMEOUT_S) -> App:
    """Start `python app.py ARGS` with `env` and wait until F5 and Spark both answer a tiny request."""
    fh = open(log, "wb")
    proc = subprocess.Popen([sys.executable, "app.py", *args], cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                            start_new_session=True, env=env)
    fh.close()
    app = App(proc, f"http://127.0.0.1:{port}", log, api_key)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + timeout_s
    pending = {"f5-tts": {"nfe_steps": 1}, "spark-tts": {"max_new_tokens": 5}}
    try:
        while pending:
            if proc.poll() is not None:
                raise AssertionError(f"app.py exited with {proc.returncode}:\n{app.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"app.py was not ready in {timeout_s:.0f} s:\n{app.log_tail()}")
            for model, extra in list(pending.items()):
                try:
                    status, body = _post_json(app.url + "/v1/audio/speech",
                                              {"model": model, "input": "Hi.", "voice": "alloy",
                                               "response_format": "wav", **extra}, headers, 60)
                except OSError:
                    break  # the page is not up yet
                if status == 200:
                    del pending[model]
                elif status != 503:  # 503: the server is still starting
                    raise AssertionError(f"{model} answered {status}: {body[:500]!r}\n{app.log_tail()}")
            time.sleep(1.0)
    except BaseException:
        stop_app(app)
        raise
    return app


def stop_app(app: App) -> None:
    proc = app.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the session started for this process only
            proc.wait(10)


def base_env(**extra) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("STUDIO_API_KEY", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env
