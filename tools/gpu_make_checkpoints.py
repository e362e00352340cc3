"""Write full-size random-weight F5 checkpoints in the published layout, for speed runs without downloads.

    python tools/gpu_make_checkpoints.py DIR [--tiny]

DIR/F5TTS_v1_Base/model_1250000.safetensors (the F5TTS_v1_Base architecture, 337 M parameters, keys
`ema_model.transformer.*` as published) + vocab.txt (2545 lines, id 0 a space, as published), and
DIR/vocos-mel-24khz/ (config.yaml + pytorch_model.bin at the published size). No config.json is
written for the full model, so the architecture comes from the model name as with real weights.
--tiny writes the demo-sized DiT (with its config.json) and the tiny Vocos under the same names:
the same layout for CPU dry runs of tools/gpu_sweep.sh. The weights are random: audio is noise,
speed is real.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODEL_NAME = "F5TTS_v1_Base"
CHECKPOINT_FILE = "model_1250000.safetensors"  # the published file name (studio/weights.py looks for it)
PUBLISHED_VOCAB_LINES = 2545  # lines of the published F5TTS_v1_Base vocab.txt


def vocab_lines(n: int = PUBLISHED_VOCAB_LINES) -> list[str]:
    """The demo vocabulary (space, ASCII, CJK punctuation, pinyin) padded with unused units to n lines."""
    from tts.demo_weights import demo_vocab

    units = demo_vocab()
    if len(units) > n:
        raise ValueError(f"the demo vocabulary has {len(units)} units, more than {n}")
    units += [f"<unused_{i}>" for i in range(n - len(units))]
    return units


def write(root: Path, tiny: bool, seed: int = 0) -> dict:
    from tts.f5.checkpoint import DEMO_CONFIG, DEMO_FILE, write_demo_dit
    from tts.f5.config import CONFIG_FILE, MODEL_CONFIGS
    from tts.f5.vocos import write_demo_vocos

    t0 = time.perf_counter()
    model_dir = root / MODEL_NAME
    model_dir.mkdir(parents=True, exist_ok=True)
    units = vocab_lines()
    (model_dir / "vocab.txt").write_text("".join(u + "\n" for u in units), encoding="utf-8")
    cfg = replace(DEMO_CONFIG if tiny else MODEL_CONFIGS[MODEL_NAME], text_num_embeds=len(units))
    path = write_demo_dit(model_dir, cfg, seed=seed)
    path.replace(model_dir / CHECKPOINT_FILE)
    if not tiny:
        (model_dir / CONFIG_FILE).unlink()  # the real folder has none: the config comes from the name
    assert not (model_dir / DEMO_FILE).exists()
    write_demo_vocos(root / "vocos-mel-24khz", seed=seed, tiny=tiny)
    return {"dir": str(root), "tiny": tiny, "vocab_lines": len(units),
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir", type=Path)
    p.add_argument("--tiny", action="store_true", help="demo-sized DiT and Vocos (CPU dry runs)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    info = write(args.dir, args.tiny, args.seed)
    ckpt = args.dir / MODEL_NAME / CHECKPOINT_FILE
    info["dit_file_mb"] = round(ckpt.stat().st_size / 2**20, 1)
    print(f"wrote {'tiny' if args.tiny else 'full-size'} random F5 checkpoints to {args.dir} "
          f"({info['dit_file_mb']} MB DiT, {info['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
