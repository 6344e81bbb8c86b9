//! `palign bench train`: time real SFT / DPO training steps of a 7B-shaped model with
//! random weights (no files), the number users choose palign for. The step is the one
//! `palign sft` / `palign dpo` runs (`train::runner::bench`); `tools/bench_hf.py` times
//! the same step with transformers + peft (+ bitsandbytes, TRL's loss) and prints the
//! same `BENCH_TRAIN` line, so `tools/gpu-check.sh` can put the two side by side.
//!
//! Weights are drawn on the host per tensor (counter-based, in parallel) and uploaded one
//! by one, so host memory stays at one tensor; NF4 bases get random codes and scales in
//! bitsandbytes' double-quant layout (the speed of the kernels does not depend on them).

use std::sync::Arc;

use half::bf16;
use rayon::prelude::*;

use super::{Common, Device};
use crate::backend::cpu::rng::splitmix64;
use crate::backend::cuda::{nf4::Nf4Weight, Gpu};
use crate::data::examples::{PrefExample, SftExample};
use crate::error::{bad, Result};
use crate::model::llama::{Layer, Recompute, PROJ_NAMES};
use crate::model::{Model, ModelConfig};
use crate::ops::LinearWeight;
use crate::quant::{dynamic_map, Absmax, DoubleQuant, Nf4Tensor, SourceDtype};
use crate::tensor::Tensor;
use crate::train::runner::{self, Examples};
use crate::train::{Method, Settings};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(clap::Subcommand, Debug)]
enum What {
    /// Training steps of a 7B-shaped model with random weights: tokens/s, MFU, peak
    /// memory and the time per kernel family.
    Train(TrainBench),
    /// Batched generation (prefill, then decode with the KV cache) of a 7B-shaped model
    /// with random weights: tokens/s of each phase, peak memory, weight bandwidth and the
    /// decode step's time per kernel family.
    Generate(GenBench),
}

#[derive(clap::Args, Debug)]
pub struct GenBench {
    /// llama-7b (LLaMA-2-7B), mistral-7b (Mistral-7B-v0.1), or tiny (for CPU checks).
    #[arg(long, default_value = "mistral-7b")]
    shape: String,
    /// lora (bf16 base) or qlora (NF4 base, as `--quant nf4` in generate and eval).
    #[arg(long, default_value = "qlora")]
    peft: String,
    /// Rank of an unmerged LoRA adapter on --targets; 0: none (a merged model).
    #[arg(long, default_value_t = 16)]
    rank: usize,
    #[arg(long, default_value = "all")]
    targets: String,
    /// Sequences decoded at once (KV-cache slots).
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Prompts (default: --batch-size); more than the slots refill them as rows finish.
    #[arg(long)]
    prompts: Option<usize>,
    /// Rows end at different lengths, as real outputs do: row r stops after
    /// `vary_length(r, --new-tokens)` tokens (between 1/8 of it and all of it).
    #[arg(long)]
    vary: bool,
    /// Tokens per prompt (random ids, no common prefix).
    #[arg(long, default_value_t = 256)]
    prompt_len: usize,
    /// Tokens generated per prompt; no EOS ends one early.
    #[arg(long, default_value_t = 256)]
    new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
}

#[derive(clap::Args, Debug)]
pub struct TrainBench {
    /// llama-7b (LLaMA-2-7B), mistral-7b (Mistral-7B-v0.1), or tiny (for CPU checks).
    #[arg(long, default_value = "mistral-7b")]
    shape: String,
    #[arg(long, default_value = "sft")]
    method: String,
    /// lora (bf16 base) or qlora (NF4 base).
    #[arg(long, default_value = "qlora")]
    peft: String,
    /// Sequences (SFT) or pairs (DPO) per step.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// Default: 2 × rank.
    #[arg(long)]
    alpha: Option<f32>,
    #[arg(long, default_value_t = 0.05)]
    dropout: f32,
    /// DPO: apply --dropout in training (by default DPO trains without, as TRL does).
    #[arg(long)]
    keep_dropout: bool,
    #[arg(long, default_value = "all")]
    targets: String,
    /// Micro-batches per step (gradient accumulation).
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    #[arg(long, default_value = "none")]
    recompute: String,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[arg(long, default_value_t = 5)]
    steps: usize,
}

