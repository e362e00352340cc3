"""Paths and settings shared by the app, the CLI and the embedded server (no torch here)."""

from __future__ import annotations

import os
from pathlib import Path

#: Where voices, history, demo weights and server run directories live unless told otherwise.
DEFAULT_DATA_DIR = Path("~/.cache/voice-studio")

#: Project root: the Triton models add it to sys.path, since the Python backend stub ignores PYTHONPATH.
PROJECT_ROOT = Path(__file__).resolve().parent.parent

#: Licences of the published weights, shown beside each model (the code's licence is separate).
WEIGHTS_LICENCE = {
    "f5": "F5-TTS pretrained weights: CC BY-NC 4.0 (non-commercial)",
    "spark": "Spark-TTS-0.5B weights: CC BY-NC-SA 4.0 (non-commercial, share-alike)",
}


def default_data_dir() -> Path:
    """`STUDIO_DATA_DIR` if set, else ~/.cache/voice-studio (created on demand by callers)."""
    return Path(os.environ.get("STUDIO_DATA_DIR") or DEFAULT_DATA_DIR).expanduser()


def default_checkpoints_dir() -> Path | None:
    """`STUDIO_CHECKPOINTS` if set: a directory holding F5TTS_v1_Base/, vocos-mel-24khz/, Spark-TTS-0.5B/."""
    value = os.environ.get("STUDIO_CHECKPOINTS")
    return Path(value).expanduser() if value else None
