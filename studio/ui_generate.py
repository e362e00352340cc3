"""One generation from the page: check the inputs, run it through the client, stream it, record it.

No Gradio here (the page turns `InputProblem` into `gr.Error`), so this is testable with a fake
client. The flow for both tabs: `clone_request` / `design_request` build a `GenerationRequest` or
raise `InputProblem` with a message a person can act on; `run_generation` sends it, pushes every
chunk into the browser's stream job as the client receives it, waits briefly for the browser's
first-sound report, and appends the history row.
"""

from __future__ import annotations

import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from studio.ui_runtime import FAMILIES, NotReady, StudioRuntime
from studio.ui_stream import Job, json_frame, FRAME_META

#: Longest target text per generation (characters). F5 plans sentence chunks and Spark decodes up
#: to max_new_tokens (3000 tokens = 60 s), so a few thousand characters is minutes of speech.
MAX_TEXT_CHARS = 5000
MAX_REF_TEXT_CHARS = 1000
#: Biggest .txt file the page reads into the text box (bytes).
MAX_TEXT_FILE_BYTES = 200_000
#: F5 uses about the first 12 s of a prompt (longer ones are cut at a pause); Spark's speaker
#: tokens see the first 6 s. Longer clips still work, the user just hears a note.
LONG_PROMPT_S = 12.0
#: How long the handler waits after the last audio for the browser's first-sound report (s).
PLAYED_WAIT_S = 1.5
LEVELS = ("very_low", "low", "moderate", "high", "very_high")
GENDERS = ("female", "male")
SEED_MAX = 2**63 - 1
#: Scripts the models were trained on; letters of any other script get a warning.
KNOWN_SCRIPTS = ("LATIN", "CJK")


class InputProblem(ValueError):
    """Something the user must change before generating; the message says what."""


@dataclass(frozen=True)
class GenerationRequest:
    kind: str                       # "clone" or "design" (Spark voice creation)
    model: str                      # "f5" or "spark"
    stream: bool
    text: str
    ref_audio: np.ndarray | None    # float32 [N] at the model's rate; None for voice creation
    ref_text: str
    params: dict = field(default_factory=dict)  # DESIGN.md option names; absent = server default
    voice: str | None = None        # the library voice used, for the history row
    warnings: tuple[str, ...] = ()
    checks: bool = False            # objective checks after generating (WER/CER, speaker similarity)

    @property
    def label(self) -> str:
        return FAMILIES[self.model][0]


@dataclass
class GenerationOutcome:
    status: str                 # "ok" or "cancelled"
    record: dict                # the history row as stored
    audio: np.ndarray           # float32 [N] (cancelled: what arrived before the stop)
    sample_rate: int
    metrics: dict


# --- checking inputs -------------------------------------------------------------------------------
def other_scripts(text: str) -> list[str]:
    """Names of the writing systems in `text` other than Latin and CJK (e.g. ['CYRILLIC', 'HANGUL'])."""
    found = []
    for ch in text:
        if not ch.isalpha():
            continue
        name = unicodedata.name(ch, "")
        script = name.split(" ")[0] if name else "UNKNOWN"
        if script not in KNOWN_SCRIPTS and script not in found:
            found.append(script)
    return found


def script_warning(text: str) -> str | None:
    scripts = other_scripts(text)
    if not scripts:
        return None
    names = ", ".join(s.title() for s in scripts[:4])
    return (f"The text contains {names} characters. The models were trained on English and Chinese; "
            "other scripts are accepted but will sound wrong.")


def clean_text(text: str | None, what: str = "text to speak", limit: int = MAX_TEXT_CHARS) -> str:
    text = unicodedata.normalize("NFC", text or "").strip()
    if len(text) > limit:
        raise InputProblem(f"The {what} has {len(text)} characters; one generation takes at most {limit}. "
                           "Split it into parts.")
    return text


def check_limits(model: str, text: str, ref_text: str = "", prompt: np.ndarray | None = None) -> None:
    """The per-request limits of studio/limits.py (the same the Triton models apply), as InputProblem."""
    from studio.client import SAMPLE_RATES
    from studio.limits import LimitError, check_prompt, check_ref_text, check_text

    try:
        check_text(model, text)
        check_ref_text(ref_text)
        if prompt is not None:
            check_prompt(prompt.size, SAMPLE_RATES[model])
    except LimitError as exc:
        msg = str(exc)
        raise InputProblem(msg[:1].upper() + msg[1:] + ".") from None


