"""Objective checks: text normalisation and error rates on hand-made examples (expected values worked
out by hand in the comments), and the two check models through the real tritonserver (demo weights)."""

from __future__ import annotations

import numpy as np
import pytest

from studio import objective as ob


@pytest.mark.parametrize("text, expected", [
    ("Hello, World!", "hello world"),
    ("It's 50% off, Mr. Smith.", "it is 50% off mister smith"),
    ("I have twenty-four pears", "i have 24 pears"),  # spelled numbers become digits
    ("  Spaces\tand\nlines  ", "spaces and lines"),
])
def test_english_normalisation(text, expected):
    assert ob.normalize_english(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("今天天氣很好，我們去公園。", "今天天气很好我们去公园"),  # Traditional -> Simplified, punctuation gone
    ("我有 3 个苹果！", "我有三个苹果"),  # digits as numerals, whitespace gone
    ("GPT-4o 很快", "gpt四o很快"),
])
def test_chinese_normalisation(text, expected):
    assert ob.normalize_chinese(text) == expected


@pytest.mark.parametrize("reference, hypothesis, metric, rate", [
    # 4 reference words "the cat sat down"; "the cat sad" = 1 substitution + 1 deletion -> 2/4
    ("The cat sat down.", "the cat sad", "wer", 0.5),
    # normalisation makes these equal: case, punctuation, "twenty-four" -> "24"
    ("I have 24 pears.", "i have twenty-four pears", "wer", 0.0),
    # 3 words, hypothesis adds 2 -> 2 insertions / 3
    ("good morning everyone", "good morning to you everyone", "wer", 2 / 3),
    # 6 characters 今天天气很好 vs 今天天汽很好: 1 substitution / 6 (Traditional 氣 -> 气 first)
    ("今天天气很好。", "今天天汽很好", "cer", 1 / 6),
    ("今天天氣很好", "今天天气很好", "cer", 0.0),
    # 4 characters 我有三个 vs 我有3个 (digit written as numeral): 0; then one missing character: 1/4
    ("我有三个", "我有3个", "cer", 0.0),
    ("我有三个", "我有个", "cer", 0.25),
    # empty hypothesis: everything deleted
    ("hello there", "", "wer", 1.0),
])
def test_error_rates_by_hand(reference, hypothesis, metric, rate):
    got_metric, got, note = ob.error_rate(reference, hypothesis)
    assert got_metric == metric and note is None
    assert got == pytest.approx(rate)


def test_nothing_to_score_is_a_note():
    metric, rate, note = ob.error_rate("?!…", "hello")
    assert rate is None and "no words" in note


def test_cosine():
    assert ob.cosine([1, 0], [0, 1]) == pytest.approx(0.0)
    assert ob.cosine([1, 1], [2, 2]) == pytest.approx(1.0)
    assert ob.cosine([1, 0], [-1, 0]) == pytest.approx(-1.0)


# --- through the real tritonserver ------------------------------------------------------------------
SR = 16000


def _clip(seconds=2.0, seed=0):
    from tests.conftest import speech_like

    return speech_like(seconds, SR, seed)


def test_transcribe_and_embed(client):
    text, info = client.transcribe(_clip(), SR)
    assert isinstance(text, str) and info["demo_weights"] is True and info["language"]
    again, _ = client.transcribe(_clip(), SR)
    assert again == text  # greedy decoding: the same clip, the same text
    fixed, info = client.transcribe(_clip(), SR, language="en", fixed_tokens=6)
    assert info["language"] == "en" and info["tokens"] == 6
    emb, info = client.embed(_clip(), SR)
    assert emb.ndim == 1 and emb.size > 0 and np.linalg.norm(emb) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("call, message", [
    (lambda c: c.transcribe(np.zeros(SR, np.float32), SR), "silent"),
    (lambda c: c.transcribe(_clip(0.1), SR), "at least 0.3 s"),
    (lambda c: c.transcribe(_clip(), SR, language="klingon"), "not one this speech-recognition model supports"),
    (lambda c: c.embed(_clip(0.2), SR), "at least 0.5 s"),
])
def test_check_models_refuse_bad_audio_by_name(client, call, message):
    from studio.client import SynthesisError

    with pytest.raises(SynthesisError, match=message):
        call(client)


