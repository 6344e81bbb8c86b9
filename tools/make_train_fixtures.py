#!/usr/bin/env python3
"""Generate the trainer reference fixtures in tests/fixtures/train/ with peft + torch (+ TRL).

For each base in {tiny-llama, tiny-mistral} this writes tests/fixtures/train/{base}/:
  init_adapter/                    PEFT LoRA, all 7 projections, r=4, alpha=8, NONZERO A and B
  sft_rows.jsonl, dpo_pairs.jsonl  token-id training data (12 rows / pairs)
  expected/adapter_scores.jsonl    score_ids.jsonl rows under base+init_adapter
  expected/sft_steps.jsonl, sft_grads_step1.safetensors, sft_final_adapter/
  expected/dpo_steps.jsonl, dpo_grads_step1.safetensors, dpo_final_adapter/
  expected/qlora_scores.jsonl      score_ids.jsonl rows under the bnb 4-bit base
  expected/qlora_{sft,dpo}_steps.jsonl, qlora_{sft,dpo}_final_adapter/
and the bitsandbytes 4-bit (nf4, double quant) copy of each base as tests/fixtures/{base}-bnb-4bit/.
tests/fixtures/README.md ("Trainer fixtures") lists the palign commands these values pin.

Run from anywhere with the shared venv (needs tools/make_fixtures.py's models first):
    ~/.cache/palign/venv/bin/python tools/make_train_fixtures.py [--check-trl]
--check-trl also runs TRL's DPOTrainer for 3 steps on the f32 bases and asserts it agrees with
the hand-written DPO loop (slow-ish; nothing is written by it).
"""

import json
import math
import os
import random
import shutil
import sys
from pathlib import Path

# peft writes target_modules from a set, so its order in adapter_config.json follows str hashing:
# pin the hash seed (re-exec once) to make reruns byte-identical.
if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable, *sys.argv])

# One thread: f32 reductions then do not depend on the machine's core count (byte-identical reruns).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as bnbF  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIX = Path("tests/fixtures")  # relative: we chdir to ROOT so adapter configs hold relative paths
BASES = ["tiny-llama", "tiny-mistral"]
SEED = 4321
VOCAB = 512
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 4, 8
B_STD = 0.05  # init B ~ N(0, B_STD^2): large enough that the adapter moves outputs visibly

BATCH, STEPS, LR = 4, 3, 1e-3
BETAS, EPS = (0.9, 0.999), 1e-8
SFT_WD, SFT_CLIP = 0.01, 0.3
DPO_WD, DPO_CLIP, DPO_BETA = 0.0, 1.0, 0.1

# (prompt_len, completion_len); totals 6..40, several longer than Mistral's window of 8.
SFT_SHAPES = [
    (3, 3), (1, 9), (12, 4), (5, 20),
    (20, 20), (2, 5), (8, 15), (15, 3),
    (4, 30), (10, 10), (1, 5), (25, 12),
]  # fmt: skip
# (prompt_len, chosen_len, rejected_len); totals up to 38 tokens.
DPO_SHAPES = [
    (3, 4, 6), (1, 10, 2), (12, 5, 5), (6, 20, 15),
    (20, 8, 12), (2, 3, 3), (9, 14, 1), (15, 6, 10),
    (4, 25, 18), (10, 10, 10), (1, 1, 7), (18, 12, 20),
]  # fmt: skip

BNB_CONFIG = dict(
    load_in_4bit=True,
    bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True,
    bnb_4bit_compute_dtype=torch.float32,
)


# ----------------------------------------------------------------------------- data


def ids(rng, n):
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def sft_rows():
    rng = random.Random(SEED)
    return [{"prompt_ids": ids(rng, p), "completion_ids": ids(rng, c)} for p, c in SFT_SHAPES]


def dpo_pairs():
    rng = random.Random(SEED + 1)
    pairs = []
    for i, (p, c, r) in enumerate(DPO_SHAPES):
        chosen = ids(rng, c)
        rejected = ids(rng, r)
        if i == 9:
            # Same length, only the last token differs: a near-tie pair with a shared prefix.
            rejected = chosen[:-1] + [3 + (chosen[-1] - 3 + 7) % (VOCAB - 3)]
        pairs.append({"prompt_ids": ids(rng, p), "chosen_ids": chosen, "rejected_ids": rejected})
    return pairs


