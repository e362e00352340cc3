"""The studio's streaming endpoint: audio chunks to the browser's Web Audio player as they arrive.

Gradio's own streaming audio buffers for seconds before it plays (gradio issues #8185, #9044,
#11733), so the page plays generated audio itself (`studio/static/player.js`) from this endpoint,
served by the same web server as the page:

    GET  studio_api/stream/{job}         binary frames, written as the Triton client receives chunks
    POST studio_api/stream/{job}/played  the browser reports when the first sound came out

The browser makes up the job id (32 hex digits) when Generate is clicked, opens the stream, and
hands the id to the Gradio handler as an input; the handler then pushes frames into the job.
Either side may come first. The same job carries the cancel Event that the Stop button sets.

Frame: 1 byte type, uint32 little-endian payload length, payload.
    'M' JSON: the generation started (model, mode)
    'A' uint32 LE sample rate + float32 LE samples: the next samples to play, in order
    'E' JSON: the end ({"status": "ok" | "cancelled" | "error", "message": ...})
    'S' JSON: a script segment starts with the next audio ({"segment", "line", "voice", "text"}; studio/ui_script.py)
    'K' empty: keep-alive while the request waits in the queue (proxies drop idle connections)
"""

from __future__ import annotations

import asyncio
import json
import re
import struct
import threading
import time
import uuid
from typing import Callable

import numpy as np

FRAME_META, FRAME_AUDIO, FRAME_END, FRAME_KEEPALIVE = b"M", b"A", b"E", b"K"
ROUTE_PREFIX = "/studio_api"
JOB_ID_RE = re.compile(r"^[0-9a-f]{32}$")
#: Keep-alive period while nothing happens (s): below common proxy idle timeouts (60 s).
KEEPALIVE_S = 10.0
#: How long an open stream waits for its job to produce anything (s): covers a long queue.
STREAM_IDLE_LIMIT_S = 1800.0
#: Finished jobs are forgotten after this long (s); unfinished ones after STREAM_IDLE_LIMIT_S.
FINISHED_TTL_S = 300.0
#: Fields of the browser's report that are kept (numbers only, milliseconds).
PLAYED_FIELDS = ("first_sound_ms", "first_audio_ms", "output_latency_ms")


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return kind + struct.pack("<I", len(payload)) + payload


def audio_frame(samples: np.ndarray, sample_rate: int) -> bytes:
    pcm = np.ascontiguousarray(samples, dtype="<f4")
    return frame(FRAME_AUDIO, struct.pack("<I", int(sample_rate)) + pcm.tobytes())


def json_frame(kind: bytes, obj: dict) -> bytes:
    return frame(kind, json.dumps(obj, ensure_ascii=False).encode("utf-8"))


def parse_frames(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, payload) pairs of a complete byte stream (tests and tools; the browser has its own)."""
    out, pos = [], 0
    while pos + 5 <= len(data):
        (n,) = struct.unpack_from("<I", data, pos + 1)
        out.append((data[pos:pos + 1], data[pos + 5:pos + 5 + n]))
        pos += 5 + n
    if pos != len(data):
        raise ValueError(f"stream ends inside a frame ({len(data) - pos} stray bytes)")
    return out


class Job:
    """One generation's channel between the Gradio handler (writer) and the browser (readers)."""

    def __init__(self, job_id: str):
        self.id = job_id
        self.cancel = threading.Event()
        self.created = time.monotonic()
        self.finished_at: float | None = None
        self.readers = 0
        self.record_id: str | None = None  # the history row, once written
        self.played: dict | None = None
        self._played_event = threading.Event()
        self._frames: list[bytes] = []
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    @property
    def closed(self) -> bool:
        return self.finished_at is not None

    # -- writer side (any thread) --------------------------------------------------------------
    def push(self, data: bytes) -> None:
        with self._lock:
            if self.closed:
                return
            self._frames.append(data)
            waiters = list(self._waiters)
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)

    def push_audio(self, samples: np.ndarray, sample_rate: int) -> None:
        if np.asarray(samples).size:
            self.push(audio_frame(samples, sample_rate))

    def finish(self, status: str, message: str = "", **extra) -> None:
        """Send the end frame and close (idempotent: the first end wins)."""
        with self._lock:
            if self.closed:
                return
            self._frames.append(json_frame(FRAME_END, {"status": status, "message": message, **extra}))
            self.finished_at = time.monotonic()
            waiters = list(self._waiters)
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)

    def wait_played(self, timeout_s: float) -> dict | None:
        """The browser's first-sound report, waiting up to `timeout_s` if a browser is listening."""
        if self.played is None and self.readers > 0:
            self._played_event.wait(timeout_s)
        return self.played

    def report_played(self, data: dict) -> None:
        clean = {}
        for key in PLAYED_FIELDS:
            value = data.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 3.6e6:
                clean[key] = round(float(value), 1)
        with self._lock:
            if self.played is not None or not clean:
                return
            self.played = clean
        self._played_event.set()

    # -- reader side (the event loop) ----------------------------------------------------------
    async def frames(self):
        """Async iterator of byte blocks for one browser connection, from the job's first frame."""
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        with self._lock:
            self._waiters.append((loop, wake))
            self.readers += 1
        sent, last_activity = 0, time.monotonic()
        try:
            while True:
                wake.clear()
                with self._lock:
                    batch, closed = self._frames[sent:], self.closed
                sent += len(batch)
                if batch:
                    last_activity = time.monotonic()
                    yield b"".join(batch)
                    continue
                if closed:
                    return
                if time.monotonic() - last_activity > STREAM_IDLE_LIMIT_S:
                    yield json_frame(FRAME_END, {"status": "error", "message": "no generation arrived for this stream"})
                    return
                try:
                    await asyncio.wait_for(wake.wait(), KEEPALIVE_S)
                except asyncio.TimeoutError:
                    yield frame(FRAME_KEEPALIVE)
        finally:
            with self._lock:
                self._waiters.remove((loop, wake))
                self.readers -= 1


