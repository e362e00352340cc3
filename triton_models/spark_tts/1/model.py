"""spark_tts: upstream-compatible offline Spark-TTS; a weightless front end over spark_llm (BLS)."""

import json
import sys
import uuid

import numpy as np
import triton_python_backend_utils as pb_utils


def _use_project(args) -> None:
    """The backend stub ignores PYTHONPATH: put the project root (a config parameter) on sys.path."""
    root = json.loads(args["model_config"])["parameters"]["project_root"]["string_value"]
    if root not in sys.path:
        sys.path.insert(0, root)


INPUTS = ["reference_wav", "reference_wav_len", "reference_text", "target_text", "temperature", "top_p", "top_k",
          "max_new_tokens", "min_new_tokens", "use_prompt_cache", "seed", "gender", "pitch_level", "speed_level"]


def _key_tensor(name: str, key: str):
    return pb_utils.Tensor(name, np.array([[key.encode()]], dtype=np.object_))


class TritonPythonModel:
    def initialize(self, args):
        _use_project(args)
        from triton_models import shared
        from tts.audio import join_chunks

        self.engine = shared.model_params(args)["params"].get("engine", "spark_llm")
        self.shared, self.join = shared, join_chunks

    def execute(self, requests):
        return [self.shared.offline_front(pb_utils, r, self.engine, INPUTS, self.join,
                                          extra=[_key_tensor("request_key", uuid.uuid4().hex)]) for r in requests]
