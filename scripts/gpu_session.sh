#!/usr/bin/env bash
# What only a GPU can show, for a machine with CUDA, torch, triton and pytest-benchmark (the
# device tool's H100/H200 image has them all; qbench itself is installed here with --no-deps).
#
#   scripts/gpu_session.sh [--dry-run] OUT STEP...
#
# STEP is any of, in the order given (scripts/README-gpu.md has the plan for a 15-minute lease):
#   env          OUT/environment.json: device, driver, torch/triton/transformers versions, git commit
#   tests        OUT/gpu-tests.txt: the gpu-marked tests (kernels against their torch references on CUDA)
#   compile      OUT/compile.md: compile_check for this device's architecture, first config of each
#                autotuned kernel (every config: compile-full; results/kernels-compile-sm90.md has
#                every config for sm_90, compiled on CPU)
#   nf4 int8_affine gptq lora_nf4
#                OUT/bench-STEP.json and .md: tests/benchmarks/bench_STEP.py, each kernel against FP16
#                torch matmul timed in the same run (speedup_vs_fp16, effective GB/s in extra_info)
#   e2e          decode tokens/s at batch 1 on a random-weight Llama-2-7B-shaped model for fp16,
#                int8-absmax, affine g128 and nf4: memory + latency with the eager decode step, then
#                latency with the decode step in one CUDA graph; each latency cell pairs the method
#                with fp16 in its process and records the kernel path of every layer and the
#                compile mode. OUT/e2e-eager-records.jsonl, OUT/e2e-graphs-records.jsonl, OUT/e2e.md
#   e2e-gptq     the same for gptq g128 (OUT/e2e-gptq-*); needs the datasets package (carried
#                wheels: scripts/gpu_wheels.sh) for its calibration text, made from this repo's docs
#   report       no GPU: OUT/e2e-eager.md and OUT/e2e-graphs.md, one leaderboard per decode mode from
#                every OUT/*-eager-records.jsonl / *-graphs-records.jsonl (run it here after fetching)
#
# The steps share one time budget, QBENCH_BUDGET_S seconds (default 500, under the device tool's
# 10-minute call): each command runs under `timeout` with what is left, and a step that would start
# with under 30 s left is not run; tests, compile and each benchmark also stop after
# QBENCH_TESTS_MAX_S / QBENCH_COMPILE_MAX_S / QBENCH_BENCH_MAX_S (240 s each) so e2e keeps its
# time. OUT/timings-STEPS.tsv says, per step, its seconds and outcome; a failing step's log is
# appended to OUT/failed-STEPS.log (STEPS: the steps joined by '-', so two calls' files share a
# folder). The script exits non-zero if a step failed or did not run. At most 8 files come back
# from a device call.
# --dry-run: the e2e steps on CPU with the tiny config scripts/gpu_models/tiny-llama-shapes
# (checks the commands here; CUDA graphs are skipped on CPU with their reason).
# QBENCH_E2E_METHODS replaces the e2e step's methods (the test runs nf4 alone);
# QBENCH_E2E_GRAPH_MODE=torch-compile compiles the decode step instead of capturing a CUDA graph;
# QBENCH_E2E_MEMORY=0 leaves the memory suite out of the eager run (four fewer processes).
set -u
dry_run=0
if [ "${1:-}" = "--dry-run" ]; then
    dry_run=1
    shift
