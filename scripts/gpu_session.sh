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
#
# Each step writes its files whether or not it passes and the script exits non-zero if one failed.
# Commit what it produced under results/ with the device named (e.g. results/gpu-h100/).
set -u
if [ $# -lt 2 ]; then
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
out=$1
shift
mkdir -p "$out" || exit 2
cd "$(dirname "$0")/.." || exit 2
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
unset TRITON_INTERPRET
python3 -c "import qbench.kernels" 2>/dev/null \
    || python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.txt" 2>&1 \
    || { echo "error: could not install qbench (see $out/install.txt)" >&2; exit 2; }

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
            >"$out/gpu-tests.txt" 2>&1 || status=1
        tail -3 "$out/gpu-tests.txt"
        ;;
    compile)
        arch=$(python3 -c "import torch; major, minor = torch.cuda.get_device_capability(); print(major * 10 + minor)")
        python3 -m qbench.kernels.compile_check --arch "$arch" --markdown "$out/compile.md" >/dev/null 2>"$out/compile.err" \
            || status=1
        head -3 "$out/compile.md"
        ;;
    nf4 | int8_affine | gptq | lora_nf4)
        python3 -m pytest -q -p no:cacheprovider "tests/benchmarks/bench_$step.py" --benchmark-only \
            --benchmark-json "$out/bench-$step.json" >"$out/bench-$step.txt" 2>&1 || status=1
        tail -3 "$out/bench-$step.txt"
        [ -s "$out/bench-$step.json" ] && { python3 scripts/benchmark_table.py "$out/bench-$step.json" \
            >"$out/bench-$step.md" || status=1; }
        ;;
    *)
        echo "error: unknown step '$step' (env, tests, compile, nf4, int8_affine, gptq, lora_nf4)" >&2
        status=2
        ;;
    esac
done
exit $status
