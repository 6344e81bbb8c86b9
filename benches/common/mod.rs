//! Pieces shared by the GPU benches (attention, logprob, lora, nf4, small_kernels): the
//! GPU-or-skip start, deterministic inputs, and GPU-event timing. Each bench is its own
//! crate and includes this file with `#[path = "common/mod.rs"] mod common;` (Cargo
//! does not take `benches/common/mod.rs` for a bench of its own); each uses a subset.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion};
use half::bf16;
use palign::backend::cuda::nf4::Nf4Weight;
use palign::backend::cuda::{DeviceBuffer, Gpu};
use palign::quant::{dynamic_map, Absmax, DoubleQuant, Nf4Tensor, SourceDtype};

/// One benchmarked call: device launches, no host sync.
pub type Launch<'a> = Box<dyn FnMut() + 'a>;

/// Whether the GPU check's runner (tools/gpu-check.sh) saw the test binary `tests` time
/// out (`PALIGN_GPU_HUNG`): a bench then leaves out the kernels new on GPUs that it
/// tests (the sm_90a wgmma ones), which a hang on their first run most likely came from.
pub fn tests_hung(tests: &str) -> bool {
    std::env::var("PALIGN_GPU_HUNG").is_ok_and(|v| v.split_whitespace().any(|t| t == tests))
}

pub fn ok<T>(r: palign::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("benchmark setup failed: {e}"))
}

/// The device, after printing `<bench> on <GPU> (sm_XY, N SMs)<detail>`. Without a
/// usable device (or compiled kernels) it prints `<bench>: skipped (...)` and gives
/// `None`, so the bench exits 0 and `cargo bench` works on every machine.
pub fn device_or_skip(bench: &str, detail: &str) -> Option<Arc<Gpu>> {
    let gpu = match Gpu::get() {
        Ok(g) => g,
        Err(e) => {
            println!("{bench}: skipped (no usable CUDA device): {e}");
            return None;
        }
    };
    println!(
        "{bench} on {} (sm_{}{}, {} SMs){detail}",
        gpu.name(),
        gpu.compute_capability().0,
        gpu.compute_capability().1,
        gpu.sm_count()
    );
    Some(gpu)
}

/// Criterion with short runs (GPU kernels are steady after a few calls).
pub fn criterion(warm_up_ms: u64, measurement_ms: u64, samples: usize) -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(warm_up_ms))
        .measurement_time(Duration::from_millis(measurement_ms))
        .sample_size(samples)
        .configure_from_args()
}

/// One criterion benchmark of `run`, timed by CUDA events around `iters` calls.
pub fn bench_gpu(group: &mut BenchmarkGroup<'_, WallTime>, g: &Gpu, name: &str, run: &mut Launch) {
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let t = ok(g.timer());
            for _ in 0..iters {
                run();
            }
            Duration::from_secs_f64(ok(t.elapsed_ms(g)) as f64 / 1e3)
        })
    });
}

/// GPU milliseconds per call: median of `reps` event-timed batches of `batch` calls
/// (after one warm-up call).
pub fn gpu_ms(gpu: &Gpu, run: &mut Launch, reps: usize, batch: usize) -> f64 {
    run();
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let t = ok(gpu.timer());
            for _ in 0..batch {
                run();
            }
            ok(t.elapsed_ms(gpu)) as f64 / batch as f64
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// `n` bf16 values of a cheap deterministic pattern in [-scale, scale): the values do
/// not change the timing.
pub fn filled_bf16(gpu: &Gpu, n: usize, seed: u32, scale: f32) -> DeviceBuffer<bf16> {
    let host: Vec<bf16> = (0..n)
        .map(|i| {
            let u = ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32;
            bf16::from_f32((u / 8388608.0 - 1.0) * scale)
        })
        .collect();
    ok(gpu.upload(&host))
}

/// A cheap deterministic byte stream (xorshift): random codes without a slow RNG.
pub fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        })
        .collect()
}

/// A random NF4 weight [n, k], blocksize 64, double-quantized scales (the QLoRA
/// default).
pub fn random_weight(gpu: &Gpu, n: usize, k: usize, seed: u64) -> Nf4Weight {
    let numel = n * k;
    let nblocks = numel.div_ceil(64);
    let t = Nf4Tensor {
        shape: [n, k],
        blocksize: 64,
        packed: bytes(numel.div_ceil(2), seed),
        absmax: Absmax::Double(DoubleQuant {
            q: bytes(nblocks, seed + 1),
            code2: dynamic_map().to_vec(),
            absmax2: vec![0.01; nblocks.div_ceil(256)],
            offset: 0.02,
            blocksize2: 256,
        }),
        dtype: SourceDtype::BF16,
    };
    ok(Nf4Weight::upload(gpu, &t))
}

/// Device memory one call of `run` takes at its peak beyond what was in use before it
/// (outputs and temporaries; what it hands back to the pool counts until then), in bytes
/// of pool buckets.
pub fn peak_extra_bytes(g: &Gpu, run: &mut dyn FnMut()) -> usize {
    ok(g.synchronize());
    g.reset_peak();
    let before = g.pool_stats().in_use_bytes;
    run();
    ok(g.synchronize());
    g.pool_stats().peak_in_use_bytes.saturating_sub(before)
}
