"""ONNX exports of F5's DiT and Vocos (tts/f5/onnx_export.py) under onnxruntime on the CPU, and the
engine runtime's wiring (tts/f5/trt_runner.py) driven by onnxruntime in place of TensorRT.

Tolerances (issue 18): one DiT forward within 1e-4, a whole 16-NFE sample within 1e-3 on the mel,
Vocos within 1e-4; fp32, tiny demo checkpoints."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from tts.f5 import onnx_export as ox  # noqa: E402
from tts.f5 import trt_runner as tr  # noqa: E402


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Demo checkpoint, its loaded DiT and Vocos, and both exports in the engine folder layout."""
    from tts.demo_weights import DEMO_F5_NAME, write_f5
    from tts.f5 import text as text_mod
    from tts.f5.checkpoint import load_dit
    from tts.f5.config import load_config
    from tts.f5.vocos import Vocos

    root = tmp_path_factory.mktemp("f5-onnx")
    ckpts, engines = root / "ckpts", root / "engines"
    write_f5(ckpts)
    model_dir = ckpts / DEMO_F5_NAME
    vocab = text_mod.load_vocab(model_dir / "vocab.txt")
    cfg = load_config(DEMO_F5_NAME, model_dir, len(vocab))
    checkpoint = next(model_dir.glob("*.safetensors"))
    dit = load_dit(checkpoint, cfg)
    vocos = Vocos.from_dir(ckpts / "vocos-mel-24khz")
    folder = tr.engine_dir(engines, DEMO_F5_NAME)
    ox.export_dit(dit, folder / tr.DIT_ONNX)
    ox.export_vocos(vocos, folder / tr.VOCOS_ONNX)
    return {"dit": dit, "vocos": vocos, "folder": folder, "engines": engines, "checkpoint": checkpoint,
            "vocab": model_dir / "vocab.txt", "vocos_dir": ckpts / "vocos-mel-24khz", "name": DEMO_F5_NAME}


@pytest.mark.parametrize("batch,frames", [(1, 9), (2, 48), (3, 100)])
def test_dit_forward_matches_torch(demo, batch, frames):
    """One CFG-pair forward, mixed item lengths, several (rows, frames) on one dynamic graph."""
    session = ox.ort_session(demo["folder"] / tr.DIT_ONNX)
    inputs = ox.dit_example_inputs(demo["dit"], batch, frames, seed=batch)
    with torch.no_grad():
        ref = demo["dit"](*[inputs[k] for k in ox.DIT_INPUTS])
    out = ox.run_ort(session, inputs)
    assert [o.shape for o in out] == [r.shape for r in ref] == [(batch, frames, 100)] * 2
    for o, r in zip(out, ref):
        assert ox.max_abs_diff(o, r) <= 1e-4


def test_dit_graph_io_names_and_dynamic_axes(demo):
    import onnx

    model = onnx.load(str(demo["folder"] / tr.DIT_ONNX))
    assert [i.name for i in model.graph.input] == list(ox.DIT_INPUTS)
    assert [o.name for o in model.graph.output] == list(ox.DIT_OUTPUTS)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims["x"][0] == dims["mask"][0] == dims["time"][0] and isinstance(dims["x"][0], str)  # rows
    assert dims["x"][1] == dims["text_cond"][1] and isinstance(dims["x"][1], str)  # frames
    assert dims["x"][2] == 100 and dims["text_cond"][2] == demo["dit"].cfg.text_dim
    assert {op.domain for op in model.opset_import if op.domain in ("", "ai.onnx")} and \
        max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) == ox.OPSET


def test_sixteen_step_sample_matches_torch(demo):
    """A whole 16-NFE EPSS sample (sway -1, cfg 2) through `EngineDiT` on onnxruntime vs the torch DiT."""
    from tts.f5.sampler import make_noise, sample

    dit = demo["dit"]
    engine_dit = tr.EngineDiT(tr.OnnxRuntimeEngine(demo["folder"] / tr.DIT_ONNX), dit, "cpu")
    lens, refs = [70, 52], [25, 18]
    frames = max(lens)
    cond = torch.zeros(2, frames, 100)
    noise = torch.zeros(2, frames, 100)
    gen = torch.Generator().manual_seed(3)
    for i, (n, r) in enumerate(zip(lens, refs)):
        cond[i, :r] = torch.randn(r, 100, generator=gen) - 4
        noise[i, :n] = make_noise(10 + i, n)
    ids = torch.full((2, 30), -1, dtype=torch.long)
    ids[0, :30] = torch.randint(0, dit.cfg.text_num_embeds, (30,), generator=gen)
    ids[1, :21] = torch.randint(0, dit.cfg.text_num_embeds, (21,), generator=gen)
    args = (cond, ids, torch.tensor(refs), torch.tensor(lens), noise, 16, 2.0, -1.0)
    ref = sample(dit, *args)
    out = sample(engine_dit, *args)
    assert ox.max_abs_diff(out, ref) <= 1e-3
    assert float(ref[:, 30:].abs().max()) > 0.1  # a real sample, not zeros


