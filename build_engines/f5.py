"""F5 stages: ONNX exports from `tts.f5`, then TensorRT engines with `trtexec`.

The DiT engine's profile spans chunks 1..max_batch (it runs 2 x chunks rows inside: the CFG pair)
and frames MIN_FRAMES..max_frames; Vocos the same chunks and 2..max_frames frames. `--stronglyTyped`
builds exactly the types the export holds: the DiT exported in bf16 (or fp16) keeps its float32
islands (rotary angles, time sinusoid, ODE inputs) in float32, which a weakly typed fp16 build
could demote; Vocos is exported and built in float32 (13.5 M parameters: cheap, and its inverse
STFT sums 1,024-point frames where half precision would cost audible accuracy).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tts.f5.onnx_export import DEFAULT_MAX_FRAMES, MIN_FRAMES

#: Most likely shape to tune for: 3 s prompt + 7 s of speech = 10 s = 938 frames -> 1024.
OPT_FRAMES = 1024
#: trtexec's builder workspace (MiB); the DiT at 8 chunks x 4096 frames needs ~2 GiB of scratch.
WORKSPACE_MIB = 8192
#: Where the NGC TensorRT images put trtexec when it is not on PATH.
TRTEXEC_FALLBACKS = ("/usr/src/tensorrt/bin/trtexec", "/usr/local/tensorrt/bin/trtexec", "/opt/tensorrt/bin/trtexec")


def find_trtexec() -> str:
    """$STUDIO_TRTEXEC, else trtexec on PATH, else the images' usual places (the name when none exists,
    so a dry run still prints the command)."""
    env = os.environ.get("STUDIO_TRTEXEC")
    if env:
        return env
    found = shutil.which("trtexec")
    if found:
        return found
    return next((p for p in TRTEXEC_FALLBACKS if Path(p).is_file()), "trtexec")


def _shape(dims: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in dims)


def profile_flags(shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]) -> list[str]:
    """--minShapes/--optShapes/--maxShapes from {input: (min dims, opt dims, max dims)}."""
    flags = []
    for i, flag in enumerate(("--minShapes", "--optShapes", "--maxShapes")):
        flags.append(f"{flag}=" + ",".join(f"{name}:{_shape(dims[i])}" for name, dims in shapes.items()))
    return flags


def dit_shapes(max_batch: int, max_frames: int, mel_dim: int, text_dim: int) -> dict:
    """Profile of the DiT engine's inputs (chunks, frames); opt at half the chunks and OPT_FRAMES."""
    lo, opt, hi = (1, MIN_FRAMES), (max(1, max_batch // 2), min(OPT_FRAMES, max_frames)), (max_batch, max_frames)
    three = lambda width: tuple((b, t, width) for b, t in (lo, opt, hi))  # noqa: E731
    two = tuple((b, t) for b, t in (lo, opt, hi))
    return {"x": three(mel_dim), "cond": three(mel_dim), "text_cond": three(text_dim), "text_uncond": three(text_dim),
            "time": tuple((b,) for b, _ in (lo, opt, hi)), "mask": two}


def vocos_shapes(max_batch: int, max_frames: int, mel_dim: int) -> dict:
    sizes = ((1, 2), (max(1, max_batch // 2), min(OPT_FRAMES, max_frames)), (max_batch, max_frames))
    return {"mel": tuple((b, mel_dim, t) for b, t in sizes), "lengths": tuple((b,) for b, _ in sizes)}


def trtexec_command(trtexec: str, onnx: Path, plan: Path, shapes: dict, timing_cache: Path | None = None) -> list[str]:
    cmd = [trtexec, f"--onnx={onnx}", f"--saveEngine={plan}", "--stronglyTyped",
           *profile_flags(shapes), f"--memPoolSize=workspace:{WORKSPACE_MIB}", "--skipInference"]
    if timing_cache is not None:
        cmd.append(f"--timingCacheFile={timing_cache}")
    return cmd


def export(checkpoint: Path, vocab: Path, vocos_dir: Path, model_name: str, out_dir: Path, precision: str,
           max_frames: int = DEFAULT_MAX_FRAMES) -> dict:
    """Load the DiT (in the build precision) and Vocos (float32) and write dit.onnx + vocos.onnx.
    Returns what the manifest records (the DiT config, shapes of the graphs)."""
    import torch

    from tts.f5 import onnx_export as ox
    from tts.f5 import text as text_mod
    from tts.f5.checkpoint import load_dit
    from tts.f5.config import load_config
    from tts.f5.trt_runner import DIT_ONNX, VOCOS_ONNX
    from tts.f5.vocos import Vocos

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    cfg = load_config(model_name, Path(checkpoint).parent, len(text_mod.load_vocab(vocab)))
    dit = load_dit(Path(checkpoint), cfg, "cpu", dtype)
    vocos = Vocos.from_dir(vocos_dir)
    ox.export_dit(dit, out_dir / DIT_ONNX, max_frames)
    ox.export_vocos(vocos, out_dir / VOCOS_ONNX, max_frames)
    return {"config": cfg.to_dict(), "dit_dtype": str(dtype).replace("torch.", ""), "vocos_dtype": "float32",
            "mel_dim": cfg.mel_dim, "text_dim": cfg.text_dim, "max_frames": max_frames}
