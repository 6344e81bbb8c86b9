#!/usr/bin/env python3
"""The Python-stack side of `palign bench train` (one LoRA/QLoRA SFT or DPO training step) and
`palign bench generate` (batched generation) for a 7B-shaped model with random weights, timed
with transformers + peft (+ bitsandbytes, + TRL).

    python3 tools/bench_hf.py --shape mistral-7b --method dpo --peft qlora
    python3 tools/bench_hf.py --shape mistral-7b --method generate --peft qlora --rank 16 \
        --batch-size 32 --prompt-len 256 --new-tokens 128
    ~/.cache/palign/venv/bin/python tools/bench_hf.py --shape tiny --device cpu \
        --batch-size 2 --seq-len 64 --warmup 1 --steps 2          # CPU smoke test
    ~/.cache/palign/venv/bin/python tools/bench_hf.py --shape tiny --device cpu --method generate \
        --peft lora --batch-size 3 --prompt-len 8 --new-tokens 5   # (bnb's CPU 4-bit inference
                                                                  # path rejects the tiny MLP width)

Nothing is downloaded: the config is built here and the weights are random (N(0, 0.02^2) for
every linear and embedding matrix, ones for the RMSNorm weights). Speed does not depend on
the values.

Shapes (untied lm_head, head_dim = hidden / heads, RMSNorm eps 1e-5, RoPE theta 10000):
    llama-7b    LLaMA-2-7B:      hidden 4096, MLP 11008, 32 layers, 32 heads, 32 KV heads, vocab 32000
    mistral-7b  Mistral-7B-v0.1: hidden 4096, MLP 14336, 32 layers, 32 heads,  8 KV heads, vocab 32000,
                                 sliding window 4096
    tiny        (CPU testing, LlamaForCausalLM): hidden 256, MLP 688, 2 layers, 4 heads, 2 KV heads,
                                 vocab 512
The 7B shapes are refused on --device cpu.

Model: bf16 on the device. --peft qlora swaps the 7 decoder projections of every layer for
bitsandbytes Linear4bit (NF4, blocksize 64, double quant, bf16 compute), as transformers'
BitsAndBytesConfig(load_in_4bit, nf4, double quant, compute bf16) does; embeddings, norms and
lm_head stay bf16. peft's prepare_model_for_kbit_training is NOT called (it would upcast the
bf16 embeddings/norms/lm_head to f32). If bitsandbytes does not import or its 4-bit matmul
fails on the device, the run falls back to bf16 LoRA and says `peft=lora(qlora-unavailable: <why>)`
(<why> is short and holds no '=', quotes or parentheses; it does hold spaces).
LoRA (peft): r, alpha, dropout on --targets, bias "none" (dpo: dropout set to 0 after
get_peft_model, as TRL's DPOTrainer does by default; --keep-dropout keeps it). The adapter weights are f32: peft's
get_peft_model(autocast_adapter_dtype=True), its default, upcasts bf16 adapters to f32; the
script checks this. The step runs under torch.autocast(bf16), as HF Trainer(bf16=True) does,
so the adapter matmuls run in bf16 and the f32 master weights get the update.

One step:
  sft  random ids [B, S], no padding, labels = ids; transformers' causal LM loss (mean -log p
       over the B*(S-1) predicted tokens); backward; AdamW(lr 1e-4, fused on CUDA); zero_grad.
  dpo  B pairs = 2B sequences of S tokens, chosen rows then rejected rows (TRL's concatenated
       forward); pair i shares its first S/2 tokens (the prompt, masked out); summed log p of
       the completion tokens per sequence. Reference log-probs: the same model under
       torch.no_grad() and model.disable_adapter(), as TRL does for a peft model without a
       ref_model. Loss: DPO sigmoid, beta 0.1: mean -logsigmoid(beta*((pc-rc)-(pr-rr))),
       written out here (`dpo_loss=inline`: TRL 1.x keeps it inside DPOTrainer._compute_loss,
       not callable without a Trainer). Per-token log-probs come from TRL's fused chunked LM
       head (trl.trainer.utils.add_fused_lm_head, what DPOTrainer patches in) when trl
       imports, else from full logits + log_softmax; the output says which (`logps=`).
  Timing: --warmup untimed steps, then the median wall time of --steps steps, each bracketed
  by torch.cuda.synchronize().

Peak memory: torch.cuda.max_memory_allocated() over the timed steps (reset after warm-up), GiB
(2^30 bytes); `nan` on CPU.

MFU (palign's bench uses the same formula):
  N      = parameters of every linear layer: 7 projections x layers + lm_head (vocab x hidden)
           (embeddings and norms not counted; LoRA adapters not counted)
  T      = tokens per step: B*S for sft, 2*B*S for dpo (policy tokens)
  attn_f = forward attention FLOPs per sequence per layer, causal:
           2 * S^2 * heads * head_dim   (QK^T and PV, 2*2*S^2*d each, halved for causality)
  sft:  FLOPs = T*4N + (B   sequences) * layers * 3.5 * attn_f      (backward = 2.5 x forward;
                                                                     4N = 2N fwd + 2N bwd dX,
                                                                     frozen base: no dW)
  dpo:  FLOPs = T*4N + (2B sequences) * layers * 3.5 * attn_f        (policy fwd + bwd)
              + T*2N + (2B sequences) * layers * 1.0 * attn_f        (reference forward)
  Gradient-checkpointing recomputation is not counted. For Mistral with S <= window the
  window does not matter (the bench refuses nothing; with S > 4096 the count overstates).
  mfu = FLOPs / step_time / peak, as a fraction (0.45 = 45%). Peak bf16 dense TFLOP/s from
  torch.cuda.get_device_name(): contains "H200" -> 989; contains "H100" and "PCIe" -> 756;
  contains "H100" (SXM, "HBM3") otherwise -> 989; contains "A100" -> 312; anything else
  (and CPU) -> unknown, mfu=nan.
  tokens_per_s = T / median step time.

--method generate (the side of `palign bench generate`): --batch-size prompts of --prompt-len
random ids (no padding), each continued by exactly --new-tokens tokens with transformers'
model.generate (greedy unless --temperature > 0; KV cache on; min_new_tokens = max_new_tokens,
so EOS never ends a row early). --peft qlora|lora picks the base (NF4 as above, or bf16);
--rank R > 0 adds an unmerged peft adapter on --targets (B = 0, as peft initializes it; f32 as
peft makes it), --rank 0 none. Timing: one warm-up generate of 2 tokens; then the median of 3
generates of 1 token (T1: prefill + the first token) and one of N tokens (TN). prefill
tokens/s = B*P / T1; decode tokens/s = B*(N-1) / (TN - T1); tokens/s = B*N / TN. Machine line:
  BENCH_GENERATE impl=hf shape=<shape> peft=<p> rank=<r> batch=<B> prompt_len=<P> new_tokens=<N>
      tokens_per_s=<x> prefill_tokens_per_s=<y> decode_tokens_per_s=<z> decode_step_ms=<w>
      peak_mem_gib=<m> gpu="<name>"                                                   (one line)

Output: human-readable lines, then exactly one machine line:
  BENCH_TRAIN impl=hf shape=<shape> method=<m> peft=<p> batch=<B> seq=<S> rank=<r>
      tokens_per_s=<x> step_ms=<y> peak_mem_gib=<z> mfu=<w> gpu="<name>"      (one line)
On out-of-memory: `BENCH_TRAIN impl=hf ... rank=<r> error=oom gpu="<name>"` and exit 2.
Bad arguments: one error line and exit 2.
"""

