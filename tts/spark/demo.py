"""Tiny deterministic Spark-TTS demo checkpoint in the published layout and file formats.

`write_demo_checkpoint(dir, seed)` writes into `dir` (a `Spark-TTS-0.5B/` folder):

    config.yaml                         as published (16 kHz, 6 s speaker segment, hop 320, volume_normalize)
    BiCodec/config.yaml                 `audio_tokenizer:` with tiny widths, only keys upstream's
                                        constructors accept (its hard-coded speaker-encoder widths
                                        stay full size)
    BiCodec/model.safetensors           every published key name (weight_g/weight_v convs), tiny shapes
    LLM/config.json, model.safetensors  a 2-layer Qwen2 (tied embeddings, so no lm_head tensor)
    LLM/tokenizer.json (+ tokenizer_config.json, added_tokens.json, special_tokens_map.json,
        vocab.json, merges.txt)         a byte-level BPE (no merges) carrying every Spark token
    wav2vec2-large-xlsr-53/             a 17-layer, 16-wide Wav2Vec2 (config.json, preprocessor_config.json,
                                        pytorch_model.bin in the pre-training checkpoint's key layout)

Weights are random (a seeded CPU generator, so the files are byte-identical for a seed): the output
is noise, but every line of loading and inference code runs exactly as with the real weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from tts.spark import prompts
from tts.spark.config import GLOBAL_CODEBOOK, SEMANTIC_CODEBOOK, BiCodecConfig

#: Upstream's task tokens (token_parser.TASK_TOKEN_MAP values).
TASK_TOKENS = ("<|task_vc|>", "<|task_tts|>", "<|task_asr|>", "<|task_s2s|>", "<|task_t2s|>", "<|task_understand|>",
               "<|task_cap|>", "<|task_controllable_tts|>", "<|task_prompt_tts|>", "<|task_edit|>")
MARKERS = (prompts.START_CONTENT, prompts.END_CONTENT, prompts.START_GLOBAL, prompts.END_GLOBAL,
           prompts.START_SEMANTIC, prompts.END_SEMANTIC, prompts.START_STYLE, prompts.END_STYLE)
QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
#: Qwen2's pre-tokenizer split pattern (contractions, letters, single digits, punctuation, spaces).
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")

TOP_CONFIG = {"highpass_cutoff_freq": 40, "sample_rate": 16000, "segment_duration": 2.4, "max_val_duration": 12,
              "latent_hop_length": 320, "ref_segment_duration": 6, "volume_normalize": True}

W2V_HIDDEN = 16
#: wav2vec2 layers kept: hidden state 16 must exist (see audio_tokenizer.load_wav2vec2).
W2V_LAYERS = 17

DEMO_BICODEC = {
    "mel_params": {"sample_rate": 16000, "n_fft": 1024, "win_length": 640, "hop_length": 320,
                   "mel_fmin": 10, "mel_fmax": None, "num_mels": 128},
    "encoder": {"input_channels": W2V_HIDDEN, "vocos_dim": 16, "vocos_intermediate_dim": 32,
                "vocos_num_layers": 2, "out_channels": 16, "sample_ratios": [1, 1]},
    "decoder": {"input_channel": 16, "channels": 32, "rates": [8, 5, 4, 2], "kernel_sizes": [16, 11, 8, 4]},
    "quantizer": {"input_dim": 16, "codebook_size": SEMANTIC_CODEBOOK, "codebook_dim": 8, "commitment": 0.25},
    # Only the keys upstream's SpeakerEncoder accepts: its ECAPA-TDNN (512 channels) and perceiver
    # (8 heads of 64) widths are hard-coded upstream, so the demo keeps them at full size (~10 M
    # parameters) and shrinks only the configurable dims; upstream can then load this checkpoint.
    "speaker_encoder": {"input_dim": 128, "out_dim": 16, "latent_dim": 16, "token_num": 32,
                        "fsq_levels": [4, 4, 4, 4, 4, 4], "fsq_num_quantizers": 1},
    "prenet": {"input_channels": 16, "vocos_dim": 16, "vocos_intermediate_dim": 32, "vocos_num_layers": 2,
               "out_channels": 16, "condition_dim": 16, "sample_ratios": [1, 1], "use_tanh_at_final": False},
    "postnet": {"input_channels": 16, "vocos_dim": 16, "vocos_intermediate_dim": 32, "vocos_num_layers": 1,
                "out_channels": 16, "use_tanh_at_final": False},
}

#: Demo embedding rows are small random vectors (std 0.3). Layer 0's value bias is made large, so
#: attention adds one constant vector to every position; every semantic-token row gets that vector's
#: direction added. The random LLM then writes (varied) semantic tokens after any prompt instead of
#: looping on a text token. It practically never writes an end token or the 32 global tokens of
#: voice creation: demo generations run to max_new_tokens, and created voices use the fallback.
DEMO_EMBED_STD = 0.3
DEMO_VALUE_BIAS_STD = 0.5

DEMO_LLM = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "use_sliding_window": False,
            "sliding_window": 32768, "max_window_layers": 2, "hidden_act": "silu"}

DEMO_W2V = {"hidden_size": W2V_HIDDEN, "num_hidden_layers": W2V_LAYERS, "num_attention_heads": 2,
            "intermediate_size": 32, "conv_dim": (16,) * 7, "num_conv_pos_embeddings": 16,
            "num_conv_pos_embedding_groups": 4}

#: The published architectures (BiCodec/config.yaml, LLM/config.json, wav2vec2-large-xlsr-53/config.json),
#: for random full-size checkpoints (speed measurements; tests/data/spark_manifest.json guards the names).
FULL_BICODEC = {
    "mel_params": DEMO_BICODEC["mel_params"],
    "encoder": {"input_channels": 1024, "vocos_dim": 384, "vocos_intermediate_dim": 2048, "vocos_num_layers": 12,
                "out_channels": 1024, "sample_ratios": [1, 1]},
    "decoder": {"input_channel": 1024, "channels": 1536, "rates": [8, 5, 4, 2], "kernel_sizes": [16, 11, 8, 4]},
    "quantizer": {"input_dim": 1024, "codebook_size": SEMANTIC_CODEBOOK, "codebook_dim": 8, "commitment": 0.25},
    "speaker_encoder": {"input_dim": 128, "out_dim": 1024, "latent_dim": 128, "token_num": 32,
                        "fsq_levels": [4, 4, 4, 4, 4, 4], "fsq_num_quantizers": 1},
    "prenet": {"input_channels": 1024, "vocos_dim": 384, "vocos_intermediate_dim": 2048, "vocos_num_layers": 12,
               "out_channels": 1024, "condition_dim": 1024, "sample_ratios": [1, 1], "use_tanh_at_final": False},
    "postnet": {"input_channels": 1024, "vocos_dim": 384, "vocos_intermediate_dim": 2048, "vocos_num_layers": 6,
                "out_channels": 1024, "use_tanh_at_final": False},
}
FULL_LLM = {**DEMO_LLM, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
            "num_attention_heads": 14, "num_key_value_heads": 2, "max_window_layers": 21}
FULL_LLM_VOCAB = 166000
FULL_W2V = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
            "conv_dim": (512,) * 7, "num_conv_pos_embeddings": 128, "num_conv_pos_embedding_groups": 16}


@dataclass(frozen=True)
class CheckpointSize:
    """Architecture of a random checkpoint: the tiny demo, or the published sizes."""

    bicodec: dict
    llm: dict
    wav2vec2: dict
    llm_vocab: int | None = None  # None: the tokenizer's size rounded up to 64
    text_tokens: int = 0  # text ids before Qwen's specials: 0 = the byte alphabet only (`write_tokenizer`)


DEMO_SIZE = CheckpointSize(DEMO_BICODEC, DEMO_LLM, DEMO_W2V)
#: Qwen2's byte-level BPE vocabulary: its first special token, <|endoftext|>, is id 151643.
QWEN_TEXT_TOKENS = 151643
FULL_SIZE = CheckpointSize(FULL_BICODEC, FULL_LLM, FULL_W2V, FULL_LLM_VOCAB, QWEN_TEXT_TOKENS)


def _fill(shapes: dict[str, torch.Size], gen: torch.Generator, rules) -> dict[str, torch.Tensor]:
    """Deterministic tensors for every name: `rules(name, shape, gen)` or a fan-in-scaled normal."""
    out = {}
    for name in sorted(shapes):
        shape = shapes[name]
        t = rules(name, shape, gen)
        if t is None:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
            t = torch.randn(shape, generator=gen) / math.sqrt(max(fan_in, 1))
        out[name] = t.contiguous()
    return out


#: The wave generator's output conv (after the first conv and one block per rate, then a Snake).
_LAST_CONV = f"decoder.model.{len(DEMO_BICODEC['decoder']['rates']) + 2}.weight_g"
#: Its gain: the random stack shrinks activations about 3x per stage; this brings the noise to ~0.1 rms.
_LAST_CONV_GAIN = 25.0


def _bicodec_rules(name: str, shape, gen):
    leaf = name.rsplit(".", 1)[-1]
    if name == _LAST_CONV:
        return torch.full(shape, _LAST_CONV_GAIN)
    if leaf == "num_batches_tracked":
        return torch.zeros(shape, dtype=torch.long)
    if leaf in ("running_mean", "cluster_size"):
        return torch.zeros(shape)
    if leaf == "running_var":
        return torch.ones(shape)
    if leaf == "weight_g":  # gains keep activations out of tanh saturation
        return 0.3 + 0.2 * torch.rand(shape, generator=gen)
    if leaf == "alpha":
        return 0.5 + torch.rand(shape, generator=gen)
    if leaf == "gamma":
        return 0.5 * torch.ones(shape) if "convnext" in name else torch.ones(shape)
    if leaf == "bias":
        return 0.01 * torch.randn(shape, generator=gen)
    if leaf == "weight" and len(shape) == 1:  # LayerNorm / BatchNorm scales
        return torch.ones(shape)
    if name.endswith("codebook.weight"):
        return torch.randn(shape, generator=gen)
    if name.endswith("latents"):
        return 0.02 * torch.randn(shape, generator=gen)
    return None


def write_bicodec(folder: Path, gen: torch.Generator, arch: dict = DEMO_BICODEC) -> BiCodecConfig:
    import yaml
    from safetensors.torch import save_file

    from tts.spark.bicodec import BiCodec

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"audio_tokenizer": arch}, sort_keys=False))
    cfg = BiCodecConfig.from_dict(arch)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in BiCodec(cfg).state_dict().items()}
    save_file(_fill(shapes, gen, _bicodec_rules), str(folder / "model.safetensors"), metadata={"format": "pt"})
    return cfg


def _wav2vec2_rules(name: str, shape, gen):
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias":
        return 0.01 * torch.randn(shape, generator=gen)
    if leaf == "weight" and len(shape) == 1:
        return torch.ones(shape)
    if leaf == "original0":  # weight-norm gain of the positional conv
        return 0.5 + 0.5 * torch.rand(shape, generator=gen)
    return None


def write_wav2vec2(folder: Path, gen: torch.Generator, arch: dict = DEMO_W2V) -> None:
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    folder.mkdir(parents=True, exist_ok=True)
    # xlsr-53's conv stack (stride 320 = 50 frames/s), layer-norm variant, as in its published config
    cfg = Wav2Vec2Config(conv_stride=(5, 2, 2, 2, 2, 2, 2), conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_bias=True,
                         feat_extract_norm="layer", do_stable_layer_norm=True, mask_time_prob=0.075,
                         architectures=["Wav2Vec2ForPreTraining"], **arch)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Wav2Vec2Model(cfg).state_dict().items()}
    state = _fill(shapes, gen, _wav2vec2_rules)
    # The published file is a pre-training checkpoint: `wav2vec2.` prefix, old-style weight norm names.
    legacy = {}
    for k, v in state.items():
        k = k.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1",
                                                                               "weight_v")
        legacy["wav2vec2." + k] = v
    torch.save(legacy, folder / "pytorch_model.bin")
    cfg.to_json_file(str(folder / "config.json"))
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=True).save_pretrained(str(folder))


def spark_token_names() -> list[str]:
    """Every Spark-specific token of the demo vocabulary, in id order after Qwen's specials."""
    names = [prompts.global_token(i) for i in range(GLOBAL_CODEBOOK)]
    names += [prompts.semantic_token(i) for i in range(SEMANTIC_CODEBOOK)]
    names += list(TASK_TOKENS) + list(MARKERS)
    names += [f"<|gender_{i}|>" for i in range(2)] + [f"<|age_{i}|>" for i in range(5)]
    names += [f"<|pitch_label_{i}|>" for i in range(5)] + [f"<|speed_label_{i}|>" for i in range(5)]
    names += [f"<|emotion_{i}|>" for i in range(25)]
    return names