/// (hidden, MLP, layers, heads, KV heads, vocab, sliding window) of a bench shape.
type Shape = (usize, usize, usize, usize, usize, usize, Option<usize>);

/// The bench shapes: the same table as tools/bench_hf.py (configs of LLaMA-2-7B and
/// Mistral-7B-v0.1).
fn shape(name: &str) -> Result<Shape> {
    Ok(match name {
        "llama-7b" => (4096, 11008, 32, 32, 32, 32000, None),
        "mistral-7b" => (4096, 14336, 32, 32, 8, 32000, Some(4096)),
        "tiny" => (256, 688, 2, 4, 2, 512, None),
        _ => {
            return Err(bad(format!(
                "--shape: unknown shape `{name}` (llama-7b, mistral-7b, tiny)"
            )))
        }
    })
}

fn config(name: &str) -> Result<ModelConfig> {
    let (h, mlp, layers, heads, kv, vocab, window) = shape(name)?;
    let arch = if window.is_some() {
        "MistralForCausalLM"
    } else {
        "LlamaForCausalLM"
    };
    ModelConfig::from_json(serde_json::json!({
        "architectures": [arch],
        "hidden_size": h,
        "intermediate_size": mlp,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "sliding_window": window,
        "tie_word_embeddings": false,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }))
}

/// Uniform values in ±`bound` (std bound/√3), element i a function of (seed, i).
fn random_values(n: usize, seed: u64, bound: f32) -> Vec<f32> {
    (0..n)
        .into_par_iter()
        .map(|i| {
            let u = (splitmix64(seed ^ splitmix64(i as u64)) >> 40) as f32 / 16_777_216.0;
            (2.0 * u - 1.0) * bound
        })
        .collect()
}

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    (0..n)
        .into_par_iter()
        .map(|i| splitmix64(seed ^ splitmix64(i as u64)) as u8)
        .collect()
}

/// A dense weight: f32 on the CPU, bf16 on the device (std 0.02, like bench_hf.py).
fn dense(shape: &[usize], seed: u64, cuda: bool, ones: bool) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v = if ones {
        vec![1.0; n]
    } else {
        random_values(n, seed, 0.02 * 3f32.sqrt())
    };
    if !cuda {
        return Ok(Tensor::from_vec(v, shape));
    }
    let h: Vec<bf16> = v.par_iter().map(|&x| bf16::from_f32(x)).collect();
    Ok(Tensor::cuda_bf16(Gpu::get()?.upload(&h)?, shape))
}

/// A random NF4 weight in bitsandbytes' default layout (blocksize 64, double quant with
/// 256-block groups), scaled so dequantized values are about ±0.05.
fn nf4(shape: [usize; 2], seed: u64, cuda: bool) -> Result<LinearWeight> {
    let numel = shape[0] * shape[1];
    let blocks = numel.div_ceil(64);
    let groups = blocks.div_ceil(256);
    let t = Nf4Tensor {
        shape,
        blocksize: 64,
        packed: random_bytes(numel.div_ceil(2), seed),
        absmax: Absmax::Double(DoubleQuant {
            q: random_bytes(blocks, seed ^ 0x5151),
            code2: dynamic_map().to_vec(),
            absmax2: vec![0.01; groups],
            offset: 0.04,
            blocksize2: 256,
        }),
        dtype: SourceDtype::BF16,
    };
    Ok(if cuda {
        LinearWeight::Nf4Cuda(Arc::new(Nf4Weight::upload(&*Gpu::get()?, &t)?))
    } else {
        LinearWeight::Nf4(Arc::new(t))
    })
}

