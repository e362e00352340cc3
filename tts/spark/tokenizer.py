"""The LLM's text tokenizer plus the id maps the decoder needs (token id -> BiCodec token).

Loaded from `LLM/tokenizer.json` with the `tokenizers` library (what transformers' fast Qwen2
tokenizer wraps; Qwen adds no BOS, so `encode(prompt)` gives the ids upstream feeds the LLM).
Generated ids are mapped straight to BiCodec tokens through `<|bicodec_semantic_N|>` /
`<|bicodec_global_N|>` ids, the same result as upstream's decode-then-regex.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tts.spark import prompts
from tts.spark.config import GLOBAL_CODEBOOK, SEMANTIC_CODEBOOK

#: Tokens that end a generation besides the LLM config's eos: upstream's sequences end with them.
END_TOKENS = ("<|im_end|>", "<|endoftext|>", prompts.END_SEMANTIC)


class SparkTokenizer:
    def __init__(self, llm_dir: str | Path, eos_token_ids: tuple[int, ...] = ()):
        from tokenizers import Tokenizer

        llm_dir = Path(llm_dir)
        path = llm_dir / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"LLM tokenizer not found: {path}")
        self.tok = Tokenizer.from_file(str(path))
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.semantic_ids = self._ids(prompts.semantic_token, SEMANTIC_CODEBOOK)
        self.global_ids = self._ids(prompts.global_token, GLOBAL_CODEBOOK)
        size = max(self.vocab_size, int(self.semantic_ids.max()) + 1, int(self.global_ids.max()) + 1)
        #: id -> semantic token (or -1), id -> global token (or -1)
        self.semantic_of = np.full(size, -1, dtype=np.int64)
        self.semantic_of[self.semantic_ids] = np.arange(SEMANTIC_CODEBOOK)
        self.global_of = np.full(size, -1, dtype=np.int64)
        self.global_of[self.global_ids] = np.arange(GLOBAL_CODEBOOK)
        ends = set(int(i) for i in eos_token_ids)
        for name in END_TOKENS:
            tid = self.tok.token_to_id(name)
            if tid is not None:
                ends.add(tid)
        cfg_path = llm_dir / "tokenizer_config.json"
        if cfg_path.is_file():
            eos = json.loads(cfg_path.read_text(encoding="utf-8")).get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
            if isinstance(eos, str) and self.tok.token_to_id(eos) is not None:
                ends.add(self.tok.token_to_id(eos))
        if not ends:
            raise ValueError(f"{llm_dir}: no end-of-sequence token found (config eos_token_id, <|im_end|>)")
        self.end_ids = tuple(sorted(ends))
        #: The lowest id a generation keeps or ends on (end, global and semantic tokens): upstream's
        #: vocabulary puts them, Qwen's specials and Spark's markers after every text token, so the
        #: decode step's speech head covers ids from here on (`tts.spark.fast_step`).
        self.speech_ids_from = int(min(min(self.end_ids), self.semantic_ids.min(), self.global_ids.min()))

    def _ids(self, name_of, count: int) -> np.ndarray:
        ids = np.empty(count, dtype=np.int64)
        for i in range(count):
            tid = self.tok.token_to_id(name_of(i))
            if tid is None:
                raise ValueError(f"the LLM tokenizer lacks {name_of(i)}: not a Spark-TTS tokenizer")
            ids[i] = tid
        return ids

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def split_generated(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """Generated ids -> (global tokens, semantic tokens) in order; other ids are dropped."""
        ids = np.asarray(ids, dtype=np.int64)
        ids = ids[(ids >= 0) & (ids < len(self.semantic_of))]
        g, s = self.global_of[ids], self.semantic_of[ids]
        return g[g >= 0], s[s >= 0]
