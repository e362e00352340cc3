"""Hugging Face Space packaging: the README front matter a Gradio Space reads, and a Space start mimicked.

The start: a Hugging Face cache laid out as huggingface_hub leaves it after `preload_from_hub`
(models--ORG--NAME/{blobs,snapshots/COMMIT,refs/main}), holding the project's tiny demo checkpoints
(TTS families and the objective checks' Whisper and WavLM) under the published file names;
`python app.py` with no flags and the Space's environment (SPACE_ID, GRADIO_SERVER_NAME,
GRADIO_SERVER_PORT; HF_HUB_OFFLINE so nothing is fetched). The studio must take
the weights from that cache, as real ones (`X-Studio-Demo-Weights: false`), and generate.

F5's published checkpoint carries no architecture: the name F5TTS_v1_Base means the full-size DiT
(tts/f5/config.py). The tiny checkpoint therefore travels with the `config.json` its writer puts
beside it, which wins over the name (DESIGN.md "Weights": a config.json beside a custom or tiny
checkpoint). The published repository has no such file, so on a real Space the name decides.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from studio.weights import CHECK_MODELS, F5_CHECKPOINT_FILES, F5_REPO, SPARK_REPO, VOCOS_FILES, VOCOS_REPO, _f5_files
from tests.app_process import ROOT, base_env, free_port, start_app, stop_app

README = ROOT / "README.md"


def front_matter() -> dict:
    text = README.read_text("utf-8")
    assert text.startswith("---\n"), "the Space's YAML front matter must open README.md"
    end = text.index("\n---\n", 4)
    return yaml.safe_load(text[4:end])


def preloads(fm: dict) -> dict[str, list[str] | None]:
    """preload_from_hub entries: repo -> files (None: the whole repository)."""
    out = {}
    for entry in fm["preload_from_hub"]:
        repo, *rest = entry.split()
        out[repo] = rest[0].split(",") if rest else None
    return out


def test_front_matter_is_what_a_gradio_space_reads():
    import gradio

    fm = front_matter()
    assert fm["title"] and fm["sdk"] == "gradio" and fm["app_file"] == "app.py"
    assert str(fm["sdk_version"]) == gradio.__version__
    requirements = (ROOT / "requirements.txt").read_text().split()
    assert f"gradio=={fm['sdk_version']}" in requirements
    # The wheel's tritonserver runs Python models through a stub built for one Python version.
    import pytriton

    stubs = Path(pytriton.__file__).parent / "tritonserver" / "python_backend_stubs"
    version = str(fm["python_version"])
    assert (stubs / version / "triton_python_backend_stub").is_file(), sorted(p.name for p in stubs.iterdir())
    hardware = fm["suggested_hardware"]
    assert not hardware.startswith("cpu") and "zero" not in hardware  # a dedicated GPU
    amount, unit = re.fullmatch(r"(\d+)([mh])", str(fm["startup_duration_timeout"])).groups()
    assert int(amount) * (60 if unit == "h" else 1) >= 30
    pre = preloads(fm)
    assert pre[F5_REPO] == _f5_files("F5TTS_v1_Base")
    assert pre[VOCOS_REPO] == list(VOCOS_FILES)
    assert pre[SPARK_REPO] is None  # as `snapshot_download`, the studio's own download, fetches it
    for repo, _, _ in CHECK_MODELS.values():  # the objective checks' models (asr, sim), likewise whole
        assert pre[repo] is None
    for line in (ROOT / "packages.txt").read_text().splitlines():
        assert re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", line.strip()), line


# --- a Space start, mimicked ------------------------------------------------------------------------------
def write_snapshot(hub: Path, repo: str, files: dict[str, Path]) -> Path:
    """Files into `hub` as huggingface_hub caches them: content in blobs/SHA256, relative symlinks
    from snapshots/COMMIT/PATH, refs/main naming COMMIT. Returns the snapshot folder."""
    folder = hub / ("models--" + repo.replace("/", "--"))
    commit = hashlib.sha1(repo.encode()).hexdigest()
    snapshot = folder / "snapshots" / commit
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    for rel, src in files.items():
        data = src.read_bytes()
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    return snapshot


def preloaded_cache(root: Path) -> Path:
    """HF_HOME with the demo checkpoints under the published repositories' names."""
    demo = root / "demo"
    subprocess.run([sys.executable, "-m", "studio", "make-demo-weights", str(demo)], cwd=ROOT, check=True,
                   capture_output=True)
    hub = root / "hf" / "hub"
    f5_dir = demo / "F5TTS_Demo"
    ckpt = next(f5_dir.glob("*.safetensors"))
    write_snapshot(hub, F5_REPO, {
        f"F5TTS_v1_Base/{F5_CHECKPOINT_FILES['F5TTS_v1_Base']}": ckpt,
        "F5TTS_v1_Base/vocab.txt": f5_dir / "vocab.txt",
        "F5TTS_v1_Base/config.json": f5_dir / "config.json",  # tiny architecture (see the module docstring)
    })
    write_snapshot(hub, VOCOS_REPO, {name: demo / "vocos-mel-24khz" / name for name in VOCOS_FILES})
    spark = demo / "Spark-TTS-0.5B"
    write_snapshot(hub, SPARK_REPO, {str(p.relative_to(spark)): p for p in spark.rglob("*") if p.is_file()})
    for repo, folder, _ in CHECK_MODELS.values():
        src = demo / folder
        write_snapshot(hub, repo, {str(p.relative_to(src)): p for p in src.rglob("*") if p.is_file()})
    return root / "hf"


@pytest.mark.slow
def test_space_start_serves_from_the_preloaded_cache(tmp_path):
    hf_home = preloaded_cache(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    port = free_port()
    env = base_env(HF_HOME=hf_home, HF_HUB_OFFLINE=1, SPACE_ID="tests/voice-studio", SPACE_AUTHOR_NAME="tests",
                   GRADIO_SERVER_PORT=port, HOME=home, STUDIO_FRONT_INSTANCES=2, STUDIO_CONCURRENCY=2)
    for name in ("STUDIO_DATA_DIR", "STUDIO_CHECKPOINTS", "STUDIO_DEMO_WEIGHTS"):
        env.pop(name, None)
    app = start_app([], env, tmp_path / "app.log", port)  # `python app.py`, no flags, as a Space runs it
    try:
        for model, extra in (("f5-tts", {"nfe_steps": 2}), ("spark-tts", {"max_new_tokens": 25})):
            req = urllib.request.Request(app.url + "/v1/audio/speech", method="POST",
                                         headers={"Content-Type": "application/json"},
                                         data=json.dumps({"model": model, "voice": "en_female", "input": "Hello.",
                                                          "response_format": "wav", **extra}).encode())
            with urllib.request.urlopen(req, timeout=120) as r:
                assert r.headers["X-Studio-Demo-Weights"] == "false", model
                assert int(r.headers["X-Studio-Audio-Samples"]) > 0 and len(r.read()) > 44
        with urllib.request.urlopen(app.url + "/config", timeout=30) as r:
            config = r.read().decode()
        assert "will be lost when the Space restarts" in config  # no /data here: the page says so
        data_dir = home / ".cache" / "voice-studio"  # the default data folder (no persistent storage)
        assert (data_dir / "studio.db").is_file()
        assert not (data_dir / "demo-weights").exists()  # every family came from the cache
        log = app.log_tail(200_000)
        assert "DEMO WEIGHTS" not in log, log[-3000:]
    finally:
        stop_app(app)
