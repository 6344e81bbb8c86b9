#!/usr/bin/env bash
# Instruction counts of a kernel file's SASS, for kernel work without a GPU: per kernel its
# registers and spills, and every loop body (a backward branch) with its size and its
# tensor-core (HMMA/HGMMA), ldmatrix (LDSM), shared (LDS/STS) and global (LDG/LDGSTS)
# instructions. A loop body's count is static: inner loops count once, and a branch
# skipped at run time still counts. It says where a kernel spends issue slots, never how
# fast it runs: only a benchmark on a GPU says that.
#
#   tools/sass-loops.sh kernels/nf4.cu                   # sm_90a, every kernel
#   tools/sass-loops.sh kernels/attention.cu 80 bwd_w8   # sm_80, kernels matching a regex
#   SASS_TIMELINE=1 tools/sass-loops.sh kernels/attention.cu 90a wg2n128s3p_bf16_d128
#       also each kernel's wgmma pipeline in program order: runs of HGMMA, WARPGROUP
#       waits (DEPBAR.LE gsb0, N), barriers and branches, with the instructions between
#       them (MUFU, F2FP counted). ptxas schedules a wgmma.wait_group wherever it likes
#       within a basic block: this shows whether the work meant to overlap a wgmma still
#       sits between its issue and its wait.
#
# cuobjdump and nvdisasm come from PyPI (pinned below) into ~/.cache/palign/cuda-sass;
# nvcc from tools/install-nvcc.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

SRC="${1:?usage: tools/sass-loops.sh FILE.cu [ARCH] [KERNEL_REGEX]}"
ARCH="${2:-90a}"
FILTER="${3:-.}"
DIR="${XDG_CACHE_HOME:-$HOME/.cache}/palign/cuda-sass"
SPECS=("nvidia-cuda-cuobjdump==13.2.*" "nvidia-cuda-nvdisasm==13.2.*")

if [ ! -x "$DIR/bin/cuobjdump" ] || [ ! -x "$DIR/bin/nvdisasm" ]; then
    echo "sass-loops: installing ${SPECS[*]} into $DIR" >&2
    rm -rf "$DIR.tmp.$$"
    "${PYTHON:-python3}" -m pip install --quiet --disable-pip-version-check \
        --no-warn-script-location --root-user-action=ignore \
        --target "$DIR.tmp.$$/pkgs" "${SPECS[@]}" >&2
    mkdir -p "$DIR.tmp.$$/bin"
    for t in cuobjdump nvdisasm; do
        f=$(find "$DIR.tmp.$$/pkgs" -type f -name "$t" | head -1)
        [ -n "$f" ] || { echo "sass-loops: no $t in the wheels" >&2; exit 1; }
        chmod +x "$f"
        ln -sfn "$(realpath --relative-to="$DIR.tmp.$$/bin" "$f")" "$DIR.tmp.$$/bin/$t"
    done
    rm -rf "$DIR"
    mv "$DIR.tmp.$$" "$DIR"
fi

NVCC="$(tools/install-nvcc.sh)"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
"$NVCC" -std=c++17 -O3 -cubin -arch="sm_$ARCH" -Ikernels --resource-usage "$SRC" \
    -o "$TMP/k.cubin" 2>"$TMP/ptxas.txt"
PATH="$DIR/bin:$PATH" "$DIR/bin/cuobjdump" -sass "$TMP/k.cubin" >"$TMP/k.sass"

python3 - "$TMP/k.sass" "$TMP/ptxas.txt" "$FILTER" <<'EOF'
import collections, os, re, sys

sass, ptxas, pattern = open(sys.argv[1]).read(), open(sys.argv[2]).read(), sys.argv[3]
# ptxas: "Compiling entry function 'NAME'", then its spills and "Used N registers".
usage = {}
for block in re.split(r"Compiling entry function '", ptxas)[1:]:
    name = block.split("'", 1)[0]
    regs = re.search(r"Used (\d+) registers", block)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", block)
    usage[name] = (regs.group(1) if regs else "?", spill.groups() if spill else ("?", "?"))

KINDS = {"tensor": ("HMMA", "HGMMA"), "ldsm": ("LDSM",), "shared": ("LDS", "STS"),
         "global": ("LDG", "LDGSTS", "STG", "RED", "REDG")}
for func in re.split(r"\n\s*Function : ", sass)[1:]:
    name = func.split("\n", 1)[0].strip()
    if not re.search(pattern, name):
        continue
    ins = [(int(a, 16), re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0], t)
           for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", func)]
    regs, (st, ld) = usage.get(name, ("?", ("?", "?")))
    print(f"{name}: {len(ins)} instructions, {regs} registers, spills {st}/{ld} B")
    for addr, op, text in ins:
        m = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)\s*)?(?:0x)?([0-9a-f]+)", text)
        if op != "BRA" or not m or int(m.group(1), 16) >= addr:
            continue
        body = [o for a, o, _ in ins if int(m.group(1), 16) <= a <= addr]
        c = collections.Counter(body)
        kinds = ", ".join(f"{k} {sum(c[o] for o in ops)}" for k, ops in KINDS.items())
        top = ", ".join(f"{o} {n}" for o, n in c.most_common(6))
        print(f"  loop {int(m.group(1), 16):#07x}-{addr:#07x}: {len(body)} ({kinds}; {top})")
    if os.environ.get("SASS_TIMELINE") != "1":
        continue
    run, gap = [], collections.Counter()
    def flush():
        if run:
            print(f"    {run[0]:#07x} HGMMA x{len(run)}")
            run.clear()
        if gap:
            n = sum(gap.values())
            extra = "".join(f", {o} {gap[o]}" for o in ("MUFU", "F2FP", "LDS", "STS") if gap[o])
            print(f"    {'':7}   {n} instructions{extra}")
            gap.clear()
    for addr, op, text in ins:
        if op == "HGMMA":
            if gap:
                flush()
            run.append(addr)
        elif op in ("WARPGROUP", "BAR", "BRA", "BSYNC", "EXIT", "DEPBAR"):
            flush()
            print(f"    {addr:#07x} {' '.join(text.split())}")
        else:
            if run:
                flush()
            gap[op] += 1
    flush()
EOF
