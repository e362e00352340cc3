"""Build the `trtllm` runtime's engines and a model repository for the GPU image.

    python -m build_engines all --model f5|spark|all --checkpoints DIR --out DIR
                            [--precision bf16|fp16] [--max-batch N] [--dry-run] [--force]

Stages (each also runs alone: `python -m build_engines STAGE ...`; `f5` and `spark` run a family's):

    f5-export       DiT and Vocos to ONNX from `tts.f5` (`tts.f5.onnx_export`), padded layout
    f5-build        two TensorRT engines with `trtexec`, optimisation profiles from the flags
    spark-convert   the checkpoint's `LLM/` (Hugging Face Qwen2) to a TensorRT-LLM checkpoint
                    (`build_engines.qwen2`: config.json + rank0.safetensors)
    spark-build     `trtllm-build`: in-flight batching, paged KV cache, long sequences
    render          a Triton model repository for `--runtime trtllm` under OUT/model_repository

Each stage prints what it runs and records in OUT/manifest.json what it produced (tool versions,
shapes, precision, sizes, hashes of its inputs); a stage whose inputs and settings are unchanged and
whose outputs exist is skipped, which is how the image's entry point builds on first start only.
Nothing here patches an installed package. Layout: `tts.engine_layout`.
"""
