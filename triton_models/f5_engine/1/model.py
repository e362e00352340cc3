"""f5_engine: thin Triton adapter over tts.f5 (weights, batching across requests, one response per chunk)."""

import json
import sys
import time

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
        from triton_models.shared import model_params

        params = model_params(args)["params"]
        import torch

        from tts import limits
        from tts.audio import F5_SAMPLE_RATE, join_chunks
        from triton_models.runtimes import f5_pipeline_kwargs
        from tts.f5.pipeline import F5Options, F5Pipeline, serve
        from triton_models import shared

        self.shared, self.F5Options, self.serve, self.join = shared, F5Options, serve, join_chunks
        self.limits, self.sample_rate = limits, F5_SAMPLE_RATE
        self.cancel_dir = shared.cancel_dir(args)  # front ends drop a marker named by the request key
        kind, device_id = args.get("model_instance_kind", "CPU"), args.get("model_instance_device_id", "0")
        device = f"cuda:{device_id}" if kind == "GPU" and torch.cuda.is_available() else "cpu"
        self.demo = params.get("demo_weights") == "true"
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        self.pipeline = F5Pipeline(params["checkpoint"], params["vocab"], params["vocos_dir"],
                                   params.get("model_name", "F5TTS_v1_Base"), device=device, dtype=dtype,
                                   **f5_pipeline_kwargs(params))  # runtime trtllm: TensorRT DiT + Vocos
        started = time.perf_counter()
        stats = self.pipeline.warmup()  # compile + CUDA graph capture before Triton reports ready
        if stats:
            print(f"[f5_engine] warmup {time.perf_counter() - started:.1f} s: {stats}", flush=True)
        label = "DEMO WEIGHTS (random: output is noise)" if self.demo else params["checkpoint"]
        print(f"[f5_engine] ready on {device}: {label}", flush=True)
        if device.startswith("cuda"):
            print(f"[f5_engine] cuDNN {torch.backends.cudnn.version()}, libraries: "
                  f"{shared.loaded_libraries()}", flush=True)
        self.profile = shared.ExecuteProfile("f5_engine")  # STUDIO_PROFILE_DIR (off by default)
        shared.register_stub(args)  # fronts and the studio watch this stub's liveness

    def _parse(self, request, streaming: bool):
        s, pb = self.shared, pb_utils
        options = self.F5Options(
            nfe_steps=int(s.get_scalar(pb, request, "nfe_steps", 32)),
            cfg_strength=float(s.get_scalar(pb, request, "cfg_strength", 2.0)),
            sway_coef=float(s.get_scalar(pb, request, "sway_coef", -1.0)),
            speed=float(s.get_scalar(pb, request, "speed", 1.0)),
            seed=s.get_scalar(pb, request, "seed", None),
            use_prompt_cache=bool(s.get_scalar(pb, request, "use_prompt_cache", True)))
        wav = s.get_wav(pb, request)
        ref_text, text = s.get_text(pb, request, "reference_text"), s.get_text(pb, request, "target_text")
        self.limits.check_request("f5", text, ref_text, wav.size, self.sample_rate)
        return self.pipeline.make_request(wav, ref_text, text, options, streaming)

    def execute(self, requests):
        t_start = time.perf_counter()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        work, senders, keys = [], {}, {}
        sends = []
        held: dict[int, tuple[list, list]] = {}  # offline requests: their chunks until the last one
        for i, request in enumerate(requests):
            sender = request.get_response_sender()
            try:
                streaming = bool(self.shared.get_scalar(pb_utils, request, "streaming", False))
                work.append((i, self._parse(request, streaming), streaming))
                if not streaming:
                    held[i] = ([], [])
                senders[i] = sender
                keys[i] = self.shared.get_scalar(pb_utils, request, "request_key", "") or ""
            except ValueError as exc:  # the request's own fault (limits included): invalid-argument status
                sender.send(self.shared.error_response(pb_utils, str(exc), invalid=True), flags=final)

        t_parsed = self.shared.ms_since(t_start)

        def emit(key, index, wav, info):
            t0 = time.perf_counter()
            if key in held:
                # Offline: one response with the joined audio and the final flag together (the
                # front forwards it as it is): one message through the stubs instead of a message
                # per chunk plus an empty final one, and no join in the front.
                chunks, overlaps = held[key]
                chunks.append(wav)
                overlaps.append(int(info["overlap_samples"]))
                if not info["final"]:
                    return
                info = dict(info, overlap_samples=0)
                senders[key].send(self.shared.audio_response(pb_utils, self.join(chunks, overlaps), info), flags=final)
            else:
                senders[key].send(self.shared.audio_response(pb_utils, wav, info))
                if info["final"]:
                    senders[key].send(flags=final)
            sends.append((self.shared.ms_since(t_start), self.shared.ms_since(t0), info["compute_ms"]))

        def cancelled(key) -> bool:
            marker = self.cancel_dir / keys[key] if keys.get(key) else None
            return bool(marker) and marker.exists()

        if work:
            try:
                with self.profile:
                    dropped = self.serve(self.pipeline, work, emit, self.demo, cancelled)
                for key in dropped:
                    print(f"[f5_engine] request {keys.get(key)} cancelled: its remaining chunks were dropped", flush=True)
                    senders[key].send(flags=final)
            except Exception as exc:  # keep the instance alive; tell every waiting request why
                msg = f"F5 synthesis failed: {type(exc).__name__}: {exc}"
                print(f"[f5_engine] {msg}", flush=True)
                for key, sender in senders.items():
                    try:
                        sender.send(self.shared.error_response(pb_utils, msg), flags=final)
                    except Exception:  # noqa: BLE001 - already finished
                        pass
        for key in keys.values():
            if key:
                (self.cancel_dir / key).unlink(missing_ok=True)
        self.shared.release_memory()  # a large request's buffers back to the system, not kept at peak
        # sends: (ms since execute began, ms the send took, the request's compute_ms so far)
        self.shared.timing_log("f5_engine", requests=len(requests), parse=t_parsed, sends=sends,
                               total=self.shared.ms_since(t_start))
        return None
