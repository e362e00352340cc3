"""spark_tts: upstream-compatible offline Spark-TTS; a weightless front end over spark_llm (BLS)."""

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
        from tts.audio import join_chunks

        self.engine = shared.model_params(args)["params"].get("engine", "spark_llm")
        self.shared, self.join = shared, join_chunks
        self.stubs = shared.stubs_dir(args)  # engine liveness while a request waits on it
        shared.register_stub(args)

    def execute(self, requests):
        for r in requests:
            key = self.shared.request_key()
            extra = [self.shared.key_tensor(pb_utils, "request_key", key)]
            response = self.shared.offline_front(
                pb_utils, r, self.engine, self.shared.SPARK_INPUTS, self.join, extra=extra,
                on_cancel=lambda k=key: self.shared.cancel_via_bls(pb_utils, self.engine, k),
                stubs=self.stubs)
            self.shared.send_final(pb_utils, r, response)  # faster than returning it (see send_final)
        return None
