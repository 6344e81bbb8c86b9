//! CPU backend speed (criterion; `cargo bench --bench cpu`), the palign side of
//! `tools/bench_torch_cpu.py` (same shapes; ratios go to benches/RESULTS.md).
//!
//! 1. `score_tiny`: the init-tiny LLaMA (hidden 128, MLP 344, 4 layers, 4 heads, vocab
//!    512), 64 sequences of 128 tokens in one call, log p of tokens 1..127 (prompt = the
//!    first token). Throughput in sequences.
//! 2. `sft_step`: a LLaMA with hidden 256, MLP 688, 4 layers, 4 heads (head_dim 64),
//!    vocab 512, random weights; batch 8 × 128 tokens; LoRA r=16, alpha 32, dropout 0 on
//!    all 7 projections. One step = forward with save + backward of the mean token loss
//!    into fresh adapter gradients, as `train::runner` does it; no optimizer step.
//!    Throughput in tokens (all 8·128 input tokens).
//!
//! 3. `dpo_step_{unshared,shared}`: the `sft_step` model and adapter on DPO-shaped data,
//!    4 pairs of 128-token sequences sharing a 64-token prompt (`bench train`'s shape),
//!    forward with save + backward, packed each sequence alone against each prompt once
//!    (`SeqBatch::sharing_prefixes`); the summary prints their ratio.
//!
//! After criterion, a summary re-measures each case as the torch script does (warm-up,
//! then the median of `REPS` runs) and prints one `BENCH` line per case.

use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use palign::lora::{Adapter, LoraConfig};
use palign::model::llama::{Layer, SeqBatch, PROJ_NAMES};
use palign::model::weights::{self, FloatDtype, TensorOut};
use palign::model::{tiny, Arch, Model, ModelConfig, ScoreSeq};
use palign::tensor::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SEQ_LEN: usize = 128;
const SCORE_SEQS: usize = 64;
const SFT_BATCH: usize = 8;
const SFT_HIDDEN: usize = 256;
const SFT_MLP: usize = 688;
const SFT_LAYERS: usize = 4;
const SFT_HEADS: usize = 4;
const LORA_R: usize = 16;
const DPO_PAIRS: usize = 4;
const REPS: usize = 10;

fn ok<T>(r: palign::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("benchmark setup failed: {e}"))
}

/// Random token sequences (ids ≥ 3, clear of the special tokens), prompt = first token.
fn random_seqs(n: usize, vocab: usize, seed: u64) -> Vec<ScoreSeq> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| ScoreSeq {
            ids: (0..SEQ_LEN)
                .map(|_| rng.random_range(3..vocab as u32))
                .collect(),
            prompt_len: 1,
        })
        .collect()
}

/// Writes the SFT bench model (config.json + model.safetensors) into `dir`: the tiny
/// LLaMA's config with the larger shapes, weights U(±0.035) (std ≈ 0.02).
fn write_sft_model(dir: &Path) {
    let hd = SFT_HIDDEN / SFT_HEADS;
    let mut cfg = tiny::config_json(Arch::Llama);
    cfg["hidden_size"] = SFT_HIDDEN.into();
    cfg["intermediate_size"] = SFT_MLP.into();
    cfg["num_hidden_layers"] = SFT_LAYERS.into();
    cfg["num_attention_heads"] = SFT_HEADS.into();
    cfg["num_key_value_heads"] = SFT_HEADS.into();
    cfg["head_dim"] = hd.into();
    let mc = ok(ModelConfig::from_json(cfg.clone()));
    let text = serde_json::to_string_pretty(&cfg).expect("json serializes");
    std::fs::write(dir.join("config.json"), text).expect("write config.json");

    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut t = |name: String, shape: Vec<usize>| {
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-0.035..0.035)).collect();
        TensorOut::float(name, shape, FloatDtype::F32, &v)
    };
    let (h, v) = (SFT_HIDDEN, tiny::VOCAB);
    let mut out = vec![t("model.embed_tokens.weight".into(), vec![v, h])];
    for l in 0..SFT_LAYERS {
        for p in PROJ_NAMES {
            let shape = Layer::proj_shape(&mc, p).to_vec();
            out.push(t(Layer::weight_name(l, p), shape));
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            let name = format!("model.layers.{l}.{norm}.weight");
            out.push(TensorOut::float(
                name,
                vec![h],
                FloatDtype::F32,
                &vec![1.0; h],
            ));
        }
    }
    out.push(TensorOut::float(
        "model.norm.weight",
        vec![h],
        FloatDtype::F32,
        &vec![1.0; h],
    ));
    out.push(t("lm_head.weight".into(), vec![v, h]));
    ok(weights::write_file(&dir.join("model.safetensors"), &out));
}

/// One SFT step as `train::runner` does it: forward with save, then the backward of
/// loss = −mean log p over the completion tokens into fresh gradients.
fn sft_step(model: &Model, adapter: &Adapter, b: &SeqBatch) -> Adapter {
    let mut grads = ok(adapter.zeros_like());
    let (lp, trace) = ok(model.forward(
        Some(adapter),
        &b.ids,
        &b.pack,
        &b.rows,
        &b.targets,
        None,
        true,
    ));
    let n = lp.numel();
    let d = Tensor::from_vec(vec![-1.0 / n as f32; n], &[n]);
    ok(model.backward(
        adapter,
        &trace.expect("forward saved a trace"),
        &d,
        &mut grads,
    ));
    grads
}

