#!/usr/bin/env bash
# Scale-out on the CPU: the same bench against one embedded Triton server and against two, each
# server pinned to its own core (taskset), demo weights. It checks that a second server adds its
# capacity through the studio's server pool (studio/pool.py) and how the requests split.
#
#   bash tools/cpu_pool_bench.sh [MODEL] [CONCURRENCY] [REQUESTS]   # default: f5 4 24
#
# Needs 2+ cores (cores 0 and 1 serve, the bench client runs where the OS puts it). Results and logs
# go to $OUT (default ./pool-bench-out): bench JSON per run and pool_bench.log.
set -uo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-f5}; LEVEL=${2:-4}; REQUESTS=${3:-24}
OUT=${OUT:-$PWD/pool-bench-out}
WORK=$(mktemp -d /tmp/pool-bench.XXXXXX)
mkdir -p "$OUT"
LOG=$OUT/pool_bench.log
PIDS=()
stop_all() { for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$WORK"; }
trap stop_all EXIT
say() { printf '== %s\n' "$*" | tee -a "$LOG"; }

# serve CORE GRPC_PORT HTTP_PORT: `python -m studio serve` on one core, its own data folder
serve() {
  local core=$1 grpc=$2 http=$3
  mkdir -p "$WORK/data$core"
  taskset -c "$core" python3 -m studio serve --demo-weights --no-asr --data-dir "$WORK/data$core" \
    --grpc-port "$grpc" --http-port "$http" --instances "$LEVEL" >"$WORK/serve$core.log" 2>&1 &
  PIDS+=($!)
}
ready() {  # ready HTTP_PORT: wait (bounded) for Triton's readiness
  for _ in $(seq 240); do
    curl -sf "http://127.0.0.1:$1/v2/health/ready" >/dev/null && return 0
    sleep 1
  done
  return 1
}
bench() {  # bench LABEL URLS
  python3 -m studio bench --model "$MODEL" --mode offline --concurrency "$LEVEL" --requests "$REQUESTS" \
    --warmup 2 --triton-url "$2" --out "$OUT" --label "$1" 2>&1 | tee -a "$LOG" | grep -v "^\[" | tail -n 12
}

say "model $MODEL, concurrency $LEVEL, $REQUESTS requests a run; $(nproc) cores; servers pinned to cores 0 and 1"
serve 0 18101 18100
serve 1 18201 18200
ready 18100 && ready 18200 || { say "a server did not start"; tail -n 20 "$WORK"/serve*.log; exit 1; }
say "one server (core 0)"
bench one-server "127.0.0.1:18101"
say "two servers (cores 0 and 1)"
bench two-servers "127.0.0.1:18101,127.0.0.1:18201"
