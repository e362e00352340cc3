#!/usr/bin/env bash
# The GPU measurements, in stages that fit one device call (600 s) each; BENCHMARKS.md names the stages
# behind each figure.
#
#   bash tools/gpu_bench.sh f5-serve,spark-step  # F5 end to end (fast + eager server) and the Spark step bench
#   SWEEP_FP8=1 SWEEP_LOOP_OFF=1 bash tools/gpu_bench.sh f5-serve  # ... plus the fast server with FP8 products
#                                           # (label fast_fp8) and without the engine thread (label loop_off)
#   SWEEP_WARM_ALL=1 bash tools/gpu_bench.sh f5-serve  # ... plus the fast server warming every bucket
#                                           # before capture (label warm_all; the default warms the first of each batch size)
#   bash tools/gpu_bench.sh spark-serve     # Spark end to end (fast + eager server)
#   bash tools/gpu_bench.sh offline         # F5 offline (16 and 32 NFE) and Spark offline c=1,16 + streaming c=1,8
#   bash tools/gpu_bench.sh f5-step-profile # where one F5 ODE step's time goes (kernels, attention backends;
#                                           # default buckets 1x864,8x6144, items x packed frames: F5_PROFILE_BUCKETS)
#   bash tools/gpu_bench.sh f5-fast         # F5 fast server only, offline + streaming c=1,8, with [timing] lines
#   bash tools/gpu_bench.sh f5-request-profile  # where one F5 request's engine time goes (pipeline phases)
#   bash tools/gpu_bench.sh checks          # what the objective checks (Whisper + two WavLM embeddings) add per generation
#   bash tools/gpu_bench.sh gpu-tests       # the `-m gpu` tests (pytest carried in .whl/pytest; GPU_TESTS=files)
#   bash tools/gpu_bench.sh all --tiny      # CPU dry run of every stage with tiny checkpoints
#
# Run from the repo copy with `.whl` carried (made by tools/gpu_wheels.sh: numpy 1.26, tritonclient, python-rapidjson, soundfile,
# cffi, pycparser, pypinyin and rjieba wheels for Python 3.12 and pytriton312.tar.xz, the nvidia-pytriton wheel
# repacked with only the 3.12 stub). Everything lands in $OUT: results.tgz (every JSON, log and plot,
# rewritten after each stage, so a call cut off by its limit still brings back what it measured),
# f5_summary.md, and bench.log. Stage limits keep the whole under a 600 s call.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STAGES=${1:-all}
TINY=${2:-}
OUT=${OUT:-$ROOT/gpu-bench-out}
W=${GPU_BENCH_WORK:-/tmp/gpu-bench}
mkdir -p "$OUT" "$W/spark"
PY=${PYTHON:-python3}
LOG=$OUT/bench.log
T0=$SECONDS
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
say() { printf '== [%4ds] %s\n' $((SECONDS - T0)) "$*" | tee -a "$LOG"; }
want() { [[ ",$STAGES," == *",$1,"* || $STAGES == all ]]; }
pack() { tar czf "$OUT/results.tgz" -C "$(dirname "$W")" "$(basename "$W")" 2>>"$LOG"; }

# spark_e2e EAGER_REQUESTS DEADLINE_S: Spark fast server offline c=1,16 and streaming c=1,8 (500 fixed
# tokens), then EAGER_REQUESTS offline requests on an eager server (0 = none), ending by DEADLINE_S.
# SPARK_SWEEP_ARGS adds options of tools/gpu_spark_sweep.py, e.g. "--ab-levers --attention kernel".
spark_e2e() {
  local eager=$1 deadline=$2
  # shellcheck disable=SC2206 - SPARK_SWEEP_ARGS is a list of options
  local extra=(${SPARK_SWEEP_ARGS:-})
  if [[ -n $TINY ]]; then
    timeout --kill-after=15 300 $PY tools/gpu_spark_sweep.py --out "$W/spark" --work "$W/spark-work" --tiny \
      --tokens 20 --offline 1,2 --streaming 1 --requests 2 --eager-requests "$eager" "${extra[@]}" \
      >"$W/spark_sweep.log" 2>&1
  else
    OUT=$W/spark timeout --kill-after=15 $((deadline - SECONDS + T0)) bash tools/gpu_spark_sweep.sh \
      --work "$W/spark-work" --offline 1,16 --streaming 1,8 --requests 16 --eager-requests "$eager" "${extra[@]}" \
      >"$W/spark_sweep.log" 2>&1
  fi
  say "Spark end to end exit $?"
  grep -v "^  \|^    \|^Traceback" "$W/spark_sweep.log" | tail -n 40 >>"$LOG"
  rm -rf "$W/spark-work"
  pack
}

say "stages $STAGES ${TINY:+(tiny)}; $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1)"
say "/dev/shm: $(df -h /dev/shm 2>/dev/null | tail -n 1)"
LIBDIR=$($PY -c "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))")
say "python LIBDIR $LIBDIR; CUDA libraries in it: $(ls "$LIBDIR" 2>/dev/null | grep -i -E 'cudnn|cublas|cudart|nvrtc' | tr '\n' ' ')"

