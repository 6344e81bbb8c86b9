#!/usr/bin/env bash
# Fetch the Python packages that tools/bench_hf.py needs and the GPU machine's image
# lacks (bitsandbytes for real QLoRA, TRL and its datasets/dill/multiprocess needs), as
# wheels for that machine's Python 3.12 on x86-64. tools/gpu-check.sh stages them.
#   tools/fetch-py-wheels.sh [DIR]     (default ~/.cache/palign/wheels)
# Versions: the ones the fixtures were made with (tools/requirements.txt) where pinned.
set -euo pipefail
dir="${1:-$HOME/.cache/palign/wheels}"
mkdir -p "$dir"
plats=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
    manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 any; do
    plats+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${plats[@]}" -d "$dir" \
    bitsandbytes==0.50.2 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
ls "$dir"
