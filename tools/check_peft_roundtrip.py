#!/usr/bin/env python3
"""An adapter palign wrote loads in peft.PeftModel.from_pretrained unchanged.

Loads tests/fixtures/train/tiny-mistral/palign_adapter (written by `palign sft`, see
tests/fixtures/README.md) on top of tests/fixtures/tiny-mistral with PEFT, scores
tests/fixtures/data/score_ids.jsonl in f32 and writes
tests/fixtures/train/tiny-mistral/expected/palign_adapter_peft_scores.jsonl, which
tests/peft_roundtrip.rs compares with `palign score --adapter`.

    ~/.cache/palign/venv/bin/python tools/check_peft_roundtrip.py
"""
import json
import pathlib

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"


def main():
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(
        str(FIX / "tiny-mistral"), attn_implementation="eager", dtype=torch.float32
    )
    model = PeftModel.from_pretrained(base, str(FIX / "train/tiny-mistral/palign_adapter"))
    model.eval()
    cfg = model.peft_config["default"]
    assert cfg.r == 4 and cfg.lora_alpha == 8, cfg
    out = []
    for line in (FIX / "data/score_ids.jsonl").read_text().splitlines():
        row = json.loads(line)
        ids = row["prompt_ids"] + row["completion_ids"]
        p = len(row["prompt_ids"])
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        toks = [lp[i - 1, ids[i]].item() for i in range(p, len(ids))]
        out.append({"logp": sum(toks), "n_tokens": len(toks), "token_logps": toks})
    dest = FIX / "train/tiny-mistral/expected/palign_adapter_peft_scores.jsonl"
    dest.write_text("".join(json.dumps(r) + "\n" for r in out))
    print(f"wrote {dest.relative_to(ROOT)}: {len(out)} rows")


if __name__ == "__main__":
    main()
