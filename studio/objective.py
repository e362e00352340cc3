"""Objective checks of a generation: word/character error rate and speaker similarity.

- Error rate: the output is read back by the `asr` model (Whisper) and compared with the target
  text. English (no CJK character in the target): word error rate after Whisper's own English
  normaliser (`EnglishTextNormalizer` from transformers: lower case, punctuation removed, spelled
  numbers to digits, contractions and titles expanded; the same normaliser the Whisper-based TTS
  evaluations use). Chinese (any CJK character in the target): character error rate after
  converting both texts to Simplified characters (zhconv; Whisper often answers in Traditional),
  removing punctuation and whitespace, and writing digits as Chinese numerals digit by digit.
  Both rates are jiwer's (edit distance over reference length; can exceed 1).
- Speaker similarity: cosine of the `speaker_sim` model's embeddings (WavLM x-vector) of the prompt
  and the output, in [-1, 1].

Nothing here raises for bad audio or text: a check that cannot be made gives a note instead of a
number (audio too short or silent, a target with nothing to read, a model not served).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import asdict, dataclass, field

import numpy as np

#: Characters that make a target text Chinese for scoring (CJK Unified Ideographs and extension A).
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")
_CHINESE_DIGITS = str.maketrans("0123456789", "零一二三四五六七八九")
CHECK_SAMPLE_RATE = 16000  # both check models take 16 kHz audio


@dataclass
class CheckResult:
    """What the objective checks found for one generation (None: not measured; see notes)."""

    metric: str | None = None  # "wer" or "cer"
    error_rate: float | None = None
    asr_text: str | None = None
    asr_language: str | None = None
    similarity: float | None = None
    check_ms: float = 0.0  # wall time of the checks as the client saw it (recognition + embeddings)
    demo_weights: bool = False  # a check model ran on demo weights: the numbers are meaningless
    notes: list[str] = field(default_factory=list)

    def metrics(self) -> dict:
        """Flat fields for history rows and batch outputs (`wer` or `cer`, `speaker_sim`, ...)."""
        out = {"check_ms": round(self.check_ms, 1), "checks_demo": self.demo_weights}
        if self.metric and self.error_rate is not None:
            out[self.metric] = round(self.error_rate, 4)
        if self.similarity is not None:
            out["speaker_sim"] = round(self.similarity, 4)
        if self.asr_text is not None:
            out["asr_text"], out["asr_language"] = self.asr_text, self.asr_language
        return out

    def as_dict(self) -> dict:
        return asdict(self)


def is_chinese(text: str) -> bool:
    return bool(_CJK.search(text))


_english = None


def normalize_english(text: str) -> str:
    """Whisper's English normaliser (transformers), without a spelling map; words with no letter or
    digit left (it keeps a few symbols such as ".." from "…") are dropped."""
    global _english
    if _english is None:
        from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

        _english = EnglishTextNormalizer({})
    return " ".join(w for w in _english(text).split() if any(ch.isalnum() for ch in w))


def normalize_chinese(text: str) -> str:
    """Simplified characters, digits as Chinese numerals, no punctuation, symbols or whitespace."""
    import zhconv

    text = zhconv.convert(text, "zh-cn").translate(_CHINESE_DIGITS).lower()
    return "".join(ch for ch in text if unicodedata.category(ch)[0] in "LN")


def error_rate(reference: str, hypothesis: str) -> tuple[str, float | None, str | None]:
    """(metric, rate, note): WER for English targets, CER for Chinese ones; None with a note when the
    reference has nothing to score after normalisation."""
    import jiwer

    if is_chinese(reference):
        ref, hyp = normalize_chinese(reference), normalize_chinese(hypothesis)
        if not ref:
            return "cer", None, "the target text has no characters to score"
        return "cer", float(jiwer.cer(ref, hyp)) if hyp else 1.0, None
    ref, hyp = normalize_english(reference), normalize_english(hypothesis)
    if not ref:
        return "wer", None, "the target text has no words to score"
    return "wer", float(jiwer.wer(ref, hyp)) if hyp else 1.0, None


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two embeddings."""
    a, b = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def run_checks(client, output: np.ndarray, output_sr: int, target_text: str, prompt: np.ndarray | None = None,
               prompt_sr: int | None = None, language: str | None = None, prompt_embedding=None,
               fixed_tokens: int | None = None) -> CheckResult:
    """Read `output` back with the `asr` model and compare it with `target_text`; embed the output and
    the prompt with `speaker_sim` and compare them. `client` is a StudioClient. Each part that cannot
    be measured (model not served, audio too short, ...) leaves a note instead of a number.
    `fixed_tokens` makes recognition decode exactly that many tokens (benchmarks on random weights)."""
    import time

    from studio.audio_io import resample
    from studio.client import SynthesisError

    started = time.perf_counter()
    result = CheckResult()
    out16 = resample(np.asarray(output, np.float32), output_sr, CHECK_SAMPLE_RATE)
    if client.model_ready("asr"):
        try:
            text, info = client.transcribe(out16, CHECK_SAMPLE_RATE, language=language, fixed_tokens=fixed_tokens)
            result.asr_text, result.asr_language = text, info.get("language")
            result.demo_weights |= bool(info.get("demo_weights"))
            result.metric, result.error_rate, note = error_rate(target_text, text)
            if note:
                result.notes.append(f"no {result.metric.upper()}: {note}")
        except SynthesisError as exc:
            result.notes.append(f"no error rate: {exc}")
    else:
        result.notes.append("no error rate: the speech-recognition model (asr) is not served")
    if prompt is None and prompt_embedding is None:
        result.notes.append("no speaker similarity: there is no prompt clip (a created voice)")
    elif client.model_ready("speaker_sim"):
        try:
            if prompt_embedding is None:
                prompt_embedding, _ = client.embed(resample(np.asarray(prompt, np.float32), prompt_sr,
                                                            CHECK_SAMPLE_RATE), CHECK_SAMPLE_RATE)
            emb, info = client.embed(out16, CHECK_SAMPLE_RATE)
            result.demo_weights |= bool(info.get("demo_weights"))
            result.similarity = cosine(prompt_embedding, emb)
        except SynthesisError as exc:
            result.notes.append(f"no speaker similarity: {exc}")
    else:
        result.notes.append("no speaker similarity: the speaker-verification model (speaker_sim) is not served")
    if result.demo_weights:
        result.notes.append("the check models run on demo weights: these figures are noise, not a measurement")
    result.check_ms = (time.perf_counter() - started) * 1000
    return result


