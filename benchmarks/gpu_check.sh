#!/usr/bin/env bash
# Everything about the GPU path that can be checked on a CUDA machine with PyTorch (CUDA), nvcc and
# compute-sanitizer but without TensorRT or onnxruntime-gpu, in one run of at most ~8 minutes on
# one H100 / H200. Results (JSON per step, logs, summary.json, summary.md) go to one folder.
#
#   bash benchmarks/gpu_check.sh [--out DIR] [--dry-run]
#
# Steps:
#   env        GPU, driver, torch / CUDA versions, tools found
#   build      csrc/ with CMake for this GPU's architecture
#   sanitizer  compute-sanitizer memcheck and racecheck on both kernels (benchmarks/gpu_kernels_smoke.py)
#   tests      the GPU tests that need only torch: kernels against their references, GPU
#              preprocessing against the CPU path, the torch CUDA backend with CUDA graphs
#              (pytest -m gpu; TensorRT / onnxruntime-gpu tests skip with their reasons)
#   kernels    attention kernel vs torch SDPA, preprocessing kernel vs torchvision / the CPU path
#   torch      the torch CUDA backend (fp16, CUDA graphs) against eager fp32 PyTorch, same run
#              (ViT-B-32, random weights, exported on the spot; nothing is downloaded)
# Not checkable here (needs TensorRT or onnxruntime-gpu): the TensorRT backend and engine builds,
# ONNX Runtime's CUDA and TensorRT providers.
#
# --dry-run (CI, no GPU): checks the tools and the plan without a GPU: CMake configures csrc/,
# every Python entry point parses and answers --help, and pytest collects the GPU tests; each
# step is recorded as planned or skipped with its reason.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=gpu-check
DRY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --dry-run) DRY=1; shift ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (expected --out DIR or --dry-run)" >&2; exit 2 ;;
    esac
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-python}
STEPS="$OUT/steps.jsonl"
: > "$STEPS"

# record NAME STATUS SECONDS DETAIL
record() {
    "$PY" - "$1" "$2" "$3" "$4" >> "$STEPS" <<'EOF'
import json, sys
name, status, seconds, detail = sys.argv[1:5]
print(json.dumps({"step": name, "status": status, "seconds": float(seconds), "detail": detail}))
EOF
}

# step NAME TIMEOUT COMMAND...: run with a time limit, log to OUT/NAME.log, record the outcome
step() {
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "== $name: $*"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local status=ok
    [ $rc -eq 124 ] && status="timed out after ${limit}s"
    [ $rc -ne 0 ] && [ $rc -ne 124 ] && status="failed (exit $rc)"
    record "$name" "$status" $((SECONDS - t0)) "see $name.log"
    echo "   $status ($((SECONDS - t0)) s)"
}

have() { command -v "$1" > /dev/null 2>&1; }

GPU=0
if have nvidia-smi && nvidia-smi -L > /dev/null 2>&1; then GPU=1; fi
if [ $DRY -eq 0 ] && [ $GPU -eq 0 ]; then
    echo "gpu_check.sh: no GPU (nvidia-smi -L failed); run with --dry-run to check the plan" >&2
    exit 2
fi

# -- env -------------------------------------------------------------------------------------------
"$PY" - "$OUT/env.json" <<'EOF'
import json, platform, shutil, subprocess, sys
from clipfast.cpu import host_cpu
info = {"python": platform.python_version(), "cpu": host_cpu().to_dict(),
        "tools": {t: shutil.which(t) for t in ("nvcc", "cmake", "compute-sanitizer", "ncu",
                                             "nvidia-smi")}}
try:
    import torch
    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["capability"] = list(torch.cuda.get_device_capability(0))
except ImportError as e:
    info["torch"] = f"not installed ({e})"
for mod in ("tensorrt", "cupy", "triton", "onnxruntime"):
    try:
        info[mod] = __import__(mod).__version__
    except Exception as e:  # noqa: BLE001 - recorded, not fatal
        info[mod] = f"not available ({type(e).__name__})"
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps({k: info.get(k) for k in ("gpu", "capability", "torch", "tensorrt")}))
EOF
record env ok 0 "env.json"

ARCH=$("$PY" -c "import json; c = json.load(open('$OUT/env.json')).get('capability'); \
print(f'{c[0]}{c[1]}' if c else '90')")

if [ $DRY -eq 1 ]; then
    # -- the parts a machine without a GPU can check -----------------------------------------------
    if have nvcc && have cmake; then
        step build-configure 300 cmake -S . -B "$OUT/build" -DCMAKE_CUDA_ARCHITECTURES="$ARCH"
    else
        record build-configure skipped 0 "no nvcc or cmake"
    fi
    step entry-points 120 bash -c "$PY benchmarks/gpu_kernels_smoke.py --help && \
$PY benchmarks/bench_kernels.py --help && $PY -m clipfast.cli bench --help"
    step tests-collect 300 "$PY" -m pytest -q --collect-only -m gpu -p no:cacheprovider tests
    for s in sanitizer-memcheck sanitizer-racecheck tests kernels torch-backend; do
        record "$s" planned 0 "needs a GPU"
    done
else
    # -- on the GPU ------------------------------------------------------------------------------
    step build 300 bash -c "cmake -S . -B build -DCMAKE_BUILD_TYPE=Release \
-DCMAKE_CUDA_ARCHITECTURES=$ARCH && cmake --build build -j"
    export CLIPFAST_KERNELS_LIB="$PWD/build/libclipfast_kernels.so"
    if have compute-sanitizer; then
        for tool in memcheck racecheck; do
            step "sanitizer-$tool" 300 compute-sanitizer --tool "$tool" --error-exitcode 1 \
                --target-processes all "$PY" benchmarks/gpu_kernels_smoke.py
        done
    else
        record sanitizer skipped 0 "compute-sanitizer not found"
    fi
    step tests 600 "$PY" -m pytest -q -m gpu -rs -p no:cacheprovider \
        --junitxml="$OUT/tests.xml" tests
    step kernels 300 "$PY" benchmarks/bench_kernels.py --out "$OUT" --repeats 50
    step torch-export 300 clipfast export --model ViT-B-32 --pretrained none --quiet \
        --out "$OUT/vit-b-32" --overwrite
    step torch-backend 300 clipfast bench "$OUT/vit-b-32" --device cuda --backends torch \
        --batch-sizes 1,8,32,128 --towers image,text --interleave --min-seconds 1 \
        --out "$OUT/torch-cuda.json"
fi

# -- summary -------------------------------------------------------------------------------------
"$PY" - "$OUT" "$DRY" <<'EOF'
import json, sys
from pathlib import Path
out, dry = Path(sys.argv[1]), sys.argv[2] == "1"
steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines() if line]
env = json.loads((out / "env.json").read_text())
failed = [s for s in steps if s["status"] not in ("ok", "planned", "skipped")]
summary = {"dry_run": dry, "gpu": env.get("gpu"), "torch": env.get("torch"),
           "tensorrt": env.get("tensorrt"), "steps": steps, "passed": not failed,
           "not_checkable_here": ["TensorRT backend and engine builds (needs TensorRT)",
                                  "ONNX Runtime CUDA / TensorRT providers (needs onnxruntime-gpu)"]}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
lines = [f"# GPU check ({'dry run, no GPU' if dry else env.get('gpu')})", "",
         "| step | status | s | detail |", "|---|---|---:|---|"]
lines += [f"| {s['step']} | {s['status']} | {s['seconds']:.0f} | {s['detail']} |" for s in steps]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
sys.exit(1 if failed else 0)
EOF
