//! GPU-vs-CPU parity for flash attention (kernels/attention.cu against
//! backend::cpu::ops::attention_{forward,backward,decode}).
//!
//! The GPU tests are `#[ignore = "needs a CUDA device"]` (tools/gpu-check.sh runs them with
//! `--ignored`). Each compared output prints one line
//! `PARITY <case>: max_abs_err=.. worst=.. rel_rms=..`; worst is the largest
//! |got − want| / (atol + rtol·|want|) and a case passes when worst <= 1 and the relative
//! RMS error is below 1e-2.
//!
//! Inputs are rounded to bf16 first and the CPU reference gets the same values, so the
//! tolerances cover only the kernels' own roundings: P (and dS) as bf16 mma operands
//! and the bf16 outputs, each a relative 2^-9. For the backward the CPU output O is
//! rounded to bf16 and both sides get it and the CPU lse, isolating the backward kernel.
//! Tolerances: O atol 2e-2 + rtol 2e-2; lse atol 1e-3; dQ/dK/dV atol 1e-2·max|ref| +
//! rtol 2e-2 (gradients grow with the number of queries a key serves).
//!
//! The tests that always run check what can be checked without a device: the fatbin holds
//! the kernels, the shape/layout/decode validation rejects bad input with BadInput, and
//! the launcher's variant tables agree with the kernel file (template arguments and the
//! shared-memory formula, read from kernels/attention.cu).
//!
//! Every forward variant ([`attn::FWD_VARIANTS`]) runs the forward parity cases and every
//! backward variant the forward+backward ones, at the same tolerances.

mod common;

use common::{assert_kernels_registered, gpu, max_abs, rand_bf16, rng, to_f32};
use half::bf16;
use palign::backend::cpu::ops::{self as cpu, AttnShape, Packing};
use palign::backend::cuda::attention::{
    self as attn, AttnGradInputs, AttnGrads, BwdConfig, BwdVariant, DecodeBatch, DecodeSpec,
    FwdVariant, KvCacheView, SeqLayout, SeqSpec, BWD_VARIANTS, FWD_VARIANTS,
};
use palign::backend::cuda::attn_tune::{AttnTuner, TuneMode};
use palign::backend::cuda::tune::TuneCache;
use palign::backend::cuda::{self, DeviceBuffer, Gpu};

const KERNELS: &[&str] = &[
    "attention_fwd_bf16_d64",
    "attention_fwd_bf16_d128",
    "attention_bwd_prep_bf16",
    "attention_bwd_bf16_d64",
    "attention_bwd_bf16_d128",
    "attention_bwd_small_bf16_d128",
    "attention_bwd_dq_bf16",
    "attention_decode_bf16_d64",
    "attention_decode_bf16_d128",
    "attention_decode_combine_bf16",
];

// ---------------------------------------------------------------- always run

#[test]
fn fatbin_holds_the_attention_kernels() {
    assert_kernels_registered(KERNELS);
    let variants: Vec<&str> = FWD_VARIANTS
        .iter()
        .flat_map(|v| v.kernels)
        .chain(BWD_VARIANTS.iter().flat_map(|v| v.kernels).flatten())
        .collect();
    assert_kernels_registered(&variants);
    if !cuda::kernels_compiled() {
        eprintln!("kernels not compiled: {}", cuda::BUILD_NOTE);
    }
}

fn shape(h: usize, hkv: usize, d: usize, window: Option<usize>) -> AttnShape {
    AttnShape {
        n_heads: h,
        n_kv_heads: hkv,
        head_dim: d,
        window,
    }
}

fn assert_bad<T: std::fmt::Debug>(r: palign::Result<T>, needle: &str) {
    match r {
        Err(palign::Error::BadInput(msg)) => {
            assert!(msg.contains(needle), "message {msg:?} lacks {needle:?}")
        }
        other => panic!("expected BadInput containing {needle:?}, got {other:?}"),
    }
}

#[test]
fn shape_validation_rejects_what_the_kernels_cannot_do() {
    assert!(attn::check_shape(&shape(32, 8, 128, None)).is_ok());
    assert!(attn::check_shape(&shape(8, 1, 64, Some(4096))).is_ok());
    assert_bad(attn::check_shape(&shape(8, 2, 96, None)), "head_dim 96");
    assert_bad(attn::check_shape(&shape(8, 3, 64, None)), "not a multiple");
    assert_bad(attn::check_shape(&shape(8, 0, 64, None)), "not a multiple");
    assert_bad(attn::check_shape(&shape(8, 2, 64, Some(0))), "at least 1");
}

#[test]
fn layout_validation() {
    let p = SeqSpec::packed(&[0, 1, 38, 168, 425]).unwrap();
    assert_eq!((p.n_seqs(), p.n_rows(), p.max_len()), (4, 425, 257));
    let q = SeqSpec::padded(160, &[160, 37, 1]).unwrap();
    assert_eq!((q.n_seqs(), q.n_rows(), q.max_len()), (3, 480, 160));
    assert_bad(SeqSpec::packed(&[3, 5]), "start with 0");
    assert_bad(SeqSpec::packed(&[0, 5, 4]), "decrease");
    assert_bad(SeqSpec::packed(&[0]), "at least one sequence");
    assert_bad(SeqSpec::padded(16, &[3, 17]), "more than the padded length");
    assert_bad(SeqSpec::packed(&[0, 1 << 31]), "i32 row index");
}

