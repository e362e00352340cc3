"""Which weights each model family runs on, resolved as DESIGN.md says.

Order per family: `--checkpoints DIR` / `STUDIO_CHECKPOINTS` -> the Hugging Face cache -> a download
(unless `--no-download` or `HF_HUB_OFFLINE=1`) -> demo weights. A family whose real weights are
incomplete runs wholly on demo weights. Demo weights are written by `python -m studio
make-demo-weights DIR` in a subprocess so that this module (and the app) never imports torch.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from studio.config import PROJECT_ROOT

F5_REPO = "SWivid/F5-TTS"
VOCOS_REPO = "charactr/vocos-mel-24khz"
SPARK_REPO = "SparkAudio/Spark-TTS-0.5B"

#: Published F5 checkpoints: model name -> checkpoint file inside the folder of that name.
F5_CHECKPOINT_FILES = {
    "F5TTS_v1_Base": "model_1250000.safetensors",
    "F5TTS_Base": "model_1200000.safetensors",
}
VOCOS_FILES = ("config.yaml", "pytorch_model.bin")
SPARK_FILES = (
    "config.yaml",
    "LLM/config.json",
    "LLM/model.safetensors",
    "LLM/tokenizer.json",
    "BiCodec/config.yaml",
    "BiCodec/model.safetensors",
    "wav2vec2-large-xlsr-53/config.json",
    "wav2vec2-large-xlsr-53/preprocessor_config.json",
    "wav2vec2-large-xlsr-53/pytorch_model.bin",
)
#: The objective-check models (optional families "asr" and "sim"): default repository, the folder
#: name under --checkpoints, and the files a complete copy has.
CHECK_MODELS = {
    "asr": ("openai/whisper-large-v3-turbo", "whisper-large-v3-turbo",
            ("config.json", "model.safetensors", "generation_config.json", "preprocessor_config.json",
             "tokenizer_config.json", "vocab.json", "merges.txt")),
    "sim": ("microsoft/wavlm-base-plus-sv", "wavlm-base-plus-sv", ("config.json", "preprocessor_config.json")),
}
#: Approximate download sizes, stated before a download starts.
DOWNLOAD_SIZES_GB = {"f5": 1.35 + 0.05, "spark": 3.9, "asr": 1.6, "sim": 0.4}

DEMO_DIR_NAME = "demo-weights"
DEMO_F5_NAME = "F5TTS_Demo"
DEMO_MARKER = ".complete-v2"  # same as tts.demo_weights.DEMO_MARKER


@dataclass
class FamilyWeights:
    """Where one family's weights are and whether they are the demo ones."""

    family: str
    demo: bool
    source: str  # "checkpoints", "hf-cache", "download" or "demo"
    paths: dict[str, str] = field(default_factory=dict)
    reason: str = ""


def _f5_checkpoint_in(folder: Path, model_name: str) -> Path | None:
    preferred = F5_CHECKPOINT_FILES.get(model_name)
    if preferred and (folder / preferred).is_file():
        return folder / preferred
    found = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.pt"))
    return found[0] if found else None


def _f5_from_dir(root: Path, model_name: str) -> FamilyWeights | None:
    model_dir, vocos_dir = root / model_name, root / "vocos-mel-24khz"
    ckpt = _f5_checkpoint_in(model_dir, model_name) if model_dir.is_dir() else None
    if ckpt is None or not (model_dir / "vocab.txt").is_file():
        return None
    if not all((vocos_dir / f).is_file() for f in VOCOS_FILES):
        return None
    return FamilyWeights("f5", False, "checkpoints", {
        "checkpoint": str(ckpt), "vocab": str(model_dir / "vocab.txt"), "model_dir": str(model_dir),
        "vocos_dir": str(vocos_dir), "model_name": model_name})


def _spark_from_dir(root: Path) -> FamilyWeights | None:
    model_dir = root / "Spark-TTS-0.5B"
    if all((model_dir / f).is_file() for f in SPARK_FILES):
        return FamilyWeights("spark", False, "checkpoints", {"model_dir": str(model_dir)})
    return None


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """A quick DNS + TCP check, so an offline machine does not sit through the hub client's retries."""
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def _hf_cached(repo: str, files: list[str]) -> list[Path] | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    out = []
    for name in files:
        hit = try_to_load_from_cache(repo, name)
        if not isinstance(hit, str):
            return None
        out.append(Path(hit))
    return out


