#!/usr/bin/env python3
"""Generate the score-parity fixtures in tests/fixtures with the real transformers library.

Writes (all deterministic; re-running gives byte-identical files):
  tests/fixtures/tokenizer/            Llama-style byte-fallback BPE trained on src/model/tiny_corpus.txt
  tests/fixtures/tiny-llama[-bf16]/    LlamaForCausalLM, random weights, one model.safetensors
  tests/fixtures/tiny-mistral[-bf16]/  MistralForCausalLM, sliding window 8, sharded safetensors
  tests/fixtures/data/score_{ids,text}.jsonl        scoring inputs
  tests/fixtures/expected/{model}/{ids,text-*}.jsonl per-token log-probs computed by transformers

Run with the shared venv:  ~/.cache/palign/venv/bin/python tools/make_fixtures.py
"""

import json
import os
import random
import shutil
import sys
from pathlib import Path

# Single-threaded everything: BPE training and f32 CPU reductions then do not depend on the
# machine's core count, so the written floats are reproducible.
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from tokenizers import processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "src" / "model" / "tiny_corpus.txt"
FIX = ROOT / "tests" / "fixtures"

# LLaMA layout: <unk>, <s>, </s> at 0..2, byte tokens <0x00>..<0xFF> at 3..258, then merges.
SPECIALS = ["<unk>", "<s>", "</s>"]
BOS_ID, EOS_ID = 1, 2
VOCAB_SIZE = 512
N_BYTES = 256
META = "\u2581"  # "▁", SentencePiece's space marker

SLIDING_WINDOW = 8
SEED = 1234

# Templates from shared/CLI.md ("JSONL rows"): (prompt_text, completion_text).
TEMPLATES = {
    "none": ("{prompt}", "{completion}"),
    "vicuna": (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions. "
        "USER: {prompt} ASSISTANT:",
        " {completion}",
    ),
    "mistral": ("[INST] {prompt} [/INST]", "{completion}"),
}

TEXT_ROWS = [
    {"prompt": "What is the capital of France?", "completion": "The capital of France is Paris."},
    # ü and 東京 are in the learned vocab; ß and ☕ are not, so they go through byte fallback.
    {"prompt": "Say hello in German.", "completion": "Grüße aus München! ☕ Tokyo is 東京."},
    {
        "prompt": "Tell me about the moon.",
        "completion": "The moon reflects sunlight. It orbits the Earth in about 27 days. "
        "Its pull causes the tides!",
    },
    # Leading, doubled and trailing spaces inside the completion.
    {"prompt": "Repeat after me:", "completion": "  two spaces,  then more   "},
    {"prompt": "What is 12 times 12?", "completion": "144, of course (12 * 12 = 144)."},
    # A newline has no learned token: byte fallback <0x0A>.
    {"prompt": "Write two lines.\n", "completion": "First line.\nSecond line."},
    # Template "none": "wat" + "er" merges into "▁water", so the prompt tokenized alone is not
    # a prefix of the full ids; prompt_len still comes from the prompt alone (CLI.md).
    {"prompt": "Spell it: wat", "completion": "er boils."},
]

# (prompt_len, completion_len) of the token-id rows: 1-token prompt, 1-token completion,
# and several rows longer than 2 * SLIDING_WINDOW.
ID_ROW_SHAPES = [(2, 1), (1, 9), (5, 12), (10, 20), (20, 20), (3, 30), (12, 6), (7, 3)]

MODELS = {
    # name: (architecture, weight dtype, seed, max_shard_size or None for one file)
    "tiny-llama": ("llama", torch.float32, SEED, None),
    "tiny-mistral": ("mistral", torch.float32, SEED + 1, "200KB"),
    "tiny-llama-bf16": ("llama", torch.bfloat16, SEED, None),
    "tiny-mistral-bf16": ("mistral", torch.bfloat16, SEED + 1, "200KB"),
}


# ----------------------------------------------------------------------------- tokenizer