#[test]
fn decode_validation() {
    // Two slots of a ring of 16 (window 16): 40 tokens stored, 16 visible.
    assert!(DecodeSpec::new(&[0, 16], &[40, 3], 16, Some(16), 32).is_ok());
    assert_bad(
        DecodeSpec::new(&[0], &[0], 16, None, 16),
        "at least the new one",
    );
    assert_bad(
        DecodeSpec::new(&[0, 16], &[40], 16, None, 32),
        "slot starts",
    );
    // Without a window, 40 positions do not fit a ring of 16.
    assert_bad(DecodeSpec::new(&[0], &[40], 16, None, 16), "ring holds 16");
    assert_bad(DecodeSpec::new(&[20], &[5], 16, None, 24), "runs past");
    assert_bad(DecodeSpec::new(&[0], &[5], 0, None, 24), "out of range");
    assert_bad(DecodeSpec::new(&[0], &[5], 8, Some(0), 24), "at least 1");
}

// ---------------------------------------------------------------- variant tables

/// kernels/attention.cu as compiled into the crate.
fn kernel_source() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/kernels/attention.cu");
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The parameter names of the template declared just before `decl` (`template <int D, ..>`).
fn template_params(src: &str, decl: &str) -> Vec<String> {
    let at = src
        .find(decl)
        .unwrap_or_else(|| panic!("{decl:?} not in attention.cu"));
    let t = src[..at]
        .rfind("template <")
        .expect("template before the declaration");
    let list = &src[t + "template <".len()..];
    let list = &list[..list.find('>').unwrap()];
    list.split(',')
        .map(|p| p.split_whitespace().last().unwrap().to_string())
        .collect()
}

/// The expression of the first `return ...;` after `decl`.
fn returned_expr(src: &str, decl: &str) -> String {
    let at = src
        .find(decl)
        .unwrap_or_else(|| panic!("{decl:?} not in attention.cu"));
    let r = at + src[at..].find("return ").unwrap() + "return ".len();
    src[r..r + src[r..].find(';').unwrap()].to_string()
}

/// Every `extern "C"` kernel whose body is `palign::attention::<func><ARGS>(p);`:
/// (kernel name, template arguments as integers, bools as 0/1).
fn instantiations(src: &str, func: &str) -> Vec<(String, Vec<i64>)> {
    let lines: Vec<&str> = src.lines().collect();
    let call = format!("palign::attention::{func}<");
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let Some(rest) = l.strip_prefix("extern \"C\" __global__ void ") else {
            continue;
        };
        // `__launch_bounds__(..) name(` : the name follows the qualifier.
        let rest = match rest.strip_prefix("__launch_bounds__(") {
            Some(r) => r[r.find(") ").expect("__launch_bounds__(..) name") + 2..].trim_start(),
            None => rest,
        };
        let Some(body) = lines.get(i + 1).map(|b| b.trim()) else {
            continue;
        };
        if let Some(args) = body.strip_prefix(call.as_str()) {
            let args = &args[..args.find('>').unwrap()];
            let vals = args
                .split(',')
                .map(|a| match a.trim() {
                    "true" => 1,
                    "false" => 0,
                    n => n
                        .parse()
                        .unwrap_or_else(|_| panic!("argument {n:?} of {rest}")),
                })
                .collect();
            out.push((rest[..rest.find('(').unwrap()].to_string(), vals));
        }
    }
    out
}

/// Evaluates an integer C expression of + - * / and parentheses over named values.
fn eval(expr: &str, vars: &[(String, i64)]) -> i64 {
    fn tokens(s: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut cur = String::new();
        for ch in s.chars() {
            if ch.is_alphanumeric() || ch == '_' {
                cur.push(ch);
            } else {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                if !ch.is_whitespace() {
                    out.push(ch.to_string());
                }
            }
        }
        if !cur.is_empty() {
            out.push(cur);
        }
        out
    }
    struct P<'a> {
        t: Vec<String>,
        i: usize,
        vars: &'a [(String, i64)],
    }
    impl P<'_> {
        fn peek(&self) -> Option<&str> {
            self.t.get(self.i).map(|s| s.as_str())
        }
        fn next(&mut self) -> String {
            self.i += 1;
            self.t[self.i - 1].clone()
        }
        fn expr(&mut self) -> i64 {
            let mut v = self.term();
            while let Some(op @ ("+" | "-")) = self.peek() {
                let add = op == "+";
                self.next();
                let r = self.term();
                v = if add { v + r } else { v - r };
            }
            v
        }
        fn term(&mut self) -> i64 {
            let mut v = self.factor();
            while let Some(op @ ("*" | "/")) = self.peek() {
                let mul = op == "*";
                self.next();
                let r = self.factor();
                v = if mul { v * r } else { v / r };
            }
            v
        }
        fn factor(&mut self) -> i64 {
            let t = self.next();
            if t == "(" {
                let v = self.expr();
                assert_eq!(self.next(), ")");
                return v;
            }
            t.parse().unwrap_or_else(|_| {
                self.vars
                    .iter()
                    .find(|(n, _)| *n == t)
                    .unwrap_or_else(|| panic!("unknown name {t:?}"))
                    .1
            })
        }
    }
    let mut p = P {
        t: tokens(expr),
        i: 0,
        vars,
    };
    let v = p.expr();
    assert_eq!(p.i, p.t.len(), "trailing tokens in {expr:?}");
    v
}

#[test]
fn expression_evaluator() {
    let vars = [("A".to_string(), 3), ("BM".to_string(), 64)];
    assert_eq!(eval("(2 * A + 4) * BM / 2 - 1", &vars), 319);
    assert_eq!(eval("2 * (16 * A + BM) * 4", &vars), 8 * 112);
}

