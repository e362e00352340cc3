"""F5-TTS text front end: vocabulary, text -> units -> ids, sentence chunking, text checks.

Upstream facts followed here (F5-TTS `model/utils.py` and `infer/utils_infer.py`):
- `vocab.txt`: line index = token id; only each line's trailing newline is dropped (id 0 is the
  line holding a single space, and 0 also stands for every unknown unit).
- Units (`convert_char_to_pinyin`): the text is segmented into words with rjieba, as upstream;
  pure-ASCII words stay characters (a space unit before each multi-character word unless the
  previous unit is a space, colon or quote), Chinese words become tone-3 pinyin syllables with
  tone sandhi, each syllable preceded by a space unit.
- Chunking (`chunk_text`): split after `; : , . ! ?` followed by whitespace and after CJK
  `；：，。！？`, then pack pieces while their UTF-8 byte length stays within the budget.
- Reference text: `preprocess_ref_audio_text` ends it with ". " unless it already ends with ". "
  or "。" (`fix_reference_text`; the chunk budget is computed from this form); then
  `infer_batch_process` adds one more space if its last character is a single UTF-8 byte
  (`prepare_reference_text`; so "Hello" -> "Hello.  ", as upstream feeds the model).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from pathlib import Path

# Upstream maps these before segmenting, "to address OOV": the vocabulary has no `;` or curly quotes.
_OOV_TRANSLATION = str.maketrans({";": ",", "\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'"})
# A multi-character ASCII word gets a separating space unless the previous unit is one of these.
_NO_SPACE_AFTER = " :'\""
# Upstream's "is Chinese" test: U+3100 (Bopomofo) .. U+9FFF (end of CJK Unified Ideographs).
_CJK_FIRST, _CJK_LAST = "\u3100", "\u9fff"
# Sentence split points of upstream's chunk_text: ASCII punctuation + whitespace, or CJK punctuation.
_SENTENCE_SPLIT = re.compile(r"(?<=[;:,.!?])\s+|(?<=[；：，。！？])")
_CJK_FULL_STOP = "。"


# --- vocabulary -----------------------------------------------------------------------------------
def load_vocab(path: str | Path) -> dict[str, int]:
    """Read `vocab.txt`: unit on line i -> id i. Lines are never stripped (id 0 is " ").

    Read in text mode with universal newlines, as upstream does, so ids match its dict. A last
    line without a newline keeps all its characters (upstream's `line[:-1]` would cut one);
    a unit listed twice keeps its last id, as in upstream's dict.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"vocabulary file not found: {path}")
    vocab: dict[str, int] = {}
    with open(path, "r", encoding="utf-8") as f:
        for i, line in enumerate(f):
            vocab[line[:-1] if line.endswith("\n") else line] = i
    if not vocab:
        raise ValueError(f"vocabulary file is empty: {path}")
    if vocab.get(" ") != 0:
        raise ValueError(f"{path}: line 1 (id 0) must be a single space, as in F5-TTS's vocab.txt "
                         f"(was the file stripped? found id {vocab.get(' ')} for ' ')")
    return vocab


# --- segmentation and pinyin ----------------------------------------------------------------------
def _segment(text: str) -> list[str]:
    """Words as upstream cuts them: rjieba (jieba-rs) with its HMM for unknown words.

    rjieba keeps ASCII words joined by `-`, `.`, `_` or `+` whole ("state-of-the-art", "GPT-4o",
    "2024-05-01", "C++"), which Python jieba splits; each split would add a space unit (a pause).
    """
    import rjieba

    return rjieba.cut(text)


#: Words whose syllables `_pinyin` keeps. It is given one segmented word and nothing else, so its
#: answer depends on the word alone (pypinyin's dictionaries are never changed at run time here):
#: the cache is exact. pypinyin took ~80 % of a Chinese request's parse in the F5 engine (CPU, cProfile over the
#: bench workload: 1.45 ms a Chinese request, 0.25 ms an English one); Chinese text reuses few words
#: often, and 32k entries of a few short strings stay within a few MB.
PINYIN_CACHE_WORDS = 32768


@functools.lru_cache(maxsize=PINYIN_CACHE_WORDS)
def _pinyin(text: str) -> tuple[str, ...]:
    """Tone-3 syllables of one segmented word, with tone sandhi (cached: see PINYIN_CACHE_WORDS)."""
    from pypinyin import Style, lazy_pinyin

    return tuple(lazy_pinyin(text, style=Style.TONE3, tone_sandhi=True))


def _is_chinese(ch: str) -> bool:
    return _CJK_FIRST <= ch <= _CJK_LAST


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def text_to_units(text: str) -> list[str]:
    """Text -> model units: ASCII characters, pinyin syllables (" ni2"-style, space separate), others.

    Per segmented word: pure ASCII -> its characters (with a space unit first when the word is
    longer than one character and the previous unit is not a space, colon or quote); all 3-byte
    characters (Chinese) -> for each character a " " unit if it is Chinese, then its syllable
    (pinyin of the whole word, so tone sandhi sees the word); mixed -> per character: Latin-1
    kept, Chinese as " " + syllable, anything else kept.
    """
    units: list[str] = []
    for word in _segment(text.translate(_OOV_TRANSLATION)):
        n_bytes = _utf8_len(word)
        if n_bytes == len(word):  # pure ASCII
            if units and n_bytes > 1 and units[-1] not in _NO_SPACE_AFTER:
                units.append(" ")
            units.extend(word)
        elif n_bytes == 3 * len(word):  # all three-byte characters: Chinese (and CJK punctuation)
            syllables = _pinyin(word)
            if len(syllables) != len(word):
                # pypinyin merges runs of non-Chinese characters into one item; upstream would then
                # misalign (or raise), so fall back to one character at a time
                syllables = [_pinyin(ch)[0] for ch in word]
            for ch, syllable in zip(word, syllables):
                if _is_chinese(ch):
                    units.append(" ")
                units.append(syllable)
        else:  # mixed scripts
            for ch in word:
                if ord(ch) < 256:
                    units.append(ch)
                elif _is_chinese(ch):
                    units.append(" ")
                    units.extend(_pinyin(ch))
                else:
                    units.append(ch)
    return units


def encode(text: str, vocab: dict[str, int]) -> list[int]:
    """Text -> token ids through `text_to_units`; units missing from `vocab` become 0 (as upstream)."""
    return [vocab.get(unit, 0) for unit in text_to_units(text)]


# --- checks ----------------------------------------------------------------------------------------
def speakable(text: str) -> bool:
    """True when `text` has something to say: a letter or a digit of any script.

    Empty text, whitespace, punctuation, symbols and emoji alone are not speakable.
    """
    return any(unicodedata.category(ch)[0] in "LN" for ch in text)


def validate_text(text, what: str = "target text") -> str:
    """Return `text` (bytes decoded as UTF-8, outer whitespace removed) or raise ValueError naming the problem."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"the {what} is not valid UTF-8 ({exc})") from None
    if text is None:
        raise ValueError(f"the {what} is missing")
    if not isinstance(text, str):
        raise ValueError(f"the {what} must be a string, got {type(text).__name__}")
    text = text.strip()
    if not text:
        raise ValueError(f"the {what} is empty; type the words to be spoken")
    if not speakable(text):
        raise ValueError(f"the {what} {text[:40]!r} has nothing to speak (only punctuation, symbols or emoji); "
                         f"it needs at least one letter, character or digit")
    return text


# --- chunking and the reference transcript --------------------------------------------------------
def split_sentences(text: str, max_chars: int) -> list[str]:
    """Upstream's chunk_text: pack sentence pieces into chunks of at most `max_chars` UTF-8 bytes.

    A piece whose last character is a single byte gets a trailing space before packing (then each
    chunk is stripped), so English pieces are re-joined with spaces and Chinese ones without. A
    single piece longer than the budget becomes a chunk of its own; `max_chars` 0 gives one piece
    per chunk.
    """
    chunks: list[str] = []
    current = ""
    for piece in _SENTENCE_SPLIT.split(text):
        if not piece:
            continue
        padded = piece + " " if _utf8_len(piece[-1]) == 1 else piece
        if _utf8_len(current) + _utf8_len(piece) <= max_chars:
            current += padded
        else:
            if current:
                chunks.append(current.strip())
            current = padded
    if current:
        chunks.append(current.strip())
    return chunks


def fix_reference_text(ref_text: str) -> str:
    """The transcript as upstream's `preprocess_ref_audio_text` returns it: ending in ". " or "。".

    "Hello" -> "Hello. ", "Hello." -> "Hello. ", "你好" -> "你好. ", "你好。" -> "你好。". This is the
    form upstream's `infer_process` measures (in UTF-8 bytes) for the chunk budget.
    """
    if not ref_text.endswith(". ") and not ref_text.endswith(_CJK_FULL_STOP):
        ref_text += " " if ref_text.endswith(".") else ". "
    return ref_text


def prepare_reference_text(ref_text: str) -> str:
    """The reference transcript exactly as upstream puts it before the target text.

    `fix_reference_text`, then, as `infer_batch_process` does, one more space when the last
    character is one byte. So "Hello" -> "Hello.  ", "Hello." -> "Hello.  ", "你好" -> "你好.  ",
    "你好。" -> "你好。".
    """
    ref_text = fix_reference_text(ref_text)
    if ref_text and _utf8_len(ref_text[-1]) == 1:
        ref_text += " "
    return ref_text
