"""The system grammar: one parser for batch runs, listening tests, multi-voice script tags and the API.

A *system* is a way to produce audio for a test row:

    f5                                   F5-TTS with the server's defaults
    f5:nfe_steps=16,cfg_strength=2.5     keys are exactly the Triton input names (DESIGN.md "Inputs")
    spark:temperature=0.6,top_k=1,stream the bare flag `stream` uses the streaming model
    spark:gender=female,pitch_level=high Spark voice creation (no prompt clip)
    files:/path/to/folder                pre-made audio: one WAV per row, named ROW_ID.wav

`parse_system(text)` checks every value against the ranges below (the ranges the models accept;
a value accepted here is never refused by the server for its range) and raises `SystemSpecError`
naming the system, the key and the problem. `System.spec` is the canonical string: keys in the
family's order, numbers in their shortest form, `stream` last; `parse_system(s.spec) == s`.

No torch here. Spark's ranges and voice-creation names come from `tts.spark.request` /
`tts.spark.prompts` (plain Python); F5's live in `tts/f5/pipeline.py`, which imports torch, so they
are repeated below and a test keeps the two equal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tts.spark.prompts import GENDERS as _SPARK_GENDERS
from tts.spark.prompts import LEVELS as _SPARK_LEVELS
from tts.spark.request import MAX_NEW_TOKENS_RANGE, TEMPERATURE_RANGE

# --- accepted ranges (inclusive unless said otherwise) --------------------------------------------------
#: F5 (same as tts.f5.pipeline; tests/test_systems.py checks it).
NFE_RANGE = (1, 128)
CFG_RANGE = (0.0, 10.0)
SWAY_RANGE = (-1.0, 1.0)
SPEED_RANGE = (0.3, 3.0)
#: Spark: top_k 0 switches the filter off and 1 is greedy; the upper bound is what INT32 carries.
TOP_K_RANGE = (0, 2**31 - 1)
#: Spark: nucleus mass, 0 excluded (nothing would be kept).
TOP_P_RANGE = (0.0, 1.0)
#: Spark: end tokens are ignored until this many exist; never more than max_new_tokens.
MIN_NEW_TOKENS_RANGE = (0, MAX_NEW_TOKENS_RANGE[1])
#: The server's max_new_tokens when none is sent (DESIGN.md), for the min <= max check.
DEFAULT_MAX_NEW_TOKENS = 3000
#: Seeds are INT64 on the wire; the models take non-negative ones.
SEED_RANGE = (0, 2**63 - 1)
GENDERS = tuple(_SPARK_GENDERS)
LEVELS = tuple(_SPARK_LEVELS)

FAMILIES = ("f5", "spark")
FILES = "files"
STREAM_FLAG = "stream"


@dataclass(frozen=True)
class Key:
    """One system key: a Triton input, its type and accepted values."""

    name: str
    kind: str                       # int | float | bool | choice
    low: float | None = None
    high: float | None = None
    low_open: bool = False          # low itself is refused
    choices: tuple[str, ...] = ()
    help: str = ""

    def describe(self) -> str:
        if self.kind == "choice":
            return f"one of {', '.join(self.choices)}"
        if self.kind == "bool":
            return "true or false"
        what = "a whole number" if self.kind == "int" else "a number"
        left = "(" if self.low_open else "["
        return f"{what} in {left}{_fmt_num(self.low)}, {_fmt_num(self.high)}]"


_SEED = Key("seed", "int", *SEED_RANGE, help="fixed seed (absent: random; the used seed is recorded)")
_CACHE = Key("use_prompt_cache", "bool", help="false measures a cold prompt")
#: Keys per family, in canonical order (the order of DESIGN.md's input table).
KEYS: dict[str, tuple[Key, ...]] = {
    "f5": (
        Key("nfe_steps", "int", *NFE_RANGE, help="ODE steps (default 32; 16 is the fast setting)"),
        Key("cfg_strength", "float", *CFG_RANGE, help="classifier-free guidance (default 2)"),
        Key("sway_coef", "float", *SWAY_RANGE, help="sway sampling (default -1)"),
        Key("speed", "float", *SPEED_RANGE, help="> 1 speaks faster (default 1)"),
        _SEED, _CACHE,
    ),
    "spark": (
        Key("temperature", "float", *TEMPERATURE_RANGE, help="0 = greedy (default 0.8)"),
        Key("top_k", "int", *TOP_K_RANGE, help="1 = greedy, 0 = off (default 50)"),
        Key("top_p", "float", *TOP_P_RANGE, low_open=True, help="nucleus mass (default 0.95)"),
        Key("max_new_tokens", "int", *MAX_NEW_TOKENS_RANGE, help="per text segment; 50 tokens = 1 s (default 3000)"),
        Key("min_new_tokens", "int", *MIN_NEW_TOKENS_RANGE, help="ignore the end token before this many"),
        _SEED, _CACHE,
        Key("gender", "choice", choices=GENDERS, help="voice creation (then no prompt clip)"),
        Key("pitch_level", "choice", choices=LEVELS, help="voice creation"),
        Key("speed_level", "choice", choices=LEVELS, help="voice creation"),
    ),
}
_KEYS_BY_NAME = {fam: {k.name: k for k in keys} for fam, keys in KEYS.items()}
VOICE_CREATION_KEYS = ("gender", "pitch_level", "speed_level")
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


class SystemSpecError(ValueError):
    """A system string that cannot be used; the message names the system, the key and the problem."""


@dataclass(frozen=True)
class System:
    """A parsed system. `params` are typed Triton inputs in canonical order (a tuple, so it hashes)."""

    family: str                               # f5 | spark | files
    params: tuple[tuple[str, Any], ...] = ()
    stream: bool = False
    folder: str | None = None                 # files: the folder of ROW_ID.wav files

    @property
    def is_files(self) -> bool:
        return self.family == FILES

    @property
    def voice_creation(self) -> bool:
        """Spark voice creation: gender (and levels) instead of a prompt clip."""
        return self.family == "spark" and any(k == "gender" for k, _ in self.params)

    @property
    def options(self) -> dict:
        """The Triton request options (everything but `stream`), ready for StudioClient.synthesize."""
        return dict(self.params)

    @property
    def spec(self) -> str:
        """The canonical string; parses back to an equal System."""
        if self.is_files:
            return f"{FILES}:{self.folder}"
        parts = [f"{k}={format_value(v)}" for k, v in self.params]
        if self.stream:
            parts.append(STREAM_FLAG)
        return self.family + (":" + ",".join(parts) if parts else "")

    def __str__(self) -> str:
        return self.spec


def _fmt_num(value) -> str:
    if isinstance(value, float):
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    return str(value)


def format_value(value) -> str:
    """A typed value as the grammar writes it (true/false, shortest round-tripping number, text)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return _fmt_num(value)


