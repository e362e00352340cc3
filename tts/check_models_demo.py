"""Random checkpoints of the objective-check models, in the published layouts.

- Whisper (`openai/whisper-large-v3-turbo`'s layout): config.json, model.safetensors,
  generation_config.json, preprocessor_config.json and the tokenizer files. The tokenizer is a
  byte-level BPE without merges whose special tokens sit at the real ids (<|endoftext|> 50257,
  <|startoftranscript|> 50258, 100 language tokens from 50259, <|translate|> 50359,
  <|transcribe|> 50360, <|startoflm|>, <|startofprev|>, <|nospeech|>, <|notimestamps|> 50364, then
  1501 timestamp tokens), so generation runs through exactly the real code paths. Ordinary ids
  256..50256 are filler words " w<id>".
- WavLM x-vector (`microsoft/wavlm-base-plus-sv`'s layout): config.json, model.safetensors,
  preprocessor_config.json.

`size="demo"` writes tiny models (the studio's demo weights: they run everywhere and answer
noise); `size="full"` writes the published architectures with random weights (GPU timings).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

WHISPER_DIR = "whisper-large-v3-turbo"
WAVLM_DIR = "wavlm-base-plus-sv"

#: Real id layout of the Whisper v3 vocabulary.
EOT_ID = 50257
N_TIMESTAMPS = 1501  # <|0.00|> .. <|30.00|> in 0.02 s steps
VOCAB_SIZE = 51866  # v3: 50257 ordinary + 1 eot + 107 special/language + 1501 timestamps

WHISPER_FULL = {"d_model": 1280, "encoder_layers": 32, "decoder_layers": 4, "encoder_attention_heads": 20,
                "decoder_attention_heads": 20, "encoder_ffn_dim": 5120, "decoder_ffn_dim": 5120,
                "num_mel_bins": 128}
WHISPER_DEMO = {"d_model": 16, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
                "decoder_attention_heads": 2, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32, "num_mel_bins": 128}
WAVLM_FULL: dict = {}  # WavLMConfig's defaults are wavlm-base-plus-sv's architecture
WAVLM_DEMO = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
              "conv_dim": (16,) * 7, "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 4,
              "tdnn_dim": (16, 16, 16, 16, 32), "xvector_output_dim": 16, "num_buckets": 32}


def _byte_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE uses for the bytes 0..255 (GPT-2's mapping)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def special_tokens() -> list[str]:
    """The special tokens from id 50257 on, in the real order."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    langs = [f"<|{code}|>" for code in LANGUAGES]  # 100 codes, "en" first, "yue" last (v3)
    fixed = ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]
    stamps = [f"<|{i * 0.02:.2f}|>" for i in range(N_TIMESTAMPS)]
    return ["<|endoftext|>", "<|startoftranscript|>"] + langs + fixed + stamps


def write_whisper_tokenizer(out: Path) -> dict[str, int]:
    """vocab.json, merges.txt and the added special tokens; returns token -> id of the specials."""
    from transformers import WhisperTokenizer

    alphabet = _byte_alphabet()
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    space = alphabet[ord(" ")]
    for i in range(len(alphabet), EOT_ID):
        vocab[f"{space}w{i}"] = i
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n")
    tok = WhisperTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), unk_token="<|endoftext|>",
                           bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    specials = special_tokens()
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    expected = {t: EOT_ID + i for i, t in enumerate(specials)}
    if ids != expected:
        raise RuntimeError("the demo Whisper tokenizer's special ids differ from the real layout")
    tok.save_pretrained(str(out))
    return ids


def write_whisper(out: Path, size: str = "demo", seed: int = 0) -> Path:
    """A random Whisper in `out` (see the module docstring)."""
    from transformers import GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    out = Path(out)
    ids = write_whisper_tokenizer(out)
    arch = WHISPER_FULL if size == "full" else WHISPER_DEMO
    first, last = ids["<|startoftranscript|>"], ids["<|translate|>"]
    lang_to_id = {t: i for t, i in ids.items() if first < i < last}  # the 100 language tokens
    cfg = WhisperConfig(vocab_size=VOCAB_SIZE, max_source_positions=1500, max_target_positions=448,
                        decoder_start_token_id=ids["<|startoftranscript|>"], bos_token_id=EOT_ID, eos_token_id=EOT_ID,
                        pad_token_id=EOT_ID, begin_suppress_tokens=[220, EOT_ID], **arch)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(cfg).eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"], bos_token_id=EOT_ID, eos_token_id=EOT_ID,
        pad_token_id=EOT_ID, max_length=448, is_multilingual=True, lang_to_id=lang_to_id,
        task_to_id={"translate": ids["<|translate|>"], "transcribe": ids["<|transcribe|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"], prev_sot_token_id=ids["<|startofprev|>"],
        begin_suppress_tokens=[220, EOT_ID], suppress_tokens=[])
    model.save_pretrained(str(out), safe_serialization=True)
    WhisperFeatureExtractor(feature_size=arch["num_mel_bins"]).save_pretrained(str(out))
    return out


def write_wavlm(out: Path, size: str = "demo", seed: int = 0) -> Path:
    """A random WavLM x-vector model in `out` (see the module docstring)."""
    from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMForXVector

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = WavLMForXVector(WavLMConfig(**(WAVLM_FULL if size == "full" else WAVLM_DEMO))).eval()
    model.save_pretrained(str(out), safe_serialization=True)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=False,
                             return_attention_mask=True).save_pretrained(str(out))
    return out
