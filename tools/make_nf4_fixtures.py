#!/usr/bin/env python3
"""Generate the NF4 fixtures in tests/fixtures/nf4/ with bitsandbytes' CPU path.

Run with the shared venv (torch + bitsandbytes, CPU only):
    ~/.cache/palign/venv/bin/python tools/make_nf4_fixtures.py

Every case file holds the input weight (in its own dtype), what
`bitsandbytes.functional.quantize_4bit(..., quant_type="nf4")` returned, serialised
exactly as bnb writes it (`QuantState.as_dict(packed=True)` under the prefix
"weight"), and what `dequantize_4bit` gives back. tests/nf4_bnb.rs compares palign
to these bit for bit. CI never runs this script.
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file

import bitsandbytes as bnb
import bitsandbytes.functional as F

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "nf4")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def nf4_midpoints():
    code = F.get_4bit_type("nf4", device="cpu")
    return (code[:-1] + code[1:]) / 2


def make_weight(shape, dtype, seed, special):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    flat = w.view(-1)
    # A few outliers so some blocks have a large absmax next to small ones.
    idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 500),), generator=g)
    flat[idx] *= 25.0
    if special:
        # Block 0 all zero (absmax 0), block 1 = the f32 midpoints between NF4 codes and
        # their neighbours (absmax exactly 1.0), so the tie rule is pinned.
        flat[:64] = 0.0
        mids = nf4_midpoints()
        vals = torch.cat([mids, torch.nextafter(mids, torch.ones_like(mids)),
                          torch.nextafter(mids, -torch.ones_like(mids)), -mids[:3], torch.tensor([1.0, -1.0, 0.5, -0.0])])
        vals = vals[:64]
        flat[64:64 + vals.numel()] = vals
        flat[64 + vals.numel():128] = 0.25
    return w.to(dtype)


def dequant_as(q, state, dtype):
    """bnb's dequantize_4bit, with the output dtype forced (bnb uses state.dtype)."""
    saved = state.dtype
    state.dtype = dtype
    try:
        return F.dequantize_4bit(q, state)
    finally:
        state.dtype = saved


def absmax_f32(state):
    if state.nested:
        a = F.dequantize_blockwise(state.absmax, state.state2)
        return a + state.offset
    return state.absmax


def reference_dequant(q, state):
    """LUT[nibble] * absmax[e // blocksize] in f32 with torch ops (the CUDA kernel's formula)."""
    code = F.get_4bit_type("nf4", device="cpu")
    flat = q.view(-1)
    nib = torch.stack([flat >> 4, flat & 15], dim=1).view(-1).long()
    n = 1
    for s in state.shape:
        n *= s
    vals = code[nib[:n]]
    scale = absmax_f32(state).repeat_interleave(state.blocksize)[:n]
    return (vals * scale).view(state.shape)


def case(name, shape, dtype_name, blocksize, compress, seed, special=False):
    dtype = DTYPES[dtype_name]
    w = make_weight(shape, dtype, seed, special)
    q, st = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=compress, quant_type="nf4")
    tensors = {"input": w.contiguous(), "weight": q.contiguous()}
    for k, v in st.as_dict(packed=True).items():
        tensors["weight." + k] = v.contiguous()
    deq32 = dequant_as(q, st, torch.float32)
    ref = reference_dequant(q, st)
    cpu_kernel_ok = bool(torch.equal(deq32.view(torch.int32), ref.view(torch.int32)))
    tensors["dequant_f32"] = ref.contiguous()
    if not cpu_kernel_ok:
        tensors["dequant_cpu_kernel_f32"] = deq32.contiguous()
    if dtype != torch.float32:
        tensors["dequant_native"] = F.dequantize_4bit(q, st).contiguous()
    if compress:
        tensors["offset"] = st.offset.reshape(1).float()
        tensors["absmax_f32"] = absmax_f32(st).contiguous()
    meta = {
        "shape": json.dumps(list(shape)),
        "dtype": dtype_name,
        "blocksize": str(blocksize),
        "compress_statistics": str(compress),
        "cpu_kernel_dequant_matches_reference": str(cpu_kernel_ok),
        "bitsandbytes": bnb.__version__,
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    save_file(tensors, os.path.join(OUT, name + ".safetensors"), metadata=meta)
    print(f"{name}: shape={shape} {dtype_name} bs={blocksize} dq={compress} cpu_kernel_ok={cpu_kernel_ok}")


def linear4bit_state_dict():
    """What bnb.nn.Linear4bit really writes (keys, dtypes, JSON blob)."""
    torch.manual_seed(7)
    lin = torch.nn.Linear(96, 40, bias=True)
    w = lin.weight.detach().clone()
    layer = bnb.nn.Linear4bit(96, 40, bias=True, compute_dtype=torch.float32,
                              compress_statistics=True, quant_type="nf4")
    layer.load_state_dict({"weight": w, "bias": lin.bias.detach().clone()})
    layer = layer.to("cpu")
    sd = {k: v.contiguous() for k, v in layer.state_dict().items()}
    save_file(sd, os.path.join(OUT, "linear4bit_state.safetensors"))
    q, st = layer.weight.data, layer.weight.quant_state
    ref = {"input.weight": w.contiguous(), "dequant_f32": reference_dequant(q, st).contiguous()}
    kernel = dequant_as(q, st, torch.float32)
    if not torch.equal(kernel.view(torch.int32), ref["dequant_f32"].view(torch.int32)):
        # 96 is not a multiple of the blocksize: bnb's AVX512 CPU kernel mis-indexes absmax.
        ref["dequant_cpu_kernel_f32"] = kernel.contiguous()
    save_file(ref, os.path.join(OUT, "linear4bit_ref.safetensors"))
    for k, v in sd.items():
        print(f"  linear4bit {k}: {v.dtype} {list(v.shape)}")


def tables():
    dyn = F.create_dynamic_map(signed=True)
    code = F.get_4bit_type("nf4", device="cpu")
    save_file({"dynamic_map": dyn.contiguous(), "nf4_code": code.contiguous()},
              os.path.join(OUT, "tables.safetensors"))


def main():
    os.makedirs(OUT, exist_ok=True)
    tables()
    case("f32_64x64_dq", (64, 64), "float32", 64, True, 1, special=True)
    case("bf16_48x80_dq", (48, 80), "bfloat16", 64, True, 2)
    case("f16_130x70_dq", (130, 70), "float16", 64, True, 3)
    case("f32_160x130_dq", (160, 130), "float32", 64, True, 4, special=True)
    case("bf16_131x97_dq", (131, 97), "bfloat16", 64, True, 5)
    case("f32_8x8_dq", (8, 8), "float32", 64, True, 6)
    case("f32_64x64_plain", (64, 64), "float32", 64, False, 1, special=True)
    case("bf16_130x70_plain", (130, 70), "bfloat16", 64, False, 8)
    case("f32_96x72_bs128_dq", (96, 72), "float32", 128, True, 9)
    case("f16_40x100_bs32_plain", (40, 100), "float16", 32, False, 10)
    case("f32_80x64_bs4096_dq", (80, 64), "float32", 4096, True, 11)
    linear4bit_state_dict()
    print("bitsandbytes", bnb.__version__, "torch", torch.__version__, file=sys.stderr)


if __name__ == "__main__":
    main()