/// Checks launcher rows (kernel, the template arguments it must have, the shared memory the
/// launcher gives it) against the `func<..>` instantiations and `smem_fn` of the kernel
/// file; returns the names of all `func<..>` kernels there.
fn check_table(
    src: &str,
    func: &str,
    smem_fn: &str,
    rows: &[(&str, Vec<i64>, usize)],
) -> Vec<String> {
    let params = template_params(src, &format!("__device__ void {func}("));
    let smem_params = template_params(src, &format!("constexpr int {smem_fn}()"));
    let formula = returned_expr(src, &format!("constexpr int {smem_fn}()"));
    let inst = instantiations(src, func);
    for (kernel, want, smem) in rows {
        let (_, args) = inst
            .iter()
            .find(|(n, _)| n == kernel)
            .unwrap_or_else(|| panic!("{kernel} is not a {func}<..> kernel in attention.cu"));
        assert_eq!(args, want, "{kernel}: template arguments {params:?}");
        let vars: Vec<(String, i64)> = params.iter().cloned().zip(args.iter().copied()).collect();
        assert!(smem_params.iter().all(|p| params.contains(p)));
        let kernel_smem = eval(&formula, &vars);
        assert_eq!(
            kernel_smem, *smem as i64,
            "{kernel}: {smem_fn} = {formula} gives {kernel_smem}, the launcher {smem}"
        );
    }
    inst.into_iter().map(|(n, _)| n).collect()
}

#[test]
fn variant_tables_match_the_kernels() {
    let src = kernel_source();
    let mut names: Vec<&str> = FWD_VARIANTS.iter().map(|v| v.name).collect();
    names.extend(BWD_VARIANTS.iter().map(|v| v.name));
    let n = names.len();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), n, "variant names are not unique");
    assert_eq!(FWD_VARIANTS[0].name, "w4m1n64s1");
    assert_eq!(FWD_VARIANTS[0].kernel(128), "attention_fwd_bf16_d128");
    assert_eq!(BWD_VARIANTS[0].kernel(128), Some("attention_bwd_bf16_d128"));

    let (mut rows, mut wg_rows) = (Vec::new(), Vec::new());
    for v in &FWD_VARIANTS {
        assert_eq!(attn::fwd_variant(v.name).unwrap(), v);
        if v.wgmma {
            let p = if v.overlap { "p" } else { "" };
            assert!(
                !v.overlap || v.stages == 3,
                "{}: OVL needs 3 stages",
                v.name
            );
            assert_eq!(
                v.name,
                format!("wg{}n{}s{}{p}", v.warps / 4, v.bn, v.stages)
            );
            assert!(v.warps % 4 == 0 && v.mt == 1 && !v.sm86, "{}", v.name);
        }
        assert!(
            v.wgmma || !v.overlap,
            "{}: only the wgmma forward overlaps",
            v.name
        );
        for d in [64, 128] {
            let want = if v.wgmma {
                vec![
                    d as i64,
                    v.warps as i64 / 4,
                    v.bn as i64,
                    v.stages as i64,
                    v.overlap as i64,
                ]
            } else {
                vec![
                    d as i64,
                    v.warps as i64,
                    v.mt as i64,
                    v.bn as i64,
                    v.stages as i64,
                ]
            };
            if v.wgmma {
                wg_rows.push((v.kernel(d), want, v.smem(d)));
            } else {
                rows.push((v.kernel(d), want, v.smem(d)));
            }
            assert!(v.smem(d) <= attn::SMEM_SM90, "{}: {} B", v.name, v.smem(d));
            if v.sm86 {
                assert!(v.smem(d) <= attn::SMEM_SM86, "{}: {} B", v.name, v.smem(d));
            }
        }
    }
    // The default forward runs without the shared-memory opt-in.
    assert!(FWD_VARIANTS[0].smem(128) <= 48 * 1024);
    let mut fwd_kernels = check_table(&src, "fwd", "fwd_smem_bytes", &rows);
    fwd_kernels.extend(check_table(
        &src,
        "fwd_wgmma",
        "fwd_wgmma_smem_bytes",
        &wg_rows,
    ));

    // bwd<D, WARPS, BM, STAGES, ASYNC> rows, and bwdg<D, WARPS, BM, STAGES> (always async) rows.
    let (mut rows, mut grid_rows, mut wg_rows) = (Vec::new(), Vec::new(), Vec::new());
    for v in &BWD_VARIANTS {
        assert_eq!(attn::bwd_variant(v.name).unwrap(), v);
        if v.wgmma {
            assert_eq!(v.name, format!("wg{}q{}s{}", v.warps / 4, v.bm, v.stages));
            assert!(v.warps % 4 == 0 && v.async_io && !v.warp_grid && !v.sm86);
            for d in [64, 128] {
                let Some(k) = v.kernel(d) else { continue };
                let want = vec![d as i64, v.warps as i64 / 4, v.bm as i64, v.stages as i64];
                wg_rows.push((k, want, v.smem(d)));
                assert!(v.smem(d) <= attn::SMEM_SM90, "{}: {} B", v.name, v.smem(d));
            }
            continue;
        }
        let suffix = match (v.warp_grid, v.async_io) {
            (true, _) => "g",
            (false, true) => "a",
            (false, false) => "",
        };
        assert_eq!(
            v.name,
            format!("w{}q{}s{}{suffix}", v.warps, v.bm, v.stages),
            "backward variant name"
        );
        assert!(
            !v.warp_grid || v.async_io,
            "{}: bwdg is always async",
            v.name
        );
        for d in [64, 128] {
            let Some(k) = v.kernel(d) else { continue };
            let mut want = vec![d as i64, v.warps as i64, v.bm as i64, v.stages as i64];
            if v.warp_grid {
                grid_rows.push((k, want, v.smem(d)));
            } else {
                want.push(v.async_io as i64);
                rows.push((k, want, v.smem(d)));
            }
            assert!(v.smem(d) <= attn::SMEM_SM90, "{}: {} B", v.name, v.smem(d));
            if v.sm86 {
                assert!(v.smem(d) <= attn::SMEM_SM86, "{}: {} B", v.name, v.smem(d));
            }
        }
    }
    let mut bwd_kernels = check_table(&src, "bwd", "bwd_smem_bytes", &rows);
    bwd_kernels.extend(check_table(&src, "bwdg", "bwdg_smem_bytes", &grid_rows));
    bwd_kernels.extend(check_table(
        &src,
        "bwd_wgmma",
        "bwd_wgmma_smem_bytes",
        &wg_rows,
    ));

    // No instantiation in the kernel file is missing from the tables.
    let listed: Vec<&str> = FWD_VARIANTS
        .iter()
        .flat_map(|v| v.kernels)
        .chain(BWD_VARIANTS.iter().flat_map(|v| v.kernels).flatten())
        .collect();
    for k in fwd_kernels.iter().chain(&bwd_kernels) {
        assert!(listed.contains(&k.as_str()), "{k} is in no variant table");
    }
    let mut uniq = listed.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), listed.len(), "a kernel is in two table rows");
}

