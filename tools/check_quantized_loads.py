#!/usr/bin/env python3
"""Check that `palign quantize` output loads in transformers + bitsandbytes as 4-bit.

Run by hand (CI never runs Python), after `cargo build --release`:
    ~/.cache/palign/venv/bin/python tools/check_quantized_loads.py [--palign target/release/palign]

For each case it quantizes a tests/fixtures model with palign into a temp folder, loads it with
`AutoModelForCausalLM.from_pretrained(dir, device_map="cpu")` (quantization_config from its
config.json), and checks:
  - every decoder projection came back as bnb.nn.Linear4bit, nothing else did;
  - each Linear4bit's packed weight and quant state (absmax, code, blocksize, dtype, shape, and
    with double quant offset, nested absmax and nested code) equal what
    bitsandbytes.functional.quantize_4bit gives for the original weight;
  - the model scores tests/fixtures/data/score_ids.jsonl like `palign score` on the same folder,
    and, for the default settings, like tests/fixtures/train/{base}/expected/qlora_scores.jsonl.
It prints the agreement numbers and exits non-zero on a failed check. Nothing is written to the
repository.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as bnbF  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

# (label, input model folder, extra palign quantize flags, blocksize, double quant, expected scores)
CASES = [
    ("tiny-llama", "tiny-llama", [], 64, True, "train/tiny-llama/expected/qlora_scores.jsonl"),
    ("tiny-mistral", "tiny-mistral", [], 64, True, "train/tiny-mistral/expected/qlora_scores.jsonl"),
    ("tiny-mistral bs128 plain", "tiny-mistral", ["--blocksize", "128", "--no-double-quant"], 128,
     False, None),
    ("tiny-llama-bf16", "tiny-llama-bf16", [], 64, True, None),
]  # fmt: skip


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def pin_bnb_cpu_path(model):
    """Keep bnb 0.50's CPU Linear4bit on dequantize + F.linear: on CPUs with avx512_bf16 its
    no-grad forward otherwise repacks weights for a bf16 kernel (see make_train_fixtures.py)."""
    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


@torch.no_grad()
def score(model, rows):
    """One sequence at a time, no padding, log-probs in f32 (palign `score` semantics)."""
    model.eval()
    out = []
    for r in rows:
        seq = r["prompt_ids"] + r["completion_ids"]
        pl = len(r["prompt_ids"])
        logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        toks = [logp[t - 1, seq[t]].item() for t in range(pl, len(seq))]
        out.append({"logp": sum(toks), "token_logps": toks})
    return out


def max_diff(a, b):
    seq = max(abs(x["logp"] - y["logp"]) for x, y in zip(a, b, strict=True))
    tok = max(
        abs(p - q)
        for x, y in zip(a, b, strict=True)
        for p, q in zip(x["token_logps"], y["token_logps"], strict=True)
    )
    return seq, tok


def check_quant_states(model, ref, blocksize, double_quant):
    """Each Linear4bit equals bnb's quantize_4bit of the original weight, tensor for tensor."""
    n = 0
    ref_sd = ref.state_dict()
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            assert name.split(".")[-1] in TARGETS, name
            w = ref_sd[name + ".weight"]
            packed, qs_ref = bnbF.quantize_4bit(
                w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4"
            )
            qs = m.weight.quant_state
            assert torch.equal(m.weight.data.view(torch.uint8), packed), name
            assert torch.equal(qs.absmax, qs_ref.absmax), name
            assert torch.equal(qs.code, qs_ref.code), name
            assert (qs.blocksize, qs.dtype, qs.quant_type) == (
                qs_ref.blocksize, qs_ref.dtype, qs_ref.quant_type), name  # fmt: skip
            assert tuple(qs.shape) == tuple(qs_ref.shape), name
            assert qs.nested == qs_ref.nested == double_quant, name
            if double_quant:
                assert torch.equal(qs.offset, qs_ref.offset), name
                assert torch.equal(qs.state2.absmax, qs_ref.state2.absmax), name
                assert torch.equal(qs.state2.code, qs_ref.state2.code), name
                assert qs.state2.blocksize == qs_ref.state2.blocksize, name
            n += 1
        elif isinstance(m, torch.nn.Linear):
            assert name == "lm_head", f"{name} is not 4-bit"
    return n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--palign", default=str(ROOT / "target" / "release" / "palign"))
    args = ap.parse_args()
    rows = read_jsonl(FIX / "data" / "score_ids.jsonl")
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for label, base, flags, blocksize, dq, expected in CASES:
            out = Path(tmp) / label.replace(" ", "_")
            subprocess.run(
                [args.palign, "--quiet", "quantize", "--model", str(FIX / base), "--out",
                 str(out), *flags], check=True, capture_output=True)  # fmt: skip
            ours = Path(tmp) / f"{out.name}.scores.jsonl"
            subprocess.run(
                [args.palign, "--quiet", "score", "--model", str(out), "--data",
                 str(FIX / "data" / "score_ids.jsonl"), "--out", str(ours)],
                check=True, capture_output=True)  # fmt: skip
            model = AutoModelForCausalLM.from_pretrained(
                str(out), device_map="cpu", attn_implementation="eager"
            )
            n = pin_bnb_cpu_path(model)
            assert n == 7 * model.config.num_hidden_layers, n
            ref = AutoModelForCausalLM.from_pretrained(str(FIX / base), attn_implementation="eager")
            checked = check_quant_states(model, ref, blocksize, dq)
            compute = model.config.quantization_config.bnb_4bit_compute_dtype
            got = score(model, rows)
            seq, tok = max_diff(got, read_jsonl(ours))
            line = (f"{label}: {checked} Linear4bit equal to quantize_4bit; compute {compute}; "
                    f"transformers vs palign score max |logp diff| {seq:.2e} (token {tok:.2e})")  # fmt: skip
            # bf16 compute rounds activations; palign computes in f32.
            tol = 1e-3 if compute in (torch.float32, "float32") else 0.5
            failed |= seq > tol
            if expected:
                e_seq, e_tok = max_diff(got, read_jsonl(FIX / expected))
                line += f"; vs qlora_scores.jsonl {e_seq:.2e} (token {e_tok:.2e})"
                failed |= e_seq > 1e-3
            print(line)
    print("FAILED" if failed else "all checks passed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
