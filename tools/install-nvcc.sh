#!/usr/bin/env bash
# Install nvcc 13.0 from PyPI into a per-user cache outside the checkout, so that
# build.rs can compile kernels/*.cu on machines without a CUDA toolkit (CI, laptops).
#
#   tools/install-nvcc.sh            # installs once, then is a fast no-op
#   PALIGN_CUDA_DIR=/some/dir tools/install-nvcc.sh
#
# Result: $DIR/bin/nvcc (printed on the last line). build.rs looks there after $NVCC,
# $CUDA_HOME/bin, PATH and /usr/local/cuda/bin, so a user's own toolkit wins.
#
# Why 13.0.* and all five wheels pinned together: a newer nvcc emits a PTX ISA that a
# 13.0 driver rejects, and nvcc only works with the cccl/nvvm/crt/runtime of its release.
# The cu13 wheels all unpack into one tree (nvidia/cu13/{bin,include,nvvm,lib}) whose
# bin/nvcc.profile finds include/ and nvvm/ relative to itself, so symlinks suffice.
set -euo pipefail

VERSION=13.0
DIR="${PALIGN_CUDA_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/palign/cuda-$VERSION}"
SPECS=(
    "nvidia-cuda-nvcc==$VERSION.*"
    "nvidia-cuda-cccl==$VERSION.*"
    "nvidia-nvvm==$VERSION.*"
    "nvidia-cuda-crt==$VERSION.*"
    "nvidia-cuda-runtime==$VERSION.*"
)
STAMP="$DIR/.palign-installed"
WANT="${SPECS[*]}"

# Compile a tiny kernel for the oldest and newest archs we ship, as build.rs does.
verify() {
    local nvcc="$1" tmp
    tmp="$(mktemp -d)"
    cat >"$tmp/probe.cu" <<'EOF'
#include <cuda_bf16.h>
extern "C" __global__ void probe(__nv_bfloat16* x, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = __float2bfloat16(__bfloat162float(x[i]) * 2.0f);
}
EOF
    if ! "$nvcc" -fatbin -std=c++17 \
        -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a \
        -o "$tmp/probe.fatbin" "$tmp/probe.cu"; then
        rm -rf "$tmp"
        return 1
    fi
    local ok=0
    [ -s "$tmp/probe.fatbin" ] || ok=1
    rm -rf "$tmp"
    return $ok
}

# Fast path: same pins already installed and nvcc still compiles.
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -x "$DIR/bin/nvcc" ]; then
    if "$DIR/bin/nvcc" --version >/dev/null 2>&1; then
        echo "$DIR/bin/nvcc"
        exit 0
    fi
fi

PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || { echo "install-nvcc: $PY not found" >&2; exit 1; }

# Install into a fresh sibling folder and swap it in at the end, so an interrupted
# run never leaves a half-installed tree that the stamp would vouch for.
mkdir -p "$(dirname "$DIR")"
NEW="$DIR.tmp.$$"
rm -rf "$NEW"
mkdir -p "$NEW"
trap 'rm -rf "$NEW"' EXIT
echo "install-nvcc: installing ${SPECS[*]} into $DIR" >&2
"$PY" -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
    --root-user-action=ignore \
    --target "$NEW/pkgs" "${SPECS[@]}" >&2

ROOT="$NEW/pkgs/nvidia/cu13"
[ -x "$ROOT/bin/nvcc" ] || { echo "install-nvcc: no nvcc in $ROOT/bin" >&2; exit 1; }
# Relative links so the tree stays valid after the rename below.
for d in bin include nvvm lib; do
    [ -e "$ROOT/$d" ] && ln -sfn "pkgs/nvidia/cu13/$d" "$NEW/$d"
done

verify "$NEW/bin/nvcc" || { echo "install-nvcc: nvcc failed to compile a probe kernel" >&2; exit 1; }
echo "$WANT" >"$NEW/.palign-installed"

rm -rf "$DIR"
mv "$NEW" "$DIR"
trap - EXIT
"$DIR/bin/nvcc" --version | tail -n 2 >&2
echo "$DIR/bin/nvcc"
