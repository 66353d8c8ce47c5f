#!/usr/bin/env bash
# GPU evidence in one command, sized for one 10-minute call on a lent H100/H200
# (torch 2.11, Python 3.12, no internet):
#   1. pip install --no-build-isolation .   (MAX_JOBS=16, TORCH_CUDA_ARCH_LIST=9.0)
#   2. pytest tests -m "cuda and not fuzz"
#   3. python -m fastnn.bench peaks; the benchmarks (--benchmark-only); the report
#   4. everything in one folder: $OUT if set, else benchmarks/results/<gpu>-<date>/
#      <gpu>-<date>.{json,md,png,peaks.json,profile.md}, build.log, tests.log, bench.log, summary.txt
#      (9 files; profile.md: host vs kernel time per step of the slow cases, if time is left)
# It keeps going after failing tests (the report is still written) and exits nonzero at the end
# if any step failed. Each step gets what is left of the budget, so the report always fits.
#
# usage: bash benchmarks/gpu_check.sh [--skip-build] [--skip-tests] [--skip-bench] [--full] [--fuzz] [-k EXPR]
#   --skip-build  use the fastnn already installed (e.g. a second call on a still-warm machine)
#   --fuzz        step 2 runs the 1000-example property tests (-m "cuda and fuzz", issue 10) instead of
#                 the other CUDA tests; with --skip-build --skip-bench it is a call of its own
#   --full        the larger benchmark sweep (--fastnn-full)
#   -k EXPR       only benchmarks matching EXPR (pytest -k)
# env: FASTNN_COMMIT       the commit measured (the device copy may have no .git), else git rev-parse
#      FASTNN_CHECK_BUDGET seconds for the whole script (default 560)
#      FASTNN_TESTS_TIMEOUT seconds for step 2 at most (default 240)
#      PYTHON              interpreter (default: python, else python3)
set -u -o pipefail
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

SKIP_BUILD=0 SKIP_TESTS=0 SKIP_BENCH=0 FULL="" KEXPR=() MARK="cuda and not fuzz"
while [ $# -gt 0 ]; do
  case "$1" in
    --skip-build) SKIP_BUILD=1 ;;
    --skip-tests) SKIP_TESTS=1 ;;
    --skip-bench) SKIP_BENCH=1 ;;
    --full) FULL="--fastnn-full" ;;
    --fuzz) MARK="cuda and fuzz" ;;
    -k) shift; KEXPR=(-k "$1") ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
# CUDA tests in parallel processes when pytest-xdist is there (it is on the lent GPU machines)
XDIST=()
python3 -c "import xdist" 2>/dev/null && XDIST=(-n "${FASTNN_TEST_WORKERS:-6}")
ROOT=$(pwd)
PY=${PYTHON:-python}
command -v "$PY" >/dev/null 2>&1 || PY=python3
# -P: never put the current folder on sys.path, so `python -m ...` imports the installed fastnn
# (with its built _C), not the source tree here (which has none).
PYP=("$PY" -P)
BUDGET=${FASTNN_CHECK_BUDGET:-560}
RESERVE=30   # seconds kept back for merging, the report and the summary
left() { echo $((BUDGET - SECONDS)); }

