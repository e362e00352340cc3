"""Speech recognition with Whisper (transformers), for transcript fill and objective checks.

A checkpoint folder is laid out as published (`openai/whisper-large-v3-turbo`: config.json,
model.safetensors, generation_config.json, preprocessor_config.json and the tokenizer files).
`Recognizer.transcribe` takes 16 kHz mono float audio, any number of clips at once, and returns
text, the language Whisper used (detected unless given) and the time spent.

Clips up to 30 s go through one padded batch (Whisper's encoder always sees 30 s windows); longer
clips go through transformers' sequential long-form decoding one at a time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ASR_SAMPLE_RATE = 16000  # Whisper's feature extractor works at 16 kHz
WINDOW_S = 30.0  # Whisper's encoder window: longer clips need long-form decoding
#: Shorter clips hold less than a word: refused with a note rather than guessed at.
MIN_ASR_S = 0.3
#: A clip whose RMS is below this (-60 dBFS) holds no speech to recognise.
SILENT_RMS = 1e-3
#: Upper bound on tokens decoded per 30 s window (Whisper's decoder has 448 positions).
MAX_NEW_TOKENS = 440
#: Tokens allowed per second of audio (plus a few): fast speech is ~5 English tokens/s and up to ~10
#: for Chinese; the cap stops a model that never ends (a looping real one, or random weights).
TOKENS_PER_S, TOKENS_SLACK = 12, 8


@dataclass
class Transcript:
    """One clip's recognition result."""

    text: str
    language: str  # ISO code Whisper decoded with, e.g. "en", "zh"
    compute_ms: float  # wall time of the batch this clip ran in
    tokens: int  # tokens decoded (special tokens excluded)


def check_clip(wav: np.ndarray, sr: int = ASR_SAMPLE_RATE) -> None:
    """Raise ValueError naming the problem unless `wav` ([N] float at `sr` Hz) can be recognised."""
    wav = np.asarray(wav, dtype=np.float32).reshape(-1)
    if wav.size == 0 or not np.isfinite(wav).all():
        raise ValueError("the audio for speech recognition is empty or holds NaN/infinite samples")
    if wav.size < MIN_ASR_S * sr:
        raise ValueError(f"the audio is {wav.size / sr:.2f} s long; speech recognition needs at least {MIN_ASR_S} s")
    rms = float(np.sqrt(np.mean(np.square(wav, dtype=np.float64))))
    if rms < SILENT_RMS:
        raise ValueError(f"the audio is silent (RMS {rms:.1e}); there is no speech to recognise")


class Recognizer:
    """Whisper from a checkpoint folder, on one device."""

    def __init__(self, model_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        self.device, self.dtype = torch.device(device), dtype
        self.processor = WhisperProcessor.from_pretrained(str(model_dir))
        self.model = WhisperForConditionalGeneration.from_pretrained(str(model_dir), dtype=dtype).to(self.device).eval()
        gen = self.model.generation_config
        self.lang_to_id: dict[str, int] = dict(getattr(gen, "lang_to_id", None) or {})
        self.id_to_lang = {i: tok.strip("<|>") for tok, i in self.lang_to_id.items()}

    @property
    def languages(self) -> list[str]:
        """ISO codes this checkpoint can be told to use."""
        return sorted(self.id_to_lang.values())

    def check_language(self, language: str | None) -> str | None:
        """None (detect) or a supported code; raises ValueError naming an unsupported one."""
        if not language:
            return None
        code = language.strip().lower()
        if f"<|{code}|>" not in self.lang_to_id:
            raise ValueError(f"language {language!r} is not one this speech-recognition model supports "
                             f"(it knows {len(self.lang_to_id)}: {', '.join(self.languages[:12])}, ...)")
        return code

    @torch.inference_mode()
    def transcribe(self, clips: list[np.ndarray], language: str | None = None,
                   fixed_tokens: int | None = None) -> list[Transcript]:
        """Recognise each clip ([N] float32 at 16 kHz).

        language: an ISO code, or None to let Whisper detect it per clip. fixed_tokens: decode
        exactly this many tokens (benchmarks: a random Whisper never ends on its own).
        """
        for wav in clips:
            check_clip(wav)
        code = self.check_language(language)
        out: list[Transcript | None] = [None] * len(clips)
        short = [i for i, w in enumerate(clips) if w.size <= WINDOW_S * ASR_SAMPLE_RATE]
        if short:
            for i, t in zip(short, self._run([clips[i] for i in short], code, fixed_tokens, long_form=False)):
                out[i] = t
        for i in (i for i, w in enumerate(clips) if w.size > WINDOW_S * ASR_SAMPLE_RATE):
            out[i] = self._run([clips[i]], code, fixed_tokens, long_form=True)[0]
        return out  # type: ignore[return-value]

    def _run(self, clips: list[np.ndarray], language: str | None, fixed_tokens: int | None,
             long_form: bool) -> list[Transcript]:
        started = time.perf_counter()
        kwargs = {"truncation": False, "padding": "longest"} if long_form else {}
        feats = self.processor.feature_extractor([np.asarray(c, np.float32) for c in clips],
                                                 sampling_rate=ASR_SAMPLE_RATE, return_tensors="pt",
                                                 return_attention_mask=True, **kwargs)
        features = feats.input_features.to(self.device, self.dtype)
        if language:
            languages = [language] * len(clips)
        else:  # detected per clip from its first 30 s (Whisper's own language-id pass)
            lang_ids = self.model.detect_language(features[..., :3000]).reshape(-1).tolist()
            languages = [self.id_to_lang.get(i, "en") for i in lang_ids]
        longest = max(c.size for c in clips) / ASR_SAMPLE_RATE
        budget = min(MAX_NEW_TOKENS, int(longest * TOKENS_PER_S) + TOKENS_SLACK)
        gen_kwargs: dict = {"task": "transcribe", "language": languages,
                            "max_new_tokens": fixed_tokens or budget}
        if fixed_tokens:
            gen_kwargs["min_new_tokens"] = fixed_tokens
        if long_form:
            gen_kwargs["attention_mask"] = feats.attention_mask.to(self.device)
        sequences = self.model.generate(features, **gen_kwargs)
        if not torch.is_tensor(sequences):  # some generate paths answer a dict
            sequences = sequences["sequences"]
        ms = (time.perf_counter() - started) * 1000
        special = set(self.processor.tokenizer.all_special_ids)
        results = []
        for row, lang in zip(sequences.tolist(), languages):
            text = self.processor.tokenizer.decode(row, skip_special_tokens=True).strip()
            results.append(Transcript(text, lang, ms, sum(1 for t in row if t not in special)))
        return results
