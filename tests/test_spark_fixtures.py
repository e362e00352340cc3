"""Shared Spark test fixtures: one demo checkpoint and one pipeline per test process.

The Spark test modules import these fixtures; the checkpoint (a few MB, ~3 s) and the loaded
pipeline are cached at module level so every module reuses them.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

_CACHE: dict[str, object] = {}


def demo_checkpoint() -> Path:
    if "dir" not in _CACHE:
        from tts.spark.demo import write_demo_checkpoint

        root = Path(tempfile.mkdtemp(prefix="spark-demo-"))
        atexit.register(shutil.rmtree, root, True)
        _CACHE["dir"] = write_demo_checkpoint(root / "Spark-TTS-0.5B", seed=0)
    return _CACHE["dir"]


def demo_pipeline():
    if "pipeline" not in _CACHE:
        from tts.spark.pipeline import SparkPipeline

        _CACHE["pipeline"] = SparkPipeline(demo_checkpoint(), device="cpu", demo_weights=True, max_batch_size=4,
                                           max_seq_len=1024)
    return _CACHE["pipeline"]


def noise_clip(seconds: float, seed: int = 0) -> np.ndarray:
    """A deterministic 16 kHz test clip (speech-like amplitude)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    voiced = np.sin(2 * np.pi * 130 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return (0.2 * voiced + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture()
def spark_one_thread():
    """One intra-op thread while a Spark test runs: the tiny models' ops are far too small to split,
    and on a busy 2-core machine two spinning threads made decoding several times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def spark_dir() -> Path:
    return demo_checkpoint()


@pytest.fixture(scope="session")
def spark_pipeline():
    return demo_pipeline()


def test_demo_checkpoint_has_the_published_layout(spark_dir):
    for rel in ("config.yaml", "BiCodec/config.yaml", "BiCodec/model.safetensors", "LLM/config.json",
                "LLM/model.safetensors", "LLM/tokenizer.json", "LLM/tokenizer_config.json", "LLM/added_tokens.json",
                "wav2vec2-large-xlsr-53/config.json", "wav2vec2-large-xlsr-53/preprocessor_config.json",
                "wav2vec2-large-xlsr-53/pytorch_model.bin"):
        assert (spark_dir / rel).is_file(), rel
