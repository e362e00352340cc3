"""spark_tts_stream: decoupled Spark-TTS over spark_llm; a closed client stream cancels the decode slot."""

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

        self.engine = shared.model_params(args)["params"].get("engine", "spark_llm")
        self.shared = shared

    def _cancel(self, key: str) -> None:
        """Tell the engine to drop this request from its running batch (a request carrying its key)."""
        req = pb_utils.InferenceRequest(model_name=self.engine, inputs=[_key_tensor("cancel_key", key)],
                                        requested_output_names=["waveform", "info"])
        for _ in req.exec(decoupled=True):
            pass

    def execute(self, requests):
        for request in requests:
            key = uuid.uuid4().hex
            self.shared.stream_front(pb_utils, request, self.engine, INPUTS, extra=[_key_tensor("request_key", key)],
                                     on_cancel=lambda k=key: self._cancel(k))
        return None
