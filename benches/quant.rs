//! CPU NF4 quantize / dequantize throughput on a 4096x4096 weight, in GB/s of the f32
//! input (quantize) or output (dequantize).
//! Run: cargo bench --bench quant

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use palign::quant::quantize_nf4;

const ROWS: usize = 4096;
const COLS: usize = 4096;

fn weight() -> Vec<f32> {
    // Cheap deterministic spread of values; the cost does not depend on them.
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    (0..ROWS * COLS)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let w = weight();
    let bytes = (ROWS * COLS * 4) as u64;
    let mut g = c.benchmark_group("nf4_4096x4096");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(bytes));
    for dq in [true, false] {
        let name = if dq { "quantize_dq" } else { "quantize" };
        g.bench_function(name, |b| {
            b.iter(|| quantize_nf4(&w, [ROWS, COLS], 64, dq).expect("quantize"))
        });
    }
    let t = quantize_nf4(&w, [ROWS, COLS], 64, true).expect("quantize");
    let mut out = vec![0.0f32; ROWS * COLS];
    g.bench_function("dequantize_dq", |b| {
        b.iter(|| t.dequantize_into(&mut out).expect("dequantize"))
    });
    g.bench_function("dequantize_rows_dq_64", |b| {
        b.iter(|| {
            for r in (0..ROWS).step_by(64) {
                t.dequantize_rows(r, r + 64, &mut out[r * COLS..(r + 64) * COLS])
                    .expect("dequantize rows");
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