def score_rows():
    lines = (FIX / "data" / "score_ids.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def pad_batch(seqs, prompt_lens):
    """Right-padded ids (pad id 0), attention mask, and labels = -100 on prompt and padding."""
    width = max(len(s) for s in seqs)
    input_ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (s, pl) in enumerate(zip(seqs, prompt_lens)):
        input_ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        labels[i, pl : len(s)] = torch.tensor(s[pl:])
    return input_ids, mask, labels


def completion_logps(model, input_ids, mask, labels):
    """Per-token log p(label_t | ids_<t) in f32, zero where label is -100; shape [B, T-1]."""
    logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits.float()
    tgt = labels[:, 1:]
    keep = tgt != -100
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    tok = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return tok * keep, keep


# ----------------------------------------------------------------------------- models


def load_base(name):
    return AutoModelForCausalLM.from_pretrained(
        str(FIX / name), attn_implementation="eager", dtype=torch.float32
    )


def pin_bnb_cpu_path(model):
    """Keep bnb's CPU Linear4bit on dequantize + f32 F.linear.

    bitsandbytes 0.50 (nn/modules.py Linear4bit.forward) repacks weights and runs a bf16 AVX512
    kernel (gemv_4bit) for no-grad eval forwards on CPUs with avx512_bf16; that would make the
    expected values bf16-rounded and machine dependent (and its repacking asserts on
    out_features 176, not a multiple of 32). Training forwards never take that path.
    """
    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def load_base_4bit(name):
    model = AutoModelForCausalLM.from_pretrained(
        str(FIX / name),
        attn_implementation="eager",
        quantization_config=BitsAndBytesConfig(**BNB_CONFIG),
        device_map="cpu",
    )
    pin_bnb_cpu_path(model)
    return model


def load_saved_4bit(name):
    """A saved bnb checkpoint: quantization_config comes from its config.json."""
    model = AutoModelForCausalLM.from_pretrained(
        str(FIX / name), attn_implementation="eager", device_map="cpu"
    )
    assert pin_bnb_cpu_path(model) == 7 * model.config.num_hidden_layers
    return model


def adapter_key(param_name):
    """peft parameter name -> adapter_model.safetensors key (the adapter name is dropped)."""
    return param_name.replace(".default.", ".")


def lora_params(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def make_init_adapter(base_name, out_dir):
    """Fresh peft adapter, then A ~ U(±1/sqrt(in)) (peft's kaiming_uniform(a=sqrt 5) range) and
    B ~ N(0, B_STD^2) from a seeded generator, so both factors are nonzero."""
    model = get_peft_model(
        load_base(base_name),
        LoraConfig(
            r=RANK,
            lora_alpha=ALPHA,
            lora_dropout=0.0,
            target_modules=TARGETS,
            task_type="CAUSAL_LM",
        ),
    )
    gen = torch.Generator().manual_seed(SEED + BASES.index(base_name))
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_A" in name:
                bound = 1.0 / math.sqrt(p.shape[1])
                p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * B_STD)
    save_adapter(model, out_dir)
    n = sum(p.numel() for _, p in lora_params(model))
    assert len(lora_params(model)) == 2 * len(TARGETS) * model.config.num_hidden_layers
    print(f"  init adapter: {n} parameters")


def save_adapter(model, out_dir):
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.save_pretrained(str(out_dir))
    # The model card is boilerplate, not part of the adapter format: keep only config + weights.
    (out_dir / "README.md").unlink(missing_ok=True)
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def with_adapter(base, adapter_dir, trainable):
    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable)


# ----------------------------------------------------------------------------- scoring


@torch.no_grad()
def score(model, rows):
    """One sequence at a time, no padding: palign `score` rows {"logp","n_tokens","token_logps"}."""
    model.eval()
    out = []
    for r in rows:
        seq = r["prompt_ids"] + r["completion_ids"]
        pl = len(r["prompt_ids"])
        logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        toks = [logp[t - 1, seq[t]].item() for t in range(pl, len(seq))]
        out.append({"logp": sum(toks), "n_tokens": len(toks), "token_logps": toks})
    return out