// ---------------------------------------------------------------- helpers

fn round_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

/// Assert |got − want| <= atol + rtol·|want| and a relative RMS error < 1e-2 over the
/// elements where `mask` is true; print the PARITY line.
fn check(case: &str, got: &[f32], want: &[f32], mask: &[bool], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{case}: lengths");
    let (mut max_abs, mut worst, mut worst_i, mut se, mut sr, mut n) =
        (0.0f32, 0.0f32, 0usize, 0.0f64, 0.0f64, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if !mask[i] {
            continue;
        }
        n += 1;
        let err = if g == w { 0.0 } else { (g - w).abs() };
        let ratio = if err.is_nan() {
            f32::INFINITY
        } else {
            err / (atol + rtol * w.abs())
        };
        max_abs = max_abs.max(err);
        se += (err as f64).powi(2);
        sr += (w as f64).powi(2);
        if ratio > worst || ratio.is_infinite() {
            worst = ratio;
            worst_i = i;
        }
    }
    let rel_rms = (se / sr.max(1e-30)).sqrt();
    println!(
        "PARITY {case}: max_abs_err={max_abs:.3e} worst={worst:.3} rel_rms={rel_rms:.2e} (atol={atol:.2e} rtol={rtol:e} n={n})"
    );
    assert!(
        worst <= 1.0,
        "{case}: element {worst_i}: got {} want {} (atol {atol}, rtol {rtol})",
        got[worst_i],
        want[worst_i]
    );
    assert!(rel_rms < 1e-2, "{case}: relative RMS error {rel_rms:.3e}");
}

/// One parity case: sequences `lens`, packed (or right-padded to `padded` rows each).
struct Case {
    name: String,
    lens: Vec<usize>,
    shape: AttnShape,
    padded: Option<usize>,
    variant: BwdVariant,
    /// The forward kernel (`None`: what `attention_forward` picks).
    fwd: Option<&'static FwdVariant>,
    /// Check the forward only.
    fwd_only: bool,
    /// Run forward and backward through this tuner instead (`fwd`/`variant` unused).
    tuner: Option<&'static AttnTuner>,
    seed: u64,
}

impl Case {
    fn new(lens: &[usize], h: usize, hkv: usize, d: usize, window: Option<usize>) -> Case {
        let w = window.map_or("causal".to_string(), |w| format!("W={w}"));
        Case {
            name: format!("d{d} H{h}/{hkv} {w} lens {lens:?}"),
            lens: lens.to_vec(),
            shape: shape(h, hkv, d, window),
            padded: None,
            variant: BwdVariant::Auto,
            fwd: None,
            fwd_only: false,
            tuner: None,
            seed: 7 + lens.len() as u64 * 31 + d as u64 + h as u64 * 3 + window.unwrap_or(0) as u64,
        }
    }
}

/// Packed row of each (sequence, position) in the layout's row numbering.
fn row_map(c: &Case) -> Vec<usize> {
    let mut rows = Vec::new();
    for (b, &l) in c.lens.iter().enumerate() {
        let start = match c.padded {
            Some(t) => b * t,
            None => c.lens[..b].iter().sum(),
        };
        rows.extend(start..start + l);
    }
    rows
}

/// Scatter packed rows (`width` values each) into the layout's rows (zeros elsewhere).
fn scatter<T: Copy + Default>(packed: &[T], width: usize, rows: &[usize], n_rows: usize) -> Vec<T> {
    let mut out = vec![T::default(); n_rows * width];
    for (i, &r) in rows.iter().enumerate() {
        out[r * width..(r + 1) * width].copy_from_slice(&packed[i * width..(i + 1) * width]);
    }
    out
}

