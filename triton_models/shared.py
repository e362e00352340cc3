"""Helpers the thin Triton adapters share: parameters, input parsing, JSON info, BLS forwarding.

Imported by `model.py` files after they put the project root on sys.path (the Python backend stub
ignores PYTHONPATH). Importing `triton_python_backend_utils` works only inside a stub.
"""

from __future__ import annotations

import json

import numpy as np


def model_params(args: dict) -> dict:
    """The model config from `initialize` args and its string parameters."""
    config = json.loads(args["model_config"])
    params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
    return {"config": config, "params": params}


def get_scalar(pb_utils, request, name: str, default=None):
    """First element of an optional [1]-shaped input (batch dim first), or `default` when absent."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    value = tensor.as_numpy().reshape(-1)
    if value.size == 0:
        return default
    value = value[0]
    if isinstance(value, (bytes, np.bytes_)):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


def get_text(pb_utils, request, name: str, required: bool = True) -> str:
    value = get_scalar(pb_utils, request, name)
    if value is None:
        if required:
            raise ValueError(f"the request has no `{name}` input")
        return ""
    return value if isinstance(value, str) else str(value)


def get_wav(pb_utils, request, required: bool = True) -> np.ndarray | None:
    """`reference_wav` cut to `reference_wav_len` (clients may zero-pad), as float32 mono."""
    tensor = pb_utils.get_input_tensor_by_name(request, "reference_wav")
    if tensor is None:
        if required:
            raise ValueError("the request has no `reference_wav` input (the prompt clip)")
        return None
    wav = tensor.as_numpy().astype(np.float32).reshape(-1)
    length = get_scalar(pb_utils, request, "reference_wav_len")
    if length is not None:
        length = int(length)
        if not 0 <= length <= wav.size:
            raise ValueError(f"reference_wav_len is {length} but reference_wav has {wav.size} samples")
        wav = wav[:length]
    return wav


def info_tensor(pb_utils, info: dict):
    return pb_utils.Tensor("info", np.array([[json.dumps(info).encode("utf-8")]], dtype=np.object_))


def wave_tensor(pb_utils, wav: np.ndarray):
    return pb_utils.Tensor("waveform", np.asarray(wav, dtype=np.float32).reshape(1, -1))


def audio_response(pb_utils, wav: np.ndarray, info: dict):
    """`waveform` first (upstream clients read the first output), then `info`."""
    return pb_utils.InferenceResponse(output_tensors=[wave_tensor(pb_utils, wav), info_tensor(pb_utils, info)])


def error_response(pb_utils, message: str):
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))


def forward_inputs(pb_utils, request, names: list[str]) -> list:
    """The request's present inputs among `names`, re-wrapped for a BLS request."""
    out = []
    for name in names:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is not None:
            out.append(pb_utils.Tensor(name, tensor.as_numpy()))
    return out


def response_audio(pb_utils, response) -> tuple[np.ndarray | None, dict | None]:
    """(waveform, info) of a BLS response, or (None, None) for an empty (final-flag) response."""
    wav = pb_utils.get_output_tensor_by_name(response, "waveform")
    info = pb_utils.get_output_tensor_by_name(response, "info")
    if wav is None or info is None:
        return None, None
    raw = info.as_numpy().reshape(-1)[0]
    return wav.as_numpy().reshape(-1), json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
