"""Spark-TTS LLM prompts, as upstream writes them (cli/SparkTTS.py, runtime/triton_trtllm spark_tts).

Voice cloning, with the reference transcript:

    <|task_tts|><|start_content|>{ref_text}{text}<|end_content|><|start_global_token|>
    <|bicodec_global_G0|>...<|bicodec_global_G31|><|end_global_token|><|start_semantic_token|>
    <|bicodec_semantic_S0|>...                 (the reference's semantic tokens; the LLM continues them)

without it (upstream passes None; its web UI treats a transcript shorter than 2 characters as none):

    <|task_tts|><|start_content|>{text}<|end_content|><|start_global_token|>{globals}<|end_global_token|>

Voice creation (no reference; the LLM writes the 32 global tokens, then the semantic tokens):

    <|task_controllable_tts|><|start_content|>{text}<|end_content|><|start_style_label|>
    <|gender_G|><|pitch_label_P|><|speed_label_S|><|end_style_label|>

(all on one line, nothing between the pieces.)
"""

from __future__ import annotations

from typing import Iterable

TASK_TTS = "<|task_tts|>"
TASK_CONTROLLABLE_TTS = "<|task_controllable_tts|>"
START_CONTENT, END_CONTENT = "<|start_content|>", "<|end_content|>"
START_GLOBAL, END_GLOBAL = "<|start_global_token|>", "<|end_global_token|>"
START_SEMANTIC, END_SEMANTIC = "<|start_semantic_token|>", "<|end_semantic_token|>"
START_STYLE, END_STYLE = "<|start_style_label|>", "<|end_style_label|>"

#: Voice-creation attribute ids (upstream's token_parser maps).
GENDERS = {"female": 0, "male": 1}
LEVELS = {"very_low": 0, "low": 1, "moderate": 2, "high": 3, "very_high": 4}


def global_token(i: int) -> str:
    return f"<|bicodec_global_{int(i)}|>"


def semantic_token(i: int) -> str:
    return f"<|bicodec_semantic_{int(i)}|>"


def has_transcript(ref_text: str | None) -> bool:
    """Whether a reference transcript is used: empty or whitespace-only counts as none."""
    return ref_text is not None and ref_text.strip() != ""


def clone_prompt(text: str, global_tokens: Iterable[int], ref_text: str | None = None,
                 ref_semantic_tokens: Iterable[int] | None = None) -> str:
    """Voice-cloning prompt. With a transcript the reference's semantic tokens are appended."""
    globals_ = "".join(global_token(i) for i in global_tokens)
    if has_transcript(ref_text):
        semantics = "".join(semantic_token(i) for i in (ref_semantic_tokens if ref_semantic_tokens is not None else ()))
        return (f"{TASK_TTS}{START_CONTENT}{ref_text}{text}{END_CONTENT}"
                f"{START_GLOBAL}{globals_}{END_GLOBAL}{START_SEMANTIC}{semantics}")
    return f"{TASK_TTS}{START_CONTENT}{text}{END_CONTENT}{START_GLOBAL}{globals_}{END_GLOBAL}"


def check_voice(gender: str, pitch: str, speed: str) -> tuple[int, int, int]:
    """Voice-creation attributes -> ids; ValueError naming the accepted values."""
    if gender not in GENDERS:
        raise ValueError(f"gender must be one of {', '.join(GENDERS)}; got {gender!r}")
    for name, value in (("pitch_level", pitch), ("speed_level", speed)):
        if value not in LEVELS:
            raise ValueError(f"{name} must be one of {', '.join(LEVELS)}; got {value!r}")
    return GENDERS[gender], LEVELS[pitch], LEVELS[speed]


def creation_prompt(text: str, gender: str, pitch: str = "moderate", speed: str = "moderate") -> str:
    """Voice-creation prompt from gender (female/male) and pitch/speed levels (very_low..very_high)."""
    g, p, s = check_voice(gender, pitch, speed)
    return (f"{TASK_CONTROLLABLE_TTS}{START_CONTENT}{text}{END_CONTENT}{START_STYLE}"
            f"<|gender_{g}|><|pitch_label_{p}|><|speed_label_{s}|>{END_STYLE}")