fn random_model(cfg: ModelConfig, qlora: bool, cuda: bool) -> Result<Model> {
    let (v, h) = (cfg.vocab_size, cfg.hidden_size);
    let mut seed = 1u64;
    let mut next = || {
        seed += 1;
        seed
    };
    let embed = Arc::new(dense(&[v, h], next(), cuda, false)?);
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for _ in 0..cfg.num_layers {
        let mut proj = |name: &str| -> Result<LinearWeight> {
            let s = Layer::proj_shape(&cfg, name);
            if qlora {
                nf4(s, next(), cuda)
            } else {
                Ok(LinearWeight::Dense(Arc::new(dense(
                    &s,
                    next(),
                    cuda,
                    false,
                )?)))
            }
        };
        let [q, k, vv, o, gate, up, down] = PROJ_NAMES.map(&mut proj);
        layers.push(Layer {
            input_norm: dense(&[h], 0, cuda, true)?,
            q: q?,
            k: k?,
            v: vv?,
            o: o?,
            post_norm: dense(&[h], 0, cuda, true)?,
            gate: gate?,
            up: up?,
            down: down?,
        });
    }
    Ok(Model {
        norm: dense(&[h], 0, cuda, true)?,
        lm_head: LinearWeight::Dense(Arc::new(dense(&[v, h], next(), cuda, false)?)),
        embed,
        layers,
        cfg,
        recompute: Recompute::None,
        lm_grad_in_forward: crate::model::llama::lm_grad_in_forward_default(),
    })
}

/// Random token ids: SFT rows of `seq` tokens (the first is the prompt, so `seq − 1`
/// predicted tokens, as HF's causal LM loss); DPO pairs sharing a `seq / 2` prompt.
fn examples(method: Method, batch: usize, seq: usize, vocab: usize) -> Examples {
    let ids = |seed: u64, n: usize| -> Vec<u32> {
        (0..n)
            .map(|i| (splitmix64(seed ^ splitmix64(i as u64)) % vocab as u64) as u32)
            .collect()
    };
    match method {
        Method::Sft => Examples::Sft(
            (0..batch)
                .map(|b| SftExample {
                    ids: ids(b as u64, seq),
                    prompt_len: 1,
                })
                .collect(),
        ),
        Method::Dpo => Examples::Pref(
            (0..batch)
                .map(|b| {
                    let prompt = ids(1000 + b as u64, seq / 2);
                    let with = |seed: u64| {
                        let mut v = prompt.clone();
                        v.extend(ids(seed, seq - seq / 2));
                        SftExample {
                            ids: v,
                            prompt_len: (seq / 2).max(1),
                        }
                    };
                    PrefExample {
                        chosen: with(2000 + b as u64),
                        rejected: with(3000 + b as u64),
                    }
                })
                .collect(),
        ),
    }
}

