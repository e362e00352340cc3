"""Write tests/data/spark_manifest.json: parameter names and shapes of the published Spark-TTS-0.5B.

Run OUTSIDE the project environment, in a scratch venv that has upstream's dependencies
(einops, einx, omegaconf) and a clone of SparkAudio/Spark-TTS:

    python -m venv --system-site-packages /work/scratch_venv
    /work/scratch_venv/bin/pip install einops==0.8.1 einx==0.3.0 omegaconf==2.3.0
    /work/scratch_venv/bin/python tools/make_spark_manifest.py --upstream /work/upstream/SparkAudio+Spark-TTS

BiCodec: upstream's own modules (`sparktts.models.bicodec.BiCodec` and its parts) are built at the
published `BiCodec/config.yaml` architecture on the meta device and their `state_dict()` names and
shapes are recorded. Upstream's torchaudio mel transform is not built (it would need torchaudio):
its two buffers (`mel_transformer.spectrogram.window`, `mel_transformer.mel_scale.fb`) are absent
from the published `model.safetensors` anyway (upstream logs them as "Missing tensor" on load).

LLM: upstream loads `LLM/` with transformers' `AutoModelForCausalLM` (a Qwen2ForCausalLM); the names
and shapes come from that class at the published `LLM/config.json` architecture, as the checkpoint
is saved: the output projection is tied to the embedding, so `lm_head.weight` is not stored.

No weights are downloaded: the architecture values below are those of the published config files
(recorded here because Hugging Face is unreachable from this workplace).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

#: `BiCodec/config.yaml` (`audio_tokenizer`) architecture of SparkAudio/Spark-TTS-0.5B.
PUBLISHED_BICODEC = {
    "mel_params": {"sample_rate": 16000, "n_fft": 1024, "win_length": 640, "hop_length": 320,
                   "mel_fmin": 10, "mel_fmax": None, "num_mels": 128},
    "encoder": {"input_channels": 1024, "vocos_dim": 384, "vocos_intermediate_dim": 2048,
                "vocos_num_layers": 12, "out_channels": 1024, "sample_ratios": [1, 1]},
    "decoder": {"input_channel": 1024, "channels": 1536, "rates": [8, 5, 4, 2], "kernel_sizes": [16, 11, 8, 4]},
    # `commitment` (a training loss weight, required by upstream's constructor) does not change any shape
    "quantizer": {"input_dim": 1024, "codebook_size": 8192, "codebook_dim": 8, "commitment": 0.25},
    "speaker_encoder": {"input_dim": 128, "out_dim": 1024, "latent_dim": 128, "token_num": 32,
                        "fsq_levels": [4, 4, 4, 4, 4, 4], "fsq_num_quantizers": 1},
    "prenet": {"input_channels": 1024, "vocos_dim": 384, "vocos_intermediate_dim": 2048, "vocos_num_layers": 12,
               "out_channels": 1024, "condition_dim": 1024, "sample_ratios": [1, 1], "use_tanh_at_final": False},
    "postnet": {"input_channels": 1024, "vocos_dim": 384, "vocos_intermediate_dim": 2048, "vocos_num_layers": 6,
                "out_channels": 1024, "use_tanh_at_final": False},
}

#: `LLM/config.json` architecture (Qwen2.5-0.5B with Spark's extended vocabulary).
PUBLISHED_LLM = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 166000,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True,
    "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 21, "hidden_act": "silu",
    "bos_token_id": 151643, "eos_token_id": 151645,
}

#: Upstream registers these torchaudio buffers; the published file does not contain them.
MEL_BUFFERS = ("mel_transformer.spectrogram.window", "mel_transformer.mel_scale.fb")


def bicodec_manifest(upstream: Path) -> dict[str, list[int]]:
    import torch

    sys.path.insert(0, str(upstream))
    from sparktts.models.bicodec import BiCodec
    from sparktts.modules.encoder_decoder.feat_decoder import Decoder
    from sparktts.modules.encoder_decoder.feat_encoder import Encoder
    from sparktts.modules.encoder_decoder.wave_generator import WaveGenerator
    from sparktts.modules.speaker.speaker_encoder import SpeakerEncoder
    from sparktts.modules.vq.factorized_vector_quantize import FactorizedVectorQuantize

    cfg = PUBLISHED_BICODEC
    BiCodec.init_mel_transformer = lambda self, config: None  # torchaudio-free (see module docstring)
    # built on the CPU (FSQ's constructor calls .item(), which the meta device refuses): ~0.6 GB, seconds
    with torch.no_grad():
        model = BiCodec(mel_params=cfg["mel_params"], encoder=Encoder(**cfg["encoder"]),
                        decoder=WaveGenerator(**cfg["decoder"]), quantizer=FactorizedVectorQuantize(**cfg["quantizer"]),
                        speaker_encoder=SpeakerEncoder(**cfg["speaker_encoder"]), prenet=Decoder(**cfg["prenet"]),
                        postnet=Decoder(**cfg["postnet"]))
    return {k: list(v.shape) for k, v in model.state_dict().items() if k not in MEL_BUFFERS}


def llm_manifest() -> dict[str, list[int]]:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**{k: v for k, v in PUBLISHED_LLM.items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    names = {k: list(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        names.pop("lm_head.weight", None)
    return names


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--upstream", type=Path, required=True, help="clone of SparkAudio/Spark-TTS")
    p.add_argument("-o", "--output", type=Path,
                   default=Path(__file__).resolve().parent.parent / "tests" / "data" / "spark_manifest.json")
    args = p.parse_args()
    bicodec = bicodec_manifest(args.upstream)
    llm = llm_manifest()
    out = {
        "source": "SparkAudio/Spark-TTS-0.5B; BiCodec from upstream sparktts modules, LLM from transformers "
                  "Qwen2ForCausalLM; written by tools/make_spark_manifest.py",
        "bicodec_config": PUBLISHED_BICODEC,
        "bicodec_excluded": list(MEL_BUFFERS),
        "bicodec": bicodec,
        "llm_config": PUBLISHED_LLM,
        "llm": llm,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=1) + "\n")
    n_b = sum(_numel(s) for s in bicodec.values())
    n_l = sum(_numel(s) for s in llm.values())
    print(f"wrote {args.output}: BiCodec {len(bicodec)} tensors ({n_b / 1e6:.1f} M values), "
          f"LLM {len(llm)} tensors ({n_l / 1e6:.1f} M values)")


def _numel(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


if __name__ == "__main__":
    main()
