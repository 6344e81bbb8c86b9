#!/usr/bin/env python3
"""Generate tests/fixtures/merge/ with mergekit 0.1.5 (CPU): the reference for `palign merge`.

Run from anywhere with the shared venv (needs tools/make_fixtures.py's and
tools/make_train_fixtures.py's models and adapters first):
    ~/.cache/palign/venv/bin/python tools/make_merge_fixtures.py

Inputs are the committed tiny models and adapters plus one model made here and never stored:
PERTURBED, tiny-llama with a deterministic integer-hash offset added to every weight. Its
definition (perturb() below) is mirrored exactly in tests/merge.rs, which rebuilds it at test
time; every op is one IEEE f32 op, so both sides produce the same bits.

For each configs/NAME.yaml (`@P@` stands for the PERTURBED folder; other paths are relative to
the repository root, where mergekit and the tests both run) this runs mergekit's `run_merge`
and stores a few of the merged tensors in expected/NAME.safetensors. Large embedding-shaped
tensors are stored as their first ROWS rows under the name `NAME[:ROWS]`. It also stores
  expected/params.json        mergekit's evaluate_setting() on gradient/filter settings
  expected/argsort.json       torch's CPU argsort(descending=True) of keys with many ties
  expected/scores_ties3.jsonl transformers' log-probs of score_ids.jsonl under the full merge
Two runs give byte-identical files (one thread, fixed seeds).
"""

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402
from safetensors.torch import load_file as load_torch, save_file as save_torch  # noqa: E402

from mergekit.config import MergeConfiguration, evaluate_setting  # noqa: E402
from mergekit.merge import run_merge  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = Path("tests/fixtures/merge")
ROWS = 32

LLAMA_KEEP = [
    "model.embed_tokens.weight[:32]",
    "lm_head.weight[:32]",
    "model.norm.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.1.post_attention_layernorm.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.1.self_attn.v_proj.weight",
    "model.layers.0.mlp.gate_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
]
MISTRAL_KEEP = [
    "model.embed_tokens.weight[:32]",
    "model.norm.weight",
    "model.layers.1.input_layernorm.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
]