def test_vocos_export_matches_solo_decode(demo):
    """Padded batch with per-item lengths: each item equals its solo `Vocos.decode`, zero after."""
    vocos = demo["vocos"]
    session = ox.ort_session(demo["folder"] / tr.VOCOS_ONNX)
    inputs = ox.vocos_example_inputs(vocos, (61, 33, 2), seed=5)
    audio = ox.run_ort(session, inputs)[0]
    assert audio.shape == (3, 60 * 256)
    for i, n in enumerate(inputs["lengths"].tolist()):
        solo = vocos.decode(inputs["mel"][i: i + 1, :, :n])[0]
        assert ox.max_abs_diff(audio[i, : len(solo)], solo) <= 1e-4
        assert float(audio[i, len(solo):].abs().sum()) == 0.0


def test_vocos_graph_uses_no_fft_or_col2im(demo):
    """TensorRT runs what the graph holds: the inverse STFT is matmuls, pads, slices and adds."""
    import onnx

    ops = {n.op_type for n in onnx.load(str(demo["folder"] / tr.VOCOS_ONNX)).graph.node}
    assert "MatMul" in ops
    assert not ops & {"DFT", "STFT", "Col2Im", "ConvTranspose"}


def test_overlap_add_blocks_equals_fold():
    from tts.f5.vocos import overlap_add

    frames = torch.randn(3, 9, 1024)
    assert ox.max_abs_diff(ox.overlap_add_blocks(frames, 256), overlap_add(frames, 256)) <= 1e-5


def test_inverse_dft_bases_equal_irfft():
    window = torch.hann_window(1024)
    cos, sin = ox.inverse_dft_bases(1024, window)
    spec = torch.randn(4, 513, dtype=torch.complex64)
    ref = torch.fft.irfft(spec, n=1024) * window
    assert ox.max_abs_diff(spec.real @ cos - spec.imag @ sin, ref) <= 1e-5


def test_pipeline_on_engine_runtime_matches_torch(demo):
    """F5Pipeline with the engine runtime (onnxruntime engines) against the torch runtime: same chunk
    plan, seeds and batching; only the DiT and Vocos forwards run in the engines."""
    from tts.f5.pipeline import F5Options, F5Pipeline, synthesize_offline
    from tests.conftest import speech_like

    kwargs = dict(checkpoint=demo["checkpoint"], vocab=demo["vocab"], vocos_dir=demo["vocos_dir"],
                  model_name=demo["name"])
    torch_pipe = F5Pipeline(**kwargs)
    engine_pipe = F5Pipeline(**kwargs, runtime="onnx", engines_dir=demo["engines"])
    assert isinstance(engine_pipe.dit, tr.EngineDiT) and engine_pipe.fast is None
    wav = speech_like(2.0, 24000, seed=1)
    options = F5Options(nfe_steps=8, seed=7)
    text = "Hello there. This is a test of two chunks, with a comma."
    a, info_a = synthesize_offline(torch_pipe, torch_pipe.make_request(wav, "A short prompt.", text, options))
    b, info_b = synthesize_offline(engine_pipe, engine_pipe.make_request(wav, "A short prompt.", text, options))
    assert len(a) == len(b) and info_a["seed"] == info_b["seed"]
    assert np.abs(a - b).max() <= 1e-3


def test_trtllm_runtime_without_tensorrt_says_so(demo):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    from tts.f5.pipeline import F5Pipeline

    folder = demo["folder"]
    for name in (tr.DIT_ENGINE, tr.VOCOS_ENGINE):
        (folder / name).write_bytes(b"not an engine")
    with pytest.raises(tr.EngineMissing, match="--runtime trtllm needs TensorRT"):
        F5Pipeline(demo["checkpoint"], demo["vocab"], demo["vocos_dir"], demo["name"], runtime="trtllm",
                   engines_dir=demo["engines"])


def test_engines_built_for_fewer_chunks_cap_the_pipelines_batch(demo, tmp_path):
    import json
    import shutil

    from tts.f5.pipeline import F5Pipeline

    engines = tmp_path / "engines"
    shutil.copytree(demo["engines"], engines)
    (engines / "manifest.json").write_text(json.dumps({"stages": {
        "f5-export": {"config": demo["dit"].cfg.to_dict()}, "f5-build": {"settings": {"max_batch": 3}}}}))
    pipe = F5Pipeline(demo["checkpoint"], demo["vocab"], demo["vocos_dir"], demo["name"], runtime="onnx",
                      engines_dir=engines)
    assert pipe.max_batch == 3
    other = dict(demo["dit"].cfg.to_dict(), depth=demo["dit"].cfg.depth + 1)
    (engines / "manifest.json").write_text(json.dumps({"stages": {"f5-export": {"config": other}}}))
    with pytest.raises(tr.EngineMissing, match="another DiT config"):
        F5Pipeline(demo["checkpoint"], demo["vocab"], demo["vocos_dir"], demo["name"], runtime="onnx",
                   engines_dir=engines)


def test_missing_engine_names_the_build_command(tmp_path, demo):
    with pytest.raises(tr.EngineMissing, match="python -m build_engines f5"):
        tr.load_engine_modules("trtllm", tmp_path, demo["name"], demo["dit"], demo["vocos"], "cpu")
