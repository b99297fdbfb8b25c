#!/usr/bin/env bash
# What only a GPU can show, for a machine with CUDA, torch, triton and pytest-benchmark (the
# device tool's H100/H200 image has them all; qbench itself is installed here with --no-deps).
#
#   scripts/gpu_session.sh OUT STEP...
#
# STEP is any of (run them in a few calls: each bench step autotunes, so it compiles every config):
#   env          OUT/environment.json: device, driver, torch/triton/transformers versions, git commit
#   tests        OUT/gpu-tests.txt: the gpu-marked tests (kernels against their torch references on CUDA)
#   compile      OUT/compile.md: compile_check for this device's own architecture
#   nf4 int8_affine gptq lora_nf4
#                OUT/bench-STEP.json and .md: tests/benchmarks/bench_STEP.py, each kernel against FP16
#                torch matmul timed in the same run (speedup_vs_fp16, effective GB/s in extra_info)
#   e2e          OUT/e2e.md and OUT/e2e-records.jsonl: qbench's memory and latency suites for fp16,
#                int8-absmax, affine and nf4 on random-weight models of the demo's and of Llama-2-7B's
#                shapes (scripts/gpu_models; no weights need to travel)
#
# Each step writes its files whether or not it passes (a failing step also keeps its log as
# OUT/STEP.log) and the script exits non-zero if one failed. At most 8 files come back from a
# device call: "env tests compile nf4", then "int8_affine gptq lora_nf4", then "e2e" fit.
# Commit what it produced under results/ with the device named (e.g. results/gpu-h100/).
set -u
if [ $# -lt 2 ]; then
    sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
out=$1
shift
mkdir -p "$out" || exit 2
cd "$(dirname "$0")/.." || exit 2
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
unset TRITON_INTERPRET
log=$(mktemp)
python3 -c "import qbench.kernels" 2>/dev/null \
    || python3 -m pip install -q --no-deps --no-build-isolation -e . >"$log" 2>&1 \
    || { cp "$log" "$out/install.log"; echo "error: could not install qbench (see $out/install.log)" >&2; exit 2; }
failed() {  # keep a failing step's log beside its results
    cp "$log" "$out/$1.log"
    status=1
}

status=0
for step in "$@"; do
    echo "== $step"
    case $step in
    env)
        python3 - >"$out/environment.json" <<'EOF' || status=1
import json, subprocess, torch, triton
from qbench.records import environment, git_commit
env = environment("cuda")
env["git"] = git_commit()
env["triton"] = triton.__version__
try:
    env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--format=csv,noheader",
                                        "--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem"],
                                       capture_output=True, text=True).stdout.strip()
except OSError:
    env["nvidia_smi"] = None
print(json.dumps(env, indent=2, default=str))
EOF
        ;;
    tests)
        # only the files holding gpu-marked tests: others may import packages the GPU image lacks
        python3 -m pytest -q -m gpu -p no:cacheprovider $(grep -rl "mark.gpu" tests --include="test_*.py") \
            >"$out/gpu-tests.txt" 2>&1 || status=1  # its own output is the log
        tail -3 "$out/gpu-tests.txt"
        ;;
    compile)
        arch=$(python3 -c "import torch; major, minor = torch.cuda.get_device_capability(); print(major * 10 + minor)")
        python3 -m qbench.kernels.compile_check --arch "$arch" --markdown "$out/compile.md" >"$log" 2>&1 \
            || failed compile
        head -5 "$out/compile.md"
        ;;
    nf4 | int8_affine | gptq | lora_nf4)
        python3 -m pytest -q -p no:cacheprovider "tests/benchmarks/bench_$step.py" --benchmark-only \
            --benchmark-json "$out/bench-$step.json" >"$log" 2>&1 || failed "bench-$step"
        tail -3 "$log"
        [ -s "$out/bench-$step.json" ] && { python3 scripts/benchmark_table.py "$out/bench-$step.json" \
            >"$out/bench-$step.md" || status=1; }
        ;;
    e2e)
        run=$(mktemp -d)/e2e
        models=random:scripts/gpu_models/smollm2-135m,random:scripts/gpu_models/llama-2-7b-shapes
        python3 -m qbench.cli run --device cuda --models "$models" --methods fp16,int8-absmax,affine,nf4 \
            --suites memory,latency --out "$run" >"$log" 2>&1 || failed e2e
        tail -3 "$log"
        cp "$run/records.jsonl" "$out/e2e-records.jsonl" 2>/dev/null
        python3 -m qbench.cli report "$run" -o "$out/e2e.md" >>"$log" 2>&1 || failed e2e
        ;;
    *)
        echo "error: unknown step '$step' (env, tests, compile, nf4, int8_affine, gptq, lora_nf4, e2e)" >&2
        status=2
        ;;
    esac
done
exit $status
