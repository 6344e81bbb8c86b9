#!/usr/bin/env python3
"""Writes the seed corpora fuzz/corpus/<target>/seed-* from the repository's test
fixtures (plus a few small hand-made inputs), in each target's input layout (see the
doc comment at the top of fuzz/fuzz_targets/<target>.rs). Standard library only.

Run from anywhere: python3 fuzz/make_seeds.py
"""
import json
import struct
from pathlib import Path

FUZZ = Path(__file__).resolve().parent
FIX = FUZZ.parent / "tests" / "fixtures"
CORPUS = FUZZ / "corpus"


def write(target, name, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / f"seed-{name}").write_bytes(data)


def st_read(path):
    """safetensors spec: u64 LE header length, JSON header, packed data."""
    b = path.read_bytes()
    n = struct.unpack("<Q", b[:8])[0]
    header = json.loads(b[8 : 8 + n])
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        s, e = v["data_offsets"]
        out[k] = (v["dtype"], v["shape"], b[8 + n + s : 8 + n + e])
    return out


def st_write(tensors, metadata=None):
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    data = b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def safetensors_seeds():
    t = "safetensors"
    for f in ["f32_8x8_dq", "linear4bit_state", "tables"]:
        write(t, f, b"\x00" + (FIX / "nf4" / f"{f}.safetensors").read_bytes())
    small = {
        "w.f32": ("F32", [2, 3], struct.pack("<6f", 1, -2, 3.5, 0, 1e-3, 7)),
        "w.bf16": ("BF16", [4], bytes([0x80, 0x3F, 0x00, 0xC0, 0x49, 0x40, 0x00, 0x00])),
        "w.f16": ("F16", [1, 2], bytes([0x00, 0x3C, 0x00, 0xC4])),
        "ids": ("I64", [2], struct.pack("<2q", 1, 2)),
        "empty": ("F32", [0, 4], b""),
        "scalar": ("F32", [], struct.pack("<f", 0.5)),
    }
    write(t, "dtypes", b"\x00" + st_write(small, {"format": "pt"}))
    # Index + two shards, in the layout of tests/fixtures/tiny-mistral/model.safetensors.index.json.
    a = {k: small[k] for k in ["w.f32", "w.bf16"]}
    b = {k: small[k] for k in ["w.f16", "scalar"]}
    index = {
        "metadata": {"total_size": 30},
        "weight_map": {**{k: "model-1.safetensors" for k in a}, **{k: "model-2.safetensors" for k in b}},
    }
    sep = b"\n@@shard@@\n"
    body = json.dumps(index, indent=2).encode() + sep + st_write(a) + sep + st_write(b, {"format": "pt"})
    write(t, "index", b"\x01" + body)


def nf4_seeds():
    """Each bnb tensor group of the NF4 fixtures, flag byte first (bit 1: U8 absmax)."""
    sep = b"\n@@\n"
    files = [
        "linear4bit_state",
        "f32_8x8_dq",
        "f32_64x64_plain",
        "f16_40x100_bs32_plain",
        "f32_80x64_bs4096_dq",
        "f32_96x72_bs128_dq",
    ]
    for f in files:
        ts = st_read(FIX / "nf4" / f"{f}.safetensors")
        p = "weight"
        state = ts[f"{p}.quant_state.bitsandbytes__nf4"][2]
        nested = b"nested_offset" in state
        parts = [state, ts[p][2], ts[f"{p}.absmax"][2], ts[f"{p}.quant_map"][2]]
        if nested:
            parts += [ts[f"{p}.nested_absmax"][2], ts[f"{p}.nested_quant_map"][2]]
        flags = 2 if nested else 0
        write("nf4_state", f, bytes([flags]) + sep.join(parts))


def jsonl_seeds():
    t = "jsonl"
    # flags: bits 0-2 kind (0 jsonl, 1 hh-rlhf, 2-4 pku helpful/harmless/harmless-loose),
    # bit 3 DPO, bits 4-5 template (1 vicuna, 2 mistral), bits 6-7 compression (1 gz, 2 xz).
    ds = FIX / "datasets"
    plain = [
        ("sft_text", ds / "jsonl" / "sft_text.jsonl", 0x00),
        ("sft_text_vicuna", ds / "jsonl" / "sft_text.jsonl", 0x10),
        ("sft_ids", ds / "jsonl" / "sft_ids.jsonl", 0x00),
        ("pref_text", ds / "jsonl" / "pref_text.jsonl", 0x08),
        ("pref_text_mistral", ds / "jsonl" / "pref_text.jsonl", 0x28),
        ("pref_ids", ds / "jsonl" / "pref_ids.jsonl", 0x08),
        ("score_text", FIX / "data" / "score_text.jsonl", 0x00),
        ("score_ids", FIX / "data" / "score_ids.jsonl", 0x00),
    ]
    for name, path, flags in plain:
        write(t, name, bytes([flags, 62, 31]) + path.read_bytes())
    # A tight limit so truncation paths run.
    write(t, "pref_text_short", bytes([0x08, 6, 3]) + (ds / "jsonl" / "pref_text.jsonl").read_bytes())
    gz = (ds / "hh-rlhf" / "train.jsonl.gz").read_bytes()
    xz = (ds / "pku-saferlhf" / "train.jsonl.xz").read_bytes()
    write(t, "hh_gz", bytes([0x08 | 0x01 | 0x40, 62, 31]) + gz)
    write(t, "pku_xz_helpful", bytes([0x08 | 0x02 | 0x80, 62, 31]) + xz)
    import gzip, lzma

    hh = gzip.decompress(gz)
    pku = lzma.decompress(xz)
    write(t, "hh_plain_vicuna", bytes([0x08 | 0x01 | 0x10, 62, 31]) + hh)
    write(t, "hh_plain_sft", bytes([0x01 | 0x20, 62, 31]) + hh)
    write(t, "pku_harmless", bytes([0x08 | 0x03, 62, 31]) + pku)
    write(t, "pku_harmless_loose", bytes([0x08 | 0x04, 62, 31]) + pku)


def config_seeds():
    t = "config_json"
    for d in ["tiny-llama", "tiny-mistral", "tiny-llama-bf16", "tiny-mistral-bnb-4bit", "roberta/model"]:
        write(t, d.replace("/", "_"), (FIX / d / "config.json").read_bytes())
    for d in ["tiny-llama/init_adapter", "tiny-mistral/expected/qlora_dpo_final_adapter"]:
        write(t, "adapter_" + d.replace("/", "_"), (FIX / "train" / d / "adapter_config.json").read_bytes())


def merge_seeds():
    for f in sorted((FIX / "merge" / "configs").glob("*.yaml")):
        write("merge_yaml", f.stem, f.read_bytes())
    # Forms the fixtures lack: per-slice base and parameters, gradients, filters, tags.
    write(
        "merge_yaml",
        "slices_full",
        b"""merge_method: dare_ties
base_model: base
slices:
  - sources:
      - model: a+lora
        layer_range: [0, 4]
        parameters: {weight: [0.1, 0.9], density: {filter: mlp, value: 0.5}}
      - model: base
        layer_range: [0, 4]
    base_model: base
    parameters:
      normalize: true
      rescale: "true"
parameters:
  lambda: 1.0
  int8_mask: 1
dtype: torch.float16
out_dtype: bfloat16
tokenizer_source: base
""",
    )


if __name__ == "__main__":
    safetensors_seeds()
    nf4_seeds()
    jsonl_seeds()
    config_seeds()
    merge_seeds()
