"""The `--runtime torch|trtllm` choice for the embedded server (no torch imports).

`torch` (default) runs everything in PyTorch. `trtllm` runs the engines `build_engines` wrote into
`--engines DIR`: F5's DiT and Vocos as TensorRT engines inside `f5_engine`, and Spark's LLM as the
`spark_trtllm` model on Triton's `tensorrtllm` backend, which `spark_llm` calls through BLS. The
model names, inputs, outputs and `info` are the same in both, so every client works with either.
`check_runtime` fails at start-up, saying what is missing, where the trtllm runtime cannot run
(TensorRT and TensorRT-LLM exist only in the GPU image: README, "TensorRT path and Docker image").
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from tts.engine_layout import f5_dir, spark_engine_dir, spark_engine_limits

RUNTIMES = ("torch", "trtllm")
#: Models a family adds in a runtime (rendered from triton_models/ like the others).
RUNTIME_MODELS = {("spark", "trtllm"): ("spark_trtllm",)}
#: Share of the free GPU memory the TensorRT-LLM backend may take for its paged KV cache after the
#: engines are loaded (upstream Spark used 0.5 too; F5's engines share the GPU).
KV_CACHE_FRACTION = float(os.environ.get("STUDIO_TRTLLM_KV_FRACTION", "0.5"))


class RuntimeUnavailable(RuntimeError):
    """The chosen runtime cannot run here; the message says what is missing and what to do."""


def runtime_models(runtime: str, family: str) -> tuple[str, ...]:
    return RUNTIME_MODELS.get((family, runtime), ())


def runtime_values(runtime: str, engines_dir: Path | None, families, gpus: list[int]) -> dict[str, str]:
    """Template values for the runtime's config slots (`${engines_dir}`, the `spark_trtllm` ones).

    The KV cache holds every slot's whole sequence (max_batch x max_seq_len tokens, e.g. 16 x 5120 =
    81,920 tokens, ~1 GB in bf16 for Qwen2.5-0.5B's 24 layers x 2 KV heads x 64 dims x K and V), so
    the `guaranteed_no_evict` scheduler never holds a request back for room; the memory fraction
    caps it on a small GPU."""
    values = {"engines_dir": str(engines_dir or "")}
    if runtime == "trtllm" and "spark" in families:
        max_batch, max_seq_len = spark_engine_limits(engines_dir)
        values.update(spark_trtllm_engine_dir=str(spark_engine_dir(engines_dir)),
                      trtllm_max_batch=str(max_batch), trtllm_kv_cache_tokens=str(max_batch * max_seq_len),
                      trtllm_kv_cache_fraction=str(KV_CACHE_FRACTION),
                      trtllm_gpu_ids=",".join(map(str, gpus)) if gpus else "0")
    return values


def tensorrtllm_backend_dir(tritonserver: Path | None = None) -> Path | None:
    """The tritonserver's `backends/tensorrtllm` folder (in the NGC TRT-LLM image), or None."""
    binary = tritonserver or (Path(shutil.which("tritonserver")) if shutil.which("tritonserver") else None)
    candidates = [Path(binary).resolve().parent.parent / "backends" / "tensorrtllm"] if binary else []
    candidates.append(Path("/opt/tritonserver/backends/tensorrtllm"))
    return next((c for c in candidates if c.is_dir()), None)


def check_runtime(runtime: str, engines_dir: Path | None, families, f5_model: str) -> None:
    """Raise RuntimeUnavailable unless `runtime` can serve `families` here."""
    if runtime not in RUNTIMES:
        raise RuntimeUnavailable(f"--runtime {runtime!r} is not one of {RUNTIMES}")
    if runtime == "torch":
        return
    where = ("The trtllm runtime runs in the GPU image (README: 'TensorRT path and Docker image'); "
             "use --runtime torch elsewhere.")
    if "f5" in families and importlib.util.find_spec("tensorrt") is None:
        raise RuntimeUnavailable(f"--runtime trtllm: TensorRT's Python runtime is not installed here "
                                 f"(no `tensorrt` module) and F5's engines need it. {where}")
    if "spark" in families and tensorrtllm_backend_dir() is None:
        raise RuntimeUnavailable(f"--runtime trtllm: this tritonserver has no `tensorrtllm` backend "
                                 f"(backends/tensorrtllm) and Spark's LLM engine needs it. {where}")
    if not engines_dir:
        raise RuntimeUnavailable("--runtime trtllm needs --engines DIR (or $STUDIO_ENGINES), the folder "
                                 "`python -m build_engines all --checkpoints DIR --out DIR` wrote")
    needed = []
    if "f5" in families:
        needed += [f5_dir(engines_dir, f5_model) / name for name in ("dit.plan", "vocos.plan")]
    if "spark" in families:
        needed += [spark_engine_dir(engines_dir) / name for name in ("config.json", "rank0.engine")]
    missing = [p for p in needed if not p.is_file()]
    if missing:
        raise RuntimeUnavailable(f"--runtime trtllm: engines missing: {', '.join(map(str, missing))}; build them "
                                 f"with python -m build_engines all --checkpoints DIR --out {engines_dir}")
