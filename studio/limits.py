"""The studio's limits for every surface (page, CLI, HTTP API), over the one definition in tts.limits.

`tts.limits` holds the numbers and the per-request checks the Triton models run too; this module
adds what only the app side needs: checks on files before they are read, the per-client
concurrency limit, and page authentication settings. Every check raises `LimitError` (a
ValueError) whose message names the limit and the environment variable that sets it.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path

from tts.limits import (ENV, LimitError, Limits, check_prompt, check_ref_text, check_request, check_text,
                        check_upload, current_limits)

__all__ = ["ENV", "LimitError", "Limits", "ClientSlots", "check_file_size", "check_prompt", "check_ref_text",
           "check_request", "check_text", "check_upload", "current_limits", "limits_table", "parse_auth"]


def check_file_size(path: str | Path, what: str = "uploaded file") -> int:
    """LimitError when the file at `path` is over the upload limit (checked before it is read);
    returns its size in bytes. A missing file is the caller's OSError."""
    size = os.stat(path).st_size
    check_upload(size, what)
    return size


class ClientSlots:
    """At most `max_client_requests` generations at once per client key (a page visitor's address
    or user name, an API key). A request over the limit is answered at once with a busy message
    naming the limit, never queued: one client cannot fill the server's queue for everyone."""

    def __init__(self):
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}

    def in_use(self, client: str) -> int:
        with self._lock:
            return self._held.get(client, 0)

    @contextmanager
    def hold(self, client: str, limits: Limits | None = None):
        cap = (limits or current_limits()).max_client_requests
        with self._lock:
            running = self._held.get(client, 0)
            if running >= cap:
                raise LimitError(f"busy: this client already runs {running} generation(s); the limit is {cap} at "
                                 f"once per client (concurrent requests limit, {ENV['max_client_requests']}). "
                                 "Try again when one has finished.")
            self._held[client] = running + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._held.get(client, 1) - 1
                if left > 0:
                    self._held[client] = left
                else:
                    self._held.pop(client, None)


def limits_table(limits: Limits | None = None) -> list[tuple[str, str, str]]:
    """(variable, value, meaning) of every limit, for `--help` texts and the README."""
    lim = limits or current_limits()
    meaning = {
        "max_text_chars_f5": "characters of text per F5-TTS request",
        "max_text_chars_spark": "characters of text per Spark-TTS request",
        "max_ref_text_chars": "characters of the prompt's transcript",
        "max_prompt_s": "seconds of prompt audio",
        "max_upload_mb": "megabytes per uploaded file (prompt clips, text files)",
        "max_client_requests": "generations at once per client (page visitor, API key, CLI)",
        "request_deadline_s": "seconds a request may take end to end",
    }
    return [(ENV[name], f"{getattr(lim, name):g}", meaning[name]) for name in ENV]


# --- page authentication --------------------------------------------------------------------------
def parse_auth(value: str | None) -> list[tuple[str, str]] | None:
    """Users for Gradio's login from `--auth` / STUDIO_AUTH: `user:pass[,user2:pass2]`, or the path of
    a file with one `user:pass` a line (# comments allowed; keeps passwords off the command line).
    None when unset; ValueError for a malformed value (it names the problem, never the password)."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    path = Path(value).expanduser()
    if ":" not in value or path.is_file():
        try:
            lines = path.read_text("utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            raise ValueError("--auth takes user:password (comma-separated for several) or a readable UTF-8 "
                             "file with one user:password a line") from None
        entries = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    else:
        entries = [e.strip() for e in value.split(",") if e.strip()]
    users = []
    for n, entry in enumerate(entries, 1):
        user, sep, password = entry.partition(":")
        if not sep or not user.strip() or not password:
            raise ValueError(f"--auth entry {n} is not user:password")
        users.append((user.strip(), password))
    if not users:
        raise ValueError("--auth names no user")
    return users


def page_user(request) -> str | None:
    """The signed-in page user of a Starlette request to the Gradio app ("" when the page has no
    login; None when it has one and the request carries no valid session cookie)."""
    app = request.app
    if getattr(app, "auth", None) is None and getattr(app, "auth_dependency", None) is None:
        return ""
    cookie_id = getattr(app, "cookie_id", "")
    token = (request.cookies.get(f"access-token-{cookie_id}")
             or request.cookies.get(f"access-token-unsecure-{cookie_id}"))
    return getattr(app, "tokens", {}).get(token)


def login_required(routes: list) -> list:
    """The same Starlette routes, refusing (401) requests without a page login when `--auth` is on:
    the page's own data routes (the streaming player's) are then as private as the page."""
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    def guard(endpoint):
        async def guarded(request):
            if page_user(request) is None:
                return JSONResponse({"error": "log in to the studio first"}, status_code=401)
            return await endpoint(request)
        return guarded

    return [Route(r.path, guard(r.endpoint), methods=sorted(r.methods or []), name=r.name)
            if isinstance(r, Route) else r for r in routes]