fn run_case(g: &Gpu, c: &Case) {
    let AttnShape {
        n_heads: h,
        n_kv_heads: hkv,
        head_dim: d,
        ..
    } = c.shape;
    let pack = Packing::from_lengths(&c.lens);
    let tokens = pack.n_tokens();
    let mut r = rng(c.seed);
    // Q with a larger range than K so that some rows have peaked softmaxes.
    let (qb, qf) = rand_bf16(&mut r, tokens * h * d, 2.0);
    let (kb, kf) = rand_bf16(&mut r, tokens * hkv * d, 1.0);
    let (vb, vf) = rand_bf16(&mut r, tokens * hkv * d, 1.0);
    let (dob, dof) = rand_bf16(&mut r, tokens * h * d, 1.0);

    // CPU reference, packed.
    let mut o = vec![0.0f32; tokens * h * d];
    let mut lse = vec![0.0f32; tokens * h];
    cpu::attention_forward(&qf, &kf, &vf, &pack, c.shape, &mut o, &mut lse);
    let ob = round_bf16(&o);
    let of = to_f32(&ob);
    let (mut dq, mut dk, mut dv) = (
        vec![0.0f32; tokens * h * d],
        vec![0.0f32; tokens * hkv * d],
        vec![0.0f32; tokens * hkv * d],
    );
    if !c.fwd_only {
        cpu::attention_backward(
            &qf, &kf, &vf, &of, &dof, &lse, &pack, c.shape, &mut dq, &mut dk, &mut dv,
        );
    }

    // The GPU side in the layout's rows.
    let (spec, rows) = match c.padded {
        Some(t) => (SeqSpec::padded(t, &c.lens).unwrap(), row_map(c)),
        None => (SeqSpec::packed(&pack.offsets).unwrap(), row_map(c)),
    };
    let n_rows = spec.n_rows();
    let layout = SeqLayout::new(g, &spec).unwrap();
    let up = |v: &[bf16], w: usize| g.upload(&scatter(v, w, &rows, n_rows)).unwrap();
    let (q, k, v) = (up(&qb, h * d), up(&kb, hkv * d), up(&vb, hkv * d));
    // Outputs start as garbage so that unwritten rows show.
    let junk = |n: usize| g.upload(&vec![bf16::from_f32(777.0); n]).unwrap();
    let mut out = junk(n_rows * h * d);
    let mut lse_gpu = g.upload(&vec![777.0f32; n_rows * h]).unwrap();
    match (c.fwd, c.tuner) {
        (_, Some(t)) => t
            .forward(g, &q, &k, &v, &layout, c.shape, &mut out, &mut lse_gpu)
            .map(|_| ()),
        (Some(fv), None) => attn::attention_forward_with(
            g,
            &q,
            &k,
            &v,
            &layout,
            c.shape,
            &mut out,
            &mut lse_gpu,
            fv,
        ),
        (None, None) => {
            attn::attention_forward(g, &q, &k, &v, &layout, c.shape, &mut out, &mut lse_gpu)
        }
    }
    .unwrap();

    let valid = |w: usize| -> Vec<bool> {
        let mut m = vec![false; n_rows * w];
        for &r in &rows {
            m[r * w..(r + 1) * w].fill(true);
        }
        m
    };
    let (mq, mkv, ml) = (valid(h * d), valid(hkv * d), valid(h));
    let want = |v: &[f32], w: usize| scatter(v, w, &rows, n_rows);
    let got_o = to_f32(&g.download(&out).unwrap());
    let got_lse = g.download(&lse_gpu).unwrap();
    check(
        &format!("{} fwd O", c.name),
        &got_o,
        &want(&o, h * d),
        &mq,
        2e-2,
        2e-2,
    );
    check(
        &format!("{} fwd lse", c.name),
        &got_lse,
        &want(&lse, h),
        &ml,
        1e-3,
        0.0,
    );
    assert_padding_zero(&c.name, "O", &got_o, &mq);
    assert_padding_zero(&c.name, "lse", &got_lse, &ml);
    if c.fwd_only {
        return;
    }

    // Backward from the CPU's O (bf16) and lse.
    let o_dev = up(&ob, h * d);
    let do_dev = up(&dob, h * d);
    let lse_dev = g.upload(&want(&lse, h)).unwrap();
    let (mut gq, mut gk, mut gv) = (
        junk(n_rows * h * d),
        junk(n_rows * hkv * d),
        junk(n_rows * hkv * d),
    );
    let inputs = AttnGradInputs {
        q: &q,
        k: &k,
        v: &v,
        o: &o_dev,
        d_o: &do_dev,
        lse: &lse_dev,
    };
    let grads = AttnGrads {
        dq: &mut gq,
        dk: &mut gk,
        dv: &mut gv,
    };
    match c.tuner {
        Some(t) => t.backward(g, inputs, &layout, c.shape, grads).map(|_| ()),
        None => attn::attention_backward_with(g, inputs, &layout, c.shape, grads, c.variant),
    }
    .unwrap();
    for (what, got, want_v, mask, w) in [
        ("dQ", &gq, &dq, &mq, h * d),
        ("dK", &gk, &dk, &mkv, hkv * d),
        ("dV", &gv, &dv, &mkv, hkv * d),
    ] {
        let got = to_f32(&g.download(got).unwrap());
        let atol = 1e-2 * max_abs(want_v).max(1e-3);
        check(
            &format!("{} bwd {what}", c.name),
            &got,
            &want(want_v, w),
            mask,
            atol,
            2e-2,
        );
        assert_padding_zero(&c.name, what, &got, mask);
    }
}

fn assert_padding_zero(case: &str, what: &str, got: &[f32], mask: &[bool]) {
    if let Some(i) = (0..got.len()).find(|&i| !mask[i] && got[i] != 0.0) {
        panic!("{case}: {what} padding element {i} is {} (want 0)", got[i]);
    }
}

// ---------------------------------------------------------------- kernels

/// Lengths that are not multiples of any tile (64/128 queries, 64/128 keys), one of length 1.
const ODD: &[usize] = &[1, 37, 130, 257];

/// The parity cases of the tests below, in order; the variant tests run them all.
fn kernel_cases() -> Vec<Case> {
    let mut padded = Case::new(&[160, 37, 1], 4, 1, 128, Some(100));
    padded.padded = Some(160);
    padded.name = format!("{} padded to 160", padded.name);
    vec![
        Case::new(ODD, 8, 2, 128, None),
        Case::new(ODD, 8, 1, 128, Some(16)),
        Case::new(ODD, 8, 2, 64, Some(100)),
        Case::new(&[300, 5], 16, 2, 64, None),
        // 1100 tokens, window 256: most KV tiles are outside every query tile's window.
        Case::new(&[1100, 70], 4, 1, 128, Some(256)),
        padded,
    ]
}

fn run_kernel_case(i: usize) {
    run_case(&gpu(), &kernel_cases().swap_remove(i));
}

#[test]
#[ignore = "needs a CUDA device"]
fn forward_backward_d128_gqa4_causal() {
    run_kernel_case(0);
}