A = "tests/fixtures/train/tiny-llama"
M = "tests/fixtures/train/tiny-mistral"
CONFIGS = {
    # t=0.3 everywhere; the other model is PERTURBED with a LoRA folded in.
    "slerp_scalar": f"""
merge_method: slerp
base_model: tests/fixtures/tiny-llama
slices:
  - sources:
      - model: tests/fixtures/tiny-llama
        layer_range: [0, 2]
      - model: "@P@+{A}/init_adapter"
        layer_range: [0, 2]
parameters:
  t: 0.3
""",
    # Per-layer anchors with filters; the default is itself a list, so the non-layer
    # tensors show which t mergekit gives them (the anchor list at t=0).
    "slerp_anchors": f"""
merge_method: slerp
base_model: tests/fixtures/tiny-llama+{A}/expected/sft_final_adapter
models:
  - model: tests/fixtures/tiny-llama+{A}/expected/sft_final_adapter
  - model: "@P@"
parameters:
  t:
    - filter: self_attn
      value: [0.1, 0.5, 0.9]
    - filter: mlp
      value: [0.8, 0.3]
    - value: [0.25, 0.6]
""",
    "linear": f"""
merge_method: linear
models:
  - model: tests/fixtures/tiny-llama
    parameters: {{weight: 1.0}}
  - model: "@P@"
    parameters: {{weight: 2.0}}
  - model: tests/fixtures/tiny-llama+{A}/expected/dpo_final_adapter
    parameters: {{weight: 0.5}}
""",
    "ties": f"""
merge_method: ties
base_model: tests/fixtures/tiny-llama
models:
  - model: tests/fixtures/tiny-llama+{A}/expected/sft_final_adapter
    parameters: {{weight: 0.5, density: 0.5}}
  - model: "@P@"
    parameters: {{weight: 0.5, density: 0.5}}
""",
    "ties3": f"""
merge_method: ties
base_model: tests/fixtures/tiny-llama
models:
  - model: tests/fixtures/tiny-llama
  - model: tests/fixtures/tiny-llama+{A}/init_adapter
    parameters: {{weight: 0.3, density: 0.7}}
  - model: tests/fixtures/tiny-llama+{A}/expected/sft_final_adapter
    parameters: {{weight: 0.5, density: 0.5}}
  - model: "@P@"
    parameters: {{weight: 0.4, density: 0.3}}
parameters:
  int8_mask: true
  lambda: 0.9
dtype: float32
""",
    # density 1: no drop, so DARE-TIES is TIES without trimming and is deterministic.
    "dare_d1": f"""
merge_method: dare_ties
base_model: tests/fixtures/tiny-llama
models:
  - model: tests/fixtures/tiny-llama+{A}/init_adapter
    parameters: {{weight: 0.3, density: 1.0}}
  - model: tests/fixtures/tiny-llama+{A}/expected/dpo_final_adapter
    parameters: {{weight: 0.5, density: 1.0}}
  - model: "@P@"
    parameters: {{weight: 0.4, density: 1.0}}
parameters:
  lambda: 1.2
""",
    # Sharded, tied-embedding base with GQA shapes.
    "mistral_ties": f"""
merge_method: ties
base_model: tests/fixtures/tiny-mistral
models:
  - model: tests/fixtures/tiny-mistral+{M}/init_adapter
    parameters: {{weight: 0.6, density: 0.5}}
  - model: tests/fixtures/tiny-mistral+{M}/expected/dpo_final_adapter
    parameters: {{weight: 0.4, density: 0.6}}
""",
    # bf16: a LoRA folded into a bf16 base (mergekit's cache keeps the base's dtype) and an
    # f32 model cast to `dtype` on load.
    "linear_bf16": f"""
merge_method: linear
base_model: tests/fixtures/tiny-llama-bf16+{A}/init_adapter
models:
  - model: tests/fixtures/tiny-llama-bf16+{A}/init_adapter
    parameters: {{weight: 1.0}}
  - model: "@P@"
    parameters: {{weight: 3.0}}
dtype: bfloat16
""",
    # TIES in the merge dtype bf16 (`dtype: bfloat16`, the paper's setting): the f32 models
    # are cast on load and every op rounds to bf16; weights 0.3/0.7 are not exact in bf16.
    "ties_bf16": f"""
merge_method: ties
base_model: tests/fixtures/tiny-llama
models:
  - model: tests/fixtures/tiny-llama+{A}/expected/sft_final_adapter
    parameters: {{weight: 0.3, density: 0.5}}
  - model: "@P@"
    parameters: {{weight: 0.7, density: 0.5}}
parameters:
  normalize: true
  int8_mask: true
dtype: bfloat16
""",
    # Three models with their own densities, the L1 rescale of the trim, no normalize and
    # lambda 0.9, in bf16.
    "ties3_bf16": f"""
merge_method: ties
base_model: tests/fixtures/tiny-llama
models:
  - model: tests/fixtures/tiny-llama+{A}/init_adapter
    parameters: {{weight: 0.3, density: 0.7}}
  - model: tests/fixtures/tiny-llama+{A}/expected/dpo_final_adapter
    parameters: {{weight: 0.5, density: 0.5}}
  - model: "@P@"
    parameters: {{weight: 0.4, density: 0.3}}
parameters:
  rescale: true
  normalize: false
  lambda: 0.9
dtype: bfloat16
""",
    # The paper's dare_ties parameters (normalize, int8_mask) in bf16 at density 1 (no drop,
    # so deterministic), lambda 1.2, written as f32 (`out_dtype`: a cast of the bf16 result).
    "dare_bf16": f"""
merge_method: dare_ties
base_model: tests/fixtures/tiny-llama
models:
  - model: tests/fixtures/tiny-llama+{A}/expected/sft_final_adapter
    parameters: {{weight: 0.3, density: 1.0}}
  - model: "@P@"
    parameters: {{weight: 0.7, density: 1.0}}
parameters:
  normalize: true
  int8_mask: true
  lambda: 1.2
dtype: bfloat16
out_dtype: float32
""",
    # No `dtype`: bf16 inputs (a bf16 base and LoRAs folded into it, which mergekit's cache
    # keeps in bf16) merge in their promoted dtype, bf16.
    "ties_bf16_inputs": f"""
merge_method: ties
base_model: tests/fixtures/tiny-llama-bf16
models:
  - model: tests/fixtures/tiny-llama-bf16+{A}/init_adapter
    parameters: {{weight: 0.3, density: 0.5}}
  - model: tests/fixtures/tiny-llama-bf16+{A}/expected/sft_final_adapter
    parameters: {{weight: 0.7, density: 0.5}}
""",
}

