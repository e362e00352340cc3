"""F5 checkpoint reading, strict loading, demo weights and the real-layout manifest."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tts.f5.checkpoint import (DEMO_CONFIG, DEMO_FILE, FILE_PREFIX, load_dit, load_dit_state_dict, manifest,
                               write_demo_dit)
from tts.f5.config import MODEL_CONFIGS, F5Config, load_config
from tts.f5.dit import DiT

DATA = Path(__file__).resolve().parent / "data"
MANIFESTS = ["F5TTS_v1_Base", "F5TTS_Base"]


def _manifest(name: str) -> dict:
    return json.loads((DATA / f"f5_manifest_{name}.json").read_text())


@pytest.mark.parametrize("name", MANIFESTS)
def test_full_config_matches_real_checkpoint_manifest(name):
    data = _manifest(name)
    cfg = replace(MODEL_CONFIGS[name], text_num_embeds=data["text_num_embeds"])
    with torch.device("meta"):
        ours = {FILE_PREFIX + k: v for k, v in manifest(DiT(cfg)).items()}
    expected = data["tensors"]
    assert sorted(set(expected) - set(ours)) == []
    assert sorted(set(ours) - set(expected)) == []
    assert {k: v for k, v in ours.items() if expected[k] != v} == {}
    assert expected[FILE_PREFIX + "text_embed.text_embed.weight"] == [2546, 512]


def test_demo_file_has_the_real_key_form(tmp_path):
    path = write_demo_dit(tmp_path, DEMO_CONFIG, seed=0)
    assert path == tmp_path / DEMO_FILE
    keys = set(load_file(str(path)))
    with torch.device("meta"):
        dit_keys = set(manifest(DiT(DEMO_CONFIG)))
    real = _manifest("F5TTS_v1_Base")
    assert keys == {FILE_PREFIX + k for k in dit_keys} | set(real["bookkeeping"])
    assert all(k.startswith(FILE_PREFIX) for k in real["tensors"])
    assert json.loads((tmp_path / "config.json").read_text()) == DEMO_CONFIG.to_dict()


def test_demo_round_trip_is_strict_deterministic_and_non_zero(tmp_path):
    a = write_demo_dit(tmp_path / "a", DEMO_CONFIG, seed=0)
    b = write_demo_dit(tmp_path / "b", DEMO_CONFIG, seed=0)
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    c = load_file(str(write_demo_dit(tmp_path / "c", DEMO_CONFIG, seed=1)))
    assert not torch.equal(c[FILE_PREFIX + "proj_out.weight"], ta[FILE_PREFIX + "proj_out.weight"])
    for k, v in ta.items():
        if k.startswith(FILE_PREFIX):
            assert v.dtype == torch.float32 and torch.all(v != 0), k
    cfg = load_config("F5TTS_v1_Base", tmp_path / "a", None)
    assert cfg == DEMO_CONFIG
    model = load_dit(a, cfg, "cpu", torch.float32)
    sd = model.state_dict()
    assert all(torch.equal(sd[k[len(FILE_PREFIX):]], v) for k, v in ta.items() if k.startswith(FILE_PREFIX))
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def _training_pt(tmp_path: Path, cfg: F5Config, with_ema: bool) -> tuple[Path, dict]:
    src = load_dit_state_dict(write_demo_dit(tmp_path / "src", cfg, seed=2))
    ema = {"ema_model.transformer." + k: v for k, v in src.items()}
    ema.update({"initted": torch.tensor(True), "step": torch.tensor(10),
                "ema_model.mel_spec.mel_stft.mel_scale.fb": torch.zeros(513, 100)})
    # the online weights differ from the EMA ones (the fixed RoPE table stays as it is)
    online = {"transformer." + k: v if k.endswith("inv_freq") else v + 1.0 for k, v in src.items()}
    ckpt = {"model_state_dict": online, "update": 10, "optimizer_state_dict": {}}
    if with_ema:
        ckpt["ema_model_state_dict"] = ema
    path = tmp_path / "model_10.pt"
    torch.save(ckpt, path)
    return path, src


def test_pt_prefers_ema_weights(tmp_path):
    path, src = _training_pt(tmp_path, DEMO_CONFIG, with_ema=True)
    state = load_dit_state_dict(path)
    assert set(state) == set(src) and all(torch.equal(state[k], src[k]) for k in src)
    model = load_dit(path, DEMO_CONFIG, "cpu", torch.float32)
    assert torch.equal(model.proj_out.weight, src["proj_out.weight"])


def test_pt_without_ema_uses_model_state_dict(tmp_path):
    path, src = _training_pt(tmp_path, DEMO_CONFIG, with_ema=False)
    state = load_dit_state_dict(path)
    assert torch.equal(state["proj_out.weight"], src["proj_out.weight"] + 1.0)
    load_dit(path, DEMO_CONFIG, "cpu", torch.float32)


def test_mismatch_names_the_keys(tmp_path):
    path = write_demo_dit(tmp_path, DEMO_CONFIG, seed=0)
    with pytest.raises(ValueError, match=r"shape mismatch.*text_embed\.text_embed\.weight"):
        load_dit(path, replace(DEMO_CONFIG, text_num_embeds=DEMO_CONFIG.text_num_embeds + 5))
    with pytest.raises(ValueError, match=r"missing.*transformer_blocks\.2\."):
        load_dit(path, replace(DEMO_CONFIG, depth=3))
    with pytest.raises(ValueError, match=r"unexpected.*q_norm|missing.*q_norm"):
        load_dit(path, replace(DEMO_CONFIG, qk_norm="rms_norm"))
    with pytest.raises(ValueError, match="not found"):
        load_dit_state_dict(tmp_path / "nope.safetensors")
    (tmp_path / "x.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match="unsupported"):
        load_dit_state_dict(tmp_path / "x.bin")


def test_load_in_bfloat16(tmp_path):
    path = write_demo_dit(tmp_path, DEMO_CONFIG, seed=0)
    model = load_dit(path, DEMO_CONFIG, "cpu", torch.bfloat16)
    assert model.dtype == torch.bfloat16