def test_run_checks_recomputes(client):
    """The figures equal what the test computes from the texts and embeddings the models return."""
    out, prompt = _clip(2.5, seed=1), _clip(3.0, seed=2)
    target = "The quiet harbour wakes up slowly."
    res = ob.run_checks(client, out, SR, target, prompt, SR)
    text, _ = client.transcribe(out, SR)
    assert res.asr_text == text and res.metric == "wer"
    import jiwer

    assert res.error_rate == pytest.approx(jiwer.wer(ob.normalize_english(target), ob.normalize_english(text))
                                           if ob.normalize_english(text) else 1.0)
    e_out, _ = client.embed(out, SR)
    e_prompt, _ = client.embed(prompt, SR)
    assert res.similarity == pytest.approx(float(e_out @ e_prompt / np.linalg.norm(e_out) / np.linalg.norm(e_prompt)),
                                           abs=1e-5)
    assert res.demo_weights and any("demo weights" in n for n in res.notes)
    # a created voice has no prompt: a note, not a number
    assert ob.run_checks(client, out, SR, target).similarity is None


def test_cli_f5_without_ref_text_fills_it_and_checks(triton_server, tmp_path):
    """`synth` with F5 and no --ref-text: the prompt is transcribed (demo ASR, said so), then --check
    prints the error rate and speaker similarity."""
    import subprocess
    import sys

    import soundfile as sf

    from tests.conftest import speech_like

    prompt = tmp_path / "prompt.wav"
    sf.write(prompt, speech_like(2.5, 24000, seed=3), 24000)
    out = tmp_path / "out.wav"
    proc = subprocess.run([sys.executable, "-m", "studio", "synth", "--model", "f5", "--ref-audio", str(prompt),
                           "--text", "Hello there, this is a test.", "-o", str(out), "--nfe", "2", "--check",
                           "--triton-url", triton_server.grpc_url], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file()
    assert "transcript was filled by the DEMO speech-recognition model" in proc.stdout
    assert "objective checks: WER" in proc.stdout and "speaker similarity" in proc.stdout


def test_batch_checks_and_listening_objective_columns(client, tmp_path):
    """A batch run with checks stores WER and speaker similarity per output (model and files: outputs);
    the figures follow from the stored recognised text; a listening session's report lists them per
    system with confidence intervals."""
    import soundfile as sf

    from studio import listening
    from studio.batch import parse_test_set, prepare_run, run_batch, run_outputs
    from studio.store import Store
    from studio.voices import SAMPLES_DIR, VoiceLibrary
    from tests.conftest import speech_like

    store, voices = Store(tmp_path / "data"), VoiceLibrary(tmp_path / "data", SAMPLES_DIR)
    prompt = SAMPLES_DIR / "en_female.wav"
    ref = (SAMPLES_DIR / "en_female.txt").read_text("utf-8").strip()
    rows = "id,prompt,reference_text,target_text,seed\n" + "".join(
        f'r{i},{prompt},"{ref}","Row {i}, short.",{i}\n' for i in range(3))
    folder = tmp_path / "rec"
    folder.mkdir()
    for i in range(3):
        sf.write(folder / f"r{i}.wav", speech_like(1.5, 24000, seed=10 + i), 24000)
    run = prepare_run(store, "checked", parse_test_set(rows, base_dir=tmp_path), ["f5:nfe_steps=2", f"files:{folder}"],
                      voices)
    progress = run_batch(store, run, client, concurrency=2, voices=voices, checks=True)
    assert progress.done == 6 and progress.failed == 0
    outputs = run_outputs(store, "checked")
    for out in outputs:
        m = out["metrics"]
        assert {"wer", "speaker_sim", "asr_text", "check_ms"} <= set(m), m
        assert m["checks_demo"] is True and -1.0 <= m["speaker_sim"] <= 1.0
        metric, rate, _ = ob.error_rate(out["target_text"], m["asr_text"])
        assert metric == "wer" and m["wer"] == pytest.approx(rate, abs=1e-4)
    systems = sorted({o["system"] for o in outputs})
    session = listening.create_session(store, name="objective", kind="mos", run_id=run.run_id, systems=systems,
                                       items_per_rater=3)
    rep = listening.report(store, session)
    table = {(r["system"], r["field"]): r for r in rep["tables"]["objective"]}
    for system in systems:
        wers = [o["metrics"]["wer"] for o in outputs if o["system"] == system]
        assert table[(system, "wer")]["n"] == 3
        assert table[(system, "wer")]["mean"] == pytest.approx(sum(wers) / 3)
        assert (system, "speaker_sim") in table