if want f5-serve; then
  say "F5 sweep (tools/gpu_sweep.sh: fast server offline/streaming c=1,8, 32 NFE, cold prompt, warm restart, eager server)"
  OUT=$W/f5 SWEEP_WORK=$W/f5-work SWEEP_MICRO=0 SWEEP_SPARK_STEP=0 SWEEP_BUDGET_S=$((${F5_SERVE_LIMIT_S:-370} - 40)) \
    SWEEP_LEVELS=1,8 timeout --kill-after=15 "${F5_SERVE_LIMIT_S:-370}" bash tools/gpu_sweep.sh $TINY >"$W/f5.log" 2>&1
  say "F5 sweep exit $?"
  cp "$W/f5/summary.md" "$OUT/f5_summary.md" 2>/dev/null
  grep -E "^== " "$W/f5.log" | tail -n 40 >>"$LOG"
  rm -rf "$W/f5-work/ckpt" "$W/f5-work/data"  # checkpoints and caches: large, not results
  pack
fi

if want f5-fast; then
  say "F5 fast server (fast server only: offline and streaming c=1,8 at 16 NFE; [timing] lines summarised)"
  mkdir -p "$W/f5-work/results"
  CLOCKS=""
  if command -v nvidia-smi >/dev/null; then  # SM clock and power every 50 ms while the server runs
    nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,utilization.gpu --format=csv -lms 50 \
      >"$W/f5-work/results/gpu_clocks.csv" 2>/dev/null &
    CLOCKS=$!
  fi
  STUDIO_PROFILE_DIR=$W/f5-work/results/profile STUDIO_PROFILE_SKIP=${PROFILE_SKIP:-100000} \
    OUT=$W/f5 SWEEP_WORK=$W/f5-work SWEEP_MICRO=0 SWEEP_SPARK_STEP=0 SWEEP_COLD=0 SWEEP_EAGER=0 SWEEP_NFE32=0 \
    SWEEP_BUDGET_S=200 SWEEP_LEVELS=1,8 timeout --kill-after=15 230 bash tools/gpu_sweep.sh $TINY >"$W/f5.log" 2>&1
  say "F5 fast server exit $?"
  [[ -n $CLOCKS ]] && kill "$CLOCKS" 2>/dev/null
  grep -h "^\[profile\]\|\[profile\]" "$W/f5-work/results/tritonserver_fast.log" 2>/dev/null | head -n 5 >>"$LOG"
  cp "$W/f5/summary.md" "$OUT/f5_summary.md" 2>/dev/null
  grep -E "^== " "$W/f5.log" | tail -n 20 >>"$LOG"
  cat "$W/f5-work/results/timing_fast.json" >>"$LOG" 2>/dev/null
  rm -rf "$W/f5-work/ckpt" "$W/f5-work/data"
  pack
fi

if want offline; then
  say "F5 offline (fast server: 16 NFE c=1,8, 32 NFE c=1,8)"
  OUT=$W/f5 SWEEP_WORK=$W/f5-work SWEEP_MICRO=0 SWEEP_SPARK_STEP=0 SWEEP_STREAM=0 SWEEP_COLD=0 SWEEP_EAGER=0 \
    SWEEP_BUDGET_S=200 SWEEP_LEVELS=1,8 timeout --kill-after=15 200 bash tools/gpu_sweep.sh $TINY >"$W/f5.log" 2>&1
  say "F5 offline exit $?"
  cp "$W/f5/summary.md" "$OUT/f5_summary.md" 2>/dev/null
  rm -rf "$W/f5-work/ckpt" "$W/f5-work/data"
  pack
  say "Spark offline c=1,16 and streaming c=1,8 (500 fixed tokens)"
  spark_e2e 0 385
fi

