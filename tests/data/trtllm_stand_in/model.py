"""STAND-IN for Triton's `tensorrt_llm` model (TensorRT-LLM cannot be installed here), served by the
Python backend under the same name, inputs and outputs as triton_models/spark_trtllm/config.pbtxt.

It reads what `spark_llm` sends over BLS, generates the torch runtime's tokens for those sampling
fields (`tts.spark.decode.generate` on the demo LLM), and streams them 1, 3, 2, ... tokens per
response as `output_ids` [1, 1, n], leaving out the end id it stopped on, then the final flag (as
TensorRT-LLM's decoupled streaming does). Every request's tensors are appended as one JSON line to
the file the fake engine folder names, for the test to check. Used by tests/test_spark_trtllm.py.
"""

import json
import sys
import threading

import numpy as np
import triton_python_backend_utils as pb_utils

SIZES = (1, 3, 2)


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        engine_dir = params["gpt_model_path"]["string_value"]
        with open(f"{engine_dir}/config.json") as fh:
            self.meta = json.load(fh)["stand_in"]
        if self.meta["project_root"] not in sys.path:
            sys.path.insert(0, self.meta["project_root"])
        import torch

        from tts.spark.decode import SamplingParams, generate
        from tts.spark.llm import load_llm

        torch.set_num_threads(1)
        self.SamplingParams, self.generate = SamplingParams, generate
        self.llm = load_llm(self.meta["llm_dir"])
        self.lock = threading.Lock()

    def execute(self, requests):
        for request in requests:
            threading.Thread(target=self._answer, args=(request, request.get_response_sender()), daemon=True).start()
        return None

    def _answer(self, request, sender):
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            t = {}
            for name in ("input_ids", "input_lengths", "request_output_len", "end_id", "pad_id", "stop_words_list",
                         "bad_words_list", "temperature", "runtime_top_k", "runtime_top_p", "min_tokens", "seed",
                         "streaming", "exclude_input_in_output"):
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    t[name] = tensor.as_numpy()
            with self.lock:
                with open(self.meta["log_path"], "a") as fh:
                    fh.write(json.dumps({k: {"dtype": str(v.dtype), "shape": list(v.shape), "value": v.tolist()}
                                         for k, v in t.items()}) + "\n")
            def words(arr):  # single-token words of a [2, n] word list
                ids, offsets = arr.reshape(2, -1)
                return [int(x) for x, o in zip(ids, offsets) if o > 0]

            end = int(t["end_id"].reshape(-1)[0])
            ends = tuple([end] + words(t["stop_words_list"]) + words(t["bad_words_list"]))
            sp = self.SamplingParams(temperature=float(t["temperature"].reshape(-1)[0]),
                                     top_k=int(t["runtime_top_k"].reshape(-1)[0]),
                                     top_p=float(t["runtime_top_p"].reshape(-1)[0]),
                                     max_new_tokens=int(t["request_output_len"].reshape(-1)[0]),
                                     min_new_tokens=int(t["min_tokens"].reshape(-1)[0]))
            prompt = t["input_ids"].reshape(-1)[: int(t["input_lengths"].reshape(-1)[0])].tolist()
            with self.lock:
                seq = self.generate(self.llm, prompt, sp, ends, seed=int(t["seed"].reshape(-1)[0]))
            tokens = list(seq.generated)
            if tokens and tokens[-1] == end and seq.finish_reason == "end":
                tokens = tokens[:-1]
            i, k = 0, 0
            while i < len(tokens):
                if request.is_cancelled():
                    break
                n = SIZES[k % len(SIZES)]
                chunk = np.asarray(tokens[i: i + n], dtype=np.int32).reshape(1, 1, -1)
                sender.send(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("output_ids", chunk),
                    pb_utils.Tensor("sequence_length", np.array([[min(i + n, len(tokens))]], dtype=np.int32))]))
                i, k = i + n, k + 1
            sender.send(flags=final)
        except Exception as exc:  # noqa: BLE001 - tell the caller
            sender.send(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(repr(exc))),
                        flags=final)
