"""tts/f5/vocos.py: published key layout (manifest), loading, demo weights, decode shapes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tts.f5 import mel as mel_mod
from tts.f5 import vocos as V

MANIFEST = Path(__file__).resolve().parent / "data" / "vocos_manifest.json"


def manifest() -> dict:
    return json.loads(MANIFEST.read_text())


def shapes(state: dict) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in state.items()}


def test_full_config_matches_published_layout():
    """At the published config, our keys and shapes are the file's, less the feature-extractor buffers."""
    m = manifest()
    expected = {k: v["shape"] for k, v in m["tensors"].items()}
    cfg = V.VocosConfig.from_yaml(m["config"])
    assert cfg == V.VocosConfig()
    with torch.device("meta"):
        model = V.Vocos(cfg)
    ours = shapes(model.state_dict())
    ignored = {k: s for k, s in expected.items() if k.startswith(V.IGNORED_PREFIXES)}
    assert set(ignored) == {"feature_extractor.mel_spec.spectrogram.window", "feature_extractor.mel_spec.mel_scale.fb"}
    assert ours == {k: s for k, s in expected.items() if k not in ignored}
    assert list(ours) == [k for k in expected if k not in ignored]  # same order too
    assert sum(p.numel() for p in model.parameters()) == m["num_parameters"]
    # the demo writer's feature-extractor buffers have the published shapes
    assert shapes(V.feature_extractor_buffers(cfg)) == ignored


