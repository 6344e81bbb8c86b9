#!/usr/bin/env python3
"""CPU baseline for benches/cpu.rs: the same two measurements with transformers + peft + torch.

    ~/.cache/palign/venv/bin/python tools/bench_torch_cpu.py [--threads 2] [--reps 10]

1. score: the init-tiny LLaMA shape (hidden 128, MLP 344, 4 layers, 4 heads, vocab 512,
   untied), 64 sequences of 128 tokens in one batch, log p of tokens 1..127 (prompt = the
   first token), under torch.no_grad. Reports sequences/s.
2. sft step: LLaMA hidden 256, MLP 688, 4 layers, 4 heads (head_dim 64), vocab 512,
   batch 8 x 128 tokens, LoRA r=16 alpha=32 dropout 0 on all 7 projections (peft), f32.
   One step = forward + loss (mean -log p over tokens 1..127 of each row) + backward into
   the adapter weights. No optimizer step (palign's bench has none either). Reports
   tokens/s counting all 8*128 input tokens.

Eager attention, f32, random N(0, 0.02^2) weights (speed does not depend on the values).
Each measurement: warm-up runs, then the median wall time of --reps runs. Threads are set
with torch.set_num_threads (intra-op) and set_num_interop_threads.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama(hidden, mlp, layers, heads, vocab):
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attn_implementation="eager",
        dtype=torch.float32,
    )
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).to(torch.float32)
    m.config._attn_implementation = "eager"
    return m


def target_logprobs(model, ids):
    # Position t predicts token t+1; the first token is the prompt.
    logits = model(input_ids=ids).logits[:, :-1]
    return torch.gather(F.log_softmax(logits.float(), dim=-1), 2, ids[:, 1:, None])[..., 0]


def median_time(fn, warmup, reps):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), min(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(args.threads)
    g = torch.Generator().manual_seed(1)

    # 1. score throughput, tiny model
    tiny = llama(128, 344, 4, 4, 512).eval()
    n_seq, seq_len = 64, 128
    ids = torch.randint(3, 512, (n_seq, seq_len), generator=g)

    def score():
        with torch.no_grad():
            target_logprobs(tiny, ids)

    t, tmin = median_time(score, args.warmup, args.reps)
    print(f"torch score: {n_seq} seqs x {seq_len} tokens: median {t * 1e3:.1f} ms "
          f"(min {tmin * 1e3:.1f}) -> {n_seq / t:.1f} sequences/s")

    # 2. one SFT step with peft LoRA on all projections
    base = llama(256, 688, 4, 4, 512)
    lcfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, bias="none")
    model = get_peft_model(base, lcfg)
    model.train()  # dropout 0: train mode changes nothing numerically
    batch, seq_len = 8, 128
    ids = torch.randint(3, 512, (batch, seq_len), generator=g)
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        loss = -target_logprobs(model, ids).mean()
        loss.backward()

    t, tmin = median_time(step, args.warmup, args.reps)
    tokens = batch * seq_len
    print(f"torch sft step: batch {batch} x {seq_len} tokens, hidden 256, 4 layers, LoRA r16 x 7: "
          f"median {t * 1e3:.1f} ms (min {tmin * 1e3:.1f}) -> {tokens / t:.0f} tokens/s")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
