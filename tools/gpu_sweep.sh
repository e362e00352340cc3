#!/usr/bin/env bash
# F5 speed sweep: one command on the GPU machine, about 6-8 minutes on an H100.
#
#   bash tools/gpu_sweep.sh           # GPU machine, repo copy as cwd; results land in $OUT
#   bash tools/gpu_sweep.sh --tiny    # CPU dry run: tiny checkpoints, few requests (tests the plumbing)
#
# Stages (each with its own time limit; a failed stage is logged and the sweep goes on):
#   0. install the carried wheels (.whl/*.whl) into this interpreter, so the Triton stub sees them
#   a. full-size random-weight checkpoints (F5TTS_v1_Base, 2545-line vocab, full Vocos), real layout
#   b. micro-benchmarks: DiT step eager vs fast (graph, compile), whole sample at 16/32 NFE, b1/b8
#   c. the fast server (STUDIO_F5_FAST unset = compile + graphs): start-up time, then
#      `python -m studio bench` offline c=1,2,4,8 and streaming c=1,2,4,8 (16 NFE, 16 requests),
#      offline 32 NFE c=1,8, offline cold prompt cache c=1
#   d. the eager server (STUDIO_F5_FAST=0): start-up, offline 16 NFE c=1,8
#   f. (if time is left) the Spark LLM decode step, eager vs CUDA graphs (tools/gpu_spark_step_bench.py)
#   e. summary: $OUT/summary.md (tables for BENCHMARKS.md + target checks), $OUT/summary.json,
#      $OUT/results.tgz (every JSON, log and plot), $OUT/sweep.log
# Environment: OUT (default ./sweep-out), SWEEP_WORK (scratch, default /tmp/f5-sweep),
# SWEEP_BUDGET_S (skip optional stages once this much wall time is spent; default 500), PYTHON,
# SWEEP_MICRO=0 (skip stage b), SWEEP_SPARK_STEP=0 (skip stage f), SWEEP_LEVELS (default 1,2,4,8),
# SWEEP_REQUESTS (default 16), SWEEP_SAMPLED=1 (offline c=1 again with nvidia-smi sampling beside it, label fast_sampled), SWEEP_STREAM=0 / SWEEP_COLD=0 / SWEEP_EAGER=0 / SWEEP_RESTART=0 (skip those runs;
# the restart is a second start of the fast server on the same data folder: start-up with a warm compile cache),
# SWEEP_FP8=1 (add the fast server with FP8 products, STUDIO_F5_FP8=1: offline c=1,8 under the label fast_fp8),
# SWEEP_LOOP_OFF=1 (add the fast server without the engine's continuous batching, on by default on a GPU,
# STUDIO_F5_ENGINE_LOOP=0: label loop_off), SWEEP_WARM_ALL=1 (add the fast server warming every bucket
# before capture, STUDIO_F5_CAPTURE_WARMUP=all: label warm_all; its start-up compares with fast-restart's,
# both on a warm compile cache), SWEEP_GATHER_ON=1 (add the fast server whose engine waits up to 20 ms
# after a batch for every request in flight, STUDIO_F5_ENGINE_GATHER_MS=20: label gather_on),
# SWEEP_VARIANTS="label:VAR=VALUE ..." (more variants, one server each), SWEEP_TRACE=1 (add the fast server
# with Triton tracing every request, label traced: tools/trace_legs.py splits the way through the server),
# SWEEP_VARIANT_NEED_S (budget a variant needs left to start; default 150), SWEEP_AGAIN=1 (offline c=1 once
# more on the fast server after its other runs, label fast_again).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
TINY=0
[[ "${1:-}" == "--tiny" ]] && TINY=1
OUT=${OUT:-$ROOT/sweep-out}
WORK=${SWEEP_WORK:-/tmp/f5-sweep}
RES=$WORK/results
CK=$WORK/ckpt
PY=${PYTHON:-python3}
BUDGET=${SWEEP_BUDGET_S:-500}
HTTP_PORT=${SWEEP_HTTP_PORT:-18000}
GRPC_PORT=${SWEEP_GRPC_PORT:-18001}
mkdir -p "$OUT" "$RES"
export STUDIO_DATA_DIR=$WORK/data HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 STUDIO_TIMING_LOG=1  # [timing] lines: tools/gpu_timing.py
unset STUDIO_F5_FAST
LOG=$OUT/sweep.log
: >"$LOG"
T0=$SECONDS
SERVE_PID=""

