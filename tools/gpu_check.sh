#!/usr/bin/env bash
# One command on a GPU host: venv + `pip install -e .[gpu,test]`, the GPU-only tests (tests/gpu: cuDNN and blockwise
# attention == reference in bf16, a train step's loss on 1 GPU == the CPU's, no recompiles), `tools/bench.py --gpu`
# on experiments/llama_1b.py, and ONE JSON of everything (written even when a stage fails or times out; the failed
# stage, its exit status and the tail of its log are in it). About 5-8 minutes on one H100/H200, most of it the
# first install and the llama_1b compile.
#
#   tools/gpu_check.sh [--out=gpu_check.json] [--venv=DIR] [--no-install] [--steps=10]
#   tools/gpu_check.sh --cpu      # no GPU needed: the same stages and JSON on the CPU with the current python (no
#                                 # install; the GPU tests skip with their reason; the bench runs its GPU mode on
#                                 # experiments/tiny.py with attention_impl=xla). Checks this script, not a GPU.
#
# Exit status: 0 when every stage passed, 1 otherwise (the JSON says which).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$REPO/gpu_check.json"
VENV="$REPO/.venv-gpu"
MODE=gpu
INSTALL=1
STEPS=10
for arg in "$@"; do
  case "$arg" in
    --out=*) OUT="${arg#--out=}" ;;
    --venv=*) VENV="${arg#--venv=}" ;;
    --no-install) INSTALL=0 ;;
    --steps=*) STEPS="${arg#--steps=}" ;;
    --cpu) MODE=cpu; INSTALL=0 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac

# Per-stage limits (seconds): together under the 8-minute budget with room for a slow pip mirror.
INSTALL_TIMEOUT="${GPU_CHECK_INSTALL_TIMEOUT:-240}"
TESTS_TIMEOUT="${GPU_CHECK_TESTS_TIMEOUT:-150}"
BENCH_TIMEOUT="${GPU_CHECK_BENCH_TIMEOUT:-240}"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
STAGES="$WORK/stages.jsonl"
: > "$STAGES"
STARTED="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
SYS_PY="${PYTHON:-$(command -v python3)}"
PY="$SYS_PY"  # until the venv exists; the report needs only the standard library

finish() {
  # Runs on every exit (a failed stage, a timeout, Ctrl-C): one JSON from whatever the stages left in $WORK.
  local rc=$?
  set +e
  local report_rc
  "$SYS_PY" "$REPO/tools/gpu_check_report.py" --work="$WORK" --out="$OUT" --mode="$MODE" --started="$STARTED" \
      --repo="$REPO"
  report_rc=$?
  echo "gpu_check: results in $OUT (stage logs in $WORK)"
  if [ "$rc" -eq 0 ] && [ "$report_rc" -ne 0 ]; then rc=1; fi
  exit "$rc"
}
trap finish EXIT

# run_stage NAME TIMEOUT_S CMD...: runs CMD with a time limit, its output in $WORK/NAME.log; records the outcome.
# A failed stage does not stop the later ones (each is useful alone); the script's exit status says if any failed.
FAILED=0
run_stage() {
  local name="$1" limit="$2"; shift 2
  local t0 t1 rc status
  t0="$(date +%s.%N)"
  echo "gpu_check: [$name] (limit ${limit}s) $*"
  set +e
  timeout --kill-after=15 "$limit" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  set -e
  t1="$(date +%s.%N)"
  case "$rc" in
    0) status=ok ;;
    124|137) status=timed_out ;;
    *) status=failed ;;
  esac
  [ "$status" = ok ] || FAILED=1
  printf '{"name": "%s", "status": "%s", "rc": %d, "seconds": %s, "limit_s": %d, "log": "%s"}\n' \
      "$name" "$status" "$rc" "$(awk "BEGIN {print $t1 - $t0}")" "$limit" "$WORK/$name.log" >> "$STAGES"
  echo "gpu_check: [$name] $status (rc $rc)"
}

cd "$REPO"
run_stage host 60 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    || echo "nvidia-smi: not available"; uname -a; git -C "'"$REPO"'" rev-parse HEAD || true'

if [ "$INSTALL" -eq 1 ]; then
  run_stage install "$INSTALL_TIMEOUT" env TWEETJAX_VENV="$VENV" TWEETJAX_EXTRAS="gpu,test" \
      bash -c 'source "'"$REPO"'/tools/_venv.sh" && python -c "import jax; print(jax.__version__, jax.devices())"'
  PY="$VENV/bin/python"
elif [ "$MODE" = gpu ] && [ -x "$VENV/bin/python" ]; then
  PY="$VENV/bin/python"
fi

if [ "$MODE" = gpu ]; then
  export JAX_PLATFORMS=cuda,cpu  # the GPU is the default backend; the CPU stays for the CPU side of a comparison
  BENCH_ARGS=(--gpu "--steps=$STEPS")
else
  export JAX_PLATFORMS=cpu
  BENCH_ARGS=(--gpu --gpu_allow_cpu --gpu_config=experiments/tiny.py --gpu_attention=xla --gpu_rows_per_device=2
              --steps=2)
fi

run_stage tests "$TESTS_TIMEOUT" "$PY" -m pytest -q -n 0 -p no:cacheprovider "$REPO/tests/gpu" \
    --junitxml="$WORK/tests.xml"
run_stage bench "$BENCH_TIMEOUT" "$PY" "$REPO/tools/bench.py" "${BENCH_ARGS[@]}" --json_out="$WORK/bench.json"

exit "$FAILED"
