"""The F5 front end against upstream F5-TTS's own functions: word units, offline chunk plans and
prompt preparation.

The expectations below were produced once, outside this repository, by running upstream's own
`convert_char_to_pinyin` (src/f5_tts/model/utils.py), `chunk_text`, the `max_chars` expression of
`infer_process`, and `preprocess_ref_audio_text` (src/f5_tts/infer/utils_infer.py, commit
2ae2c9bd) in a scratch virtualenv with the package versions in UPSTREAM_VERSIONS; the prompt
clips were the ones `tests/prompt_clips.py` makes, written as 16-bit WAV files. They are upstream's
output, not this project's.
"""

from __future__ import annotations

import importlib.metadata

import numpy as np
import pytest

from tests.prompt_clips import LAYOUTS, SR, make_clip
from tts.f5 import pipeline as P
from tts.f5 import reference as ref
from tts.f5 import text

#: Versions upstream's own functions ran with when these expectations were derived.
UPSTREAM_VERSIONS = {'rjieba': '0.2.2', 'pypinyin': '0.55.0', 'pydub': '0.25.1'}

#: text -> upstream `convert_char_to_pinyin([text])[0]`
UPSTREAM_UNITS = {
    'A well-known, state-of-the-art e-mail about COVID-19 and GPT-4o.':
        ['A', ' ', 'w', 'e', 'l', 'l', '-', 'k', 'n', 'o', 'w', 'n', ',', ' ', 's', 't', 'a', 't', 'e', '-', 'o', 'f', '-', 't', 'h', 'e', '-', 'a', 'r', 't', ' ', 'e', '-', 'm', 'a', 'i', 'l', ' ', 'a', 'b', 'o', 'u', 't', ' ', 'C', 'O', 'V', 'I', 'D', '-', '1', '9', ' ', 'a', 'n', 'd', ' ', 'G', 'P', 'T', '-', '4', 'o', '.'],
    '今天是2024-05-01，天气不错。':
        [' ', 'jin1', ' ', 'tian1', ' ', 'shi4', ' ', '2', '0', '2', '4', '-', '0', '5', '-', '0', '1', '，', ' ', 'tian1', ' ', 'qi4', ' ', 'bu2', ' ', 'cuo4', '。'],
    'Call 555-1234 in the U.S.A. about C++, a_b and v1.2.3!':
        ['C', 'a', 'l', 'l', ' ', '5', '5', '5', '-', '1', '2', '3', '4', ' ', 'i', 'n', ' ', 't', 'h', 'e', ' ', 'U', '.', 'S', '.', 'A', '.', ' ', 'a', 'b', 'o', 'u', 't', ' ', 'C', '+', '+', ',', ' ', 'a', '_', 'b', ' ', 'a', 'n', 'd', ' ', 'v', '1', '.', '2', '.', '3', '!'],
    "I don't really care what you call me; “quoted” words and it’s fine.":
        ['I', ' ', 'd', 'o', 'n', "'", 't', ' ', 'r', 'e', 'a', 'l', 'l', 'y', ' ', 'c', 'a', 'r', 'e', ' ', 'w', 'h', 'a', 't', ' ', 'y', 'o', 'u', ' ', 'c', 'a', 'l', 'l', ' ', 'm', 'e', ',', ' ', '"', 'q', 'u', 'o', 't', 'e', 'd', '"', ' ', 'w', 'o', 'r', 'd', 's', ' ', 'a', 'n', 'd', ' ', 'i', 't', "'", 's', ' ', 'f', 'i', 'n', 'e', '.'],
    '我们在2024年用GPT-4o写了C++代码。':
        [' ', 'wo3', ' ', 'men', ' ', 'zai4', ' ', '2', '0', '2', '4', ' ', 'nian2', ' ', 'yong4', ' ', 'G', 'P', 'T', '-', '4', 'o', ' ', 'xie3', ' ', 'le', ' ', 'C', '+', '+', ' ', 'dai4', ' ', 'ma3', '。'],
    'Mixed 中文 and English, 还有数字 3.14 和 50%.':
        ['M', 'i', 'x', 'e', 'd', ' ', ' ', 'zhong1', ' ', 'wen2', ' ', 'a', 'n', 'd', ' ', 'E', 'n', 'g', 'l', 'i', 's', 'h', ',', ' ', ' ', 'hai2', ' ', 'you3', ' ', 'shu4', ' ', 'zi4', ' ', '3', '.', '1', '4', ' ', ' ', 'he2', ' ', '5', '0', '%', '.'],
    '你好，世界！这是一个测试。':
        [' ', 'ni2', ' ', 'hao3', '，', ' ', 'shi4', ' ', 'jie4', '！', ' ', 'zhe4', ' ', 'shi4', ' ', 'yi2', ' ', 'ge4', ' ', 'ce4', ' ', 'shi4', '。'],
    'Hello  world.\nNew line: here.':
        ['H', 'e', 'l', 'l', 'o', ' ', ' ', 'w', 'o', 'r', 'l', 'd', '.', '\n', ' ', 'N', 'e', 'w', ' ', 'l', 'i', 'n', 'e', ':', ' ', 'h', 'e', 'r', 'e', '.'],
    "Some call me nature, others call me mother nature.  I don't really care what you call me.":
        ['S', 'o', 'm', 'e', ' ', 'c', 'a', 'l', 'l', ' ', 'm', 'e', ' ', 'n', 'a', 't', 'u', 'r', 'e', ',', ' ', 'o', 't', 'h', 'e', 'r', 's', ' ', 'c', 'a', 'l', 'l', ' ', 'm', 'e', ' ', 'm', 'o', 't', 'h', 'e', 'r', ' ', 'n', 'a', 't', 'u', 'r', 'e', '.', ' ', ' ', 'I', ' ', 'd', 'o', 'n', "'", 't', ' ', 'r', 'e', 'a', 'l', 'l', 'y', ' ', 'c', 'a', 'r', 'e', ' ', 'w', 'h', 'a', 't', ' ', 'y', 'o', 'u', ' ', 'c', 'a', 'l', 'l', ' ', 'm', 'e', '.'],
    'Some call me nature, others call me mother nature.  Hi.':
        ['S', 'o', 'm', 'e', ' ', 'c', 'a', 'l', 'l', ' ', 'm', 'e', ' ', 'n', 'a', 't', 'u', 'r', 'e', ',', ' ', 'o', 't', 'h', 'e', 'r', 's', ' ', 'c', 'a', 'l', 'l', ' ', 'm', 'e', ' ', 'm', 'o', 't', 'h', 'e', 'r', ' ', 'n', 'a', 't', 'u', 'r', 'e', '.', ' ', ' ', 'H', 'i', '.'],
    'The quiet harbour wakes up slowly before sunrise.  Hi.':
        ['T', 'h', 'e', ' ', 'q', 'u', 'i', 'e', 't', ' ', 'h', 'a', 'r', 'b', 'o', 'u', 'r', ' ', 'w', 'a', 'k', 'e', 's', ' ', 'u', 'p', ' ', 's', 'l', 'o', 'w', 'l', 'y', ' ', 'b', 'e', 'f', 'o', 'r', 'e', ' ', 's', 'u', 'n', 'r', 'i', 's', 'e', '.', ' ', ' ', 'H', 'i', '.'],
    '今天天气很好，我们去公园散步吧。Hi.':
        [' ', 'jin1', ' ', 'tian1', ' ', 'tian1', ' ', 'qi4', ' ', 'hen3', ' ', 'hao3', '，', ' ', 'wo3', ' ', 'men', ' ', 'qu4', ' ', 'gong1', ' ', 'yuan2', ' ', 'san4', ' ', 'bu4', ' ', 'ba', '。', ' ', 'H', 'i', '.'],
    'Short.  Hi.':
        ['S', 'h', 'o', 'r', 't', '.', ' ', ' ', 'H', 'i', '.'],
}