def _hf_download(repo: str, files: list[str], log) -> list[Path]:
    from huggingface_hub import hf_hub_download

    paths = []
    for name in files:
        log(f"downloading {repo}/{name}")
        paths.append(Path(hf_hub_download(repo, name)))
    return paths


def _f5_files(model_name: str) -> list[str]:
    ckpt = F5_CHECKPOINT_FILES.get(model_name)
    if ckpt is None:
        raise ValueError(f"unknown F5 model {model_name!r}; published ones: {sorted(F5_CHECKPOINT_FILES)}")
    return [f"{model_name}/{ckpt}", f"{model_name}/vocab.txt"]


def _f5_from_hub_paths(model_name: str, f5_paths: list[Path], vocos_paths: list[Path], source: str) -> FamilyWeights:
    return FamilyWeights("f5", False, source, {
        "checkpoint": str(f5_paths[0]), "vocab": str(f5_paths[1]), "model_dir": str(f5_paths[0].parent),
        "vocos_dir": str(vocos_paths[0].parent), "model_name": model_name})


def demo_root(data_dir: Path) -> Path:
    return Path(data_dir).expanduser() / DEMO_DIR_NAME


def ensure_demo_weights(data_dir: Path, log=print) -> Path:
    """Write the deterministic demo weights once (in a subprocess: torch stays out of this process)."""
    root = demo_root(data_dir)
    if not (root / DEMO_MARKER).is_file():
        log(f"writing demo weights to {root}")
        subprocess.run([sys.executable, "-m", "studio", "make-demo-weights", str(root)],
                       cwd=PROJECT_ROOT, check=True)
    return root


def demo_f5(data_dir: Path, reason: str, log=print) -> FamilyWeights:
    root = ensure_demo_weights(data_dir, log)
    model_dir = root / DEMO_F5_NAME
    return FamilyWeights("f5", True, "demo", {
        "checkpoint": str(_f5_checkpoint_in(model_dir, DEMO_F5_NAME)), "vocab": str(model_dir / "vocab.txt"),
        "model_dir": str(model_dir), "vocos_dir": str(root / "vocos-mel-24khz"), "model_name": DEMO_F5_NAME},
        reason)


def demo_spark(data_dir: Path, reason: str, log=print) -> FamilyWeights:
    root = ensure_demo_weights(data_dir, log)
    return FamilyWeights("spark", True, "demo", {"model_dir": str(root / "Spark-TTS-0.5B")}, reason)


def downloads_allowed(no_download: bool) -> bool:
    return not no_download and os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True")


def resolve_f5(data_dir: Path, *, checkpoints: Path | None = None, model_name: str = "F5TTS_v1_Base",
               demo: bool = False, no_download: bool = False, log=print) -> FamilyWeights:
    """Resolve F5's DiT checkpoint + vocab and the Vocos vocoder; see the module docstring for the order."""
    if demo:
        return demo_f5(data_dir, "demo weights requested (--demo-weights)", log)
    if checkpoints is not None:
        found = _f5_from_dir(Path(checkpoints), model_name)
        if found:
            return found
        log(f"F5: {checkpoints} lacks {model_name}/ (checkpoint + vocab.txt) or vocos-mel-24khz/")
    files = _f5_files(model_name)
    f5_hit, voc_hit = _hf_cached(F5_REPO, files), _hf_cached(VOCOS_REPO, list(VOCOS_FILES))
    if f5_hit and voc_hit:
        return _f5_from_hub_paths(model_name, f5_hit, voc_hit, "hf-cache")
    if downloads_allowed(no_download):
        if hub_reachable():
            log(f"F5: downloading about {DOWNLOAD_SIZES_GB['f5']:.1f} GB ({F5_REPO}, {VOCOS_REPO})")
            try:
                return _f5_from_hub_paths(model_name, _hf_download(F5_REPO, files, log),
                                          _hf_download(VOCOS_REPO, list(VOCOS_FILES), log), "download")
            except Exception as exc:  # noqa: BLE001 - any download failure falls back to demo weights
                return demo_f5(data_dir, f"download failed: {exc}", log)
        return demo_f5(data_dir, "real weights not found and the Hugging Face hub is unreachable", log)
    return demo_f5(data_dir, "real weights not found and downloads are off", log)


