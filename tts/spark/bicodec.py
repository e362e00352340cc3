"""BiCodec: the Spark-TTS audio codec (semantic + global tokens <-> 16 kHz waveform).

Top-level key prefixes of `BiCodec/model.safetensors`: `encoder.` (wav2vec2 features -> latent),
`quantizer.` (semantic VQ), `speaker_encoder.` (global tokens), `prenet.` (latent + d-vector),
`postnet.` (training-only feature head, kept for key parity), `decoder.` (wave generator).
The published file lacks the torchaudio mel buffers (`mel_transformer.*`); ours are recomputed
and non-persistent, so a full-config `BiCodec().state_dict()` has exactly the published names.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tts.spark.config import BiCodecConfig, load_bicodec_config
from tts.spark.layers import fold_weight_norm
from tts.spark.mel import MelSpectrogram
from tts.spark.quantizers import FactorizedVQ
from tts.spark.speaker import SpeakerEncoder
from tts.spark.vocos import FeatDecoder, FeatEncoder
from tts.spark.wave_generator import WaveGenerator

#: Upstream's torchaudio buffers; a checkpoint may carry them (we recompute the same values).
DERIVED_KEYS = ("mel_transformer.spectrogram.window", "mel_transformer.mel_scale.fb")
#: Training statistics that inference never reads; tolerated when a checkpoint leaves them out.
OPTIONAL_SUFFIXES = ("num_batches_tracked", "quantizer.cluster_size")


class BiCodec(nn.Module):
    def __init__(self, cfg: BiCodecConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = FeatEncoder(cfg.encoder)
        self.decoder = WaveGenerator(cfg.decoder)
        self.quantizer = FactorizedVQ(cfg.quantizer.input_dim, cfg.quantizer.codebook_size,
                                      cfg.quantizer.codebook_dim)
        self.speaker_encoder = SpeakerEncoder(cfg.speaker_encoder)
        self.prenet = FeatDecoder(cfg.prenet)
        self.postnet = FeatDecoder(cfg.postnet)
        self.mel_transformer = MelSpectrogram(cfg.mel_params)

    @property
    def hop(self) -> int:
        """Waveform samples per semantic token."""
        return self.cfg.decoder.hop

    @torch.no_grad()
    def tokenize(self, features: torch.Tensor, ref_wav: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features [B, T, C_w2v] (wav2vec2 mix), ref_wav [B, S] (speaker clip)
        -> (global ids [B, 1, 32] int32, semantic ids [B, T] int64)."""
        mel = self.mel_transformer(ref_wav)  # [B, n_mels, frames]
        semantic = self.quantizer.tokenize(self.encoder(features.transpose(1, 2)))
        global_ids = self.speaker_encoder.tokenize(mel.transpose(1, 2))
        return global_ids, semantic

    @torch.no_grad()
    def detokenize(self, global_ids: torch.Tensor, semantic_ids: torch.Tensor) -> torch.Tensor:
        """global ids [B, 32] or [B, 1, 32], semantic ids [B, T] -> waveform [B, T * hop] in [-1, 1]."""
        if global_ids.dim() == 2:
            global_ids = global_ids.unsqueeze(1)
        z_q = self.quantizer.detokenize(semantic_ids.long())
        d_vector = self.speaker_encoder.detokenize(global_ids)
        x = self.prenet(z_q, d_vector) + d_vector.unsqueeze(-1)
        return self.decoder(x).squeeze(1)


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Match a checkpoint to the model's keys and shapes; raise one ValueError naming every problem."""
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if k not in DERIVED_KEYS}
    missing = [k for k in expected if k not in state and not k.endswith(OPTIONAL_SUFFIXES)]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        def show(items):
            return ", ".join(items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")
        parts = [f"missing {len(missing)}: {show(missing)}" if missing else "",
                 f"unexpected {len(unexpected)}: {show(unexpected)}" if unexpected else "",
                 f"wrong shape {len(wrong)}: {show(wrong)}" if wrong else ""]
        raise ValueError(f"{source} does not fit the BiCodec built from its config.yaml: "
                         + "; ".join(p for p in parts if p))
    return state


def load_bicodec(bicodec_dir: str | Path, device: str | torch.device = "cpu",
                 cfg: BiCodecConfig | None = None) -> BiCodec:
    """Build BiCodec from `BiCodec/config.yaml`, load `model.safetensors` (checked), fold weight norm, eval."""
    from safetensors.torch import load_file

    bicodec_dir = Path(bicodec_dir)
    cfg = cfg or load_bicodec_config(bicodec_dir)
    path = bicodec_dir / "model.safetensors"
    if not path.is_file():
        raise ValueError(f"BiCodec weights not found: {path}")
    model = BiCodec(cfg)
    state = check_state_dict(model, load_file(str(path)), str(path))
    model.load_state_dict(state, strict=False)
    fold_weight_norm(model)
    return model.eval().to(device)