@torch.no_grad()
def score_padded(model, rows):
    model.eval()
    seqs = [r["prompt_ids"] + r["completion_ids"] for r in rows]
    pls = [len(r["prompt_ids"]) for r in rows]
    tok, keep = completion_logps(model, *pad_batch(seqs, pls))
    return [tok[i][keep[i]].tolist() for i in range(len(rows))]


def max_score_diff(a, b):
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra["token_logps"], rb))


# ----------------------------------------------------------------------------- SFT


def sft_step_loss(model, rows):
    seqs = [r["prompt_ids"] + r["completion_ids"] for r in rows]
    input_ids, mask, labels = pad_batch(seqs, [len(r["prompt_ids"]) for r in rows])
    tok, keep = completion_logps(model, input_ids, mask, labels)
    loss = -tok.sum() / keep.sum()
    return loss, int(mask.sum()), (input_ids, mask, labels)


def grads_by_key(model):
    return {adapter_key(n): p.grad.detach().clone().contiguous() for n, p in lora_params(model)}


def save_grads(model, path):
    save_file(grads_by_key(model), str(path), {"format": "pt"})


def check_sft_unpadded(model, rows):
    """The padded batch's loss and gradients equal per-sequence, unpadded computation."""
    model.zero_grad(set_to_none=True)
    loss, _, batch = sft_step_loss(model, rows)
    # transformers' own causal-LM loss (mean over label != -100) is the same number.
    hf_loss = model(input_ids=batch[0], attention_mask=batch[1], labels=batch[2]).loss
    assert abs(hf_loss.item() - loss.item()) < 1e-6 * abs(loss.item()), (hf_loss, loss)
    loss.backward()
    g_batch = grads_by_key(model)
    model.zero_grad(set_to_none=True)
    n_tok = sum(len(r["completion_ids"]) for r in rows)
    total = 0.0
    for r in rows:
        seq = r["prompt_ids"] + r["completion_ids"]
        tok, _ = completion_logps(model, *pad_batch([seq], [len(r["prompt_ids"])]))
        part = -tok.sum() / n_tok
        part.backward()
        total += part.item()
    g_single = grads_by_key(model)
    model.zero_grad(set_to_none=True)
    gdiff = max((g_batch[k] - g_single[k]).abs().max().item() for k in g_batch)
    gmax = max(g.abs().max().item() for g in g_batch.values())
    assert abs(total - loss.item()) < 1e-5 * abs(loss.item()), (total, loss.item())
    assert gdiff < 1e-5 * gmax, (gdiff, gmax)
    ldiff = abs(total - loss.item())
    print(f"    padded vs unpadded: loss diff {ldiff:.1e}, grad diff {gdiff:.1e}")


def run_sft(model, rows, out_dir, prefix, check=False):
    model.train()
    params = [p for _, p in lora_params(model)]
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=SFT_WD)
    if check:
        check_sft_unpadded(model, rows[:BATCH])
    steps = []
    start = {n: p.detach().clone() for n, p in lora_params(model)}
    for s in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss, tokens, _ = sft_step_loss(model, rows[s * BATCH : (s + 1) * BATCH])
        loss.backward()
        if s == 0 and prefix == "sft":
            save_grads(model, out_dir / "sft_grads_step1.safetensors")
        gn = torch.nn.utils.clip_grad_norm_(params, SFT_CLIP)
        opt.step()
        steps.append(
            {"step": s + 1, "loss": loss.item(), "grad_norm": gn.item(), "lr": LR, "tokens": tokens}
        )
    write_jsonl(out_dir / f"{prefix}_steps.jsonl", steps)
    save_adapter(model, out_dir / f"{prefix}_final_adapter")
    report_run(prefix, steps, model, start, SFT_CLIP)
    return steps


# ----------------------------------------------------------------------------- DPO


def dpo_batch(pairs):
    """TRL's DataCollatorForPreference layout: [chosen_0..chosen_n, rejected_0..rejected_n]."""
    seqs = [p["prompt_ids"] + p["chosen_ids"] for p in pairs]
    seqs += [p["prompt_ids"] + p["rejected_ids"] for p in pairs]
    pls = [len(p["prompt_ids"]) for p in pairs] * 2
    return pad_batch(seqs, pls)


def sequence_logps(model, batch):
    tok, _ = completion_logps(model, *batch)
    return tok.sum(dim=1)  # SUM over completion tokens, as TRL (no length normalisation)


