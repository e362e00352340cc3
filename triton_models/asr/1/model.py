"""asr: thin Triton adapter over tts.asr (Whisper): 16 kHz clips in, text and info out."""

import json
import sys

import numpy as np
import triton_python_backend_utils as pb_utils


def _use_project(args) -> None:
    """The backend stub ignores PYTHONPATH: put the project root (a config parameter) on sys.path."""
    root = json.loads(args["model_config"])["parameters"]["project_root"]["string_value"]
    if root not in sys.path:
        sys.path.insert(0, root)


class TritonPythonModel:
    def initialize(self, args):
        _use_project(args)
        import torch
        from transformers.utils import logging

        from triton_models import shared
        from tts.asr import Recognizer

        logging.set_verbosity_error()  # generation-config chatter on every request otherwise
        self.shared = shared
        params = shared.model_params(args)["params"]
        kind, device_id = args.get("model_instance_kind", "CPU"), args.get("model_instance_device_id", "0")
        device = f"cuda:{device_id}" if kind == "GPU" and torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self.demo = params.get("demo_weights") == "true"
        self.asr = Recognizer(params["model_dir"], device=device, dtype=dtype)
        label = "DEMO WEIGHTS (random: transcripts are noise)" if self.demo else params["model_dir"]
        print(f"[asr] ready on {device}: {label}", flush=True)
        shared.register_stub(args)  # the studio watches this stub's liveness

    def _parse(self, request):
        s = self.shared
        wav = s.get_wav(pb_utils, request, name="audio", length_name="audio_len")
        language = s.get_text(pb_utils, request, "language", required=False) or None
        fixed = s.get_scalar(pb_utils, request, "fixed_tokens", None)
        return wav, language, int(fixed) if fixed else None

    def execute(self, requests):
        responses = [None] * len(requests)
        groups: dict[tuple, list[tuple[int, np.ndarray]]] = {}
        for i, request in enumerate(requests):
            try:
                wav, language, fixed = self._parse(request)
                self.asr.check_language(language)
                groups.setdefault((language, fixed), []).append((i, wav))
            except ValueError as exc:
                responses[i] = self.shared.error_response(pb_utils, str(exc), invalid=True)
        for (language, fixed), items in groups.items():
            try:
                results = self.asr.transcribe([w for _, w in items], language, fixed)
            except ValueError as exc:  # one clip of the group is unusable: answer each alone
                results = []
                for i, wav in items:
                    try:
                        results += self.asr.transcribe([wav], language, fixed)
                    except ValueError as one:
                        responses[i] = self.shared.error_response(pb_utils, str(one), invalid=True)
                        results.append(None)
            for (i, wav), r in zip(items, results):
                if r is None:
                    continue
                info = {"language": r.language, "compute_ms": round(r.compute_ms, 3), "tokens": r.tokens,
                        "audio_s": round(wav.size / 16000, 3), "demo_weights": self.demo, "batch": len(items)}
                responses[i] = pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("text", np.array([[r.text.encode("utf-8")]], dtype=np.object_)),
                    self.shared.info_tensor(pb_utils, info)])
        return responses