say() { printf '== [%4ds] %s\n' $((SECONDS - T0)) "$*" | tee -a "$LOG"; }

# run LIMIT_S NAME CMD...: output to $RES/NAME.log, its tail to the sweep log; never stops the sweep
run() {
  local limit=$1 name=$2
  shift 2
  say "$name: $*"
  timeout --kill-after=20 "$limit" "$@" >"$RES/$name.log" 2>&1
  local rc=$?
  tail -n 15 "$RES/$name.log" | tee -a "$LOG"
  if [[ $rc -ne 0 ]]; then say "$name FAILED (exit $rc)"; fi
  return 0
}

# time_left NEED_S: true while NEED_S more seconds fit in the budget
time_left() { (( SECONDS - T0 + $1 <= BUDGET )); }

stop_server() {
  if [[ -n "$SERVE_PID" ]] && kill -0 "$SERVE_PID" 2>/dev/null; then
    say "stopping server (pid $SERVE_PID)"
    kill -TERM "$SERVE_PID"
    for _ in $(seq 60); do kill -0 "$SERVE_PID" 2>/dev/null || break; sleep 1; done
    kill -0 "$SERVE_PID" 2>/dev/null && kill -KILL "$SERVE_PID"
  fi
  SERVE_PID=""
  if [[ -n "${WATCH_PID:-}" ]]; then kill "$WATCH_PID" 2>/dev/null; WATCH_PID=""; fi
}
trap stop_server EXIT

# start_server LABEL FAST_VALUE: the F5 models only; waits for readiness (start-up time in startup_LABEL.json)
start_server() {
  local label=$1 fast=$2 ready=$RES/startup_$1.json
  rm -f "$ready"
  say "server '$label' starting (STUDIO_F5_FAST=${fast:-<unset>})"
  if [[ -n "$fast" ]]; then export STUDIO_F5_FAST=$fast; else unset STUDIO_F5_FAST; fi
  $PY tools/gpu_serve.py --checkpoints "$CK" --data-dir "$STUDIO_DATA_DIR" --http-port "$HTTP_PORT" \
    --grpc-port "$GRPC_PORT" --ready-file "$ready" --label "$label" \
    --log-copy "$RES/tritonserver_$label.log" >"$RES/serve_$label.log" 2>&1 &
  SERVE_PID=$!
  unset STUDIO_F5_FAST
  bash tools/stub_watch.sh "$RES/stubs_$label.log" &  # stub processes starting and exiting (dead instances)
  WATCH_PID=$!
  for _ in $(seq 600); do
    [[ -f "$ready" ]] && break
    kill -0 "$SERVE_PID" 2>/dev/null || break
    sleep 0.5
  done
  tail -n 5 "$RES/serve_$label.log" | tee -a "$LOG"
  if [[ -f "$ready" ]] && grep -q '"ok": true' "$ready"; then
    say "server '$label' ready: $(grep -o '"startup_s": [0-9.]*' "$ready")"
    return 0
  fi
  say "server '$label' did not start"
  stop_server
  return 1
}

