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


#: Hugging Face Spaces mount persistent storage here when it is attached; everything else on a Space
#: (the home folder included) is lost when the Space restarts.
SPACE_PERSISTENT_DIR = Path("/data")
SPACE_DATA_SUBDIR = "voice-studio"


def on_space() -> bool:
    """Whether this process runs on a Hugging Face Space (the platform sets SPACE_ID)."""
    return bool(os.environ.get("SPACE_ID"))


def space_storage() -> Path | None:
    """The persistent folder of this Space, or None when not on a Space or no storage is attached."""
    root = SPACE_PERSISTENT_DIR
    if on_space() and root.is_dir() and os.access(root, os.W_OK):
        return root
    return None


def default_data_dir() -> Path:
    """`STUDIO_DATA_DIR` if set; on a Space with persistent storage /data/voice-studio; else
    ~/.cache/voice-studio (created on demand by callers)."""
    if os.environ.get("STUDIO_DATA_DIR"):
        return Path(os.environ["STUDIO_DATA_DIR"]).expanduser()
    persistent = space_storage()
    if persistent is not None:
        return persistent / SPACE_DATA_SUBDIR
    return DEFAULT_DATA_DIR.expanduser()


def ephemeral_storage_note(data_dir: Path) -> str | None:
    """On a Space, a sentence saying that saved voices and history will be lost at the next restart,
    unless `data_dir` lies in the Space's persistent storage; None elsewhere."""
    if not on_space():
        return None
    persistent = space_storage()
    resolved = Path(data_dir).expanduser().resolve()
    if persistent is not None and resolved.is_relative_to(persistent.resolve()):
        return None
    return (f"This Space has no persistent storage for {resolved}: saved voices and the history will be lost "
            "when the Space restarts. Attach persistent storage (Settings -> Persistent storage; it appears "
            "as /data) to keep them.")


def default_checkpoints_dir() -> Path | None:
    """`STUDIO_CHECKPOINTS` if set: a directory holding F5TTS_v1_Base/, vocos-mel-24khz/, Spark-TTS-0.5B/."""
    value = os.environ.get("STUDIO_CHECKPOINTS")
    return Path(value).expanduser() if value else None
