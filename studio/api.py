"""An OpenAI-compatible speech API on the page's own web server (same process, same port).

    POST   /v1/audio/speech            text -> audio (OpenAI's request; extension fields below)
    GET    /v1/models                  the models this studio serves, plus OpenAI's names it accepts
    GET    /v1/models/{id}
    GET    /v1/audio/voices            saved voices, shipped samples, OpenAI's voice names
    POST   /v1/audio/voices            multipart: name, audio, transcript -> a saved voice
    DELETE /v1/audio/voices/{name}
    GET    /v1/studio/requests/{id}    the figures of one request (its X-Request-Id), from the history

`api_routes(runtime)` returns Starlette routes for the Gradio app's FastAPI (`app_kwargs["routes"]`).
Everything goes through the page's `StudioRuntime`: the same Triton client, voice library, history
and generation slots (`studio/slots.py`: STUDIO_CONCURRENCY at once for page and API together; API
callers beyond STUDIO_API_QUEUE waiting get 429 with Retry-After).

Speech requests. `model`: `f5-tts`, `spark-tts`, or OpenAI's `tts-1`, `tts-1-hd`, `gpt-4o-mini-tts`
(mapped to STUDIO_API_DEFAULT_MODEL, default f5-tts). `voice`: a saved voice or a shipped sample (by
name), one of OpenAI's built-in names (mapped to samples, STUDIO_API_VOICES="alloy=NAME,..." changes
the map), or `create` with spark-tts (voice creation). `input`: up to 4096 characters. `speed` 0.25-4
(F5 clamps to 0.3-3; Spark cloning has none; Spark voice creation picks the nearest speed level).
`instructions`: read only for Spark voice creation (gender, pitch and speed words); otherwise ignored
with a note. `stream_format`: absent = one finished file with the figures in headers; `audio` = the
encoded stream as it is produced (X-Request-Id; the figures go to the history under that id); `sse` =
`speech.audio.delta` events with base64 audio, then `speech.audio.done` carrying the figures.
Extension fields: `ref_audio` (base64 or a data: URL) and `ref_text` to clone without a saved voice,
and the families' own controls, checked by the system grammar (`studio/systems.py`).

Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with matching statuses.
No torch here.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import calendar
import hashlib
import json
import math
import os
import re
import secrets
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from studio.api_audio import FORMATS, AudioEncoder, encode_whole
from studio.slots import API_QUEUE, SlotsFull
from studio.systems import KEYS, SystemSpecError, format_value, parse_system
from studio.voices import VOICE_SAMPLE_RATE, VoiceError

PREFIX = "/v1"
#: OpenAI's limit on `input` (characters).
MAX_INPUT_CHARS = 4096
#: `instructions` longer than this are refused (OpenAI's own limit is the same order).
MAX_INSTRUCTIONS_CHARS = 4096
#: Room for the multipart framing and the text fields of a voice upload, beyond the clip itself.
FORM_OVERHEAD_BYTES = 64 * 1024
#: OpenAI's accepted `speed` range.
OPENAI_SPEED_RANGE = (0.25, 4.0)
DEFAULT_FORMAT = "mp3"
STREAM_FORMATS = ("audio", "sse")
#: Our model ids -> studio families, and OpenAI's model names, answered by the configured default.
MODELS = {"f5-tts": "f5", "spark-tts": "spark"}
OPENAI_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")
#: A fixed creation time for /v1/models (OpenAI lists one; ours are the published checkpoints').
MODEL_CREATED = 1735689600  # 2025-01-01
OWNER = "voice-studio"
#: OpenAI's built-in voice names -> shipped samples, so clients that default to `alloy` work.
OPENAI_VOICES = {
    "alloy": "en_female", "ash": "en_male", "ballad": "en_male", "coral": "en_female", "echo": "en_male",
    "fable": "en_male", "onyx": "en_male", "nova": "en_female", "sage": "en_female", "shimmer": "en_female",
    "verse": "en_male",
}
#: The voice name that asks spark-tts for voice creation (no prompt clip).
CREATE_VOICE = "create"
#: Extension fields of a speech request: the families' own controls (system grammar keys), except F5's
#: `speed`, which is OpenAI's own field here (0.25-4, clamped for F5).
EXTENSION_KEYS = tuple(dict.fromkeys(k.name for keys in KEYS.values() for k in keys if k.name != "speed"))
OPENAI_FIELDS = ("model", "input", "voice", "response_format", "speed", "instructions", "stream_format")
CLONE_FIELDS = ("ref_audio", "ref_text")
#: Speaking-rate factor of each Spark speed level (moderate = the model's natural rate), for mapping
#: OpenAI's `speed` onto the nearest level on a log scale.
SPEED_LEVEL_FACTORS = {"very_low": 0.5, "low": 0.75, "moderate": 1.0, "high": 1.33, "very_high": 2.0}
#: Words in `instructions` that Spark voice creation understands (first match per aspect wins;
#: "very ..." is tried before the plain word).
INSTRUCTION_WORDS = {
    "gender": (("female", r"\b(female|woman|girl|feminine|she)\b"), ("male", r"\b(male|man|boy|masculine|he)\b")),
    "pitch_level": (("very_high", r"\bvery\s+high[\s-]*pitch"), ("very_low", r"\bvery\s+(low[\s-]*pitch|deep)\b"),
                    ("high", r"\bhigh[\s-]*pitch"), ("low", r"\b(low[\s-]*pitch|deep)\b"),
                    ("moderate", r"\b(moderate|medium|normal|average)[\s-]*pitch")),
    "speed_level": (("very_high", r"\bvery\s+(fast|quick)"), ("very_low", r"\bvery\s+slow"),
                    ("high", r"\b(fast|quick(ly)?|rapid(ly)?)\b"), ("low", r"\bslow(ly)?\b"),
                    ("moderate", r"\b(moderate|medium|normal|average)\s+(speed|pace|rate)")),
}
#: Response headers with the figures (DESIGN.md "Metrics": latency, first chunk, audio seconds, RTF).
HEADER_PREFIX = "X-Studio-"


# --- errors --------------------------------------------------------------------------------------------
class ApiError(Exception):
    """One bad request or failure, answered in OpenAI's error shape with `status`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or ("server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_response(err: ApiError):
    from starlette.responses import JSONResponse

    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def bad(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


# --- configuration -------------------------------------------------------------------------------------
def default_model() -> str:
    """Our model id answering OpenAI's model names (env STUDIO_API_DEFAULT_MODEL, default f5-tts)."""
    value = os.environ.get("STUDIO_API_DEFAULT_MODEL", "f5-tts").strip()
    if value not in MODELS:
        raise ValueError(f"STUDIO_API_DEFAULT_MODEL must be one of {', '.join(MODELS)}, got {value!r}")
    return value


def voice_map() -> dict[str, str]:
    """OpenAI voice name -> studio voice, with STUDIO_API_VOICES ("alloy=my_voice,echo=en_male") applied."""
    mapping = dict(OPENAI_VOICES)
    raw = os.environ.get("STUDIO_API_VOICES", "").strip()
    for item in filter(None, (x.strip() for x in raw.split(","))):
        name, eq, target = item.partition("=")
        if not eq or not name.strip() or not target.strip():
            raise ValueError(f"STUDIO_API_VOICES items are NAME=VOICE separated by commas; got {item!r}")
        mapping[name.strip()] = target.strip()
    return mapping


# --- request parsing -------------------------------------------------------------------------------------
@dataclass
class SpeechPlan:
    """A checked speech request, ready to send."""

    model_id: str                   # f5-tts | spark-tts (after mapping OpenAI's names)
    requested_model: str            # as the client wrote it
    request: Any                    # studio.ui_generate.GenerationRequest
    response_format: str
    stream_format: str | None       # None | audio | sse
    voice: str | None               # what the client asked for (None with ref_audio)
    notes: list[str] = field(default_factory=list)

    @property
    def family(self) -> str:
        return MODELS[self.model_id]


def _string(body: dict, name: str, *, required: bool = False, limit: int | None = None) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise bad(f"you must provide '{name}'", name, "missing_required_parameter")
        return None
    if not isinstance(value, str):
        raise bad(f"'{name}' must be a string, not {type(value).__name__}", name, "invalid_type")
    if limit is not None and len(value) > limit:
        raise bad(f"'{name}' has {len(value)} characters; the most is {limit}", name, "string_above_max_length")
    return value


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(f"'{name}' must be a number between {low:g} and {high:g}, not {value!r}", name, "invalid_type")
    if not low <= value <= high:
        raise bad(f"'{name}' must be between {low:g} and {high:g}; got {value:g}", name)
    return float(value)


def resolve_model(name: str) -> str:
    if name in MODELS:
        return name
    if name in OPENAI_MODELS:
        return default_model()
    raise ApiError(404, f"the model '{name}' does not exist here; use one of {', '.join(MODELS)} (or "
                   f"{', '.join(OPENAI_MODELS)}, which mean {default_model()})", param="model",
                   code="model_not_found")


def decode_ref_audio(value) -> bytes:
    """`ref_audio` as file bytes: base64, or a data: URL with base64 content."""
    if not isinstance(value, str) or not value.strip():
        raise bad("'ref_audio' must be a base64 string or a data: URL holding an audio file", "ref_audio",
                  "invalid_type")
    data = value.strip()
    if data.startswith("data:"):
        header, comma, data = data.partition(",")
        if not comma or ";base64" not in header:
            raise bad("'ref_audio' as a data: URL must be base64-encoded (data:audio/wav;base64,...)", "ref_audio",
                      "invalid_audio")
    data = re.sub(r"\s+", "", data)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad("'ref_audio' is not valid base64", "ref_audio", "invalid_audio") from None
    if not raw:
        raise bad("'ref_audio' decodes to 0 bytes", "ref_audio", "invalid_audio")
    return raw


def extension_params(body: dict, family: str) -> dict:
    """The families' own controls from the body, checked by the system grammar: each key alone (so an
    error names its field), then all together (rules across keys, e.g. min <= max new tokens)."""
    items = {}
    for key in EXTENSION_KEYS:
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, (dict, list)) or (isinstance(value, str) and ("," in value or "=" in value)):
            raise bad(f"'{key}' must be a single value, not {value!r}", key, "invalid_type")
        text = format_value(value)
        # Levels need a gender to parse on their own (voice creation); the real gender is checked below.
        alone = f"{family}:{key}={text}" + (",gender=female" if key in ("pitch_level", "speed_level") else "")
        try:
            parse_system(alone)
        except SystemSpecError as exc:
            raise bad(grammar_message(exc), key) from None
        items[key] = text
    if not items:
        return {}
    try:
        return parse_system(f"{family}:" + ",".join(f"{k}={v}" for k, v in items.items())).options
    except SystemSpecError as exc:
        raise bad(grammar_message(exc)) from None


