"""The system grammar: parsing, typing, ranges, canonical form, errors that name the problem."""

from __future__ import annotations

import pytest

from studio.systems import (KEYS, System, SystemSpecError, grammar_help, parse_system, parse_systems)


def test_bare_families_and_files():
    assert parse_system("f5") == System("f5")
    assert parse_system(" Spark ") == System("spark")
    s = parse_system("files:/data/run 1,a")
    assert s.is_files and s.folder == "/data/run 1,a" and s.spec == "files:/data/run 1,a"


def test_typed_values_and_canonical_order():
    s = parse_system("f5: seed=7 , stream, cfg_strength=2.5,nfe_steps=16")
    assert s.options == {"nfe_steps": 16, "cfg_strength": 2.5, "seed": 7}
    assert isinstance(s.options["nfe_steps"], int) and isinstance(s.options["cfg_strength"], float)
    assert s.stream and s.spec == "f5:nfe_steps=16,cfg_strength=2.5,seed=7,stream"
    sp = parse_system("spark:use_prompt_cache=FALSE,top_p=1,temperature=0,max_new_tokens=40,min_new_tokens=40")
    assert sp.options == {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 40, "min_new_tokens": 40,
                          "use_prompt_cache": False}
    assert sp.spec == "spark:temperature=0,top_p=1,max_new_tokens=40,min_new_tokens=40,use_prompt_cache=false"
    big = parse_system(f"spark:seed={2**63 - 1}")
    assert big.options["seed"] == 2**63 - 1, "seeds stay exact (no float round trip)"
    design = parse_system("spark:gender=female,pitch_level=high")
    assert design.voice_creation and not sp.voice_creation


@pytest.mark.parametrize("text", [
    "f5", "f5:stream", "f5:nfe_steps=1,cfg_strength=0,sway_coef=-1,speed=0.3,seed=0,use_prompt_cache=true",
    "f5:speed=3,sway_coef=0.125,cfg_strength=1e-05", "spark:top_k=0,top_p=0.01,temperature=5",
    "spark:gender=male,pitch_level=very_low,speed_level=very_high,seed=3,stream", "files:runs/a",
])
def test_canonical_form_round_trips(text):
    s = parse_system(text)
    assert parse_system(s.spec) == s
    assert parse_system(s.spec).spec == s.spec
    assert hash(s) == hash(parse_system(s.spec))


@pytest.mark.parametrize("text, words", [
    ("", ["empty system"]),
    ("tacotron", ["unknown family", "'tacotron'"]),
    ("f5:", ["nothing after ':'"]),
    ("files:", ["needs a folder"]),
    ("f5:nfe_steps=0", ["nfe_steps='0'", "out of range", "[1, 128]"]),
    ("f5:nfe_steps=129", ["nfe_steps", "out of range"]),
    ("f5:nfe_steps=16.5", ["nfe_steps", "not a whole number"]),
    ("f5:nfe_steps=abc", ["nfe_steps", "not a number"]),
    ("f5:nfe_steps=", ["nfe_steps", "has no value"]),
    ("f5:nfe_steps", ["nfe_steps needs a value"]),
    ("f5:speed=0.2", ["speed", "out of range", "[0.3, 3]"]),
    ("f5:cfg_strength=nan", ["cfg_strength", "not a finite number"]),
    ("f5:sway_coef=-1.5", ["sway_coef", "out of range"]),
    ("f5:seed=-1", ["seed", "out of range"]),
    ("f5:seed=9223372036854775808", ["seed", "out of range"]),
    ("f5:temperature=0.5", ["'temperature' does not apply to f5", "spark key"]),
    ("spark:nfe_steps=8", ["'nfe_steps' does not apply to spark", "f5 key"]),
    ("f5:steps=8", ["'steps'", "unknown key", "nfe_steps"]),
    ("f5:nfe_steps=8,nfe_steps=9", ["nfe_steps is given twice"]),
    ("f5:stream,stream", ["stream is given twice"]),
    ("f5:stream=true", ["stream is a flag"]),
    ("f5:nfe_steps=8,,stream", ["empty item"]),
    ("f5:use_prompt_cache=maybe", ["use_prompt_cache", "not true or false"]),
    ("spark:top_p=0", ["top_p", "out of range", "(0, 1]"]),
    ("spark:top_p=1.01", ["top_p", "out of range"]),
    ("spark:temperature=5.5", ["temperature", "out of range"]),
    ("spark:top_k=-1", ["top_k", "out of range"]),
    ("spark:max_new_tokens=0", ["max_new_tokens", "out of range"]),
    ("spark:max_new_tokens=100,min_new_tokens=200", ["min_new_tokens=200 is more than max_new_tokens (100)"]),
    ("spark:min_new_tokens=4000", ["more than max_new_tokens (3000, the default)"]),
    ("spark:gender=other", ["gender='other'", "female, male"]),
    ("spark:gender=female,pitch_level=loud", ["pitch_level='loud'", "very_low"]),
    ("spark:pitch_level=high", ["pitch_level need gender"]),
])
def test_errors_name_the_problem(text, words):
    with pytest.raises(SystemSpecError) as err:
        parse_system(text)
    for word in words:
        assert word in str(err.value), str(err.value)


def test_duplicate_systems_are_refused():
    assert [s.spec for s in parse_systems(["f5", "spark:stream"])] == ["f5", "spark:stream"]
    with pytest.raises(SystemSpecError, match="same system"):
        parse_systems(["f5:cfg_strength=2", "f5: cfg_strength=2.0"])


def test_keys_are_the_triton_inputs_and_the_client_options():
    """One vocabulary: the grammar's keys are the client's options and the Triton models' inputs."""
    from studio.client import FAMILY_PARAMS, PARAM_TYPES
    from triton_models.shared import F5_INPUTS, SPARK_INPUTS

    wire = {"reference_wav", "reference_wav_len", "reference_text", "target_text"}
    assert {k.name for k in KEYS["f5"]} == set(F5_INPUTS) - wire == set(FAMILY_PARAMS["f5"])
    assert {k.name for k in KEYS["spark"]} == set(SPARK_INPUTS) - wire == set(FAMILY_PARAMS["spark"])
    kinds = {"INT32": "int", "INT64": "int", "FP32": "float", "BOOL": "bool", "BYTES": "choice"}
    for fam in KEYS:
        for key in KEYS[fam]:
            assert kinds[PARAM_TYPES[key.name]] == key.kind, key.name
    assert "nfe_steps" in grammar_help() and "files:FOLDER" in grammar_help()


def test_ranges_match_what_the_models_accept():
    """F5's ranges are repeated here (its pipeline imports torch): they must equal the model's."""
    pytest.importorskip("torch")
    from studio import systems
    from tts.f5 import pipeline

    assert systems.NFE_RANGE == pipeline.NFE_RANGE
    assert systems.SPEED_RANGE == pipeline.SPEED_RANGE
    assert systems.CFG_RANGE == pipeline.CFG_RANGE
    assert systems.SWAY_RANGE == pipeline.SWAY_RANGE


def test_every_accepted_spark_value_passes_the_model_check():
    """The bounds of each Spark range pass SparkOptions' own validation; just outside is refused here."""
    from tts.spark.request import SparkOptions

    for text in ("spark:temperature=0,top_p=1,top_k=0,max_new_tokens=8192,min_new_tokens=8192",
                 "spark:temperature=5,top_p=0.0001,top_k=1,max_new_tokens=1,seed=0"):
        SparkOptions(**parse_system(text).options).validated()