def corpus_lines():
    text = CORPUS.read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def metaspace():
    return pre_tokenizers.Metaspace(replacement=META, prepend_scheme="first", split=True)


def build_tokenizer():
    """Train BPE on the corpus, then re-lay the vocab out LLaMA-style with byte fallback."""
    n_learned = VOCAB_SIZE - len(SPECIALS) - N_BYTES
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = metaspace()
    trainer = trainers.BpeTrainer(vocab_size=n_learned, special_tokens=[], show_progress=False)
    trained.train_from_iterator(corpus_lines(), trainer=trainer)

    model = json.loads(trained.to_str())["model"]
    learned = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    assert len(learned) == n_learned, f"trainer made {len(learned)} tokens, want {n_learned}"
    # tokenizers < 0.20 stores merges as "a b" strings, newer ones as [a, b] pairs.
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for b in range(N_BYTES):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for tok, _ in learned:
        assert tok not in vocab, f"learned token {tok!r} collides with a special/byte token"
        vocab[tok] = len(vocab)
    assert len(vocab) == VOCAB_SIZE

    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    )
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tok.pre_tokenizer = metaspace()
    # LLaMA's decoder chain: "▁" -> " ", <0xXX> tokens back to UTF-8, join, then drop the one
    # space that the pre-tokenizer prepended to the text.
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace(META, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0",
        pair="<s>:0 $A:0 <s>:1 $B:1",
        special_tokens=[("<s>", BOS_ID)],
    )
    return tok


def tokenizer_config():
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": 512,
        "clean_up_tokenization_spaces": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def write_tokenizer(tok, out_dir):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    write_json(out_dir / "tokenizer_config.json", tokenizer_config())


def check_tokenizer(tok_dir):
    raw = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    ids = hf("Hello world").input_ids
    assert ids[0] == BOS_ID and BOS_ID not in ids[1:], f"want exactly one leading BOS: {ids}"
    assert ids == raw.encode("Hello world").ids
    samples = [r["prompt"] + r["completion"] for r in TEXT_ROWS] + corpus_lines()[:50]
    for text in samples:
        enc = raw.encode(text).ids
        assert hf(text).input_ids == enc, f"transformers and tokenizers disagree on {text!r}"
        assert 0 not in enc, f"<unk> in {text!r}: byte fallback should cover everything"
        # The Metaspace decoder drops one leading space, so compare without it.
        back = raw.decode(enc, skip_special_tokens=True)
        assert back == (text[1:] if text.startswith(" ") else text), (text, back)
    last = TEXT_ROWS[-1]
    p_ids = raw.encode(last["prompt"]).ids
    assert raw.encode(last["prompt"] + last["completion"]).ids[: len(p_ids)] != p_ids, (
        "the last text row should merge across the prompt/completion boundary"
    )
    fallback = raw.encode("ß☕\n").tokens
    assert any(t.startswith("<0x") for t in fallback), fallback
    n_chars = sum(len(line) for line in corpus_lines())
    n_toks = sum(len(raw.encode(line, add_special_tokens=False).ids) for line in corpus_lines())
    print(f"tokenizer: 'Hello world' -> {ids}, corpus {n_chars / n_toks:.2f} chars/token")


# ----------------------------------------------------------------------------- models


def model_config(arch):
    common = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        # A multiple of 64: bitsandbytes 0.50.2's CPU dequant kernel indexes absmax as if
        # every row held whole blocks, which is wrong for in_features % 64 != 0 (see
        # tests/fixtures/README.md); real models (11008, 14336) are multiples of 64.
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        max_position_embeddings=512,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    if arch == "llama":
        return LlamaConfig(
            **common, num_key_value_heads=4, rope_theta=10000.0, tie_word_embeddings=False
        )
    return MistralConfig(
        **common,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=SLIDING_WINDOW,
        rope_theta=1e6,
        tie_word_embeddings=True,
    )


def model_class(arch):
    return LlamaForCausalLM if arch == "llama" else MistralForCausalLM