class JobRegistry:
    """Jobs by id. `on_played(job)` runs (in the web server's thread) when a report arrives late."""

    def __init__(self, on_played: Callable[[Job], None] | None = None):
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self.on_played = on_played

    @staticmethod
    def valid_id(job_id: str | None) -> bool:
        return bool(job_id) and bool(JOB_ID_RE.match(job_id))

    def open(self, job_id: str | None) -> Job:
        """The job with this id (made if new). A missing or malformed id gets a fresh server-side id:
        the generation still runs, only no browser is listening (e.g. an API call)."""
        if not self.valid_id(job_id):
            job_id = uuid.uuid4().hex
        self._reap()
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                job = self._jobs[job_id] = Job(job_id)
            return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def cancel(self, job_id: str | None) -> bool:
        """Set the job's cancel Event. An id not seen yet is remembered, so a generation still
        waiting in the queue stops as soon as it starts."""
        if not self.valid_id(job_id):
            return False
        self.open(job_id).cancel.set()
        return True

    def _reap(self) -> None:
        now = time.monotonic()
        with self._lock:
            for key, job in list(self._jobs.items()):
                done_for = now - job.finished_at if job.finished_at is not None else None
                if (done_for is not None and done_for > FINISHED_TTL_S) or (
                        done_for is None and job.readers == 0 and now - job.created > STREAM_IDLE_LIMIT_S):
                    del self._jobs[key]

    def __len__(self) -> int:
        return len(self._jobs)

    # -- web routes ----------------------------------------------------------------------------
    def routes(self) -> list:
        """Starlette routes for FastAPI(routes=...) (Gradio: `app_kwargs={"routes": ...}`)."""
        from starlette.requests import Request
        from starlette.responses import JSONResponse, StreamingResponse
        from starlette.routing import Route

        async def stream(request: Request):
            job_id = request.path_params["job_id"]
            if not self.valid_id(job_id):
                return JSONResponse({"error": "a job id is 32 lowercase hex digits"}, status_code=400)
            job = self.open(job_id)
            return StreamingResponse(job.frames(), media_type="application/octet-stream",
                                     headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

        async def played(request: Request):
            job = self.get(request.path_params["job_id"])
            if job is None:
                return JSONResponse({"error": "unknown job"}, status_code=404)
            try:
                data = await request.json()
            except ValueError:
                return JSONResponse({"error": "send a JSON object"}, status_code=400)
            if not isinstance(data, dict):
                return JSONResponse({"error": "send a JSON object"}, status_code=400)
            job.report_played(data)
            if job.played is not None and job.record_id and self.on_played is not None:
                await asyncio.to_thread(self.on_played, job)
            return JSONResponse({"ok": True, "played": job.played})

        return [Route(ROUTE_PREFIX + "/stream/{job_id}", stream, methods=["GET"]),
                Route(ROUTE_PREFIX + "/stream/{job_id}/played", played, methods=["POST"])]