#: (transcript, prepared prompt samples at 24 kHz, target text, speed) -> upstream's max_chars and chunk_text
UPSTREAM_PLANS = [
    ('Some call me nature, others call me mother nature.', 61200, "I don't really care what you call me. I've been a silent spectator, watching species evolve, empires rise and fall. But always remember, I am mighty and enduring.", 1.0,
     389, ["I don't really care what you call me. I've been a silent spectator, watching species evolve, empires rise and fall. But always remember, I am mighty and enduring."]),
    ('Some call me nature, others call me mother nature.', 61200, "I don't really care what you call me.", 1.0,
     389, ["I don't really care what you call me."]),
    ('The quiet harbour wakes up slowly before sunrise.', 75543, "I don't really care what you call me. I've been a silent spectator, watching species evolve, empires rise and fall. But always remember, I am mighty and enduring.", 1.0,
     299, ["I don't really care what you call me. I've been a silent spectator, watching species evolve, empires rise and fall. But always remember, I am mighty and enduring."]),
    ('The quiet harbour wakes up slowly before sunrise.', 75543, "I don't really care what you call me. I've been a silent spectator, watching species evolve, empires rise and fall. But always remember, I am mighty and enduring.", 0.5,
     149, ["I don't really care what you call me. I've been a silent spectator, watching species evolve, empires rise and fall. But always remember,", 'I am mighty and enduring.']),
    ('The quiet harbour wakes up slowly before sunrise.', 288000, "I don't really care what you call me. I've been a silent spectator, watching species evolve, empires rise and fall. But always remember, I am mighty and enduring.", 1.0,
     41, ["I don't really care what you call me.", "I've been a silent spectator,", 'watching species evolve,', 'empires rise and fall.', 'But always remember,', 'I am mighty and enduring.']),
    ('今天天气很好，我们去公园散步吧。', 80559, '我不在乎你怎么称呼我。我一直是一个沉默的旁观者，看着物种进化，帝国兴衰。但请永远记住，我是强大而持久的。', 1.0,
     266, ['我不在乎你怎么称呼我。我一直是一个沉默的旁观者，看着物种进化，帝国兴衰。但请永远记住，我是强大而持久的。']),
    ('今天天气很好，我们去公园散步吧。', 80559, '我不在乎你怎么称呼我。我一直是一个沉默的旁观者，看着物种进化，帝国兴衰。但请永远记住，我是强大而持久的。', 2.0,
     533, ['我不在乎你怎么称呼我。我一直是一个沉默的旁观者，看着物种进化，帝国兴衰。但请永远记住，我是强大而持久的。']),
    ('Short.', 48000, "Hi. I don't really care what you call me. I've been a silent spectator, watching species evolve, empires rise and fall. But always remember, I am mighty and enduring.", 1.0,
     70, ["Hi. I don't really care what you call me.", "I've been a silent spectator, watching species evolve,", 'empires rise and fall. But always remember, I am mighty and enduring.']),
]

