#!/usr/bin/env bash
# Runs the GPU tests (the `#[ignore = "needs a CUDA device"]` ones in tests/gpu_*.rs) on
# the CPU through kemu, the kernel emulator (tools/kemu/kemu.h): the real kernels, the
# real launchers, cudarc, on a fake libcuda/libcublas. It checks kernel logic and parity,
# not speed: timings and tuners measure the emulator.
#
#   tools/kemu/run-gpu-tests.sh                 every GPU test binary, slow tests skipped
#   KEMU_ALL=1 tools/kemu/run-gpu-tests.sh      the slow ones too (tens of minutes)
#   tools/kemu/run-gpu-tests.sh gpu_nf4 -- NAME  one binary, test filter after --
#
# Needs kernels compiled by nvcc (the fatbin must exist for the device to open; kemu
# itself does not read it): PALIGN_REQUIRE_KERNELS=1 makes the build fail otherwise.
set -euo pipefail
cd "$(dirname "$0")/../.."
tools/kemu/build.sh

binaries=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    binaries+=("$1")
    shift
done
[ "${1:-}" = "--" ] && shift
if [ ${#binaries[@]} -eq 0 ]; then
    for f in tests/gpu_*.rs; do binaries+=("$(basename "$f" .rs)"); done
fi

# Each of these takes minutes on the emulator (7B-sized shapes or many tuner trials);
# the smaller cases of the same kernels run.
slow=(
    parity_m8229_k14336
    parity_m8229_k4096
    up_backward_parity_m8229
)
skip=()
if [ "${KEMU_ALL:-0}" != 1 ]; then
    for t in "${slow[@]}"; do skip+=(--skip "$t"); done
fi

args=()
for b in "${binaries[@]}"; do args+=(--test "$b"); done
export PALIGN_REQUIRE_KERNELS=1
export LD_LIBRARY_PATH="$PWD/target/kemu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# Tuners and dispatchers cache their measurements per GPU name: keep kemu's apart.
export XDG_CACHE_HOME="$PWD/target/kemu/cache"
cargo test --release "${args[@]}" -- --ignored --test-threads=1 "${skip[@]}" "$@"
