"""Liveness of a Triton pod: one tiny real request to each served model, over gRPC, with a deadline.

Triton's own `/v2/health/live` (and even `/v2/health/ready`) stays green when a Python stub of a
model has died or an engine is blocked, so Kubernetes would keep routing to a server that fails every
request. This asks each model for the smallest real work it does (a 1 s tone as the prompt, "Hi." as
the text, 2 ODE steps for F5, 4 forced tokens for Spark, 2 tokens of speech recognition) and exits 1
when any of them errors or misses the deadline; the streaming models must send audio and their final
response. The requests go straight to Triton (never through `studio.client`, which would try to
repair what it finds: the probe only reports).

    python3 docker/liveness.py [--url 127.0.0.1:8001] [--models f5_tts,spark_tts_stream,...]
                               [--timeout 20]

Without --models, every known model that Triton reports ready is asked (at least one must be);
with --models, each named model must answer (the Kubernetes manifests name them, so a model that
failed to come back after a reload fails the probe too). Imports numpy and tritonclient only: a
probe runs every minute and must start fast (no torch).
"""

from __future__ import annotations

import argparse
import queue
import sys
import threading
import time

import numpy as np

#: Prompt and text of the tiny requests. The prompt is a 1 s tone at -20 dBFS: above the 0.5 s
#: minimum of both families (tts/f5/reference.py, tts/spark/reference.py) after their silence
#: trimming at -42 dBFS, and above the recognisers' minimum (tts/asr.py, tts/speaker_sim.py).
PROMPT_S = 1.0
PROMPT_AMPLITUDE = 0.1  # -20 dBFS peak
TARGET_TEXT = "Hi."
REFERENCE_TEXT = "Hello there."
#: The smallest options that still run each engine's real path: F5's ODE loop twice; Spark's decode
#: loop for a fixed 4 tokens (min = max ignores the end token, so the length does not depend on the
#: weights); Whisper's decoder for 2 tokens.
F5_PARAMS = {"nfe_steps": ("INT32", 2), "seed": ("INT64", 0)}
SPARK_PARAMS = {"top_k": ("INT32", 1), "max_new_tokens": ("INT32", 4), "min_new_tokens": ("INT32", 4),
                "seed": ("INT64", 0)}
ASR_PARAMS = {"fixed_tokens": ("INT32", 2)}
#: model -> (kind, sample rate of its audio input). Kinds: tts (offline), stream (decoupled), check.
MODELS = {
    "f5_tts": ("tts", 24000), "f5_tts_stream": ("stream", 24000),
    "spark_tts": ("tts", 16000), "spark_tts_stream": ("stream", 16000),
    "asr": ("check", 16000), "speaker_sim": ("check", 16000),
}
DEFAULT_TIMEOUT_S = 20.0


def tone(sr: int, seconds: float = PROMPT_S) -> np.ndarray:
    """A 220 Hz tone, float32 [samples]: deterministic, loud enough to survive silence trimming."""
    t = np.arange(int(seconds * sr), dtype=np.float32) / sr
    return (PROMPT_AMPLITUDE * np.sin(2 * np.pi * 220.0 * t)).astype(np.float32)


def build_request(grpcclient, model: str) -> list:
    """The InferInputs of `model`'s tiny request (DESIGN.md "Inputs": batch dimension first)."""
    kind, sr = MODELS[model]

    def tensor(name: str, datatype: str, array: np.ndarray):
        inp = grpcclient.InferInput(name, list(array.shape), datatype)
        inp.set_data_from_numpy(array)
        return inp

    wav = tone(sr).reshape(1, -1)
    length = np.array([[wav.shape[1]]], dtype=np.int32)
    if kind == "check":
        inputs = [tensor("audio", "FP32", wav), tensor("audio_len", "INT32", length)]
        params = ASR_PARAMS if model == "asr" else {}
    else:
        family = model.split("_", 1)[0]
        ref_text = REFERENCE_TEXT if family == "f5" else ""  # Spark clones from the audio alone
        inputs = [tensor("reference_wav", "FP32", wav), tensor("reference_wav_len", "INT32", length),
                  tensor("reference_text", "BYTES", np.array([[ref_text.encode()]], dtype=np.object_)),
                  tensor("target_text", "BYTES", np.array([[TARGET_TEXT.encode()]], dtype=np.object_))]
        params = F5_PARAMS if family == "f5" else SPARK_PARAMS
    dtypes = {"INT32": np.int32, "INT64": np.int64}
    for name, (datatype, value) in params.items():
        inputs.append(tensor(name, datatype, np.array([[value]], dtype=dtypes[datatype])))
    return inputs