#: clip layout (tests/prompt_clips.py) -> samples upstream's preprocess_ref_audio_text wrote (24 kHz)
UPSTREAM_PREPARED_SAMPLES = {'leading_silence': 73198, 'inner_gap': 157198, 'long_14s': 231598, 'long_no_gap': 289198, 'no_silence': 73198, 'short_gaps': 116398}
#: pydub builds upstream's 50 ms of silence at 11025 Hz and resamples it (1198 samples at 24 kHz);
#: here it is exactly 1200. Lengths otherwise agree to the sample; DESIGN.md allows 10 ms.
LENGTH_TOLERANCE = int(0.010 * SR)


def test_segmenter_versions_match_the_expectations():
    """Unit lists depend on rjieba's dictionary and pypinyin's: pinned to the versions used above."""
    for package in ("rjieba", "pypinyin"):
        assert importlib.metadata.version(package) == UPSTREAM_VERSIONS[package], package


@pytest.mark.parametrize("source", list(UPSTREAM_UNITS))
def test_units_equal_upstream(source):
    assert text.text_to_units(source) == UPSTREAM_UNITS[source]


def test_joined_words_stay_one_word():
    """The counts from the bug report: extra space units are extra pauses in real speech."""
    assert len(text.text_to_units("A well-known, state-of-the-art e-mail about COVID-19 and GPT-4o.")) == 64
    assert len(text.text_to_units("今天是2024-05-01，天气不错。")) == 27


@pytest.mark.parametrize("ref_text, samples, target, speed, max_chars, chunks", UPSTREAM_PLANS)
def test_offline_plan_equals_upstream(ref_text, samples, target, speed, max_chars, chunks):
    fixed = text.fix_reference_text(ref_text)
    assert P.chunk_budget(fixed, samples / SR, speed) == max_chars
    assert P.plan_chunks(fixed, samples / SR, target, speed, streaming=False) == chunks


@pytest.mark.parametrize("ref_text, samples, target, speed, max_chars, chunks", UPSTREAM_PLANS)
def test_streaming_plan_is_a_short_first_clause_then_the_same_rule(ref_text, samples, target, speed,
                                                                    max_chars, chunks):
    fixed = text.fix_reference_text(ref_text)
    plan = P.plan_chunks(fixed, samples / SR, target, speed, streaming=True)
    first_budget = max(int(len(fixed.encode()) / (samples / SR) * P.FIRST_CHUNK_S * speed), P.SHORT_TEXT_BYTES)
    assert len(plan[0].encode()) <= max(first_budget, len(text.split_sentences(target, 0)[0].encode()))
    assert all(len(c.encode()) <= max_chars or not any(s in c[:-1] for s in ".,;:!?。，") for c in plan[1:])
    # nothing lost or reordered: the streamed chunks spell the text
    squash = lambda s: "".join(s.split())  # noqa: E731
    assert squash("".join(plan)) == squash(target)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_prepared_prompt_length_equals_upstream(name):
    prep = ref.prepare_prompt(make_clip(name), SR)
    assert abs(prep.wav.size - UPSTREAM_PREPARED_SAMPLES[name]) <= LENGTH_TOLERANCE, (prep.wav.size, name)
    assert not prep.wav[-round(ref.TAIL_SILENCE_S * SR):].any()


