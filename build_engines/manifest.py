"""OUT/manifest.json: what each stage produced from what, and whether it must run again."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import time
from pathlib import Path

from tts.engine_layout import MANIFEST

#: Packages whose versions a manifest records (read from installed metadata, nothing imported).
TOOLS = ("torch", "onnx", "onnxscript", "tensorrt", "tensorrt_llm", "transformers", "safetensors", "numpy")
CHUNK = 1 << 20


def tool_versions() -> dict[str, str | None]:
    versions = {"python": platform.python_version()}
    for name in TOOLS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def file_digest(path: Path, known: dict | None = None) -> str:
    """sha256 of a file; reused from `known` (a previous manifest's record) when size and mtime match,
    so a multi-GB checkpoint is hashed once, not at every container start."""
    st = path.stat()
    if known and known.get("bytes") == st.st_size and known.get("mtime_ns") == st.st_mtime_ns:
        return known["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def describe_files(paths: list[Path], previous: dict | None = None) -> dict[str, dict]:
    """{path: {bytes, mtime_ns, sha256}} for files (folders: every file under them)."""
    previous = previous or {}
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        files += sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    out = {}
    for f in files:
        st = f.stat()
        out[str(f)] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
                       "sha256": file_digest(f, previous.get(str(f)))}
    return out


def load(out_dir: Path) -> dict:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return {"stages": {}}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {"stages": {}}  # a torn manifest means: rebuild


def save(out_dir: Path, manifest: dict) -> None:
    path = Path(out_dir) / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, path)  # atomic: an interrupted build never leaves half a manifest


def up_to_date(record: dict | None, settings: dict, inputs: dict[str, dict], outputs: list[Path]) -> str | None:
    """None when a stage can be skipped, else the reason it must run."""
    if not record:
        return "never built"
    if record.get("settings") != settings:
        return "settings changed"
    digests = {k: v["sha256"] for k, v in inputs.items()}
    if {k: v["sha256"] for k, v in record.get("inputs", {}).items()} != digests:
        return "inputs changed"
    missing = [str(p) for p in outputs if not Path(p).exists()]
    if missing:
        return f"outputs missing ({', '.join(missing[:3])})"
    return None


def stage_record(settings: dict, inputs: dict, outputs: list[Path], command: list[str] | None,
                 extra: dict | None = None) -> dict:
    return {"settings": settings, "inputs": inputs, "command": command, "versions": tool_versions(),
            "outputs": {str(p): _size(Path(p)) for p in outputs}, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                               time.gmtime()),
            **(extra or {})}


def _size(p: Path) -> int | None:
    if p.is_file():
        return p.stat().st_size
    if p.is_dir():
        return sum(q.stat().st_size for q in p.rglob("*") if q.is_file())
    return None