if want f5-step-profile; then
  say "F5 step profile (tools/gpu_f5_profile.py: buckets (items x packed frames) ${F5_PROFILE_BUCKETS:-1x864,8x6144}, filled as the server's requests fill them; one request's sample + Vocos)"
  mkdir -p "$W/f5-profile"
  [[ -n $TINY ]] || $PY -m pip install -q --no-index --no-deps $(ls .whl/*.whl | grep -v /numpy-) >>"$LOG" 2>&1
  $PY tools/gpu_make_checkpoints.py "$W/f5-ck" $TINY >>"$LOG" 2>&1
  if [[ -n $TINY ]]; then PROF=(--tiny --device cpu --buckets 1x128,2x256 --requests "20:60|20:60,20:90");
  else PROF=(--buckets "${F5_PROFILE_BUCKETS:-1x864,8x6144}"); fi  # the workload's c=1 and c=8 buckets
  PROF+=(--vocos "$W/f5-ck/vocos-mel-24khz")
  timeout --kill-after=10 330 $PY tools/gpu_f5_profile.py --out "$W/f5-profile" "${PROF[@]}" >"$W/f5_profile.log" 2>&1
  say "F5 profile exit $?"
  grep -v '^ \|^\[\|^{\|^}' "$W/f5_profile.log" | tail -n 12 | tee -a "$LOG"
  rm -rf "$W/f5-ck"
  pack
fi

if want f5-request-profile; then
  say "F5 request profile (tools/gpu_f5_request_profile.py: F5Pipeline.synthesize phase by phase, offline and chunk 0)"
  [[ -n $TINY ]] || $PY -m pip install -q --no-index --no-deps $(ls .whl/*.whl | grep -v /numpy-) >>"$LOG" 2>&1
  mkdir -p "$W/f5-request"
  $PY tools/gpu_make_checkpoints.py "$W/f5-ck" $TINY >>"$LOG" 2>&1
  if [[ -n $TINY ]]; then RP=(--device cpu --requests 2 --iters 2); else RP=(); fi
  timeout --kill-after=10 300 $PY tools/gpu_f5_request_profile.py --checkpoints "$W/f5-ck" --out "$W/f5-request" \
    "${RP[@]}" >"$W/f5_request.log" 2>&1
  say "F5 request profile exit $?"
  grep -v 'USDT' "$W/f5_request.log" | tail -n 12 | tee -a "$LOG"
  cp "$W/f5-request/f5_request_profile.json" "$OUT/" 2>/dev/null
  rm -rf "$W/f5-ck"
  pack
fi

if want gpu-tests; then
  GPU_TESTS=${GPU_TESTS:-tests/test_f5_fast.py tests/test_f5_engine.py tests/test_spark_fast_step.py tests/test_spark_decode.py tests/test_spark_pipeline.py tests/test_f5_precision.py}
  say "GPU tests (python -m pytest -m gpu $GPU_TESTS: graph/compiled path equals eager, fused GELU, batched Vocos, the F5 engine thread, Spark graphs, bf16 and FP8 waveform SNR)"
  PT=$W/pytest-pkgs
  $PY -m pip install -q --no-index --no-deps --target "$PT" .whl/pytest/*.whl >>"$LOG" 2>&1
  [[ -n $TINY ]] || $PY -m pip install -q --no-index --no-deps $(ls .whl/*.whl | grep -v /numpy-) >>"$LOG" 2>&1
  # shellcheck disable=SC2086 - GPU_TESTS is a list of paths
  PYTHONPATH=$PT timeout --kill-after=10 "${GPU_TESTS_LIMIT_S:-360}" $PY -m pytest -q -s -p no:cacheprovider -m gpu $GPU_TESTS \
    >"$W/gpu_tests.log" 2>&1
  say "GPU tests exit $?"
  grep -h "^\[precision\]" "$W/gpu_tests.log" | tee -a "$LOG"
  tail -n 15 "$W/gpu_tests.log" | tee -a "$LOG"
  pack
fi

# The Spark stages share the stub environment set up by gpu_spark_sweep.sh (idempotent).
if want spark-step; then
  say "Spark decode step bench (eager; compiled graphs: matmul / kernel attention, 4 / 8 a replay, whole LM head / speech head; rows 1, 8, 16)"
  if [[ -n $TINY ]]; then STEP=(--tiny --device cpu --dtype float32); else STEP=(); fi
  timeout --kill-after=10 "${SPARK_STEP_LIMIT_S:-240}" $PY tools/gpu_spark_step_bench.py --out "$W/spark" "${STEP[@]}" >"$W/spark_step.log" 2>&1
  say "Spark step bench exit $?"
  grep -v -i "warn\|^$" "$W/spark_step.log" | tail -n 12 | tee -a "$LOG"
  pack
fi

if want checks; then
  say "Objective checks (tools/gpu_check_bench.py: full-size random Whisper large-v3-turbo + WavLM x-vector; per generation: 7 s output read back with ${CHECK_TOKENS:-32} fixed tokens, two embeddings)"
  mkdir -p "$W/checks"
  # shellcheck disable=SC1091 - the stub environment and the repacked tritonserver (tools/gpu_env.sh)
  [[ -n $TINY ]] || source tools/gpu_env.sh >>"$LOG" 2>&1
  if [[ -n $TINY ]]; then CK=(--tiny --requests 4 --concurrency 1,2); else CK=(--requests 16 --concurrency 1,8); fi
  timeout --kill-after=10 "${CHECKS_LIMIT_S:-360}" $PY tools/gpu_check_bench.py --out "$W/checks" \
    --tokens "${CHECK_TOKENS:-32}" "${CK[@]}" >"$W/checks.log" 2>&1
  say "Objective checks exit $?"
  grep -v "^  \|^    \|^Traceback" "$W/checks.log" | tail -n 20 | tee -a "$LOG"
  cp "$W/checks/check_bench.json" "$OUT/" 2>/dev/null
  pack
fi

if want spark-serve; then
  say "Spark end to end (offline c=1,16, streaming c=1,8, 500 fixed tokens; eager server offline c=1)"
  spark_e2e 1 "${SPARK_DEADLINE_S:-570}"
fi
say "done"