def dpo_loss(policy, ref, beta):
    """TRL 1.16 trl/trainer/dpo_trainer.py DPOTrainer._compute_loss, loss_type "sigmoid",
    f_divergence_type "reverse_kl", no ld_alpha / weighting, plus its metric block."""
    pc, pr = policy.chunk(2)
    rc, rr = ref.chunk(2)
    chosen_logratios, rejected_logratios = pc - rc, pr - rr
    loss = (-F.logsigmoid(beta * (chosen_logratios - rejected_logratios))).mean()
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    # rewards/accuracies counts chosen > rejected per pair: no pair may sit on the fence, or an
    # f32 rounding difference in another implementation would flip it.
    closest = (chosen_rewards - rejected_rewards).abs().min().item()
    assert closest > 1e-4, f"a pair's reward margin is {closest:.1e}: accuracies would be fragile"
    metrics = {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "logps/chosen": pc.detach().mean().item(),
        "logps/rejected": pr.detach().mean().item(),
    }
    return loss, metrics


def ref_logps(model, batch):
    with torch.no_grad(), model.disable_adapter():
        return sequence_logps(model, batch)


def check_dpo_unbatched(model, pairs):
    """One batched forward for chosen + rejected vs each sequence alone (policy and reference)."""
    batch = dpo_batch(pairs)
    with torch.no_grad():
        pol = sequence_logps(model, batch)
    ref = ref_logps(model, batch)
    n = batch[0].shape[0]
    pol1, ref1 = [], []
    for i in range(n):
        L = int(batch[1][i].sum())
        one = tuple(t[i : i + 1, :L] for t in batch)
        with torch.no_grad():
            pol1.append(sequence_logps(model, one))
        ref1.append(ref_logps(model, one))
    pol1, ref1 = torch.cat(pol1), torch.cat(ref1)
    d = max((pol - pol1).abs().max().item(), (ref - ref1).abs().max().item())
    assert d < 1e-4, d
    big = pol.abs().max().item()
    print(f"    batched vs one-at-a-time sequence logps: max diff {d:.1e} (|logp| up to {big:.0f})")


def run_dpo(model, pairs, out_dir, prefix, check=False):
    model.train()
    params = [p for _, p in lora_params(model)]
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=DPO_WD)
    if check:
        check_dpo_unbatched(model, pairs[:BATCH])
    steps = []
    start = {n: p.detach().clone() for n, p in lora_params(model)}
    for s in range(STEPS):
        opt.zero_grad(set_to_none=True)
        batch = dpo_batch(pairs[s * BATCH : (s + 1) * BATCH])
        ref = ref_logps(model, batch)
        policy = sequence_logps(model, batch)
        loss, metrics = dpo_loss(policy, ref, DPO_BETA)
        loss.backward()
        if s == 0 and prefix == "dpo":
            save_grads(model, out_dir / "dpo_grads_step1.safetensors")
        gn = torch.nn.utils.clip_grad_norm_(params, DPO_CLIP)
        opt.step()
        row = {"step": s + 1, "loss": loss.item(), "grad_norm": gn.item(), "lr": LR}
        row.update(metrics)
        row["tokens"] = int(batch[1].sum())
        steps.append(row)
    write_jsonl(out_dir / f"{prefix}_steps.jsonl", steps)
    save_adapter(model, out_dir / f"{prefix}_final_adapter")
    report_run(prefix, steps, model, start, DPO_CLIP)
    return steps


def report_run(prefix, steps, model, start, clip):
    sq = sum(((p.detach() - start[n]) ** 2).sum().item() for n, p in lora_params(model))
    update = math.sqrt(sq)
    for r in steps:
        extra = ""
        if "rewards/margins" in r:
            extra = f" margin {r['rewards/margins']:+.4f} acc {r['rewards/accuracies']:.2f}"
        clipped = "clipped" if r["grad_norm"] > clip else "not clipped"
        print(
            f"    {prefix} step {r['step']}: loss {r['loss']:.6f} grad_norm {r['grad_norm']:.4f} "
            f"({clipped}) tokens {r['tokens']}{extra}"
        )
    print(f"    {prefix}: adapter update norm after {len(steps)} steps {update:.4e}")


# ----------------------------------------------------------------------------- TRL cross-check


