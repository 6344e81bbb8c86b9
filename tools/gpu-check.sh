#!/usr/bin/env bash
# Build every GPU test and bench binary here (no GPU needed), stage them with a runner
# in ./gpu-stage/ (git-ignored), then run them on a GPU machine in one command.
#
#   tools/gpu-check.sh            # build + stage (prints the staged size)
#
# On the GPU machine (NVIDIA driver, nvcc, PyTorch; no Rust toolchain needed):
#   bash gpu-stage/run.sh         # runs everything, writes the report
#
# From a palign session with the device tool, that second step is two calls, the second
# sent at once (a machine idle for 30 s goes back; everything takes longer than one
# 600 s call). Pick sections with PALIGN_GPU_SECTIONS (any of: tests benches prof train
# generate) and give each call PALIGN_GPU_BUDGET_S a little under its timeout_s:
#   run(command="PALIGN_GPU_BUDGET_S=570 PALIGN_GPU_SECTIONS='tests benches' bash gpu-stage/run.sh", carry=["gpu-stage"], timeout_s=590)
#   run(command="PALIGN_GPU_BUDGET_S=<left - 30> PALIGN_GPU_SECTIONS='train generate' bash gpu-stage/run.sh", carry=["gpu-stage"], timeout_s=<left - 20>)
# On an H200 (2026-11-28) the machine took ~40 s to start; all tests 71 s; benches nf4
# 48 s, attention + logprob ~150 s, lora + small_kernels ~180 s, SDPA ~30 s; a training
# config ~20 s for palign plus 25-40 s for the Python side (run once per method and
# checkpointing); a generation config ~35 s. Third session (2026-11-28, 6e40100): all tests,
# then benches nf4 + attention + SDPA, took 166 s in one call (~200 s with the start). A
# machine idle 30 s after a call goes back, and a new one may then be refused for the rest
# of the session ("no new device machine is lent at present"): send every call the work
# needs back to back, or put it all in the first.
# PALIGN_GPU_TESTS / PALIGN_GPU_BENCHES (space-separated names) narrow the tests and
# benches; PALIGN_TRAIN_CONFIGS picks the training configs and PALIGN_GEN_CONFIGS the
# generation ones (see run.sh below). PALIGN_GPU_TEST_LIMIT_S (default 180) caps each test
# binary, so a kernel that hangs on its first GPU run costs that and not the call's budget;
# the benches and profiles after it then leave out that binary's wgmma kernels.
# The staged tests find the fixtures in the copied working tree (run from the repo root)
# and the staged palign binary through PALIGN_FIXTURES / PALIGN_BIN.
# The runner writes gpu-report.md (GPU name, driver, per-test pass/fail, every PARITY
# max-error line, every BENCH figure) plus full logs under $OUT, which come back with
# the call. Copy the figures into benches/RESULTS.md with the date, GPU and commit.
#
# What counts as a GPU binary: an integration test in tests/ that has
# `#[ignore = "needs a CUDA device"]`, the library's unit tests if src/ has one, and a
# bench in benches/ that uses `backend::cuda`. Tests run with --ignored (only the GPU
# tests: CI runs the rest; PALIGN_GPU_ALL_TESTS=1 runs those too, --include-ignored),
# benches with --bench. Binaries are release
# builds with PALIGN_REQUIRE_KERNELS=1 (every arch in the fatbin), stripped.
set -euo pipefail
cd "$(dirname "$0")/.."

STAGE=gpu-stage
LIMIT_MIB=64