import argparse
import contextlib
import math
import statistics
import sys
import time

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# (model class name, hidden, mlp, layers, heads, kv heads, vocab, max positions, sliding window)
# LLaMA-2-7B and Mistral-7B-v0.1 values as published in their config.json files.
SHAPES = {
    "llama-7b": ("llama", 4096, 11008, 32, 32, 32, 32000, 4096, None),
    "mistral-7b": ("mistral", 4096, 14336, 32, 32, 8, 32000, 32768, 4096),
    "tiny": ("llama", 256, 688, 2, 4, 2, 512, 2048, None),
}

BETA = 0.1
LR = 1e-4


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="mistral-7b")
    ap.add_argument("--method", choices=("sft", "dpo", "generate"), default="sft")
    ap.add_argument("--peft", choices=("lora", "qlora"), default="qlora")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=None, help="default 2*rank")
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument(
        "--keep-dropout",
        action="store_true",
        help="dpo: keep lora_dropout active (TRL's DPOTrainer sets every nn.Dropout's p to 0 by default)",
    )
    ap.add_argument("--targets", default=",".join(PROJ))
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--attn", choices=("sdpa", "eager", "flash_attention_2"), default="sdpa")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt-len", type=int, default=256, help="generate: tokens per prompt")
    ap.add_argument("--new-tokens", type=int, default=256, help="generate: tokens generated per prompt")
    ap.add_argument("--temperature", type=float, default=0.0, help="generate: 0 is greedy")
    ap.add_argument("--top-p", type=float, default=1.0, help="generate: nucleus mass")
    ap.add_argument("--prompts", type=int, default=None, help="generate: prompts (default --batch-size), in batches of --batch-size")
    ap.add_argument("--vary", action="store_true", help="generate: row r ends after vary_length(r, N) tokens")
    a = ap.parse_args(argv)
    if a.method == "generate" and (a.prompt_len < 1 or a.new_tokens < 1):
        ap.error("--prompt-len and --new-tokens must be >= 1")
    if a.prompts is None:
        a.prompts = a.batch_size
    if a.prompts < 1:
        ap.error("--prompts must be >= 1")
    if a.rank < 1 and not (a.method == "generate" and a.rank == 0):
        ap.error("--rank must be >= 1 (generate: >= 0, where 0 is no adapter)")
    if a.batch_size < 1:
        ap.error("--batch-size must be >= 1")
    if a.seq_len < 2 or (a.method == "dpo" and a.seq_len < 4):
        ap.error("--seq-len must be >= 2 (>= 4 for dpo: a prompt and a completion of S/2 tokens)")
    if a.alpha is None:
        a.alpha = 2.0 * a.rank
    if not 0.0 <= a.dropout < 1.0:
        ap.error("--dropout must be in [0, 1)")
    if a.steps < 1 or a.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    a.targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    bad = [t for t in a.targets if t not in PROJ]
    if not a.targets or bad:
        ap.error(f"--targets: unknown {bad or 'empty list'}; choose from {','.join(PROJ)}")
    if a.device == "cpu" and a.shape != "tiny":
        ap.error(f"--shape {a.shape} needs --device cuda (about 14 GB of bf16 weights); use --shape tiny on the CPU")
    return a


