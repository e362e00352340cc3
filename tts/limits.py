"""Request limits, one definition for every surface (page, CLI, API, the Triton models).

Pure Python (no numpy, no torch, no Triton): the Triton model adapters import it inside their
stubs and `studio.limits` re-exports it for the app side. Every value can be changed through an
environment variable; the embedded tritonserver inherits the app's environment, so the page, the
CLI and the models always apply the same numbers. A request over a limit raises `LimitError`,
whose message names the limit and the variable that sets it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

#: F5 plans sentence chunks and Spark decodes sentence groups, so a few thousand characters is
#: already minutes of speech; 100 kB of text made 10,491 s of audio and ~13 GB of server memory.
DEFAULT_MAX_TEXT_CHARS = {"f5": 5000, "spark": 5000}
#: A transcript of a prompt of at most DEFAULT_MAX_PROMPT_S seconds needs far fewer characters.
DEFAULT_MAX_REF_TEXT_CHARS = 1000
#: F5 uses ~12 s of a prompt and Spark ~30 s (longer ones are clipped); a minute is generous but
#: keeps a hostile prompt from filling the servers' memory (an hour at 24 kHz is 346 MB of float32).
DEFAULT_MAX_PROMPT_S = 60.0
#: Uploaded files (prompt clips, text files) in megabytes; a minute of 48 kHz stereo 32-bit WAV is 23 MB.
DEFAULT_MAX_UPLOAD_MB = 50.0
#: Generations one client (one page visitor's address, one API key) may run at the same time.
DEFAULT_MAX_CLIENT_REQUESTS = 4
#: Seconds a request may take from its arrival until its last audio; the client waits as long.
DEFAULT_REQUEST_DEADLINE_S = 600.0

#: The environment variables, by limit (the README lists them).
ENV = {
    "max_text_chars_f5": "STUDIO_MAX_TEXT_CHARS_F5",
    "max_text_chars_spark": "STUDIO_MAX_TEXT_CHARS_SPARK",
    "max_ref_text_chars": "STUDIO_MAX_REF_TEXT_CHARS",
    "max_prompt_s": "STUDIO_MAX_PROMPT_S",
    "max_upload_mb": "STUDIO_MAX_UPLOAD_MB",
    "max_client_requests": "STUDIO_MAX_CLIENT_REQUESTS",
    "request_deadline_s": "STUDIO_REQUEST_DEADLINE_S",
}


class LimitError(ValueError):
    """A request over one of the limits; the message names the limit and its variable."""


@dataclass(frozen=True)
class Limits:
    max_text_chars_f5: int = DEFAULT_MAX_TEXT_CHARS["f5"]        # characters of target text per F5 request
    max_text_chars_spark: int = DEFAULT_MAX_TEXT_CHARS["spark"]  # characters of target text per Spark request
    max_ref_text_chars: int = DEFAULT_MAX_REF_TEXT_CHARS         # characters of the prompt's transcript
    max_prompt_s: float = DEFAULT_MAX_PROMPT_S                   # seconds of prompt audio
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB                 # megabytes per uploaded file
    max_client_requests: int = DEFAULT_MAX_CLIENT_REQUESTS       # generations at once per client
    request_deadline_s: float = DEFAULT_REQUEST_DEADLINE_S       # seconds per request, end to end

    def max_text_chars(self, family: str) -> int:
        return self.max_text_chars_spark if family == "spark" else self.max_text_chars_f5

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1_000_000)


def _env_number(name: str, default, kind):
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(float(raw)) if kind is int else kind(raw)
    except ValueError:
        raise LimitError(f"{name}={raw!r} is not a number") from None
    if value <= 0:
        raise LimitError(f"{name} must be positive, got {raw!r}")
    return value


def current_limits() -> Limits:
    """The limits in force: the defaults, each overridden by its environment variable when set.
    Read on every call (cheap), so a test or an operator changing a variable needs no restart of
    the app side; the Triton models read the environment they were started with."""
    base = Limits()
    values = {}
    for field_name, env_name in ENV.items():
        default = getattr(base, field_name)
        values[field_name] = _env_number(env_name, default, type(default))
    return Limits(**values)


def check_text(family: str, text: str, limits: Limits | None = None, what: str = "target text") -> None:
    """LimitError when `text` is longer than the family's character limit."""
    lim = limits or current_limits()
    cap = lim.max_text_chars(family)
    if len(text) > cap:
        var = ENV[f"max_text_chars_{'spark' if family == 'spark' else 'f5'}"]
        raise LimitError(f"the {what} has {len(text)} characters; the limit for {family} is {cap} "
                         f"(text length limit, {var}): split it into parts")


def check_ref_text(text: str, limits: Limits | None = None) -> None:
    lim = limits or current_limits()
    if len(text) > lim.max_ref_text_chars:
        raise LimitError(f"the reference text has {len(text)} characters; the limit is {lim.max_ref_text_chars} "
                         f"(reference text length limit, {ENV['max_ref_text_chars']})")


def check_prompt(samples: int, sample_rate: int, limits: Limits | None = None) -> None:
    """LimitError when a prompt of `samples` at `sample_rate` Hz is longer than the prompt limit."""
    lim = limits or current_limits()
    seconds = samples / float(sample_rate)
    if seconds > lim.max_prompt_s:
        raise LimitError(f"the prompt clip is {seconds:.1f} s long; the limit is {lim.max_prompt_s:g} s "
                         f"(prompt duration limit, {ENV['max_prompt_s']}): use a clip of 3-12 s")


def check_upload(size_bytes: int, what: str = "uploaded file", limits: Limits | None = None) -> None:
    lim = limits or current_limits()
    if size_bytes > lim.max_upload_bytes:
        raise LimitError(f"the {what} is {size_bytes / 1e6:.1f} MB; the limit is {lim.max_upload_mb:g} MB "
                         f"(upload size limit, {ENV['max_upload_mb']})")


def check_request(family: str, text: str, ref_text: str, prompt_samples: int, sample_rate: int,
                  limits: Limits | None = None) -> None:
    """Every per-request limit at once (what the Triton engines check before doing any work)."""
    lim = limits or current_limits()
    check_text(family, text, lim)
    check_ref_text(ref_text, lim)
    check_prompt(prompt_samples, sample_rate, lim)
