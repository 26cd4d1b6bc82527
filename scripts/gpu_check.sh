#!/usr/bin/env bash
# CUDA checks and GPU benchmarks in one short run on a machine with an NVIDIA GPU whose python3
# already has torch (CUDA build), numpy, h5py, click, rich, matplotlib, scipy and pytest.
#
#   bash scripts/gpu_check.sh                 # every phase; results in $OUT (default gpu-results/)
#   bash scripts/gpu_check.sh tests me        # chosen phases (tests, propagate-forward,
#                                             # propagate-gradient, shower, me, calorimeter)
#
# Dr.Jit comes from .whl/drjit-*.whl when it is not installed (the wheel for the machine's
# Python, `pip download --no-deps --only-binary=:all: drjit==1.5.0`). The LLVM (CPU) backend
# is optional: when the machine has no libLLVM, .llvm/libLLVM.so.19.1.xz and .llvm/deps.tar.xz
# (libLLVM 19 and the libraries it links, from a Debian 12 machine) are unpacked if present;
# without them the CPU-vs-CUDA comparisons are skipped. Every phase has its own time limit
# so that a slow phase cannot eat the others, cut to what is left of DEADLINE_S seconds (from
# the start of the script; phases that would get under 20 s are skipped) where that is set;
# logs and one JSON per benchmark topic go to $OUT.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1

phase() { echo; echo "=== $1 ($(date +%T))" | tee -a "$LOG"; }

STARTED=$(date +%s)
limit() {  # limit SECONDS: the phase's own limit, cut to what is left of DEADLINE_S
    local left=$(( ${DEADLINE_S:-100000} - ($(date +%s) - STARTED) ))
    echo $(( $1 < left ? $1 : left ))
}

phase setup
if ! python3 -c "import drjit" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/drjit-*.whl \
        || { echo "no Dr.Jit wheel in .whl/" | tee -a "$LOG"; exit 1; }
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ! ldconfig -p | grep -q "libLLVM" && [ -f .llvm/libLLVM.so.19.1.xz ]; then
    mkdir -p /tmp/llvm/all /tmp/llvm/lib
    python3 - <<'EOF'
import lzma, shutil, subprocess, tarfile
with lzma.open(".llvm/libLLVM.so.19.1.xz") as src, open("/tmp/llvm/lib/libLLVM.so.19.1", "wb") as dst:
    shutil.copyfileobj(src, dst)
with tarfile.open(".llvm/deps.tar.xz") as tar:
    tar.extractall("/tmp/llvm/all")
known = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
for name in sorted(__import__("os").listdir("/tmp/llvm/all")):
    if f"{name} " not in known:  # only what the machine lacks
        shutil.copy(f"/tmp/llvm/all/{name}", f"/tmp/llvm/lib/{name}")
        print("using carried", name)
EOF
    export LD_LIBRARY_PATH=/tmp/llvm/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    export DRJIT_LIBLLVM_PATH=/tmp/llvm/lib/libLLVM.so.19.1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
timeout 60 python3 -m pyhybrid.cli info 2>&1 | tee -a "$LOG"

bench() {  # bench NAME SECONDS ARGS...: one topic, its JSON copied to $OUT as soon as it exists
    local name=$1 seconds
    seconds=$(limit "$2")
    shift 2
    [ "$seconds" -ge 20 ] || { echo "bench $name: skipped, DEADLINE_S reached" | tee -a "$LOG"; return; }
    phase "bench $name"
    timeout "$seconds" python3 -m pyhybrid.cli bench --device cuda --repeats 3 -o "/tmp/bench-$name" "$@" 2>&1 \
        | tee -a "$LOG"
    cp "/tmp/bench-$name/bench.json" "$OUT/bench-$name.json" 2>/dev/null || echo "bench $name: no result" | tee -a "$LOG"
}

run_phase() {
    case $1 in
    tests)
        phase "tests (CUDA)"
        timeout "$(limit 170)" python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_engine.py \
            tests/test_calorimeter.py::test_cuda_matches_cpu 2>&1 | tee -a "$LOG" ;;
    propagate-forward)
        bench "$1" 60 --precision float32 --precision float64 --case propagate-rk4-forward ;;
    propagate-gradient)
        bench "$1" 120 --precision float32 --case propagate-rk4-gradient-tracks --case propagate-rk4-gradient-all \
            --case propagate-rk4-gradient-tracks-acts --case propagate-rk4-gradient-all-acts ;;
    shower)
        bench "$1" 60 --precision float32 --case shower-observables --case shower-gradient-score-function \
            --case shower-gradient-stochastic-ad ;;
    me)
        bench "$1" 150 --precision float32 --case me-ee_mumu-forward --case me-ee_mumu-grad-all \
            --case me-gg_tt-forward --case me-gg_tt-grad-params --case me-gg_tt-grad-all ;;
    calorimeter)
        bench "$1" 90 --precision float32 --case calorimeter-showers --case calorimeter-showers-grad \
            --case training-step-hybrid ;;
    *) echo "unknown phase $1" | tee -a "$LOG" ;;
    esac
}

# phases to run (default: all), e.g. `bash scripts/gpu_check.sh tests propagate-gradient`
for name in "${@:-tests propagate-forward propagate-gradient calorimeter me shower}"; do
    for one in $name; do run_phase "$one"; done
done
phase done
