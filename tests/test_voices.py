"""The voice library: names, atomic saves, rename/delete, shipped samples read-only."""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest
import soundfile as sf

from studio.voices import VOICE_SAMPLE_RATE, VoiceError, VoiceLibrary, sanitize_name
from tests.conftest import SAMPLES, speech_like

CLIP = speech_like(1.5, VOICE_SAMPLE_RATE)


@pytest.fixture()
def lib(tmp_path):
    return VoiceLibrary(tmp_path / "data")


@pytest.mark.parametrize("raw,want", [
    ("Alice", "Alice"),
    ("  my   voice  ", "my voice"),
    ("../../etc/passwd", "_.._etc_passwd"),
    ("a/b\\c", "a_b_c"),
    (".hidden", "hidden"),
    ("张三", "张三"),
    ("x" * 100, "x" * 64),
    ("Bob's (calm)", "Bob's (calm)"),
])
def test_sanitize_name(raw, want):
    assert sanitize_name(raw) == want


@pytest.mark.parametrize("raw", ["", "   ", "...", "///", "\n\t"])
def test_unusable_names_are_refused(raw):
    with pytest.raises(VoiceError, match="not a usable voice name"):
        sanitize_name(raw)


def test_save_list_get_and_files_stay_under_data_dir(lib, tmp_path):
    v = lib.save("../escape", CLIP, VOICE_SAMPLE_RATE, " hello there ")
    assert v.name == "_escape" and v.transcript == "hello there" and not v.read_only
    assert v.audio_path.resolve().is_relative_to((tmp_path / "data" / "voices").resolve())
    assert not (tmp_path / "escape").exists()
    wav, sr = sf.read(v.audio_path, dtype="float32")
    assert sr == VOICE_SAMPLE_RATE and np.abs(wav - CLIP).max() < 1e-3
    names = [x.name for x in lib.list() if not x.read_only]
    assert names == ["_escape"]
    assert lib.get("saved:_escape").transcript == "hello there"
    assert lib.get("_escape").seconds == pytest.approx(1.5, abs=1e-3)


def test_save_resamples_to_24k(lib):
    clip16 = speech_like(2.0, 16000)
    v = lib.save("sixteen", clip16, 16000, "")
    wav, sr = sf.read(v.audio_path)
    assert sr == VOICE_SAMPLE_RATE and abs(wav.size - 2 * VOICE_SAMPLE_RATE) <= 2


def test_save_never_clobbers_without_overwrite(lib):
    lib.save("Ann", CLIP, VOICE_SAMPLE_RATE, "first")
    with pytest.raises(VoiceError, match="exists already"):
        lib.save("Ann", CLIP * 0.5, VOICE_SAMPLE_RATE, "second")
    assert lib.get("Ann").transcript == "first"
    lib.save("Ann", CLIP * 0.5, VOICE_SAMPLE_RATE, "second", overwrite=True)
    assert lib.get("Ann").transcript == "second"
    trash = list((lib.root / ".trash").iterdir())
    assert len(trash) == 1 and json.loads((trash[0] / "voice.json").read_text())["transcript"] == "first"


def test_rename_and_delete(lib):
    lib.save("one", CLIP, VOICE_SAMPLE_RATE, "t1")
    lib.save("two", CLIP, VOICE_SAMPLE_RATE, "t2")
    with pytest.raises(VoiceError, match="exists already"):
        lib.rename("one", "two")
    v = lib.rename("one", "uno/../x")
    assert v.name == "uno_.._x" and v.transcript == "t1"
    assert {x.name for x in lib.list() if not x.read_only} == {"uno_.._x", "two"}
    where = lib.delete("two")
    assert where.parent.name == ".trash" and (where / "prompt.wav").is_file()
    assert {x.name for x in lib.list() if not x.read_only} == {"uno_.._x"}
    with pytest.raises(VoiceError, match="no saved voice"):
        lib.delete("two")
    with pytest.raises(VoiceError, match="no saved voice"):
        lib.rename("../voices", "z")


@pytest.mark.parametrize("wav,sr,needle", [
    (np.zeros(VOICE_SAMPLE_RATE, np.float32), VOICE_SAMPLE_RATE, "silent"),
    (CLIP[:1000], VOICE_SAMPLE_RATE, "at least"),
    (np.tile(CLIP, 30), VOICE_SAMPLE_RATE, "under"),
    (np.stack([CLIP, CLIP]), VOICE_SAMPLE_RATE, "mono"),
    (np.where(np.arange(CLIP.size) == 3, np.nan, CLIP), VOICE_SAMPLE_RATE, "NaN"),
])
def test_bad_clips_are_refused_and_nothing_is_left_behind(lib, wav, sr, needle):
    with pytest.raises(VoiceError, match=needle):
        lib.save("bad", wav, sr, "")
    assert not lib.root.exists() or not [p for p in lib.root.iterdir() if p.name != ".trash"]


def test_a_half_written_voice_is_invisible(lib):
    lib.save("good", CLIP, VOICE_SAMPLE_RATE, "ok")
    (lib.root / ".tmp-crashed").mkdir()
    (lib.root / ".tmp-crashed" / "prompt.wav").write_bytes(b"RIFF")
    (lib.root / "no-audio").mkdir()
    assert [v.name for v in lib.list() if not v.read_only] == ["good"]


def test_concurrent_saves_of_one_name_keep_exactly_one(lib):
    errors, barrier = [], threading.Barrier(4)

    def save(i):
        barrier.wait()
        try:
            lib.save("race", CLIP, VOICE_SAMPLE_RATE, f"t{i}")
        except VoiceError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=save, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 3
    assert [v.name for v in lib.list() if not v.read_only] == ["race"]
    assert not [p for p in os.listdir(lib.root) if p.startswith(".tmp")]


def test_shipped_samples_are_listed_read_only(lib):
    samples = [v for v in lib.list() if v.read_only]
    assert {v.name for v in samples} >= {"en_female", "en_male", "zh_female", "zh_male"}
    for v in samples:
        assert v.audio_path.parent == SAMPLES / "voices" and v.transcript and v.seconds > 1
        assert v.label.endswith("(sample)") and v.key == f"sample:{v.name}"
    with pytest.raises(VoiceError, match="shipped sample"):
        lib.delete("sample:en_female")
    with pytest.raises(VoiceError, match="shipped sample"):
        lib.rename("sample:en_female", "mine")
    # a saved voice may reuse a sample's name; keys keep them apart
    lib.save("en_female", CLIP, VOICE_SAMPLE_RATE, "mine")
    assert lib.get("saved:en_female").transcript == "mine"
    assert lib.get("sample:en_female").read_only