def random_model(arch, seed):
    """Weights far from the default 0.02-std init, so attention, RoPE and norms all matter."""
    torch.manual_seed(seed)
    model = model_class(arch)._from_config(model_config(arch), attn_implementation="eager")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # named_parameters() lists a tied lm_head/embedding once.
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif "embed_tokens" in name:
                # A tied embedding is also the lm_head: smaller, or logits span ~25 nats.
                p.copy_((0.25 if model.config.tie_word_embeddings else 0.5) * noise)
            elif "lm_head" in name:
                p.copy_(0.25 * noise)
            else:
                p.copy_(0.15 * noise)
    return model.eval()


def save_model(model, dtype, shard, out_dir, tok_dir):
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model = model.to(dtype)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(str(out_dir), **kwargs)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tok_dir / name, out_dir / name)
    shards = sorted(p.name for p in out_dir.glob("*.safetensors"))
    if shard:
        assert len(shards) >= 2 and (out_dir / "model.safetensors.index.json").exists(), shards
    else:
        assert shards == ["model.safetensors"], shards


def load_model(arch, model_dir, **overrides):
    model = model_class(arch).from_pretrained(
        str(model_dir), attn_implementation="eager", **overrides
    )
    return model.float().eval()  # bf16 checkpoints are scored in f32


# ----------------------------------------------------------------------------- scoring


def token_logps(logits, ids, prompt_len):
    """log p(ids[t] | ids[:t]) for every completion position t >= prompt_len, in f32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return [logp[t - 1, ids[t]].item() for t in range(prompt_len, len(ids))]


@torch.no_grad()
def score(model, rows):
    """rows: list of (input_ids, prompt_len). One sequence at a time, no padding."""
    out = []
    for ids, prompt_len in rows:
        assert 1 <= prompt_len < len(ids)
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
        out.append(token_logps(logits, ids, prompt_len))
    return out


@torch.no_grad()
def score_padded(model, rows):
    """The same rows as one right-padded batch with an attention mask (cross-check)."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (ids, _) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
    logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
    return [token_logps(logits[i], ids, pl) for i, (ids, pl) in enumerate(rows)]


def max_diff(a, b):
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def text_rows(hf_tok, template):
    p_fmt, c_fmt = TEMPLATES[template]
    rows = []
    for r in TEXT_ROWS:
        prompt_text = p_fmt.format(prompt=r["prompt"])
        completion_text = c_fmt.format(completion=r["completion"])
        ids = hf_tok(prompt_text + completion_text).input_ids + [EOS_ID]
        prompt_len = len(hf_tok(prompt_text).input_ids)
        assert ids[0] == BOS_ID and BOS_ID not in ids[1:], ids
        assert prompt_len < len(ids) - 1, "every text row must score completion tokens"
        rows.append((prompt_text, completion_text, ids, prompt_len))
    return rows


def id_rows():
    rng = random.Random(SEED)
    rows = []
    for n_prompt, n_completion in ID_ROW_SHAPES:
        rows.append(
            {
                "prompt_ids": [rng.randrange(3, VOCAB_SIZE) for _ in range(n_prompt)],
                "completion_ids": [rng.randrange(3, VOCAB_SIZE) for _ in range(n_completion)],
            }
        )
    return rows


def expected_row(ids, prompt_len, logps, texts=None):
    row = {"input_ids": ids, "prompt_len": prompt_len}
    if texts:
        row["prompt_text"], row["completion_text"] = texts
    row["logp"] = sum(logps)  # float64 sum, left to right, of the f32 values
    row["token_logps"] = logps
    return row


