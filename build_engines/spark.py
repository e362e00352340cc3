"""Spark stages: the TensorRT-LLM checkpoint (`build_engines.qwen2`) and `trtllm-build`.

Sizes, and why (upstream's Triton runtime built a 2,560-token KV cache and capped output at 512
tokens, ~10 s of speech, so long text was cut: issue #174 there):

* max_input_len 2048: the longest prompt is a 30 s reference (1,500 semantic tokens) + 32 global
  tokens + markers + one text segment of at most ~20 s of speech (a few hundred tokens).
* max_seq_len 5120 = the torch runtime's KV length per slot (`tts.spark.pipeline.DEFAULT_MAX_SEQ_LEN`):
  such a prompt plus the 3,000 new tokens upstream's own CLI allows (60 s of speech).
* max_batch_size 16 = the torch runtime's decode slots (`DEFAULT_MAX_BATCH`).
* max_num_tokens 8192: tokens one in-flight iteration may process (remove_input_padding packs
  them): up to four longest prompts prefilled together plus every running sequence's next token.
"""

from __future__ import annotations

import os
import shutil

#: Defaults derived in the module docstring.
MAX_INPUT_LEN = 2048
MAX_SEQ_LEN = 5120
MAX_BATCH = 16
MAX_NUM_TOKENS = 8192
PLUGIN_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def find_trtllm_build() -> str:
    return os.environ.get("STUDIO_TRTLLM_BUILD") or shutil.which("trtllm-build") or "trtllm-build"


def trtllm_build_command(binary: str, checkpoint_dir, engine_dir, precision: str = "bf16", max_batch: int = MAX_BATCH,
                         max_input_len: int = MAX_INPUT_LEN, max_seq_len: int = MAX_SEQ_LEN,
                         max_num_tokens: int = MAX_NUM_TOKENS) -> list[str]:
    """The `trtllm-build` command line (TensorRT-LLM 1.1 flags). The paged KV cache (`--kv_cache_type
    paged`; the older `--paged_kv_cache enable` is its deprecated spelling) and packed inputs are what
    in-flight batching needs; paged context FMHA lets the backend reuse a shared prompt prefix's KV
    blocks (the same voice's reference tokens) when `enable_kv_cache_reuse` is on."""
    if max_input_len >= max_seq_len:
        raise ValueError(f"max_input_len {max_input_len} must be below max_seq_len {max_seq_len}")
    if max_num_tokens < max_input_len:
        raise ValueError(f"max_num_tokens {max_num_tokens} must hold one whole prompt ({max_input_len})")
    plugin = PLUGIN_DTYPE[precision]
    return [binary, f"--checkpoint_dir={checkpoint_dir}", f"--output_dir={engine_dir}",
            f"--max_batch_size={max_batch}", f"--max_input_len={max_input_len}", f"--max_seq_len={max_seq_len}",
            f"--max_num_tokens={max_num_tokens}", "--max_beam_width=1",
            f"--gemm_plugin={plugin}", f"--gpt_attention_plugin={plugin}",
            "--remove_input_padding=enable", "--kv_cache_type=paged", "--context_fmha=enable",
            "--use_paged_context_fmha=enable", "--logits_dtype=float32"]
