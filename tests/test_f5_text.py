"""tts/f5/text.py: vocab loading, upstream unit conversion, checks, chunking, reference text."""

from __future__ import annotations

import pytest

from tts.f5 import text


@pytest.fixture()
def vocab_file(tmp_path):
    units = [" ", "!", ",", ".", "H", "e", "l", "o", "w", "r", "d", "ni2", "hao3", "，", "。", "  ", "\t"]
    path = tmp_path / "vocab.txt"
    path.write_text("".join(u + "\n" for u in units), encoding="utf-8")
    return path, units


def test_vocab_keeps_space_and_whitespace_units(vocab_file):
    path, units = vocab_file
    vocab = text.load_vocab(path)
    assert vocab[" "] == 0
    assert vocab["  "] == units.index("  ") and vocab["\t"] == units.index("\t")  # never stripped
    assert vocab == {u: i for i, u in enumerate(units)}


def test_vocab_rejects_stripped_file(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("a\nb\n", encoding="utf-8")  # a stripped file lost its id-0 space line
    with pytest.raises(ValueError, match="single space"):
        text.load_vocab(path)
    with pytest.raises(ValueError, match="not found"):
        text.load_vocab(tmp_path / "missing.txt")


def test_english_units_are_characters():
    assert text.text_to_units("Hello, world.") == list("Hello, world.")
    # rjieba keeps "F5-TTS" one word (upstream's units, no space inside); a multi-letter word after
    # a non-space unit gets a separating space
    assert text.text_to_units("F5-TTS") == ["F", "5", "-", "T", "T", "S"]
    assert text.text_to_units("(hi)") == ["(", " ", "h", "i", ")"]
    # ";" and curly quotes are mapped to vocab characters first
    assert text.text_to_units("a; \u201cb\u201d") == ["a", ",", " ", '"', "b", '"']


def test_chinese_units_are_spaced_pinyin_with_sandhi():
    assert text.text_to_units("你好") == [" ", "ni2", " ", "hao3"]  # 3-3 sandhi: ni3 -> ni2
    assert text.text_to_units("一个人。") == [" ", "yi2", " ", "ge4", " ", "ren2", "。"]  # yi1 -> yi2 before ge4
    assert text.text_to_units("不是") == [" ", "bu2", " ", "shi4"]


def test_cached_syllables_match_fresh_ones():
    """The word cache answers as pypinyin does, for a word seen before and inside other text."""
    from pypinyin import Style, lazy_pinyin

    text._pinyin.cache_clear()
    sentence = "我们一起去看电影吧，你好不好？我们一起去吧。"
    first = text.text_to_units(sentence)
    misses = text._pinyin.cache_info().misses
    assert text.text_to_units(sentence) == first
    assert text._pinyin.cache_info().misses == misses, "the second pass is served by the cache"
    assert text._pinyin.cache_info().hits > 0
    for word in ("我们", "一起", "你好", "不好"):
        assert list(text._pinyin(word)) == lazy_pinyin(word, style=Style.TONE3, tone_sandhi=True)
    units = text.text_to_units("你好")
    units.append("x")  # a caller changing its list must not change what the cache holds
    assert text.text_to_units("你好") == [" ", "ni2", " ", "hao3"]


def test_mixed_text():
    units = text.text_to_units("Hello, world. 你好，世界！")
    assert units == list("Hello, world. ") + [" ", "ni2", " ", "hao3", "，", " ", "shi4", " ", "jie4", "！"]
    assert text.text_to_units("你好world") == [" ", "ni2", " ", "hao3", " ", *"world"]
    assert text.text_to_units("Café") == list("Café")  # Latin-1 letters stay characters


def test_encode_unknown_is_zero(vocab_file):
    vocab = text.load_vocab(vocab_file[0])
    ids = text.encode("Hello 你好？", vocab)
    assert ids[:5] == [vocab[c] for c in "Hello"]
    assert vocab["ni2"] in ids and vocab["hao3"] in ids
    assert ids[-1] == 0  # "？" is not in this vocab


@pytest.mark.parametrize("value, ok", [
    ("", False), ("   \n", False), ("...!?", False), ("。，！", False), ("😀🎉", False), ("— …", False),
    ("a", True), ("你", True), ("42", True), ("〇", True), ("😀 hi", True),
])
def test_speakable(value, ok):
    assert text.speakable(value) is ok


def test_validate_text():
    assert text.validate_text("  Hi there \n") == "Hi there"
    assert text.validate_text("你好".encode("utf-8"), "reference text") == "你好"
    with pytest.raises(ValueError, match="target text is empty"):
        text.validate_text("  ")
    with pytest.raises(ValueError, match="reference text .* nothing to speak"):
        text.validate_text("?!", "reference text")
    with pytest.raises(ValueError, match="UTF-8"):
        text.validate_text(b"\xff\xfe")


def test_split_sentences_upstream_semantics():
    s = "Hello there, my friend. How are you? 我很好。你呢？Fine!"
    assert text.split_sentences(s, 20) == ["Hello there,", "my friend.", "How are you?", "我很好。", "你呢？Fine!"]
    assert text.split_sentences(s, 1000) == ["Hello there, my friend. How are you? 我很好。你呢？Fine!"]
    # budget 0: one piece per chunk
    assert text.split_sentences("One, two. Three!", 0) == ["One,", "two.", "Three!"]
    # bytes, not characters: 3 Chinese clauses of 12 bytes each fit two to a 24-byte budget
    assert text.split_sentences("我很好。你呢？他也好。", 24) == ["我很好。你呢？", "他也好。"]
    # no split inside numbers or without following whitespace
    assert text.split_sentences("Pi is 3.14,ok", 5) == ["Pi is 3.14,ok"]


def test_fix_reference_text():
    assert text.fix_reference_text("Hello") == "Hello. "
    assert text.fix_reference_text("Hello.") == "Hello. "
    assert text.fix_reference_text("你好。") == "你好。"
    assert text.fix_reference_text("你好") == "你好. "


def test_prepare_reference_text():
    assert text.prepare_reference_text("Hello") == "Hello.  "
    assert text.prepare_reference_text("Hello.") == "Hello.  "
    assert text.prepare_reference_text("Hello. ") == "Hello.  "
    assert text.prepare_reference_text("你好。") == "你好。"
    assert text.prepare_reference_text("你好") == "你好.  "
