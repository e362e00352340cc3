"""f5_tts_stream: decoupled F5-TTS; forwards f5_engine's per-chunk responses as they finish."""

import json
import sys

import numpy as np
import triton_python_backend_utils as pb_utils


def _use_project(args) -> None:
    """The backend stub ignores PYTHONPATH: put the project root (a config parameter) on sys.path."""
    root = json.loads(args["model_config"])["parameters"]["project_root"]["string_value"]
    if root not in sys.path:
        sys.path.insert(0, root)

INPUTS = ["reference_wav", "reference_wav_len", "reference_text", "target_text", "nfe_steps", "cfg_strength",
          "sway_coef", "speed", "use_prompt_cache", "seed"]


class TritonPythonModel:
    def initialize(self, args):
        _use_project(args)
        from triton_models.shared import model_params

        self.engine = model_params(args)["params"].get("engine", "f5_engine")
        from triton_models import shared

        self.shared = shared

    def _stream(self, request):
        s, final = self.shared, pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        sender = request.get_response_sender()
        inputs = s.forward_inputs(pb_utils, request, INPUTS)
        inputs.append(pb_utils.Tensor("streaming", np.array([[True]], dtype=bool)))
        bls = pb_utils.InferenceRequest(model_name=self.engine, inputs=inputs,
                                        requested_output_names=["waveform", "info"])
        try:
            for response in bls.exec(decoupled=True):
                if request.is_cancelled():
                    break  # the client closed its stream: stop forwarding
                if response.has_error():
                    sender.send(s.error_response(pb_utils, response.error().message()), flags=final)
                    return
                wav, info = s.response_audio(pb_utils, response)
                if wav is not None:
                    sender.send(s.audio_response(pb_utils, wav, info))
        except Exception as exc:  # noqa: BLE001 - one bad request must not take the instance down
            sender.send(s.error_response(pb_utils, f"streaming failed: {exc}"), flags=final)
            return
        sender.send(flags=final)  # audio responses never carry the final flag

    def execute(self, requests):
        for request in requests:
            self._stream(request)
        return None
