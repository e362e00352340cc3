"""Pictures for the page: a generation's waveform + spectrogram, and latency/RTF over recent generations.

matplotlib's object API with the Agg canvas (no pyplot: no global figure state shared between the
page's worker threads). PNG files are written atomically (temporary name, then rename).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np

#: Spectrogram analysis: 32 ms Hann windows with 75 % overlap, whatever the sample rate.
WINDOW_S, HOP_FRACTION = 0.032, 0.25
DYNAMIC_RANGE_DB = 80.0
#: Longest stretch drawn in full (s); longer audio is decimated for the waveform panel.
MAX_WAVEFORM_POINTS = 20000
FIG_DPI = 100


def _save(fig, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fig.savefig(tmp, format="png", dpi=FIG_DPI)
    os.replace(tmp, path)
    return path


def spectrogram_db(audio: np.ndarray, sample_rate: int) -> tuple[np.ndarray, float]:
    """Log-magnitude STFT [freq, frames] in dB (0 = loudest, floored at -DYNAMIC_RANGE_DB) and the hop in s."""
    win = max(64, int(WINDOW_S * sample_rate))
    hop = max(1, int(win * HOP_FRACTION))
    x = np.asarray(audio, dtype=np.float32)
    if x.size < win:
        x = np.pad(x, (0, win - x.size))
    frames = 1 + (x.size - win) // hop
    idx = np.arange(win)[None, :] + hop * np.arange(frames)[:, None]
    spec = np.abs(np.fft.rfft(x[idx] * np.hanning(win).astype(np.float32), axis=1)).T
    db = 20 * np.log10(np.maximum(spec, 1e-10))
    db -= db.max()
    return np.maximum(db, -DYNAMIC_RANGE_DB), hop / sample_rate


def waveform_png(audio: np.ndarray, sample_rate: int, path: Path, title: str = "") -> Path:
    """Waveform (top) and spectrogram (bottom) of mono float audio, as a PNG at `path`."""
    from matplotlib.figure import Figure

    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    fig = Figure(figsize=(8, 3.4))
    ax_w, ax_s = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [1, 1.6]})
    seconds = audio.size / sample_rate
    step = max(1, audio.size // MAX_WAVEFORM_POINTS)
    t = np.arange(0, audio.size, step) / sample_rate
    ax_w.plot(t, audio[::step], linewidth=0.5, color="#2563eb")
    ax_w.set_ylim(-1.05, 1.05)
    ax_w.set_ylabel("amplitude")
    if title:
        ax_w.set_title(title, fontsize=9)
    if audio.size:
        db, hop_s = spectrogram_db(audio, sample_rate)
        ax_s.imshow(db, origin="lower", aspect="auto", cmap="magma",
                    extent=(0, db.shape[1] * hop_s, 0, sample_rate / 2000), vmin=-DYNAMIC_RANGE_DB, vmax=0)
    ax_s.set_ylabel("kHz")
    ax_s.set_xlabel("seconds")
    ax_s.set_xlim(0, max(seconds, 1e-3))
    fig.tight_layout()
    return _save(fig, path)


def history_png(records: list[dict], path: Path, last: int = 50) -> Path:
    """Latency, first-chunk latency and RTF of the `last` successful generations (oldest left)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rows = [r for r in records if r.get("status") == "ok" and r.get("metrics")][:last][::-1]
    fig = Figure(figsize=(8, 2.8))
    ax = fig.subplots()
    if not rows:
        ax.text(0.5, 0.5, "No generations yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        fig.tight_layout()
        return _save(fig, path)
    x = np.arange(len(rows))
    get = lambda key: np.array([r["metrics"].get(key) if r["metrics"].get(key) is not None else np.nan  # noqa: E731
                                for r in rows], dtype=float)
    ax.plot(x, get("latency_s"), "o-", markersize=3, label="latency (s)", color="#2563eb")
    ax.plot(x, get("first_chunk_s"), "s--", markersize=3, label="first chunk (s)", color="#16a34a")
    ax.set_xlim(-0.5, len(rows) - 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("generation (oldest to newest)")
    ax.set_ylabel("seconds")
    ax2 = ax.twinx()
    ax2.plot(x, get("rtf"), "^:", markersize=3, label="RTF", color="#dc2626")
    ax2.set_ylabel("RTF")
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], loc="upper left", fontsize=8)
    ax.set_title(f"Last {len(rows)} generations", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
