"""f5_engine: thin Triton adapter over tts.f5 (weights, batching across requests, one response per chunk)."""

import json
import sys
import time

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
        from tts.f5.engine import F5Engine, serve
        from tts.f5.pipeline import F5Options, F5Pipeline
        from tts.switches import f5_engine_loop
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
        # Continuous batching on the engine's thread (`tts.f5.engine`), on by default on a GPU, where
        # it measured faster at c=8 and the same at c=1 (H100, offline 16 NFE: rtf 0.0071 against
        # 0.0092 at c=8, 0.0120 against 0.0118 at c=1; BENCHMARKS.md), off by default on the CPU, where
        # a batch's arithmetic is the whole cost and larger batches pay (tiny checkpoints, 2 cores:
        # rtf 0.060-0.065 against 0.050-0.056 at c=4). Off: each execute runs its requests to the end.
        # STUDIO_F5_ENGINE_LOOP=0|1 overrides either default.
        self.engine = None
        if f5_engine_loop(device.startswith("cuda")):
            queued = shared.engine_queue_counter(pb_utils, args, "f5_engine")  # the wait Triton's queue time misses
            self.engine = F5Engine(self.pipeline, self.demo, log=lambda msg: print(f"[f5_engine] {msg}", flush=True),
                                   on_queued=queued.add_ms if queued is not None else None,
                                   on_idle=shared.release_memory,
                                   on_batch=lambda n, chunks, ms: shared.timing_log("f5_engine:batch", requests=n,
                                                                                   chunks=chunks, ms=round(ms, 3)),
                                   batch_context=self.profile)
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
        t_start, received_at = time.perf_counter(), time.time()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        work = []  # (key, F5Request, streaming, sink)
        for i, request in enumerate(requests):
            sender = request.get_response_sender()
            try:
                streaming = bool(self.shared.get_scalar(pb_utils, request, "streaming", False))
                key = self.shared.get_scalar(pb_utils, request, "request_key", "") or ""
                work.append((key or f"#{i}", self._parse(request, streaming), streaming,
                             _Sink(self, sender, streaming, key)))
            except ValueError as exc:  # the request's own fault (limits included): invalid-argument status
                sender.send(self.shared.error_response(pb_utils, str(exc), invalid=True), flags=final)
        t_parsed = self.shared.ms_since(t_start)
        if self.engine is not None:  # continuous batching: the engine's thread answers
            for key, req, streaming, sink in work:
                self.engine.submit(key, req, streaming, sink, received_at=received_at)
            self.shared.timing_log("f5_engine", requests=len(requests), parse=t_parsed,
                                   total=self.shared.ms_since(t_start))
            return None
        # STUDIO_F5_ENGINE_LOOP=0: this execute runs its requests to the end, then returns
        sinks = {key: sink for key, _, _, sink in work}
        if work:
            try:
                with self.profile:
                    dropped = self.serve(self.pipeline, [(k, r, st) for k, r, st, _ in work],
                                         lambda key, index, wav, info: sinks[key].emit(index, wav, info), self.demo,
                                         lambda key: sinks[key].cancelled())
                for key in dropped:
                    print(f"[f5_engine] request {key} cancelled: its remaining chunks were dropped", flush=True)
                    sinks[key].dropped()
            except Exception as exc:  # keep the instance alive; tell every waiting request why
                msg = f"F5 synthesis failed: {type(exc).__name__}: {exc}"
                print(f"[f5_engine] {msg}", flush=True)
                for sink in sinks.values():
                    sink.fail(msg)
        self.shared.release_memory()  # a large request's buffers back to the system, not kept at peak
        self.shared.timing_log("f5_engine", requests=len(requests), parse=t_parsed, total=self.shared.ms_since(t_start))
        return None

    def finalize(self):
        if self.engine is not None:
            self.engine.close()


class _Sink:
    """One request's way back: offline requests get one response with the joined audio and the
    final flag together (one message through the stubs instead of one per chunk plus an empty final
    one, and no join in the front); streaming ones a response per chunk, the last one with the final
    flag (one message fewer through the stubs than the chunk and an empty final response).
    Every way out removes the request's cancel marker."""

    def __init__(self, model: "TritonPythonModel", sender, streaming: bool, key: str):
        self.model, self.sender, self.streaming, self.key = model, sender, streaming, key
        self.chunks: list = []
        self.overlaps: list[int] = []
        self.closed = False

    def emit(self, index: int, wav, info: dict) -> None:
        m, final = self.model, pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if self.streaming:
            response = m.shared.audio_response(pb_utils, wav, info)
            if info["final"]:  # the last chunk carries the final flag: one message, no empty one after it
                self._close(lambda: self.sender.send(response, flags=final))
            else:
                self.sender.send(response)
            return
        self.chunks.append(wav)
        self.overlaps.append(int(info["overlap_samples"]))
        if info["final"]:
            joined = m.join(self.chunks, self.overlaps)
            self.chunks, self.overlaps = [], []
            response = m.shared.audio_response(pb_utils, joined, dict(info, overlap_samples=0))
            self._close(lambda: self.sender.send(response, flags=final))

    def fail(self, message: str) -> None:
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        self._close(lambda: self.sender.send(self.model.shared.error_response(pb_utils, message), flags=final))

    def dropped(self) -> None:
        self._close(lambda: self.sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL))

    def cancelled(self) -> bool:
        return bool(self.key) and (self.model.cancel_dir / self.key).exists()

    def _close(self, send) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            send()
        finally:
            if self.key:
                (self.model.cancel_dir / self.key).unlink(missing_ok=True)
