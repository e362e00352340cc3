"""Spark-TTS prompts are exactly upstream's strings (cli/SparkTTS.py process_prompt / process_prompt_control)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_spark_fixtures import spark_dir, spark_one_thread  # noqa: F401 - fixtures
from tts.spark import prompts
from tts.spark.tokenizer import SparkTokenizer

pytestmark = pytest.mark.usefixtures("spark_one_thread")

# Written out by hand from upstream's code: the pieces joined with "" in this order.
CLONE_WITH_TEXT = ("<|task_tts|><|start_content|>This is the reference.Say this now.<|end_content|>"
                   "<|start_global_token|><|bicodec_global_7|><|bicodec_global_0|><|bicodec_global_4095|>"
                   "<|end_global_token|><|start_semantic_token|><|bicodec_semantic_12|><|bicodec_semantic_8191|>")
CLONE_WITHOUT_TEXT = ("<|task_tts|><|start_content|>Say this now.<|end_content|>"
                      "<|start_global_token|><|bicodec_global_7|><|bicodec_global_0|><|bicodec_global_4095|>"
                      "<|end_global_token|>")
CREATION = ("<|task_controllable_tts|><|start_content|>Say this now.<|end_content|><|start_style_label|>"
            "<|gender_1|><|pitch_label_0|><|speed_label_4|><|end_style_label|>")


def test_clone_prompt_with_transcript():
    got = prompts.clone_prompt("Say this now.", np.array([7, 0, 4095]), "This is the reference.", [12, 8191])
    assert got == CLONE_WITH_TEXT


def test_clone_prompt_without_transcript_drops_the_reference_semantic_tokens():
    for ref_text in (None, "", "   "):
        assert prompts.clone_prompt("Say this now.", [7, 0, 4095], ref_text, [12, 8191]) == CLONE_WITHOUT_TEXT


def test_voice_creation_prompt():
    assert prompts.creation_prompt("Say this now.", "male", "very_low", "very_high") == CREATION
    assert "<|gender_0|><|pitch_label_2|><|speed_label_2|>" in prompts.creation_prompt("x", "female")
    assert [prompts.LEVELS[k] for k in ("very_low", "low", "moderate", "high", "very_high")] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="gender"):
        prompts.creation_prompt("x", "robot")
    with pytest.raises(ValueError, match="pitch_level"):
        prompts.creation_prompt("x", "male", "loud")


def test_generated_ids_map_to_bicodec_tokens(spark_dir):
    tok = SparkTokenizer(spark_dir / "LLM")
    text = prompts.global_token(5) + "hi" + prompts.semantic_token(42) + prompts.END_SEMANTIC + \
        prompts.semantic_token(8191) + prompts.global_token(4095)
    ids = tok.encode(text)
    g, s = tok.split_generated(ids)
    assert g.tolist() == [5, 4095] and s.tolist() == [42, 8191]
    # the same as upstream's decode-then-regex
    import re
    decoded = tok.decode(ids)
    assert [int(x) for x in re.findall(r"bicodec_semantic_(\d+)", decoded)] == s.tolist()
    assert tok.tok.token_to_id("<|im_end|>") in tok.end_ids
    assert tok.tok.token_to_id(prompts.END_SEMANTIC) in tok.end_ids


def test_prompt_ids_are_the_tokenized_upstream_string(spark_dir):
    tok = SparkTokenizer(spark_dir / "LLM")
    ids = tok.encode(CLONE_WITH_TEXT)
    assert ids[:2] == [tok.tok.token_to_id("<|task_tts|>"), tok.tok.token_to_id("<|start_content|>")]
    assert ids[-2:] == [int(tok.semantic_ids[12]), int(tok.semantic_ids[8191])]
    assert tok.decode(ids) == CLONE_WITH_TEXT
