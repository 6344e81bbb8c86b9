#!/usr/bin/env bash
# Regenerate src/backend/cuda/params.rs from kernels/params.h with bindgen, so the
# kernel launch ABI is written once (in C) and a user's build needs no libclang.
#
#   tools/regen-bindings.sh           # rewrite params.rs
#   tools/regen-bindings.sh --check   # exit 1 if params.rs is stale (CI, when bindgen exists)
#
# Needs bindgen-cli (`cargo install bindgen-cli`) and libclang (`apt-get install
# libclang-dev`). Every struct derives bytemuck::Pod, which fails to compile if the
# header ever gains implicit padding; bindgen's layout tests pin sizes and offsets.
set -euo pipefail
cd "$(dirname "$0")/.."

HEADER=kernels/params.h
TARGET=src/backend/cuda/params.rs

if ! command -v bindgen >/dev/null; then
    echo "regen-bindings: bindgen not found (cargo install bindgen-cli)" >&2
    exit 2
fi

gen() {
    bindgen "$HEADER" \
        --allowlist-type '.*Params|TensorChunk' \
        --no-doc-comments \
        --with-derive-custom-struct '.*=bytemuck::Pod,bytemuck::Zeroable' \
        --raw-line '//! Kernel launch parameters, generated from kernels/params.h by' \
        --raw-line '//! tools/regen-bindings.sh (bindgen). Do not edit by hand.' \
        --raw-line '#![allow(non_camel_case_types, non_snake_case, clippy::all)]' \
        -- -x c -std=c11 -Wno-pragma-once-outside-header
}

if [ "${1:-}" = "--check" ]; then
    tmp="$(mktemp)"
    trap 'rm -f "$tmp"' EXIT
    gen >"$tmp"
    if ! diff -u "$TARGET" "$tmp"; then
        echo "regen-bindings: $TARGET is stale; run tools/regen-bindings.sh" >&2
        exit 1
    fi
    echo "regen-bindings: $TARGET is up to date"
else
    gen >"$TARGET"
    echo "regen-bindings: wrote $TARGET"
fi
