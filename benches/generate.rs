//! Generation speed on the CPU backend (criterion; `cargo bench --bench generate`).
//!
//! The init-tiny LLaMA (hidden 128, MLP 344, 4 layers, 4 heads, vocab 512), greedy, random
//! prompts of `PROMPT` tokens, exactly `NEW` new tokens per row (no EOS), batch 1, 16 and 64
//! (as many prompts as the batch holds, all in flight together). Throughput in generated
//! tokens per second, prefill included.
//!
//! After criterion, a summary re-measures each case (warm-up, then the median of `REPS`
//! runs) and prints one `BENCH` line per case.

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use palign::model::generate::{generate, GenConfig};
use palign::model::{tiny, Arch, Model};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const PROMPT: usize = 32;
const NEW: usize = 64;
const BATCHES: [usize; 3] = [1, 16, 64];
const REPS: usize = 5;

fn ok<T>(r: palign::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("benchmark setup failed: {e}"))
}

fn prompts(n: usize) -> Vec<Vec<u32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(n as u64);
    (0..n)
        .map(|_| {
            (0..PROMPT)
                .map(|_| rng.random_range(3..tiny::VOCAB as u32))
                .collect()
        })
        .collect()
}

fn run(model: &Model, prompts: &[Vec<u32>]) -> usize {
    let cfg = GenConfig {
        max_new_tokens: NEW,
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        seed: 0,
        eos_ids: vec![],
        batch_size: prompts.len(),
        row_max_new_tokens: Vec::new(),
    };
    let out = ok(generate(model, None, prompts, &cfg, None, |_| {}));
    out.iter().map(|g| g.ids.len()).sum()
}

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    ok(tiny::write_model(dir.path(), Arch::Llama, 0));
    let model = ok(Model::load(dir.path()));

    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .sample_size(10)
        .configure_from_args();
    {
        let mut group = c.benchmark_group("generate");
        for b in BATCHES {
            let p = prompts(b);
            group.throughput(Throughput::Elements((b * NEW) as u64));
            group.bench_function(format!("tiny_llama_batch{b}"), |bench| {
                bench.iter(|| run(&model, &p))
            });
        }
        group.finish();
    }

    let threads = rayon::current_num_threads();
    for b in BATCHES {
        let p = prompts(b);
        for _ in 0..2 {
            run(&model, &p);
        }
        let mut ts: Vec<f64> = (0..REPS)
            .map(|_| {
                let t = Instant::now();
                assert_eq!(run(&model, &p), b * NEW);
                t.elapsed().as_secs_f64()
            })
            .collect();
        ts.sort_by(f64::total_cmp);
        let t = ts[REPS / 2];
        println!(
            "BENCH generate tiny-llama batch {b} ({PROMPT}-token prompts, {NEW} new): median {:.1} ms -> {:.0} tokens/s ({threads} threads)",
            t * 1e3,
            (b * NEW) as f64 / t
        );
    }
}