fi
if [ $# -lt 2 ]; then
    sed -n '2,37p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
out=$(realpath -m "$1")
shift
mkdir -p "$out" || exit 2
cd "$(dirname "$0")/.." || exit 2
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TRITON_INTERPRET=0  # not unset: tests/conftest.py turns the interpreter on where it is unset
log=$(mktemp)
if [ $dry_run = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then  # carried for the image (scripts/gpu_wheels.sh)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/qbench-wheels \
        .whl/*.whl >"$log" 2>&1 && export PYTHONPATH=/tmp/qbench-wheels${PYTHONPATH:+:$PYTHONPATH} \
        || { cat "$log" >&2; echo "warning: the carried wheels did not install" >&2; }
fi
if ! python3 -c "import qbench.kernels" 2>/dev/null \
        && ! python3 -m pip install -q --no-deps --no-build-isolation -e . >"$log" 2>&1; then
    # an image whose setuptools predates the project's build requirement: the same package layout as
    # pyproject.toml's package-dir, as links, on PYTHONPATH (built-in plugins load by module name)
    tree=/tmp/qbench-tree/qbench
    mkdir -p "$tree" && ln -sfn "$PWD"/qbench/*.py "$tree"/ \
        && ln -sfn "$PWD/plugins" "$tree/plugins" && ln -sfn "$PWD/kernels" "$tree/kernels" \
        && ln -sfn "$PWD/suites" "$tree/suites" && export PYTHONPATH=/tmp/qbench-tree:$PWD${PYTHONPATH:+:$PYTHONPATH}
    python3 -c "import qbench.kernels, qbench.plugins.nf4" 2>>"$log" \
        || { cp "$log" "$out/install.log"; echo "error: could not install qbench (see $out/install.log)" >&2; exit 2; }
    echo "qbench: not pip-installable here, running from links in /tmp/qbench-tree; pip said:"
    tail -5 "$log"  # in the call's output, not a file: at most 8 files come back
fi

deadline=$((SECONDS + ${QBENCH_BUDGET_S:-500}))
limited() {  # run a command under what is left of the budget, and at most $cap seconds when cap is set
    local left=$((deadline - SECONDS))
    [ -n "${cap:-}" ] && [ "$left" -gt "$cap" ] && left=$cap
    [ "$left" -gt 5 ] || return 124
    timeout -k 10 "$left" "$@"
}
failed() {  # keep a failing step's log, all in one file (fewer files come back)
    { echo "===== $1 ($(date -u +%FT%TZ))"; cat "$log"; } >>"$out/failed-$tag.log"
    status=1
    outcome=failed
}

if [ $dry_run = 1 ]; then
    e2e_device=cpu
    e2e_model=random:scripts/gpu_models/tiny-llama-shapes
else
    e2e_device=cuda
    e2e_model=random:scripts/gpu_models/llama-2-7b-shapes
fi
# batch 1 decode is the headline; prefill of 128 tokens; 32 decoded tokens per repeat
latency="latency:batch_sizes=1,prompt_len=128,new_tokens=32,repeats=5,warmup=2,baseline=fp16"

e2e() {  # e2e NAME METHODS [qbench run options...]: memory + eager latency, then latency in a CUDA graph
    local name=$1 methods=$2
    shift 2
    local runs
    runs=$(mktemp -d)
    : >"$out/$name.md"
    for mode in eager graphs; do
        local suites="memory,$latency,compile=none"
        [ "${QBENCH_E2E_MEMORY:-1}" = 0 ] && suites="$latency,compile=none"  # a short lease: latency alone
        [ $mode = graphs ] && suites="$latency,compile=${QBENCH_E2E_GRAPH_MODE:-cuda-graphs}"
        local cmd=(python3 -m qbench.cli run --device "$e2e_device" --models "$e2e_model" --methods "$methods"
                   --suites "$suites" --out "$runs/$mode" "$@")
        echo "${cmd[*]}"
        limited "${cmd[@]}" >"$log" 2>&1 || failed "$name-$mode"
        tail -3 "$log"
        cp "$runs/$mode/records.jsonl" "$out/$name-$mode-records.jsonl" 2>/dev/null
        { echo "## $mode decode step"; echo; echo "\`${cmd[*]}\`"; echo; } >>"$out/$name.md"
        limited python3 -m qbench.cli report "$runs/$mode" >>"$out/$name.md" 2>>"$log" || failed "$name-$mode report"
    done
}

status=0
tag=$(IFS=-; echo "$*")  # per-call file names: calls' files land in one folder without overwriting
timings=$out/timings-$tag.tsv
[ "$*" = report ] && timings=/dev/null
printf 'step\tseconds\toutcome\n' >"$timings"
for step in "$@"; do
    echo "== $step"
    started=$SECONDS
    outcome=ok
    if [ $((deadline - SECONDS)) -lt 30 ] && [ "$step" != report ]; then
        echo "not run: under 30 s of QBENCH_BUDGET_S left"
        printf '%s\t0\tnot run (budget)\n' "$step" >>"$timings"
        status=1
        continue
    fi
    case $step in
    env)
        limited python3 - >"$out/environment.json" <<'EOF' || { status=1; outcome=failed; }
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
        cap=${QBENCH_TESTS_MAX_S:-240} limited python3 -m pytest -q -m gpu -p no:cacheprovider $(grep -rl "mark.gpu" tests --include="test_*.py") \
            >"$out/gpu-tests.txt" 2>&1 || { status=1; outcome=failed; }  # its own output is the log
        tail -3 "$out/gpu-tests.txt"
        ;;
    compile | compile-full)
        arch=$(python3 -c "import torch; major, minor = torch.cuda.get_device_capability(); print(major * 10 + minor)")
        first=--first-config
        [ "$step" = compile-full ] && first=
        cap=${QBENCH_COMPILE_MAX_S:-240} limited python3 -m qbench.kernels.compile_check --arch "$arch" $first --markdown "$out/compile.md" >"$log" 2>&1 \
            || failed compile
        head -5 "$out/compile.md"
        ;;
    nf4 | int8_affine | gptq | lora_nf4)
        # every finished case also goes to bench-STEP.jsonl at once: the JSON comes only at the end
        : >"$out/bench-$step.jsonl"
        QBENCH_BENCH_JSONL="$out/bench-$step.jsonl" cap=${QBENCH_BENCH_MAX_S:-240} limited python3 -m pytest -q \
            -p no:cacheprovider "tests/benchmarks/bench_$step.py" --benchmark-only \
            --benchmark-json "$out/bench-$step.json" >"$log" 2>&1 || failed "bench-$step"
        tail -3 "$log"
        table_from=$out/bench-$step.json
        [ -s "$table_from" ] || table_from=$out/bench-$step.jsonl
        [ -s "$table_from" ] && { python3 scripts/benchmark_table.py "$table_from" \
            >"$out/bench-$step.md" || { status=1; outcome=failed; }; }
        ;;
    e2e)
        e2e e2e "${QBENCH_E2E_METHODS:-fp16,int8-absmax,affine:bits=4,group_size=128,nf4}"
        ;;
    e2e-gptq)
        if ! python3 -c "import datasets" 2>/dev/null; then
            echo "e2e-gptq needs the datasets package: carry the wheels scripts/gpu_wheels.sh downloads" | tee "$log"
            failed e2e-gptq
        else
            # calibration text for GPTQ on random weights: any text serves (the weights mean nothing);
            # this repo's docs, so that nothing has to travel
            calibration=$(mktemp -d)/calibration.txt
            cat README.md results/README.md scripts/README-gpu.md >"$calibration"
            e2e e2e-gptq "gptq:bits=4,group_size=128,nsamples=16,seqlen=512" --calibration "$calibration"
        fi
        ;;
    report)
        for mode in eager graphs; do
            merged=$(mktemp -d)
            cat "$out"/*-$mode-records.jsonl >"$merged/records.jsonl" 2>/dev/null
            if [ -s "$merged/records.jsonl" ]; then
                python3 -m qbench.cli report "$merged" -o "$out/e2e-$mode.md" || { status=1; outcome=failed; }
            fi
        done
        ;;
    *)
        echo "error: unknown step '$step' (env, tests, compile, compile-full, nf4, int8_affine, gptq, lora_nf4," \
             "e2e, e2e-gptq, report)" >&2
        status=2
        outcome=unknown
        ;;
    esac
    [ $((deadline - SECONDS)) -le 5 ] && [ $outcome = failed ] && outcome="failed (budget ran out)"
    printf '%s\t%s\t%s\n' "$step" $((SECONDS - started)) "$outcome" >>"$timings"
done
exit $status