def check_trl_dpo(base_name, pairs, expected, final_dir):
    """Run TRL's own DPOTrainer on the same data and compare with the hand-written loop.

    TRL 1.16 tokenizes text in DPOTrainer._prepare_dataset; our rows are already token ids in
    the shape that step produces ({prompt,chosen,rejected}_ids), so the subclass skips it. The
    reference must be the base with the adapter off: passing a PeftModel without ref_model makes
    TRL copy the *initial adapter* as a "ref" adapter (dpo_trainer.py __init__), so a separate
    base model is passed as ref_model.
    """
    import datasets
    from safetensors.torch import load_file
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    class IdsDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

    tok = AutoTokenizer.from_pretrained(str(FIX / base_name))
    tok.pad_token = tok.unk_token
    model = with_adapter(load_base(base_name), FIX / "train" / base_name / "init_adapter", True)
    args = DPOConfig(
        output_dir="/tmp/palign_trl_dpo",
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        max_steps=STEPS,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=DPO_WD,
        max_grad_norm=DPO_CLIP,
        adam_beta1=BETAS[0],
        adam_beta2=BETAS[1],
        adam_epsilon=EPS,
        optim="adamw_torch",
        beta=DPO_BETA,
        loss_type=["sigmoid"],
        max_length=None,
        train_sampling_strategy="sequential",
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=SEED,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = IdsDPOTrainer(
        model=model,
        ref_model=load_base(base_name),
        args=args,
        train_dataset=datasets.Dataset.from_list(pairs),
        processing_class=tok,
    )
    trainer.train()
    logs = [r for r in trainer.state.log_history if "rewards/chosen" in r]
    assert len(logs) == STEPS, trainer.state.log_history
    worst = 0.0
    keys = ["loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins",
            "rewards/accuracies", "logps/chosen", "logps/rejected"]  # fmt: skip
    for got, want in zip(logs, expected):
        for k in keys:
            # Margins can be near 0 (a difference of ~0.1-sized rewards): floor the scale at 0.05.
            rel = abs(got[k] - want[k]) / max(abs(want[k]), 0.05)
            if rel > worst:
                worst, worst_at = rel, f"{k} step {got['step']}: {got[k]!r} vs {want[k]!r}"
            assert rel < 1e-4, (base_name, got["step"], k, got[k], want[k])
    # TRL logs num_tokens cumulatively (attention_mask sums of the [chosen; rejected] batch).
    cum = [sum(r["tokens"] for r in expected[: i + 1]) for i in range(STEPS)]
    assert [r["num_tokens"] for r in logs] == cum, (logs, cum)
    trl_final = {adapter_key(n): p.detach() for n, p in lora_params(trainer.model)}
    ours = load_file(str(final_dir / "adapter_model.safetensors"))
    init = load_file(str(FIX / "train" / base_name / "init_adapter" / "adapter_model.safetensors"))
    diff = math.sqrt(sum(((trl_final[k] - ours[k]) ** 2).sum().item() for k in ours))
    upd = math.sqrt(sum(((ours[k] - init[k]) ** 2).sum().item() for k in ours))
    assert diff < 1e-4 * upd, (diff, upd)
    print(
        f"    TRL DPOTrainer: worst relative metric diff {worst:.1e} ({worst_at}); "
        f"final adapter diff {diff:.1e} = {diff / upd:.1e} of the update norm"
    )


# ----------------------------------------------------------------------------- QLoRA


def check_4bit_is_dequantized(model4, base_name, rows):
    """The bnb model scores exactly like the f32 model with each projection weight replaced by
    dequantize_4bit(W): f32 compute, nothing but the 7 decoder projections quantized."""
    ref = load_base(base_name)
    quantized = []
    with torch.no_grad():
        for name, m in model4.named_modules():
            if isinstance(m, bnb.nn.Linear4bit):
                w = bnbF.dequantize_4bit(m.weight.data, m.weight.quant_state)
                ref.get_submodule(name).weight.copy_(w.float())
                quantized.append(name.split(".")[-1])
    assert sorted(set(quantized)) == sorted(TARGETS), quantized
    assert len(quantized) == 7 * ref.config.num_hidden_layers
    a, b = score(model4, rows), score(ref, rows)
    d = max_score_diff(a, [r["token_logps"] for r in b])
    assert d < 1e-5, d
    return d


def bf16_kernel_gap(base_name, rows, expected):
    """How far bnb's default CPU inference path (bf16 AVX512 kernel) is from f32 compute."""
    if not bnbF.has_avx512bf16():
        return "not taken (no avx512_bf16 on this CPU)"
    model = load_saved_4bit(f"{base_name}-bnb-4bit")
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = True
    try:
        got = score(model, rows)
    except AssertionError as e:  # its weight repacking needs out_features % 32 == 0 (176 is not)
        return f"fails: AssertionError({e})"
    return f"differs by {max_score_diff(expected, [r['token_logps'] for r in got]):.1e}"


def make_bnb_base(base_name, rows):
    out = FIX / f"{base_name}-bnb-4bit"
    if out.exists():
        shutil.rmtree(out)
    model4 = load_base_4bit(base_name)
    model4.save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(FIX / base_name / name, out / name)
    saved = load_saved_4bit(out.name)
    # The reloaded checkpoint is the in-memory quantization, tensor for tensor.
    sd_a, sd_b = model4.state_dict(), saved.state_dict()
    assert sorted(sd_a) == sorted(sd_b)
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    d = check_4bit_is_dequantized(saved, base_name, rows)
    kinds = sorted({type(m).__name__ for m in saved.modules() if isinstance(m, torch.nn.Linear)})
    print(f"  {out.name}: {sorted(p.name for p in out.iterdir())}; linear kinds {kinds}; "
          f"4-bit vs f32-with-dequantized-weights max diff {d:.1e}")  # fmt: skip
    return saved


# ----------------------------------------------------------------------------- files


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def main():
    check_trl = "--check-trl" in sys.argv[1:]
    os.chdir(ROOT)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(SEED)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}, bitsandbytes {bnb.__version__}"
    )
    rows, pairs, srows = sft_rows(), dpo_pairs(), score_rows()
    for base_name in BASES:
        print(base_name)
        out = FIX / "train" / base_name
        if out.exists():
            shutil.rmtree(out)
        exp = out / "expected"
        exp.mkdir(parents=True)
        write_jsonl(out / "sft_rows.jsonl", rows)
        write_jsonl(out / "dpo_pairs.jsonl", pairs)
        init = out / "init_adapter"
        make_init_adapter(base_name, init)

        # Scores with the adapter: palign `score --adapter`.
        model = with_adapter(load_base(base_name), init, False)
        with_ad, plain = score(model, srows), score(load_base(base_name), srows)
        pad_d = max_score_diff(with_ad, score_padded(model, srows))
        assert pad_d < 1e-5, pad_d
        moved = max(abs(a["logp"] - b["logp"]) for a, b in zip(with_ad, plain))
        assert moved > 0.5, f"init adapter barely changes the outputs ({moved})"
        write_jsonl(exp / "adapter_scores.jsonl", with_ad)
        print(f"  adapter scores: max |logp change| vs base {moved:.3f}, padded diff {pad_d:.1e}")

        run_sft(with_adapter(load_base(base_name), init, True), rows, exp, "sft", check=True)
        model = with_adapter(load_base(base_name), init, True)
        dpo_steps = run_dpo(model, pairs, exp, "dpo", check=True)
        if check_trl:
            check_trl_dpo(base_name, pairs, dpo_steps, exp / "dpo_final_adapter")

        # QLoRA: the bnb 4-bit base (saved, reloaded) with the same initial adapter.
        base4 = make_bnb_base(base_name, srows)
        q_scores = score(base4, srows)
        write_jsonl(exp / "qlora_scores.jsonl", q_scores)
        qd = max(abs(a["logp"] - b["logp"]) for a, b in zip(q_scores, plain))
        gap = bf16_kernel_gap(base_name, srows, q_scores)
        print(f"  qlora scores: max |logp| change vs f32 base {qd:.3f}; bnb bf16 CPU kernel {gap}")
        four = f"{base_name}-bnb-4bit"
        model = with_adapter(load_saved_4bit(four), init, True)
        run_sft(model, rows, exp, "qlora_sft", check=True)
        model = with_adapter(load_saved_4bit(four), init, True)
        run_dpo(model, pairs, exp, "qlora_dpo", check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