def grammar_message(exc: SystemSpecError) -> str:
    """The grammar's message without its "system 'f5:...': " lead (the API caller wrote no system string)."""
    return re.sub(r"^system '[^']*': ", "", str(exc))


def nearest_speed_level(speed: float) -> str:
    """OpenAI's speed factor -> the Spark speed level whose factor is nearest on a log scale."""
    return min(SPEED_LEVEL_FACTORS, key=lambda lvl: abs(math.log(SPEED_LEVEL_FACTORS[lvl]) - math.log(speed)))


def read_instructions(text: str) -> dict[str, str]:
    """Spark voice-creation choices named in `instructions`: {gender, pitch_level, speed_level} found."""
    low = text.lower()
    found = {}
    for aspect, patterns in INSTRUCTION_WORDS.items():
        for value, pattern in patterns:
            if re.search(pattern, low):
                found[aspect] = value
                break
    return found


def parse_speech(body: dict, rt) -> SpeechPlan:
    """Check a speech request body against OpenAI's fields and ours; ApiError names the field at fault."""
    from studio.ui_generate import InputProblem, clone_request, design_request

    unknown = sorted(k for k in body if k not in OPENAI_FIELDS + CLONE_FIELDS + EXTENSION_KEYS)
    if unknown:
        raise bad(f"unrecognized request argument(s): {', '.join(unknown)}", unknown[0], "unknown_parameter")
    requested = _string(body, "model", required=True)
    model_id = resolve_model(requested)
    family = MODELS[model_id]
    text = _string(body, "input", required=True, limit=MAX_INPUT_CHARS)
    if not text.strip():
        raise bad("'input' is empty; give the text to speak", "input", "empty_string")
    fmt = _string(body, "response_format") or DEFAULT_FORMAT
    if fmt not in FORMATS:
        raise bad(f"'response_format' {fmt!r} is not supported; use one of {', '.join(FORMATS)}", "response_format")
    stream_format = _string(body, "stream_format")
    if stream_format is not None and stream_format not in STREAM_FORMATS:
        raise bad(f"'stream_format' must be 'audio' or 'sse', not {stream_format!r}", "stream_format")
    speed = _number(body, "speed", 1.0, *OPENAI_SPEED_RANGE)
    instructions = (_string(body, "instructions", limit=MAX_INSTRUCTIONS_CHARS) or "").strip()
    voice = body.get("voice")
    if isinstance(voice, dict):  # OpenAI's newer {"id": "..."} form of a custom voice
        voice = voice.get("id")
    if voice is not None and not isinstance(voice, str):
        raise bad("'voice' must be a voice name (string)", "voice", "invalid_type")
    ref_audio = body.get("ref_audio")
    ref_text = _string(body, "ref_text", limit=2000)
    params = extension_params(body, family)
    mode = "streaming" if stream_format else "offline"
    notes: list[str] = []

    creation = family == "spark" and ("gender" in params or voice == CREATE_VOICE and not _is_voice(rt, voice))
    if creation:
        if ref_audio is not None:
            raise bad("voice creation (gender or voice 'create') takes no 'ref_audio'; drop one of them", "ref_audio")
        said = read_instructions(instructions) if instructions else {}
        choice = {k: params.pop(k, None) for k in ("gender", "pitch_level", "speed_level")}
        taken = []
        for aspect, value in said.items():
            if choice[aspect] is None:
                choice[aspect] = value
                taken.append(f"{aspect}={value}")
        if instructions:
            notes.append(f"instructions read for voice creation: {', '.join(taken)}" if taken else
                         "instructions named no gender, pitch or speed words; they were ignored")
        if choice["gender"] is None:
            raise bad("voice creation needs a gender: set 'gender' to female or male, or say it in 'instructions'",
                      "gender", "missing_required_parameter")
        if choice["speed_level"] is None and speed != 1.0:
            choice["speed_level"] = nearest_speed_level(speed)
            notes.append(f"speed {speed:g} mapped to speed_level={choice['speed_level']}")
        elif speed != 1.0:
            notes.append(f"speed {speed:g} ignored: speed_level={choice['speed_level']} was given")
        if voice not in (None, CREATE_VOICE):
            notes.append(f"voice {voice!r} ignored: voice creation makes a new voice")
        try:
            req = design_request(mode=mode, text=text, gender=choice["gender"], pitch=choice["pitch_level"] or
                                 "moderate", speed=choice["speed_level"] or "moderate", params=params)
        except InputProblem as exc:
            raise bad(str(exc)) from None
        return SpeechPlan(model_id, requested, req, fmt, stream_format, voice, notes + list(req.warnings))

    if instructions:
        notes.append(f"instructions are not supported by {model_id} (only Spark voice creation reads them); "
                     "they were ignored")
    if family == "f5":
        used = min(max(speed, 0.3), 3.0)
        if used != speed:
            notes.append(f"speed {speed:g} is outside F5-TTS's 0.3-3.0; {used:g} was used")
        if used != 1.0:
            params["speed"] = used
    elif speed != 1.0:
        notes.append(f"speed {speed:g} ignored: Spark-TTS cloning has no speed control")

    if ref_audio is not None:
        source, where, label = decode_ref_audio(ref_audio), "ref_audio", None
        if voice is not None:
            notes.append(f"voice {voice!r} ignored: ref_audio was given")
        prompt_text = ref_text or ""
    else:
        if voice is None:
            raise bad("you must provide 'voice' (a saved voice, a sample, or one of OpenAI's names) or 'ref_audio'",
                      "voice", "missing_required_parameter")
        found = find_voice(rt, voice)
        source, where, label = found.audio_path, "voice", found.label
        prompt_text = ref_text if ref_text is not None else found.transcript
        if ref_text is not None:
            notes.append("ref_text given: it replaces the voice's saved transcript")
    try:
        with prompt_file(source) as path:
            req = clone_request(model=family, mode=mode, ref_audio_path=path, ref_text=prompt_text, text=text,
                                params=params, voice=label)
    except InputProblem as exc:
        raise bad(str(exc), where, "invalid_audio" if where == "ref_audio" else "invalid_value") from None
    if family == "f5" and not req.ref_text:  # F5 needs the transcript: speech recognition fills it in
        from dataclasses import replace

        from studio.client import SAMPLE_RATES
        from studio.objective import fill_transcript

        try:
            filled, _, note = fill_transcript(rt.client(), req.ref_audio, SAMPLE_RATES["f5"])
        except ValueError as exc:
            raise bad(f"{exc} (or send 'ref_text')", "ref_text", "missing_required_parameter") from None
        req = replace(req, ref_text=filled)
        notes.append(note)
    return SpeechPlan(model_id, requested, req, fmt, stream_format, voice, notes + list(req.warnings))


