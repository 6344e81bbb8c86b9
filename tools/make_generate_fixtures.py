#!/usr/bin/env python3
"""Greedy-generation fixtures for `palign generate`, recorded with transformers' `generate`.

Writes tests/fixtures/generate/ (README.md there describes the files):
  prompts_ids.jsonl      {"prompt_ids"} rows of 1..24 tokens (ids in [3, 512)); most are longer
                         than Mistral's window (8) and every one crosses it while generating
  prompts_text.jsonl     {"prompt"} rows (rendered with the vicuna template below)
  {base}/greedy_ids.jsonl            base model, prompts_ids.jsonl
  {base}/greedy_ids_adapter.jsonl    base + tests/fixtures/train/{base}/init_adapter (peft)
  {base}/greedy_ids_nf4.jsonl        the bitsandbytes 4-bit base tests/fixtures/{base}-bnb-4bit
  {base}/greedy_text_vicuna.jsonl    base model, prompts_text.jsonl with the vicuna template
Each expected row: {"prompt_ids", "output_ids", "output", "eos", "min_margin"}:
output_ids = generate(...)[0][len(prompt):] (EOS included when it was produced), output =
tokenizer.decode(output_ids, skip_special_tokens=True), eos = whether it stopped at EOS,
min_margin = the smallest top-1 minus top-2 logit gap along the greedy path (how far the
path is from a tie that rounding could flip).

Settings: do_sample=False, max_new_tokens=20, EOS allowed (generation_config's eos id 2), f32,
eager attention, one prompt at a time (no padding), the default (dynamic) cache. Each case
is also re-run with use_cache=False (full forward every step) and must give the same ids;
the script stops if transformers' cached path and its full-forward path disagree.

Run with the shared venv (needs make_fixtures.py's and make_train_fixtures.py's outputs):
    ~/.cache/palign/venv/bin/python tools/make_generate_fixtures.py
"""

import json
import os
import random
import shutil
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import bitsandbytes as bnb  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
OUT = FIX / "generate"
BASES = ["tiny-llama", "tiny-mistral"]
SEED = 777
VOCAB = 512
MAX_NEW = 20
# Prompt lengths: 1 token, short ones, exactly the window, just over it, well over it.
ID_LENGTHS = [1, 3, 6, 8, 9, 13, 17, 24]
TEXT_PROMPTS = [
    "What is the capital of France?",
    "Tell me about the moon.",
    "Write two lines.\n",
]
# shared/CLI.md's vicuna prompt_text.
VICUNA = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions. "
    "USER: {prompt} ASSISTANT:"
)


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def id_prompts():
    rng = random.Random(SEED)
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in ID_LENGTHS]


def load_base(name):
    return AutoModelForCausalLM.from_pretrained(
        str(FIX / name), attn_implementation="eager", dtype=torch.float32
    ).eval()


def load_4bit(name):
    """The saved bnb checkpoint, kept on bnb's dequantize + f32 F.linear CPU path (see
    make_train_fixtures.py: the default bf16 AVX512 kernel would round and depend on the CPU)."""
    model = AutoModelForCausalLM.from_pretrained(
        str(FIX / name), attn_implementation="eager", device_map="cpu"
    ).eval()
    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
            n += 1
    assert n == 7 * model.config.num_hidden_layers, n
    return model


@torch.no_grad()
def greedy(model, ids, use_cache):
    inp = torch.tensor([ids])
    out = model.generate(
        input_ids=inp,
        attention_mask=torch.ones_like(inp),
        do_sample=False,
        max_new_tokens=MAX_NEW,
        eos_token_id=2,
        pad_token_id=2,
        use_cache=use_cache,
        output_scores=True,
        return_dict_in_generate=True,
    )
    new = out.sequences[0, len(ids):].tolist()
    margins = []
    for s in out.scores:
        top = torch.topk(s[0], 2).values
        margins.append(float(top[0] - top[1]))
    return new, min(margins)


def run_case(model, tok, prompts):
    rows = []
    for ids in prompts:
        new, margin = greedy(model, ids, use_cache=True)
        full, _ = greedy(model, ids, use_cache=False)
        if new != full:
            sys.exit(f"transformers' cached and full-forward greedy paths differ: {new} vs {full}")
        rows.append(
            {
                "prompt_ids": ids,
                "output_ids": new,
                "output": tok.decode(new, skip_special_tokens=True),
                "eos": bool(new and new[-1] == 2),
                "min_margin": round(margin, 6),
            }
        )
    return rows


def summary(name, rows):
    n_eos = sum(r["eos"] for r in rows)
    lens = [len(r["output_ids"]) for r in rows]
    margin = min(r["min_margin"] for r in rows)
    print(f"  {name}: new tokens {lens}, {n_eos} stopped at EOS, min margin {margin:.2e}")


def main():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}, bitsandbytes {bnb.__version__}"
    )
    # Start clean, but keep the hand-written README.md.
    for base in BASES:
        shutil.rmtree(OUT / base, ignore_errors=True)
    prompts = id_prompts()
    write_jsonl(OUT / "prompts_ids.jsonl", [{"prompt_ids": p} for p in prompts])
    write_jsonl(OUT / "prompts_text.jsonl", [{"prompt": p} for p in TEXT_PROMPTS])
    for base in BASES:
        print(base)
        tok = AutoTokenizer.from_pretrained(str(FIX / base))
        cfg = load_base(base).config
        if getattr(cfg, "sliding_window", None):
            # The window only matters if the sequences outgrow it.
            assert max(ID_LENGTHS) > cfg.sliding_window
            assert min(ID_LENGTHS) + MAX_NEW > cfg.sliding_window

        cases = {
            "greedy_ids": (load_base(base), prompts),
            "greedy_ids_adapter": (
                PeftModel.from_pretrained(
                    load_base(base), str(FIX / "train" / base / "init_adapter")
                ).eval(),
                prompts,
            ),
            "greedy_ids_nf4": (load_4bit(f"{base}-bnb-4bit"), prompts),
        }
        text_ids = []
        for p in TEXT_PROMPTS:
            ids = tok(VICUNA.format(prompt=p))["input_ids"]
            assert ids[0] == 1 and ids[1] != 1, "expected exactly one BOS"
            text_ids.append(ids)
        cases["greedy_text_vicuna"] = (load_base(base), text_ids)

        for name, (model, ps) in cases.items():
            rows = run_case(model, tok, ps)
            summary(name, rows)
            write_jsonl(OUT / base / f"{name}.jsonl", rows)


if __name__ == "__main__":
    main()
