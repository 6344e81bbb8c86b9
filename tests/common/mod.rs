//! Helpers shared by the integration tests: fixture paths, JSONL reading, running the
//! built `palign` binary. (Each test binary uses a subset, hence `dead_code`.)
#![allow(dead_code)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `tests/fixtures` (or `$PALIGN_FIXTURES`: staged GPU test binaries run on another
/// machine, where the compile-time path does not exist).
pub fn fx() -> PathBuf {
    match std::env::var_os("PALIGN_FIXTURES") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"),
    }
}

pub fn jsonl(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Runs palign and asserts success, showing its stderr otherwise.
pub fn palign(args: &[&str]) -> Output {
    let o = run(args);
    assert!(
        o.status.success(),
        "palign {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// Runs palign, whatever the outcome.
/// Without `--device`, palign runs on the CPU (`PALIGN_DEVICE=cpu`): these are CPU
/// tests even on a machine with a GPU.
pub fn run(args: &[&str]) -> Output {
    Command::new(bin())
        .env("PALIGN_DEVICE", "cpu")
        .args(args)
        .output()
        .unwrap()
}

/// The palign binary (`$PALIGN_BIN` for staged GPU runs, see `fx`).
pub fn bin() -> PathBuf {
    match std::env::var_os("PALIGN_BIN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_BIN_EXE_palign")),
    }
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

// ---------------------------------------------------------------- GPU tests
// Shared by tests/gpu_*.rs (the older ones still carry their own copies).

/// The device, or a panic naming why (GPU tests are `#[ignore = "needs a CUDA device"]`).
pub fn gpu() -> std::sync::Arc<palign::backend::cuda::Gpu> {
    palign::backend::cuda::Gpu::get()
        .unwrap_or_else(|e| panic!("this test needs a CUDA device: {e}"))
}

pub fn rng(seed: u64) -> rand_chacha::ChaCha8Rng {
    rand::SeedableRng::seed_from_u64(seed)
}

/// n values uniform in [-scale, scale], rounded to bf16: (the bf16s, the same as f32).
pub fn rand_bf16(
    r: &mut rand_chacha::ChaCha8Rng,
    n: usize,
    scale: f32,
) -> (Vec<half::bf16>, Vec<f32>) {
    use rand::Rng;
    let b: Vec<half::bf16> = (0..n)
        .map(|_| half::bf16::from_f32(r.random_range(-scale..scale)))
        .collect();
    let f = b.iter().map(|x| x.to_f32()).collect();
    (b, f)
}

/// Assert |got − want| <= atol + rtol·|want| everywhere (NaN only where want is NaN);
/// print `PARITY <case>: max_abs_err=.. worst=..` (worst: the largest err / bound).
pub fn check(case: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{case}: lengths");
    let (mut max_abs, mut worst, mut worst_i) = (0.0f32, 0.0f32, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if g.is_nan() && w.is_nan() {
            continue;
        }
        let err = if g == w { 0.0 } else { (g - w).abs() };
        let ratio = if err.is_nan() {
            f32::INFINITY
        } else {
            err / (atol + rtol * w.abs())
        };
        if !err.is_nan() {
            max_abs = max_abs.max(err);
        }
        if ratio > worst || ratio.is_infinite() {
            worst = ratio;
            worst_i = i;
        }
    }
    println!(
        "PARITY {case}: max_abs_err={max_abs:.3e} worst={worst:.3} (atol={atol:e} rtol={rtol:e} n={})",
        got.len()
    );
    assert!(
        worst <= 1.0,
        "{case}: element {worst_i}: got {} want {} (atol {atol}, rtol {rtol})",
        got[worst_i],
        want[worst_i]
    );
}
