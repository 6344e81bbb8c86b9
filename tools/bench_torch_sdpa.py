#!/usr/bin/env python3
"""PyTorch SDPA (flash backend) on the shapes of benches/attention.rs, same table.

16k tokens per batch (batch = 16384 / seq), 32 query heads, 8 KV heads, head_dim 128,
bf16, causal, seq 512/1024/2048/4096. FLOPs as FlashAttention-2 counts them: forward
4*s^2*d*H/2 per sequence, fwd+bwd 3.5x that. GPU time from CUDA events, median of
batches of 5 calls after a warm-up.

GQA: torch's enable_gqa=True when the flash backend takes it; otherwise K/V are
expanded to 32 heads before timing (the expansion and the group sum of dK/dV are then
not timed, which favours SDPA slightly) and the output says so.

    python3 tools/bench_torch_sdpa.py                    # the table
    python3 tools/bench_torch_sdpa.py --compare LOG      # + RATIO lines against the
                                                         #   `BENCH attention` lines in LOG

tools/gpu-check.sh stages this script and runs it after the Rust benches, with
--compare on their log. Not run by CI.
"""

import argparse
import re
import sys

TOKENS = 16384
N_Q, N_KV, HEAD_DIM = 32, 8, 128
SEQS = (512, 1024, 2048, 4096)


def gpu_ms(fn, reps=7, inner=5):
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / inner)
    times.sort()
    return times[len(times) // 2]


def run():
    try:
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as e:
        print(f"bench_torch_sdpa: skipped (PyTorch with torch.nn.attention needed): {e}")
        return {}
    if not torch.cuda.is_available():
        print("bench_torch_sdpa: skipped (no CUDA device)")
        return {}
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    print(f"sdpa on {name}, torch {torch.__version__}: {TOKENS} tokens, "
          f"{N_Q}/{N_KV} heads, d={HEAD_DIM}, causal, flash backend")
    results = {}
    gqa_note_printed = False
    for s in SEQS:
        b = TOKENS // s
        g = torch.Generator(device=dev).manual_seed(s)
        q = torch.randn(b, N_Q, s, HEAD_DIM, device=dev, dtype=torch.bfloat16, generator=g)
        k = torch.randn(b, N_KV, s, HEAD_DIM, device=dev, dtype=torch.bfloat16, generator=g)
        v = torch.randn(b, N_KV, s, HEAD_DIM, device=dev, dtype=torch.bfloat16, generator=g)
        do = torch.randn(b, N_Q, s, HEAD_DIM, device=dev, dtype=torch.bfloat16, generator=g)

        def attend(q, k, v, gqa):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                if gqa:
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        gqa = True
        try:
            attend(q, k, v, True)
        except (RuntimeError, TypeError) as e:
            gqa = False
            if not gqa_note_printed:
                print(f"note: flash backend refused enable_gqa ({str(e).splitlines()[0][:120]}); "
                      "K/V expanded to 32 heads outside the timed region")
                gqa_note_printed = True
            k = k.repeat_interleave(N_Q // N_KV, dim=1).contiguous()
            v = v.repeat_interleave(N_Q // N_KV, dim=1).contiguous()

        fwd_flops = b * 4.0 * s * s * HEAD_DIM * N_Q / 2.0
        with torch.no_grad():
            ms = gpu_ms(lambda: attend(q, k, v, gqa))
        results[("fwd", s)] = (ms, fwd_flops / (ms / 1e3) / 1e12)

        qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))

        def fwd_bwd():
            out = attend(qg, kg, vg, gqa)
            out.backward(do)
            qg.grad = kg.grad = vg.grad = None

        ms = gpu_ms(fwd_bwd)
        results[("fwd+bwd", s)] = (ms, 3.5 * fwd_flops / (ms / 1e3) / 1e12)
        del q, k, v, do, qg, kg, vg
        torch.cuda.empty_cache()

    print(f"summary on {name} (FLOPs as FA2 counts them):")
    for (pas, s), (ms, tf) in sorted(results.items(), key=lambda kv: (kv[0][0] != "fwd", kv[0][1])):
        tag = f"{pas} s={s}"
        print(f"BENCH sdpa_flash {tag:<18} {ms:>9.3} ms  {tf:>7.1} TFLOP/s")
    return results


def compare(results, log_path):
    """RATIO lines: palign TFLOP/s over SDPA's, from the Rust bench's BENCH lines."""
    pat = re.compile(r"BENCH attention (fwd\+bwd|fwd) s=(\d+)\s+([\d.]+) ms\s+([\d.]+) TFLOP/s")
    ours = {}
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                m = pat.search(line)
                if m and "W=" not in line:
                    ours[(m.group(1), int(m.group(2)))] = float(m.group(4))
    except OSError as e:
        print(f"compare: cannot read {log_path}: {e}")
        return
    if not ours:
        print(f"compare: no `BENCH attention` lines in {log_path}")
        return
    for key in sorted(results, key=lambda k: (k[0] != "fwd", k[1])):
        if key in ours:
            pas, s = key
            sdpa = results[key][1]
            print(f"RATIO attention/sdpa_flash {pas} s={s}: {ours[key]:.1f} / {sdpa:.1f} TFLOP/s "
                  f"= {ours[key] / sdpa:.2f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compare", metavar="LOG", help="log holding `BENCH attention` lines")
    args = ap.parse_args()
    results = run()
    if args.compare and results:
        compare(results, args.compare)
    return 0


if __name__ == "__main__":
    sys.exit(main())