def parse_seed(value) -> int | None:
    """None, '' or -1 mean random; otherwise a whole number in [0, 2^63 - 1]."""
    if value is None or value == "":
        return None
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise InputProblem(f"The seed must be a whole number (or -1 for random), not {value!r}.") from None
    if not as_float.is_integer():
        raise InputProblem(f"The seed must be a whole number (or -1 for random), not {value}.")
    seed = int(as_float)
    if seed == -1:
        return None
    if not 0 <= seed <= SEED_MAX:
        raise InputProblem("The seed must be between 0 and 2^63 - 1, or -1 for random.")
    return seed


def _number(value, name: str, low: float, high: float, integer: bool = False):
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise InputProblem(f"{name} must be a number, not {value!r}.") from None
    if not np.isfinite(x) or not low <= x <= high:
        raise InputProblem(f"{name} must be between {low:g} and {high:g}; got {value}.")
    if integer:
        if not x.is_integer():
            raise InputProblem(f"{name} must be a whole number; got {value}.")
        return int(x)
    return x


def f5_params(nfe, cfg, sway, speed, seed) -> dict:
    """Ranges as the F5 models accept them (README: nfe 1-128, speed 0.3-3, cfg 0-10, sway -1..1)."""
    params = {"nfe_steps": _number(nfe, "NFE steps", 1, 128, integer=True),
              "cfg_strength": _number(cfg, "CFG strength", 0, 10),
              "sway_coef": _number(sway, "Sway sampling", -1, 1),
              "speed": _number(speed, "Speed", 0.3, 3.0)}
    seed = parse_seed(seed)
    if seed is not None:
        params["seed"] = seed
    return params


def spark_params(temperature, top_k, top_p, max_new_tokens, seed) -> dict:
    params = {"temperature": _number(temperature, "Temperature", 0.01, 5.0),
              "top_k": _number(top_k, "Top-k", 1, 10000, integer=True),
              "top_p": _number(top_p, "Top-p", 0.01, 1.0)}
    if max_new_tokens not in (None, ""):
        params["max_new_tokens"] = _number(max_new_tokens, "Max new tokens", 1, 3000, integer=True)
    seed = parse_seed(seed)
    if seed is not None:
        params["seed"] = seed
    return params


def load_prompt(path: str | Path | None, sample_rate: int) -> np.ndarray:
    """The prompt clip at the model's rate, or InputProblem saying what is wrong with it."""
    from studio.audio_io import AudioInputError, load_audio
    from tts.audio import validate_waveform

    from studio.limits import LimitError, check_file_size

    if not path:
        raise InputProblem("Upload or record a prompt clip (3-12 s of the voice to clone), or pick a voice "
                           "from the library.")
    try:
        if Path(path).is_file():  # a missing file gets the audio reader's "not found" below
            check_file_size(path, "prompt clip")  # before decoding it
        wav = load_audio(path, sample_rate)
        validate_waveform(wav, sample_rate, what="prompt clip")
    except LimitError as exc:
        raise InputProblem(f"The prompt clip cannot be used: {exc}.") from None
    except AudioInputError as exc:
        from studio.client import scrub_paths  # the message may name the upload's temp path

        raise InputProblem(f"The prompt clip cannot be used: {scrub_paths(str(exc))}") from None
    except ValueError as exc:
        msg = str(exc)
        raise InputProblem(msg[:1].upper() + msg[1:] + ".") from None
    return wav