tests=()
for f in tests/*.rs; do
    grep -q 'needs a CUDA device' "$f" && tests+=(--test "$(basename "$f" .rs)")
done
if grep -rq 'needs a CUDA device' src/; then
    tests+=(--lib)
fi
benches=()
for f in benches/*.rs; do
    grep -q 'backend::cuda' "$f" && benches+=(--bench "$(basename "$f" .rs)")
done
if [ ${#tests[@]} -eq 0 ] && [ ${#benches[@]} -eq 0 ]; then
    echo "gpu-check: no GPU tests or benches found" >&2
    exit 1
fi

export PALIGN_REQUIRE_KERNELS=1
# The lent GPU machines are H100/H200 (sm_90a). Every staged binary embeds the whole
# fatbin, and all five archs would push the stage past the 64 MiB carry limit, so the
# stage holds sm_90a SASS only unless PALIGN_CUDA_ARCHS says otherwise. A separate
# target dir keeps the everyday all-arch build from being rebuilt each time.
export PALIGN_CUDA_ARCHS="${PALIGN_CUDA_ARCHS:-90a}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/gpu-stage}"
json="$(mktemp)"
trap 'rm -f "$json"' EXIT
echo "gpu-check: building ${tests[*]} ${benches[*]}" >&2
[ ${#tests[@]} -gt 0 ] && cargo test --release --no-run --message-format=json "${tests[@]}" >>"$json"
[ ${#benches[@]} -gt 0 ] && cargo bench --no-run --message-format=json "${benches[@]}" >>"$json"
# The CLI itself: the GPU model tests run it, and `palign bench train` is the training bench.
cargo build --release --bin palign

rm -rf "$STAGE"
mkdir -p "$STAGE/tests" "$STAGE/benches"
# One line per built executable: "<kind> <name> <path>", kind = test | bench.
python3 - "$json" <<'EOF' | while read -r kind name path; do
import json, sys
seen = set()
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "build-script-executed" and "palign" in m.get("package_id", ""):
        # The kernels' build note (nvcc, targets, time) for the manifest.
        try:
            text = open(m["out_dir"] + "/palign_kernels.rs").read()
            consts = {}
            for ln in text.splitlines():
                if ln.startswith("pub const"):
                    name, val = ln[len("pub const "):].split(":", 1)
                    consts[name] = val.split("=", 1)[1].strip().rstrip(";")
            print("note", "kernels", "compiled=%s targets=%s %s" % (
                consts.get("KERNELS_COMPILED"), consts.get("TARGETS"), consts.get("BUILD_NOTE")))
        except (OSError, ValueError):
            pass
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    t = m["target"]
    if not m["profile"].get("test") and "bench" not in t["kind"]:
        continue
    kind = "bench" if "bench" in t["kind"] else "test"
    key = (kind, t["name"])
    if key not in seen:
        seen.add(key)
        print(kind, t["name"], m["executable"])
EOF
    case "$kind" in
        note) echo "$path" >>"$STAGE/BUILD_NOTE"; continue ;;
        test) dest="$STAGE/tests" ;;
        *) dest="$STAGE/benches" ;;
    esac
    cp "$path" "$dest/$name"
    strip "$dest/$name"
done

commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
dirty="$(git status --porcelain 2>/dev/null | grep -q . && echo ' (+ uncommitted changes)' || true)"
{
    echo "commit: $commit$dirty"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m), $(rustc --version)"
    sort -u "$STAGE/BUILD_NOTE" 2>/dev/null | sed 's/^/kernels: /'
    echo "tests: $(ls "$STAGE/tests" | tr '\n' ' ')"
    echo "benches: $(ls "$STAGE/benches" | tr '\n' ' ')"
} >"$STAGE/MANIFEST"
rm -f "$STAGE/BUILD_NOTE"
# ---- attention (issue 8): stage the PyTorch SDPA baseline ----
cp tools/bench_torch_sdpa.py "$STAGE/"
# ---- end attention ----
# ---- training step (issue 10): the CLI and the transformers + peft baseline ----
cp "$CARGO_TARGET_DIR/release/palign" "$STAGE/palign"
strip "$STAGE/palign"
cp tools/bench_hf.py "$STAGE/"
# The GPU machine's image has transformers and peft but no bitsandbytes and no TRL, so
# the baseline would fall back to bf16 LoRA. Stage them as a trimmed site dir (only the
# CUDA 13.0 and CPU builds of libbitsandbytes: the image's torch is cu130) from wheels
# for Python 3.12, fetched once into ~/.cache/palign/wheels (tools/fetch-py-wheels.sh).
WHEELS="${PALIGN_PY_WHEELS:-$HOME/.cache/palign/wheels}"
[ -d "$WHEELS" ] || bash tools/fetch-py-wheels.sh "$WHEELS" || true
if ls "$WHEELS"/bitsandbytes-*.whl >/dev/null 2>&1; then
    site="$(mktemp -d)"
    for w in "$WHEELS"/*.whl; do python3 -m zipfile -e "$w" "$site/site"; done
    find "$site/site/bitsandbytes" -name 'libbitsandbytes_*' ! -name '*_cuda130.so' ! -name '*_cpu.so' -delete
    tar -cJf "$STAGE/pylib.tar.xz" -C "$site" site
    rm -rf "$site"
    echo "gpu-check: staged Python extras: $(ls "$WHEELS" | tr '\n' ' ')" >&2
else
    echo "gpu-check: no wheels in $WHEELS: bench_hf.py will run without bitsandbytes/TRL" >&2
fi
# ---- end training step ----

cat >"$STAGE/run.sh" <<'EOF'
#!/usr/bin/env bash
# Runs on the GPU machine (written by tools/gpu-check.sh). Writes gpu-report.md,
# tests.log and benches.log into $OUT (or gpu-stage/out). Exit 1 if any test failed.
set -u
HERE="$(cd "$(dirname "$0")" && pwd)"
# The binaries travel xz-compressed (the device tool carries at most 64 MiB).
if [ -f "$HERE/binaries.tar.xz" ] && [ ! -d "$HERE/tests" ]; then
    tar -xJf "$HERE/binaries.tar.xz" -C "$HERE"
fi
OUTDIR="${OUT:-$HERE/out}"
mkdir -p "$OUTDIR"
REPORT="$OUTDIR/gpu-report.md"
TLOG="$OUTDIR/tests.log"
BLOG="$OUTDIR/benches.log"
: >"$TLOG"
: >"$BLOG"

# cuBLAS: the system's, else the one PyTorch's wheels ship (nvidia/*/lib).
libdirs="$(python3 - <<'PY' 2>/dev/null
import glob, os, site
dirs = set()
for sp in site.getsitepackages():
    for p in glob.glob(os.path.join(sp, "nvidia", "**", "libcublas.so*"), recursive=True):
        dirs.add(os.path.dirname(p))
