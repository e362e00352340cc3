"""build_engines/ on the CPU: the Qwen2 -> TensorRT-LLM checkpoint conversion (names, shapes, dtypes,
values, and logits through TensorRT-LLM's module semantics), the trtexec / trtllm-build command lines,
the dry-run plan, skip/rebuild from the manifest (fake build stages), the rendered `runtime=trtllm`
repository, and the start-up error where TensorRT is missing. No engine is built here."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from build_engines import f5 as f5_stage
from build_engines import manifest as mf
from build_engines import plan as P
from build_engines import qwen2
from build_engines import spark as spark_stage
from tests.test_spark_fixtures import demo_checkpoint
from tests.test_spark_trtllm import TEMPLATE_INPUTS, TEMPLATE_OUTPUTS


@pytest.fixture(scope="module")
def llm_dir() -> Path:
    return demo_checkpoint() / "LLM"


def _hf(llm_dir):
    return json.loads((llm_dir / "config.json").read_text())


def test_qwen2_checkpoint_names_shapes_dtypes(llm_dir, tmp_path):
    cfg = qwen2.convert(llm_dir, tmp_path, "bf16")
    from safetensors.torch import load_file

    w = load_file(str(tmp_path / "rank0.safetensors"))
    hf = _hf(llm_dir)
    h, nh, nkv, inter, v = hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"], \
        hf["intermediate_size"], hf["vocab_size"]
    d = h // nh
    expected = {"transformer.vocab_embedding.weight": (v, h), "transformer.ln_f.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(hf["num_hidden_layers"]):
        p = f"transformer.layers.{i}."
        expected.update({p + "input_layernorm.weight": (h,), p + "post_layernorm.weight": (h,),
                         p + "attention.qkv.weight": ((nh + 2 * nkv) * d, h),
                         p + "attention.qkv.bias": ((nh + 2 * nkv) * d,),
                         p + "attention.dense.weight": (h, nh * d), p + "mlp.fc.weight": (inter, h),
                         p + "mlp.gate.weight": (inter, h), p + "mlp.proj.weight": (h, inter)})
    assert {k: tuple(t.shape) for k, t in w.items()} == expected
    assert all(t.dtype == torch.bfloat16 for t in w.values())
    written = json.loads((tmp_path / "config.json").read_text())
    assert written == cfg and cfg["architecture"] == "Qwen2ForCausalLM" and cfg["qwen_type"] == "qwen2"
    assert cfg["dtype"] == "bfloat16" and cfg["num_key_value_heads"] == nkv and cfg["head_size"] == d
    assert cfg["position_embedding_type"] == "rope_gpt_neox" and cfg["attn_bias"] and not cfg["mlp_bias"]
    assert cfg["mapping"] == {"world_size": 1, "tp_size": 1, "pp_size": 1}


def test_qwen2_checkpoint_values(llm_dir, tmp_path):
    qwen2.convert(llm_dir, tmp_path, "fp32")
    from safetensors.torch import load_file

    w = load_file(str(tmp_path / "rank0.safetensors"))
    hf_state = qwen2.read_hf_state(llm_dir)
    a = "model.layers.1.self_attn."
    assert torch.equal(w["transformer.layers.1.attention.qkv.weight"],
                       torch.cat([hf_state[a + n + "_proj.weight"] for n in "qkv"]))
    assert torch.equal(w["transformer.layers.1.mlp.fc.weight"], hf_state["model.layers.1.mlp.gate_proj.weight"])
    assert torch.equal(w["transformer.layers.1.mlp.gate.weight"], hf_state["model.layers.1.mlp.up_proj.weight"])
    assert "lm_head.weight" not in hf_state  # tied, as published
    assert torch.equal(w["lm_head.weight"], hf_state["model.embed_tokens.weight"])


def test_converted_checkpoint_gives_the_hf_models_logits(llm_dir, tmp_path):
    """TensorRT-LLM's module semantics over the converted tensors reproduce transformers' Qwen2."""
    from safetensors.torch import load_file
    from transformers import Qwen2ForCausalLM

    cfg = qwen2.convert(llm_dir, tmp_path, "fp32")
    w = load_file(str(tmp_path / "rank0.safetensors"))
    ids = [5, 17, 301, 42, 9, 1000, 77]
    model = Qwen2ForCausalLM.from_pretrained(str(llm_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    out = qwen2.reference_logits(w, cfg, ids)
    assert (out - ref).abs().max() <= 1e-4


def test_converter_refuses_other_models(llm_dir):
    hf = dict(_hf(llm_dir), model_type="llama")
    with pytest.raises(ValueError, match="only qwen2"):
        qwen2.trtllm_config(hf, "bfloat16")


def test_trtllm_build_command():
    cmd = spark_stage.trtllm_build_command("trtllm-build", "/e/ck", "/e/eng")
    flags = dict(a.split("=", 1) for a in cmd[1:])
    assert cmd[0] == "trtllm-build"
    assert flags["--checkpoint_dir"] == "/e/ck" and flags["--output_dir"] == "/e/eng"
    assert flags["--max_batch_size"] == "16" and flags["--max_input_len"] == "2048"
    # more than upstream's 2,560-token cache, and room for 3,000 new tokens after the longest prompt
    assert int(flags["--max_seq_len"]) > 2560 and int(flags["--max_seq_len"]) - int(flags["--max_input_len"]) >= 3000
    assert int(flags["--max_num_tokens"]) >= int(flags["--max_input_len"])
    assert flags["--gemm_plugin"] == flags["--gpt_attention_plugin"] == "bfloat16"
    assert flags["--remove_input_padding"] == "enable" and flags["--kv_cache_type"] == "paged"
    assert flags["--use_paged_context_fmha"] == "enable" and flags["--context_fmha"] == "enable"
    fp16 = dict(a.split("=", 1) for a in spark_stage.trtllm_build_command("b", "c", "e", "fp16", max_batch=4)[1:])
    assert fp16["--gemm_plugin"] == "float16" and fp16["--max_batch_size"] == "4"
    with pytest.raises(ValueError):
        spark_stage.trtllm_build_command("b", "c", "e", max_input_len=6000, max_seq_len=5120)


def test_trtexec_commands_carry_the_profiles():
    shapes = f5_stage.dit_shapes(max_batch=8, max_frames=4096, mel_dim=100, text_dim=512)
    cmd = f5_stage.trtexec_command("trtexec", Path("d.onnx"), Path("d.plan"), shapes)
    assert cmd[:4] == ["trtexec", "--onnx=d.onnx", "--saveEngine=d.plan", "--stronglyTyped"]
    by_flag = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in cmd[1:] if "=" in a}
    assert by_flag["--minShapes"].startswith("x:1x16x100,") and "text_cond:1x16x512" in by_flag["--minShapes"]
    assert "x:8x4096x100" in by_flag["--maxShapes"] and "mask:8x4096" in by_flag["--maxShapes"]
    assert "time:8" in by_flag["--maxShapes"] and "x:4x1024x100" in by_flag["--optShapes"]
    vocos = f5_stage.profile_flags(f5_stage.vocos_shapes(8, 4096, 100))
    assert vocos[0] == "--minShapes=mel:1x100x2,lengths:1" and vocos[2] == "--maxShapes=mel:8x100x4096,lengths:8"


def test_dry_run_prints_every_stage_and_command(tmp_path, capsys):
    from build_engines.__main__ import main

    out = tmp_path / "engines"
    assert main(["all", "--model", "all", "--out", str(out), "--demo-weights", "--data-dir", str(tmp_path / "d"),
                 "--dry-run"]) == 0
    text = capsys.readouterr().out
    for stage in P.STAGES:
        assert f"[{stage}]" in text
    assert text.count("trtexec --onnx=") == 2 and "trtllm-build --checkpoint_dir=" in text
    assert "would run: f5-export, f5-build, spark-convert, spark-build, render" in text
    assert not out.exists()  # nothing executed


def test_single_stage_and_family_targets(tmp_path):
    from build_engines.__main__ import options_from, parse_args

    opts, only = options_from(parse_args(["spark-build", "--out", str(tmp_path)]))
    assert opts.model == "spark" and only == ("spark-build",)
    opts, only = options_from(parse_args(["f5", "--out", str(tmp_path), "--max-batch", "4"]))
    assert opts.model == "f5" and only is None and opts.f5_max_batch == 4 and opts.spark_max_batch == 4


def _fake_stage(tmp_path, calls, settings=None):
    src, dst = tmp_path / "input.bin", tmp_path / "out" / "product.bin"

    def action():
        calls.append("action")
        dst.write_bytes(src.read_bytes()[::-1])
        return {"note": "fake"}

    return P.Stage("fake", "a fake build", settings or {"precision": "bf16"}, [src], [dst], action=action), src, dst


def test_stage_runs_when_absent_skips_when_unchanged_and_reruns_on_change(tmp_path):
    calls, logs = [], []
    stage, src, dst = _fake_stage(tmp_path, calls)
    src.write_bytes(b"weights v1")
    out = tmp_path / "engines"
    assert P.run_plan([stage], out, log=logs.append) == ["fake"] and calls == ["action"]
    record = mf.load(out)["stages"]["fake"]
    assert record["note"] == "fake" and record["settings"] == {"precision": "bf16"}
    assert list(record["inputs"].values())[0]["sha256"] and record["versions"]["python"]
    assert P.run_plan([stage], out, log=logs.append) == [] and calls == ["action"]  # up to date
    assert "[fake] up to date, skipped" in logs
    src.write_bytes(b"weights v2")  # new weights: rebuilt
    assert P.run_plan([stage], out, log=logs.append) == ["fake"] and len(calls) == 2
    assert any("inputs changed" in line for line in logs)
    dst.unlink()  # a lost output: rebuilt
    assert P.run_plan([stage], out, log=logs.append) == ["fake"] and len(calls) == 3
    other, _, _ = _fake_stage(tmp_path, calls, {"precision": "fp16"})  # other settings: rebuilt
    assert P.run_plan([other], out, log=logs.append) == ["fake"] and len(calls) == 4
    assert P.run_plan([other], out, force=True, log=logs.append) == ["fake"] and len(calls) == 5


def test_build_stages_record_the_tensorrt_versions(tmp_path):
    """A new image's TensorRT / TensorRT-LLM changes the build stages' settings: they rebuild."""
    opts = P.Options(checkpoints=None, out=tmp_path, demo_weights=True, data_dir=tmp_path / "d")
    stages = {s.name: s for s in P.make_plan(opts, log=lambda m: None)}
    assert "tensorrt" in stages["f5-build"].settings
    assert {"tensorrt", "tensorrt_llm"} <= set(stages["spark-build"].settings)


def test_command_stage_runs_its_commands_and_stops_on_failure(tmp_path):
    src = tmp_path / "model.onnx"
    src.write_bytes(b"onnx")
    seen = []

    class Result:
        def __init__(self, code):
            self.returncode = code

    stage = P.Stage("build", "engines", {}, [src], [tmp_path / "x.plan"], command=["trtexec", "--a"],
                    extra={"then": ["trtexec", "--b"]})
    with pytest.raises(SystemExit, match="exit code 3"):
        P.run_plan([stage], tmp_path / "o", run=lambda cmd: (seen.append(cmd), Result(3 if cmd[1] == "--b" else 0))[1])
    assert seen == [["trtexec", "--a"], ["trtexec", "--b"]]
    assert "build" not in mf.load(tmp_path / "o")["stages"]  # a failed stage is not recorded


def test_file_digest_reuses_a_matching_record(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    rec = mf.describe_files([f])[str(f)]
    assert mf.file_digest(f, dict(rec, sha256="cached")) == "cached"  # same size and mtime: not re-read
    assert mf.file_digest(f, dict(rec, bytes=4, sha256="cached")) == rec["sha256"]


# -- the rendered repository for runtime=trtllm ---------------------------------------------------

def _fake_engines(root: Path, f5_model: str) -> Path:
    eng = root / "spark" / "engine"
    eng.mkdir(parents=True)
    (eng / "config.json").write_text(json.dumps({"build_config": {"max_batch_size": 16, "max_seq_len": 5120}}))
    (eng / "rank0.engine").write_bytes(b"engine")
    f5 = root / "f5" / f5_model
    f5.mkdir(parents=True)
    for name in ("dit.plan", "vocos.plan"):
        (f5 / name).write_bytes(b"plan")
    return root


def _parse(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_rendered_trtllm_repository(tmp_path):
    from studio.server import FAMILY_MODELS, render_model_repository
    from studio.weights import resolve_f5, resolve_spark
    from tritonclient.grpc import model_config_pb2

    data = tmp_path / "data"
    weights = {"f5": resolve_f5(data, demo=True, log=lambda m: None),
               "spark": resolve_spark(data, demo=True, log=lambda m: None)}
    engines = _fake_engines(tmp_path / "engines", weights["f5"].paths["model_name"])
    repo = tmp_path / "repo"
    names = render_model_repository(repo, weights, gpus=[0, 1], front_instances=4, runtime="trtllm",
                                    engines_dir=engines)
    assert set(names) == set(FAMILY_MODELS["f5"] + FAMILY_MODELS["spark"]) | {"spark_trtllm"}
    for name in names:
        text = (repo / name / "config.pbtxt").read_text()
        assert "${" not in text, name
        cfg = _parse(repo / name / "config.pbtxt")
        assert cfg.name == name and (repo / name / "1").is_dir()
        if cfg.backend == "python":
            assert (repo / name / "1" / "model.py").is_file()
            params = {k: v.string_value for k, v in cfg.parameters.items()}
            assert Path(params["project_root"]).is_dir()
            for key in ("checkpoint", "vocab", "vocos_dir", "model_dir"):
                if key in params:
                    assert Path(params[key]).exists(), (name, key)
            if name in ("f5_engine", "spark_llm"):
                assert params["runtime"] == "trtllm" and params["engines_dir"] == str(engines)
    llm = _parse(repo / "spark_trtllm" / "config.pbtxt")
    assert llm.backend == "tensorrtllm" and llm.model_transaction_policy.decoupled
    assert llm.max_batch_size == 16
    names_types = {i.name: (model_config_pb2.DataType.Name(i.data_type), list(i.dims), i.optional) for i in llm.input}
    assert names_types == TEMPLATE_INPUTS  # input by input: name, type, dims, optional
    assert {o.name: (model_config_pb2.DataType.Name(o.data_type), list(o.dims)) for o in llm.output} == TEMPLATE_OUTPUTS
    params = {k: v.string_value for k, v in llm.parameters.items()}
    assert params["gpt_model_type"] == "inflight_fused_batching"
    assert Path(params["gpt_model_path"]) == engines / "spark" / "engine" and Path(params["gpt_model_path"]).is_dir()
    assert params["max_tokens_in_paged_kv_cache"] == str(16 * 5120) and params["gpu_device_ids"] == "0,1"
    assert params["enable_kv_cache_reuse"] == "true" and params["exclude_input_in_output"] == "true"
    # the torch runtime renders no TensorRT-LLM model
    torch_repo = tmp_path / "torch"
    assert "spark_trtllm" not in render_model_repository(torch_repo, weights, gpus=[], front_instances=4)


def test_trtllm_runtime_is_refused_at_start_up_where_tensorrt_is_missing(tmp_path):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    from studio.runtimes import RuntimeUnavailable, check_runtime
    from studio.server import ServerStartError, TritonServer

    with pytest.raises(RuntimeUnavailable, match="TensorRT's Python runtime is not installed"):
        check_runtime("trtllm", tmp_path, ["f5"], "F5TTS_v1_Base")
    with pytest.raises(RuntimeUnavailable, match="tensorrtllm"):
        check_runtime("trtllm", tmp_path, ["spark"], "F5TTS_v1_Base")
    check_runtime("torch", None, ["f5", "spark"], "F5TTS_v1_Base")
    server = TritonServer(tmp_path / "data", runtime="trtllm", engines_dir=tmp_path, gpus=[], demo_weights=True,
                          no_download=True)
    with pytest.raises(ServerStartError, match="--runtime trtllm"):
        server.start(timeout_s=30)
    assert server.status()["state"] == "failed" and server._proc is None