def clone_request(*, model: str, mode: str, ref_audio_path, ref_text: str, text: str, params: dict,
                  voice: str | None = None, checks: bool = False) -> GenerationRequest:
    from studio.client import SAMPLE_RATES

    if model not in FAMILIES:
        raise InputProblem(f"Choose a model: {' or '.join(v[0] for v in FAMILIES.values())}.")
    if mode not in ("offline", "streaming"):
        raise InputProblem("Choose a mode: offline or streaming.")
    text = clean_text(text)
    if not text:
        raise InputProblem("Type the text to speak (or load a .txt file).")
    ref_text = clean_text(ref_text, "reference text", MAX_REF_TEXT_CHARS)
    wav = load_prompt(ref_audio_path, SAMPLE_RATES[model])
    check_limits(model, text, ref_text, wav)
    warnings = []
    # F5 without a reference text: run_generation fills it in with speech recognition (or says why not)
    if model == "spark" and not ref_text:
        warnings.append("No reference text: Spark-TTS clones from the audio alone (speaker tokens only), "
                        "which usually sounds less like the prompt than with its transcript.")
    seconds = wav.size / SAMPLE_RATES[model]
    if seconds > LONG_PROMPT_S:
        warnings.append(f"The prompt clip is {seconds:.0f} s long; the models use about its first "
                        f"{LONG_PROMPT_S:.0f} s (F5) or 6 s (Spark speaker tokens).")
    for t in (text, ref_text):
        w = script_warning(t)
        if w and w not in warnings:
            warnings.append(w)
    return GenerationRequest("clone", model, mode == "streaming", text, wav, ref_text, params, voice,
                             tuple(warnings), bool(checks))


def design_request(*, mode: str, text: str, gender: str, pitch: str, speed: str, params: dict,
                   checks: bool = False) -> GenerationRequest:
    """Spark-TTS voice creation: a new voice from gender, pitch and speed levels (no prompt clip)."""
    if mode not in ("offline", "streaming"):
        raise InputProblem("Choose a mode: offline or streaming.")
    text = clean_text(text)
    if not text:
        raise InputProblem("Type the text to speak.")
    if gender not in GENDERS:
        raise InputProblem("Choose a gender: female or male.")
    for name, value in (("pitch", pitch), ("speed", speed)):
        if value not in LEVELS:
            raise InputProblem(f"Choose a {name} level: {', '.join(LEVELS)}.")
    check_limits("spark", text)
    w = script_warning(text)
    return GenerationRequest("design", "spark", mode == "streaming", text, None, "",
                             {**params, "gender": gender, "pitch_level": pitch, "speed_level": speed},
                             None, (w,) if w else (), bool(checks))


def read_text_file(path: str | Path | None) -> str:
    if not path:
        return ""
    data = Path(path).read_bytes()
    if len(data) > MAX_TEXT_FILE_BYTES:
        raise InputProblem(f"The text file is {len(data) // 1000} kB; load at most {MAX_TEXT_FILE_BYTES // 1000} kB "
                           f"(one generation speaks up to {MAX_TEXT_CHARS} characters).")
    for encoding in ("utf-8-sig", "utf-16"):
        try:
            text = data.decode(encoding)
            break
        except UnicodeDecodeError:
            continue
    else:
        raise InputProblem("The text file is not UTF-8 text; save it as UTF-8 and load it again.")
    if "\x00" in text:
        raise InputProblem("That file is not plain text; load a .txt file.")
    return text.strip()


# --- running one -----------------------------------------------------------------------------------
def metrics_of(result, played: dict | None) -> dict:
    info = result.info or {}
    m = {"latency_s": round(result.latency_s, 4), "first_chunk_s": round(result.first_chunk_s, 4),
         "audio_s": round(result.audio_s, 4), "rtf": round(result.rtf, 4) if np.isfinite(result.rtf) else None,
         "chunks": len(result.chunk_arrivals_s), "compute_ms": info.get("compute_ms")}
    for key in ("tokens", "prefill_ms", "decode_ms"):
        if key in info:
            m[key] = info[key]
    if info.get("tokens") and info.get("decode_ms"):
        m["decode_tokens_per_s"] = round(info["tokens"] / (info["decode_ms"] / 1000.0), 1)
    if played:
        m.update(played)
    return m


def _base_record(req: GenerationRequest) -> dict:
    return {"kind": req.kind, "model": req.model, "mode": "streaming" if req.stream else "offline",
            "text": req.text, "ref_text": req.ref_text, "voice": req.voice,
            "params": {k: v for k, v in req.params.items()}}