#: Marks a transcript the demo ASR wrote: shown beside the field and in notes, never passed off as real.
DEMO_TRANSCRIPT_NOTE = "filled by the DEMO speech-recognition model (random weights): noise, not a transcript"


def fill_transcript(client, prompt: np.ndarray, sr: int, language: str | None = None) -> tuple[str, dict, str]:
    """Transcribe a prompt clip for F5 (which needs its transcript): (text, asr info, a note for
    `info.notes`). Raises ValueError naming the problem when no transcript can be had (the `asr` model
    is not served, the clip is unusable for recognition, or it holds no words)."""
    from studio.audio_io import resample
    from studio.client import SynthesisError

    if not client.model_ready("asr"):
        raise ValueError("F5-TTS needs the prompt's transcript: type it, or serve the speech-recognition "
                         "model (asr) to fill it in (it is off with --no-asr)")
    try:
        text, info = client.transcribe(resample(np.asarray(prompt, np.float32), sr, CHECK_SAMPLE_RATE),
                                       CHECK_SAMPLE_RATE, language=language)
    except SynthesisError as exc:
        raise ValueError(f"the prompt's transcript could not be filled in: {exc}") from None
    if not text.strip():
        raise ValueError("speech recognition heard no words in the prompt clip; type its transcript")
    how = DEMO_TRANSCRIPT_NOTE if info.get("demo_weights") else f"filled by speech recognition ({info.get('language')})"
    return text.strip(), info, f"the prompt's transcript was {how}: {text.strip()!r}"
