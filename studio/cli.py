"""Command line: `python -m studio synth|serve|download|make-demo-weights|bench|batch|results|script`."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from studio.config import default_checkpoints_dir, default_data_dir
from studio.systems import GENDERS, LEVELS


def parse_gpus(value: str | None) -> list[int] | None:
    if value is None or value == "":
        return None
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--gpus takes indices like 0,1; got {value!r}") from None


def add_server_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by every command that talks to (or starts) a Triton server."""
    g = p.add_argument_group("server")
    g.add_argument("--triton-url", metavar="HOST:PORT[,HOST:PORT...]",
                   help="use existing Triton servers (gRPC) instead of starting one: one address, several separated "
                        "by commas, or a DNS name resolving to several (a Kubernetes headless Service); requests "
                        "spread over the ready ones (studio/pool.py)")
    g.add_argument("--data-dir", type=Path, default=None, help="default: $STUDIO_DATA_DIR or ~/.cache/voice-studio")
    g.add_argument("--checkpoints", type=Path, default=None,
                   help="folder with F5TTS_v1_Base/, vocos-mel-24khz/, Spark-TTS-0.5B/ (or $STUDIO_CHECKPOINTS)")
    g.add_argument("--demo-weights", action="store_true", help="force the tiny random demo weights (output is noise)")
    g.add_argument("--no-download", action="store_true", help="never download weights")
    g.add_argument("--f5-model", default="F5TTS_v1_Base", help="F5 architecture/checkpoint name")
    g.add_argument("--gpus", type=parse_gpus, default=None, help="GPU indices for engine instances, e.g. 0,1")
    g.add_argument("--http-port", type=int, default=None)
    g.add_argument("--grpc-port", type=int, default=None)
    g.add_argument("--instances", type=int, default=None, help="front-end instances per model (concurrency served)")
    g.add_argument("--engine-per-gpu", type=int, default=None,
                   help="engine instances per GPU (each holds its own weights; default 1)")
    g.add_argument("--runtime", choices=("torch", "trtllm"), default=os.environ.get("STUDIO_RUNTIME", "torch"),
                   help="torch (default), or trtllm: the TensorRT / TensorRT-LLM engines under --engines "
                        "(the GPU image; $STUDIO_RUNTIME)")
    g.add_argument("--engines", type=Path, default=os.environ.get("STUDIO_ENGINES") or None,
                   help="folder `python -m build_engines` wrote (for --runtime trtllm; $STUDIO_ENGINES)")
    g.add_argument("--triton-bind", default=os.environ.get("STUDIO_TRITON_BIND", "127.0.0.1"), metavar="ADDRESS",
                   help="address the embedded Triton server listens on (default 127.0.0.1; 0.0.0.0 in a "
                        "container to publish its ports)")
    g.add_argument("--require-weights", action="store_true",
                   help="refuse to start when a family's real weights are missing instead of falling back to the "
                        "demo weights (noise); for deployments ($STUDIO_REQUIRE_WEIGHTS=1)")
    g.add_argument("--no-asr", action="store_true",
                   help="serve neither speech recognition nor speaker similarity (transcript fill, objective checks)")
    g.add_argument("--metrics-port", type=int, default=os.environ.get("STUDIO_METRICS_PORT") or None, metavar="PORT",
                   help="serve the embedded Triton server's Prometheus metrics on PORT at the --triton-bind address "
                        "(default $STUDIO_METRICS_PORT; unset: off)")


def make_server(args, families: list[str] | None = None):
    from studio.server import TritonServer

    return TritonServer(args.data_dir or default_data_dir(), http_port=args.http_port, grpc_port=args.grpc_port,
                        gpus=args.gpus, demo_weights=args.demo_weights,
                        checkpoints=args.checkpoints or default_checkpoints_dir(), no_download=args.no_download,
                        f5_model=args.f5_model, instances=args.instances, families=families,
                        engine_per_gpu=getattr(args, "engine_per_gpu", None),
                        runtime=getattr(args, "runtime", "torch"), engines_dir=getattr(args, "engines", None),
                        bind=getattr(args, "triton_bind", "127.0.0.1"),
                        no_asr=getattr(args, "no_asr", False), metrics_port=getattr(args, "metrics_port", None),
                        require_weights=getattr(args, "require_weights", False))