def check_sliding_window(model_dir, model, rows):
    """The window must change long rows, and query i must see exactly keys i-W+1..i."""
    full = load_model("mistral", model_dir, sliding_window=None)
    windowed, unwindowed = score(model, rows), score(full, rows)
    long_diff = max_diff(
        [a for a, (ids, _) in zip(windowed, rows) if len(ids) > SLIDING_WINDOW],
        [b for b, (ids, _) in zip(unwindowed, rows) if len(ids) > SLIDING_WINDOW],
    )
    short_diff = max_diff(
        [a for a, (ids, _) in zip(windowed, rows) if len(ids) <= SLIDING_WINDOW],
        [b for b, (ids, _) in zip(unwindowed, rows) if len(ids) <= SLIDING_WINDOW],
    )
    assert long_diff > 1e-2, f"sliding window has no effect (max diff {long_diff})"
    assert short_diff < 1e-6, f"window changed rows shorter than it ({short_diff})"

    # With 2 layers the last position i depends on tokens i-2(W-1)..i and on nothing older:
    # changing token i-2W+1 must leave its logits alone, changing token i-2W+2 must not.
    ids = max((r[0] for r in rows), key=len)
    i = len(ids) - 1
    base = model(input_ids=torch.tensor([ids])).logits[0, i]

    def logits_with(pos):
        changed = list(ids)
        changed[pos] = 3 + (changed[pos] - 3 + 100) % (VOCAB_SIZE - 3)
        return model(input_ids=torch.tensor([changed])).logits[0, i]

    outside = (logits_with(i - 2 * SLIDING_WINDOW + 1) - base).abs().max().item()
    inside = (logits_with(i - 2 * SLIDING_WINDOW + 2) - base).abs().max().item()
    assert outside < 1e-6, f"token outside the 2-layer window changed the logits ({outside})"
    assert inside > 1e-4, f"token inside the 2-layer window had no effect ({inside})"
    print(
        f"  sliding window: long rows differ by up to {long_diff:.3f} nats without it, "
        f"short rows {short_diff:.1e}; receptive field outside {outside:.1e}, inside {inside:.3f}"
    )


# ----------------------------------------------------------------------------- files


def write_json(path, obj):
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")

    tok_dir = FIX / "tokenizer"
    write_tokenizer(build_tokenizer(), tok_dir)
    check_tokenizer(tok_dir)

    ids_input = id_rows()
    write_jsonl(FIX / "data" / "score_ids.jsonl", ids_input)
    write_jsonl(FIX / "data" / "score_text.jsonl", TEXT_ROWS)
    ids_rows = [(r["prompt_ids"] + r["completion_ids"], len(r["prompt_ids"])) for r in ids_input]

    all_logps = []
    for name, (arch, dtype, seed, shard) in MODELS.items():
        model_dir = FIX / name
        save_model(random_model(arch, seed), dtype, shard, model_dir, tok_dir)
        model = load_model(arch, model_dir)
        hf_tok = AutoTokenizer.from_pretrained(str(model_dir))
        print(f"{name}: {sorted(p.name for p in model_dir.iterdir())}")

        sets = {"ids": [(ids, pl, None) for ids, pl in ids_rows]}
        for template in TEMPLATES:
            sets[f"text-{template}"] = [
                (ids, pl, (pt, ct)) for pt, ct, ids, pl in text_rows(hf_tok, template)
            ]
        for set_name, rows in sets.items():
            plain = [(ids, pl) for ids, pl, _ in rows]
            single, padded = score(model, plain), score_padded(model, plain)
            diff = max_diff(single, padded)
            assert diff < 1e-5, f"{name}/{set_name}: padded batch differs by {diff}"
            write_jsonl(
                FIX / "expected" / name / f"{set_name}.jsonl",
                [expected_row(ids, pl, lp, t) for (ids, pl, t), lp in zip(rows, single)],
            )
            all_logps += [x for lp in single for x in lp]
            print(f"  {set_name}: {len(rows)} rows, padded-batch max diff {diff:.1e}")
        if arch == "mistral":
            check_sliding_window(model_dir, model, ids_rows + [r[:2] for r in sets["text-none"]])

    t = torch.tensor(all_logps, dtype=torch.float64)
    print(
        f"token log-probs: n={len(all_logps)} min {t.min():.2f} max {t.max():.2f} "
        f"mean {t.mean():.2f} std {t.std():.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