def write_tokenizer(folder: Path, text_tokens: int = 0) -> tuple[int, dict[str, int]]:
    """Byte-level BPE with Qwen2's pre-tokenizer and no merges, plus Qwen's and Spark's added tokens.

    text_tokens > 256: the text vocabulary is padded to that many ids with three-character entries
    that encoding never produces (no merges), so the added tokens sit at the published ids (Qwen's
    specials from 151643, Spark's after them) and the LM head's text rows are as many as upstream's."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    n = len(alphabet)
    for i in range(max(text_tokens - n, 0)):
        vocab[alphabet[i // (n * n) % n] + alphabet[i // n % n] + alphabet[i % n]] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL])
    # Spark's tokens are ordinary added tokens: upstream decodes with skip_special_tokens=True and
    # still finds `bicodec_semantic_N` in the text.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in spark_token_names()])
    tok.save(str(folder / "tokenizer.json"))
    added = {t: tok.token_to_id(t) for t in list(QWEN_SPECIAL) + spark_token_names()}
    (folder / "added_tokens.json").write_text(json.dumps(added, ensure_ascii=False, indent=1))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                        "special": t in QWEN_SPECIAL} for t, i in added.items()}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "model_max_length": 32768, "errors": "replace",
        "clean_up_tokenization_spaces": False, "split_special_tokens": False,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "added_tokens_decoder": decoder}, indent=1))
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}, indent=1))
    return tok.get_vocab_size(with_added_tokens=True), added


def _llm_rules(name: str, shape, gen):
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith("bias"):
        return 0.02 * torch.randn(shape, generator=gen)
    if name == "model.embed_tokens.weight":  # tied output; `write_llm` adds the semantic direction
        return DEMO_EMBED_STD * torch.randn(shape, generator=gen)
    return None


def write_llm(folder: Path, gen: torch.Generator, arch: dict = DEMO_LLM, vocab_size: int | None = None,
              text_tokens: int = 0) -> None:
    from safetensors.torch import save_file

    cfg, state, _ = llm_weights(folder, gen, arch, vocab_size, text_tokens)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg.to_json_file(str(folder / "config.json"))


def llm_weights(folder: Path, gen: torch.Generator, arch: dict = DEMO_LLM, vocab_size: int | None = None,
                text_tokens: int = 0) -> tuple[object, dict[str, torch.Tensor], dict[str, int]]:
    """Write the tokenizer files into `folder` (`write_tokenizer`); return the LLM's (Qwen2Config,
    state dict without the tied lm_head, added token ids) with the demo rules (see DEMO_EMBED_STD)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    n_tokens, added = write_tokenizer(folder, text_tokens)
    vocab_size = vocab_size or (n_tokens + 63) // 64 * 64  # padded like the published 166000-row embedding
    if vocab_size < n_tokens:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer ({n_tokens} tokens)")
    cfg = Qwen2Config(vocab_size=vocab_size, bos_token_id=added["<|endoftext|>"],
                      eos_token_id=added["<|im_end|>"], architectures=["Qwen2ForCausalLM"], **arch)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Qwen2ForCausalLM(cfg).state_dict().items()}
    shapes.pop("lm_head.weight", None)  # tied to the embedding, not stored (as published)
    state = _fill(shapes, gen, _llm_rules)
    value_bias = DEMO_VALUE_BIAS_STD * torch.randn(state["model.layers.0.self_attn.v_proj.bias"].shape, generator=gen)
    state["model.layers.0.self_attn.v_proj.bias"] = value_bias
    # what attention adds at every position: each query head reads its key/value head's bias
    n_rep = cfg.num_attention_heads // cfg.num_key_value_heads
    offset = state["model.layers.0.self_attn.o_proj.weight"] @ value_bias.view(cfg.num_key_value_heads, -1) \
        .repeat_interleave(n_rep, dim=0).reshape(-1)
    semantic = [added[prompts.semantic_token(i)] for i in range(SEMANTIC_CODEBOOK)]
    # the direction keeps its weight relative to the rows (norm ~ std * sqrt(hidden)) at any width
    state["model.embed_tokens.weight"][semantic] += offset / offset.norm() * math.sqrt(cfg.hidden_size / 32)
    return cfg, state, added


def write_demo_checkpoint(folder: str | Path, seed: int = 0, size: CheckpointSize = DEMO_SIZE) -> Path:
    """Write the demo `Spark-TTS-0.5B/` into `folder` (created); returns it.

    `size=FULL_SIZE` writes random weights at the published sizes instead (about 4 GB; speed runs).
    """
    import yaml

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(TOP_CONFIG, sort_keys=False))
    write_bicodec(folder / "BiCodec", torch.Generator().manual_seed(seed), size.bicodec)
    write_llm(folder / "LLM", torch.Generator().manual_seed(seed + 1), size.llm, size.llm_vocab, size.text_tokens)
    write_wav2vec2(folder / "wav2vec2-large-xlsr-53", torch.Generator().manual_seed(seed + 2), size.wav2vec2)
    (folder / "README.md").write_text("Spark-TTS demo weights: random models in the published layout. "
                                      "They produce noise.\n")
    return folder