/// The training settings of the bench, parsed from flags as `palign sft/dpo` would be
/// (the paper's defaults for everything the bench does not set).
fn settings(b: &TrainBench, method: Method) -> Result<Settings> {
    #[derive(clap::Parser)]
    struct P {
        #[command(flatten)]
        a: crate::train::TrainArgs,
    }
    use clap::Parser;
    let alpha = b.alpha.unwrap_or(2.0 * b.rank as f32);
    let mut argv: Vec<String> = [
        "bench", "--model", "random", "--data", "random", "--out", "-", "--peft",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    argv.push(b.peft.clone());
    for (flag, v) in [
        ("--rank", b.rank.to_string()),
        ("--alpha", alpha.to_string()),
        ("--dropout", b.dropout.to_string()),
        ("--targets", b.targets.clone()),
        ("--batch-size", b.batch_size.to_string()),
        ("--grad-accum", b.grad_accum.to_string()),
        ("--lr", "1e-4".to_string()),
        ("--steps", (b.warmup + b.steps + 1).to_string()),
    ] {
        argv.push(flag.into());
        argv.push(v);
    }
    if b.keep_dropout {
        argv.push("--keep-dropout".into());
    }
    let p = P::try_parse_from(argv)
        .map_err(|e| bad(e.to_string().lines().next().unwrap_or("").to_string()))?;
    Settings::resolve(&p.a, method, 0)
}

/// bf16 dense peak TFLOP/s by GPU name (tools/bench_hf.py has the same table).
pub fn peak_tflops(name: &str) -> Option<f64> {
    if name.contains("H200") {
        Some(989.0)
    } else if name.contains("H100") {
        Some(if name.contains("PCIe") { 756.0 } else { 989.0 })
    } else if name.contains("A100") {
        Some(312.0)
    } else {
        None
    }
}

/// N: the weights of every linear layer, lm_head included (2N FLOPs per token forward).
fn linear_params(cfg: &ModelConfig) -> f64 {
    let per_layer: usize = PROJ_NAMES
        .iter()
        .map(|p| {
            let [o, i] = Layer::proj_shape(cfg, p);
            o * i
        })
        .sum();
    (cfg.num_layers * per_layer) as f64 + lm_head_params(cfg)
}

/// The lm_head's weights (vocab × hidden).
fn lm_head_params(cfg: &ModelConfig) -> f64 {
    (cfg.vocab_size * cfg.hidden_size) as f64
}

/// Model FLOPs of one step (DESIGN.md's 4N per token plus attention; the formula of
/// tools/bench_hf.py): N = every linear layer incl. lm_head; attention forward per
/// sequence and layer 2·S²·heads·head_dim (causal), backward 2.5×; DPO adds the
/// reference forward (2N per token + forward attention).
pub fn step_flops(cfg: &ModelConfig, method: Method, batch: usize, seq: usize) -> f64 {
    let n = linear_params(cfg);
    let (s, l) = (seq as f64, cfg.num_layers as f64);
    let attn_f = 2.0 * s * s * (cfg.num_heads * cfg.head_dim) as f64;
    let b = batch as f64;
    match method {
        Method::Sft => b * s * 4.0 * n + b * l * 3.5 * attn_f,
        Method::Dpo => {
            let t = 2.0 * b * s;
            t * 4.0 * n + 2.0 * b * l * 3.5 * attn_f + t * 2.0 * n + 2.0 * b * l * attn_f
        }
    }
}

/// `step_flops` less the decoder layers' FLOPs of rows computed once for several
/// sequences (`shared_policy` rows forward + backward, 4 per weight; `shared_ref`
/// forward only, 2). The lm_head is not taken off: no prompt row runs it in any case.
fn run_flops(cfg: &ModelConfig, step: f64, shared_policy: usize, shared_ref: usize) -> f64 {
    let layers = linear_params(cfg) - lm_head_params(cfg);
    step - layers * (4 * shared_policy + 2 * shared_ref) as f64
}

pub fn run(args: &Args, common: &Common) -> Result<()> {
    match &args.what {
        What::Train(b) => run_train(b, common),
        What::Generate(b) => run_generate(b, common),
    }
}

/// The device and the shape's config; 7B shapes only on the GPU.
fn open(shape: &str, common: &Common) -> Result<(Device, ModelConfig)> {
    let device = common.setup()?;
    let cfg = config(shape)?;
    if shape != "tiny" && device != Device::Cuda {
        return Err(bad(format!(
            "--shape {shape}: 7B shapes run on the GPU only (use --shape tiny on the CPU)"
        )));
    }
    Ok((device, cfg))
}

fn gpu_name(cuda: bool) -> Result<String> {
    Ok(if cuda {
        Gpu::get()?.name().to_string()
    } else {
        "cpu".to_string()
    })
}

/// Prints the kernel-family breakdown (ms per family of `total_ms`) as BREAKDOWN lines.
fn print_breakdown(
    families: &std::collections::BTreeMap<&'static str, f64>,
    total_ms: f64,
    other: &str,
) {
    if families.is_empty() {
        return;
    }
    let kernels: f64 = families.values().sum();
    for (family, ms) in families {
        println!(
            "BREAKDOWN family=\"{family}\" ms={ms:.2} share={:.1}%",
            100.0 * ms / total_ms
        );
    }
    println!(
        "BREAKDOWN family=\"other ({other})\" ms={:.2} share={:.1}%",
        total_ms - kernels,
        100.0 * (total_ms - kernels) / total_ms
    );
}

fn run_train(b: &TrainBench, common: &Common) -> Result<()> {
    let method = match b.method.as_str() {
        "sft" => Method::Sft,
        "dpo" => Method::Dpo,
        m => return Err(bad(format!("--method: unknown method `{m}` (sft, dpo)"))),
    };
    let (device, cfg) = open(&b.shape, common)?;
    let cuda = device == Device::Cuda;
    if b.seq_len < 2 || b.steps == 0 {
        return Err(bad("--seq-len must be at least 2 and --steps at least 1"));
    }
    let s = settings(b, method)?;
    if b.recompute != "auto" {
        b.recompute.parse::<Recompute>()?; // a bad name fails before the weights are made
    }
    let mut model = random_model(cfg, s.peft == "qlora", cuda)?;
    let available = if cuda {
        Some(Gpu::get()?.available_bytes()? as u64)
    } else {
        None
    };
    let ex = examples(method, b.batch_size, b.seq_len, model.cfg.vocab_size);
    let all: Vec<usize> = (0..b.batch_size).collect();
    let (rows, tokens) = runner::largest_micro_batch(&ex, [all.clone()], &s);
    model.recompute = crate::train::memplan::resolve(
        &b.recompute,
        &model.cfg,
        crate::train::memplan::MicroBatch { rows, tokens },
        s.rank * s.targets.len(),
        available,
        common.quiet,
    )?;
    let out = runner::bench(&model, &s, &ex, device, b.warmup, b.steps)?;

    let mut sorted = out.step_secs.clone();
    sorted.sort_by(f64::total_cmp);
    // statistics.median, as tools/bench_hf.py takes it.
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    let gpu_name = gpu_name(cuda)?;
    // `mfu`: the model FLOPs of every sequence's tokens, the figure tools/bench_hf.py
    // prints. A prompt shared by a DPO pair is computed once (both passes, unless
    // --keep-dropout), so `mfu_run` leaves out its rows' decoder-layer FLOPs (lm_head
    // never runs on prompt rows; attention still runs each branch whole).
    let (shared_policy, shared_ref) = runner::shared_tokens(&ex, &all, &s);
    let flops = step_flops(&model.cfg, method, b.batch_size, b.seq_len);
    let flops_run = run_flops(&model.cfg, flops, shared_policy, shared_ref);
    let peak = peak_tflops(&gpu_name);
    let mfu = peak.map(|p| flops / median / (p * 1e12));
    let mfu_run = peak.map(|p| flops_run / median / (p * 1e12));
    let peak_gib = out.peak_bytes.map(|x| x as f64 / (1u64 << 30) as f64);
    eprintln!(
        "palign bench train: {} {} {} batch {} x {} tokens, rank {}, recompute {}, {} timed steps on {gpu_name}",
        b.shape, b.method, s.peft, b.batch_size, b.seq_len, s.rank, model.recompute.name(), b.steps
    );
    eprintln!(
        "loss per step: {}",
        out.losses
            .iter()
            .map(|l| format!("{l:.4}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    print_breakdown(
        &out.families,
        out.profiled_secs * 1e3,
        "optimizer, host, transfers",
    );
    if cuda {
        // Which attention tiles the steps ran (measured on this GPU, or read from its cache).
        let tuner = crate::backend::cuda::attn_tune::AttnTuner::global(&*Gpu::get()?)?;
        for line in tuner.summary() {
            println!("TUNED attention mode={:?} {line}", tuner.mode());
        }
    }
    let f = |x: Option<f64>, prec: usize| x.map_or("nan".to_string(), |v| format!("{v:.prec$}"));
    println!(
        "BENCH_TRAIN impl=palign shape={} method={} peft={} batch={} seq={} rank={} tokens_per_s={:.1} step_ms={:.2} peak_mem_gib={} mfu={} mfu_run={} shared_tokens={}+{} gpu=\"{gpu_name}\"",
        b.shape,
        b.method,
        s.peft,
        b.batch_size,
        b.seq_len,
        s.rank,
        out.tokens as f64 / median,
        median * 1e3,
        f(peak_gib, 3),
        f(mfu, 4),
        f(mfu_run, 4),
        shared_policy,
        shared_ref,
    );
    Ok(())
}

/// Bytes one decode step reads of the weights on the device: every projection (NF4
/// codes and scales, or bf16), the norms and the lm_head; not the embedding, of which a
/// step reads one row per sequence. None on the CPU.
fn step_weight_bytes(model: &Model) -> Option<f64> {
    let bytes = |w: &LinearWeight| match w {
        LinearWeight::Dense(t) => t.is_cuda().then(|| 2 * t.numel()),
        LinearWeight::Nf4Cuda(q) => Some(q.device_bytes()),
        LinearWeight::Nf4(_) => None,
    };
    let h = model.cfg.hidden_size;
    let mut total = bytes(&model.lm_head)? + 2 * h;
    for l in &model.layers {
        for w in l.projections() {
            total += bytes(w)?;
        }
        total += 2 * 2 * h;
    }
    Some(total as f64)
}

/// `--vary`'s length of row `r` out of `new_tokens`: spread between an eighth of it and
/// all of it by a multiplicative hash (tools/bench_hf.py computes the same numbers).
pub fn vary_length(r: usize, new_tokens: usize) -> usize {
    let lo = (new_tokens / 8).max(1);
    let span = (new_tokens.max(lo) - lo + 1) as u64;
    lo + ((r as u64).wrapping_mul(2_654_435_761) % span) as usize
}

/// `palign bench generate`: one warm-up generation (2 new tokens: kernel choices,
/// allocations), the timed one, then two short profiled ones on the device whose
/// difference is the decode steps' time per kernel family.
fn run_generate(b: &GenBench, common: &Common) -> Result<()> {
    use crate::model::generate::{generate_timed, GenConfig};
    let (device, cfg) = open(&b.shape, common)?;
    let cuda = device == Device::Cuda;
    let qlora = match b.peft.as_str() {
        "qlora" => true,
        "lora" => false,
        p => return Err(bad(format!("--peft: unknown `{p}` (lora, qlora)"))),
    };
    if b.prompt_len == 0 || b.new_tokens == 0 || b.batch_size == 0 {
        return Err(bad(
            "--batch-size, --prompt-len and --new-tokens must be at least 1",
        ));
    }
    let n_prompts = b.prompts.unwrap_or(b.batch_size);
    if n_prompts == 0 {
        return Err(bad("--prompts must be at least 1"));
    }
    let lengths: Vec<usize> = if b.vary {
        (0..n_prompts)
            .map(|r| vary_length(r, b.new_tokens))
            .collect()
    } else {
        Vec::new()
    };
    let gen = |new_tokens: usize| GenConfig {
        max_new_tokens: new_tokens,
        temperature: b.temperature,
        top_k: 0,
        top_p: b.top_p,
        seed: common.seed,
        eos_ids: Vec::new(),
        batch_size: b.batch_size,
        row_max_new_tokens: lengths.clone(),
    };
    gen(b.new_tokens).validate()?;
    let lora = if b.rank > 0 {
        Some(crate::lora::LoraConfig {
            r: b.rank,
            alpha: 2.0 * b.rank as f32,
            dropout: 0.0,
            targets: crate::lora::LoraConfig::parse_targets(&b.targets)?,
            use_rslora: false,
        })
    } else {
        None
    };
    let model = random_model(cfg, qlora, cuda)?;
    let mut adapter = lora
        .map(|l| crate::lora::Adapter::init(&model.cfg, l, common.seed))
        .transpose()?;
    if cuda {
        adapter = adapter.map(|a| a.to_device_bf16()).transpose()?;
    }
    let vocab = model.cfg.vocab_size as u64;
    let prompts: Vec<Vec<u32>> = (0..n_prompts)
        .map(|r| {
            (0..b.prompt_len)
                .map(|i| (splitmix64(((r as u64) << 32) ^ i as u64) % vocab) as u32)
                .collect()
        })
        .collect();
    let gpu = if cuda { Some(Gpu::get()?) } else { None };
    let run = |new_tokens: usize| {
        generate_timed(
            &model,
            adapter.as_ref(),
            &prompts,
            &gen(new_tokens),
            None,
            |_| {},
        )
    };
    run(2.min(b.new_tokens))?;
    if let Some(g) = &gpu {
        g.synchronize()?;
        g.reset_peak();
    }
    let t0 = std::time::Instant::now();
    let (outs, st) = run(b.new_tokens)?;
    let secs = t0.elapsed().as_secs_f64();
    let peak_gib = gpu
        .as_ref()
        .map(|g| g.pool_stats().peak_in_use_bytes as f64 / (1u64 << 30) as f64);
    let generated: usize = outs.iter().map(|g| g.ids.len()).sum();

    // Decode steps' kernel time by family: a run of 1 + k tokens less a run of 1.
    let k = 16.min(b.new_tokens.saturating_sub(1));
    let mut decode_families = std::collections::BTreeMap::new();
    if let (Some(g), true) = (&gpu, k > 0) {
        let profiled = |new_tokens: usize| -> Result<_> {
            crate::backend::cuda::profile::start();
            run(new_tokens)?;
            crate::backend::cuda::profile::finish(g)
        };
        match profiled(1).and_then(|a| Ok((a, profiled(1 + k)?))) {
            Ok((prefill, both)) => {
                for (family, ms) in both {
                    let d = ms - prefill.get(family).copied().unwrap_or(0.0);
                    decode_families.insert(family, d.max(0.0) / k as f64);
                }
            }
            Err(e) => eprintln!("note: no kernel-family breakdown: {e}"),
        }
    }

    let gpu_name = gpu_name(cuda)?;
    // Prefill and decode times include choosing the tokens (as tools/bench_hf.py's T1 and
    // TN - T1 do); the weight bandwidth is the forward's alone.
    let per_s = |n: usize, s: f64| (s > 0.0).then(|| n as f64 / s);
    let steps = st.decode_steps.max(1) as f64;
    let forward_s = st.decode_secs / steps;
    let step_s = (st.decode_secs + st.decode_sample_secs) / steps;
    let prefill_s = st.prefill_secs + st.prefill_sample_secs;
    let decoded = st.decode_steps > 0;
    let weight_gbps = step_weight_bytes(&model)
        .filter(|_| decoded)
        .map(|w| w / forward_s / 1e9);
    eprintln!(
        "palign bench generate: {} {} rank {}, {n_prompts} prompts x {} tokens in {} slots, {} new tokens each{}, on {gpu_name}",
        b.shape,
        b.peft,
        b.rank,
        b.prompt_len,
        b.batch_size,
        b.new_tokens,
        if b.vary { " at most (--vary)" } else { "" }
    );
    eprintln!(
        "prefill: {} forward(s), {:.1} ms (+ {:.1} ms choosing tokens); decode: {} steps, {:.2} ms each (+ {:.2} ms choosing tokens)",
        st.prefills,
        st.prefill_secs * 1e3,
        st.prefill_sample_secs * 1e3,
        st.decode_steps,
        forward_s * 1e3,
        (step_s - forward_s) * 1e3,
    );
    if !decode_families.is_empty() {
        // Kernel time per decode step (profiled runs) against the timed run's step, token
        // choice included: the rest is the host's share (launches, sampling, the logits'
        // copy).
        eprintln!("one decode step's kernels (profiled over {k} steps):");
        print_breakdown(&decode_families, step_s * 1e3, "host, launches, transfers");
    }
    let f = |x: Option<f64>, prec: usize| x.map_or("nan".to_string(), |v| format!("{v:.prec$}"));
    println!(
        "BENCH_GENERATE impl=palign shape={} peft={} rank={} batch={} prompts={n_prompts} vary={} prompt_len={} new_tokens={} tokens_per_s={} prefill_tokens_per_s={} decode_tokens_per_s={} decode_step_ms={} decode_steps={} weight_gb_per_s={} peak_mem_gib={} generated={} gpu=\"{gpu_name}\"",
        b.shape,
        b.peft,
        b.rank,
        b.batch_size,
        b.vary,
        b.prompt_len,
        b.new_tokens,
        f(per_s(generated, secs), 1),
        f(per_s(st.prefill_tokens, prefill_s), 1),
        f(per_s(st.decode_tokens, st.decode_secs + st.decode_sample_secs), 1),
        f(decoded.then_some(step_s * 1e3), 3),
        st.decode_steps,
        f(weight_gbps, 1),
        f(peak_gib, 3),
        generated,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_flops_follow_the_published_parameter_counts() {
        // Mistral-7B-v0.1 has 7.24B parameters, of which 2 × 32000 × 4096 are the
        // embedding and lm_head; the linear layers including lm_head are then
        // 7.24e9 − 131M ≈ 7.11e9 (the model card's total, config dims as in `shape`).
        // One token: the step is 4N plus 32 layers' attention over one key.
        let cfg = config("mistral-7b").unwrap();
        let n = (step_flops(&cfg, Method::Sft, 1, 1) - 32.0 * 3.5 * 2.0 * 4096.0) / 4.0;
        assert!((n / 7.11e9 - 1.0).abs() < 0.01, "N ≈ {n:e}");
        // At 16 × 512 the causal attention adds 16·32·3.5·2·512²·4096 FLOPs.
        let sft = step_flops(&cfg, Method::Sft, 16, 512);
        let attn = 16.0 * 32.0 * 3.5 * 2.0 * 512.0 * 512.0 * 4096.0;
        assert!((sft - (8192.0 * 4.0 * n + attn)).abs() < 1e-6 * sft);
        // LLaMA-2-7B: 6.74B total, 6.61B without the embedding.
        let llama = config("llama-7b").unwrap();
        let n = step_flops(&llama, Method::Sft, 1, 1) / 4.0;
        assert!((n / 6.61e9 - 1.0).abs() < 0.01, "N ≈ {n:e}");
        // DPO: twice the policy tokens at 4N, plus the reference forward at 2N, plus
        // attention; so between 3× and 3.2× the SFT step of the same batch.
        let dpo = step_flops(&cfg, Method::Dpo, 16, 512);
        assert!(dpo / sft > 2.99 && dpo / sft < 3.2, "{}", dpo / sft);
    }

    #[test]
    fn flops_run_leave_out_the_shared_rows_decoder_layers() {
        // Mistral-7B's decoder layers hold 7.11e9 − 32000·4096 ≈ 6.98e9 weights (the
        // model card's count less both embedding-sized matrices, as above).
        let cfg = config("mistral-7b").unwrap();
        let step = step_flops(&cfg, Method::Dpo, 16, 512);
        assert_eq!(run_flops(&cfg, step, 0, 0), step);
        let (p, r) = (16 * 256, 16 * 256);
        let per_weight = (step - run_flops(&cfg, step, p, r)) / (4 * p + 2 * r) as f64;
        assert!((per_weight / 6.98e9 - 1.0).abs() < 0.01, "{per_weight:e}");
    }

    #[test]
    fn peaks_by_gpu_name() {
        assert_eq!(peak_tflops("NVIDIA H100 80GB HBM3"), Some(989.0));
        assert_eq!(peak_tflops("NVIDIA H100 PCIe"), Some(756.0));
        assert_eq!(peak_tflops("NVIDIA A100-SXM4-40GB"), Some(312.0));
        assert_eq!(peak_tflops("NVIDIA H200"), Some(989.0));
        assert_eq!(peak_tflops("Tesla T4"), None);
    }
}