/// Warm-up, then the median and minimum of `REPS` timed runs (the torch script's method).
fn median_secs(mut f: impl FnMut()) -> (f64, f64) {
    for _ in 0..3 {
        f();
    }
    let mut ts: Vec<f64> = (0..REPS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    ts.sort_by(f64::total_cmp);
    (ts[REPS / 2], ts[0])
}

fn main() {
    // As the palign binary does at start-up (src/backend/cpu/alloc.rs).
    palign::backend::cpu::alloc::keep_freed_memory();
    let dir = tempfile::tempdir().expect("temp dir");
    let tiny_dir = dir.path().join("tiny");
    let sft_dir = dir.path().join("sft");
    std::fs::create_dir_all(&tiny_dir).expect("mkdir");
    std::fs::create_dir_all(&sft_dir).expect("mkdir");
    ok(tiny::write_model(&tiny_dir, Arch::Llama, 0));
    write_sft_model(&sft_dir);
    let tiny_model = ok(Model::load(&tiny_dir));
    let sft_model = ok(Model::load(&sft_dir));

    let score_seqs = random_seqs(SCORE_SEQS, tiny::VOCAB, 1);
    let lora = LoraConfig {
        r: LORA_R,
        alpha: 2.0 * LORA_R as f32,
        dropout: 0.0,
        targets: PROJ_NAMES.iter().map(|p| p.to_string()).collect(),
        use_rslora: false,
    };
    let adapter = ok(Adapter::init(&sft_model.cfg, lora, 3));
    let sft_batch = SeqBatch::new(&random_seqs(SFT_BATCH, tiny::VOCAB, 2));
    let sft_tokens = sft_batch.ids.len();

    // DPO pairs: chosen and rejected share a SEQ_LEN/2 prompt.
    let mut dpo_seqs = random_seqs(2 * DPO_PAIRS, tiny::VOCAB, 4);
    for pair in dpo_seqs.chunks_mut(2) {
        let prompt = pair[0].ids[..SEQ_LEN / 2].to_vec();
        pair[1].ids[..SEQ_LEN / 2].copy_from_slice(&prompt);
        for s in pair.iter_mut() {
            s.prompt_len = SEQ_LEN / 2;
        }
    }
    let dpo_unshared = SeqBatch::new(&dpo_seqs);
    let dpo_shared = SeqBatch::sharing_prefixes(&dpo_seqs);
    assert!(
        dpo_shared.ids.len() < dpo_unshared.ids.len(),
        "the pairs share"
    );
    let dpo_tokens = dpo_unshared.tokens;

    let score = || {
        ok(tiny_model.completion_logprobs(&score_seqs, None));
    };
    let step = || {
        sft_step(&sft_model, &adapter, &sft_batch);
    };

    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .sample_size(10)
        .configure_from_args();
    {
        let mut group = c.benchmark_group("cpu");
        group.throughput(Throughput::Elements(SCORE_SEQS as u64));
        group.bench_function("score_tiny", |b| b.iter(score));
        group.throughput(Throughput::Elements(sft_tokens as u64));
        group.bench_function("sft_step", |b| b.iter(step));
        group.throughput(Throughput::Elements(dpo_tokens as u64));
        group.bench_function("dpo_step_unshared", |b| {
            b.iter(|| sft_step(&sft_model, &adapter, &dpo_unshared))
        });
        group.bench_function("dpo_step_shared", |b| {
            b.iter(|| sft_step(&sft_model, &adapter, &dpo_shared))
        });
        group.finish();
    }

    let threads = rayon::current_num_threads();
    let (t, tmin) = median_secs(score);
    println!(
        "BENCH score_tiny {SCORE_SEQS}x{SEQ_LEN}: median {:.1} ms (min {:.1}) -> {:.1} sequences/s ({threads} threads)",
        t * 1e3,
        tmin * 1e3,
        SCORE_SEQS as f64 / t
    );
    let (t, tmin) = median_secs(step);
    println!(
        "BENCH sft_step {SFT_BATCH}x{SEQ_LEN}: median {:.1} ms (min {:.1}) -> {:.0} tokens/s ({threads} threads)",
        t * 1e3,
        tmin * 1e3,
        sft_tokens as f64 / t
    );
    let (tu, _) = median_secs(|| {
        sft_step(&sft_model, &adapter, &dpo_unshared);
    });
    let (ts, _) = median_secs(|| {
        sft_step(&sft_model, &adapter, &dpo_shared);
    });
    println!(
        "BENCH dpo_step {DPO_PAIRS} pairs x{SEQ_LEN}, prompt {}: unshared {:.1} ms, shared {:.1} ms ({} of {} rows computed) -> {:.0} / {:.0} tokens/s ({threads} threads)",
        SEQ_LEN / 2,
        tu * 1e3,
        ts * 1e3,
        dpo_shared.ids.len(),
        dpo_tokens,
        dpo_tokens as f64 / tu,
        dpo_tokens as f64 / ts
    );
    println!("RATIO dpo_step shared_vs_unshared speedup = {:.3}", tu / ts);
}
