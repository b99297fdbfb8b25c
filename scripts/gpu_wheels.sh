#!/usr/bin/env bash
# The wheels a GPU device call needs that the device image lacks, downloaded here into .whl/
# (ignored by .gitignore, so it travels only when a device call names it in `carry`).
#
#   scripts/gpu_wheels.sh        # then: the device call names .whl in `carry` (scripts/README-gpu.md)
#
# Only the e2e-gptq step needs them: GPTQ calibrates on text, and qbench reads text through
# `datasets`. The image has its other dependencies (pyarrow, pandas, fsspec, xxhash, aiohttp,
# huggingface-hub, requests, tqdm, pyyaml); datasets, dill and multiprocess are missing. Pure-Python
# wheels, about 1 MB together. The image's python3 is 3.12.
set -eu
cd "$(dirname "$0")/.."
mkdir -p .whl
for wheel in datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$wheel"
done
ls -la .whl
