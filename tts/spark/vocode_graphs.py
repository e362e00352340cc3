"""BiCodec's detokenize of one window of a fixed token count, replayed from a CUDA graph.

Why: a streamed request's first chunk is always a window of 50 semantic tokens (1 s; upstream's
plan, `tts.spark.streaming.STREAM_PLAN`), and every millisecond of its vocoding is a millisecond of
first-chunk latency. Eagerly the wave generator, prenet, quantizer and speaker projection are
hundreds of small kernels launched from Python: 12 ms for that window on an H100 (`spark-serve`,
the first chunk's `vocode_ms`), far more than their arithmetic. A graph launches the same kernels
without Python in between. Other window sizes (later streamed chunks, offline windows) stay eager.

One window at a time: the graph's inputs and output are static buffers, so replays (from the
decode loop and the vocoding thread alike) take a lock until the audio is read back.

Shapes: 32 global tokens, N semantic tokens, N * hop samples at 16 kHz.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from tts.spark.config import GLOBAL_TOKENS

VOCODE_GRAPHS_ENV = "STUDIO_SPARK_VOCODE_GRAPHS"  # "0": every window eagerly


class WindowGraphs:
    """`bicodec.detokenize` captured for one request's windows of `lengths` tokens (CUDA only)."""

    def __init__(self, bicodec, device: torch.device, lengths: tuple[int, ...]):
        if device.type != "cuda":
            raise ValueError("vocoder graphs need a CUDA device")
        self.lock = threading.Lock()
        self.globals = torch.zeros(1, 1, GLOBAL_TOKENS, dtype=torch.long, device=device)
        self.semantic = {n: torch.zeros(1, n, dtype=torch.long, device=device) for n in lengths}
        self.out: dict[int, torch.Tensor] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        pool = torch.cuda.graph_pool_handle()
        with torch.no_grad():
            for n in sorted(lengths, reverse=True):
                stream = torch.cuda.Stream(device)
                stream.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(stream):
                    for _ in range(2):  # lazy initialisation and cuDNN's algorithm choice, off the capture
                        bicodec.detokenize(self.globals, self.semantic[n])
                torch.cuda.current_stream(device).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    self.out[n] = bicodec.detokenize(self.globals, self.semantic[n]).float()
                self.graphs[n] = graph
        torch.cuda.synchronize(device)

    def __call__(self, global_tokens: torch.Tensor, semantic_tokens: torch.Tensor) -> np.ndarray | None:
        """[1, 32] (or [1, 1, 32]) and [1, N] token ids -> float32 [1, N * hop], or None when N has no graph."""
        n = semantic_tokens.shape[-1]
        graph = self.graphs.get(n) if semantic_tokens.shape[0] == 1 else None
        if graph is None:
            return None
        with self.lock:
            self.globals.copy_(global_tokens.reshape(1, 1, GLOBAL_TOKENS))
            self.semantic[n].copy_(semantic_tokens.reshape(1, n))
            graph.replay()
            return self.out[n].cpu().numpy()