def peak_tflops(name):
    """bf16 dense peak by device name; None when unknown (see the module docstring)."""
    if "H200" in name:
        return 989.0
    if "H100" in name:
        return 756.0 if "PCIe" in name else 989.0
    if "A100" in name:
        return 312.0
    return None


def linear_params(shape):
    _, h, mlp, layers, heads, kv, vocab, _, _ = SHAPES[shape]
    hd = h // heads
    per_layer = h * heads * hd + 2 * h * kv * hd + heads * hd * h + 3 * h * mlp
    return layers * per_layer + vocab * h


def step_flops(shape, method, b, s):
    _, h, _, layers, heads, _, _, _, _ = SHAPES[shape]
    n = linear_params(shape)
    attn_f = 2.0 * s * s * heads * (h // heads)
    if method == "sft":
        return b * s * 4.0 * n + b * layers * 3.5 * attn_f
    t = 2 * b * s
    return t * 4.0 * n + 2 * b * layers * 3.5 * attn_f + t * 2.0 * n + 2 * b * layers * attn_f


def machine_line(a, peft_desc, gpu, **fields):
    head = (
        f"BENCH_TRAIN impl=hf shape={a.shape} method={a.method} peft={peft_desc} "
        f"batch={a.batch_size} seq={a.seq_len} rank={a.rank}"
    )
    rest = " ".join(f"{k}={v}" for k, v in fields.items())
    return f'{head} {rest} gpu="{gpu}"'


def no_init_weights():
    """transformers' context that skips its weight init (we fill the weights ourselves)."""
    try:
        from transformers.initialization import no_init_weights as ctx  # transformers 5.x
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights as ctx  # 4.x
        except ImportError:
            return contextlib.nullcontext()
    return ctx()


def build_model(a, torch, dev):
    import transformers

    kind, h, mlp, layers, heads, kv, vocab, max_pos, window = SHAPES[a.shape]
    common = dict(
        vocab_size=vocab,
        hidden_size=h,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=max_pos,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        use_cache=False,
    )
    if kind == "llama":
        cfg, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    else:
        cfg = transformers.MistralConfig(sliding_window=window, **common)
        cls = transformers.MistralForCausalLM
    cfg._attn_implementation = a.attn
    torch.manual_seed(a.seed)
    prev = torch.get_default_dtype()
    # bf16 parameters made directly on the device; the rotary inv_freq buffer stays f32
    # because transformers computes it with an explicit float dtype.
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(dev), no_init_weights():
            model = cls(cfg)
    finally:
        torch.set_default_dtype(prev)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                m.weight.normal_(0.0, 0.02)
            elif getattr(m, "weight", None) is not None and m.weight.dim() == 1:
                m.weight.fill_(1.0)  # RMSNorm
    model.config.use_cache = False
    return model


def qlora_probe(torch, dev):
    """None if bitsandbytes NF4 forward+backward works on `dev`, else (short reason, detail).
    The short reason goes into the machine line, so it holds no parentheses, quotes or '='."""
    try:
        import bitsandbytes as bnb
    except Exception as e:  # noqa: BLE001 -- any import failure means "unavailable"
        return f"bitsandbytes import failed: {type(e).__name__}", f"{e}".splitlines()[0] if str(e) else ""
    try:
        lin = make_linear4bit(bnb, torch, torch.randn(64, 128, dtype=torch.bfloat16, device=dev) * 0.02, dev)
        x = torch.randn(4, 128, dtype=torch.bfloat16, device=dev, requires_grad=True)
        lin(x).float().sum().backward()
        if x.grad is None or not torch.isfinite(x.grad).all():
            return f"4-bit on {dev.type} failed: no finite input gradient", ""
    except Exception as e:  # noqa: BLE001
        return f"4-bit on {dev.type} failed: {type(e).__name__}", f"{e}".splitlines()[0] if str(e) else ""
    return None


def make_linear4bit(bnb, torch, weight, dev):
    """A Linear4bit holding `weight` (bf16 [out, in]) as NF4, blocksize 64, double quant."""
    out_f, in_f = weight.shape
    lin = bnb.nn.Linear4bit(
        in_f,
        out_f,
        bias=False,
        compute_dtype=torch.bfloat16,
        compress_statistics=True,
        quant_type="nf4",
        quant_storage=torch.uint8,
        device="meta",
    )
    p = bnb.nn.Params4bit(
        weight,
        requires_grad=False,
        blocksize=64,
        compress_statistics=True,
        quant_type="nf4",
        quant_storage=torch.uint8,
        module=lin,
    )
    lin.weight = p.to(dev)  # Params4bit quantizes on its first move to a device
    return lin


def quantize_projections(model, torch, dev):
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in PROJ:
                old = getattr(parent, name, None)
                if isinstance(old, torch.nn.Linear):
                    w = old.weight.data
                    setattr(parent, name, make_linear4bit(bnb, torch, w, dev))
                    del old, w
    # What transformers' bnb quantizer marks; peft's LoRA dispatch reads it to pick its
    # Linear4bit LoRA layer.
    model.is_loaded_in_4bit = True


def completion_logps(model, torch, ids, labels, fused):
    """Summed log p of the labelled (non -100) next tokens per row, [rows] f32."""
    if fused:
        return model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs.float().sum(-1)
    logits = model(input_ids=ids).logits[:, :-1]
    tgt = labels[:, 1:]
    mask = tgt != -100
    lp = torch.log_softmax(logits.float(), dim=-1)
    tok = torch.gather(lp, 2, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (tok * mask).sum(-1)


def base_model(a, torch, dev):
    """The random base for --peft: NF4 projections (bitsandbytes) for qlora when its 4-bit
    path works here, else bf16 with a note. Sets a.peft_desc (the machine line's peft)."""
    a.peft_desc = a.peft
    if a.peft == "qlora":
        failed = qlora_probe(torch, dev)
        if failed:
            a.peft_desc = f"lora(qlora-unavailable: {failed[0]})"
            print(f"note: 4-bit unavailable, using the bf16 base instead: {failed[0]}: {failed[1]}")
    model = build_model(a, torch, dev)
    if a.peft_desc == "qlora":
        quantize_projections(model, torch, dev)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return model


def run(a, torch, dev, gpu):
    import peft

    t0 = time.perf_counter()
    model = base_model(a, torch, dev)
    peft_desc = a.peft_desc

    fused = False
    if a.method == "dpo":
        try:
            from trl.trainer.utils import add_fused_lm_head

            add_fused_lm_head(model)  # before peft wraps it, as DPOTrainer does
            fused = True
        except Exception as e:  # noqa: BLE001 -- no trl, or a trl without the fused head
            print(f"note: TRL's fused LM head not available ({type(e).__name__}: {e}); log-probs from full logits")

    if a.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lcfg = peft.LoraConfig(
        r=a.rank,
        lora_alpha=a.alpha,
        lora_dropout=a.dropout,
        target_modules=a.targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(model, lcfg)  # autocast_adapter_dtype=True (default): f32 adapters
    model.train()
    if a.method == "dpo" and not a.keep_dropout:
        # TRL's DPOTrainer default (DPOConfig.disable_dropout=True): p = 0 on every
        # nn.Dropout of the policy, peft's lora_dropout included.
        for mod in model.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
    trainable = [p for p in model.parameters() if p.requires_grad]
    dtypes = sorted({str(p.dtype) for p in trainable})
    if dtypes != ["torch.float32"]:
        raise RuntimeError(f"expected f32 LoRA weights, peft made {dtypes}")
    opt = torch.optim.AdamW(trainable, lr=LR, fused=(dev.type == "cuda"))
    build_s = time.perf_counter() - t0

    g = torch.Generator(device="cpu").manual_seed(a.seed + 1)
    _, _, _, _, _, _, vocab, _, _ = SHAPES[a.shape]
    B, S = a.batch_size, a.seq_len
    if a.method == "sft":
        ids = torch.randint(0, vocab, (B, S), generator=g).to(dev)
        tokens = B * S
    else:
        p = S // 2
        prompt = torch.randint(0, vocab, (B, p), generator=g)
        chosen = torch.cat([prompt, torch.randint(0, vocab, (B, S - p), generator=g)], 1)
        rejected = torch.cat([prompt, torch.randint(0, vocab, (B, S - p), generator=g)], 1)
        ids = torch.cat([chosen, rejected], 0).to(dev)  # [2B, S]: chosen rows, then rejected
        labels = ids.clone()
        labels[:, :p] = -100
        tokens = 2 * B * S

    autocast = torch.autocast(device_type=dev.type, dtype=torch.bfloat16)

    def step():
        with autocast:
            if a.method == "sft":
                loss = model(input_ids=ids, labels=ids).loss
            else:
                with torch.no_grad(), model.disable_adapter():
                    ref = completion_logps(model, torch, ids, labels, fused)
                pol = completion_logps(model, torch, ids, labels, fused)
                pc, pr = pol.chunk(2)
                rc, rr = ref.chunk(2)
                loss = -torch.nn.functional.logsigmoid(BETA * ((pc - rc) - (pr - rr))).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    losses = []
    for _ in range(a.warmup):
        losses.append(float(step()))
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(a.steps):
        sync()
        t = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t)
        losses.append(float(loss))
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")

    med = statistics.median(times)
    flops = step_flops(a.shape, a.method, B, S)
    pk = peak_tflops(gpu) if dev.type == "cuda" else None
    mfu = flops / med / (pk * 1e12) if pk else float("nan")

    import transformers

    print(
        f"bench_hf: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"
        + "".join(
            f", {name} {getattr(sys.modules.get(name), '__version__', '?')}"
            for name in ("trl", "bitsandbytes")
            if sys.modules.get(name) is not None
        )
    )
    print(
        f"shape {a.shape} ({type(model.get_base_model()).__name__}), attn {a.attn}, device {gpu}, "
        f"peft {peft_desc}, r={a.rank} alpha={a.alpha:g} dropout={a.dropout:g}"
        f"{' (off in training, as TRL DPO)' if a.method == 'dpo' and not a.keep_dropout else ''} "
        f"targets={','.join(a.targets)}, "
        f"gradient checkpointing {'on' if a.gradient_checkpointing else 'off'}"
    )
    if a.method == "dpo":
        logps = "trl-fused-lm-head" if fused else "full-logits"
        print(f"dpo: beta {BETA}, prompt {S // 2} tokens, dpo_loss=inline, logps={logps}")
    n_lora = sum(p.numel() for p in trainable)
    print(
        f"linear params N = {linear_params(a.shape) / 1e9:.4f} B, trainable (LoRA) = {n_lora / 1e6:.3f} M, "
        f"setup {build_s:.1f} s (bnb probe included)"
    )
    print(f"losses: {' '.join(f'{x:.4f}' for x in losses)} (warm-up then timed)")
    print(f"step ms: {' '.join(f'{t * 1e3:.1f}' for t in times)}; median {med * 1e3:.2f}")
    print(
        f"FLOPs/step {flops / 1e12:.3f} T, {flops / med / 1e12:.1f} TFLOP/s"
        + (f" of {pk:.0f} peak" if pk else " (peak unknown for this device)")
    )
    print(
        machine_line(
            a,
            peft_desc,
            gpu,
            tokens_per_s=f"{tokens / med:.1f}",
            step_ms=f"{med * 1e3:.2f}",
            peak_mem_gib=f"{peak:.3f}",
            mfu=f"{mfu:.4f}",
        )
    )


def vary_length(r, n):
    """palign bench generate's --vary length of row r out of n (same numbers as its Rust)."""
    lo = max(n // 8, 1)
    return lo + (r * 2654435761) % (max(n, lo) - lo + 1)


def gen_line(a, peft_desc, gpu, **fields):
    head = (
        f"BENCH_GENERATE impl=hf shape={a.shape} peft={peft_desc} rank={a.rank} "
        f"batch={a.batch_size} prompts={a.prompts} vary={str(a.vary).lower()} "
        f"prompt_len={a.prompt_len} new_tokens={a.new_tokens}"
    )
    rest = " ".join(f"{k}={v}" for k, v in fields.items())
    return f'{head} {rest} gpu="{gpu}"'


def run_generate(a, torch, dev, gpu):
    import peft
    import transformers

    model = base_model(a, torch, dev)
    peft_desc = a.peft_desc
    model.config.use_cache = True
    if a.rank > 0:
        lcfg = peft.LoraConfig(
            r=a.rank,
            lora_alpha=a.alpha,
            lora_dropout=0.0,
            target_modules=a.targets,
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = peft.get_peft_model(model, lcfg)
    model.eval()

    _, _, _, _, _, _, vocab, _, _ = SHAPES[a.shape]
    B, P, N = a.batch_size, a.prompt_len, a.new_tokens
    g = torch.Generator(device="cpu").manual_seed(a.seed + 1)
    ids = torch.randint(3, vocab, (B, P), generator=g).to(dev)
    mask = torch.ones_like(ids)
    sampling = dict(do_sample=True, temperature=a.temperature, top_p=a.top_p) if a.temperature > 0 else dict(do_sample=False)
    if a.prompts != B or a.vary:
        return run_generate_batches(a, torch, dev, gpu, model, vocab, sampling)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def gen(n):
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                pad_token_id=0,
                use_cache=True,
                **sampling,
            )
        sync()
        secs = time.perf_counter() - t
        if tuple(out.shape) != (B, P + n):
            raise RuntimeError(f"generate returned shape {tuple(out.shape)}, expected {(B, P + n)}")
        return secs

    gen(min(2, N))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t1 = statistics.median(gen(1) for _ in range(3))
    tn = gen(N)
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
    decode_s = tn - t1
    nan = float("nan")
    decode_tps = B * (N - 1) / decode_s if N > 1 and decode_s > 0 else nan
    step_ms = decode_s / (N - 1) * 1e3 if N > 1 else nan

    print(
        f"bench_hf generate: torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}"
        + (f", bitsandbytes {getattr(sys.modules.get('bitsandbytes'), '__version__', '?')}" if peft_desc == "qlora" else "")
    )
    print(
        f"shape {a.shape}, attn {a.attn}, device {gpu}, base {'nf4' if peft_desc == 'qlora' else 'bf16'}, "
        f"adapter {'r=%d on %s' % (a.rank, ','.join(a.targets)) if a.rank else 'none'}; "
        f"{B} prompts x {P} tokens, {N} new tokens; T1 {t1 * 1e3:.1f} ms, TN {tn * 1e3:.1f} ms"
    )
    print(
        gen_line(
            a,
            peft_desc,
            gpu,
            tokens_per_s=f"{B * N / tn:.1f}",
            prefill_tokens_per_s=f"{B * P / t1:.1f}",
            decode_tokens_per_s=f"{decode_tps:.1f}",
            decode_step_ms=f"{step_ms:.3f}",
            peak_mem_gib=f"{peak:.3f}",
        )
    )


def run_generate_batches(a, torch, dev, gpu, model, vocab, sampling):
    """--prompts beyond one batch, or --vary: the prompts in batches of --batch-size, one
    model.generate each (a batch runs until its longest row ends: static batching, as
    transformers does); with --vary a logits processor ends row r after vary_length(r, N)
    tokens (EOS forced then, banned before). Only tokens/s over the whole run is
    reported."""
    from transformers import LogitsProcessor, LogitsProcessorList

    B, P, N, R = a.batch_size, a.prompt_len, a.new_tokens, a.prompts
    eos = 2
    g = torch.Generator(device="cpu").manual_seed(a.seed + 1)
    all_ids = torch.randint(3, vocab, (R, P), generator=g).to(dev)
    lengths = [vary_length(r, N) if a.vary else N for r in range(R)]

    class EndAt(LogitsProcessor):
        def __init__(self, ends):
            self.ends = torch.tensor(ends, device=dev)

        def __call__(self, input_ids, scores):
            made = input_ids.shape[1] - P  # tokens generated so far
            end = self.ends == made + 1  # this step's token is the row's last
            scores[:, eos] = float("-inf")
            scores[end] = float("-inf")
            scores[end, eos] = 0.0
            return scores

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def run_all(limit):
        made = 0
        for start in range(0, R, B):
            ids = all_ids[start : start + B]
            ends = [min(n, limit) for n in lengths[start : start + B]]
            with torch.inference_mode():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max(ends),
                    logits_processor=LogitsProcessorList([EndAt(ends)]),
                    eos_token_id=eos,
                    pad_token_id=0,
                    use_cache=True,
                    **sampling,
                )
            new = out[:, P:]
            got = [int((row == eos).nonzero()[0]) + 1 if (row == eos).any() else new.shape[1] for row in new]
            if got != ends:
                raise RuntimeError(f"rows ended after {got} tokens, expected {ends}")
            made += sum(ends)
        return made

    run_all(2)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    t = time.perf_counter()
    made = run_all(N)
    sync()
    secs = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
    print(
        f"bench_hf generate: {R} prompts x {P} tokens in batches of {B}, "
        f"{'--vary lengths' if a.vary else f'{N} new tokens each'}: {made} tokens in {secs:.2f} s"
    )
    nan = float("nan")
    print(
        gen_line(
            a,
            a.peft_desc,
            gpu,
            tokens_per_s=f"{made / secs:.1f}",
            prefill_tokens_per_s=f"{nan:.1f}",
            decode_tokens_per_s=f"{nan:.1f}",
            decode_step_ms=f"{nan:.3f}",
            peak_mem_gib=f"{peak:.3f}",
            generated=made,
        )
    )


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        print("bench_hf: error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    dev = torch.device(a.device)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    a.peft_desc = a.peft
    try:
        (run_generate if a.method == "generate" else run)(a, torch, dev, gpu)
    except torch.cuda.OutOfMemoryError as e:
        print(f"bench_hf: out of memory: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
        line = gen_line if a.method == "generate" else machine_line
        print(line(a, a.peft_desc, gpu, error="oom"))
        return 2
    except (ValueError, ImportError) as e:
        # e.g. --attn flash_attention_2 without the flash-attn package
        print(f"bench_hf: error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
