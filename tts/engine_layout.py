"""Where `build_engines` puts what it builds (pure Python: the studio reads it without torch).

    ENGINES/
      manifest.json                   what was built from what (see build_engines.manifest)
      f5/<model name>/                dit.onnx, vocos.onnx, dit.plan, vocos.plan, manifest.json
      spark/checkpoint/               TensorRT-LLM checkpoint: config.json, rank0.safetensors
      spark/engine/                   TensorRT-LLM engine: config.json, rank0.engine
      model_repository/               a rendered Triton model repository for `--runtime trtllm`
"""

from __future__ import annotations

import json
from pathlib import Path

MANIFEST = "manifest.json"
REPOSITORY = "model_repository"


def f5_dir(engines_root: str | Path, model_name: str) -> Path:
    return Path(engines_root) / "f5" / model_name


def spark_checkpoint_dir(engines_root: str | Path) -> Path:
    return Path(engines_root) / "spark" / "checkpoint"


def spark_engine_dir(engines_root: str | Path) -> Path:
    return Path(engines_root) / "spark" / "engine"


def spark_engine_limits(engines_root: str | Path) -> tuple[int, int]:
    """(max_batch_size, max_seq_len) the Spark engine was built with, from its `config.json`
    (trtllm-build writes them under `build_config`), so decode slots and output caps agree with it."""
    path = spark_engine_dir(engines_root) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: build the Spark engine first "
                                f"(python -m build_engines spark --checkpoints DIR --out {engines_root})")
    build = json.loads(path.read_text()).get("build_config", {})
    return int(build["max_batch_size"]), int(build["max_seq_len"])