def server_for(args, families: list[str]):
    """(server, gRPC url): `--triton-url` as given (server None), else an embedded server started for
    `families` (stop it when done). Raises ServerStartError saying why it could not start."""
    if args.triton_url:
        from studio.pool import parse_spec
        from studio.server import ServerStartError

        try:
            parse_spec(args.triton_url)
        except ValueError as exc:
            raise ServerStartError(f"--triton-url: {exc}") from None
        return None, args.triton_url
    server = make_server(args, families=families)
    server.start()
    return server, server.grpc_url


def cmd_serve(args) -> int:
    from studio.server import ServerStartError

    server = make_server(args)
    try:
        server.start()
    except ServerStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    st = server.status()
    print(f"Triton serving {', '.join(server.models)}")
    print(f"  gRPC {server.grpc_url}   HTTP {server.http_url}" + (f"   metrics {server.metrics_url}"
                                                                   if server.metrics_url else ""))
    for fam, demo in st["demo_weights"].items():
        print(f"  {fam}: {'DEMO WEIGHTS (random: output is noise)' if demo else 'real weights'}")
    print("Ctrl-C stops it.", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    server.stop()
    return 0


def _synth_params(args) -> dict:
    params = {}
    if args.seed is not None:
        params["seed"] = args.seed
    if args.model == "f5":
        for key, val in (("nfe_steps", args.nfe), ("cfg_strength", args.cfg), ("speed", args.speed)):
            if val is not None:
                params[key] = val
    else:
        for key, val in (("temperature", args.temperature), ("top_k", args.top_k), ("top_p", args.top_p),
                         ("max_new_tokens", args.max_new_tokens), ("gender", args.gender),
                         ("pitch_level", args.pitch_level), ("speed_level", args.speed_level)):
            if val is not None:
                params[key] = val
    return params


class UserError(Exception):
    """A mistake in the command line or its files: printed as `error: ...`, never as a traceback."""


def read_text_arg(text: str | None, text_file: str | None) -> str | None:
    """--text, else the contents of --text-file (UTF-8, at most the upload limit)."""
    from studio.limits import LimitError, check_file_size

    if text is not None or not text_file:
        return text
    try:
        check_file_size(text_file, "--text-file")
        data = Path(text_file).read_bytes()
    except FileNotFoundError:
        raise UserError(f"--text-file {text_file!r} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"--text-file {text_file!r} is a folder, not a text file") from None
    except OSError as exc:
        raise UserError(f"cannot read --text-file {text_file!r}: {exc.strerror}") from None
    except LimitError as exc:
        raise UserError(str(exc)) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"--text-file {text_file!r} is not UTF-8 text (byte {exc.start} is invalid); save it as "
                        "UTF-8") from None


def check_output_path(path: Path) -> None:
    """Before any synthesis: the output's format comes from its suffix, and its folder must be writable."""
    from studio.audio_io import OUTPUT_FORMATS

    path = Path(path).expanduser()
    if path.suffix.lower().lstrip(".") not in OUTPUT_FORMATS:
        raise UserError(f"cannot tell the audio format from -o {str(path)!r}; end the name with "
                        f"{', '.join('.' + k for k in OUTPUT_FORMATS)}")
    if path.is_dir():
        raise UserError(f"-o {str(path)!r} is a folder; give a file name")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # save_audio creates the missing folders below the first existing one
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise UserError(f"cannot write -o {str(path)!r}: {str(folder)!r} is not a writable folder")


def cmd_synth(args) -> int:
    try:
        return _synth(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _synth(args) -> int:
    from studio.audio_io import AudioInputError, load_audio, save_audio
    from studio.client import GenerationCancelled, SynthesisError
    from studio.limits import LimitError, check_file_size, check_prompt, check_ref_text, check_text
    from studio.pool import connect
    from studio.server import ServerStartError
    from tts.audio import F5_SAMPLE_RATE, SPARK_SAMPLE_RATE

    text = read_text_arg(args.text, args.text_file)
    if not text or not text.strip():
        print("error: give the text to speak with --text or --text-file", file=sys.stderr)
        return 2
    check_output_path(args.output)
    try:
        check_text(args.model, text)
        check_ref_text(args.ref_text or "")
    except LimitError as exc:
        raise UserError(str(exc)) from None
    voice_creation = args.model == "spark" and args.gender is not None
    if voice_creation and args.ref_audio:
        print("error: voice creation (--gender) takes no --ref-audio", file=sys.stderr)
        return 2
    if not voice_creation and not args.ref_audio:
        print("error: --ref-audio is required (or, for Spark voice creation, --gender/--pitch-level/--speed-level)",
              file=sys.stderr)
        return 2
    # F5 without --ref-text: the prompt is transcribed by the asr model (filled in below)
    fill = args.model == "f5" and not (args.ref_text or "").strip()
    sr = F5_SAMPLE_RATE if args.model == "f5" else SPARK_SAMPLE_RATE
    ref = None
    if args.ref_audio:
        try:
            check_file_size(args.ref_audio, "--ref-audio file")
            ref = load_audio(args.ref_audio, sr)
            check_prompt(ref.size, sr)
        except FileNotFoundError:
            raise UserError(f"--ref-audio {args.ref_audio!r} does not exist") from None
        except (AudioInputError, LimitError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    checks = (["asr"] if fill or args.check else []) + (["sim"] if args.check else [])
    try:
        server, url = server_for(args, [args.model] + checks)
    except ServerStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    ref_text, notes, checked = args.ref_text or "", [], None
    try:
        with connect(url) as client:
            if fill:
                from studio.objective import fill_transcript

                ref_text, _, note = fill_transcript(client, ref, sr)
                notes.append(note)
            result = client.synthesize(args.model, text, ref, ref_text, stream=args.stream,
                                       params=_synth_params(args))
            if args.check:
                from studio.objective import run_checks

                checked = run_checks(client, result.audio, result.sample_rate, text, ref, sr if ref is not None else None)
    except (SynthesisError, GenerationCancelled, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            server.stop()
    try:
        save_audio(args.output, result.audio, result.sample_rate)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot write {str(args.output)!r}: {getattr(exc, 'strerror', None) or exc}") from None
    info = result.info
    print(f"wrote {args.output}: {result.audio_s:.2f} s of audio at {result.sample_rate} Hz")
    line = f"latency {result.latency_s:.3f} s"
    if args.stream:
        line += f", first chunk {result.first_chunk_s:.3f} s"
    line += f", RTF {result.rtf:.3f}, seed {result.seed}, server compute {info.get('compute_ms', 0):.0f} ms"
    if "tokens" in info:
        line += f", tokens {info['tokens']}"
        if info.get("decode_ms"):
            line += f", decode {info['tokens'] / (info['decode_ms'] / 1000):.0f} tokens/s"
    print(line)
    if args.triton_url and result.server and result.server != args.triton_url.strip():
        print(f"served by the Triton server at {result.server}")  # several servers: which one answered
    if checked is not None:
        parts = [f"{checked.metric.upper()} {checked.error_rate:.3f}" if checked.error_rate is not None else None,
                 f"speaker similarity {checked.similarity:.3f}" if checked.similarity is not None else None,
                 f"checks {checked.check_ms:.0f} ms"]
        print("objective checks: " + ", ".join(p for p in parts if p) +
              (f"; recognised: {checked.asr_text!r}" if checked.asr_text is not None else ""))
    for note in notes + info.get("notes", []) + (checked.notes if checked is not None else []):
        print(f"note: {note}")
    if result.demo_weights:
        print("note: DEMO WEIGHTS were used (tiny random model): the audio is noise, not speech. "
              "Run `python -m studio download` for the real weights.")
    return 0


def cmd_download(args) -> int:
    from studio.weights import download

    download(args.family)
    return 0


def cmd_make_demo_weights(args) -> int:
    from tts.demo_weights import write_all

    for line in write_all(Path(args.dir)):
        print(line)
    return 0


def cmd_loadtest(args) -> int:
    from studio.loadtest import main as loadtest_main

    return loadtest_main(args)


def cmd_bench(args) -> int:
    from studio.bench import main as bench_main

    return bench_main(args)


def cmd_batch(args) -> int:
    """Generate a test set with several systems into the store; the same -o NAME resumes the run."""
    from studio.batch import BatchInputError, prepare_run, read_test_set, run_batch, run_summary
    from studio.pool import connect
    from studio.server import ServerStartError
    from studio.store import open_store
    from studio.voices import SAMPLES_DIR, VoiceLibrary

    data_dir = args.data_dir or default_data_dir()
    store = open_store(data_dir)
    voices = VoiceLibrary(data_dir, SAMPLES_DIR)
    try:
        test_set = read_test_set(args.testset) if args.testset else None
        if test_set is not None and test_set.note():
            print(f"note: {test_set.note()}")
        run = prepare_run(store, args.name, test_set, args.system, voices, concurrency=args.concurrency)
    except BatchInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if run.resumed:
        print(f"resuming run {run.name!r}" + (f" with new system(s) {', '.join(run.added_systems)}"
                                              if run.added_systems else ""))
    summary = run_summary(store, run.name)
    left = {spec for spec, c in summary["systems"].items() if c["done"] < c["rows"]}
    families = sorted({s.family for s in run.systems if not s.is_files and s.spec in left})
    checked = ["asr", "sim"] if args.check and left else []
    server, url = None, args.triton_url
    if families or checked:
        try:
            server, url = server_for(args, families + checked)
        except ServerStartError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    stop = threading.Event()
    outcome: dict = {}

    def work():
        client = connect(url) if families or checked else None
        try:
            outcome["progress"] = run_batch(store, run, client, concurrency=args.concurrency, voices=voices,
                                            stop=stop, on_progress=lambda p: print(p.line(), flush=True),
                                            checks=bool(checked))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            outcome["error"] = exc
        finally:
            if client is not None:
                client.close()

    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    worker = threading.Thread(target=work, name="batch-run")
    worker.start()
    try:
        while worker.is_alive():
            try:
                worker.join(0.5)
            except KeyboardInterrupt:
                print("stopping after the outputs in flight (run the same command again to resume)", flush=True)
                stop.set()
    finally:
        signal.signal(signal.SIGTERM, previous)
        if server is not None:
            server.stop()
    if "error" in outcome:
        print(f"error: {outcome['error']}", file=sys.stderr)
        return 1
    summary = run_summary(store, run.name)
    print(f"results: run {run.name!r} (id {summary['id']}, {summary['status']}) in {store.path}; "
          f"audio under {store.root / 'batch' / str(summary['id'])}")
    for spec, counts in summary["systems"].items():
        print(f"  {spec}: {counts['done']}/{counts['rows']} done, {counts['failed']} failed")
    for failure in summary["failures"][:10]:
        print(f"  failed {failure['system']} / {failure['row_id']}: {failure['error']}")
    demo = store.query_one("SELECT COUNT(*) FROM generations WHERE batch_run = ? AND "
                           "json_extract(extra, '$.demo_weights') = 1", (summary["id"],))[0]
    if demo:
        print("note: DEMO WEIGHTS were used (tiny random model): the audio is noise, not speech.")
    return 0 if summary["status"] == "done" else 1


def cmd_results(args) -> int:
    """`results NAME`: a listening session's table on stdout; JSON, CSV and a plot written to --out."""
    from studio.listening import (ListeningError, agreement_line, export, format_table, get_session,
                                  objective_table, pairs_table, report, results_table)
    from studio.store import open_store

    store = open_store(args.data_dir or default_data_dir())
    try:
        session = get_session(store, args.name)
    except ListeningError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(f"{session.name}-results")
    files = export(store, session, out)
    rep = report(store, session)
    print(f"{session.name}: {session.kind.upper()}, {rep['answers']} answers, systems: {', '.join(session.systems)}")
    print(format_table(*results_table(rep, session.kind)))
    if session.kind != "ab" and len(session.systems) > 1:
        print()
        print(format_table(*pairs_table(rep)))
    if agreement_line(rep):
        print(agreement_line(rep))
    objective = objective_table(rep)
    if objective[1]:
        print()
        print(format_table(*objective))
    print(f"wrote {files['json']}, {files['csv_dir']}/*.csv, {files['plot']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m studio", description="Voice-cloning studio over Triton")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="synthesise one text in a prompt clip's voice")
    p.add_argument("--model", choices=("f5", "spark"), default="f5")
    p.add_argument("--ref-audio", help="prompt clip (any common format/rate/channels)")
    p.add_argument("--ref-text", default="",
                   help="what the prompt clip says (F5: left out, it is filled in by speech recognition)")
    p.add_argument("--text", help="what to say")
    p.add_argument("--text-file", help="read the text to say from a UTF-8 file")
    p.add_argument("-o", "--output", type=Path, default=Path("out.wav"), help=".wav, .flac or .mp3")
    p.add_argument("--stream", action="store_true", help="streaming (reports first-chunk latency)")
    p.add_argument("--check", action="store_true",
                   help="objective checks: WER/CER of the output read back by the asr model, speaker similarity")
    p.add_argument("--seed", type=int)
    f5 = p.add_argument_group("F5-TTS")
    f5.add_argument("--nfe", type=int, help="ODE steps (default 32; 16 is fast)")
    f5.add_argument("--cfg", type=float, help="CFG strength (default 2.0)")
    f5.add_argument("--speed", type=float, help="> 1 speaks faster (default 1.0)")
    sp = p.add_argument_group("Spark-TTS")
    sp.add_argument("--temperature", type=float)
    sp.add_argument("--top-k", type=int)
    sp.add_argument("--top-p", type=float)
    sp.add_argument("--max-new-tokens", type=int)
    sp.add_argument("--gender", choices=GENDERS, help="voice creation (no --ref-audio)")
    sp.add_argument("--pitch-level", choices=LEVELS)
    sp.add_argument("--speed-level", choices=LEVELS)
    add_server_args(p)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("serve", help="start the Triton server with the studio's models and keep it running")
    add_server_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("download", help="download the real weights (states their size first)")
    p.add_argument("family", nargs="?", choices=("f5", "spark", "asr", "sim", "all"), default="all")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("make-demo-weights", help="write the tiny deterministic demo weights into DIR")
    p.add_argument("dir")
    p.set_defaults(func=cmd_make_demo_weights)

    p = sub.add_parser("batch", help="generate a test set with several systems (QA listening tests); resumable",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="systems: family[:key=value,...] with the Triton input names, or files:FOLDER\n" +
                       _grammar_help())
    p.add_argument("testset", nargs="?", type=Path,
                   help="CSV/TSV with id, prompt, reference_text, target_text[, seed] (omit to resume -o NAME)")
    p.add_argument("--system", action="append", default=[], metavar="SYSTEM",
                   help="e.g. f5:nfe_steps=16, spark:temperature=0.6,stream, files:DIR (repeat for several)")
    p.add_argument("-o", "--name", required=True, help="the run's name; the same name resumes it")
    p.add_argument("--concurrency", type=int, default=4, help="generations at once (default 4)")
    p.add_argument("--check", action="store_true",
                   help="objective checks on each new output (WER/CER by the asr model, speaker similarity)")
    add_server_args(p)
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("results", help="a listening test's results: table, JSON, CSV and a plot")
    p.add_argument("name", help="the listening session's name")
    p.add_argument("--out", help="folder for NAME.json, csv/ and plot.png (default ./NAME-results)")
    p.add_argument("--data-dir", type=Path, default=None, help="default: $STUDIO_DATA_DIR or ~/.cache/voice-studio")
    p.set_defaults(func=cmd_results)

    from studio.script_cli import add_script_parser  # multi-voice scripts

    add_script_parser(sub, add_server_args)

    p = sub.add_parser("loadtest", help="a bounded load run through the page's API on loopback (failures, "
                       "latency percentiles, server memory)")
    from studio.loadtest import add_loadtest_args

    add_loadtest_args(p)
    p.set_defaults(func=cmd_loadtest)

    p = sub.add_parser("bench", help="benchmark a model through Triton")
    try:
        from studio.bench import add_bench_args
    except ImportError:
        add_bench_args = None
    if add_bench_args:
        add_bench_args(p)
        add_server_args(p)
    p.set_defaults(func=cmd_bench)
    return parser


def _grammar_help() -> str:
    from studio.systems import grammar_help

    return grammar_help()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
