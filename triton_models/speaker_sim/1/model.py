"""speaker_sim: thin Triton adapter over tts.speaker_sim (WavLM x-vector): 16 kHz clips in, embeddings out."""

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

        from triton_models import shared
        from tts.speaker_sim import Embedder, check_clip

        self.shared, self.check_clip = shared, check_clip
        params = shared.model_params(args)["params"]
        kind, device_id = args.get("model_instance_kind", "CPU"), args.get("model_instance_device_id", "0")
        device = f"cuda:{device_id}" if kind == "GPU" and torch.cuda.is_available() else "cpu"
        self.demo = params.get("demo_weights") == "true"
        self.embedder = Embedder(params["model_dir"], device=device)
        label = "DEMO WEIGHTS (random: similarities are meaningless)" if self.demo else params["model_dir"]
        print(f"[speaker_sim] ready on {device}: {label}", flush=True)
        shared.register_stub(args)  # the studio watches this stub's liveness

    def execute(self, requests):
        responses = [None] * len(requests)
        items = []
        for i, request in enumerate(requests):
            try:
                wav = self.shared.get_wav(pb_utils, request, name="audio", length_name="audio_len")
                self.check_clip(wav)
                items.append((i, wav))
            except ValueError as exc:
                responses[i] = self.shared.error_response(pb_utils, str(exc), invalid=True)
        if items:
            embeddings, ms = self.embedder.embed([w for _, w in items])
            for (i, wav), emb in zip(items, embeddings):
                info = {"compute_ms": round(ms, 3), "audio_s": round(wav.size / 16000, 3), "demo_weights": self.demo,
                        "batch": len(items)}
                responses[i] = pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("embedding", emb.reshape(1, -1).astype(np.float32)),
                    self.shared.info_tensor(pb_utils, info)])
        return responses