def run_generation(rt: StudioRuntime, job: Job, req: GenerationRequest) -> GenerationOutcome:
    """Generate, streaming every chunk into `job`, and record it. Raises NotReady or SynthesisError
    (after finishing the job with the error and recording an error row for SynthesisError)."""
    from studio.client import SAMPLE_RATES, GenerationCancelled, SynthesisError

    rt.require(req.model, req.stream)
    client = rt.client()
    job.push(json_frame(FRAME_META, {"model": req.model, "label": req.label, "mode": "streaming" if req.stream
                                     else "offline"}))
    received: list[np.ndarray] = []
    sr = SAMPLE_RATES[req.model]

    def on_chunk(samples: np.ndarray, info: dict) -> None:
        rate = int(info.get("sample_rate", sr))
        received.append(samples)
        job.push_audio(samples, rate)

    prompt_rate = sr if req.ref_audio is not None else None
    notes: list[str] = []
    if req.model == "f5" and req.ref_audio is not None and not req.ref_text:
        from dataclasses import replace

        from studio.objective import fill_transcript

        try:
            filled, _, note = fill_transcript(client, req.ref_audio, sr)
        except ValueError as exc:
            job.finish("error", str(exc))
            raise InputProblem(str(exc)[:1].upper() + str(exc)[1:] + ".") from None
        req = replace(req, ref_text=filled)
        notes.append(note)
    try:
        # One slot of the process's STUDIO_CONCURRENCY, shared with the HTTP API (studio/slots.py);
        # Stop while waiting for it ends the generation before it reaches the server.
        if not rt.slots.acquire(cancel=job.cancel):
            raise GenerationCancelled("stopped while waiting for a free generation slot")
        held_from = time.monotonic()
        try:
            result = client.synthesize(req.model, req.text, req.ref_audio, req.ref_text, stream=req.stream,
                                       params=req.params, on_chunk=on_chunk, cancel=job.cancel)
        finally:
            rt.slots.release(time.monotonic() - held_from)
    except GenerationCancelled:
        audio = np.concatenate(received) if received else np.zeros(0, np.float32)
        job.finish("cancelled", "stopped")
        rec = rt.history.add({**_base_record(req), "status": "cancelled", "seed": req.params.get("seed"),
                              "metrics": {"audio_s": round(audio.size / sr, 4)}},
                             audio if audio.size else None, sr, req.ref_audio, prompt_rate)
        job.record_id = rec["id"]
        return GenerationOutcome("cancelled", rec, audio, sr, rec["metrics"])
    except SynthesisError as exc:
        job.finish("error", str(exc))
        rt.history.add({**_base_record(req), "status": "error", "error": str(exc), "seed": req.params.get("seed"),
                        "metrics": {}}, None, None, req.ref_audio, prompt_rate)
        raise
    except BaseException as exc:
        job.finish("error", f"{type(exc).__name__}: {exc}")
        raise
    rt.note_demo(req.model, result.demo_weights)
    job.finish("ok", "", audio_s=round(result.audio_s, 3))
    played = job.wait_played(PLAYED_WAIT_S)
    metrics = metrics_of(result, played)
    if req.checks:
        checked = objective_checks(client, req, result)
        metrics.update(checked.metrics())
        notes += checked.notes
    info = dict(result.info, notes=notes + list(result.info.get("notes") or [])) if notes else result.info
    rec = rt.history.add({**_base_record(req), "status": "ok", "seed": result.seed,
                          "demo_weights": result.demo_weights, "metrics": metrics, "info": info},
                         result.audio, result.sample_rate, req.ref_audio, prompt_rate)
    job.record_id = rec["id"]
    if played is None and job.played is not None:  # arrived while the row was being written
        rt.history.update(rec["id"], metrics=dict(job.played))
        metrics.update(job.played)
    return GenerationOutcome("ok", rec, result.audio, result.sample_rate, metrics)


def objective_checks(client, req: GenerationRequest, result):
    """WER/CER and speaker similarity of one generation (studio/objective.py); a note when the check
    models are not served. Never raises: a check that cannot be made is a note."""
    from studio.client import SAMPLE_RATES
    from studio.objective import CheckResult, run_checks

    if not (client.model_ready("asr") or client.model_ready("speaker_sim")):
        return CheckResult(notes=["objective checks are on, but this server has no check models "
                                  "(started with --no-asr?)"])
    try:
        return run_checks(client, result.audio, result.sample_rate, req.text, req.ref_audio,
                          SAMPLE_RATES[req.model] if req.ref_audio is not None else None)
    except Exception as exc:  # noqa: BLE001 - a failed check must not lose the generation
        return CheckResult(notes=[f"objective checks failed: {exc}"])


__all__ = ["GenerationOutcome", "GenerationRequest", "InputProblem", "NotReady", "clone_request", "design_request",
           "f5_params", "spark_params", "read_text_file", "run_generation", "script_warning"]
