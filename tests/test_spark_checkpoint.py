"""Spark checkpoint layout: configs, the demo checkpoint, the committed manifest of the published files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tests.test_spark_fixtures import spark_dir, spark_one_thread  # noqa: F401 - fixtures
from tts.spark.bicodec import BiCodec, check_state_dict, load_bicodec
from tts.spark.config import (GLOBAL_TOKENS, SAMPLES_PER_TOKEN, TOKENS_PER_SECOND, BiCodecConfig, load_spark_config)

pytestmark = pytest.mark.usefixtures("spark_one_thread")

MANIFEST = Path(__file__).parent / "data" / "spark_manifest.json"


def _manifest() -> dict:
    return json.loads(MANIFEST.read_text())


def test_constants():
    assert SAMPLES_PER_TOKEN == 320 and TOKENS_PER_SECOND == 50 and GLOBAL_TOKENS == 32


def test_config_is_read_from_the_checkpoint(spark_dir):
    cfg = load_spark_config(spark_dir)
    assert cfg.top.sample_rate == 16000 and cfg.top.latent_hop_length == 320
    assert cfg.top.ref_segment_samples == 96000  # 6 s floored to a multiple of the hop
    assert cfg.bicodec.decoder.hop == 320
    assert cfg.bicodec.speaker_encoder.ecapa_channels == 512  # upstream's hard-coded width, as published
    assert cfg.llm.model_type == "qwen2" and cfg.llm.tie_word_embeddings


def test_incomplete_directory_names_the_missing_files(tmp_path):
    (tmp_path / "config.yaml").write_text("sample_rate: 16000\n")
    with pytest.raises(ValueError, match="BiCodec/model.safetensors"):
        load_spark_config(tmp_path)


def test_demo_checkpoint_is_deterministic(tmp_path, spark_dir):
    from tts.spark.demo import write_demo_checkpoint

    again = write_demo_checkpoint(tmp_path / "Spark-TTS-0.5B", seed=0)
    for rel in ("BiCodec/model.safetensors", "LLM/model.safetensors", "LLM/tokenizer.json"):
        assert (again / rel).read_bytes() == (spark_dir / rel).read_bytes(), rel
    a = torch.load(again / "wav2vec2-large-xlsr-53/pytorch_model.bin", weights_only=True)
    b = torch.load(spark_dir / "wav2vec2-large-xlsr-53/pytorch_model.bin", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_demo_bicodec_has_the_published_key_names(spark_dir):
    from safetensors.torch import load_file

    def pattern(keys):  # the demo has fewer ConvNeXt layers: compare names up to the layer index
        return {re.sub(r"convnext\.\d+\.", "convnext.N.", k) for k in keys}

    demo_keys = set(load_file(str(spark_dir / "BiCodec/model.safetensors")))
    assert pattern(demo_keys) == pattern(_manifest()["bicodec"])
    assert any(k.endswith("weight_g") for k in demo_keys)


def test_bicodec_load_rejects_a_wrong_checkpoint(spark_dir):
    model = BiCodec(load_spark_config(spark_dir).bicodec)
    state = model.state_dict()
    state.pop("decoder.model.0.weight_v")
    state["encoder.project.weight"] = torch.zeros(3, 3)
    state["not.a.key"] = torch.zeros(1)
    with pytest.raises(ValueError) as err:
        check_state_dict(model, state, "test.safetensors")
    msg = str(err.value)
    assert "decoder.model.0.weight_v" in msg and "not.a.key" in msg and "encoder.project.weight" in msg
    # the derived mel buffers of upstream's torchaudio transform are accepted and ignored
    ok = dict(model.state_dict(), **{"mel_transformer.mel_scale.fb": torch.zeros(513, 128)})
    assert "mel_transformer.mel_scale.fb" not in check_state_dict(model, ok, "x")


def test_wav2vec2_loads_from_the_pretraining_layout(spark_dir):
    from transformers import Wav2Vec2Model

    raw = torch.load(spark_dir / "wav2vec2-large-xlsr-53/pytorch_model.bin", weights_only=True)
    assert all(k.startswith("wav2vec2.") for k in raw)
    assert "wav2vec2.encoder.pos_conv_embed.conv.weight_g" in raw
    _, info = Wav2Vec2Model.from_pretrained(str(spark_dir / "wav2vec2-large-xlsr-53"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_transformers_tokenizer_agrees_with_ours(spark_dir):
    from transformers import AutoTokenizer

    from tts.spark import prompts
    from tts.spark.tokenizer import SparkTokenizer

    hf = AutoTokenizer.from_pretrained(str(spark_dir / "LLM"))
    ours = SparkTokenizer(spark_dir / "LLM")
    prompt = prompts.clone_prompt("Hello, world! 你好。 it's 3 o'clock", [1, 2, 3], "ref text ", [5, 6, 7])
    assert hf([prompt]).input_ids[0] == ours.encode(prompt)
    # upstream decodes with skip_special_tokens=True and still finds the BiCodec tokens
    assert "bicodec_semantic_6" in hf.batch_decode([ours.encode(prompts.semantic_token(6))], skip_special_tokens=True)[0]


def test_manifest_covers_the_published_files():
    m = _manifest()
    assert len(m["bicodec"]) == 840  # the published BiCodec/model.safetensors holds 840 tensors
    assert sum(torch.Size(s).numel() for s in m["bicodec"].values()) * 4 == pytest.approx(626e6, rel=0.01)
    assert m["llm"]["model.embed_tokens.weight"] == [166000, 896] and "lm_head.weight" not in m["llm"]


def test_our_bicodec_matches_the_manifest_at_full_size():
    m = _manifest()
    with torch.device("meta"):
        model = BiCodec(BiCodecConfig.from_dict(m["bicodec_config"]))
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == m["bicodec"]


def test_our_llm_loader_matches_the_manifest_at_full_size():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tts.spark.llm import llm_shape

    m = _manifest()
    cfg = Qwen2Config(**{k: v for k, v in m["llm_config"].items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    ours = {k: list(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert ours == m["llm"]
    shape = llm_shape(model)
    assert (shape.n_layers, shape.n_heads, shape.n_kv_heads, shape.head_dim) == (24, 14, 2, 64)


def test_demo_bicodec_loads_and_folds(spark_dir):
    model = load_bicodec(spark_dir / "BiCodec")
    assert all(m.folded is not None for m in model.modules() if hasattr(m, "folded"))


def test_full_size_random_checkpoint_uses_the_published_architecture():
    from tts.spark.demo import FULL_SIZE

    m = _manifest()
    assert BiCodecConfig.from_dict(FULL_SIZE.bicodec) == BiCodecConfig.from_dict(m["bicodec_config"])
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
        assert FULL_SIZE.llm[key] == m["llm_config"][key], key
    assert FULL_SIZE.llm_vocab == m["llm_config"]["vocab_size"]


def test_full_size_tokenizer_puts_the_added_tokens_at_the_published_ids(tmp_path):
    """With Qwen2's text vocabulary size the added tokens start at the published <|endoftext|> id,
    so the decode step's speech head covers as many LM-head rows as upstream's; the padding entries
    never come out of encoding."""
    from tts.spark.demo import FULL_SIZE, QWEN_TEXT_TOKENS, write_tokenizer
    from tts.spark.tokenizer import SparkTokenizer

    n_tokens, added = write_tokenizer(tmp_path, FULL_SIZE.text_tokens)
    assert added["<|endoftext|>"] == QWEN_TEXT_TOKENS == 151643
    assert n_tokens <= FULL_SIZE.llm_vocab
    tok = SparkTokenizer(tmp_path)
    assert tok.speech_ids_from == QWEN_TEXT_TOKENS
    assert FULL_SIZE.llm_vocab - tok.speech_ids_from < 15000  # the head: ~9% of the LM head's rows
    ids = tok.encode("Hello there, speech tokens.")
    assert ids and max(ids) < 256


#: Keyword arguments of upstream's constructors that BiCodec.load_from_checkpoint calls with each
#: section of BiCodec/config.yaml (Spark-TTS sparktts/, commit 2f1ea908): a key outside these makes
#: upstream raise TypeError. FactorizedVectorQuantize also takes **kwargs (any key).
UPSTREAM_SECTION_KEYS = {
    "encoder": {"input_channels", "vocos_dim", "vocos_intermediate_dim", "vocos_num_layers", "out_channels",
                "sample_ratios"},
    "prenet": {"input_channels", "vocos_dim", "vocos_intermediate_dim", "vocos_num_layers", "out_channels",
               "condition_dim", "sample_ratios", "use_tanh_at_final"},
    "postnet": {"input_channels", "vocos_dim", "vocos_intermediate_dim", "vocos_num_layers", "out_channels",
                "condition_dim", "sample_ratios", "use_tanh_at_final"},
    "decoder": {"input_channel", "channels", "rates", "kernel_sizes", "d_out"},
    "speaker_encoder": {"input_dim", "out_dim", "latent_dim", "token_num", "fsq_levels", "fsq_num_quantizers"},
    "mel_params": {"sample_rate", "n_fft", "win_length", "hop_length", "mel_fmin", "mel_fmax", "num_mels"},
}
#: Required (no default) keyword arguments of the same constructors.
UPSTREAM_REQUIRED_KEYS = {
    "encoder": {"input_channels", "vocos_dim", "vocos_intermediate_dim", "vocos_num_layers", "out_channels"},
    "prenet": {"input_channels", "vocos_dim", "vocos_intermediate_dim", "vocos_num_layers", "out_channels"},
    "postnet": {"input_channels", "vocos_dim", "vocos_intermediate_dim", "vocos_num_layers", "out_channels"},
    "decoder": {"input_channel", "channels", "rates", "kernel_sizes"},
    "quantizer": {"input_dim", "codebook_size", "codebook_dim", "commitment"},
}


@pytest.mark.parametrize("which", ["demo", "full"])
def test_bicodec_config_sections_use_only_upstream_keys(tmp_path, which):
    import yaml

    from tts.spark.demo import DEMO_BICODEC, FULL_BICODEC

    sections = DEMO_BICODEC if which == "demo" else FULL_BICODEC
    for name, allowed in UPSTREAM_SECTION_KEYS.items():
        assert set(sections[name]) <= allowed, (name, set(sections[name]) - allowed)
    for name, required in UPSTREAM_REQUIRED_KEYS.items():
        assert required <= set(sections[name]), (name, required - set(sections[name]))


def test_demo_files_written_use_only_upstream_keys_and_load_strictly(spark_dir):
    """The files on disk (not just the dicts): config sections, and every weight file loaded with
    nothing missing, unexpected or of the wrong shape."""
    import yaml
    from transformers import Qwen2ForCausalLM, Wav2Vec2Model

    written = yaml.safe_load((spark_dir / "BiCodec" / "config.yaml").read_text())["audio_tokenizer"]
    for name, allowed in UPSTREAM_SECTION_KEYS.items():
        assert set(written[name]) <= allowed, (name, set(written[name]) - allowed)
    load_bicodec(spark_dir / "BiCodec")  # check_state_dict refuses missing, unexpected or misshapen tensors
    _, info = Qwen2ForCausalLM.from_pretrained(str(spark_dir / "LLM"), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    _, info = Wav2Vec2Model.from_pretrained(str(spark_dir / "wav2vec2-large-xlsr-53"), output_loading_info=True)
    # the pre-training checkpoint also holds quantizer/projection heads Wav2Vec2Model does not use
    assert not info["missing_keys"] and not info["mismatched_keys"], info
