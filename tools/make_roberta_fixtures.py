#!/usr/bin/env python3
"""Generate the RoBERTa sequence-classifier fixtures in tests/fixtures/roberta with transformers.

The real scorer for RealToxicityPrompts is nicholasKluge/ToxicityModel, a
RobertaForSequenceClassification with one logit that is called as
`tokenizer(prompt, response, truncation=True, max_length=512)`. This script builds a tiny
random model of the same class, so tests/roberta.rs can check palign's native encoder.

Writes (deterministic; re-running gives byte-identical files):
  tests/fixtures/roberta/model/     config.json, model.safetensors (f32), tokenizer files.
                                    The tokenizer is a byte-level BPE trained on
                                    src/model/tiny_corpus.txt, with RoBERTa's specials and pair
                                    post-processor (<s> A </s></s> B </s>).
  tests/fixtures/roberta/expected.jsonl
                                    one row per (prompt, response, max_length): the input ids
                                    and the logits from transformers, f32, eval mode, one pair
                                    at a time.

Run with the shared venv:  ~/.cache/palign/venv/bin/python tools/make_roberta_fixtures.py
"""

import json
import os
import shutil
from pathlib import Path

# One thread: BPE training and the f32 reductions then do not depend on the core count.
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from tokenizers import processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    RobertaConfig,
    RobertaForSequenceClassification,
    RobertaTokenizerFast,
)

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "src" / "model" / "tiny_corpus.txt"
OUT = ROOT / "tests" / "fixtures" / "roberta"

# RoBERTa's special-token layout (roberta-base's vocab.json): <s>=0, <pad>=1, </s>=2,
# <unk>=3, and <mask> last.
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]
VOCAB_SIZE = 400  # including <mask>
MAX_POS = 64 + 2  # RoBERTa reserves padding_idx + 1 positions before the first token
SEED = 4321

# (prompt, response, max_length). 64 is the longest input the tiny position table holds.
PAIRS = [
    ("The kettle clicked off.", "Maya poured the water over the tea leaves.", 64),
    ("Hello", "world", 64),
    ("A bicycle stays upright", "", 64),
    ("", "because the rider keeps steering.", 64),
    ("Café au lait, s'il vous plaît", "naïve 東京 🙂 ok", 64),
    ("Numbers: 214 loaves, 36 tarts", "and one very large birthday cake!!", 64),
    ("A literal <pad> inside the prompt", "and </s> inside the response", 64),
    ("  leading spaces", "trailing spaces   \n\tand tabs", 64),
    # Truncation (longest_first at max_length 40): both sides cut, then only the longer.
    (
        "Most plants grow toward light because cells on the shaded side of the stem "
        "stretch a little more than cells on the bright side.",
        "Water boils at 100 degrees Celsius at sea level, but on a high mountain it boils "
        "at a lower temperature because the air pressure is lower.",
        40,
    ),
    (
        "Short prompt.",
        "On Tuesday the bakery sold 214 loaves of bread, 36 lemon tarts and one very large "
        "birthday cake, and then it closed early because the ovens were tired.",
        40,
    ),
    (
        "On Tuesday the bakery sold 214 loaves of bread, 36 lemon tarts and one very large "
        "birthday cake, and then it closed early because the ovens were tired.",
        "Fine.",
        40,
    ),
]


def corpus_lines():
    return [line for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]


def train_tokenizer():
    """Byte-level BPE as RoBERTa's tokenizer.json has it: ByteLevel pre-tokenizer without a
    prefix space, ByteLevel decoder, RobertaProcessing for single texts and pairs."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - 1,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    tok.add_special_tokens([AddedToken("<mask>", special=True, lstrip=True, normalized=False)])
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    tok.post_processor = processors.RobertaProcessing(
        ("</s>", 2), ("<s>", 0), trim_offsets=True, add_prefix_space=False
    )
    return RobertaTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        add_prefix_space=False,
        model_max_length=MAX_POS - 2,
    )


def build_model():
    cfg = RobertaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_act="gelu",
        max_position_embeddings=MAX_POS,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        num_labels=1,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    torch.manual_seed(SEED)
    model = RobertaForSequenceClassification(cfg)
    # The default init (std 0.02, LayerNorm 1/0) makes every logit nearly the same; draw
    # larger weights so each token, position and layer visibly moves the output.
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("LayerNorm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "embeddings" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    return model.float().eval()


def main():
    torch.set_num_threads(1)
    if OUT.exists():
        shutil.rmtree(OUT)
    mdir = OUT / "model"
    mdir.mkdir(parents=True)

    train_tokenizer().save_pretrained(mdir)
    build_model().save_pretrained(mdir, safe_serialization=True)

    # Reload both from disk, as a user of the folder would.
    tok = AutoTokenizer.from_pretrained(mdir)
    model = AutoModelForSequenceClassification.from_pretrained(mdir, dtype=torch.float32).eval()
    assert model.config.hidden_act == "gelu"

    rows = []
    with torch.no_grad():
        for prompt, response, max_len in PAIRS:
            enc = tok(
                prompt,
                response,
                truncation=True,
                max_length=max_len,
                return_token_type_ids=False,
                return_tensors="pt",
            )
            ids = enc["input_ids"][0].tolist()
            assert ids[0] == 0 and ids[-1] == 2 and len(ids) <= max_len, ids
            logits = model(**enc).logits[0]
            rows.append(
                {
                    "prompt": prompt,
                    "response": response,
                    "max_length": max_len,
                    "ids": ids,
                    "logits": [float(x) for x in logits],
                }
            )

        # One right-padded batch (padding mask + RoBERTa's pad-skipping positions) must agree
        # with the one-at-a-time logits; palign packs instead of padding. Rows with an empty
        # response are left out: a single call encodes them as one text (`if text_pair`
        # in transformers' `_encode_plus`), a batch call as a pair.
        for max_len in sorted({r["max_length"] for r in rows}):
            group = [r for r in rows if r["max_length"] == max_len and r["response"]]
            enc = tok(
                [r["prompt"] for r in group],
                [r["response"] for r in group],
                truncation=True,
                max_length=max_len,
                padding=True,
                return_token_type_ids=False,
                return_tensors="pt",
            )
            batched = model(**enc).logits
            for r, b in zip(group, batched):
                d = (torch.tensor(r["logits"]) - b).abs().max().item()
                assert d < 1e-5, (r["prompt"], d)

    # The inputs must exercise what the test claims: truncation and a spread of scores.
    assert any(len(r["ids"]) == 40 for r in rows)
    assert rows[2]["ids"].count(2) == 1, "an empty response encodes the prompt alone"
    assert rows[3]["ids"][:3] == [0, 2, 2], "an empty prompt still encodes a pair"
    untruncated = tok(PAIRS[8][0], PAIRS[8][1])["input_ids"]
    assert len(untruncated) > 64, len(untruncated)
    scores = [r["logits"][0] for r in rows]
    assert max(scores) - min(scores) > 0.2, scores

    with open(OUT / "expected.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    for r in rows:
        print(f"{len(r['ids']):3d} tokens  logit {r['logits'][0]: .6f}  {r['prompt'][:30]!r}")


if __name__ == "__main__":
    main()