def resolve_spark(data_dir: Path, *, checkpoints: Path | None = None, demo: bool = False,
                  no_download: bool = False, log=print) -> FamilyWeights:
    """Resolve the Spark-TTS-0.5B folder (LLM/, BiCodec/, wav2vec2-large-xlsr-53/)."""
    if demo:
        return demo_spark(data_dir, "demo weights requested (--demo-weights)", log)
    if checkpoints is not None:
        found = _spark_from_dir(Path(checkpoints))
        if found:
            return found
        log(f"Spark: {checkpoints} lacks a complete Spark-TTS-0.5B/")
    hit = _hf_cached(SPARK_REPO, list(SPARK_FILES))
    if hit:
        return FamilyWeights("spark", False, "hf-cache", {"model_dir": str(hit[0].parent)})
    if downloads_allowed(no_download):
        if hub_reachable():
            log(f"Spark: downloading about {DOWNLOAD_SIZES_GB['spark']:.1f} GB ({SPARK_REPO})")
            try:
                from huggingface_hub import snapshot_download

                return FamilyWeights("spark", False, "download", {"model_dir": snapshot_download(SPARK_REPO)})
            except Exception as exc:  # noqa: BLE001
                return demo_spark(data_dir, f"download failed: {exc}", log)
        return demo_spark(data_dir, "real weights not found and the Hugging Face hub is unreachable", log)
    return demo_spark(data_dir, "real weights not found and downloads are off", log)


def _check_model_complete(folder: Path, family: str) -> bool:
    files = CHECK_MODELS[family][2]
    has_weights = any((folder / w).is_file() for w in ("model.safetensors", "pytorch_model.bin"))
    return has_weights and all((folder / f).is_file() for f in files if f != "model.safetensors")


def demo_check_model(data_dir: Path, family: str, reason: str, log=print) -> FamilyWeights:
    root = ensure_demo_weights(data_dir, log)
    return FamilyWeights(family, True, "demo", {"model_dir": str(root / CHECK_MODELS[family][1])}, reason)


def resolve_check_model(family: str, data_dir: Path, *, checkpoints: Path | None = None, demo: bool = False,
                        no_download: bool = False, log=print) -> FamilyWeights:
    """Resolve the `asr` (Whisper) or `sim` (WavLM x-vector) model folder, in the TTS families' order."""
    repo, folder_name, _ = CHECK_MODELS[family]
    if demo:
        return demo_check_model(data_dir, family, "demo weights requested (--demo-weights)", log)
    if checkpoints is not None:
        folder = Path(checkpoints) / folder_name
        if _check_model_complete(folder, family):
            return FamilyWeights(family, False, "checkpoints", {"model_dir": str(folder)})
        log(f"{family}: {checkpoints} lacks a complete {folder_name}/")
    try:
        from huggingface_hub import snapshot_download

        cached = Path(snapshot_download(repo, local_files_only=True))
        if _check_model_complete(cached, family):
            return FamilyWeights(family, False, "hf-cache", {"model_dir": str(cached)})
    except Exception:  # noqa: BLE001 - not cached (or no huggingface_hub): go on down the order
        pass
    if downloads_allowed(no_download):
        if hub_reachable():
            log(f"{family}: downloading about {DOWNLOAD_SIZES_GB[family]:.1f} GB ({repo})")
            try:
                from huggingface_hub import snapshot_download

                return FamilyWeights(family, False, "download", {"model_dir": snapshot_download(repo)})
            except Exception as exc:  # noqa: BLE001
                return demo_check_model(data_dir, family, f"download failed: {exc}", log)
        return demo_check_model(data_dir, family, "real weights not found and the Hugging Face hub is unreachable", log)
    return demo_check_model(data_dir, family, "real weights not found and downloads are off", log)


def download(family: str, log=print) -> None:
    """`python -m studio download [f5|spark|all]`: state the size, then fetch with progress bars."""
    if not hub_reachable():
        raise SystemExit("The Hugging Face hub (huggingface.co) cannot be reached from this machine.")
    from huggingface_hub import snapshot_download

    if family in ("f5", "all"):
        log(f"F5-TTS: about {DOWNLOAD_SIZES_GB['f5']:.1f} GB ({F5_REPO} F5TTS_v1_Base, {VOCOS_REPO})")
        _hf_download(F5_REPO, _f5_files("F5TTS_v1_Base"), log)
        _hf_download(VOCOS_REPO, list(VOCOS_FILES), log)
    if family in ("spark", "all"):
        log(f"Spark-TTS: about {DOWNLOAD_SIZES_GB['spark']:.1f} GB ({SPARK_REPO})")
        snapshot_download(SPARK_REPO)
    for check in ("asr", "sim"):
        if family in (check, "all"):
            repo = CHECK_MODELS[check][0]
            log(f"{check}: about {DOWNLOAD_SIZES_GB[check]:.1f} GB ({repo})")
            snapshot_download(repo)