# snapshot: summary + tarball of everything so far, so a sweep cut off by a time limit still returns results
snapshot() {
  local log label
  for log in "$RES"/tritonserver_*.log; do  # every server's [timing] lines: timing_LABEL.json
    [[ -f $log ]] || continue
    label=${log##*/tritonserver_}
    $PY tools/gpu_timing.py "$log" --json "$RES/timing_${label%.log}.json" >/dev/null 2>&1
  done
  $PY tools/gpu_summary.py "$RES" --out "$OUT" >"$RES/summary.log" 2>&1 || say "summary FAILED: $(tail -n 5 "$RES/summary.log")"
  tar czf "$OUT/results.tgz" -C "$WORK" results 2>>"$LOG"
}

bench() { # bench NAME LIMIT_S ARGS...: python -m studio bench against the running server
  local name=$1 limit=$2
  shift 2
  run "$limit" "$name" $PY -m studio bench --model f5 --triton-url "127.0.0.1:$GRPC_PORT" --out "$RES" "$@"
}

if [[ $TINY == 1 ]]; then
  REQ=4; LEVELS=1,2; LEVELS_SHORT=1,2; MICRO=(--tiny --device cpu --dtype float32 --frames 200 --modes eager,compile)
  MAKE=(--tiny)
else
  REQ=${SWEEP_REQUESTS:-16}; LEVELS=${SWEEP_LEVELS:-1,2,4,8}; LEVELS_SHORT=1,8; MICRO=(); MAKE=()
fi

# -- 0. environment ---------------------------------------------------------------------------------
say "sweep start (tiny=$TINY) in $ROOT; results in $RES; OUT=$OUT"
if [[ $TINY == 0 ]] && compgen -G ".whl/*.whl" >/dev/null; then
  run 120 install_wheels $PY -m pip install -q --no-index --no-deps $(ls .whl/*.whl | grep -v /numpy-)
  # The 2.51 Python backend stub breaks BYTES tensors under numpy 2, while the image's scipy and
  # transformers need numpy 2: the stub gets its own environment, numpy 1.26 first, the rest of
  # the image's packages after it (a .pth file); the server puts its bin/ first on the stub's PATH.
  if compgen -G ".whl/numpy-1.*.whl" >/dev/null; then
    STUB_ENV=/tmp/stub-env
    SITE=$($PY -c "import site; print(site.getsitepackages()[0])")
    VER=$($PY -c "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')")
    $PY -m venv --without-pip "$STUB_ENV"
    run 120 install_stub_numpy $PY -m pip install -q --no-index --no-deps --target "$STUB_ENV/lib/python$VER/site-packages" .whl/numpy-1.*.whl
    # the image's packages, linked one by one, except numpy (1.26 above) and what is built against
    # numpy 2 and optional for us (scipy, scikit-learn): transformers then skips them
    for entry in "$SITE"/*; do
      case "$(basename "$entry")" in numpy*|scipy*|sklearn*|scikit_learn*) continue ;; esac
      [[ -e "$STUB_ENV/lib/python$VER/site-packages/$(basename "$entry")" ]] || ln -s "$entry" "$STUB_ENV/lib/python$VER/site-packages/"
    done
    export STUDIO_STUB_PYTHON_BIN=$STUB_ENV/bin
    "$STUB_ENV/bin/python" -c "import numpy, torch; print('stub env: numpy', numpy.__version__, 'torch', torch.__version__)" | tee -a "$LOG"
  fi
fi
# The nvidia-pytriton wheel travels repacked as .tar.xz (only the 3.12 stub; xz keeps the carried
# tree under the 64 MiB limit next to numpy 1.26, which the 2.51 Python backend stub needs:
# with numpy 2 its BYTES tensors break).
if [[ $TINY == 0 ]] && [[ -f .whl/pytriton312.tar.xz ]]; then
  run 120 install_pytriton $PY -c "import site, tarfile; tarfile.open('.whl/pytriton312.tar.xz').extractall(site.getsitepackages()[0])"
fi
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | head -1 >"$RES/gpu.txt"
else
  echo "CPU only ($(nproc) cores)" >"$RES/gpu.txt"
fi
$PY - >>"$LOG" 2>&1 <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available())
try:
    from tts.f5.text import text_to_units
    text_to_units("Hello world.")
    print("English text front end: ok")
except Exception as exc:  # the GPU machine has no jieba
    print(f"WARNING: the F5 text front end fails on English text here ({type(exc).__name__}: {exc}); "
          f"the Triton stages will fail")
# The wheel's Python backend stub needs this interpreter's libpython (studio/server.py puts sysconfig's
# LIBDIR on LD_LIBRARY_PATH): list what the dynamic linker cannot find.
import importlib.util, os, subprocess, sysconfig
from pathlib import Path
spec = importlib.util.find_spec("pytriton")
if spec is None:
    print("WARNING: the nvidia-pytriton wheel is not installed")
else:
    root = Path(spec.origin).parent / "tritonserver"
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / ver / "triton_python_backend_stub"
    env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(
        [str(root.parent.parent / "nvidia_pytriton.libs"), sysconfig.get_config_var("LIBDIR") or "",
         os.environ.get("LD_LIBRARY_PATH", "")]))
    for exe in (root / "bin" / "tritonserver", stub):
        try:
            out = subprocess.run(["ldd", str(exe)], capture_output=True, text=True, env=env, timeout=20).stdout
            missing = [ln.strip() for ln in out.splitlines() if "not found" in ln]
            print(f"{exe.name}: " + ("missing " + "; ".join(missing) if missing else "all shared libraries found"))
        except (OSError, subprocess.SubprocessError) as exc:
            print(f"{exe.name}: ldd failed ({exc})")
EOF
tail -n 4 "$LOG"

# -- a. checkpoints -----------------------------------------------------------------------------------
run 180 make_checkpoints $PY tools/gpu_make_checkpoints.py "$CK" "${MAKE[@]}"

# -- b. micro-benchmarks ------------------------------------------------------------------------------
[[ ${SWEEP_MICRO:-1} == 0 ]] || run 300 micro $PY tools/gpu_f5_bench.py --checkpoints "$CK" --out "$RES" "${MICRO[@]}"
snapshot

# -- c. the fast server -----------------------------------------------------------------------------
if start_server fast ""; then
  bench bench_fast_offline 180 --mode offline --concurrency "$LEVELS" --requests "$REQ" --nfe 16 --label fast
  # SWEEP_SAMPLED=1: c=1 again with nvidia-smi sampling the GPU every 0.2 s beside the run (what it costs)
  [[ ${SWEEP_SAMPLED:-0} != 0 ]] && bench bench_fast_sampled 90 --mode offline --concurrency 1 --requests "$REQ" --nfe 16 --gpu-sample-s 0.2 --label fast_sampled
  [[ ${SWEEP_STREAM:-1} != 0 ]] && time_left 60 && bench bench_fast_stream 180 --mode streaming --concurrency "$LEVELS" --requests "$REQ" --nfe 16 --label fast
  [[ ${SWEEP_NFE32:-1} != 0 ]] && time_left 90 && bench bench_fast_nfe32 120 --mode offline --concurrency "$LEVELS_SHORT" --requests "$REQ" --nfe 32 --label fast_nfe32
  [[ ${SWEEP_COLD:-1} != 0 ]] && time_left 90 && bench bench_fast_cold 60 --mode offline --concurrency 1 --requests 8 --nfe 16 --cold-cache --label fast_cold
  # SWEEP_AGAIN=1: offline c=1 once more on the same server, last (label fast_again): a first server
  # slower than later ones is either this process's state (slow again) or the machine's first minutes
  [[ ${SWEEP_AGAIN:-0} != 0 ]] && time_left 60 && bench bench_fast_again 90 --mode offline --concurrency 1 --requests "$REQ" --nfe 16 --label fast_again
  stop_server
  # the same server started again on the same data folder: the compile cache is warm (start-up only)
  if [[ ${SWEEP_RESTART:-1} != 0 ]] && time_left 100 && start_server fast-restart ""; then stop_server; fi
fi
snapshot

# -- c2. variants of the fast server, offline c=1,8 each: SWEEP_FP8=1 the opt-in FP8 products
# (STUDIO_F5_FP8=1, label fast_fp8); SWEEP_LOOP_OFF=1 without the engine's continuous batching on a
# thread of its own (STUDIO_F5_ENGINE_LOOP=0, label loop_off; the loop is on by default on a GPU)
variant() { # variant LABEL VAR=VALUE
  local label=$1 setting=$2
  time_left "${SWEEP_VARIANT_NEED_S:-150}" || { say "variant $label skipped (budget)"; return 0; }
  export "${setting?}"  # the server started next inherits it
  if start_server "$label" ""; then
    unset "${setting%%=*}"
    grep -h -o '"fp8": [a-z]*' "$RES/serve_$label.log" "$RES/tritonserver_$label.log" 2>/dev/null | head -n 1 | tee -a "$LOG"
    bench "bench_$label" 150 --mode offline --concurrency "$LEVELS_SHORT" --requests "$REQ" --nfe 16 --label "$label"
    stop_server
    snapshot
  else
    unset "${setting%%=*}"
  fi
}
[[ ${SWEEP_FP8:-0} != 0 ]] && variant fast_fp8 STUDIO_F5_FP8=1
[[ ${SWEEP_LOOP_OFF:-0} != 0 ]] && variant loop_off STUDIO_F5_ENGINE_LOOP=0
[[ ${SWEEP_WARM_ALL:-0} != 0 ]] && variant warm_all STUDIO_F5_CAPTURE_WARMUP=all
[[ ${SWEEP_GATHER_ON:-0} != 0 ]] && variant gather_on STUDIO_F5_ENGINE_GATHER_MS=20
# SWEEP_VARIANTS="label:VAR=VALUE ...": any other setting, one server each (e.g. nofreeze:STUDIO_GC_FREEZE=0)
for spec in ${SWEEP_VARIANTS:-}; do variant "${spec%%:*}" "${spec#*:}"; done
# SWEEP_TRACE=1: the fast server once more with Triton tracing every request (label traced); the way
# through the server leg by leg (tools/trace_legs.py) lands in trace_legs.json and the sweep log
if [[ ${SWEEP_TRACE:-0} != 0 ]]; then
  variant traced "STUDIO_TRITON_TRACE=$RES/trace_traced.json"
  $PY tools/trace_legs.py "$RES/trace_traced.json" --json "$RES/trace_legs.json" 2>&1 | tee -a "$LOG"
fi

# -- d. the eager server (the CPU code path on CUDA) ---------------------------------------------------
if [[ ${SWEEP_EAGER:-1} != 0 ]] && time_left 100 && start_server eager 0; then
  bench bench_eager_offline 120 --mode offline --concurrency "$LEVELS_SHORT" --requests 8 --nfe 16 --label eager
  stop_server
else
  say "eager comparison skipped or failed (budget ${BUDGET}s, spent $((SECONDS - T0))s)"
fi

# -- f. Spark decode step (optional): eager forward_step vs CUDA graphs, random 0.5 B LLM ------------
if [[ ${SWEEP_SPARK_STEP:-1} != 0 ]] && time_left 60; then
  if [[ $TINY == 1 ]]; then SPARK=(--tiny --device cpu --dtype float32); else SPARK=(); fi
  run 120 spark_step $PY tools/gpu_spark_step_bench.py --out "$RES" "${SPARK[@]}"
fi

# -- e. summary -------------------------------------------------------------------------------------
snapshot
say "done in $((SECONDS - T0)) s; $OUT holds summary.md, summary.json, results.tgz, sweep.log"
cat "$OUT/summary.md" 2>/dev/null
