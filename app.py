"""Voice Studio: `python app.py` opens the page at http://127.0.0.1:7860 with its own Triton server.

    python app.py [--host 0.0.0.0] [--port 7860] [--share] [--root-path /studio]
                  [--triton-url HOST:PORT[,...]]  # use running Triton servers (gRPC; several or a DNS name)
                  [--data-dir DIR] [--checkpoints DIR] [--demo-weights] [--no-download]
                  [--gpus 0,1] [--http-port N] [--grpc-port N] [--f5-model NAME] [--instances N]
                  [--api-key KEY]                 # require it on the OpenAI-compatible /v1 API
                  [--metrics-port N] [--metrics-token T]  # Triton's Prometheus port; the key of GET /metrics

The page comes up at once; the embedded server starts in the background (on a first real start it
downloads several GB of weights) and the banner shows its progress and which models are ready.

Importing this module starts nothing: it only builds the module-level `demo` (Hugging Face Spaces
and tools that look for `demo` import it). Two ways to serve it:

- `python app.py` (the supported way, also what Spaces runs): starts the server, then launches the
  page with the streaming player's routes (`studio/ui_stream.py`) and the listening-test rater routes
  (`studio/qa_routes.py`); the data folder itself is never served (the page gets cache copies).
- `gradio app.py [-- FLAGS]` (Gradio's auto-reload for development): Gradio runs this file with the
  flags, so `main()` starts everything as above; on each reload Gradio re-executes the file in a
  watcher thread, where `main()` does nothing and the process's one runtime (and server) is reused.
- Anything that launches `demo` without `main()` (e.g. `demo.launch()` from another script): the
  first page load starts the server, configured from the environment (STUDIO_DATA_DIR,
  STUDIO_TRITON_URL, STUDIO_CHECKPOINTS, STUDIO_DEMO_WEIGHTS=1, STUDIO_NO_DOWNLOAD=1), and adds the
  player's and raters' routes to the running app.

Generations at once: STUDIO_CONCURRENCY (default 4), page and API together; further page requests wait in
Gradio's queue, API requests wait while fewer than STUDIO_API_QUEUE (default 16) do, else get 429.

The same server answers an OpenAI-compatible API under /v1 (studio/api.py): POST /v1/audio/speech,
GET /v1/models, GET/POST /v1/audio/voices, DELETE /v1/audio/voices/NAME.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from studio.ui import build_demo, launch_kwargs
from studio.ui_runtime import RuntimeOptions, StudioRuntime

runtime = StudioRuntime.shared()
demo = build_demo(runtime)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from studio.cli import add_server_args

    p = argparse.ArgumentParser(description="Voice Studio: voice cloning with F5-TTS and Spark-TTS on Triton.")
    # Hosts such as Hugging Face Spaces say where to listen through Gradio's own variables.
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="address to serve the page on (0.0.0.0: every interface; default $GRADIO_SERVER_NAME "
                        "or 127.0.0.1)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
                   help="default $GRADIO_SERVER_PORT or 7860")
    p.add_argument("--share", action="store_true", help="also open a temporary public gradio.live link")
    p.add_argument("--root-path", default=None, help="URL prefix when served behind a reverse proxy, e.g. /studio")
    p.add_argument("--api-key", default=None,
                   help="bearer key every /v1 route of the OpenAI-compatible API requires (default $STUDIO_API_KEY; "
                        "unset: the API is open, like the page)")
    p.add_argument("--auth", default=os.environ.get("STUDIO_AUTH"),
                   help="require a login for the page and its routes: user:password[,user:password] or a file "
                        "with one user:password a line (default $STUDIO_AUTH; unset: no login)")
    p.add_argument("--metrics-token", default=None,
                   help="bearer token GET /metrics (the studio's Prometheus metrics) requires (default "
                        "$STUDIO_METRICS_TOKEN; unset: only connections from this machine's loopback read them)")
    add_server_args(p)
    return p.parse_args(argv)


def options_from(args: argparse.Namespace) -> RuntimeOptions:
    base = RuntimeOptions()
    return RuntimeOptions(data_dir=args.data_dir or base.data_dir, triton_url=args.triton_url,
                          checkpoints=args.checkpoints or base.checkpoints, demo_weights=args.demo_weights,
                          no_download=args.no_download, gpus=args.gpus, http_port=args.http_port,
                          grpc_port=args.grpc_port, f5_model=args.f5_model, instances=args.instances,
                          runtime=args.runtime, engines_dir=args.engines, triton_bind=args.triton_bind,
                          no_asr=args.no_asr, metrics_port=args.metrics_port,
                          require_weights=args.require_weights,
                          metrics_token=args.metrics_token or base.metrics_token,
                          api_key=args.api_key or base.api_key)


def _terminate(*_):
    raise KeyboardInterrupt  # unwinds launch() so the embedded server is stopped below


def main(argv: list[str] | None = None) -> int:
    if threading.current_thread() is not threading.main_thread():
        # Gradio's reload mode re-executes this file in its watcher thread: the first run (main
        # thread) already started the server and the page; the new `demo` is swapped in by Gradio.
        return 0
    args = parse_args(argv)
    from studio.limits import parse_auth

    try:
        auth = parse_auth(args.auth)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    runtime.start(options_from(args))  # in the background: the page is up before the server
    signal.signal(signal.SIGTERM, _terminate)
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=True if args.share else None,
                    root_path=args.root_path, show_error=True, auth=auth, **launch_kwargs(runtime, demo))
    except KeyboardInterrupt:
        pass
    finally:
        demo.close()
        runtime.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
