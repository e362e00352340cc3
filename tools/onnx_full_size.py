"""ONNX exports at full size, checked with onnxruntime on the CPU (the full-size figures in BENCHMARKS.md).

    python tools/onnx_full_size.py [--model F5TTS_v1_Base] [--frames 400] [--out DIR]

Random weights in the published layout (`write_demo_dit` at the model's config, Vocos at the
published size), exported with `tts.f5.onnx_export` exactly as `build_engines f5-export` does (fp32
here, so onnxruntime on the CPU can run it), then compared with the torch modules: one DiT forward
(2 chunks, mixed lengths), a whole 16-NFE sample through `EngineDiT`, and Vocos on a padded batch.
Prints the largest absolute differences, export times and file sizes as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from tts.f5 import onnx_export as ox  # noqa: E402
from tts.f5 import trt_runner as tr  # noqa: E402
from tts.f5.checkpoint import load_dit, write_demo_dit  # noqa: E402
from tts.f5.config import MODEL_CONFIGS  # noqa: E402
from tts.f5.sampler import make_noise, sample  # noqa: E402
from tts.f5.vocos import Vocos, write_demo_vocos  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="F5TTS_v1_Base", choices=sorted(MODEL_CONFIGS))
    p.add_argument("--frames", type=int, default=400, help="longest item of the checks (frames)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    out = args.out or Path(tempfile.mkdtemp(prefix="onnx-full-"))
    cfg = MODEL_CONFIGS[args.model]
    ckpt = write_demo_dit(out / "ckpt", cfg)
    write_demo_vocos(out / "vocos", tiny=False)
    dit = load_dit(ckpt, cfg)
    vocos = Vocos.from_dir(out / "vocos")
    fig = {"model": args.model, "parameters_M": round(sum(p.numel() for p in dit.parameters()) / 1e6, 1),
           "frames": args.frames, "torch": torch.__version__}
    t0 = time.perf_counter()
    ox.export_dit(dit, out / "dit.onnx")
    fig["dit_export_s"] = round(time.perf_counter() - t0, 1)
    fig["dit_onnx_MB"] = round((out / "dit.onnx").stat().st_size / 1e6, 1)
    t0 = time.perf_counter()
    ox.export_vocos(vocos, out / "vocos.onnx")
    fig["vocos_export_s"] = round(time.perf_counter() - t0, 1)

    engine = tr.OnnxRuntimeEngine(out / "dit.onnx")
    inputs = ox.dit_example_inputs(dit, 2, args.frames, seed=1)
    with torch.no_grad():
        ref = dit(*[inputs[k] for k in ox.DIT_INPUTS])
    got = engine.run(inputs)
    fig["dit_forward_max_abs"] = max(ox.max_abs_diff(got[n], r) for n, r in zip(ox.DIT_OUTPUTS, ref))
    fig["dit_forward_ref_absmax"] = round(float(max(r.abs().max() for r in ref)), 3)

    # a whole 16-NFE sample, two chunks of mixed length, as the pipeline runs it
    lens, refs = [args.frames, args.frames * 3 // 4], [args.frames // 3, args.frames // 4]
    frames = max(lens)
    cond, noise = torch.zeros(2, frames, cfg.mel_dim), torch.zeros(2, frames, cfg.mel_dim)
    gen = torch.Generator().manual_seed(2)
    for i, (n, r) in enumerate(zip(lens, refs)):
        cond[i, :r] = torch.randn(r, cfg.mel_dim, generator=gen) - 4
        noise[i, :n] = make_noise(100 + i, n, cfg.mel_dim)
    ids = torch.randint(0, cfg.text_num_embeds, (2, frames // 4), generator=gen)
    ids[1, frames // 5:] = -1
    sample_args = (cond, ids, torch.tensor(refs), torch.tensor(lens), noise, 16, 2.0, -1.0)
    t0 = time.perf_counter()
    mel_ref = sample(dit, *sample_args)
    fig["torch_sample_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    mel_ort = sample(tr.EngineDiT(engine, dit, "cpu"), *sample_args)
    fig["ort_sample_s"] = round(time.perf_counter() - t0, 1)
    fig["sample16_mel_max_abs"] = ox.max_abs_diff(mel_ort, mel_ref)

    vin = ox.vocos_example_inputs(vocos, (args.frames, args.frames // 2, 2), seed=3)
    audio = ox.run_ort(ox.ort_session(out / "vocos.onnx"), vin)[0]
    worst = 0.0
    for i, n in enumerate(vin["lengths"].tolist()):
        solo = vocos.decode(vin["mel"][i: i + 1, :, :n])[0]
        worst = max(worst, ox.max_abs_diff(audio[i, : len(solo)], solo))
    fig["vocos_max_abs"] = worst
    print(json.dumps(fig))
    return 0


if __name__ == "__main__":
    sys.exit(main())
