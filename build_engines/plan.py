"""The build plan: stages with their inputs, outputs, settings and command; running it with skips."""

from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from build_engines import f5 as f5_stage
from build_engines import manifest as mf
from build_engines import spark as spark_stage
from tts import engine_layout as layout

FAMILIES = ("f5", "spark")
STAGES = ("f5-export", "f5-build", "spark-convert", "spark-build", "render")
#: F5 chunks per engine call by default: the torch pipeline's batch (`F5Pipeline(max_batch=8)`).
F5_MAX_BATCH = 8


@dataclass(frozen=True)
class Options:
    checkpoints: Path | None  # DIR with F5TTS_v1_Base/, vocos-mel-24khz/, Spark-TTS-0.5B/ (None: HF cache/download)
    out: Path  # engines folder (tts.engine_layout)
    model: str = "all"  # f5 | spark | all
    precision: str = "bf16"  # bf16 | fp16 (DiT and LLM; Vocos stays float32)
    max_batch: int | None = None  # F5 chunks per call (default 8) and Spark slots (default 16)
    max_frames: int = 4096  # F5 longest item (prompt + generated), frames
    f5_model: str = "F5TTS_v1_Base"
    spark_max_input_len: int = spark_stage.MAX_INPUT_LEN
    spark_max_seq_len: int = spark_stage.MAX_SEQ_LEN
    data_dir: Path | None = None  # where downloads and demo weights go (studio's data folder)
    demo_weights: bool = False  # build from the tiny demo checkpoints (pipeline checks only)

    @property
    def families(self) -> tuple[str, ...]:
        return FAMILIES if self.model == "all" else (self.model,)

    @property
    def f5_max_batch(self) -> int:
        return self.max_batch or F5_MAX_BATCH

    @property
    def spark_max_batch(self) -> int:
        return self.max_batch or spark_stage.MAX_BATCH


@dataclass
class Stage:
    name: str
    what: str  # one line for people
    settings: dict
    inputs: list[Path]
    outputs: list[Path]
    command: list[str] | None = None  # a subprocess, or
    action: Callable[[], dict | None] | None = None  # a Python step (returns extra manifest fields)
    extra: dict = field(default_factory=dict)

    def shown(self) -> str:
        return shlex.join(self.command) if self.command else f"python: {self.what}"


def resolve_weights(opts: Options, family: str, log=print, dry_run: bool = False):
    """The family's checkpoint paths, as the studio resolves them (--checkpoints, HF cache, download).
    A dry run downloads nothing: weights not found yet are shown at their --checkpoints place."""
    from studio.config import default_data_dir
    from studio.weights import FamilyWeights, resolve_f5, resolve_spark

    data_dir = opts.data_dir or default_data_dir()
    if family == "f5":
        w = resolve_f5(data_dir, checkpoints=opts.checkpoints, model_name=opts.f5_model, demo=opts.demo_weights,
                       no_download=dry_run, log=log)
    else:
        w = resolve_spark(data_dir, checkpoints=opts.checkpoints, demo=opts.demo_weights, no_download=dry_run,
                          log=log)
    if w.demo and not opts.demo_weights:
        if dry_run:
            root = Path(opts.checkpoints or "CHECKPOINTS")
            log(f"{family}: weights not found yet ({w.reason}); a real run downloads them")
            if family == "f5":
                d = root / opts.f5_model
                return FamilyWeights("f5", False, "planned", {
                    "checkpoint": str(d / "model.safetensors"), "vocab": str(d / "vocab.txt"),
                    "vocos_dir": str(root / "vocos-mel-24khz"), "model_name": opts.f5_model})
            return FamilyWeights("spark", False, "planned", {"model_dir": str(root / "Spark-TTS-0.5B")})
        raise SystemExit(f"{family}: real weights not found ({w.reason}); give --checkpoints DIR or allow the "
                         f"download (python -m studio download {family})")
    return w


def f5_stages(opts: Options, weights) -> list[Stage]:
    p = weights.paths
    model_name = p.get("model_name", opts.f5_model)
    folder = layout.f5_dir(opts.out, model_name)
    dit_onnx, vocos_onnx = folder / "dit.onnx", folder / "vocos.onnx"
    settings = {"precision": opts.precision, "max_frames": opts.max_frames, "model_name": model_name}
    inputs = [Path(p["checkpoint"]), Path(p["vocab"]), Path(p["vocos_dir"])]

    def export():
        return f5_stage.export(Path(p["checkpoint"]), Path(p["vocab"]), Path(p["vocos_dir"]), model_name, folder,
                               opts.precision, opts.max_frames)

    stages = [Stage("f5-export", f"export {model_name}'s DiT ({opts.precision}) and Vocos (fp32) to ONNX in {folder}",
                    settings, inputs, [dit_onnx, vocos_onnx], action=export)]
    trtexec = f5_stage.find_trtexec()
    dims = _f5_dims(p, model_name)
    # an engine only loads in the TensorRT that built it: a new image's TensorRT means a rebuild
    build_settings = {**settings, "max_batch": opts.f5_max_batch, "tensorrt": mf.tool_versions()["tensorrt"]}
    cache = folder / "timing.cache"
    stages.append(Stage(
        "f5-build", "TensorRT engines for the DiT and Vocos", build_settings, [dit_onnx, vocos_onnx],
        [folder / "dit.plan", folder / "vocos.plan"],
        command=f5_stage.trtexec_command(trtexec, dit_onnx, folder / "dit.plan",
                                         f5_stage.dit_shapes(opts.f5_max_batch, opts.max_frames, *dims), cache),
        extra={"then": f5_stage.trtexec_command(trtexec, vocos_onnx, folder / "vocos.plan",
                                                f5_stage.vocos_shapes(opts.f5_max_batch, opts.max_frames, dims[0]),
                                                cache)}))
    return stages


