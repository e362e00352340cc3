"""How far the F5 DiT's FP8 products (`tts.f5.fp8`) move its output, on any device.

    python tools/f5_precision.py [--device cpu|cuda] [--nfe 16] [--forward-only] [--out result.json]

Full-size random weights in the published layout (`tools/gpu_make_checkpoints.py`), a float32 DiT:
1. one DiT forward (400 frames, random inputs, flow time 0.5): relative L2 of the conditional and
   unconditional velocities with FP8 products against the exact ones, and per block;
2. (unless --forward-only) the benchmark workload's first request at 16 NFE, seed 7, through the
   plain pipeline: waveform SNR, log-mel SNR (`tts.snr`) and RMS ratio of the FP8 output against
   the exact one.
On the CPU this takes ~5 minutes (2 cores); the CPU runs the same e4m3 arithmetic as the GPU's FP8
kernels, but from float32 activations (the GPU path quantises bf16 ones). Prints and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

FORWARD_FRAMES, FORWARD_REF_FRAMES, FORWARD_TEXT = 400, 150, 60
FORWARD_TIME = 0.5


def rel(a, b) -> float:
    return round(float((a - b).norm() / b.norm()), 5)


def forward_error(dit, dit8, device) -> dict:
    """Velocity error of one forward, and each block's output error (hooks)."""
    import torch

    g = torch.Generator().manual_seed(0)
    t = FORWARD_FRAMES
    x = torch.randn(1, t, 100, generator=g).to(device)
    cond = torch.randn(1, t, 100, generator=g)
    cond[:, FORWARD_REF_FRAMES:] = 0
    cond = cond.to(device)
    ids = torch.randint(0, dit.cfg.text_num_embeds, (1, FORWARD_TEXT), generator=g).to(device)
    mask = torch.ones(1, t, dtype=torch.bool, device=device)
    outs: dict[int, list] = {0: [], 1: []}
    handles = [b.register_forward_hook(lambda m, i, o, k=k: outs[k].append(o.detach().float()))
               for k, net in ((0, dit), (1, dit8)) for b in net.transformer_blocks]
    with torch.no_grad():
        tc, tu = dit.embed_text(ids, torch.tensor([t], device=device), t)
        time_t = torch.tensor([FORWARD_TIME], device=device)
        exact = dit(x, cond, tc, tu, time_t, mask)
        quant = dit8(x, cond, tc, tu, time_t, mask)
    for h in handles:
        h.remove()
    return {"velocity_cond_rel": rel(quant[0].float(), exact[0].float()),
            "velocity_uncond_rel": rel(quant[1].float(), exact[1].float()),
            "block_rel": [rel(q, e) for e, q in zip(outs[0], outs[1])]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--nfe", type=int, default=16)
    p.add_argument("--forward-only", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    import numpy as np
    import soundfile as sf
    import torch

    from gpu_make_checkpoints import write
    from tts.f5 import fp8
    from tts.f5.pipeline import F5Options, F5Pipeline, synthesize_offline
    from tts.snr import log_mel_snr_db, snr_db

    if args.device.startswith("cuda"):  # float32 means float32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    root = Path(tempfile.mkdtemp(prefix="f5-precision-"))
    write(root, tiny=False)
    model = root / "F5TTS_v1_Base"
    import os

    os.environ["STUDIO_F5_FAST"] = "0"  # the plain pipeline: only the products differ
    pipe = F5Pipeline(next(model.glob("model_*.safetensors")), model / "vocab.txt", root / "vocos-mel-24khz",
                      device=args.device, dtype=torch.float32)
    dit8 = copy.deepcopy(pipe.dit)
    result = {"device": args.device, "torch": torch.__version__, "layers_converted": fp8.convert_dit(dit8),
              "forward": forward_error(pipe.dit, dit8, torch.device(args.device))}
    print(json.dumps(result), flush=True)
    if not args.forward_only:
        item = json.loads((ROOT / "samples" / "bench_workload.jsonl").read_text().splitlines()[0])
        wav, sr = sf.read(ROOT / "samples" / item["prompt"], dtype="float32")
        opts = F5Options(nfe_steps=args.nfe, seed=7)

        def run():
            t0 = time.perf_counter()
            audio, _ = synthesize_offline(pipe, pipe.make_request(wav, item["reference_text"], item["target_text"], opts))
            return audio, round(time.perf_counter() - t0, 1)

        exact, s_exact = run()
        pipe.dit = dit8
        quant, s_quant = run()
        ratio = float(np.sqrt(np.mean(quant.astype(np.float64) ** 2) / np.mean(exact.astype(np.float64) ** 2)))
        result["request"] = {"item": item["id"], "seed": 7, "nfe": args.nfe, "seconds": round(exact.size / 24000, 2),
                             "waveform_snr_db": round(snr_db(quant, exact), 2),
                             "log_mel_snr_db": round(log_mel_snr_db(quant, exact), 2),
                             "rms_ratio": round(ratio, 4), "wall_s": {"exact": s_exact, "fp8": s_quant}}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