def check_offline(grpcclient, client, model: str, timeout_s: float) -> None:
    """One request, one response; its first output must hold something."""
    first = "waveform" if MODELS[model][0] == "tts" else ("text" if model == "asr" else "embedding")
    result = client.infer(model, build_request(grpcclient, model), client_timeout=timeout_s,
                          outputs=[grpcclient.InferRequestedOutput(first), grpcclient.InferRequestedOutput("info")])
    out = result.as_numpy(first)
    if out is None or out.size == 0:
        raise RuntimeError(f"{model} answered without {first}")


def check_stream(grpcclient, client, model: str, timeout_s: float) -> None:
    """One streamed request: at least one audio response, then the empty final one, before the deadline."""
    answers: queue.SimpleQueue = queue.SimpleQueue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)), stream_timeout=timeout_s)
    try:
        client.async_stream_infer(model, build_request(grpcclient, model), enable_empty_final_response=True,
                                  outputs=[grpcclient.InferRequestedOutput("waveform"),
                                           grpcclient.InferRequestedOutput("info")])
        deadline = time.monotonic() + timeout_s
        audio = 0
        while True:
            try:
                result, error = answers.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"{model} did not finish its stream in {timeout_s:.0f} s") from None
            if error is not None:
                raise RuntimeError(str(error))
            wav = result.as_numpy("waveform")
            audio += 0 if wav is None else wav.size
            params = result.get_response().parameters
            if "triton_final_response" in params and params["triton_final_response"].bool_param:
                break
        if audio == 0:
            raise RuntimeError(f"{model} ended its stream without audio")
    finally:
        client.stop_stream(cancel_requests=True)


def check_model(grpcclient, url: str, model: str, timeout_s: float) -> str | None:
    """None when `model` served its tiny request in time, else what went wrong (one line)."""
    client = grpcclient.InferenceServerClient(url)
    try:
        if MODELS[model][0] == "stream":
            check_stream(grpcclient, client, model, timeout_s)
        else:
            check_offline(grpcclient, client, model, timeout_s)
    except Exception as exc:  # noqa: BLE001 - any failure is the probe's answer
        return " ".join(str(exc).split())[:300] or type(exc).__name__
    finally:
        client.close()
    return None


def served_models(grpcclient, url: str, timeout_s: float) -> list[str]:
    """The known models Triton reports ready (the repository index is restricted: ask each by name)."""
    client = grpcclient.InferenceServerClient(url)
    try:
        found = []
        for name in MODELS:
            try:
                if client.is_model_ready(name, client_timeout=timeout_s):
                    found.append(name)
            except Exception:  # noqa: BLE001 - an unknown model is simply not served
                pass
        return found
    finally:
        client.close()


def probe(url: str, models: list[str] | None, timeout_s: float, grpcclient=None) -> list[str]:
    """Ask every model at once (each on its own connection); return the failures, one line each.
    An empty list means alive."""
    if grpcclient is None:
        import tritonclient.grpc as grpcclient
    if not models:
        models = served_models(grpcclient, url, timeout_s)
        if not models:
            return [f"no studio model is ready at {url}"]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        return [f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}"]
    failures: dict[str, str] = {}
    threads = []
    for model in models:
        def run(model=model):
            error = check_model(grpcclient, url, model, timeout_s)
            if error is not None:
                failures[model] = error
        thread = threading.Thread(target=run, daemon=True, name=f"probe-{model}")
        thread.start()
        threads.append(thread)
    deadline = time.monotonic() + timeout_s + 2.0  # each call has its own deadline; this bounds a hung connect
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    for model, thread in zip(models, threads):
        if thread.is_alive() and model not in failures:
            failures[model] = f"no answer in {timeout_s:.0f} s"
    return [f"{model}: {failures[model]}" for model in models if model in failures]


def main(argv: list[str] | None = None, grpcclient=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="127.0.0.1:8001", help="Triton's gRPC HOST:PORT (default 127.0.0.1:8001)")
    p.add_argument("--models", default="", help="comma-separated models that must answer (default: every known "
                   "model Triton reports ready)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help=f"seconds each request may take (default {DEFAULT_TIMEOUT_S:.0f}); they run at once")
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    started = time.monotonic()
    failures = probe(args.url, models, args.timeout, grpcclient)
    took = time.monotonic() - started
    if failures:
        print(f"not live ({took:.1f} s): " + "; ".join(failures), file=sys.stderr)
        return 1
    print(f"live: {', '.join(models) if models else 'every ready model'} answered in {took:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
