"""`python -m studio script SCRIPT.txt -o out.wav [--stream]`: a multi-voice script from the command line.

The same parser, plan, generation, history row and ZIP as the page's Script tab (studio/script.py),
so the CLI and the Gradio endpoint `/script` give the same segment plan for the same script.
Exit status: 0 done; 1 the server or a segment failed, or a voice was deleted while it ran; 2 the
script or a flag is wrong (nothing is generated then).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from studio.script import (DEFAULT_CONCURRENCY, DEFAULT_PARAGRAPH_PAUSE_MS, DEFAULT_SPEAKER_PAUSE_MS, MAX_CONCURRENCY,
                           TARGET_LUFS)

TAG_HELP = """tags, one at the start of a line (untagged lines continue the voice above; a blank line starts a
paragraph):
  {Name}                          a saved or sample voice, with --family
  {Name|f5:nfe_steps=32}          a voice with a family and settings (the system grammar of batch runs)
  {spark:gender=female,pitch_level=high,speed_level=moderate}
                                  a Spark-created voice: made on its first line, later lines cloned from it
"""


def add_script_parser(sub, add_server_args) -> None:
    """The `script` subcommand (called by studio/cli.py's build_parser)."""
    p = sub.add_parser("script", help="generate a multi-voice script (dialogue, narration) into one audio file",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=TAG_HELP)
    p.add_argument("script", type=Path, help="UTF-8 text file with voice tags")
    p.add_argument("-o", "--output", type=Path, default=Path("script.wav"), help=".wav, .flac or .mp3")
    p.add_argument("--stream", action="store_true", help="request segments from the streaming models "
                                                         "(reports each segment's first chunk)")
    p.add_argument("--family", choices=("f5", "spark"), default="f5", help="family for {Name} tags (default f5)")
    p.add_argument("--speaker-pause-ms", type=float, default=DEFAULT_SPEAKER_PAUSE_MS,
                   help=f"silence before another tag's segment (default {DEFAULT_SPEAKER_PAUSE_MS})")
    p.add_argument("--paragraph-pause-ms", type=float, default=DEFAULT_PARAGRAPH_PAUSE_MS,
                   help=f"silence before a new paragraph (default {DEFAULT_PARAGRAPH_PAUSE_MS})")
    p.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                   help=f"segments generated at once, 1-{MAX_CONCURRENCY} (default {DEFAULT_CONCURRENCY})")
    p.add_argument("--json", type=Path, help="also write the plan, per-segment and script metrics as JSON")
    p.add_argument("--zip", type=Path, help="also write a ZIP of per-segment files with lines.csv")
    p.add_argument("--plan-only", action="store_true", help="print the parsed plan as JSON and exit (no server)")
    add_server_args(p)
    p.set_defaults(func=cmd_script)


def _read(path: Path) -> str:
    try:
        return path.read_text("utf-8-sig")
    except FileNotFoundError:
        raise SystemExit(f"error: no script file {path}") from None
    except UnicodeDecodeError:
        raise SystemExit(f"error: {path} is not UTF-8 text; save it as UTF-8") from None


def cmd_script(args) -> int:
    from studio.audio_io import OUTPUT_FORMATS, save_audio
    from studio.client import SynthesisError
    from studio.config import default_data_dir
    from studio.history import HistoryStore
    from studio.pool import connect
    from studio.script import (ScriptCancelled, ScriptError, format_problems, generate_script, plan_json,
                               plan_script, record_script, script_zip)
    from studio.server import ServerStartError
    from studio.voices import SAMPLES_DIR, VoiceLibrary

    data_dir = args.data_dir or default_data_dir()
    text = _read(args.script)
    try:
        plan = plan_script(text, VoiceLibrary(data_dir, SAMPLES_DIR), default_family=args.family,
                           speaker_pause_ms=args.speaker_pause_ms, paragraph_pause_ms=args.paragraph_pause_ms)
    except ScriptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.plan_only:
        print(json.dumps(plan_json(plan), ensure_ascii=False, indent=1))
        return 0 if plan.ok else 2
    if not plan.ok:
        print(f"error: {args.script}: nothing generated; the script has problems:\n"
              f"{format_problems(list(plan.problems)) or 'the script is empty'}", file=sys.stderr)
        return 2
    if args.output.suffix.lower().lstrip(".") not in OUTPUT_FORMATS:
        print(f"error: end -o with {', '.join('.' + k for k in OUTPUT_FORMATS)}", file=sys.stderr)
        return 2
    from studio.cli import server_for

    try:
        server, url = server_for(args, plan.families)
    except ServerStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{len(plan.segments)} segments, {len({s.voice.identity for s in plan.segments})} voices, "
          f"about {plan.est_s:.0f} s", flush=True)

    def on_segment(outcome, pause) -> None:
        s, m = outcome.segment, outcome.metrics
        print(f"segment {s.index} (line {s.line}, {s.voice.label}): {m['audio_s']:.2f} s, ready at "
              f"{m['ready_s']:.2f} s, latency {m['latency_s']:.3f} s, RTF {m['rtf'] or 0:.3f}", flush=True)

    try:
        with connect(url) as client:
            result = generate_script(plan, client, VoiceLibrary(data_dir, SAMPLES_DIR), stream=args.stream,
                                     concurrency=args.concurrency, on_segment=on_segment)
    except (ScriptError, SynthesisError, ScriptCancelled) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            server.stop()
    save_audio(args.output, result.audio, result.sample_rate)
    history = HistoryStore(data_dir)
    rec = record_script(history, text, plan, result.segments, sample_rate=result.sample_rate, stream=args.stream,
                        metrics=result.metrics, concurrency=args.concurrency, audio=result.audio)
    m = result.metrics
    print(f"wrote {args.output}: {m['audio_s']:.2f} s at {result.sample_rate} Hz, segments at {TARGET_LUFS:g} LUFS")
    print(f"latency {m['latency_s']:.3f} s, first segment ready {m['first_sound_s']:.3f} s, RTF {m['rtf']:.3f}; "
          f"history entry {rec['id']}")
    if args.zip:
        print(f"wrote {script_zip(history, rec, args.zip)}")
    if args.json:
        args.json.write_text(json.dumps({"record_id": rec["id"], "plan": plan_json(plan), "metrics": m,
                                         "segments": rec["segments"]}, ensure_ascii=False, indent=1), "utf-8")
        print(f"wrote {args.json}")
    if result.demo_weights:
        print("note: DEMO WEIGHTS were used (tiny random model): the audio is noise, not speech.")
    return 0


__all__ = ["add_script_parser", "cmd_script"]
