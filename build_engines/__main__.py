"""`python -m build_engines TARGET --checkpoints DIR --out DIR [...]` (see build_engines/__init__.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from build_engines.plan import FAMILIES, STAGES, Options, make_plan, run_plan


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m build_engines",
                                description="Build the TensorRT / TensorRT-LLM engines of the trtllm runtime.")
    p.add_argument("target", choices=("all",) + FAMILIES + STAGES,
                   help="all: every stage of --model; f5 / spark: that family's stages; or one stage")
    p.add_argument("--model", choices=("all",) + FAMILIES, default=None,
                   help="families to build (default: the target's family, all for `all`)")
    p.add_argument("--checkpoints", type=Path, default=None,
                   help="folder with F5TTS_v1_Base/, vocos-mel-24khz/, Spark-TTS-0.5B/ (default: the Hugging "
                        "Face cache, downloading what is missing)")
    p.add_argument("--out", type=Path, required=True, help="engines folder (mount it as a volume in the image)")
    p.add_argument("--precision", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--max-batch", type=int, default=None,
                   help="F5 chunks per engine call (default 8) and Spark decode slots (default 16)")
    p.add_argument("--max-frames", type=int, default=4096, help="F5 longest item in frames (default 4096 = 43.7 s)")
    p.add_argument("--f5-model", default="F5TTS_v1_Base")
    p.add_argument("--spark-max-input-len", type=int, default=None)
    p.add_argument("--spark-max-seq-len", type=int, default=None)
    p.add_argument("--data-dir", type=Path, default=None, help="studio data folder (downloads, demo weights)")
    p.add_argument("--demo-weights", action="store_true", help="build from the tiny demo checkpoints")
    p.add_argument("--dry-run", action="store_true", help="print every stage and command; run nothing")
    p.add_argument("--force", action="store_true", help="rebuild even the stages that are up to date")
    return p.parse_args(argv)


def options_from(args: argparse.Namespace) -> tuple[Options, tuple[str, ...] | None]:
    model = args.model or (args.target if args.target in FAMILIES else
                           "f5" if args.target.startswith("f5-") else
                           "spark" if args.target.startswith("spark-") else "all")
    extra = {}
    if args.spark_max_input_len:
        extra["spark_max_input_len"] = args.spark_max_input_len
    if args.spark_max_seq_len:
        extra["spark_max_seq_len"] = args.spark_max_seq_len
    opts = Options(checkpoints=args.checkpoints, out=args.out, model=model, precision=args.precision,
                   max_batch=args.max_batch, max_frames=args.max_frames, f5_model=args.f5_model,
                   data_dir=args.data_dir, demo_weights=args.demo_weights, **extra)
    only = (args.target,) if args.target in STAGES else None
    return opts, only


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    opts, only = options_from(args)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    stages = make_plan(opts, only, log=log, dry_run=args.dry_run)
    if args.dry_run:
        log(f"plan for --model {opts.model} into {opts.out} (dry run: nothing is executed)")
    ran = run_plan(stages, opts.out, dry_run=args.dry_run, force=args.force, log=log)
    log(("would run: " if args.dry_run else "ran: ") + (", ".join(ran) or "nothing (all up to date)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
