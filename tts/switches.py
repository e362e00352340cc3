"""On/off settings read from the environment (the speed levers' switches, for A/B measurements)."""

from __future__ import annotations

import os

ON_VALUES = ("1", "on", "true", "yes")
OFF_VALUES = ("0", "off", "false", "no")


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
