"""F5's `trtllm` runtime: the DiT and Vocos as engines, behind the torch modules' interfaces.

`build_engines f5` writes, per model, `ENGINES/f5/<model name>/`:

    dit.plan      TensorRT engine of `tts.f5.onnx_export.DiTGraph` (the CFG pair, padded layout)
    vocos.plan    TensorRT engine of `tts.f5.onnx_export.VocosGraph`
    dit.onnx, vocos.onnx

and records in `ENGINES/manifest.json` the DiT config it exported and the chunks per call it built for.

`EngineDiT` and `EngineVocos` stand in for `tts.f5.dit.DiT` and `tts.f5.vocos.Vocos` inside
`F5Pipeline`, so request grouping, chunk scheduling, seeds, the Euler loop and the Vocos batching
are the torch runtime's own code; only the heavy forward runs in an engine. The engine is anything
with `run(dict of tensors) -> dict of tensors`: `TensorRTEngine` (TensorRT's Python runtime,
imported only when an engine is opened) or `OnnxRuntimeEngine` (onnxruntime on the CPU over the
`.onnx` exports: how CPU tests prove this wiring, since TensorRT cannot be installed there).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from tts.f5.config import F5Config
from tts.f5.dit import DiT
from tts.f5.onnx_export import DIT_INPUTS, VOCOS_INPUTS
from tts.f5.vocos import Vocos

DIT_ENGINE, VOCOS_ENGINE = "dit.plan", "vocos.plan"
DIT_ONNX, VOCOS_ONNX = "dit.onnx", "vocos.onnx"


class EngineMissing(RuntimeError):
    """The engine runtime or an engine file is not there; the message says what to do."""


def require_tensorrt():
    """Import TensorRT's Python runtime, or explain at start-up why the `trtllm` runtime cannot run."""
    try:
        import tensorrt  # noqa: F401 - the NGC tritonserver TRT-LLM image ships it
    except ImportError as exc:
        raise EngineMissing(
            "--runtime trtllm needs TensorRT's Python runtime (`import tensorrt` failed: "
            f"{exc}). Run the GPU image (see the README, 'TensorRT path and Docker image'), or use "
            "--runtime torch.") from None
    return tensorrt


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
             trt.int32: torch.int32, trt.int64: torch.int64, trt.bool: torch.bool, trt.int8: torch.int8}
    if dtype not in table:
        raise EngineMissing(f"engine tensor type {dtype} has no torch equivalent here")
    return table[dtype]


class TensorRTEngine:
    """One serialized TensorRT engine with one execution context, run on torch's current CUDA stream.

    Inputs are cast to the engine's declared types and made contiguous on the engine's device;
    outputs are allocated from the shapes the context infers once every input shape is set."""

    def __init__(self, path: str | Path, device: torch.device | str):
        trt = require_tensorrt()
        self.path, self.device = Path(path), torch.device(device)
        if not self.path.is_file():
            raise EngineMissing(f"engine not found: {self.path} (build it: python -m build_engines f5 ...)")
        self._logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self.device):
            self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(self.path.read_bytes())
            if self.engine is None:
                raise EngineMissing(f"{self.path}: TensorRT could not deserialize it (built by another "
                                    f"TensorRT version or for another GPU? rebuild it in this image)")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_input[n]]
        self.outputs = [n for n in names if not is_input[n]]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}

    def run(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        missing = set(self.inputs) - set(inputs)
        if missing:
            raise ValueError(f"{self.path.name}: inputs {sorted(missing)} missing")
        keep = []  # the device copies must outlive the launch
        for name in self.inputs:
            t = inputs[name].to(device=self.device, dtype=self.dtypes[name]).contiguous()
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        out = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            buf = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, buf.data_ptr())
            out[name] = buf
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.path.name}: TensorRT execution failed (see the server log)")
        return out


