"""The `runtime` model-config parameter (torch | trtllm) turned into pipeline arguments.

Engine models read `runtime` and `engines_dir` from their config; only the heavy module changes:
F5 runs its DiT and Vocos as TensorRT engines (`tts.f5.trt_runner`), Spark decodes through the
`spark_trtllm` model over BLS (`tts.spark.trtllm`, `triton_models/trtllm_bls.py`).
"""

from __future__ import annotations

RUNTIMES = ("torch", "trtllm")


def runtime_of(params: dict) -> str:
    runtime = params.get("runtime", "torch") or "torch"
    if runtime not in RUNTIMES:
        raise ValueError(f"model parameter runtime={runtime!r}; use one of {RUNTIMES}")
    return runtime


def f5_pipeline_kwargs(params: dict) -> dict:
    """Extra `F5Pipeline` arguments for the configured runtime."""
    runtime = runtime_of(params)
    return {} if runtime == "torch" else {"runtime": runtime, "engines_dir": params["engines_dir"]}


def spark_pipeline_kwargs(params: dict, pb_utils) -> dict:
    """Extra `SparkPipeline` arguments: for trtllm the BLS transport and the engine's limits."""
    if runtime_of(params) == "torch":
        return {}
    from triton_models.trtllm_bls import BlsTransport
    from tts.engine_layout import spark_engine_limits

    max_batch, max_seq_len = spark_engine_limits(params["engines_dir"])
    return {"llm_transport": BlsTransport(pb_utils), "max_batch_size": max_batch, "max_seq_len": max_seq_len}
