"""Spark-TTS audio tokenizer: 16 kHz waveform <-> (32 global tokens, 50 Hz semantic tokens).

tokenize: the whole (prepared) clip -> wav2vec2-large-xlsr-53 hidden states 11, 14, 16 averaged ->
BiCodec encoder -> factorized VQ -> semantic tokens; the first 6 s (tiled if shorter) -> mel ->
speaker encoder -> 32 global tokens. detokenize: tokens -> BiCodec prenet + wave generator, 320
samples per semantic token.

wav2vec2 is loaded with transformers (`Wav2Vec2FeatureExtractor`, `Wav2Vec2Model`) from the
checkpoint's `wav2vec2-large-xlsr-53/` folder; layers past the last one we read are dropped after
loading (hidden_states[16] does not depend on them), which saves a third of its compute.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tts.spark.bicodec import BiCodec, load_bicodec
from tts.spark.config import GLOBAL_TOKENS, SAMPLE_RATE, WAV2VEC2_LAYERS, SparkTopConfig, load_top_config
from tts.spark.reference import PreparedClip, prepare_clip


def load_wav2vec2(folder: str | Path, device: str | torch.device = "cpu"):
    """(feature extractor, Wav2Vec2Model truncated to the layers we read), eval mode."""
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"wav2vec2 folder {folder} has no config.json")
    processor = Wav2Vec2FeatureExtractor.from_pretrained(str(folder))
    model = Wav2Vec2Model.from_pretrained(str(folder))
    need = max(WAV2VEC2_LAYERS) + 1  # hidden_states[i] is the input of layer i (output of i layers)
    if len(model.encoder.layers) < need:
        raise ValueError(f"{folder}: wav2vec2 has {len(model.encoder.layers)} layers; Spark-TTS reads hidden "
                         f"state {max(WAV2VEC2_LAYERS)}, so it needs at least {need}")
    # Keep one layer past the last state read: with stable layer norm the final norm is applied to the
    # last hidden state, so keeping exactly 16 layers would change hidden_states[16].
    model.encoder.layers = model.encoder.layers[:need]
    model.config.num_hidden_layers = need
    return processor, model.eval().to(device)


class SparkAudioTokenizer:
    """BiCodec + wav2vec2 for one device. Not thread-safe by itself (the engine serialises calls)."""

    def __init__(self, model_dir: str | Path, device: str | torch.device = "cpu",
                 top: SparkTopConfig | None = None, bicodec: BiCodec | None = None):
        model_dir = Path(model_dir)
        self.device = torch.device(device)
        self.top = top or load_top_config(model_dir)
        self.bicodec = bicodec or load_bicodec(model_dir / "BiCodec", self.device)
        self.processor, self.wav2vec2 = load_wav2vec2(model_dir / "wav2vec2-large-xlsr-53", self.device)
        self.window_graphs = None  # `capture_windows`

    def capture_windows(self, lengths: tuple[int, ...]) -> float:
        """On CUDA: detokenize windows of these token counts from CUDA graphs from now on
        (`tts.spark.vocode_graphs`); returns the seconds the capture took."""
        import time

        from tts.spark.vocode_graphs import WindowGraphs

        t0 = time.perf_counter()
        self.window_graphs = WindowGraphs(self.bicodec, self.device, lengths)
        return round(time.perf_counter() - t0, 2)

    @property
    def hop(self) -> int:
        return self.bicodec.hop

    @torch.no_grad()
    def features(self, wav: np.ndarray) -> torch.Tensor:
        """wav [S] float32 16 kHz -> mean of wav2vec2 hidden states 11, 14, 16: [1, T, C] (T ~ S / 320)."""
        inputs = self.processor(wav, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_values
        out = self.wav2vec2(inputs.to(self.device), output_hidden_states=True)
        return sum(out.hidden_states[i] for i in WAV2VEC2_LAYERS) / len(WAV2VEC2_LAYERS)

    def prepare(self, wav, volume_normalize: bool | None = None) -> PreparedClip:
        return prepare_clip(wav, self.top, volume_normalize)

    @torch.no_grad()
    def tokenize_clip(self, clip: PreparedClip) -> tuple[np.ndarray, np.ndarray]:
        """A prepared clip -> (global tokens [32] int64, semantic tokens [N] int64)."""
        feats = self.features(clip.wav)
        ref = torch.from_numpy(clip.speaker_clip).float().unsqueeze(0).to(self.device)
        global_ids, semantic = self.bicodec.tokenize(feats, ref)
        return global_ids.reshape(-1).long().cpu().numpy(), semantic.reshape(-1).cpu().numpy()

    def tokenize(self, wav16k, volume_normalize: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """16 kHz mono samples -> (global tokens [32], semantic tokens [N ~ 50 per second]), int64."""
        return self.tokenize_clip(self.prepare(wav16k, volume_normalize))

    @torch.no_grad()
    def detokenize(self, global_tokens, semantic_tokens) -> np.ndarray:
        """global tokens [32], semantic tokens [N] -> float32 waveform [N * 320] at 16 kHz."""
        g = torch.as_tensor(np.asarray(global_tokens), dtype=torch.long).reshape(1, -1)
        s = torch.as_tensor(np.asarray(semantic_tokens), dtype=torch.long).reshape(1, -1)
        if g.shape[1] != GLOBAL_TOKENS:
            raise ValueError(f"expected {GLOBAL_TOKENS} global tokens, got {g.shape[1]}")
        if s.shape[1] == 0:
            return np.zeros(0, dtype=np.float32)
        return self.detokenize_batch(g, s)[0]

    @torch.no_grad()
    def detokenize_batch(self, global_tokens: torch.Tensor, semantic_tokens: torch.Tensor) -> np.ndarray:
        """[B, 32] and [B, N] (equal lengths: padding would change the edges) -> float32 [B, N * 320]."""
        if self.window_graphs is not None:
            wav = self.window_graphs(global_tokens, semantic_tokens)
            if wav is not None:
                return wav
        wav = self.bicodec.detokenize(global_tokens.to(self.device), semantic_tokens.to(self.device))
        return wav.float().cpu().numpy()
