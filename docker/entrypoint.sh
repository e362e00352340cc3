#!/bin/sh
# Container start: with the trtllm runtime, build the engines when they are absent or stale
# (`build_engines` skips every stage whose inputs and settings are unchanged, so a later start
# costs a hash check), then serve the studio with the image's own tritonserver.
#
#   (no arguments, or app.py's flags)  the page and its embedded Triton server
#   serve [flags of `python -m studio serve`]  the Triton server alone, listening on every interface
#                                       (a Triton replica behind studios started with --triton-url)
#
# Environment: STUDIO_RUNTIME (trtllm | torch), STUDIO_CHECKPOINTS, STUDIO_ENGINES, STUDIO_TRITON_BIND
# (127.0.0.1 unless Triton's ports are to be published; `serve` defaults to 0.0.0.0), STUDIO_PRECISION
# (bf16 | fp16).
set -eu
runtime="${STUDIO_RUNTIME:-trtllm}"
if [ "$runtime" = "trtllm" ]; then
    python3 -m build_engines all --model all --checkpoints "$STUDIO_CHECKPOINTS" --out "$STUDIO_ENGINES" \
        --precision "${STUDIO_PRECISION:-bf16}"
fi
if [ "${1:-}" = "serve" ]; then
    shift
    # a replica's whole point is to be reached from the studios, so it listens on every interface;
    # the repository API stays behind its per-run secret either way
    exec python3 -m studio serve --runtime "$runtime" --engines "$STUDIO_ENGINES" \
        --checkpoints "$STUDIO_CHECKPOINTS" --http-port 8000 --grpc-port 8001 \
        --triton-bind "${STUDIO_TRITON_BIND:-0.0.0.0}" "$@"
fi
# The page listens on every interface inside the container (compose publishes it on the host's
# 127.0.0.1); Triton keeps fixed ports for the health check and for publishing when asked.
exec python3 app.py --host 0.0.0.0 --port 7860 --runtime "$runtime" --engines "$STUDIO_ENGINES" \
    --checkpoints "$STUDIO_CHECKPOINTS" --http-port 8000 --grpc-port 8001 \
    --triton-bind "${STUDIO_TRITON_BIND:-127.0.0.1}" "$@"