def _typed(spec: str, key: Key, raw: str):
    """`raw` as `key`'s type, range-checked; SystemSpecError naming the key otherwise."""
    def bad(problem: str):
        raise SystemSpecError(f"system {spec!r}: {key.name}={raw!r} {problem}; {key.name} takes {key.describe()}")

    if raw == "":
        bad("has no value")
    if key.kind == "choice":
        if raw not in key.choices:
            bad("is not a known value")
        return raw
    if key.kind == "bool":
        low = raw.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        bad("is not true or false")
    try:
        number = float(raw)
    except ValueError:
        bad("is not a number")
    if not math.isfinite(number):
        bad("is not a finite number")
    if key.kind == "int":
        if not number.is_integer():
            bad("is not a whole number")
        value = int(raw) if raw.lstrip("+-").isdigit() else int(number)  # int() keeps big seeds exact
    else:
        value = number
    if value < key.low or value > key.high or (key.low_open and value == key.low):
        bad("is out of range")
    return value


def parse_system(text: str) -> System:
    """`family[:key=value,...][,stream]` or `files:DIR` -> System; SystemSpecError says what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise SystemSpecError("empty system: write f5, spark, f5:nfe_steps=16, spark:temperature=0.6,stream "
                              "or files:FOLDER")
    spec = text.strip()
    family, sep, rest = spec.partition(":")
    family = family.strip().lower()
    if family == FILES:
        folder = rest.strip()
        if not folder:
            raise SystemSpecError(f"system {spec!r}: files: needs a folder, e.g. files:/data/run1 "
                                  "(one ROW_ID.wav a row)")
        return System(FILES, folder=folder)
    if family not in FAMILIES:
        raise SystemSpecError(f"system {spec!r}: unknown family {family!r}; use f5, spark or files:FOLDER")
    if sep and not rest.strip():
        raise SystemSpecError(f"system {spec!r}: nothing after ':'; write {family} alone for the defaults")
    keys = _KEYS_BY_NAME[family]
    other = "spark" if family == "f5" else "f5"
    values: dict[str, Any] = {}
    stream = False
    for item in (rest.split(",") if rest.strip() else []):
        item = item.strip()
        name, eq, raw = item.partition("=")
        name, raw = name.strip(), raw.strip()
        if not name:
            raise SystemSpecError(f"system {spec!r}: an empty item between commas")
        if name == STREAM_FLAG:
            if eq:
                raise SystemSpecError(f"system {spec!r}: stream is a flag; write it alone, without =")
            if stream:
                raise SystemSpecError(f"system {spec!r}: stream is given twice")
            stream = True
            continue
        if name not in keys:
            where = f"it is a {other} key" if name in _KEYS_BY_NAME[other] else "unknown key"
            raise SystemSpecError(f"system {spec!r}: {name!r} does not apply to {family} ({where}); "
                                  f"{family} takes {', '.join(keys)} and the flag stream")
        if not eq:
            raise SystemSpecError(f"system {spec!r}: {name} needs a value, as {name}=VALUE "
                                  f"({keys[name].describe()})")
        if name in values:
            raise SystemSpecError(f"system {spec!r}: {name} is given twice")
        values[name] = _typed(spec, keys[name], raw)
    _check_together(spec, family, values)
    ordered = tuple((k.name, values[k.name]) for k in KEYS[family] if k.name in values)
    return System(family, ordered, stream)


def _check_together(spec: str, family: str, values: dict) -> None:
    """Rules across keys, as the server applies them."""
    if family != "spark":
        return
    top = values.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    if values.get("min_new_tokens", 0) > top:
        raise SystemSpecError(f"system {spec!r}: min_new_tokens={values['min_new_tokens']} is more than "
                              f"max_new_tokens ({top}{'' if 'max_new_tokens' in values else ', the default'})")
    levels = [k for k in ("pitch_level", "speed_level") if k in values]
    if levels and "gender" not in values:
        raise SystemSpecError(f"system {spec!r}: {' and '.join(levels)} need gender=female or gender=male "
                              "(voice creation)")


def parse_systems(texts: list[str]) -> list[System]:
    """Several systems; duplicates (same canonical form) are refused, naming both spellings."""
    out: dict[str, tuple[str, System]] = {}
    for text in texts:
        system = parse_system(text)
        if system.spec in out:
            raise SystemSpecError(f"systems {out[system.spec][0]!r} and {text!r} are the same system ({system.spec})")
        out[system.spec] = (text, system)
    return [s for _, s in out.values()]


def grammar_help() -> str:
    """Every key per family with its accepted values (for --help texts and the page)."""
    lines = []
    for fam, keys in KEYS.items():
        lines.append(f"{fam}: " + "; ".join(f"{k.name} ({k.describe()})" for k in keys) + "; flag stream")
    lines.append("files:FOLDER: one ROW_ID.wav per test-set row")
    return "\n".join(lines)


__all__ = ["CFG_RANGE", "FAMILIES", "GENDERS", "KEYS", "LEVELS", "NFE_RANGE", "SEED_RANGE", "SPEED_RANGE",
           "SWAY_RANGE", "System", "SystemSpecError", "TOP_K_RANGE", "TOP_P_RANGE", "VOICE_CREATION_KEYS",
           "format_value", "grammar_help", "parse_system", "parse_systems"]
