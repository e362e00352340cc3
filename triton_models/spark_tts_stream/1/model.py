"""spark_tts_stream: decoupled Spark-TTS over spark_llm; a closed client stream cancels the decode slot."""

import json
import sys

import triton_python_backend_utils as pb_utils


def _use_project(args) -> None:
    """The backend stub ignores PYTHONPATH: put the project root (a config parameter) on sys.path."""
    root = json.loads(args["model_config"])["parameters"]["project_root"]["string_value"]
    if root not in sys.path:
        sys.path.insert(0, root)


class TritonPythonModel:
    def initialize(self, args):
        _use_project(args)
        from triton_models import shared

        self.engine = shared.model_params(args)["params"].get("engine", "spark_llm")
        self.shared = shared
        self.stubs = shared.stubs_dir(args)  # engine liveness while a request waits on it
        shared.register_stub(args)

    def execute(self, requests):
        for request in requests:
            key = self.shared.request_key()
            extra = [self.shared.key_tensor(pb_utils, "request_key", key)]
            self.shared.stream_front(pb_utils, request, self.engine, self.shared.SPARK_INPUTS, extra=extra,
                                     on_cancel=lambda k=key: self.shared.cancel_via_bls(pb_utils, self.engine, k),
                                     stubs=self.stubs)
        return None