# torch's CPU argsort(descending=True) of f32 keys with many ties (TIES' top-k keeps the first
# k): (length, number of distinct values) per case; the keys are seeded integers / 8.
ARGSORT_CASES = [(16, 3), (40, 3), (1000, 50), (3000, 7)]

# Settings and t values for expected/params.json (mergekit's evaluate_setting semantics).
PARAM_CASES = [
    ({"t": 0.3}, ["model.layers.0.self_attn.q_proj.weight"]),
    ({"t": [0.0, 0.5, 1.0]}, ["x"]),
    ({"t": [0.2, 0.9, 0.4, 0.7]}, ["x"]),
    ({"t": [1, 0]}, ["x"]),
    (
        {
            "t": [
                {"filter": "self_attn", "value": [0.1, 0.5, 0.9]},
                {"filter": "mlp", "value": [0.8, 0.3]},
                {"value": 0.5},
            ]
        },
        [
            "model.layers.3.self_attn.k_proj.weight",
            "model.layers.3.mlp.up_proj.weight",
            "model.layers.3.input_layernorm.weight",
            "model.embed_tokens.weight",
        ],
    ),
    (
        {"t": [{"filter": "mlp", "value": 0.7}, {"filter": "*", "value": [0, 1]}]},
        ["model.layers.0.mlp.up_proj.weight", "lm_head.weight"],
    ),
    ({"t": [{"filter": "mlp", "value": 0.7}]}, ["model.norm.weight"]),
]
T_VALUES = [0.0, 0.25, 1 / 3, 0.5, 2 / 3, 0.75, 1 / 7, 1.0]


def perturb(tensors):
    """PERTURBED's weights: w + u·amp in f32, u = (h>>8)/2^24 − 0.5 from a multiplicative hash
    of (element index, tensor index in sorted-name order); amp 0.2 for matrices and 0.02 for
    vectors (so norm vectors stay within slerp's lerp threshold and matrices do not)."""
    out = {}
    for j, name in enumerate(sorted(tensors)):
        w = tensors[name]
        assert w.dtype == np.float32
        i = np.arange(w.size, dtype=np.uint64)
        h = (i * np.uint64(2654435761) + np.uint64(j) * np.uint64(40503)) & np.uint64(0xFFFFFFFF)
        u = (h >> np.uint64(8)).astype(np.float32) / np.float32(16777216.0) - np.float32(0.5)
        amp = np.float32(0.2 if w.ndim == 2 else 0.02)
        out[name] = (w.reshape(-1) + u * amp).reshape(w.shape)
    return out


def make_perturbed(dst):
    src = Path("tests/fixtures/tiny-llama")
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, dst / f.name)
    save_file(perturb(load_file(src / "model.safetensors")), dst / "model.safetensors",
              metadata={"format": "pt"})