def test_tiny_demo_has_the_published_key_names(tmp_path):
    V.write_demo_vocos(tmp_path, seed=0, tiny=True)
    state = torch.load(tmp_path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    n_layers = V.DEMO_CONFIG.num_layers
    published = [k for k in manifest()["tensors"]
                 if not k.startswith("backbone.convnext.") or int(k.split(".")[2]) < n_layers]
    assert list(state) == published  # same names and order, fewer ConvNeXt blocks
    assert all(v.dtype == torch.float32 for v in state.values())
    assert state["feature_extractor.mel_spec.mel_scale.fb"].shape == (513, 100)
    assert state["head.out.weight"].shape == (1026, V.DEMO_CONFIG.dim)
    cfg = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert cfg["head"]["init_args"] == {"dim": V.DEMO_CONFIG.dim, "n_fft": 1024, "hop_length": 256, "padding": "center"}
    assert cfg["backbone"]["init_args"]["input_channels"] == 100


def test_demo_is_deterministic_and_noise_like(tmp_path):
    V.write_demo_vocos(tmp_path / "a", seed=0)
    V.write_demo_vocos(tmp_path / "b", seed=0)
    V.write_demo_vocos(tmp_path / "c", seed=1)
    a, b, c = (V.Vocos.from_dir(tmp_path / n) for n in "abc")
    t = torch.arange(48000) / 24000
    wav = (0.2 * torch.sin(2 * torch.pi * 220 * t) * (1 + torch.sin(2 * torch.pi * 3 * t)))[None]
    mel = mel_mod.log_mel_spectrogram(wav)
    out = a.decode(mel)
    assert out.shape == (1, (mel.shape[-1] - 1) * 256) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    rms = float(out.pow(2).mean().sqrt())
    assert 0.01 < rms < 0.5 and float(out.abs().max()) < 1.0
    torch.testing.assert_close(b.decode(mel), out, rtol=0, atol=0)
    assert not torch.allclose(c.decode(mel), out)
    x = out[0].numpy().astype(np.float64)
    hop_corr = np.corrcoef(x[:-256], x[256:])[0, 1]
    assert abs(hop_corr) < 0.3  # not a buzz that repeats every hop


def test_decode_batch_equals_single_and_length(tmp_path):
    V.write_demo_vocos(tmp_path, seed=0)
    model = V.Vocos.from_dir(tmp_path)
    mel = torch.randn(3, 100, 40) - 5
    out = model.decode(mel)
    assert out.shape == (3, 39 * 256) and model.output_length(40) == 39 * 256
    torch.testing.assert_close(model.decode(mel[1:2]), out[1:2], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"\[B, 100, T\]"):
        model.decode(torch.zeros(1, 80, 10))
    with pytest.raises(ValueError, match="at least 2"):
        model.decode(torch.zeros(1, 100, 1))


def test_decode_matches_explicit_math(tmp_path):
    """Head = exp magnitude (clipped at 100) with cos/sin phase through a centred ISTFT."""
    V.write_demo_vocos(tmp_path, seed=3)
    model = V.Vocos.from_dir(tmp_path)
    mel = torch.randn(1, 100, 12) - 4
    with torch.inference_mode():
        feats = model.backbone(mel)
        raw = model.head.out(feats).transpose(1, 2)  # [1, 1026, T]
        mag = raw[:, :513].exp().clamp(max=100.0)
        spec = mag * torch.exp(1j * raw[:, 513:])
        ref = torch.istft(spec, 1024, 256, 1024, torch.hann_window(1024), center=True)
    torch.testing.assert_close(model.decode(mel), ref, atol=1e-5, rtol=1e-5)


def test_batched_istft_equals_torch_istft_per_item():
    """`centered_istft` with per-item frame counts: each item equals torch.istft of its own frames
    (the reference vocoders use), and nothing past its length is non-zero."""
    istft = V.CenteredISTFT(1024, 256)
    gen = torch.Generator().manual_seed(0)
    spec = torch.complex(torch.randn(3, 513, 40, generator=gen), torch.randn(3, 513, 40, generator=gen))
    lens = torch.tensor([40, 17, 2])
    out = istft(spec, lens)
    assert out.shape == (3, 39 * 256)
    for i, n in enumerate(lens.tolist()):
        ref = torch.istft(spec[i:i + 1, :, :n], 1024, 256, 1024, torch.hann_window(1024), center=True)[0]
        torch.testing.assert_close(out[i, : len(ref)], ref, atol=1e-6, rtol=1e-5)
        assert out[i, len(ref):].abs().max() == 0 if len(ref) < out.shape[1] else True
    torch.testing.assert_close(istft(spec), torch.istft(spec, 1024, 256, 1024, torch.hann_window(1024), center=True),
                               atol=1e-6, rtol=1e-5)


def test_istft_refuses_a_window_without_overlap():
    with pytest.raises(ValueError, match="overlap-add has zeros"):
        V.CenteredISTFT(64, 128)  # hop larger than the window: gaps between frames


def test_loader_errors_are_clear(tmp_path):
    V.write_demo_vocos(tmp_path, seed=0)
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    # feature-extractor buffers are optional
    slim = {k: v for k, v in state.items() if not k.startswith("feature_extractor.")}
    torch.save(slim, tmp_path / "pytorch_model.bin")
    V.Vocos.from_dir(tmp_path)
    broken = dict(slim)
    del broken["backbone.convnext.1.pwconv2.bias"]
    broken["head.out.weight"] = torch.zeros(1026, 7)
    broken["extra.thing"] = torch.zeros(1)
    torch.save(broken, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError) as err:
        V.Vocos.from_dir(tmp_path)
    msg = str(err.value)
    assert "missing" in msg and "pwconv2.bias" in msg and "unexpected" in msg and "extra.thing" in msg
    assert "head.out.weight: file (1026, 7) vs model (1026, 64)" in msg
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(ValueError, match="weights not found"):
        V.Vocos.from_dir(tmp_path)
    with pytest.raises(ValueError, match="config not found"):
        V.Vocos.from_dir(tmp_path / "nowhere")


def test_config_rejections():
    good = V.VocosConfig().to_yaml()
    assert V.VocosConfig.from_yaml(good) == V.VocosConfig()
    assert V.VocosConfig.from_yaml({"model": {"init_args": good}}) == V.VocosConfig()  # training-config layout
    bad = json.loads(json.dumps(good))
    bad["head"]["init_args"]["padding"] = "same"
    with pytest.raises(ValueError, match="padding"):
        V.VocosConfig.from_yaml(bad)
    bad = json.loads(json.dumps(good))
    bad["feature_extractor"]["class_path"] = "vocos.feature_extractors.EncodecFeatures"
    with pytest.raises(ValueError, match="MelSpectrogramFeatures"):
        V.VocosConfig.from_yaml(bad)
    with pytest.raises(ValueError, match="not a Vocos config"):
        V.VocosConfig.from_yaml({"foo": 1})


def test_half_precision_weights_decode_in_float32(tmp_path):
    V.write_demo_vocos(tmp_path, seed=0)
    model = V.Vocos.from_dir(tmp_path, dtype=torch.bfloat16)
    assert model.head.out.weight.dtype == torch.bfloat16 and model.head.istft.window.dtype == torch.float32
    out = model.decode(torch.randn(1, 100, 20) - 5)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