#[test]
#[ignore = "needs a CUDA device"]
fn forward_backward_d128_gqa8_window16() {
    run_kernel_case(1);
}

#[test]
#[ignore = "needs a CUDA device"]
fn forward_backward_d64_gqa4_window100() {
    run_kernel_case(2);
}

#[test]
#[ignore = "needs a CUDA device"]
fn forward_backward_d64_gqa8_causal() {
    run_kernel_case(3);
}

#[test]
#[ignore = "needs a CUDA device"]
fn forward_backward_long_window_skips_tiles() {
    run_kernel_case(4);
}

#[test]
#[ignore = "needs a CUDA device"]
fn forward_backward_right_padded_batch() {
    run_kernel_case(5);
}

/// Every parity case through forward variant `v` alone.
fn fwd_variant_cases(g: &Gpu, v: &'static FwdVariant) {
    for mut c in kernel_cases() {
        c.name = format!("{} fwd={}", c.name, v.name);
        c.fwd = Some(v);
        c.fwd_only = true;
        run_case(g, &c);
    }
}

/// Every parity case (with a kernel for its head dim) through backward variant `v`, after
/// the default forward.
fn bwd_variant_cases(g: &Gpu, v: &'static BwdConfig) {
    for mut c in kernel_cases() {
        if v.kernel(c.shape.head_dim).is_none() {
            continue;
        }
        c.name = format!("{} bwd={}", c.name, v.name);
        c.fwd = Some(&FWD_VARIANTS[0]); // the forward is not under test here
        c.variant = BwdVariant::Named(v);
        run_case(g, &c);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn forward_variants_match_cpu() {
    let g = gpu();
    for v in FWD_VARIANTS.iter().filter(|v| !v.wgmma) {
        fwd_variant_cases(&g, v);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn backward_variants_match_cpu() {
    let g = gpu();
    for v in BWD_VARIANTS.iter().filter(|v| !v.wgmma) {
        bwd_variant_cases(&g, v);
    }
}

/// The sm_90a wgmma variants (forward and backward) on the parity cases, in a test of their
/// own that runs last (tests run in name order): a kernel not yet verified on a GPU that
/// faults cannot take the other variants' results with it. Elsewhere the launchers must
/// refuse them.
#[test]
#[ignore = "needs a CUDA device"]
fn wgmma_variants_match_cpu() {
    let g = gpu();
    for v in FWD_VARIANTS.iter().filter(|v| v.wgmma) {
        if !v.runs_on(&g) {
            // Said, not silently passed: the wgmma forwards need an sm_90a GPU, and the
            // launcher refuses them elsewhere (a stub kernel would trap).
            let layout = SeqLayout::new(&g, &SeqSpec::packed(&[0, 4]).unwrap()).unwrap();
            let z = g.upload(&vec![bf16::ZERO; 4 * 8 * 64]).unwrap();
            let mut out = g.upload(&vec![bf16::ZERO; 4 * 8 * 64]).unwrap();
            let mut lse = g.upload(&[0.0f32; 4 * 8]).unwrap();
            let e = attn::attention_forward_with(
                &g,
                &z,
                &z,
                &z,
                &layout,
                shape(8, 8, 64, None),
                &mut out,
                &mut lse,
                v,
            )
            .unwrap_err();
            assert!(e.to_string().contains("sm_90a"), "{e}");
            println!("SKIPPED fwd={}: not runnable on {} ({e})", v.name, g.name());
            continue;
        }
        fwd_variant_cases(&g, v);
    }
    for v in BWD_VARIANTS.iter().filter(|v| v.wgmma) {
        if !v.runs_on(&g) {
            // Said, not silently passed: the wgmma backward needs an sm_90a GPU, and the
            // launcher refuses it elsewhere (a stub kernel would trap).
            let layout = SeqLayout::new(&g, &SeqSpec::packed(&[0, 4]).unwrap()).unwrap();
            let z = g.upload(&vec![bf16::ZERO; 4 * 8 * 128]).unwrap();
            let lse = g.upload(&[0.0f32; 4 * 8]).unwrap();
            let mut dq = g.upload(&vec![bf16::ZERO; 4 * 8 * 128]).unwrap();
            let mut dk = g.upload(&vec![bf16::ZERO; 4 * 8 * 128]).unwrap();
            let mut dv = g.upload(&vec![bf16::ZERO; 4 * 8 * 128]).unwrap();
            let x = AttnGradInputs {
                q: &z,
                k: &z,
                v: &z,
                o: &z,
                d_o: &z,
                lse: &lse,
            };
            let grads = AttnGrads {
                dq: &mut dq,
                dk: &mut dk,
                dv: &mut dv,
            };
            let e = attn::attention_backward_with(
                &g,
                x,
                &layout,
                shape(8, 8, 128, None),
                grads,
                BwdVariant::Named(v),
            )
            .unwrap_err();
            assert!(e.to_string().contains("sm_90a"), "{e}");
            println!("SKIPPED bwd={}: not runnable on {} ({e})", v.name, g.name());
            continue;
        }
        bwd_variant_cases(&g, v);
    }
}

/// The tuner over every variant (`PALIGN_ATTN_TUNE=all`) on the parity cases: what it
/// runs matches the CPU, each shape is measured once (an entry per pass and shape, kept
/// on the second run), and the choices name variants that were timed, not rejected.
#[test]
#[ignore = "needs a CUDA device"]
fn the_tuner_measures_once_and_its_choice_matches_cpu() {
    let g = gpu();
    let tuner: &'static AttnTuner = Box::leak(Box::new(AttnTuner::new(
        TuneCache::in_memory(g.name()),
        TuneMode::All,
    )));
    let mut first = Vec::new();
    for round in 0..2 {
        for mut c in kernel_cases() {
            c.name = format!("{} tuned (round {round})", c.name);
            c.tuner = Some(tuner);
            run_case(&g, &c);
        }
        let summary = tuner.summary();
        for line in &summary {
            println!("TUNED round {round}: {line}");
        }
        // Fwd and bwd per distinct (d, heads, window, length bucket) of the six cases,
        // except where only one candidate fits (nothing to measure).
        assert!(summary.len() >= 6, "{summary:?}");
        // The second round reads the first round's measurements (a new measurement would
        // show other times).
        if round == 0 {
            first = summary;
        } else {
            assert_eq!(summary, first);
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn backward_small_smem_kernel() {
    for window in [None, Some(16)] {
        let mut c = Case::new(ODD, 8, 2, 128, window);
        c.variant = BwdVariant::Small;
        c.name = format!("{} small-bwd", c.name);
        run_case(&gpu(), &c);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn decode_matches_the_last_row_of_the_forward() {
    let g = gpu();
    for (d, h, hkv, window) in [
        (128, 8, 2, None),
        (128, 8, 1, Some(100)),
        (64, 16, 2, Some(16)),
        (128, 32, 2, None), // group 16: two head chunks per KV head
    ] {
        let sh = shape(h, hkv, d, window);
        let lens = [1usize, 37, 130, 257, 1100];
        let pack = Packing::from_lengths(&lens);
        let tokens = pack.n_tokens();
        let mut r = rng(99 + d as u64 + h as u64);
        let (qb, qf) = rand_bf16(&mut r, tokens * h * d, 2.0);
        let (kb, kf) = rand_bf16(&mut r, tokens * hkv * d, 1.0);
        let (vb, vf) = rand_bf16(&mut r, tokens * hkv * d, 1.0);
        let mut o = vec![0.0f32; tokens * h * d];
        let mut lse = vec![0.0f32; tokens * h];
        cpu::attention_forward(&qf, &kf, &vf, &pack, sh, &mut o, &mut lse);

        // A ring per sequence as KvCache keeps it: capacity W (or the longest sequence),
        // position p in row slot·cap + p % cap.
        let cap = window.unwrap_or(*lens.iter().max().unwrap());
        let kw = hkv * d;
        let (mut kc, mut vc) = (
            vec![bf16::ZERO; lens.len() * cap * kw],
            vec![bf16::ZERO; lens.len() * cap * kw],
        );
        let (mut qd, mut want) = (Vec::new(), Vec::new());
        for (s, &l) in lens.iter().enumerate() {
            let r0 = pack.offsets[s];
            for p in 0..l {
                let row = s * cap + p % cap;
                kc[row * kw..(row + 1) * kw].copy_from_slice(&kb[(r0 + p) * kw..(r0 + p + 1) * kw]);
                vc[row * kw..(row + 1) * kw].copy_from_slice(&vb[(r0 + p) * kw..(r0 + p + 1) * kw]);
            }
            let last = r0 + l - 1;
            qd.extend_from_slice(&qb[last * h * d..(last + 1) * h * d]);
            want.extend_from_slice(&o[last * h * d..(last + 1) * h * d]);
        }
        let starts: Vec<usize> = (0..lens.len()).map(|s| s * cap).collect();
        let spec = DecodeSpec::new(&starts, &lens, cap, window, lens.len() * cap).unwrap();
        let batch = DecodeBatch::new(&g, &spec).unwrap();
        let (q, k, v) = (
            g.upload(&qd).unwrap(),
            g.upload(&kc).unwrap(),
            g.upload(&vc).unwrap(),
        );
        // The CPU decode on the same rings agrees with the forward's last rows too.
        let visible: Vec<usize> = lens.iter().map(|&l| l.min(cap)).collect();
        let mut cpu_dec = vec![0.0f32; lens.len() * h * d];
        cpu::attention_decode(
            &to_f32(&qd),
            &to_f32(&kc),
            &to_f32(&vc),
            &starts,
            &visible,
            sh,
            &mut cpu_dec,
        );
        let mask = vec![true; want.len()];
        check(
            &format!("decode cpu-vs-forward d{d} H{h}/{hkv} W={window:?}"),
            &cpu_dec,
            &want,
            &mask,
            1e-4,
            1e-4,
        );
        for splits in [None, Some(1), Some(5)] {
            let mut out: DeviceBuffer<bf16> = g.alloc(lens.len() * h * d).unwrap();
            attn::attention_decode_with(
                &g,
                &q,
                KvCacheView { k: &k, v: &v },
                &batch,
                sh,
                &mut out,
                splits,
            )
            .unwrap();
            check(
                &format!("decode d{d} H{h}/{hkv} W={window:?} splits={splits:?}"),
                &to_f32(&g.download(&out).unwrap()),
                &want,
                &mask,
                2e-2,
                2e-2,
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn launchers_reject_short_buffers_and_mismatches() {
    let g = gpu();
    let sh = shape(4, 1, 64, None);
    let layout = SeqLayout::packed(&g, &[0, 10, 30]).unwrap();
    let q = g.zeros::<bf16>(30 * 4 * 64).unwrap();
    let kv = g.zeros::<bf16>(30 * 64).unwrap();
    let short = g.zeros::<bf16>(29 * 64).unwrap();
    let mut out = g.zeros::<bf16>(30 * 4 * 64).unwrap();
    let mut lse = g.zeros::<f32>(30 * 4).unwrap();
    assert_bad(
        attn::attention_forward(&g, &q, &short, &kv, &layout, sh, &mut out, &mut lse),
        "attention k",
    );
    assert_bad(
        attn::attention_forward(
            &g,
            &q,
            &kv,
            &kv,
            &layout,
            shape(4, 1, 80, None),
            &mut out,
            &mut lse,
        ),
        "head_dim 80",
    );
    let mut short_lse = g.zeros::<f32>(30 * 4 - 1).unwrap();
    assert_bad(
        attn::attention_forward(&g, &q, &kv, &kv, &layout, sh, &mut out, &mut short_lse),
        "attention lse",
    );
    let (mut dq, mut dk, mut dv) = (
        g.zeros::<bf16>(30 * 4 * 64).unwrap(),
        g.zeros::<bf16>(30 * 64).unwrap(),
        g.zeros::<bf16>(30 * 64).unwrap(),
    );
    let r = attn::attention_backward_with(
        &g,
        AttnGradInputs {
            q: &q,
            k: &kv,
            v: &kv,
            o: &out,
            d_o: &out,
            lse: &lse,
        },
        &layout,
        sh,
        AttnGrads {
            dq: &mut dq,
            dk: &mut dk,
            dv: &mut dv,
        },
        BwdVariant::Small,
    );
    assert_bad(r, "head_dim 128");
    let spec = DecodeSpec::new(&[0, 16], &[3, 5], 16, Some(16), 32).unwrap();
    let batch = DecodeBatch::new(&g, &spec).unwrap();
    let cache = g.zeros::<bf16>(32 * 64).unwrap();
    let qd = g.zeros::<bf16>(2 * 4 * 64).unwrap();
    let mut od = g.zeros::<bf16>(2 * 4 * 64).unwrap();
    let view = || KvCacheView {
        k: &cache,
        v: &cache,
    };
    assert_bad(
        attn::attention_decode(&g, &qd, view(), &batch, sh, &mut od),
        "window",
    );
    assert!(
        attn::attention_decode(&g, &qd, view(), &batch, shape(4, 1, 64, Some(16)), &mut od).is_ok()
    );
    assert_bad(
        attn::attention_decode_with(
            &g,
            &qd,
            view(),
            &batch,
            shape(4, 1, 64, Some(16)),
            &mut od,
            Some(0),
        ),
        "split",
    );
}

/// Shared prefixes (`palign::packing`) through the ops the model calls: the device
/// gathers q/k/v into the expanded layout, runs the flash kernels there and folds dK/dV
/// of each prefix over its branches; against the same ops on the CPU. Head dim 128,
/// GQA 4:1, causal and with a window (of positions, so a branch's window reaches back
/// into its prefix); groups of two and three branches and a plain sequence.
/// End to end, unlike the kernel cases above: each side's backward takes its own
/// forward's O (bf16 on the device) and lse, so the gradients are held to atol
/// 2e-2·max|ref| and rtol 3e-2 rather than 1e-2·max and 2e-2; the lse (expanded layout
/// on both sides) to the kernel cases' 1e-3.
#[test]
#[ignore = "needs a CUDA device"]
fn shared_prefixes_through_ops_match_cpu() {
    use palign::ops::{self, Group};
    use palign::tensor::Tensor;
    let _g = gpu();
    let groups = [
        Group {
            prefix: 200,
            branches: vec![150, 90],
        },
        Group {
            prefix: 0,
            branches: vec![130],
        },
        Group {
            prefix: 64,
            branches: vec![70, 33, 120],
        },
    ];
    let pack = Packing::with_prefixes(&groups);
    let t = pack.n_tokens();
    for window in [None, Some(100)] {
        let sh = shape(8, 2, 128, window);
        let mut r = rng(41 + window.unwrap_or(0) as u64);
        let (_, q) = rand_bf16(&mut r, t * 8 * 128, 1.0);
        let (_, k) = rand_bf16(&mut r, t * 2 * 128, 1.0);
        let (_, v) = rand_bf16(&mut r, t * 2 * 128, 1.0);
        let (_, d_o) = rand_bf16(&mut r, t * 8 * 128, 1.0);
        let host = |x: &[f32], w: usize| Tensor::from_vec(x.to_vec(), &[t, w]);
        let dev = |x: &[f32], w: usize| host(x, w).to_cuda_bf16().unwrap();
        let (o, lse) =
            ops::attention(&host(&q, 1024), &host(&k, 256), &host(&v, 256), &pack, sh).unwrap();
        let (dq, dk, dv) = ops::attention_backward(
            &host(&q, 1024),
            &host(&k, 256),
            &host(&v, 256),
            &o,
            &host(&d_o, 1024),
            &lse,
            &pack,
            sh,
        )
        .unwrap();
        let dpack = pack.clone(); // its own device layout cache
        let (od, lsed) =
            ops::attention(&dev(&q, 1024), &dev(&k, 256), &dev(&v, 256), &dpack, sh).unwrap();
        let (dqd, dkd, dvd) = ops::attention_backward(
            &dev(&q, 1024),
            &dev(&k, 256),
            &dev(&v, 256),
            &od,
            &dev(&d_o, 1024),
            &lsed,
            &dpack,
            sh,
        )
        .unwrap();
        let w = window.map_or("causal".into(), |w| format!("W={w}"));
        let host_of = |x: &Tensor| ops::to_host(x).unwrap();
        let all = |n: usize| vec![true; n];
        check(
            &format!("shared prefixes {w} O"),
            &host_of(&od),
            o.cpu(),
            &all(o.numel()),
            2e-2,
            2e-2,
        );
        check(
            &format!("shared prefixes {w} lse"),
            &host_of(&lsed),
            lse.cpu(),
            &all(lse.numel()),
            1e-3,
            0.0,
        );
        for (name, got, want) in [("dQ", &dqd, &dq), ("dK", &dkd, &dk), ("dV", &dvd, &dv)] {
            let scale = max_abs(want.cpu());
            check(
                &format!("shared prefixes {w} {name}"),
                &host_of(got),
                want.cpu(),
                &all(want.numel()),
                2e-2 * scale,
                3e-2,
            );
        }
    }
}