def test_preparation_notes_say_what_changed():
    lead = ref.prepare_prompt(make_clip("leading_silence"), SR)
    assert lead.leading_s == pytest.approx(1.0, abs=0.02) and lead.trailing_s == pytest.approx(0.3, abs=0.02)
    assert any("leading silence" in n for n in lead.notes)
    gap = ref.prepare_prompt(make_clip("inner_gap"), SR)
    assert gap.shortened_s == pytest.approx(1.0, abs=0.02) and not gap.clipped
    assert any("long silence" in n for n in gap.notes)
    long = ref.prepare_prompt(make_clip("long_14s"), SR)
    assert long.clipped and long.clipped_s == pytest.approx(3.8, abs=0.02)
    assert any("longer than 12 s" in n for n in long.notes)
    assert ref.prepare_prompt(make_clip("no_silence"), SR).notes == []


def test_too_little_sound_is_refused_by_name():
    quiet = np.concatenate([make_clip("no_silence")[: SR // 5], np.zeros(2 * SR, np.float32)])
    with pytest.raises(ValueError, match="only 0.2. s of sound"):
        ref.prepare_prompt(quiet, SR)
    with pytest.raises(ValueError, match="no sound louder than -50 dBFS"):
        ref.prepare_prompt(np.full(3 * SR, 1e-4, np.float32), SR)


@pytest.fixture(scope="module")
def demo_pipeline(tmp_path_factory):
    from tts.demo_weights import DEMO_F5_NAME, write_f5

    root = tmp_path_factory.mktemp("f5-demo")
    write_f5(root)
    d = root / DEMO_F5_NAME
    return P.F5Pipeline(next(d.glob("*.safetensors")), d / "vocab.txt", root / "vocos-mel-24khz", DEMO_F5_NAME)


def test_streamed_chunks_equal_their_text_alone(demo_pipeline):
    """Chunk i of a streaming plan, synthesised in one batch with the others, equals its text
    synthesised alone (offline plan: one chunk) with seed + i."""
    prompt = make_clip("leading_silence")
    ref_text = "The quiet harbour wakes up slowly."
    target = "I don't really care what you call me. I've been a silent spectator, watching species evolve."
    options = P.F5Options(nfe_steps=3, seed=21)
    streamed = demo_pipeline.make_request(prompt, ref_text, target, options, streaming=True)
    offline = demo_pipeline.make_request(prompt, ref_text, target, options, streaming=False)
    assert len(streamed.jobs) >= 2 and len(offline.jobs) == 1
    assert any("leading silence" in n for n in streamed.notes)  # preparation reported
    together = demo_pipeline.synthesize(streamed.jobs)
    for i, (job, wav) in enumerate(zip(streamed.jobs, together)):
        alone = demo_pipeline.make_request(prompt, ref_text, job.text, P.F5Options(nfe_steps=3, seed=21 + i))
        assert len(alone.jobs) == 1 and alone.jobs[0].total_frames == job.total_frames
        (solo,) = demo_pipeline.synthesize(alone.jobs)
        assert solo.shape == wav.shape and np.abs(solo - wav).max() <= 1e-4


def test_prompt_cache_is_keyed_by_raw_samples(demo_pipeline):
    prompt = make_clip("inner_gap")
    first, cached = demo_pipeline.prepare_reference(prompt)
    again, cached_again = demo_pipeline.prepare_reference(prompt.copy())
    assert cached_again and again is first
    assert first.wav_len == UPSTREAM_PREPARED_SAMPLES["inner_gap"] + 2  # 50 ms = 1200 samples here


@pytest.mark.parametrize("ref_text, seconds, target, first", [
    # the first clause is 3 bytes over the 2 s head budget: cutting would leave a lone "。"
    ("今天天气很好，我们去公园散步吧。", 2.987, "我不在乎你怎么称呼我。我一直是一个沉默的旁观者，看着物种进化。", "我不在乎你怎么称呼我。"),
    # cutting at the last space would leave "me." alone
    ("The quiet harbour wakes up slowly before sunrise.", 2.848, "I don't really care what you call me. I've been "
     "a silent spectator, watching species evolve.", "I don't really care what you call me."),
    # a long first clause is cut at a word boundary near 2 s, the rest keeps its words
    ("The quiet harbour wakes up slowly before sunrise.", 2.848, "I have been a silent spectator watching species "
     "evolve and empires rise and fall for ages.", "I have been a silent spectator"),
])
def test_streaming_head_never_leaves_a_fragment(ref_text, seconds, target, first):
    plan = P.plan_chunks(text.fix_reference_text(ref_text), seconds, target, 1.0, streaming=True)
    assert plan[0] == first
    assert all(len(c.encode()) >= P.SHORT_TEXT_BYTES and text.speakable(c) for c in plan)