# --- what is measured, and where it goes
COMMIT=${FASTNN_COMMIT:-}
if [ -z "$COMMIT" ]; then
  COMMIT=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || true)
  if [ -n "$COMMIT" ] && [ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    COMMIT="$COMMIT-dirty"
  fi
fi
COMMIT=${COMMIT:-unknown}
export FASTNN_COMMIT=$COMMIT
GPU_NAME=$("${PYP[@]}" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")' 2>/dev/null || echo unknown)
GPU_SLUG=$(echo "$GPU_NAME" | tr 'A-Z' 'a-z' | sed -e 's/nvidia//g' -e 's/[^a-z0-9]\+/-/g' -e 's/^-//' -e 's/-$//')
NAME="${GPU_SLUG:-unknown}-$(date -u +%Y-%m-%d)"
DIR=${OUT:-$ROOT/benchmarks/results/$NAME}
mkdir -p "$DIR" || exit 2
BUILD_LOG=$DIR/build.log TESTS_LOG=$DIR/tests.log BENCH_LOG=$DIR/bench.log SUMMARY=$DIR/summary.txt
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

STEPS=() FAILED=0
note() { STEPS+=("$(printf '%-28s %-34s %5ss' "$1" "$2" "$3")"); }
# run_step NAME LIMIT LOG CMD...: runs CMD under `timeout`, appending to LOG; returns its status.
# pytest's exit 5 (nothing collected/selected, e.g. by -k) is reported but is not a failure.
run_step() {
  local name=$1 limit=$2 log=$3; shift 3
  if [ "$limit" -lt 15 ]; then
    note "$name" "skipped: out of time" 0; FAILED=1; return 124
  fi
  local t0=$SECONDS rc
  echo "=== $name (limit ${limit}s, $(date -u +%H:%M:%S)): $*" >>"$log"
  echo "... $name (limit ${limit}s)"
  timeout -k 10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then note "$name" ok $((SECONDS - t0))
  elif [ $rc -eq 5 ] && [ "${1:-}" = "${PYP[0]}" ]; then note "$name" "nothing selected (pytest exit 5)" $((SECONDS - t0))
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then note "$name" "TIMED OUT (${limit}s)" $((SECONDS - t0)); FAILED=1
  else note "$name" "FAILED (exit $rc)" $((SECONDS - t0)); FAILED=1
  fi
  echo "=== $name: exit $rc after $((SECONDS - t0))s" >>"$log"
  return $rc
}
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

echo "fastnn gpu_check: $GPU_NAME, commit $COMMIT, writing to $DIR"

# --- 1. build and install against this machine's torch
BUILD_OK=1
if [ $SKIP_BUILD -eq 0 ]; then
  {
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    "${PYP[@]}" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda)'
  } >>"$BUILD_LOG" 2>&1
  # --no-index: there is no internet; fail at once on a missing dependency instead of retrying
  run_step "build (pip install .)" $(( $(left) - RESERVE - 60 )) "$BUILD_LOG" \
    env MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 "$PY" -m pip install -q --no-build-isolation --no-index \
        --progress-bar off . || BUILD_OK=0
else
  note "build" "skipped (--skip-build)" 0
fi
# the installed fastnn must import from site-packages with its extension (and CUDA kernels on a GPU)
( cd "$TMP" && "${PYP[@]}" - ) >>"$BUILD_LOG" 2>&1 <<'EOF'
import sys, torch, fastnn
from fastnn import _ext
print("fastnn imported from", fastnn.__file__)
fastnn.info()
if _ext.EXT is None:
    sys.exit(f"fastnn's extension is unusable: {_ext.EXT_REASON}")
if torch.cuda.is_available() and not _ext.cuda_compiled():
    sys.exit("a GPU is visible but fastnn._C was built without CUDA kernels")
EOF
if [ $? -eq 0 ]; then note "import check" ok 0; else note "import check" "FAILED (see build.log)" 0; FAILED=1; BUILD_OK=0; fi
if [ $BUILD_OK -eq 0 ]; then
  echo "--- build.log (last 40 lines)"; tail -n 40 "$BUILD_LOG"
fi

# --- 2. the CUDA tests
TESTS_LINE=""
if [ $SKIP_TESTS -eq 1 ]; then note "tests -m cuda" "skipped (--skip-tests)" 0
elif [ $BUILD_OK -eq 0 ]; then note "tests -m cuda" "skipped: build failed" 0
else
  if [ $SKIP_BENCH -eq 1 ]; then lim=$(( $(left) - RESERVE )); else lim=$(min "${FASTNN_TESTS_TIMEOUT:-240}" $(( $(left) - RESERVE - 150 ))); fi
  # the 1000-example property tests take minutes of Triton compiles: they run on their own, with
  # --fuzz (docs/robustness.md)
  run_step "tests -m \"$MARK\"" "$lim" "$TESTS_LOG" "${PYP[@]}" -m pytest tests -m "$MARK" -q -rfE -p no:cacheprovider "${XDIST[@]}"
  TESTS_LINE=$(grep -E '(passed|failed|error|skipped|deselected|no tests ran)' "$TESTS_LOG" | tail -n 1)
fi

# --- 3. peaks, benchmarks (one pytest per file, so a timeout loses one file, not all), report
REPORT_TXT=""
if [ $SKIP_BENCH -eq 1 ]; then note "benchmarks" "skipped (--skip-bench)" 0
elif [ $BUILD_OK -eq 0 ]; then note "benchmarks" "skipped: build failed" 0
else
  run_step "peaks" "$(min 90 $(( $(left) - RESERVE )))" "$BENCH_LOG" \
    "${PYP[@]}" -m fastnn.bench peaks --out "$DIR/$NAME.peaks.json"
  shopt -s nullglob
  files=()
  for f in benchmarks/bench_*.py; do [ "$f" = benchmarks/bench_utils.py ] || files+=("$f"); done
  [ ${#files[@]} -eq 0 ] && { note "benchmarks" "FAILED: no benchmarks/bench_*.py" 0; FAILED=1; }
  for f in "${files[@]}"; do
    op=$(basename "$f" .py)
    run_step "bench ${op#bench_}" $(( $(left) - RESERVE )) "$BENCH_LOG" \
      "${PYP[@]}" -m pytest "$f" --benchmark-only --benchmark-json="$TMP/$op.json" -q -rfE -p no:cacheprovider \
      $FULL "${KEXPR[@]}"
  done
  # issue 8's example: a converted torchvision resnet50 against the original, same run
  EXAMPLE_TXT=""
  if [ -f examples/convert_resnet.py ]; then
    run_step "example convert_resnet" "$(min 120 $(( $(left) - RESERVE - 20 )))" "$BENCH_LOG" \
      "${PYP[@]}" examples/convert_resnet.py
    EXAMPLE_TXT=$(sed -n '/=== example convert_resnet/,$p' "$BENCH_LOG" | grep -E "speedup|error|resnet50" | tail -n 4)
  fi
  jsons=("$TMP"/bench_*.json)
  if [ ${#jsons[@]} -gt 0 ]; then
    "${PYP[@]}" -m fastnn.bench merge "${jsons[@]}" --out "$DIR/$NAME.json" --commit "$COMMIT" >>"$BENCH_LOG" 2>&1 \
      || { note "merge" FAILED 0; FAILED=1; }
  fi
  if [ -f "$DIR/$NAME.json" ]; then
    chart=()
    if ! "${PYP[@]}" -c 'import matplotlib' >/dev/null 2>&1; then
      chart=(--no-chart)
      note "chart" "skipped: no matplotlib here" 0   # redo the report elsewhere from the JSON
    fi
    peaks=()
    [ -f "$DIR/$NAME.peaks.json" ] && peaks=(--peaks "$DIR/$NAME.peaks.json")
    echo "=== report" >>"$BENCH_LOG"
    if REPORT_TXT=$(timeout 120 "${PYP[@]}" -m fastnn.bench report "$DIR/$NAME.json" --out "$DIR" --name "$NAME" \
                    "${peaks[@]}" "${chart[@]}" 2>>"$BENCH_LOG"); then
      note "report" ok 0
    else
      note "report" FAILED 0; FAILED=1
    fi
    echo "$REPORT_TXT" >>"$BENCH_LOG"
  else
    note "report" "skipped: no benchmark results" 0; FAILED=1
  fi
  # where the slow cases spend their time (host vs kernels), with what time is left: it never
  # takes time from the benchmarks, and running out of time for it is not a failure
  if [ $(( $(left) - RESERVE )) -ge 45 ]; then
    failed_before=$FAILED
    run_step "profile (host vs kernels)" "$(min 120 $(( $(left) - RESERVE )))" "$BENCH_LOG" \
      "${PYP[@]}" -m fastnn.bench profile --out "$DIR/$NAME.profile.md"
    FAILED=$failed_before  # a diagnostic: its failure or timeout shows in the summary, not in the exit status
  else
    note "profile (host vs kernels)" "skipped: out of time" 0
  fi
fi

# --- 4. keep the logs within what the device tool brings back (16 MiB a file)
for log in "$BUILD_LOG" "$TESTS_LOG" "$BENCH_LOG"; do
  if [ -f "$log" ] && [ "$(stat -c %s "$log")" -gt $((15 * 1024 * 1024)) ]; then
    tail -c $((15 * 1024 * 1024)) "$log" >"$TMP/cut" && mv "$TMP/cut" "$log"
  fi
done

{
  echo "fastnn gpu_check | $GPU_NAME | commit $COMMIT | $(date -u +%Y-%m-%dT%H:%M:%SZ) | ${SECONDS}s"
  echo "results: $DIR ($NAME.{json,md,png}; commit them as benchmarks/results/$NAME.*)"
  echo
  printf '%-28s %-34s %6s\n' step status time
  printf '%s\n' "${STEPS[@]}"
  [ -n "$TESTS_LINE" ] && echo && echo "tests: $TESTS_LINE"
  fails=$(cat "$TESTS_LOG" "$BENCH_LOG" 2>/dev/null | grep -E '^(FAILED|ERROR) ' | cut -c1-160)
  if [ -n "$fails" ]; then
    echo; echo "failures ($(echo "$fails" | wc -l), first 15):"; echo "$fails" | head -n 15
  fi
  [ -n "${EXAMPLE_TXT:-}" ] && echo && echo "examples/convert_resnet.py:" && echo "$EXAMPLE_TXT"
  if [ -n "$REPORT_TXT" ]; then echo; echo "speedup of fastnn over each reference (per op):"; echo "$REPORT_TXT" | sed '$d'; fi
  echo
  [ $FAILED -eq 0 ] && echo "ALL STEPS OK" || echo "SOME STEPS FAILED (exit 1): see the logs in $DIR"
} >"$SUMMARY"
cat "$SUMMARY"
exit $FAILED