class OnnxRuntimeEngine:
    """The same interface over an `.onnx` export with onnxruntime on the CPU (CPU checks only)."""

    _NP_TO_TORCH = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16,
                    "tensor(bfloat16)": torch.bfloat16, "tensor(int64)": torch.int64,
                    "tensor(int32)": torch.int32, "tensor(bool)": torch.bool}

    def __init__(self, path: str | Path, device: torch.device | str = "cpu"):
        from tts.f5.onnx_export import ort_session

        self.path, self.device = Path(path), torch.device(device)
        self.session = ort_session(self.path)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.dtypes = {i.name: self._NP_TO_TORCH[i.type] for i in self.session.get_inputs()}

    def run(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        feeds = {n: inputs[n].detach().to("cpu", self.dtypes[n]).contiguous().numpy() for n in self.inputs}
        return {n: torch.from_numpy(v).to(self.device) for n, v in zip(self.outputs, self.session.run(None, feeds))}


#: Engine kinds: the serving runtime name -> (engine class, DiT file, Vocos file).
ENGINE_KINDS = {"trtllm": (TensorRTEngine, DIT_ENGINE, VOCOS_ENGINE),
                "onnx": (OnnxRuntimeEngine, DIT_ONNX, VOCOS_ONNX)}


class EngineDiT:
    """`DiT`'s interface for `tts.f5.sampler.sample` (`cfg`, `dtype`, `embed_text`, call) with the
    velocity network in an engine. The text embedding (once per request, a few ConvNeXt blocks)
    stays a torch module on the device: only `text_embed` of the loaded DiT is kept."""

    def __init__(self, engine, dit: DiT, device: torch.device | str):
        if list(engine.inputs) != list(DIT_INPUTS):
            raise EngineMissing(f"DiT engine inputs {engine.inputs} differ from {list(DIT_INPUTS)}: rebuild it")
        self.engine, self.cfg = engine, dit.cfg
        self.device = torch.device(device)
        self.text_embed = dit.text_embed.to(self.device)
        self._dtype = dit.dtype

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def embed_text(self, text_ids: Tensor, seq_lens: Tensor, frames: int | None = None) -> tuple[Tensor, Tensor]:
        # DiT.embed_text reads only `cfg` and `text_embed`, which this object carries
        return DiT.embed_text(self, text_ids, seq_lens, frames)  # type: ignore[arg-type]

    def __call__(self, x: Tensor, cond: Tensor, text_cond: Tensor, text_uncond: Tensor, time: Tensor,
                 mask: Tensor) -> tuple[Tensor, Tensor]:
        """As `DiT.forward`: x, cond [B, T, mel]; text_* [B, T, text_dim]; time [B]; mask [B, T] bool."""
        out = self.engine.run({"x": x.float(), "cond": cond.float(), "text_cond": text_cond,
                               "text_uncond": text_uncond, "time": time.float(), "mask": mask})
        return out["pred"].to(x.device), out["null"].to(x.device)


class EngineVocos:
    """`Vocos`'s interface for the pipeline (`config`, `decode`, `decode_items`) over an engine of
    `VocosGraph` (padded batch with per-item lengths)."""

    def __init__(self, engine, config, device: torch.device | str):
        if list(engine.inputs) != list(VOCOS_INPUTS):
            raise EngineMissing(f"Vocos engine inputs {engine.inputs} differ from {list(VOCOS_INPUTS)}: rebuild it")
        self.engine, self.config, self.device = engine, config, torch.device(device)

    def decode(self, mel: Tensor) -> Tensor:
        """log-mel [B, 100, T] -> float32 audio [B, (T - 1) * 256]."""
        lengths = torch.full((mel.shape[0],), mel.shape[2], dtype=torch.int64)
        return self.engine.run({"mel": mel.float(), "lengths": lengths})["audio"]

    def decode_items(self, mels: list[Tensor]) -> list[Tensor]:
        """Each mel [100, T_i] -> audio [(T_i - 1) * 256]: one padded engine call for all."""
        if not mels:
            return []
        lens = [int(m.shape[-1]) for m in mels]
        batch = torch.zeros(len(mels), self.config.input_channels, max(lens), device=mels[0].device)
        for i, m in enumerate(mels):
            batch[i, :, : lens[i]] = m.float()
        audio = self.engine.run({"mel": batch, "lengths": torch.tensor(lens, dtype=torch.int64)})["audio"]
        hop = self.config.hop_length
        return [audio[i, : (n - 1) * hop] for i, n in enumerate(lens)]


def engine_dir(engines_root: str | Path, model_name: str) -> Path:
    """Where `build_engines f5` puts one model's engines (`tts.engine_layout`)."""
    from tts.engine_layout import f5_dir

    return f5_dir(engines_root, model_name)


def built_settings(engines_root: str | Path) -> dict:
    """What `build_engines` recorded for the F5 engines (`ENGINES/manifest.json`): the exported DiT
    `config` and the build's `max_batch` (chunks per engine call); {} when there is no manifest."""
    from tts.engine_layout import MANIFEST

    path = Path(engines_root) / MANIFEST
    if not path.is_file():
        return {}
    stages = json.loads(path.read_text()).get("stages", {})
    return {"config": stages.get("f5-export", {}).get("config"),
            "max_batch": stages.get("f5-build", {}).get("settings", {}).get("max_batch")}


def load_engine_modules(kind: str, engines_root: str | Path, model_name: str, dit: DiT, vocos: Vocos,
                        device: torch.device | str) -> tuple[EngineDiT, EngineVocos]:
    """(EngineDiT, EngineVocos) for a pipeline whose torch modules were just loaded (`dit`, `vocos`:
    their configs, and the DiT's text embedding, are what the engines need besides the files).
    Fails at start-up, with what to run, when the runtime or a file is missing."""
    if kind not in ENGINE_KINDS:
        raise ValueError(f"unknown engine runtime {kind!r}; known: {sorted(ENGINE_KINDS)}")
    cls, dit_file, vocos_file = ENGINE_KINDS[kind]
    folder = engine_dir(engines_root, model_name)
    for name in (dit_file, vocos_file):
        if not (folder / name).is_file():
            raise EngineMissing(f"{folder / name} is missing: build the F5 engines first "
                                f"(python -m build_engines f5 --checkpoints DIR --out {engines_root})")
    built = built_settings(engines_root)
    if built.get("config") is not None and F5Config.from_dict(built["config"]) != dit.cfg:
        raise EngineMissing(f"{folder}: the engines were built for another DiT config ({built['config']}); "
                            f"rebuild them")
    dit_engine = cls(folder / dit_file, device)
    vocos_engine = cls(folder / vocos_file, device)
    return EngineDiT(dit_engine, dit, device), EngineVocos(vocos_engine, vocos.config, device)
