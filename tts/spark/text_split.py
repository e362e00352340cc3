"""Long-text segmentation for Spark-TTS.

Upstream feeds the whole target text to one LLM call (its Triton runtime caps that call at 512
tokens, about 10 s, so long text is cut short: upstream issue #174). Here a text longer than about
20 s of speech is cut at sentence ends into segments of at most that length; each segment is one
LLM call with the same voice (the same global tokens), and the segments' semantic tokens are
vocoded as one stream. Shorter texts stay one segment, i.e. exactly upstream's prompt.

Length is estimated in "weight" units: one per character, three per CJK character (English is
spoken at roughly 15 characters per second, Chinese at 4-5).
"""

from __future__ import annotations

import re

#: Segment budget: ~20 s of speech (300 Latin characters or 100 CJK characters).
MAX_SEGMENT_WEIGHT = 300
CJK_WEIGHT = 3

_CJK = re.compile(r"[\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]")
# sentence ends: ASCII punctuation followed by whitespace, or CJK punctuation (with closing quotes)
_SENTENCE_END = re.compile(r"(?<=[.!?;:…])[\"'”’)\]]*\s+|(?<=[。！？；：…])[”’」』）》]*\s*")
_CLAUSE_END = re.compile(r"(?<=[,，、])\s*")


def text_weight(text: str) -> int:
    return len(text) + (CJK_WEIGHT - 1) * len(_CJK.findall(text))


def _split_keep(text: str, pattern: re.Pattern) -> list[str]:
    pieces, start = [], 0
    for m in pattern.finditer(text):
        if m.end() > start:
            pieces.append(text[start:m.end()])
            start = m.end()
    pieces.append(text[start:])
    return [p for p in pieces if p.strip()]


def _hard_split(text: str, budget: int) -> list[str]:
    """Split at spaces (or anywhere, for unbroken CJK runs) so each piece fits the budget."""
    out, cur = [], ""
    tokens = re.findall(r"\S+\s*", text) if " " in text.strip() else list(text)
    for tok in tokens:
        if cur and text_weight(cur + tok) > budget:
            out.append(cur)
            cur = ""
        cur += tok
    if cur:
        out.append(cur)
    return out


def _pieces(text: str, budget: int) -> list[str]:
    out = []
    for sentence in _split_keep(text, _SENTENCE_END):
        if text_weight(sentence) <= budget:
            out.append(sentence)
            continue
        for clause in _split_keep(sentence, _CLAUSE_END):
            out.extend([clause] if text_weight(clause) <= budget else _hard_split(clause, budget))
    return out


def split_text(text: str, max_weight: int = MAX_SEGMENT_WEIGHT) -> list[str]:
    """Text -> segments (sentences packed greedily up to `max_weight`); short text -> [text]."""
    if text_weight(text) <= max_weight:
        return [text]
    segments, cur = [], ""
    for piece in _pieces(text, max_weight):
        if cur and text_weight(cur + piece) > max_weight:
            segments.append(cur.strip())
            cur = ""
        cur += piece
    if cur.strip():
        segments.append(cur.strip())
    return segments