@contextmanager
def prompt_file(source):
    """A path for the page's prompt checks (size limit, decoding, validation): a library voice's own file,
    or the decoded `ref_audio` bytes in a temporary file removed afterwards."""
    if not isinstance(source, (bytes, bytearray)):
        yield source
        return
    fd, name = tempfile.mkstemp(prefix="studio-api-prompt-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(source)
        yield name
    finally:
        os.unlink(name)


def _is_voice(rt, name: str) -> bool:
    try:
        rt.voices.get(name)
        return True
    except VoiceError:
        return False


def find_voice(rt, name: str):
    """A library voice by name or key, else an OpenAI name's mapped voice; 400 naming what exists."""
    try:
        return rt.voices.get(name)
    except VoiceError:
        pass
    target = voice_map().get(name)
    if target is not None:
        try:
            return rt.voices.get(target)
        except VoiceError:
            raise ApiError(500, f"voice {name!r} is mapped to {target!r}, which is not in the voice library; fix "
                           "STUDIO_API_VOICES", param="voice", code="voice_not_found") from None
    known = [v.name for v in rt.voices.list()]
    raise bad(f"there is no voice {name!r}; use a saved voice or sample ({', '.join(known) or 'none saved'}), one "
              f"of {', '.join(OPENAI_VOICES)}, or '{CREATE_VOICE}' with spark-tts", "voice", "voice_not_found")


# --- running one ---------------------------------------------------------------------------------------
def figures(result) -> dict:
    """DESIGN.md's metrics of one result, rounded for headers and events."""
    return {"latency_s": round(result.latency_s, 4), "first_chunk_s": round(result.first_chunk_s, 4),
            "audio_s": round(result.audio_s, 6), "rtf": round(result.rtf, 4) if math.isfinite(result.rtf) else None}


def figure_headers(request_id: str, plan: SpeechPlan, result) -> dict:
    fmt = FORMATS[plan.response_format]
    f = figures(result)
    headers = {"X-Request-Id": request_id,
               HEADER_PREFIX + "Model": plan.model_id,
               HEADER_PREFIX + "Latency-S": str(f["latency_s"]),
               HEADER_PREFIX + "First-Chunk-S": str(f["first_chunk_s"]),
               HEADER_PREFIX + "Audio-S": str(f["audio_s"]),
               HEADER_PREFIX + "RTF": str(f["rtf"]),
               HEADER_PREFIX + "Audio-Samples": str(int(result.audio.size)),
               HEADER_PREFIX + "Model-Sample-Rate": str(result.sample_rate),
               HEADER_PREFIX + "Sample-Rate": str(fmt.output_rate(result.sample_rate)),
               HEADER_PREFIX + "Demo-Weights": "true" if result.demo_weights else "false"}
    if result.seed is not None:
        headers[HEADER_PREFIX + "Seed"] = str(result.seed)
    notes = plan.notes + list((result.info or {}).get("notes", []))
    if notes:
        headers[HEADER_PREFIX + "Notes"] = header_text(" | ".join(notes))
    return headers


def header_text(text: str) -> str:
    """Header values are Latin-1 on the wire: anything else becomes '?', line breaks become spaces."""
    return re.sub(r"[\r\n]+", " ", text).encode("latin-1", "replace").decode("latin-1")


def history_record(request_id: str, plan: SpeechPlan, status: str, result=None, error: str | None = None) -> dict:
    req = plan.request
    rec = {"id": request_id, "kind": req.kind, "model": req.model, "mode": "streaming" if req.stream else "offline",
           "status": status, "text": req.text, "ref_text": req.ref_text, "voice": req.voice or plan.voice,
           "params": dict(req.params), "source": "api", "api": {"model": plan.requested_model,
                                                                 "response_format": plan.response_format,
                                                                 "stream_format": plan.stream_format},
           "notes": " | ".join(plan.notes) or None}
    if result is not None:
        rec.update(seed=result.seed, demo_weights=result.demo_weights, info=result.info,
                   metrics={**figures(result), "chunks": len(result.chunk_arrivals_s),
                            "compute_ms": (result.info or {}).get("compute_ms")})
    else:
        rec.update(seed=req.params.get("seed"), metrics={})
    if error:
        rec["error"] = error
    return rec


def record(rt, request_id: str, plan: SpeechPlan, status: str, result=None, error: str | None = None,
           audio: np.ndarray | None = None, sample_rate: int | None = None) -> None:
    req = plan.request
    prompt_rate = None
    if req.ref_audio is not None:
        from studio.client import SAMPLE_RATES

        prompt_rate = SAMPLE_RATES[req.model]
    if result is not None:
        audio, sample_rate = result.audio, result.sample_rate
    rt.history.add(history_record(request_id, plan, status, result, error), audio, sample_rate, req.ref_audio,
                   prompt_rate)


def synthesize(rt, plan: SpeechPlan, cancel: threading.Event, on_chunk=None):
    """Send the request (the caller holds a generation slot). Raises the client's errors."""
    req = plan.request
    return rt.client().synthesize(req.model, req.text, req.ref_audio, req.ref_text, stream=req.stream,
                                  params=req.params, on_chunk=on_chunk, cancel=cancel)


def synthesis_error(exc: Exception) -> ApiError:
    """A failure of the Triton side as an OpenAI error: the server's words, 400 when it refused the input."""
    from studio.client import SynthesisError

    if isinstance(exc, SynthesisError):
        status = getattr(exc, "status", None) or ""
        if status in ("StatusCode.UNAVAILABLE",):
            return ApiError(503, f"the inference server is unavailable: {exc}", code="server_unavailable")
        if status == "StatusCode.DEADLINE_EXCEEDED":
            return ApiError(504, str(exc), code="timeout")
        if status == "StatusCode.INVALID_ARGUMENT":
            return ApiError(400, f"the model refused this request: {exc}", code="invalid_value")
        return ApiError(500, f"generation failed: {exc}", code="generation_failed")
    return ApiError(500, f"generation failed unexpectedly ({type(exc).__name__}: {exc})", code="internal_error")


def client_key(request) -> str:
    """Who an API request comes from, for STUDIO_MAX_CLIENT_REQUESTS: its bearer key (hashed: keys are
    not kept in memory as text), else its address."""
    auth = request.headers.get("authorization", "")
    if auth:
        return "api-key:" + hashlib.sha256(auth.encode()).hexdigest()[:16]
    return f"address:{request.client.host if request.client else 'unknown'}"


async def take_slot(rt, cancel: threading.Event, client_slots, client: str):
    """Admit one generation: at most STUDIO_MAX_CLIENT_REQUESTS at once for this client (429 at once
    beyond), then one of the process's generation slots (429 when too many already wait). Returns the
    function that gives both back, to be called with the seconds the generation slot was held."""
    from studio.limits import LimitError

    hold = client_slots.hold(client)
    try:
        hold.__enter__()
    except LimitError as exc:
        raise ApiError(429, str(exc), code="rate_limit_exceeded", type_="requests",
                       headers={"Retry-After": str(rt.slots.retry_after_s())}) from None
    try:
        taken = await asyncio.to_thread(rt.slots.acquire, API_QUEUE, cancel)
    except SlotsFull as exc:
        hold.__exit__(None, None, None)
        raise ApiError(429, f"the studio is busy: {exc}", code="rate_limit_exceeded", type_="requests",
                       headers={"Retry-After": str(exc.retry_after_s)}) from None
    except BaseException:
        hold.__exit__(None, None, None)
        raise
    if not taken:
        hold.__exit__(None, None, None)
        raise ApiError(499, "the request was cancelled while waiting", code="cancelled")

    def release(seconds: float) -> None:
        try:
            rt.slots.release(seconds)
        finally:
            hold.__exit__(None, None, None)
    return release


def require(rt, plan: SpeechPlan) -> None:
    from studio.ui_runtime import NotReady

    try:
        rt.require(plan.family, plan.request.stream)
    except NotReady as exc:
        raise ApiError(503, str(exc), code="model_not_ready", headers={"Retry-After": "10"}) from None


async def run_whole(rt, plan: SpeechPlan, request, request_id: str, client_slots):
    """Generate (offline model), encode the finished audio, answer with the figures in headers."""
    from starlette.responses import Response

    cancel = threading.Event()
    release = await take_slot(rt, cancel, client_slots, client_key(request))
    started = time.monotonic()
    task = asyncio.ensure_future(asyncio.to_thread(synthesize, rt, plan, cancel))
    try:
        while not task.done():  # a client that hangs up cancels its generation
            await asyncio.wait({task}, timeout=0.25)
            if not task.done() and await request.is_disconnected():
                cancel.set()
        result = task.result()
    except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI error and a history row
        from studio.client import GenerationCancelled

        status = "cancelled" if isinstance(exc, GenerationCancelled) else "error"
        await asyncio.to_thread(record, rt, request_id, plan, status, None, str(exc))
        if status == "cancelled":
            raise ApiError(499, "the client closed the connection; the generation was cancelled",
                           code="cancelled") from None
        raise synthesis_error(exc) from None
    finally:
        release(time.monotonic() - started)
    rt.note_demo(plan.family, result.demo_weights)
    data = await asyncio.to_thread(encode_whole, result.audio, result.sample_rate, plan.response_format)
    await asyncio.to_thread(record, rt, request_id, plan, "ok", result)
    return Response(data, media_type=FORMATS[plan.response_format].media_type,
                    headers=figure_headers(request_id, plan, result))


def sse_event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode("utf-8") + b"\n\n"


async def run_streamed(rt, plan: SpeechPlan, request, request_id: str, client_slots):
    """Generate through the streaming model; encode and send every chunk as it arrives (raw bytes, or
    SSE delta events). The generating thread records the outcome under `request_id` (also when the
    client leaves midway, which cancels the generation) before the stream's last bytes go out, so
    the figures are in the history when the client has the whole stream; SSE also sends them."""
    from starlette.responses import StreamingResponse

    from studio.client import SAMPLE_RATES, GenerationCancelled

    cancel = threading.Event()
    release = await take_slot(rt, cancel, client_slots, client_key(request))
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    rate = SAMPLE_RATES[plan.family]
    received: list[np.ndarray] = []  # for the history row of a stream that ends early

    def on_chunk(samples: np.ndarray, info: dict) -> None:
        received.append(samples)
        loop.call_soon_threadsafe(events.put_nowait, ("audio", samples))

    def work() -> None:
        started = time.monotonic()
        try:
            outcome = ("done", synthesize(rt, plan, cancel, on_chunk))
        except BaseException as exc:  # noqa: BLE001 - recorded, then handed to the response generator
            outcome = ("error", exc)
        finally:
            release(time.monotonic() - started)
        try:
            if outcome[0] == "done":
                rt.note_demo(plan.family, outcome[1].demo_weights)
                record(rt, request_id, plan, "ok", outcome[1])
            else:
                status = "cancelled" if isinstance(outcome[1], GenerationCancelled) else "error"
                record(rt, request_id, plan, status, None, str(outcome[1]),
                       np.concatenate(received) if received else None, rate)
        finally:
            loop.call_soon_threadsafe(events.put_nowait, outcome)

    threading.Thread(target=work, name=f"api-{request_id}", daemon=True).start()
    sse = plan.stream_format == "sse"
    encoder = AudioEncoder(plan.response_format, rate)

    def wrap(data: bytes) -> bytes:
        if not sse or not data:
            return data
        return sse_event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode("ascii")})

    async def body():
        finished = False
        try:
            while True:
                kind, payload = await events.get()
                if kind == "audio":
                    chunk = wrap(encoder.encode(payload))
                    if chunk:
                        yield chunk
                    continue
                finished = True
                if kind == "done":
                    tail = wrap(encoder.finish())
                    if tail:
                        yield tail
                    if sse:
                        yield sse_event(done_event(request_id, plan, payload))
                    return
                encoder.close()
                if sse:  # a raw audio stream can only end early; SSE can say why
                    yield sse_event({"type": "error", **synthesis_error(payload).body()})
                return
        finally:
            if not finished:  # the client went away mid-stream: stop the generation too
                cancel.set()
                encoder.close()

    headers = {"X-Request-Id": request_id, HEADER_PREFIX + "Model": plan.model_id,
               HEADER_PREFIX + "Model-Sample-Rate": str(rate),
               HEADER_PREFIX + "Sample-Rate": str(FORMATS[plan.response_format].output_rate(rate)),
               "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    demo = rt.status()["families"][plan.family].get("demo")
    if demo is not None:
        headers[HEADER_PREFIX + "Demo-Weights"] = "true" if demo else "false"
    if plan.notes:
        headers[HEADER_PREFIX + "Notes"] = header_text(" | ".join(plan.notes))
    media_type = "text/event-stream" if sse else FORMATS[plan.response_format].media_type
    return StreamingResponse(body(), media_type=media_type, headers=headers)


def done_event(request_id: str, plan: SpeechPlan, result) -> dict:
    """The final SSE event: OpenAI's `speech.audio.done` plus this studio's figures. `usage` counts what
    this studio can count: input characters and output audio tokens (Spark: semantic tokens; F5: mel
    frames at 24000 / 256 per second)."""
    info = result.info or {}
    out_tokens = int(info.get("tokens") or round(result.audio_s * 24000 / 256))
    return {"type": "speech.audio.done",
            "usage": {"input_tokens": len(plan.request.text), "output_tokens": out_tokens,
                      "total_tokens": len(plan.request.text) + out_tokens},
            "request_id": request_id, "model": plan.model_id, **figures(result),
            "audio_samples": int(result.audio.size), "sample_rate": result.sample_rate,
            "output_sample_rate": FORMATS[plan.response_format].output_rate(result.sample_rate),
            "demo_weights": bool(result.demo_weights), "seed": result.seed,
            "notes": plan.notes + list(info.get("notes", []))}


# --- routes --------------------------------------------------------------------------------------------
def check_auth(rt, request) -> None:
    """With an API key configured (--api-key / STUDIO_API_KEY), every /v1 route needs `Authorization:
    Bearer KEY`."""
    key = rt.options.api_key
    if not key:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if not given:
        raise ApiError(401, "you didn't provide an API key: send 'Authorization: Bearer KEY' (the key this studio "
                       "was started with, --api-key or STUDIO_API_KEY)", code="missing_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "incorrect API key provided", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


async def json_body(request) -> dict:
    from studio.limits import current_limits

    size = request.headers.get("content-length")
    # A base64 prompt clip is 4/3 of the file, which the studio's upload limit bounds.
    cap = current_limits().max_upload_bytes * 4 // 3 + FORM_OVERHEAD_BYTES
    if size and size.isdigit() and int(size) > cap:
        raise ApiError(413, f"the request body is {int(size) / 1e6:.1f} MB; the most is {cap / 1e6:.1f} MB (a "
                       f"base64 prompt clip of STUDIO_MAX_UPLOAD_MB={current_limits().max_upload_mb:g})",
                       code="request_too_large")
    raw = await request.body()
    try:
        body = json.loads(raw or b"null")
    except ValueError as exc:
        raise bad(f"the request body is not valid JSON ({exc})", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None, "invalid_json")
    return body


def voice_object(v) -> dict:
    created = None
    if v.created:
        try:
            created = calendar.timegm(time.strptime(v.created, "%Y-%m-%dT%H:%M:%SZ"))
        except ValueError:
            created = None
    return {"id": v.name, "object": "audio.voice", "name": v.name, "key": v.key,
            "kind": "sample" if v.read_only else "saved", "transcript": v.transcript, "seconds": v.seconds,
            "created_at": created}


def model_object(model_id: str) -> dict:
    obj = {"id": model_id, "object": "model", "created": MODEL_CREATED, "owned_by": OWNER}
    if model_id in OPENAI_MODELS:
        obj["maps_to"] = default_model()
    return obj


def api_routes(rt) -> list:
    """Starlette routes of the API over runtime `rt`, for FastAPI(routes=...)."""
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from studio.limits import ClientSlots

    client_slots = ClientSlots()  # STUDIO_MAX_CLIENT_REQUESTS per API key (or address), like the page's visitors

    def endpoint(fn):
        async def handler(request):
            try:
                check_auth(rt, request)
                return await fn(request)
            except ApiError as err:
                return error_response(err)
            except Exception as exc:  # noqa: BLE001 - a bug must still answer in the shape clients parse
                import traceback

                traceback.print_exc()
                return error_response(ApiError(500, f"internal error ({type(exc).__name__}: {exc})",
                                               code="internal_error"))
        handler.__name__ = fn.__name__
        return handler

    async def speech(request):
        body = await json_body(request)
        plan = await asyncio.to_thread(parse_speech, body, rt)  # reads the prompt clip: off the event loop
        require(rt, plan)
        from studio.history import new_id

        request_id = new_id()
        if plan.stream_format is None:
            return await run_whole(rt, plan, request, request_id, client_slots)
        return await run_streamed(rt, plan, request, request_id, client_slots)

    async def models(request):
        return JSONResponse({"object": "list", "data": [model_object(m) for m in (*MODELS, *OPENAI_MODELS)]})

    async def model(request):
        model_id = request.path_params["model"]
        if model_id not in MODELS and model_id not in OPENAI_MODELS:
            raise ApiError(404, f"the model '{model_id}' does not exist here", param="model", code="model_not_found")
        return JSONResponse(model_object(model_id))

    async def voices(request):
        listed = [voice_object(v) for v in await asyncio.to_thread(rt.voices.list)]
        names = {v["name"] for v in listed}
        aliases = [{"id": name, "object": "audio.voice", "name": name, "kind": "openai", "maps_to": target}
                   for name, target in voice_map().items() if name not in names]
        creation = {"id": CREATE_VOICE, "object": "audio.voice", "name": CREATE_VOICE, "kind": "voice_creation",
                    "models": ["spark-tts"]}
        return JSONResponse({"object": "list", "data": listed + aliases + [creation]})

    async def add_voice(request):
        from studio.limits import current_limits

        size = request.headers.get("content-length")
        cap = current_limits().max_upload_bytes + FORM_OVERHEAD_BYTES
        if size and size.isdigit() and int(size) > cap:
            raise ApiError(413, f"the upload is {int(size) / 1e6:.1f} MB; a voice clip may be at most "
                           f"{current_limits().max_upload_mb:g} MB (STUDIO_MAX_UPLOAD_MB)", code="request_too_large")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise bad("send the voice as multipart/form-data with fields name, audio (a file) and transcript",
                      None, "invalid_content_type")
        form = await request.form()
        try:
            name = form.get("name")
            upload = form.get("audio")
            transcript = form.get("transcript") or ""
            if not isinstance(name, str) or not name.strip():
                raise bad("give the voice a 'name'", "name", "missing_required_parameter")
            if name.strip().casefold() == CREATE_VOICE:
                raise bad(f"'{CREATE_VOICE}' is reserved for Spark voice creation; pick another name", "name")
            if upload is None or isinstance(upload, str):
                raise bad("attach the clip as the file field 'audio'", "audio", "missing_required_parameter")
            if not isinstance(transcript, str):
                raise bad("'transcript' must be text", "transcript", "invalid_type")
            data = await upload.read()
        finally:
            await form.close()
        voice = await asyncio.to_thread(save_voice, rt, name, data, transcript)
        return JSONResponse(voice_object(voice), status_code=201)

    async def delete_voice(request):
        name = request.path_params["name"]
        try:
            await asyncio.to_thread(rt.voices.delete, name)
        except VoiceError as exc:
            samples = {v.name for v in rt.voices.samples()}
            if "shipped sample" in str(exc) or name in samples:
                raise ApiError(403, f"{name!r} is a shipped sample voice; samples cannot be deleted", param="name",
                               code="voice_read_only", type_="permission_error") from None
            raise ApiError(404, str(exc), param="name", code="voice_not_found") from None
        return JSONResponse({"id": name, "object": "audio.voice.deleted", "deleted": True})

    async def request_figures(request):
        request_id = request.path_params["request_id"]
        try:
            rec = await asyncio.to_thread(rt.history.get, request_id)
        except KeyError:
            raise ApiError(404, f"no request {request_id!r} in this studio's history", param="request_id",
                           code="request_not_found") from None
        return JSONResponse({"id": rec["id"], "object": "studio.request", "status": rec.get("status"),
                             "model": rec.get("model"), "mode": rec.get("mode"), "metrics": rec.get("metrics"),
                             "demo_weights": rec.get("demo_weights"), "seed": rec.get("seed"),
                             "sample_rate": rec.get("sample_rate"), "notes": rec.get("notes"),
                             "error": rec.get("error"), "created": rec.get("time")})

    async def unknown(request):
        raise ApiError(404, f"Invalid URL ({request.method} {request.url.path})", code="unknown_url")

    return [
        Route(PREFIX + "/audio/speech", endpoint(speech), methods=["POST"]),
        Route(PREFIX + "/models", endpoint(models), methods=["GET"]),
        Route(PREFIX + "/models/{model:path}", endpoint(model), methods=["GET"]),
        Route(PREFIX + "/audio/voices", endpoint(voices), methods=["GET"]),
        Route(PREFIX + "/audio/voices", endpoint(add_voice), methods=["POST"]),
        Route(PREFIX + "/audio/voices/{name:path}", endpoint(delete_voice), methods=["DELETE"]),
        Route(PREFIX + "/studio/requests/{request_id}", endpoint(request_figures), methods=["GET"]),
        Route(PREFIX + "/{rest:path}", endpoint(unknown), methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
    ]


def save_voice(rt, name: str, data: bytes, transcript: str):
    """Decode an uploaded clip and store it in the voice library; 400/409 saying what is wrong."""
    from studio.audio_io import AudioInputError, load_audio
    from studio.limits import LimitError, check_upload

    try:
        check_upload(len(data), "voice clip")
    except LimitError as exc:
        raise ApiError(413, str(exc), param="audio", code="request_too_large") from None
    try:
        wav = load_audio(data, VOICE_SAMPLE_RATE)
    except AudioInputError as exc:
        raise bad(str(exc), "audio", "invalid_audio") from None
    try:
        return rt.voices.save(name, wav, VOICE_SAMPLE_RATE, transcript)
    except VoiceError as exc:
        if "exists already" in str(exc) or "just saved" in str(exc):
            raise ApiError(409, str(exc), param="name", code="voice_exists") from None
        raise bad(str(exc), "audio" if "clip" in str(exc) else "name") from None


__all__ = ["ApiError", "MAX_INPUT_CHARS", "MODELS", "OPENAI_VOICES", "SpeechPlan", "api_routes",
           "nearest_speed_level", "parse_speech", "read_instructions"]