print(":".join(sorted(dirs)))
PY
)"
export LD_LIBRARY_PATH="${libdirs:+$libdirs:}/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export CRITERION_HOME="${TMPDIR:-/tmp}/palign-criterion"
export PALIGN_BIN="$HERE/palign"
[ -d "$PWD/tests/fixtures" ] && export PALIGN_FIXTURES="$PWD/tests/fixtures"
SECTIONS="${PALIGN_GPU_SECTIONS:-tests benches prof train generate}"
want() { case " $SECTIONS " in *" $1 "*) return 0 ;; esac; return 1; }
want_test() { case " ${PALIGN_GPU_TESTS:-} " in *" $1 "*) return 0 ;; esac; return 1; }
want_bench() { case " ${PALIGN_GPU_BENCHES:-} " in *" $1 "*) return 0 ;; esac; return 1; }
# PALIGN_GPU_BUDGET_S=N ends everything within N seconds of the start: each command's
# timeout is cut to what is left, and a command with under 10 s left is skipped (said so
# in the report; a skipped test does not count as failed). An outer `timeout` on this
# script is no substitute: it kills bash but not the test or bench it is waiting for,
# which then runs on, on the same GPU, under the next section's timings (it did in the
# 2026-11-28 run).
START_S=$(date +%s)
# lim D: the seconds the next command may run (D, or what the budget has left less the
# 5 s kill grace); fails when that is under 10 s.
lim() {
    local d=$1 left
    if [ -n "${PALIGN_GPU_BUDGET_S:-}" ]; then
        left=$((START_S + PALIGN_GPU_BUDGET_S - 5 - $(date +%s)))
        [ "$left" -lt "$d" ] && d=$left
    fi
    [ "$d" -ge 10 ] || return 1
    echo "$d"
}
skipped() { printf '\n### %s\nskipped: the budget (PALIGN_GPU_BUDGET_S) is spent\n' "$1" >>"$REPORT"; }

{
    echo "# palign GPU check"
    echo
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    sed 's/^/    /' "$HERE/MANIFEST"
    echo
    echo "GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>&1 | head -n 1)"
    echo "nvcc here: $(nvcc --version 2>/dev/null | tail -n 2 | head -n 1)"
    echo "cuBLAS dirs: ${libdirs:-none found in site-packages}"
} >"$REPORT"

