"""Speaker-verification embeddings (WavLM x-vector, transformers) for speaker similarity.

A checkpoint folder is laid out as published (`microsoft/wavlm-base-plus-sv`: config.json,
pytorch_model.bin or model.safetensors, preprocessor_config.json). `Embedder.embed` takes 16 kHz
mono float clips and returns one L2-normalised embedding per clip; the similarity of two clips is
the cosine of their embeddings, computed by the caller (studio/objective.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

SIM_SAMPLE_RATE = 16000  # WavLM's feature extractor works at 16 kHz
#: Shorter clips carry too little voice for a speaker embedding.
MIN_SIM_S = 0.5


def check_clip(wav: np.ndarray, sr: int = SIM_SAMPLE_RATE) -> None:
    """Raise ValueError naming the problem unless `wav` ([N] float at `sr` Hz) can be embedded."""
    wav = np.asarray(wav, dtype=np.float32).reshape(-1)
    if wav.size == 0 or not np.isfinite(wav).all():
        raise ValueError("the audio for speaker similarity is empty or holds NaN/infinite samples")
    if wav.size < MIN_SIM_S * sr:
        raise ValueError(f"the audio is {wav.size / sr:.2f} s long; speaker similarity needs at least {MIN_SIM_S} s")
    if not np.abs(wav).max() > 0:
        raise ValueError("the audio is silent; there is no voice to compare")


class Embedder:
    """WavLMForXVector from a checkpoint folder, on one device."""

    def __init__(self, model_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import AutoFeatureExtractor, WavLMForXVector

        self.device, self.dtype = torch.device(device), dtype
        self.extractor = AutoFeatureExtractor.from_pretrained(str(model_dir))
        self.model = WavLMForXVector.from_pretrained(str(model_dir), dtype=dtype).to(self.device).eval()

    @torch.inference_mode()
    def embed(self, clips: list[np.ndarray]) -> tuple[list[np.ndarray], float]:
        """Embeddings ([D] float32, unit length) of each clip ([N] float32 at 16 kHz), and the ms spent.

        Clips of different lengths are padded in one batch; the attention mask keeps padding out of
        the statistics pooling.
        """
        for wav in clips:
            check_clip(wav)
        started = time.perf_counter()
        feats = self.extractor([np.asarray(c, np.float32) for c in clips], sampling_rate=SIM_SAMPLE_RATE,
                               padding=True, return_attention_mask=True, return_tensors="pt")
        out = self.model(input_values=feats.input_values.to(self.device, self.dtype),
                         attention_mask=feats.attention_mask.to(self.device)).embeddings
        out = torch.nn.functional.normalize(out.float(), dim=-1).cpu().numpy()
        return [row.astype(np.float32) for row in out], (time.perf_counter() - started) * 1000
