"""spark_llm: thin Triton adapter over tts.spark.engine (weights + in-flight batching decode loop).

Decoupled: execute() validates and hands each request to the engine, which answers from its own
threads through the request's response sender (one response per audio chunk, then an empty final
response). A request carrying only `cancel_key` drops that running request from the batch.
"""

import json
import sys
import threading
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
        import torch

        from triton_models import shared
        from tts import limits
        from tts.audio import SPARK_SAMPLE_RATE
        from tts.spark.engine import SparkCancelled, SparkEngine
        from tts.spark.pipeline import SparkPipeline
        from tts.spark.request import SparkOptions, SparkRequest

        self.shared, self.Cancelled, self.Options, self.Request = shared, SparkCancelled, SparkOptions, SparkRequest
        self.limits, self.sample_rate = limits, SPARK_SAMPLE_RATE
        params = shared.model_params(args)["params"]
        kind, device_id = args.get("model_instance_kind", "CPU"), args.get("model_instance_device_id", "0")
        device = f"cuda:{device_id}" if kind == "GPU" and torch.cuda.is_available() else "cpu"
        self.demo = params.get("demo_weights") == "true"
        started = time.perf_counter()  # weights, prompt models, decode-step compile and capture
        from triton_models.runtimes import spark_pipeline_kwargs  # runtime trtllm: decode on spark_trtllm

        self.engine = SparkEngine(SparkPipeline(params["model_dir"], device=device, demo_weights=self.demo,
                                                **spark_pipeline_kwargs(params, pb_utils)),
                                  on_idle=shared.release_memory)  # freed buffers back once no request runs
        label = "DEMO WEIGHTS (random: output is noise)" if self.demo else params["model_dir"]
        captured = self.engine.pipeline.vocode_capture_s
        graphs = "" if captured is None else f" (first streamed window's vocoder graph captured in {captured} s)"
        print(f"[spark_llm] ready on {device} in {time.perf_counter() - started:.1f} s{graphs}: {label}", flush=True)
        self._closing = False
        shared.register_stub(args)  # fronts and the studio watch this stub's liveness
        threading.Thread(target=self._log_batch_size, daemon=True).start()

    def _log_batch_size(self) -> None:
        """Log every change of the running batch size (tests and the Server tab read it)."""
        last = 0
        while not self._closing:
            now = self.engine.running_batch_size
            if now != last:
                print(f"[spark_llm] running batch size {now}", flush=True)
                last = now
            time.sleep(0.002)

    def _request(self, request, key: str):
        s, pb = self.shared, pb_utils
        options = self.Options(
            temperature=float(s.get_scalar(pb, request, "temperature", 0.8)),
            top_k=int(s.get_scalar(pb, request, "top_k", 50)),
            top_p=float(s.get_scalar(pb, request, "top_p", 0.95)),
            max_new_tokens=int(s.get_scalar(pb, request, "max_new_tokens", 3000)),
            min_new_tokens=int(s.get_scalar(pb, request, "min_new_tokens", 0)),
            seed=s.get_scalar(pb, request, "seed", None),
            use_prompt_cache=bool(s.get_scalar(pb, request, "use_prompt_cache", True)))
        wav = s.get_wav(pb, request, required=False)
        if wav is not None and wav.size == 0:
            wav = None  # an empty clip is no clip
        text, ref_text = s.get_text(pb, request, "target_text"), s.get_text(pb, request, "reference_text", required=False)
        self.limits.check_request("spark", text, ref_text, 0 if wav is None else wav.size, self.sample_rate)
        return self.Request(
            text=text, reference_wav=wav, reference_text=ref_text,
            gender=s.get_scalar(pb, request, "gender", None) or None,
            pitch_level=s.get_scalar(pb, request, "pitch_level", None) or None,
            speed_level=s.get_scalar(pb, request, "speed_level", None) or None,
            options=options, streaming=bool(s.get_scalar(pb, request, "streaming", False)), request_id=key or None)

    def _deliver(self, sender, event) -> None:
        s, final = self.shared, pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if isinstance(event, self.Cancelled):
            sender.send(flags=final)
        elif isinstance(event, BaseException):  # a ValueError is the request's own fault (checked in the engine)
            sender.send(s.error_response(pb_utils, str(event), invalid=isinstance(event, ValueError)), flags=final)
        else:
            info = dict(event.info, demo_weights=self.demo, overlap_samples=event.overlap_samples,
                        chunk_index=event.index, final=event.final)
            # the last chunk carries the final flag: one message, not the chunk and an empty final one
            sender.send(s.audio_response(pb_utils, event.wav, info), flags=final if event.final else 0)

    def execute(self, requests):
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        for request in requests:
            sender = request.get_response_sender()
            cancel = self.shared.get_scalar(pb_utils, request, "cancel_key", None)
            if cancel:
                self.engine.cancel(cancel)
                sender.send(flags=final)
                continue
            try:
                key = self.shared.get_scalar(pb_utils, request, "request_key", "") or ""
                self.engine.submit(self._request(request, key), callback=lambda ev, snd=sender: self._deliver(snd, ev))
            except ValueError as exc:  # the request's own fault (limits included): invalid-argument status
                sender.send(self.shared.error_response(pb_utils, str(exc), invalid=True), flags=final)
        return None

    def finalize(self):
        self._closing = True
        self.engine.close()