def load_dir(d):
    """A merged folder's tensors as torch tensors (bf16 included)."""
    d = Path(d)
    if (d / "model.safetensors").exists():
        return load_torch(d / "model.safetensors")
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    out = {}
    for f in sorted(set(idx["weight_map"].values())):
        out.update(load_torch(d / f))
    return out


def keep(tensors, names):
    out = {}
    for key in names:
        if key.endswith("]"):
            base, rows = key[:-1].split("[:")
            out[key] = tensors[base][: int(rows)].contiguous()
        else:
            out[key] = tensors[key]
    return out


def score(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="eager")
    model.eval()
    rows = []
    for line in Path("tests/fixtures/data/score_ids.jsonl").read_text().splitlines():
        r = json.loads(line)
        ids = r["prompt_ids"] + r["completion_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        lp = torch.log_softmax(logits, dim=-1)
        p = len(r["prompt_ids"])
        tok = [float(lp[k - 1, ids[k]]) for k in range(p, len(ids))]
        total = 0.0
        for x in tok:
            total += x
        rows.append({"logp": total, "token_logps": tok})
    return rows


def param_cases():
    from mergekit.config import ConditionalParameter
    from mergekit.merge_methods.base import ParameterScope, ParameterSpec

    spec = ParameterSpec("t", float, ParameterScope.SHARED)
    cases = []
    for setting, names in PARAM_CASES:
        raw = setting["t"]
        # Lists of dicts are filter conditions, as MergeConfiguration parses them.
        if isinstance(raw, list) and raw and isinstance(raw[0], dict):
            raw = [ConditionalParameter(**c) for c in raw]
        for name in names:
            for t in T_VALUES:
                v = evaluate_setting(name, raw, t, validate=spec.validate)
                cases.append({"setting": setting, "tensor": name, "t": t, "value": v})
    return cases


def argsort_cases():
    g = torch.Generator().manual_seed(0)
    cases = []
    for n, m in ARGSORT_CASES:
        keys = torch.randint(0, m, (n,), generator=g)
        order = torch.argsort(keys.float() / 8, descending=True)
        cases.append({"keys_times_8": keys.tolist(), "order": order.tolist()})
    return cases


def main():
    os.chdir(ROOT)
    torch.manual_seed(0)
    (OUT / "expected").mkdir(parents=True, exist_ok=True)
    (OUT / "configs").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pdir = tmp / "perturbed"
        make_perturbed(pdir)
        for name, text in CONFIGS.items():
            text = text.lstrip()
            (OUT / "configs" / f"{name}.yaml").write_text(text)
            cfg = MergeConfiguration.model_validate(yaml.safe_load(text.replace("@P@", str(pdir))))
            out = tmp / f"out_{name}"
            run_merge(cfg, str(out), MergeOptions(lora_merge_cache=str(tmp / "lora_cache"),
                                                  random_seed=0, write_model_card=False,
                                                  quiet=True, device="cpu"))
            merged = load_dir(out)
            names = MISTRAL_KEEP if name.startswith("mistral") else LLAMA_KEEP
            save_torch(keep(merged, names), OUT / "expected" / f"{name}.safetensors",
                       metadata={"format": "pt"})
            cfg_out = json.loads((out / "config.json").read_text())
            print(f"{name}: {len(merged)} tensors, dtype {cfg_out.get('dtype')}, "
                  f"layers {cfg_out['num_hidden_layers']}, lm_head {'lm_head.weight' in merged}, "
                  f"files {sorted(p.name for p in out.iterdir())}")
            if name == "ties3":
                with open(OUT / "expected" / "scores_ties3.jsonl", "w") as f:
                    for row in score(out):
                        f.write(json.dumps(row) + "\n")
    (OUT / "expected" / "params.json").write_text(json.dumps(param_cases(), indent=1) + "\n")
    (OUT / "expected" / "argsort.json").write_text(json.dumps(argsort_cases()) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT}: {total} bytes")


if __name__ == "__main__":
    sys.exit(main())
