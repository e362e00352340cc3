"""Settings read from the environment: on/off switches and bounded numbers (the speed levers, for
A/B measurements)."""

from __future__ import annotations

import os

ON_VALUES = ("1", "on", "true", "yes")
OFF_VALUES = ("0", "off", "false", "no")

#: The F5 engine's continuous batching on a thread of its own ("1") or each Triton execute's
#: requests run to the end ("0"); unset: on on a GPU (`tts.f5.engine`). Here, not there, because
#: the server's launcher reads it too (it sets the engine's queue delay) and imports no torch.
F5_ENGINE_LOOP_ENV = "STUDIO_F5_ENGINE_LOOP"

#: STUDIO_TRITON_TRACE=FILE: the server's launcher has Triton trace every request into FILE.0, ...
#: (`studio.server.trace_args`) and the model processes hand their trace to their BLS requests
#: (`triton_models.shared.TRACING`); both read the name here.
TRACE_ENV = "STUDIO_TRITON_TRACE"


def switch_from_env(name: str, default: bool = True, env: dict | None = None) -> bool:
    """`name` in `env` (default os.environ) as a switch: unset or empty gives `default`; anything
    but ON_VALUES / OFF_VALUES (any case) is refused with a message naming the variable."""
    raw = (os.environ if env is None else env).get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ON_VALUES:
        return True
    if raw in OFF_VALUES:
        return False
    raise ValueError(f"{name}={raw!r} is not understood; use 1 or 0")


def number_from_env(name: str, default, lo, hi, what: str, whole: bool = False, env: dict | None = None):
    """`name` in `env` (default os.environ) as a number from `lo` to `hi`: unset or empty gives
    `default`; whole=True takes digits only (an int), else any float. Anything else is refused with
    a message naming the variable and saying `what` to use ("milliseconds", "a whole number")."""
    raw = (os.environ if env is None else env).get(name, "").strip()
    if not raw:
        return default
    try:
        value = (int(raw) if raw.isdigit() else None) if whole else float(raw)
    except ValueError:
        value = None
    if value is None or not lo <= value <= hi:
        raise ValueError(f"{name}={raw!r} is not understood; use {what} from {lo} to {hi}")
    return value



def f5_engine_loop(on_gpu: bool, env: dict | None = None) -> bool:
    """Whether the F5 engine batches on a thread of its own (F5_ENGINE_LOOP_ENV; default on a GPU).
    The engine model and the server's launcher (its queue delay) both ask here."""
    return switch_from_env(F5_ENGINE_LOOP_ENV, default=on_gpu, env=env)
