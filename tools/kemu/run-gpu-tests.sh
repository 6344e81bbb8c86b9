#!/usr/bin/env bash
# Runs the GPU tests (the `#[ignore = "needs a CUDA device"]` ones in tests/gpu_*.rs) on
# the CPU through kemu, the kernel emulator (tools/kemu/kemu.h): the real kernels, the
# real launchers, cudarc, on a fake libcuda/libcublas. It checks kernel logic and parity,
# not speed: timings and tuners measure the emulator.
#
#   tools/kemu/run-gpu-tests.sh                 every GPU test binary, slow tests skipped;
#                                               the sm_90-only ones as an H100; the kernel
#                                               tests again in reverse thread order
#   KEMU_QUICK=1 tools/kemu/run-gpu-tests.sh    without the reverse-order pass
#   KEMU_ALL=1 tools/kemu/run-gpu-tests.sh      the slow ones too (tens of minutes)
#   tools/kemu/run-gpu-tests.sh gpu_nf4 -- NAME  one binary, test filter after --
#   tools/kemu/run-gpu-tests.sh --racecheck [BINARY...] [-- FILTER]
#                                               the kernel tests once on the racecheck
#                                               build: ThreadSanitizer reports every pair
#                                               of accesses no barrier orders (a data race
#                                               on a GPU), and the run fails
#
# Needs kernels compiled by nvcc (the fatbin must exist for the device to open; kemu
# itself does not read it): PALIGN_REQUIRE_KERNELS=1 makes the build fail otherwise.
set -euo pipefail
cd "$(dirname "$0")/../.."
race=0
if [ "${1:-}" = --racecheck ]; then
    race=1
    shift
fi
if [ $race = 1 ]; then tools/kemu/build.sh --racecheck; else tools/kemu/build.sh; fi

binaries=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    binaries+=("$1")
    shift
done
[ "${1:-}" = "--" ] && shift
default=0
if [ ${#binaries[@]} -eq 0 ]; then
    default=1
    for f in tests/gpu_*.rs; do
        b=$(basename "$f" .rs)
        # Racecheck: the kernel tests (the whole-model tests in gpu_model add no kernels).
        [ $race = 1 ] && [ "$b" = gpu_model ] && continue
        binaries+=("$b")
    done
fi

# Each of these takes a minute or more on the emulator (7B-sized shapes, or a tuner timing
# every variant); the smaller cases of the same kernels run.
slow=(
    the_tuner_measures_once_and_its_choice_matches_cpu
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
lib=target/kemu
more=() # cargo test flags
if [ $race = 1 ]; then
    # The test binaries (not cargo or rustc: cargo's runner setting) start with libtsan
    # loaded, which the instrumented libkemu needs. Only instrumented code is checked:
    # Rust's own accesses and its futex locks are invisible to TSan. A binary with a race
    # report exits with TSan's status 66 after its tests, which cargo counts as a failure.
    tsan=$(${CXX:-g++} -print-file-name=libtsan.so.2)
    host=$(rustc -vV | sed -n 's/^host: //p' | tr 'a-z-' 'A-Z_')
    export "CARGO_TARGET_${host}_RUNNER=env LD_PRELOAD=$tsan"
    export TSAN_OPTIONS="ignore_noninstrumented_modules=1 exitcode=66 ${TSAN_OPTIONS:-}"
    lib=target/kemu-race
    more=(--no-fail-fast) # so one report does not hide the others
fi
export LD_LIBRARY_PATH="$PWD/$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# A failure ends the run, except under racecheck, which reports every binary's races.
rc=0
failed() {
    rc=$1
    [ $race = 1 ] || exit "$rc"
}
# Tuner and dispatcher caches are keyed by GPU name, so kemu's entries stay apart from a
# real GPU's. (XDG_CACHE_HOME is left alone: build.rs reruns nvcc when it changes.)
KEMU_SM=${KEMU_SM:-80} cargo test --release "${more[@]}" "${args[@]}" -- --ignored \
    --test-threads=1 "${skip[@]}" "$@" || failed $?

# The same device as an H100 (sm_90): the sm_90a wgmma kernels (NF4 GEMMs, attention
# forward and backward) run only there. Needs sm_90a in the build's targets (the default;
# PALIGN_CUDA_ARCHS may leave it out).
if [ $default = 1 ]; then
    KEMU_SM=90 cargo test --release --test gpu_nf4 -- --ignored --test-threads=1 wgmma ||
        failed $?
    KEMU_SM=90 cargo test --release --test gpu_attention -- --ignored --test-threads=1 \
        wgmma_variants_match_cpu || failed $?
    KEMU_SM=90 cargo test --release --test gpu_probe -- --ignored --test-threads=1 ||
        failed $?
fi
[ $race = 0 ] || exit $rc

# The kernel tests again with each block's threads run last to first: a race between
# threads (a read of another thread's write with no barrier between) passes in at most
# one of the two orders. (The whole-model tests in gpu_model add no kernels.)
if [ $default = 1 ] && [ "${KEMU_QUICK:-0}" != 1 ]; then
    kernel_tests=()
    for b in "${binaries[@]}"; do [ "$b" = gpu_model ] || kernel_tests+=(--test "$b"); done
    KEMU_ORDER=reverse cargo test --release "${kernel_tests[@]}" -- --ignored --test-threads=1 \
        "${skip[@]}"
fi
