"""BLS transport from `spark_llm` to the `spark_trtllm` model (Triton's `tensorrtllm` backend).

The Triton half of `tts.spark.trtllm` (which has no Triton imports): `start(tensors)` sends one
decoupled BLS request and returns its response stream; iterating it yields each response's
`output_ids` / `sequence_length` as numpy arrays; `cancel()` uses the response iterator's
`cancel()` where the image's Python backend has it (recent releases; not 2.51, where the request
then runs on to its output length on the server and its tokens are discarded).
"""

from __future__ import annotations

from tts.spark.trtllm import REQUEST_OUTPUTS

#: Name of the TensorRT-LLM model in the rendered repository (triton_models/spark_trtllm).
TRTLLM_MODEL = "spark_trtllm"


class BlsStream:
    def __init__(self, pb_utils, responses):
        self._pb, self._responses = pb_utils, responses

    def __iter__(self):
        for response in self._responses:
            if response.has_error():
                raise RuntimeError(f"{TRTLLM_MODEL}: {response.error().message()}")
            out = {}
            for name in REQUEST_OUTPUTS:
                tensor = self._pb.get_output_tensor_by_name(response, name)
                if tensor is not None:
                    out[name] = tensor.as_numpy()
            yield out

    def cancel(self) -> None:
        cancel = getattr(self._responses, "cancel", None)
        if cancel is not None:
            cancel()


class BlsTransport:
    """`tts.spark.trtllm`'s transport over BLS calls from inside a Python model."""

    def __init__(self, pb_utils, model_name: str = TRTLLM_MODEL):
        self._pb, self.model_name = pb_utils, model_name

    def start(self, tensors: dict) -> BlsStream:
        pb = self._pb
        request = pb.InferenceRequest(model_name=self.model_name, requested_output_names=list(REQUEST_OUTPUTS),
                                      inputs=[pb.Tensor(name, value) for name, value in tensors.items()])
        return BlsStream(pb, request.exec(decoupled=True))