def _f5_dims(paths: dict, model_name: str) -> tuple[int, int]:
    """(mel_dim, text_dim) of the model, from its config (no weights read)."""
    from tts.f5.config import load_config

    cfg = load_config(model_name, Path(paths["checkpoint"]).parent, 1)
    return cfg.mel_dim, cfg.text_dim


def spark_stages(opts: Options, weights) -> list[Stage]:
    llm = Path(weights.paths["model_dir"]) / "LLM"
    ck, eng = layout.spark_checkpoint_dir(opts.out), layout.spark_engine_dir(opts.out)
    settings = {"precision": opts.precision}

    def convert():
        from build_engines.qwen2 import convert as convert_llm

        cfg = convert_llm(llm, ck, opts.precision)
        return {"llm_config": cfg}

    versions = mf.tool_versions()
    build_settings = {**settings, "max_batch": opts.spark_max_batch, "max_input_len": opts.spark_max_input_len,
                      "max_seq_len": opts.spark_max_seq_len, "tensorrt": versions["tensorrt"],
                      "tensorrt_llm": versions["tensorrt_llm"]}
    return [
        Stage("spark-convert", f"convert {llm} (Hugging Face Qwen2) to a TensorRT-LLM checkpoint in {ck}",
              settings, [llm / "config.json"] + sorted(llm.glob("*.safetensors")),
              [ck / "config.json", ck / "rank0.safetensors"], action=convert),
        Stage("spark-build", "TensorRT-LLM engine for the Spark LLM", build_settings,
              [ck / "config.json", ck / "rank0.safetensors"], [eng / "config.json", eng / "rank0.engine"],
              command=spark_stage.trtllm_build_command(
                  spark_stage.find_trtllm_build(), ck, eng, opts.precision, opts.spark_max_batch,
                  opts.spark_max_input_len, opts.spark_max_seq_len)),
    ]


def render_stage(opts: Options, weights: dict) -> Stage:
    repo = Path(opts.out) / layout.REPOSITORY

    def render():
        import shutil

        from studio.server import render_model_repository

        shutil.rmtree(repo, ignore_errors=True)
        names = render_model_repository(repo, weights, gpus=[0], front_instances=16, runtime="trtllm",
                                        engines_dir=Path(opts.out))
        return {"models": names}

    inputs = [Path(opts.out) / "spark" / "engine" / "config.json"] if "spark" in weights else []
    return Stage("render", f"Triton model repository for --runtime trtllm in {repo}",
                 {"families": sorted(weights), "out": str(opts.out)}, inputs, [repo], action=render)


def make_plan(opts: Options, only: tuple[str, ...] | None = None, log=print, dry_run: bool = False) -> list[Stage]:
    """Every stage for `opts.families` (then render), or just the stages named in `only`."""
    weights = {fam: resolve_weights(opts, fam, log, dry_run) for fam in opts.families}
    stages: list[Stage] = []
    if "f5" in weights:
        stages += f5_stages(opts, weights["f5"])
    if "spark" in weights:
        stages += spark_stages(opts, weights["spark"])
    stages.append(render_stage(opts, weights))
    if only:
        unknown = set(only) - {s.name for s in stages}
        if unknown:
            raise SystemExit(f"stage(s) {sorted(unknown)} are not in the plan for --model {opts.model}")
        stages = [s for s in stages if s.name in only]
    return stages


def run_plan(stages: list[Stage], out: Path, dry_run: bool = False, force: bool = False, log=print,
             run=subprocess.run) -> list[str]:
    """Run each stage unless it is up to date; returns the names of the stages that ran (or would).

    `run` is `subprocess.run` (tests pass a fake). Each finished stage is recorded at once, so an
    interrupted build resumes at the stage that did not finish."""
    manifest = mf.load(out)
    ran = []
    for stage in stages:
        commands = [stage.command] + ([stage.extra["then"]] if "then" in stage.extra else []) if stage.command else []
        shown = [stage.shown()] if not commands else [shlex.join(c) for c in commands]
        if dry_run:
            log(f"[{stage.name}] {stage.what}")
            for line in shown:
                log(f"    {line}")
            ran.append(stage.name)
            continue
        record = manifest["stages"].get(stage.name)
        inputs = mf.describe_files([p for p in stage.inputs if Path(p).exists()], (record or {}).get("inputs"))
        missing = [str(p) for p in stage.inputs if not Path(p).exists()]
        if missing:
            raise SystemExit(f"[{stage.name}] inputs missing: {', '.join(missing)} (run the stages before it)")
        why = "forced" if force else mf.up_to_date(record, stage.settings, inputs, stage.outputs)
        if why is None:
            log(f"[{stage.name}] up to date, skipped")
            continue
        log(f"[{stage.name}] {stage.what} ({why})")
        for out_path in stage.outputs:
            Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        extra = {}
        if stage.action is not None:
            extra = stage.action() or {}
        for cmd in commands:
            log(f"    {shlex.join(cmd)}")
            result = run(cmd)
            if getattr(result, "returncode", 0) != 0:
                raise SystemExit(f"[{stage.name}] failed with exit code {result.returncode}: {shlex.join(cmd)}")
        manifest["stages"][stage.name] = mf.stage_record(stage.settings, inputs, stage.outputs,
                                                         commands[0] if commands else None,
                                                         {**extra, **({"then": commands[1:]} if len(commands) > 1
                                                                      else {})})
        mf.save(out, manifest)
        ran.append(stage.name)
    return ran


def options_dict(opts: Options) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()}


def print_to_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
