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

/// A copy of a flat fixture folder (a model, an adapter) to edit in a test.
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

/// `args` with `extra`'s flags (pairs `--flag value`, or a lone `--switch`): a flag that
/// is already there gets the new value, others are appended.
pub fn with_flags(mut args: Vec<String>, extra: &[&str]) -> Vec<String> {
    for pair in extra.chunks(2) {
        if let Some(i) = args.iter().position(|x| x == pair[0]) {
            if pair.len() == 2 {
                args[i + 1] = pair[1].to_string();
                continue;
            }
        }
        args.extend(pair.iter().map(|s| s.to_string()));
    }
    args
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
// Shared by tests/gpu_*.rs.

/// The device, or a panic naming why (GPU tests are `#[ignore = "needs a CUDA device"]`).
pub fn gpu() -> std::sync::Arc<palign::backend::cuda::Gpu> {
    palign::backend::cuda::Gpu::get()
        .unwrap_or_else(|e| panic!("this test needs a CUDA device: {e}"))
}

/// Unwraps a device call, panicking with its error message.
/// Whether `g` is kemu, the CPU emulator of the kernels (tools/kemu): a test may keep to
/// the shapes it runs in seconds there, saying so; a real GPU runs them all.
pub fn on_emulator(g: &palign::backend::cuda::Gpu) -> bool {
    g.name().starts_with("kemu ")
}

/// Multiply-adds of one GEMM above which tests skip a case on the emulator.
pub const EMULATOR_MACS: usize = 1 << 30;

pub fn ok<T>(r: palign::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

pub fn is_bad_input<T: std::fmt::Debug>(r: palign::Result<T>) -> bool {
    matches!(r, Err(palign::Error::BadInput(_)))
}

/// Asserts each kernel is in `KERNEL_NAMES` (so `Gpu::get` loads it) and, when the
/// kernels were compiled, in the embedded fatbin.
pub fn assert_kernels_registered(names: &[&str]) {
    use palign::backend::cuda;
    for name in names {
        assert!(
            cuda::KERNEL_NAMES.contains(name),
            "{name} missing from KERNEL_NAMES"
        );
        if cuda::kernels_compiled() {
            let found = cuda::FATBIN
                .windows(name.len())
                .any(|w| w == name.as_bytes());
            assert!(
                found,
                "{name} not in the embedded fatbin ({})",
                cuda::TARGETS
            );
        }
    }
}

/// n values in [-1, 1) from a 64-bit LCG's high bits: deterministic test inputs.
pub fn lcg(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// A rank-r adapter (alpha 2r, no dropout) on all seven projections with B filled in
/// [-amp, amp): PEFT's B = 0 would hide every adapter term but dB.
pub fn nonzero_adapter(
    cfg: &palign::model::ModelConfig,
    r: usize,
    amp: f32,
) -> palign::lora::Adapter {
    let lc = palign::lora::LoraConfig {
        r,
        alpha: 2.0 * r as f32,
        dropout: 0.0,
        targets: palign::lora::LoraConfig::parse_targets("all").unwrap(),
        use_rslora: false,
    };
    let mut adapter = palign::lora::Adapter::init(cfg, lc, 7).unwrap();
    for (i, (_, _, p)) in adapter.pairs_mut().enumerate() {
        let b: Vec<f32> = lcg(p.b.numel(), 100 + i as u64)
            .iter()
            .map(|v| amp * v)
            .collect();
        p.b.cpu_mut().copy_from_slice(&b);
    }
    adapter
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

pub fn to_f32(v: &[half::bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

pub fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

pub fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0.0f32, |m, x| m.max(x.abs()))
}

/// Root mean square, accumulated in f64.
pub fn rms(v: &[f32]) -> f32 {
    (v.iter().map(|&x| x as f64 * x as f64).sum::<f64>() / v.len().max(1) as f64).sqrt() as f32
}

/// `op(A)·op(B)` in f64 for row-major A, B (op: transpose when `trans_*`), [m, n]:
/// the reference of the bf16 GEMM tests.
pub fn gemm_ref_f64(
    af: &[f32],
    bf: &[f32],
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
) -> Vec<f64> {
    // op(A)[i, l] and op(B)[l, j] from the row-major storage.
    let a_at = |i: usize, l: usize| {
        if trans_a {
            af[l * m + i]
        } else {
            af[i * k + l]
        }
    };
    let b_at = |l: usize, j: usize| {
        if trans_b {
            bf[j * k + l]
        } else {
            bf[l * n + j]
        }
    };
    let mut prod = vec![0.0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            prod[i * n + j] = (0..k).map(|l| a_at(i, l) as f64 * b_at(l, j) as f64).sum();
        }
    }
    prod
}

/// How `check_with` treats elements that are not finite. The test files differ here on
/// purpose, so each says which it wants.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum NonFinite {
    /// Plain |got − want|: any NaN or infinity fails (∞ − ∞ is NaN).
    Fail,
    /// got == want passes (equal infinities too); any NaN fails.
    EqualPasses,
    /// As `EqualPasses`, and NaN passes where want is NaN too (the element is skipped).
    NanMatches,
}

/// Assert |got − want| <= atol + rtol·|want| everywhere (NaN only where want is NaN);
/// print `PARITY <case>: max_abs_err=.. worst=..` (worst: the largest err / bound).
pub fn check(case: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    check_with(case, got, want, atol, rtol, NonFinite::NanMatches, None);
}

/// `check` with the non-finite policy explicit, and `atol_digits`: the digits after the
/// point of atol in the PARITY line (`None`: all, as `{:e}` prints it).
pub fn check_with(
    case: &str,
    got: &[f32],
    want: &[f32],
    atol: f32,
    rtol: f32,
    nonfinite: NonFinite,
    atol_digits: Option<usize>,
) {
    check_core(case, got, want, atol, rtol, None, nonfinite, atol_digits);
}

/// `check` with the relative part of each element's bound taken from `scale[i]` instead
/// of |want[i]|: for results rounded more than once on the way, whose error follows the
/// magnitudes of the intermediate values rather than the final one.
pub fn check_scaled(case: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32, scale: &[f32]) {
    assert_eq!(scale.len(), want.len(), "{case}: scale length");
    check_core(
        case,
        got,
        want,
        atol,
        rtol,
        Some(scale),
        NonFinite::NanMatches,
        None,
    );
}

#[allow(clippy::too_many_arguments)]
fn check_core(
    case: &str,
    got: &[f32],
    want: &[f32],
    atol: f32,
    rtol: f32,
    scale: Option<&[f32]>,
    nonfinite: NonFinite,
    atol_digits: Option<usize>,
) {
    assert_eq!(got.len(), want.len(), "{case}: lengths");
    let (mut max_abs, mut worst, mut worst_i) = (0.0f32, 0.0f32, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if nonfinite == NonFinite::NanMatches && g.is_nan() && w.is_nan() {
            continue;
        }
        let err = if nonfinite != NonFinite::Fail && g == w {
            0.0
        } else {
            (g - w).abs()
        };
        let ratio = if err.is_nan() {
            f32::INFINITY
        } else {
            err / (atol + rtol * scale.map_or(w.abs(), |s| s[i]))
        };
        // f32::max ignores a NaN err; the ratio above already fails it.
        max_abs = max_abs.max(err);
        if ratio > worst || ratio.is_infinite() {
            worst = ratio;
            worst_i = i;
        }
    }
    let atol_s = match atol_digits {
        Some(d) => format!("{atol:.d$e}"),
        None => format!("{atol:e}"),
    };
    println!(
        "PARITY {case}: max_abs_err={max_abs:.3e} worst={worst:.3} (atol={atol_s} rtol={rtol:e} n={})",
        got.len()
    );
    assert!(
        worst <= 1.0,
        "{case}: element {worst_i}: got {} want {} (atol {atol}, rtol {rtol}, worst ratio {worst})",
        got[worst_i],
        want[worst_i]
    );
}

// ---------------------------------------------------------------- model gradients
// Shared by tests/backward_fd.rs, tests/train_grads_peft.rs and tests/gpu_model.rs.

/// One forward + backward of `b` through `model` with `adapter`: the completion
/// log-probs and the adapter gradients of the loss whose gradient with respect to the
/// log-probs is `dlogp` (`None`: −1/n each, the mean negative log-likelihood).
pub fn step_grads(
    model: &palign::model::Model,
    adapter: &palign::lora::Adapter,
    b: &palign::model::llama::SeqBatch,
    dropout: Option<&mut palign::model::llama::Dropout>,
    dlogp: Option<&[f32]>,
) -> (Vec<f32>, palign::lora::Adapter) {
    let (lp, trace) = model
        .forward(
            Some(adapter),
            &b.ids,
            &b.pack,
            &b.rows,
            &b.targets,
            dropout,
            true,
        )
        .unwrap();
    let n = lp.numel();
    let d = match dlogp {
        Some(d) => d.to_vec(),
        None => vec![-1.0 / n as f32; n],
    };
    let d = palign::tensor::Tensor::from_vec(d, &[n]);
    let mut grads = adapter.zeros_like().unwrap();
    model
        .backward(adapter, &trace.unwrap(), &d, &mut grads)
        .unwrap();
    (palign::ops::to_host(&lp).unwrap(), grads)
}

/// Every pair's A then B values, in pair order (downloaded first from the device).
pub fn flat_grads(grads: &palign::lora::Adapter) -> Vec<f32> {
    let g = grads.to_cpu().unwrap();
    g.pairs()
        .flat_map(|(_, _, p)| {
            p.a.cpu()
                .iter()
                .chain(p.b.cpu())
                .copied()
                .collect::<Vec<_>>()
        })
        .collect()
}

/// `‖got − want‖ / ‖want‖` over all elements (f64 sums): the parity measure of gradient
/// and log-prob tensors.
pub fn rel_rms(got: &[f32], want: &[f32]) -> f64 {
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| ((g - w) as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|&w| (w as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}
