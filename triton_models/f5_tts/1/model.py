"""f5_tts: upstream-compatible offline F5-TTS; a weightless front end over f5_engine (BLS)."""

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
        from tts.audio import join_chunks

        self.shared, self.join = shared, join_chunks

    def _one(self, request):
        s = self.shared
        inputs = s.forward_inputs(pb_utils, request, INPUTS)
        inputs.append(pb_utils.Tensor("streaming", np.array([[False]], dtype=bool)))
        bls = pb_utils.InferenceRequest(model_name=self.engine, inputs=inputs,
                                        requested_output_names=["waveform", "info"])
        chunks, overlaps, info = [], [], None
        for response in bls.exec(decoupled=True):
            if response.has_error():
                return s.error_response(pb_utils, response.error().message())
            wav, chunk_info = s.response_audio(pb_utils, response)
            if wav is None:
                continue
            chunks.append(wav)
            overlaps.append(int(chunk_info["overlap_samples"]))
            info = chunk_info
        if info is None:
            return s.error_response(pb_utils, "the F5 engine returned no audio")
        info.update(overlap_samples=0, chunk_index=len(chunks) - 1, final=True)
        return s.audio_response(pb_utils, self.join(chunks, overlaps), info)

    def execute(self, requests):
        return [self._one(r) for r in requests]