failed=0
# A test binary gets PALIGN_GPU_TEST_LIMIT_S (default 180 s; all of them took 71 s on an
# H200): a kernel that hangs on its first GPU run then costs that, not the budget. A binary
# that times out is named in PALIGN_GPU_HUNG for the benches and profiles after it, which
# then leave out the kernels it tests that are new on GPUs (the sm_90a wgmma ones).
export PALIGN_GPU_HUNG="${PALIGN_GPU_HUNG:-}"
echo "sections: $SECTIONS" >>"$REPORT"
echo >>"$REPORT"
want tests && echo "## tests" >>"$REPORT"
want tests && for t in "$HERE"/tests/*; do
    [ -x "$t" ] || continue
    name="$(basename "$t")"
    # PALIGN_GPU_TESTS="gpu_model gpu_nf4" runs only those binaries.
    if [ -n "${PALIGN_GPU_TESTS:-}" ] && ! want_test "$name"; then continue; fi
    secs=$(lim "${PALIGN_GPU_TEST_LIMIT_S:-180}") || { skipped "$name"; continue; }
    echo "==== $name" >>"$TLOG"
    which=--ignored
    [ "${PALIGN_GPU_ALL_TESTS:-0}" = 1 ] && which=--include-ignored
    timeout -k 5 "$secs" "$t" $which --test-threads=1 --show-output >>"$TLOG" 2>&1
    rc=$?
    [ $rc -ne 0 ] && failed=1
    {
        echo
        echo "### $name (exit $rc)"
        echo '```'
        sed -n "/^==== $name\$/,/^==== /p" "$TLOG" |
            grep -A1 -E '^test .* \.\.\. |^---- |PARITY|PROBE|SKIPPED|TUNED|panicked|^test result|kernels not compiled' |
            grep -v -E '^--$|^note: run with|^$'
        echo '```'
    } >>"$REPORT"
    if [ $rc = 124 ] || [ $rc = 137 ]; then
        PALIGN_GPU_HUNG="$PALIGN_GPU_HUNG $name"
        echo "$name timed out after $secs s: benches and profiles skip its wgmma kernels" >>"$REPORT"
    fi
done

# bench_section NAME LIMIT PATTERN CMD...: runs CMD within the budget into benches.log
# under "==== NAME" and copies its lines matching PATTERN into the report.
bench_section() {
    local name=$1 secs rc
    secs=$(lim "$2") || { skipped "$name"; return 0; }
    echo "==== $name" >>"$BLOG"
    timeout -k 5 "$secs" "${@:4}" >>"$BLOG" 2>&1
    rc=$?
    {
        echo
        echo "### $name (exit $rc)"
        echo '```'
        sed -n "/^==== $name\$/,/^==== /p" "$BLOG" | grep -E "$3" || true
        echo '```'
    } >>"$REPORT"
}

want benches && echo >>"$REPORT" && echo "## benches" >>"$REPORT"
want benches && for b in "$HERE"/benches/*; do
    [ -x "$b" ] || continue
    name="$(basename "$b")"
    # PALIGN_GPU_BENCHES="attention lora" runs only those benches.
    if [ -n "${PALIGN_GPU_BENCHES:-}" ] && ! want_bench "$name"; then continue; fi
    bench_section "$name" 600 'BENCH|RATIO|skipped|^small_kernels on|summary on|thrpt|error' "$b" --bench
    # ---- attention (issue 8): PyTorch SDPA flash baseline on the same shapes, then
    # ratios; right after the attention bench, so a budget that ends the benches early
    # still leaves the two side by side.
    if [ "$name" = attention ] && [ -f "$HERE/bench_torch_sdpa.py" ]; then
        bench_section bench_torch_sdpa.py 300 'BENCH|RATIO|^sdpa on|^note|skipped|Error' \
            python3 "$HERE/bench_torch_sdpa.py" --compare "$BLOG"
    fi
done

# ---- profiles: tools/prof/*.cu, standalone CUDA harnesses built here by nvcc (from the
# repo root of the copied tree: they include kernels/*.cu), for timings kernel by kernel
# that the benches' totals hide. Each runs as is, then, where ncu is installed and the
# harness has a `// ncu: REGEX ARGS` line, once more under ncu (hardware counters, warp
# stall reasons) into $OUT/ncu-<name>.txt. ncu needs a machine whose runtime exposes the
# counters (device tool KINDS.md: Firecracker yes, gVisor no); its failure is reported.
if want prof; then
    echo >>"$REPORT"
    echo "## prof" >>"$REPORT"
    NCU="$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)"
    cc="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1)"
    arch="sm_${cc/./}"
    [ "$arch" = sm_90 ] && arch=sm_90a
    for src in "$HERE"/../tools/prof/*.cu; do
        [ -f "$src" ] || continue
        name="$(basename "$src" .cu)"
        bin="${TMPDIR:-/tmp}/palign-prof-$name"
        rm -f "$bin" # never the previous call's binary when nvcc fails
        echo "==== prof $name" >>"$BLOG"
        if ! secs="$(lim 120)"; then skipped "prof $name"; continue; fi
        timeout -k 5 "$secs" nvcc -O3 -std=c++17 -arch="$arch" -I"$HERE/../kernels" "$src" -o "$bin" >>"$BLOG" 2>&1
        echo "nvcc rc=$?" >>"$BLOG"
        if [ -x "$bin" ] && secs="$(lim 180)"; then
            timeout -k 5 "$secs" "$bin" >>"$BLOG" 2>&1
            echo "run rc=$?" >>"$BLOG"
        fi
        ncu_line="$(sed -n 's@^// ncu: @@p' "$src" | head -n 1)"
        if [ -x "$bin" ] && [ -n "$NCU" ] && [ -n "$ncu_line" ] && secs="$(lim 150)"; then
            # shellcheck disable=SC2086 # the harness's arguments, split on purpose
            timeout -k 5 "$secs" "$NCU" --clock-control none --kernel-name "regex:${ncu_line%% *}" \
                --launch-count 4 --section SpeedOfLight --section WarpStateStats \
                --section SchedulerStats --section MemoryWorkloadAnalysis \
                --section ComputeWorkloadAnalysis --section Occupancy \
                "$bin" ${ncu_line#* } >"$OUTDIR/ncu-$name.txt" 2>&1
            echo "ncu rc=$? (ncu-$name.txt)" >>"$BLOG"
        fi
        {
            echo
            echo "### prof $name"
            echo '```'
            sed -n "/^==== prof $name\$/,/^==== /p" "$BLOG" | grep -E 'PROF|rc=|error|on NVIDIA' || true
            echo '```'
        } >>"$REPORT"
    done
fi

# ---- training step (issue 10): palign bench train vs tools/bench_hf.py, same GPU ----
# Mistral-7B shape, batch 16 x 512, rank 16 on all 7 projections, dropout 0.05. DPO runs
# palign with --recompute full and the Python stack with gradient checkpointing (both
# trade a forward for memory); SFT runs both without.
tps() { grep -o 'tokens_per_s=[0-9.]*' | tail -n 1 | cut -d= -f2; }
# bitsandbytes + TRL staged by gpu-check.sh (the image lacks them): first on the path.
PYX=""
if [ -f "$HERE/pylib.tar.xz" ]; then
    pylib="${TMPDIR:-/tmp}/palign-pylib"
    rm -rf "$pylib" && mkdir -p "$pylib" && tar -xJf "$HERE/pylib.tar.xz" -C "$pylib" && PYX="$pylib/site"
fi
if want train && [ -x "$HERE/palign" ]; then
    echo >>"$REPORT"
    echo "## training step (palign bench train vs tools/bench_hf.py)" >>"$REPORT"
    # PALIGN_TRAIN_CONFIGS="sft qlora none,dpo qlora full" picks configs (method peft
    # recompute [VAR=value ...] [--flag[=value] ...]); the VAR=value words are set for
    # palign only, e.g. "sft qlora none PALIGN_LORA_DROP=unfused" to time a kernel choice,
    # and --flag words go to palign's bench command as they are, e.g. "dpo qlora full
    # --keep-dropout" (dropout kept in DPO: the policy pass cannot share each pair's
    # prompt); --keep-dropout and --dropout=P go to bench_hf.py too, so both sides run the
    # same step. The Python side runs once per (method, peft, checkpointing, those flags)
    # and is reused by later configs.
    IFS=, read -r -a configs <<<"${PALIGN_TRAIN_CONFIGS:-sft qlora none,dpo qlora full,sft lora none,dpo lora full}"
    declare -A hf_done=()
    for cfg in "${configs[@]}"; do
        set -- $cfg
        m=$1 p=$2 r=$3
        shift 3
        envs=() flags=() hf_flags=()
        for w in "$@"; do
            case "$w" in
            --keep-dropout | --dropout=*) flags+=("$w") hf_flags+=("$w") ;; # the same step on both sides
            --*) flags+=("$w") ;;
            *) envs+=("$w") ;;
            esac
        done
        gc=""
        [ "$r" = full ] && gc="--gradient-checkpointing"
        secs=$(lim 300) || { skipped "train $cfg"; continue; }
        echo "==== train $m $p $r $* " >>"$BLOG"
        ours="$(env ${envs[@]+"${envs[@]}"} timeout -k 5 "$secs" "$HERE/palign" bench train --shape mistral-7b --method "$m" --peft "$p" --recompute "$r" --batch-size 16 --seq-len 512 ${flags[@]+"${flags[@]}"} 2>>"$BLOG")"
        echo "$ours" >>"$BLOG"
        key="$m $p $gc ${hf_flags[*]:-}"
        if [ -z "${hf_done[$key]:-}" ] && secs=$(lim 300); then
            hf_done[$key]="$(PYTHONPATH="${PYX:+$PYX:}${PYTHONPATH:-}" timeout -k 5 "$secs" python3 "$HERE/bench_hf.py" --shape mistral-7b --method "$m" --peft "$p" --batch-size 16 --seq-len 512 $gc ${hf_flags[@]+"${hf_flags[@]}"} 2>>"$BLOG")"
            [ -n "${hf_done[$key]}" ] || hf_done[$key]="(no result)"
        fi
        theirs="${hf_done[$key]:-(no result: budget spent)}"
        echo "$theirs" >>"$BLOG"
        a="$(echo "$ours" | tps)"
        b="$(echo "$theirs" | tps)"
        {
            echo
            echo "### $m $p (palign --recompute $r $*; hf ${gc:-no checkpointing})"
            echo '```'
            echo "$ours" | grep -E 'BENCH_TRAIN|BREAKDOWN|TUNED' || echo "palign: no result (see benches.log)"
            echo "$theirs" | grep -E 'BENCH_TRAIN|note' || echo "hf: no result (see benches.log)"
            if [ -n "$a" ] && [ -n "$b" ]; then
                echo "RATIO train_${m}_${p} palign/hf tokens_per_s = $(python3 -c "print(f'{$a/$b:.3f}')")"
            fi
            echo '```'
        } >>"$REPORT"
    done
fi
# ---- end training step ----

# ---- generation (what evaluation costs): palign bench generate vs bench_hf.py --method generate ----
# PALIGN_GEN_CONFIGS="qlora 16 32 256 128,lora 0 32 256 128 PALIGN_DEVICE_ARGMAX=0" (peft rank batch prompt_len
# new_tokens [VAR=value ...] [--flag ...]): qlora = NF4 base (eval --quant nf4), rank 0 = no
# adapter (a merged model). Mistral-7B shape, greedy, no EOS: every row gets all its tokens.
# VAR=value words are set for palign only; --temperature=T, --top-p=P, --vary (rows end at
# different lengths: palign refills its slots, transformers runs batch after batch) and
# --prompts=N (more prompts than slots) go to both sides,
# other --flag words (e.g. --targets=q_proj,v_proj) to palign only, so only use them to time
# a palign-side choice.
gen_field() { grep -o " $1=[0-9.a-z]*" | tail -n 1 | cut -d= -f2; }
if want generate && [ -x "$HERE/palign" ]; then
    echo >>"$REPORT"
    echo "## generation (palign bench generate vs tools/bench_hf.py --method generate)" >>"$REPORT"
    IFS=, read -r -a gconfigs <<<"${PALIGN_GEN_CONFIGS:-qlora 16 32 256 128,qlora 16 128 256 128,qlora 16 128 256 128 PALIGN_DEVICE_ARGMAX=0,qlora 16 128 256 256 --vary --prompts=512,lora 0 32 256 128}"
    declare -A hf_gen=()
    for cfg in "${gconfigs[@]}"; do
        set -- $cfg
        if [ $# -lt 5 ]; then
            printf '\n### generate %s\nskipped: a config is "peft rank batch prompt_len new_tokens [...]"\n' "$cfg" >>"$REPORT"
            continue
        fi
        p=$1 r=$2 bs=$3 pl=$4 nt=$5
        shift 5
        envs=() flags=() hf_flags=()
        for w in "$@"; do
            case "$w" in
            --temperature=* | --top-p=* | --vary | --prompts=*) flags+=("$w") hf_flags+=("$w") ;; # both sides
            --*) flags+=("$w") ;;
            *) envs+=("$w") ;;
            esac
        done
        shape=(--shape mistral-7b --peft "$p" --rank "$r" --batch-size "$bs" --prompt-len "$pl" --new-tokens "$nt")
        # Every word after the shape names the ratio, so configs that differ only on
        # palign's side (a VAR=value switch) print distinct RATIO lines.
        tag="$(printf '%s' "$*" | tr -c 'a-zA-Z0-9.' '_')"
        tag="${tag:+_$tag}"
        secs=$(lim 300) || { skipped "generate $cfg"; continue; }
        echo "==== generate $cfg" >>"$BLOG"
        ours="$(env ${envs[@]+"${envs[@]}"} timeout -k 5 "$secs" "$HERE/palign" bench generate "${shape[@]}" ${flags[@]+"${flags[@]}"} 2>>"$BLOG")"
        echo "$ours" >>"$BLOG"
        # The Python side runs once per (shape, sampling flags) and is reused by configs that
        # only change palign's side (e.g. a VAR=value switch).
        key="${shape[*]} ${hf_flags[*]:-}"
        if [ -z "${hf_gen[$key]:-}" ] && secs=$(lim 300); then
            hf_gen[$key]="$(PYTHONPATH="${PYX:+$PYX:}${PYTHONPATH:-}" timeout -k 5 "$secs" python3 "$HERE/bench_hf.py" --method generate "${shape[@]}" ${hf_flags[@]+"${hf_flags[@]}"} 2>>"$BLOG")"
            [ -n "${hf_gen[$key]}" ] || hf_gen[$key]="(no result)"
        fi
        theirs="${hf_gen[$key]:-(no result: budget spent)}"
        echo "$theirs" >>"$BLOG"
        {
            echo
            echo "### generate $cfg"
            echo '```'
            echo "$ours" | grep -E 'BENCH_GENERATE|BREAKDOWN' || echo "palign: no result (see benches.log)"
            echo "$theirs" | grep -E 'BENCH_GENERATE|note' || echo "hf: no result (see benches.log)"
            for k in tokens_per_s decode_tokens_per_s prefill_tokens_per_s; do
                a="$(echo "$ours" | grep BENCH_GENERATE | gen_field "$k")"
                b="$(echo "$theirs" | grep BENCH_GENERATE | gen_field "$k")"
                if [ -n "$a" ] && [ -n "$b" ] && [ "$a" != nan ] && [ "$b" != nan ]; then
                    echo "RATIO generate_${p}_r${r}_b${bs}_p${pl}_n${nt}${tag} palign/hf $k = $(python3 -c "print(f'{$a/$b:.3f}')")"
                fi
            done
            echo '```'
        } >>"$REPORT"
    done
fi
# ---- end generation ----

echo >>"$REPORT"
if [ $failed -eq 0 ]; then echo "RESULT: all tests passed" >>"$REPORT"; else echo "RESULT: SOME TESTS FAILED (see tests.log)" >>"$REPORT"; fi
cat "$REPORT"
exit $failed
EOF
chmod +x "$STAGE/run.sh"

n_bin="$(ls "$STAGE/tests" "$STAGE/benches" | grep -vc ':$\|^$')"
ls -la "$STAGE/tests" "$STAGE/benches" "$STAGE/palign" >&2
# Stripped binaries are mostly code and the sm_90a fatbin; xz takes them to about a third.
tar -cJf "$STAGE/binaries.tar.xz" -C "$STAGE" tests benches palign
rm -rf "$STAGE/tests" "$STAGE/benches" "$STAGE/palign"
size_kib="$(du -sk "$STAGE" | cut -f1)"
echo "gpu-check: staged in $STAGE: $n_bin binaries + the CLI, $((size_kib / 1024)) MiB (${size_kib} KiB) compressed" >&2
if [ "$size_kib" -gt $((LIMIT_MIB * 1024)) ]; then
    echo "gpu-check: $STAGE is over ${LIMIT_MIB} MiB; the device tool will not carry it" >&2
    exit 1
fi
echo "gpu-check: on the GPU machine run: bash $STAGE/run.sh" >&2
