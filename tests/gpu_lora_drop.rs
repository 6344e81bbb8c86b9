//! LoRA factors with in-kernel dropout (kernels/lora_drop.cu, src/backend/cuda/lora_drop.rs)
//! against a CPU reference computed from the same bf16 inputs with
//! `cpu::rng::dropout_keep`:
//!
//! ```text
//! xa_i   = bf16( drop_i(X)·A_iᵀ )                      drop_i(X)[e] = keep ? bf16(x·scale_i) : 0
//! dA_i  += alpha · dyb_iᵀ · drop_i(X)                  (f32)
//! dX     = bf16( dX + Σ_i alpha·scale_i·mask_i ∘ (dyb_i·A_i) )
//! ```
//!
//! GPU tests are `#[ignore = "needs a CUDA device"]` (tools/gpu-check.sh runs them with
//! `--ignored`); each prints `PARITY <case>: ...` (worst = the largest
//! err / (atol + rtol·|ref|), which must be <= 1). The reference sums in f64. Tolerances:
//! - xa and dX (bf16 outputs): rtol = 2^-8 (one round-to-nearest-even is <= 2^-9 of the
//!   value), atol = 1e-3·rms(ref). The kernels sum n <= 14336 exact bf16 products in f32:
//!   ~2^-24·sqrt(n)·rms(ref) <= 1e-5·rms(ref), a 100x margin. A wrong mask moves about
//!   p·n terms (>= 20% of rms(ref) at p = 0.05), a missing 1/(1-p) 5% of every value.
//! - dA (f32): atol = 1e-3·rms(alpha·dybᵀ·drop(X)), rtol = 1e-4 (the f32 sum over up to
//!   8229 rows in split partials, then one multiply-add into dA). A wrong mask moves dA
//!   by ~sqrt(2p) ≈ 30% of that rms.
//! - fused vs today's unfused path (dropout_bf16 + cuBLAS (+ axpy for dX)), all on the
//!   device: the unfused path rounds drop(X) or dY·B·A to bf16 and dX three times, so
//!   rtol = 2^-6, atol = 4e-3·rms.
//!
//! Large shapes check a subset of rows (xa, dX) or columns (dA), always including the
//! first and the last ones, to keep the f64 reference within seconds.
//!
//! The tests that always run check what needs no GPU: kernel names, the device mask's
//! split 32-bit form (its host mirror) against `dropout_keep`, the integer threshold,
//! the launch plan and row splits, and the reference against a naive computation that
//! materialises the mask with `ops::dropout` (the CPU model's path).

mod common;

use common::{assert_kernels_registered, check, check_scaled, gpu, is_bad_input, ok, rms, rng};
use half::bf16;
use palign::backend::cpu::rng as prng;
use palign::backend::cuda::lora_drop::{self, DropHead};
use palign::backend::cuda::{blas, elementwise as ew, DeviceBuffer, Gpu};
use palign::ops::{self, DropMask};
use palign::tensor::Tensor;
use rand::Rng;
use rayon::prelude::*;
use std::ops::Range;

// ---------------------------------------------------------------- inputs and reference

struct HeadIn {
    rank: usize,
    p: f32,
    stream: u64,
    a: Vec<f32>, // [rank, k], bf16 values
    a_b: Vec<bf16>,
    dyb: Vec<f32>, // [m, rank], bf16 values
    dyb_b: Vec<bf16>,
    g0: Vec<f32>, // [rank, k]: the gradient before the call (f32)
}

struct Inputs {
    m: usize,
    k: usize,
    x: Vec<f32>, // [m, k], bf16 values (X for down/grad_a, dX0 for dx_acc)
    x_b: Vec<bf16>,
    heads: Vec<HeadIn>,
}

/// x, dyb uniform in ±1 and ±d, A in ±0.05, with d = 18/(alpha·sqrt(r)) so that each
/// head's alpha·dyb·A has rms ≈ 0.3, comparable to x (the dX update must be visible).
fn inputs(seed: u64, m: usize, k: usize, spec: &[(usize, f32)], alpha: f32) -> Inputs {
    let mut r = rng(seed);
    let (x_b, x) = common::rand_bf16(&mut r, m * k, 1.0);
    let heads = spec
        .iter()
        .enumerate()
        .map(|(i, &(rank, p))| {
            let (a_b, a) = common::rand_bf16(&mut r, rank * k, 0.05);
            let d = 18.0 / (alpha * (rank as f32).sqrt());
            let (dyb_b, dyb) = common::rand_bf16(&mut r, m * rank, d);
            let g0 = (0..rank * k)
                .map(|_| r.random_range(-1.0f32..1.0))
                .collect();
            HeadIn {
                rank,
                p,
                stream: prng::dropout_stream(seed, 7, i as u64),
                a,
                a_b,
                dyb,
                dyb_b,
                g0,
            }
        })
        .collect();
    Inputs {
        m,
        k,
        x,
        x_b,
        heads,
    }
}

/// drop(X)[e] as the kernels (and dropout_bf16) use it: bf16(x·scale) if kept, else 0.
fn dropped(x: f32, stream: u64, e: u64, p: f32) -> f32 {
    let scale = 1.0f32 / (1.0 - p);
    if prng::dropout_keep(stream, e, p) {
        bf16::from_f32(x * scale).to_f32()
    } else {
        0.0
    }
}

/// Per head, `drop(X)·Aᵀ` for the given rows: `[rows.len(), rank]`.
fn ref_down(inp: &Inputs, rows: &[usize]) -> Vec<Vec<f64>> {
    let k = inp.k;
    inp.heads
        .iter()
        .map(|h| {
            rows.par_iter()
                .flat_map_iter(|&row| {
                    let xd: Vec<f32> = (0..k)
                        .map(|c| dropped(inp.x[row * k + c], h.stream, (row * k + c) as u64, h.p))
                        .collect();
                    (0..h.rank).map(move |j| {
                        let a = &h.a[j * k..(j + 1) * k];
                        xd.iter()
                            .zip(a)
                            .map(|(&u, &v)| u as f64 * v as f64)
                            .sum::<f64>()
                    })
                })
                .collect()
        })
        .collect()
}

/// Per head, `alpha·dybᵀ·drop(X)` for the given columns: `[rank, cols.len()]` (without g0).
fn ref_grad_a(inp: &Inputs, cols: &[usize], alpha: f32) -> Vec<Vec<f64>> {
    let (m, k) = (inp.m, inp.k);
    inp.heads
        .iter()
        .map(|h| {
            let r = h.rank;
            // Column-major [cols][rank] from the parallel loop, then transposed.
            let by_col: Vec<Vec<f64>> = cols
                .par_iter()
                .map(|&c| {
                    let mut acc = vec![0.0f64; r];
                    for row in 0..m {
                        let xd = dropped(inp.x[row * k + c], h.stream, (row * k + c) as u64, h.p);
                        if xd == 0.0 {
                            continue;
                        }
                        for (j, a) in acc.iter_mut().enumerate() {
                            *a += h.dyb[row * r + j] as f64 * xd as f64;
                        }
                    }
                    acc.iter().map(|&v| alpha as f64 * v).collect()
                })
                .collect();
            let mut out = vec![0.0f64; r * cols.len()];
            for (ci, col) in by_col.iter().enumerate() {
                for j in 0..r {
                    out[j * cols.len() + ci] = col[j];
                }
            }
            out
        })
        .collect()
}

/// `dX0 + Σ_i alpha·scale_i·mask_i ∘ (dyb_i·A_i)` for the given rows: `[rows.len(), k]`,
/// and the update alone (for its rms).
/// dX0 + the heads' update at the selected rows, the update alone, and Σ over
/// `launches` of |dX after that launch|: each launch rounds dX to bf16 once, so that sum
/// (not |final dX|) bounds the rounding error when heads are split over launches.
fn ref_dx(
    inp: &Inputs,
    rows: &[usize],
    alpha: f32,
    launches: &[Range<usize>],
) -> (Vec<f64>, Vec<f64>, Vec<f32>) {
    let k = inp.k;
    let per_head: Vec<Vec<f64>> = rows
        .par_iter()
        .flat_map_iter(|&row| {
            (0..k).map(move |c| {
                let e = (row * k + c) as u64;
                inp.heads
                    .iter()
                    .map(|h| {
                        if !prng::dropout_keep(h.stream, e, h.p) {
                            return 0.0;
                        }
                        let scale = (1.0f32 / (1.0 - h.p)) as f64;
                        let t: f64 = (0..h.rank)
                            .map(|j| h.dyb[row * h.rank + j] as f64 * h.a[j * k + c] as f64)
                            .sum();
                        alpha as f64 * scale * t
                    })
                    .collect()
            })
        })
        .collect();
    let x0 = rows
        .iter()
        .flat_map(|&row| inp.x[row * k..(row + 1) * k].iter());
    let (mut full, mut upd, mut bound) = (Vec::new(), Vec::new(), Vec::new());
    for (u, &x) in per_head.iter().zip(x0) {
        let mut v = x as f64;
        let mut b = 0.0;
        for l in launches {
            v += u[l.clone()].iter().sum::<f64>();
            b += v.abs();
        }
        full.push(v);
        upd.push(u.iter().sum());
        bound.push(b as f32);
    }
    (full, upd, bound)
}

fn f32v(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// All of 0..n when small, else every `step`-th plus the first and last 40.
fn subset(n: usize, limit: usize, step: usize) -> Vec<usize> {
    if n <= limit {
        return (0..n).collect();
    }
    (0..n)
        .filter(|&i| i < 40 || i + 40 >= n || i % step == 0)
        .collect()
}

// ---------------------------------------------------------------- device runs

struct Dev {
    x: DeviceBuffer<bf16>,
    a: Vec<DeviceBuffer<bf16>>,
    dyb: Vec<DeviceBuffer<bf16>>,
}

fn upload(g: &Gpu, inp: &Inputs) -> Dev {
    Dev {
        x: ok(g.upload(&inp.x_b)),
        a: inp.heads.iter().map(|h| ok(g.upload(&h.a_b))).collect(),
        dyb: inp.heads.iter().map(|h| ok(g.upload(&h.dyb_b))).collect(),
    }
}

fn drop_heads<'a>(inp: &Inputs, d: &'a Dev) -> Vec<DropHead<'a>> {
    inp.heads
        .iter()
        .zip(&d.a)
        .map(|(h, a)| DropHead {
            a,
            rank: h.rank,
            stream: h.stream,
            p: h.p,
        })
        .collect()
}

fn down_dev(g: &Gpu, inp: &Inputs, d: &Dev) -> Vec<Vec<f32>> {
    let heads = drop_heads(inp, d);
    let mut outs: Vec<DeviceBuffer<bf16>> = inp
        .heads
        .iter()
        .map(|h| ok(g.alloc::<bf16>(inp.m * h.rank)))
        .collect();
    let mut refs: Vec<&mut DeviceBuffer<bf16>> = outs.iter_mut().collect();
    ok(lora_drop::lora_down(
        g, &d.x, inp.m, inp.k, &heads, &mut refs,
    ));
    outs.iter()
        .map(|o| common::to_f32(&ok(g.download(o))))
        .collect()
}

fn grad_a_dev(g: &Gpu, inp: &Inputs, d: &Dev, alpha: f32) -> Vec<Vec<f32>> {
    let heads = drop_heads(inp, d);
    let mut grads: Vec<DeviceBuffer<f32>> = inp.heads.iter().map(|h| ok(g.upload(&h.g0))).collect();
    let mut refs: Vec<&mut DeviceBuffer<f32>> = grads.iter_mut().collect();
    let dybs: Vec<&DeviceBuffer<bf16>> = d.dyb.iter().collect();
    ok(lora_drop::lora_grad_a(
        g, &d.x, inp.m, inp.k, &heads, &dybs, alpha, &mut refs,
    ));
    grads.iter().map(|o| ok(g.download(o))).collect()
}

/// dX0 = the inputs' x.
fn dx_dev(g: &Gpu, inp: &Inputs, d: &Dev, alpha: f32) -> Vec<f32> {
    let heads = drop_heads(inp, d);
    let mut dx = ok(g.upload(&inp.x_b));
    let dybs: Vec<&DeviceBuffer<bf16>> = d.dyb.iter().collect();
    ok(lora_drop::lora_dx_acc(
        g, &mut dx, inp.m, inp.k, &heads, &dybs, alpha,
    ));
    common::to_f32(&ok(g.download(&dx)))
}

const BF16_RTOL: f32 = 1.0 / 256.0;
const BF16_ATOL: f32 = 1e-3;
const GRAD_ATOL: f32 = 1e-3;
const GRAD_RTOL: f32 = 1e-4;

/// Runs the three kernels on one case and checks each against the reference.
fn parity(g: &Gpu, name: &str, inp: &Inputs, alpha: f32) {
    let (m, k) = (inp.m, inp.k);
    let d = upload(g, inp);
    let rows = subset(m, 2048, 7);
    let cols = subset(k, 4096, 29);

    let got = down_dev(g, inp, &d);
    let want = ref_down(inp, &rows);
    for (i, h) in inp.heads.iter().enumerate() {
        let w = f32v(&want[i]);
        let sel: Vec<f32> = rows
            .iter()
            .flat_map(|&row| got[i][row * h.rank..(row + 1) * h.rank].iter().copied())
            .collect();
        let case = format!("{name} down head{i} r={} p={}", h.rank, h.p);
        check(&case, &sel, &w, BF16_ATOL * rms(&w), BF16_RTOL);
    }

    let got = grad_a_dev(g, inp, &d, alpha);
    let upd = ref_grad_a(inp, &cols, alpha);
    for (i, h) in inp.heads.iter().enumerate() {
        let n = cols.len();
        let mut sel = Vec::with_capacity(h.rank * n);
        let mut w = Vec::with_capacity(h.rank * n);
        for j in 0..h.rank {
            for (ci, &c) in cols.iter().enumerate() {
                sel.push(got[i][j * k + c]);
                w.push((h.g0[j * k + c] as f64 + upd[i][j * n + ci]) as f32);
            }
        }
        let case = format!("{name} grad_a head{i} r={} p={}", h.rank, h.p);
        check(&case, &sel, &w, GRAD_ATOL * rms(&f32v(&upd[i])), GRAD_RTOL);
    }

    let got = dx_dev(g, inp, &d, alpha);
    let ranks: Vec<usize> = inp.heads.iter().map(|h| h.rank).collect();
    let launches = ok(lora_drop::dx_acc_launches(g, &ranks));
    let (want, upd, bound) = ref_dx(inp, &rows, alpha, &launches);
    let sel: Vec<f32> = rows
        .iter()
        .flat_map(|&row| got[row * k..(row + 1) * k].iter().copied())
        .collect();
    let w = f32v(&want);
    let u = rms(&f32v(&upd));
    assert!(
        u > 0.2 * rms(&w),
        "{name}: the update must be visible in dX"
    );
    check_scaled(
        &format!("{name} dx_acc ({} launches)", launches.len()),
        &sel,
        &w,
        BF16_ATOL * rms(&w),
        BF16_RTOL,
        &bound,
    );
}

// ---------------------------------------------------------------- always run

#[test]
fn lora_drop_kernels_are_registered_and_in_the_fatbin() {
    assert_kernels_registered(lora_drop::KERNELS);
}

#[test]
fn threshold_is_the_integer_form_of_u_ge_p() {
    let mut r = rng(1);
    let mut ps = vec![
        0.0f32,
        1e-9,
        0.05,
        0.1,
        0.5,
        0.999,
        1.0 - f32::EPSILON / 2.0,
    ];
    ps.extend((0..20).map(|_| r.random_range(0.0f32..1.0)));
    for &p in &ps {
        let t = lora_drop::keep_threshold(p);
        // Random counters, and the 24-bit values around the boundary.
        let n0 = (t >> 8) as i64;
        let tops = (0..2000).map(|_| r.random::<u32>()).chain(
            (n0 - 3..=n0 + 3)
                .filter(|&n| (0..1 << 24).contains(&n))
                .flat_map(|n| [(n as u32) << 8, ((n as u32) << 8) | 255]),
        );
        for top in tops {
            let u = (top >> 8) as f32 * (1.0 / 16_777_216.0);
            assert_eq!(top >= t, u >= p, "p {p}, top {top:#x}, thresh {t:#x}");
        }
        // And on real mixes against dropout_keep.
        let s = prng::dropout_stream(3, 1, 4);
        for i in 0..2000u64 {
            let top = (prng::splitmix64(s.wrapping_add(i)) >> 32) as u32;
            assert_eq!(top >= t, prng::dropout_keep(s, i, p), "p {p}, i {i}");
        }
    }
    assert_eq!(
        lora_drop::keep_threshold(0.0),
        0,
        "p = 0 is the no-mask path"
    );
}

/// The element offsets of a lane in each kernel: 8 consecutive (lora_down, lora_grad_a)
/// and columns 8j + e, j < 4, e < 2 (lora_dx_acc's C fragment).
fn lane_offsets() -> [Vec<u32>; 2] {
    [
        (0..8).collect(),
        (0..8).map(|i| (i / 2) * 8 + i % 2).collect(),
    ]
}

#[test]
fn split_mask_matches_dropout_keep() {
    let mut r = rng(2);
    for offs in lane_offsets() {
        let span = *offs.iter().max().unwrap() as u64;
        for trial in 0..3000 {
            let stream: u64 = r.random();
            let p = [0.05f32, 0.1, 0.5, 0.9][trial % 4];
            let t = lora_drop::keep_threshold(p);
            let base_lo =
                |e0: u64| (stream.wrapping_add(0x9E37_79B9_7F4A_7C15).wrapping_add(e0)) as u32;
            // Random element indices, and ones whose counter's low word sits at the
            // carry boundary: the last one on the split path and the first ones past it.
            let mut e0s = vec![r.random_range(0..1u64 << 40)];
            let e_edge = (u32::MAX as u64 - base_lo(0) as u64).wrapping_sub(span);
            for d in 0..=span + 1 {
                e0s.push(e_edge.wrapping_add(d) & ((1 << 40) - 1));
            }
            for e0 in e0s {
                let bits = lora_drop::keep_bits_host(stream, e0, &offs, t);
                for (i, &o) in offs.iter().enumerate() {
                    let want = prng::dropout_keep(stream, e0.wrapping_add(o as u64), p);
                    assert_eq!(
                        (bits >> i) & 1 == 1,
                        want,
                        "stream {stream:#x} e0 {e0} off {o} p {p} (low word {:#x})",
                        base_lo(e0)
                    );
                }
            }
        }
    }
}

#[test]
fn device_mask_constants_are_splitmix64s() {
    // The device form cannot run here: read its constants out of the source and check
    // they are SplitMix64's (cpu/rng.rs) and their 32-bit halves (catches a typo'd digit).
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels/lora_drop.cu");
    let text = std::fs::read_to_string(path).unwrap();
    let val = |name: &str| -> u64 {
        let at = text
            .find(&format!(" {name} = 0x"))
            .unwrap_or_else(|| panic!("{name} not found"));
        let hex: String = text[at + name.len() + 6..]
            .chars()
            .take_while(|c| c.is_ascii_hexdigit())
            .collect();
        u64::from_str_radix(&hex, 16).unwrap()
    };
    let (gamma, c1, c2) = (val("GAMMA"), val("C1"), val("C2"));
    assert_eq!(c1, (val("C1_HI") << 32) | val("C1_LO"));
    assert_eq!(c2, (val("C2_HI") << 32) | val("C2_LO"));
    let mut r = rng(3);
    for _ in 0..1000 {
        let z: u64 = r.random();
        let mut d = z.wrapping_add(gamma);
        d = (d ^ (d >> 30)).wrapping_mul(c1);
        d = (d ^ (d >> 27)).wrapping_mul(c2);
        // Only the top 24 bits matter, where the final xor-shift by 31 changes nothing.
        assert_eq!(d >> 40, prng::splitmix64(z) >> 40, "z = {z:#x}");
    }
    for part in [
        "l ^ __funnelshift_r(l, hi, 30)",
        "hi ^ (hi >> 30)",
        "l2 ^ __funnelshift_r(l2, h2, 27)",
        "h2 ^ (h2 >> 27)",
        "(z ^ (z >> 30)) * C1",
        "(z ^ (z >> 27)) * C2",
        "top >= thresh",
    ] {
        assert!(text.contains(part), "keep_bits lacks {part:?}");
    }
}

#[test]
#[allow(clippy::single_range_in_vec_init)] // a plan of one launch is one range
fn plan_splits_heads_that_do_not_fit_one_launch() {
    let all = |_: &[usize]| true;
    let plan = |r: &[usize]| lora_drop::plan_launches(r, all).unwrap();
    assert_eq!(plan(&[16]), vec![0..1]);
    assert_eq!(plan(&[64, 64, 64]), vec![0..3]); // 192 ranks: 24 tiles
    assert_eq!(plan(&[128, 64, 8]), vec![0..2, 2..3]);
    assert_eq!(plan(&[128, 128, 128]), vec![0..1, 1..2, 2..3]);
    assert_eq!(plan(&[8, 128, 64]), vec![0..2, 2..3]);
    // Exactly 24 tiles.
    assert_eq!(plan(&[64, 128]), vec![0..2]);
    // Shared memory: three r=64 heads fit sm_86's 99 KiB opt-in (less the launcher's 1 KiB
    // for static shared memory) in one launch, and take one launch each under 48 KiB.
    for (budget, want) in [
        ((99usize << 10) - 1024, vec![0..3]),
        (48 << 10, vec![0..1, 1..2, 2..3]),
    ] {
        let dx =
            lora_drop::plan_launches(&[64, 64, 64], |g| lora_drop::dx_acc_smem_bytes(g) <= budget);
        assert_eq!(dx.unwrap(), want, "dx_acc, {budget} bytes");
        let ga =
            lora_drop::plan_launches(&[64, 64, 64], |g| lora_drop::grad_a_smem_bytes(g) <= budget);
        assert_eq!(ga.unwrap(), want, "grad_a, {budget} bytes");
    }
    // A head that fits nowhere is an error, not a panic or an empty plan.
    assert!(lora_drop::plan_launches(&[16], |_| false).is_err());
    // Every planned group picks an instance.
    for r in [[8usize, 8, 8], [16, 16, 16], [64, 64, 64], [128, 8, 56]] {
        for gr in plan(&r) {
            assert!(lora_drop::tile_bucket(&r[gr]).is_some());
        }
    }
    assert_eq!(lora_drop::tile_bucket(&[16]), Some(4));
    assert_eq!(lora_drop::tile_bucket(&[16, 16, 16]), Some(8));
    assert_eq!(lora_drop::tile_bucket(&[64, 64]), Some(16));
    assert_eq!(lora_drop::tile_bucket(&[128, 72]), None);
}

#[test]
fn shared_memory_sizes_match_the_kernel_layout() {
    // Counted by hand from the layout in kernels/lora_drop.cu (tiles of 32 rows x 136 bf16;
    // rank tiles padded to an odd number of 16-byte chunks, r = 64 -> 72 bf16 a row).
    // lora_grad_a: 3 stages x (X tile + 3 dyb tiles) + 3 masked X tiles.
    assert_eq!(
        lora_drop::grad_a_smem_bytes(&[64, 64, 64]),
        2 * (3 * (32 * 136 + 3 * 32 * 72) + 3 * 32 * 136)
    );
    // lora_dx_acc: resident A tiles (ranks padded to 16) + 2 stages x (dX tile + dyb tiles).
    assert_eq!(
        lora_drop::dx_acc_smem_bytes(&[8]),
        2 * (16 * 136 + 2 * (32 * 136 + 32 * 24))
    );
    // The common configurations fit an H100/H200 block (227 KiB), and two blocks of the
    // three r=64 heads fit one SM (228 KiB).
    for r in [&[16][..], &[64], &[16, 16, 16], &[64, 64, 64], &[128, 64]] {
        assert!(lora_drop::grad_a_smem_bytes(r) <= 227 << 10, "{r:?}");
        assert!(lora_drop::dx_acc_smem_bytes(r) <= 227 << 10, "{r:?}");
    }
    assert!(2 * lora_drop::grad_a_smem_bytes(&[64, 64, 64]) <= 228 << 10);
    assert!(2 * lora_drop::dx_acc_smem_bytes(&[64, 64, 64]) <= 228 << 10);
}

#[test]
fn row_splits_cover_every_row_once() {
    for &(m, k, sms) in &[
        (1, 8, 132),
        (31, 4096, 132),
        (1000, 4096, 132),
        (8192, 4096, 132),
        (8192, 14336, 132),
        (8229, 14336, 80),
        (16384, 128, 1),
        (100_000, 8, 132),
    ] {
        let (splits, rows) = lora_drop::split_rows(m, k, sms);
        assert!(
            splits >= 1 && rows >= 32 && rows % 32 == 0,
            "{m} {k}: {splits} x {rows}"
        );
        assert!(
            splits * rows >= m && (splits - 1) * rows < m,
            "{m} {k}: {splits} x {rows}"
        );
        assert!(splits <= 65535);
    }
    // Enough blocks to fill the device when m allows it.
    let (splits, _) = lora_drop::split_rows(8192, 4096, 132);
    assert!(splits * 4096usize.div_ceil(128) >= 132);
}

#[test]
fn reference_matches_a_naive_materialised_mask() {
    // ops::dropout (the CPU model's op) draws the mask over the flat [m, k] index; the
    // kernels' operand is that value rounded to bf16. Naive loops from there.
    let (m, k, alpha) = (9, 24, 0.7f32);
    let inp = inputs(5, m, k, &[(8, 0.3), (16, 0.0), (8, 0.6)], alpha);
    let xt = Tensor::from_vec(inp.x.clone(), &[m, k]);
    let all_rows: Vec<usize> = (0..m).collect();
    let all_cols: Vec<usize> = (0..k).collect();
    let down = ref_down(&inp, &all_rows);
    let grad = ref_grad_a(&inp, &all_cols, alpha);
    let one_launch = 0..inp.heads.len();
    let (dx, _, _) = ref_dx(&inp, &all_rows, alpha, std::slice::from_ref(&one_launch));
    let mut dx_naive: Vec<f64> = inp.x.iter().map(|&v| v as f64).collect();
    for (hi, h) in inp.heads.iter().enumerate() {
        let mask = DropMask {
            stream: h.stream,
            p: h.p,
        };
        let xd: Vec<f32> = ops::dropout(&xt, mask)
            .unwrap()
            .cpu()
            .iter()
            .map(|&v| bf16::from_f32(v).to_f32())
            .collect();
        for row in 0..m {
            for j in 0..h.rank {
                let mut s = 0.0f64;
                for c in 0..k {
                    s += xd[row * k + c] as f64 * h.a[j * k + c] as f64;
                }
                assert!((s - down[hi][row * h.rank + j]).abs() <= 1e-12 * (1.0 + s.abs()));
            }
        }
        for j in 0..h.rank {
            for c in 0..k {
                let mut s = 0.0f64;
                for row in 0..m {
                    s += h.dyb[row * h.rank + j] as f64 * xd[row * k + c] as f64;
                }
                let want = alpha as f64 * s;
                assert!((want - grad[hi][j * k + c]).abs() <= 1e-12 * (1.0 + want.abs()));
            }
        }
        // dX: (dyb·A) in f32, then the CPU dropout (x·scale in f32), then alpha.
        let mut dxa = vec![0.0f32; m * k];
        for row in 0..m {
            for c in 0..k {
                dxa[row * k + c] = (0..h.rank)
                    .map(|j| h.dyb[row * h.rank + j] as f64 * h.a[j * k + c] as f64)
                    .sum::<f64>() as f32;
            }
        }
        let dropped = ops::dropout(&Tensor::from_vec(dxa, &[m, k]), mask).unwrap();
        for (o, &v) in dx_naive.iter_mut().zip(dropped.cpu()) {
            *o += alpha as f64 * v as f64;
        }
    }
    for (i, (&a, &b)) in dx.iter().zip(&dx_naive).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
            "dx[{i}]: {a} vs {b}"
        );
    }
    // The mask is not trivial here: the p = 0.6 head drops about 60% of its inputs.
    let kept = (0..(m * k) as u64)
        .filter(|&e| prng::dropout_keep(inp.heads[2].stream, e, 0.6))
        .count();
    assert!(
        kept > 0 && kept < m * k * 6 / 10 + 30,
        "kept {kept} of {}",
        m * k
    );
}

// ---------------------------------------------------------------- GPU

#[test]
#[ignore = "needs a CUDA device"]
fn parity_m1000_k4096() {
    let g = gpu();
    let cases: &[(&str, &[(usize, f32)])] = &[
        ("1x16", &[(16, 0.05)]),
        ("1x64", &[(64, 0.1)]),
        ("3x16", &[(16, 0.0), (16, 0.05), (16, 0.1)]),
        ("3x64", &[(64, 0.05), (64, 0.0), (64, 0.1)]),
        ("8+128", &[(8, 0.1), (128, 0.05)]),
        ("24+40+8", &[(24, 0.05), (40, 0.1), (8, 0.0)]),
        ("3x128", &[(128, 0.05), (128, 0.0), (128, 0.1)]),
    ];
    for (i, (name, spec)) in cases.iter().enumerate() {
        let alpha = 16.0 / spec[0].0 as f32;
        let inp = inputs(100 + i as u64, 1000, 4096, spec, alpha);
        parity(&g, &format!("m=1000 k=4096 {name}"), &inp, alpha);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn parity_m8229_k14336() {
    let g = gpu();
    let inp = inputs(
        200,
        8192 + 37,
        14336,
        &[(64, 0.05), (64, 0.1), (64, 0.0)],
        0.25,
    );
    parity(&g, "m=8229 k=14336 3x64", &inp, 0.25);
    let inp = inputs(201, 8192 + 37, 14336, &[(16, 0.05)], 1.0);
    parity(&g, "m=8229 k=14336 1x16", &inp, 1.0);
}

#[test]
#[ignore = "needs a CUDA device"]
fn parity_m8229_k4096() {
    let g = gpu();
    let inp = inputs(
        300,
        8192 + 37,
        4096,
        &[(16, 0.05), (16, 0.1), (16, 0.0)],
        1.0,
    );
    parity(&g, "m=8229 k=4096 3x16", &inp, 1.0);
    let inp = inputs(301, 8192 + 37, 4096, &[(128, 0.1)], 0.125);
    parity(&g, "m=8229 k=4096 1x128", &inp, 0.125);
}

#[test]
#[ignore = "needs a CUDA device"]
fn parity_small_and_ragged_shapes() {
    let g = gpu();
    // k not a multiple of 32 or 128, m below one block, a single row.
    for (i, &(m, k)) in [(1usize, 8usize), (37, 136), (33, 4104), (300, 24)]
        .iter()
        .enumerate()
    {
        let inp = inputs(
            400 + i as u64,
            m,
            k,
            &[(8, 0.5), (16, 0.05), (24, 0.0)],
            2.0,
        );
        parity(&g, &format!("m={m} k={k} 8+16+24"), &inp, 2.0);
    }
    // m = 0 is a no-op that touches nothing.
    let inp = inputs(410, 4, 64, &[(16, 0.1)], 1.0);
    let d = upload(&g, &inp);
    let heads = drop_heads(&inp, &d);
    let mut dx = ok(g.upload(&inp.x_b));
    ok(lora_drop::lora_dx_acc(
        &g,
        &mut dx,
        0,
        64,
        &heads,
        &[&d.dyb[0]],
        1.0,
    ));
    assert_eq!(ok(g.download(&dx)), inp.x_b);
}

#[test]
#[ignore = "needs a CUDA device"]
fn the_mask_is_applied() {
    // The same inputs and stream at p = 0.5 and p = 0 give different results (and each
    // matches its own reference, so the difference is the mask and the scale).
    let g = gpu();
    let base = inputs(500, 200, 1024, &[(16, 0.0)], 1.0);
    let mut half_p = inputs(500, 200, 1024, &[(16, 0.5)], 1.0);
    half_p.heads[0].stream = base.heads[0].stream;
    let run = |inp: &Inputs| {
        let d = upload(&g, inp);
        (
            down_dev(&g, inp, &d).remove(0),
            grad_a_dev(&g, inp, &d, 1.0).remove(0),
            dx_dev(&g, inp, &d, 1.0),
        )
    };
    let (d0, g0, x0) = run(&base);
    let (d1, g1, x1) = run(&half_p);
    let rel = |a: &[f32], b: &[f32], scale: f32| {
        let diff: Vec<f32> = a.iter().zip(b).map(|(x, y)| x - y).collect();
        rms(&diff) / scale
    };
    let g_upd: Vec<f32> = g0
        .iter()
        .zip(&base.heads[0].g0)
        .map(|(a, b)| a - b)
        .collect();
    let x_upd: Vec<f32> = x0.iter().zip(&base.x).map(|(a, b)| a - b).collect();
    let (rd, rg, rx) = (
        rel(&d0, &d1, rms(&d0)),
        rel(&g0, &g1, rms(&g_upd)),
        rel(&x0, &x1, rms(&x_upd)),
    );
    println!("MASK p=0.5 vs p=0: relative rms difference down {rd:.3} grad_a {rg:.3} dx {rx:.3}");
    assert!(rd > 0.5 && rg > 0.5 && rx > 0.5, "{rd} {rg} {rx}");
    parity(&g, "p=0.5", &half_p, 1.0);
}

#[test]
#[ignore = "needs a CUDA device"]
fn fused_matches_todays_unfused_path() {
    // dropout_bf16 + cuBLAS (+ axpy for dX), per head, on the device.
    let g = gpu();
    let (m, k, alpha) = (1000, 4096, 0.25f32);
    let inp = inputs(600, m, k, &[(64, 0.05), (64, 0.1), (64, 0.0)], alpha);
    let d = upload(&g, &inp);
    let fused_down = down_dev(&g, &inp, &d);
    let fused_grad = grad_a_dev(&g, &inp, &d, alpha);
    let fused_dx = dx_dev(&g, &inp, &d, alpha);
    let mut dx = ok(g.upload(&inp.x_b));
    let mut scale: Vec<f32> = fused_dx.iter().map(|v| v.abs()).collect();
    for (i, h) in inp.heads.iter().enumerate() {
        let r = h.rank;
        let mut xd = ok(g.alloc::<bf16>(m * k));
        ok(ew::dropout_bf16(&g, &d.x, h.stream, h.p, &mut xd));
        let mut xa = ok(g.alloc::<bf16>(m * r));
        ok(blas::gemm_bf16(
            &g,
            blas::Gemm::linear(m, r, k),
            &xd,
            &d.a[i],
            &mut xa,
        ));
        let xa = common::to_f32(&ok(g.download(&xa)));
        check(
            &format!("fused vs unfused down head{i}"),
            &fused_down[i],
            &xa,
            4e-3 * rms(&xa),
            1.0 / 64.0,
        );
        let mut ga = ok(g.upload(&h.g0));
        // dA[r, k] += alpha·dybᵀ·drop(X): dyb is stored [m, r].
        let gemm = blas::Gemm {
            m: r,
            n: k,
            k: m,
            trans_a: true,
            trans_b: false,
            alpha,
            beta: 1.0,
        };
        ok(blas::gemm_bf16_f32out(&g, gemm, &d.dyb[i], &xd, &mut ga));
        let ga = ok(g.download(&ga));
        let upd: Vec<f32> = ga.iter().zip(&h.g0).map(|(a, b)| a - b).collect();
        check(
            &format!("fused vs unfused grad_a head{i}"),
            &fused_grad[i],
            &ga,
            4e-3 * rms(&upd),
            1.0 / 64.0,
        );
        let mut dxa = ok(g.alloc::<bf16>(m * k));
        let plain = blas::Gemm {
            trans_b: false,
            ..blas::Gemm::linear(m, k, r)
        };
        ok(blas::gemm_bf16(&g, plain, &d.dyb[i], &d.a[i], &mut dxa));
        let mut dropped = ok(g.alloc::<bf16>(m * k));
        ok(ew::dropout_bf16(&g, &dxa, h.stream, h.p, &mut dropped));
        ok(ew::axpy_bf16(&g, alpha, &dropped, &mut dx));
        // This path rounds dY·B·A, its dropout and dX once per head: its error follows
        // those values (2^-8 of each), not the final dX.
        let dropped = common::to_f32(&ok(g.download(&dropped)));
        let after = common::to_f32(&ok(g.download(&dx)));
        for ((s, d), a) in scale.iter_mut().zip(&dropped).zip(&after) {
            *s += 2.0 * alpha * d.abs() + a.abs();
        }
    }
    let dx = common::to_f32(&ok(g.download(&dx)));
    check_scaled(
        "fused vs unfused dx_acc",
        &fused_dx,
        &dx,
        4e-3 * rms(&dx),
        1.0 / 256.0,
        &scale,
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn bad_inputs_are_errors() {
    let g = gpu();
    let inp = inputs(700, 16, 64, &[(16, 0.1)], 1.0);
    let d = upload(&g, &inp);
    let a = &d.a[0];
    let head = |rank: usize, p: f32| DropHead {
        a,
        rank,
        stream: 1,
        p,
    };
    let mut out = ok(g.alloc::<bf16>(16 * 128));
    // One output buffer, offered to at most as many heads as there are.
    fn call(
        g: &Gpu,
        x: &DeviceBuffer<bf16>,
        out: &mut DeviceBuffer<bf16>,
        k: usize,
        heads: &[DropHead<'_>],
    ) -> palign::Result<()> {
        let mut outs: Vec<&mut DeviceBuffer<bf16>> = vec![out];
        outs.truncate(heads.len());
        lora_drop::lora_down(g, x, 16, k, heads, &mut outs)
    }
    let mut down = |k: usize, heads: &[DropHead<'_>]| call(&g, &d.x, &mut out, k, heads);
    assert!(is_bad_input(down(60, &[head(16, 0.1)])), "k % 8 != 0");
    assert!(is_bad_input(down(64, &[head(12, 0.1)])), "rank % 8 != 0");
    assert!(is_bad_input(down(64, &[head(136, 0.1)])), "rank > 128");
    assert!(is_bad_input(down(64, &[head(16, 1.0)])), "p = 1");
    assert!(is_bad_input(down(64, &[head(16, -0.1)])), "p < 0");
    assert!(is_bad_input(down(64, &[head(16, f32::NAN)])), "p NaN");
    assert!(is_bad_input(down(64, &[])), "no heads");
    let four = [head(8, 0.0), head(8, 0.0), head(8, 0.0), head(8, 0.0)];
    assert!(is_bad_input(down(64, &four)), "4 heads");
    assert!(
        is_bad_input(down(64, &[head(8, 0.0), head(8, 0.0)])),
        "1 output for 2 heads"
    );
    assert!(is_bad_input(down(4096, &[head(16, 0.1)])), "x too short");
    let mut short = ok(g.alloc::<bf16>(10));
    let mut outs: Vec<&mut DeviceBuffer<bf16>> = vec![&mut short];
    assert!(is_bad_input(lora_drop::lora_down(
        &g,
        &d.x,
        16,
        64,
        &[head(16, 0.1)],
        &mut outs
    )));
    let mut grad = ok(g.zeros::<f32>(10));
    let mut grads: Vec<&mut DeviceBuffer<f32>> = vec![&mut grad];
    let r = lora_drop::lora_grad_a(
        &g,
        &d.x,
        16,
        64,
        &[head(16, 0.1)],
        &[&d.dyb[0]],
        1.0,
        &mut grads,
    );
    assert!(is_bad_input(r), "grad too short");
    let mut dx = ok(g.upload(&inp.x_b));
    let r = lora_drop::lora_dx_acc(
        &g,
        &mut dx,
        16,
        64,
        &[head(16, 0.1)],
        &[&d.dyb[0]],
        f32::NAN,
    );
    assert!(is_bad_input(r), "alpha NaN");
    let r = lora_drop::lora_dx_acc(&g, &mut dx, 16, 64, &[head(16, 0.1)], &[], 1.0);
    assert!(is_bad_input(r), "no dyb");
}

// ---------------------------------------------------------------- lora_up_backward
//
// dyb = bf16(dY·B) and dB += alpha·dYᵀ·xa from one pass over dY. Tolerances, against the
// f64 reference on the same bf16 inputs:
// - dyb (bf16): rtol = 2^-8 (one rounding), atol = 1e-3·rms(ref); the f32 sums over
//   n <= 14336 products (128-column partials, then the block-ordered sum) err by
//   ~2^-24·sqrt(n)·rms, a 100x margin.
// - dB (f32, accumulated onto a nonzero start): atol = 1e-3·rms(update), rtol = 1e-4.
// - vs the cuBLAS pair as the model calls it (ops::matmul, ops::add_at_b_): dyb may differ
//   by one bf16 rounding step on each side, so rtol = 2^-7; dB as above.

struct UpIn {
    m: usize,
    n: usize,
    r: usize,
    alpha: f32,
    dy: Vec<f32>, // [m, n], bf16 values
    dy_b: Vec<bf16>,
    b: Vec<f32>, // [n, r]
    b_b: Vec<bf16>,
    xa: Vec<f32>, // [m, r]
    xa_b: Vec<bf16>,
    g0: Vec<f32>, // [n, r]: dB before the call
}

fn up_inputs(seed: u64, m: usize, n: usize, r: usize) -> UpIn {
    let mut g = rng(seed);
    let (dy_b, dy) = common::rand_bf16(&mut g, m * n, 1.0);
    let (b_b, b) = common::rand_bf16(&mut g, n * r, 0.05);
    let (xa_b, xa) = common::rand_bf16(&mut g, m * r, 1.0);
    let g0 = (0..n * r).map(|_| g.random_range(-1.0f32..1.0)).collect();
    UpIn {
        m,
        n,
        r,
        alpha: 16.0 / r as f32,
        dy,
        dy_b,
        b,
        b_b,
        xa,
        xa_b,
        g0,
    }
}

/// `(dY·B` for `rows` `[rows.len(), r]`, `alpha·dYᵀ·xa` for `cols` `[cols.len(), r])`, f64.
fn ref_up(u: &UpIn, rows: &[usize], cols: &[usize]) -> (Vec<f64>, Vec<f64>) {
    let (m, n, r) = (u.m, u.n, u.r);
    let dyb = rows
        .par_iter()
        .flat_map_iter(|&row| {
            let d = &u.dy[row * n..(row + 1) * n];
            (0..r).map(move |j| {
                d.iter()
                    .enumerate()
                    .map(|(c, &v)| v as f64 * u.b[c * r + j] as f64)
                    .sum::<f64>()
            })
        })
        .collect();
    let db = cols
        .par_iter()
        .flat_map_iter(|&c| {
            let mut s = vec![0.0f64; r];
            for row in 0..m {
                let d = u.dy[row * n + c] as f64;
                for (j, sj) in s.iter_mut().enumerate() {
                    *sj += d * u.xa[row * r + j] as f64;
                }
            }
            s.into_iter().map(|v| u.alpha as f64 * v)
        })
        .collect();
    (dyb, db)
}

struct UpDev {
    dy: DeviceBuffer<bf16>,
    b: DeviceBuffer<bf16>,
    xa: DeviceBuffer<bf16>,
}

fn up_upload(g: &Gpu, u: &UpIn) -> UpDev {
    UpDev {
        dy: ok(g.upload(&u.dy_b)),
        b: ok(g.upload(&u.b_b)),
        xa: ok(g.upload(&u.xa_b)),
    }
}

/// The fused kernel: (dyb, dB after accumulating onto g0).
fn up_fused(g: &Gpu, u: &UpIn, d: &UpDev) -> (Vec<f32>, Vec<f32>) {
    let mut dyb = ok(g.alloc::<bf16>(u.m * u.r));
    let mut gb = ok(g.upload(&u.g0));
    ok(lora_drop::lora_up_backward(
        g, &d.dy, u.m, u.n, &d.b, &d.xa, u.r, u.alpha, &mut dyb, &mut gb,
    ));
    (common::to_f32(&ok(g.download(&dyb))), ok(g.download(&gb)))
}

/// The two cuBLAS products as the model runs them (ops::matmul, ops::add_at_b_).
fn up_cublas(g: &Gpu, u: &UpIn, d: &UpDev) -> (Vec<f32>, Vec<f32>) {
    let (m, n, r) = (u.m, u.n, u.r);
    let mut dyb = ok(g.alloc::<bf16>(m * r));
    let mm = blas::Gemm {
        m,
        n: r,
        k: n,
        trans_a: false,
        trans_b: false,
        alpha: 1.0,
        beta: 0.0,
    };
    ok(blas::gemm_bf16(g, mm, &d.dy, &d.b, &mut dyb));
    let mut gb = ok(g.upload(&u.g0));
    let atb = blas::Gemm {
        m: n,
        n: r,
        k: m,
        trans_a: true,
        trans_b: false,
        alpha: u.alpha,
        beta: 1.0,
    };
    ok(blas::gemm_bf16_f32out(g, atb, &d.dy, &d.xa, &mut gb));
    (common::to_f32(&ok(g.download(&dyb))), ok(g.download(&gb)))
}

fn up_parity(g: &Gpu, u: &UpIn) {
    let (m, n, r) = (u.m, u.n, u.r);
    let name = format!("up_backward m={m} n={n} r={r}");
    let d = up_upload(g, u);
    let (dyb, gb) = up_fused(g, u, &d);
    let rows = subset(m, 2048, 7);
    let cols = subset(n, 4096, 29);
    let (want_y, want_db) = ref_up(u, &rows, &cols);
    let sel: Vec<f32> = rows
        .iter()
        .flat_map(|&row| dyb[row * r..(row + 1) * r].iter().copied())
        .collect();
    let wy = f32v(&want_y);
    check(
        &format!("{name} dyb"),
        &sel,
        &wy,
        BF16_ATOL * rms(&wy),
        BF16_RTOL,
    );
    let sel: Vec<f32> = cols
        .iter()
        .flat_map(|&c| gb[c * r..(c + 1) * r].iter().copied())
        .collect();
    let want_db_ref = &want_db;
    let w: Vec<f32> = cols
        .iter()
        .enumerate()
        .flat_map(|(ci, &c)| {
            (0..r).map(move |j| (u.g0[c * r + j] as f64 + want_db_ref[ci * r + j]) as f32)
        })
        .collect();
    let upd = rms(&f32v(&want_db));
    check(&format!("{name} dB"), &sel, &w, GRAD_ATOL * upd, GRAD_RTOL);

    let (cy, cb) = up_cublas(g, u, &d);
    check(
        &format!("{name} dyb vs cuBLAS"),
        &dyb,
        &cy,
        BF16_ATOL * rms(&cy),
        1.0 / 128.0,
    );
    check(
        &format!("{name} dB vs cuBLAS"),
        &gb,
        &cb,
        GRAD_ATOL * upd,
        GRAD_RTOL,
    );
}

#[test]
fn up_backward_buckets_and_shared_memory() {
    // One instance per rank range: nt4 <= 32, nt8 <= 64, nt16 <= 128.
    for (r, nt) in [(8, 4), (32, 4), (40, 8), (64, 8), (72, 16), (128, 16)] {
        assert_eq!(lora_drop::up_bucket(r), Some(nt), "r = {r}");
    }
    assert_eq!(lora_drop::up_bucket(136), None);
    // Counted by hand from the kernel layout: B [128][ld] + 3 x (dY [32][136] + xa [32][ld]),
    // bf16, with ld = 8·(odd number of 16-byte chunks >= r/8): r = 64 -> 72, 16 -> 24.
    assert_eq!(
        lora_drop::up_backward_smem_bytes(64),
        2 * (128 * 72 + 3 * (32 * 136 + 32 * 72))
    );
    assert_eq!(
        lora_drop::up_backward_smem_bytes(16),
        2 * (128 * 24 + 3 * (32 * 136 + 32 * 24))
    );
    // r = 128 -> ld 136; two blocks per SM (228 KiB) fit at every rank.
    assert_eq!(
        lora_drop::up_backward_smem_bytes(128),
        2 * (128 * 136 + 3 * (32 * 136 + 32 * 136))
    );
    for r in (8..=128).step_by(8) {
        assert!(
            2 * lora_drop::up_backward_smem_bytes(r) <= 228 << 10,
            "r = {r}"
        );
    }
    // Scratch: a partial dY·B per 128-column block; dB partials only when m is split.
    assert_eq!(
        lora_drop::up_backward_scratch(1000, 4096, 16, 8),
        (32 * 1000 * 16, 8 * 4096 * 16)
    );
    assert_eq!(
        lora_drop::up_backward_scratch(33, 136, 8, 1),
        (2 * 33 * 8, 0)
    );
}

#[test]
fn up_reference_matches_the_cpu_model_ops() {
    // ops::matmul and ops::add_at_b_ on CPU tensors: the model's own path, in f32.
    let (m, n, r) = (13, 40, 16);
    let u = up_inputs(900, m, n, r);
    let rows: Vec<usize> = (0..m).collect();
    let cols: Vec<usize> = (0..n).collect();
    let (want_y, want_db) = ref_up(&u, &rows, &cols);
    let dy = Tensor::from_vec(u.dy.clone(), &[m, n]);
    let y = ops::matmul(&dy, &Tensor::from_vec(u.b.clone(), &[n, r])).unwrap();
    for (i, (&a, &b)) in y.cpu().iter().zip(&want_y).enumerate() {
        assert!(
            (a as f64 - b).abs() <= 1e-5 * (1.0 + b.abs()),
            "dyb[{i}]: {a} vs {b}"
        );
    }
    let mut gb = Tensor::from_vec(vec![0.0; n * r], &[n, r]);
    ops::add_at_b_(
        &mut gb,
        &dy,
        &Tensor::from_vec(u.xa.clone(), &[m, r]),
        u.alpha,
    )
    .unwrap();
    for (i, (&a, &b)) in gb.cpu().iter().zip(&want_db).enumerate() {
        assert!(
            (a as f64 - b).abs() <= 1e-5 * (1.0 + b.abs()),
            "dB[{i}]: {a} vs {b}"
        );
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn up_backward_parity_m1000() {
    let g = gpu();
    for (i, &n) in [1024, 4096].iter().enumerate() {
        for (j, &r) in [8, 16, 64, 128].iter().enumerate() {
            up_parity(&g, &up_inputs(1000 + 10 * i as u64 + j as u64, 1000, n, r));
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn up_backward_parity_m8229() {
    let g = gpu();
    for (i, &(n, r)) in [(14336, 16), (14336, 64), (4096, 128), (1024, 8)]
        .iter()
        .enumerate()
    {
        up_parity(&g, &up_inputs(1100 + i as u64, 8192 + 37, n, r));
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn up_backward_parity_small_and_ragged() {
    // n not a multiple of 128, rank tiles not a multiple of 4, m below one 32-row step.
    let g = gpu();
    for (i, &(m, n, r)) in [
        (1, 8, 8),
        (31, 120, 24),
        (33, 136, 40),
        (100, 1032, 72),
        (257, 4104, 120),
    ]
    .iter()
    .enumerate()
    {
        up_parity(&g, &up_inputs(1200 + i as u64, m, n, r));
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn up_backward_bad_inputs_are_errors() {
    let g = gpu();
    let u = up_inputs(1300, 16, 64, 16);
    let d = up_upload(&g, &u);
    let mut dyb = ok(g.alloc::<bf16>(16 * 128));
    let mut gb = ok(g.zeros::<f32>(64 * 128));
    let mut call = |m: usize, n: usize, r: usize, alpha: f32| {
        lora_drop::lora_up_backward(&g, &d.dy, m, n, &d.b, &d.xa, r, alpha, &mut dyb, &mut gb)
    };
    assert!(is_bad_input(call(16, 60, 8, 1.0)), "n % 8 != 0");
    assert!(is_bad_input(call(16, 0, 8, 1.0)), "n = 0");
    assert!(is_bad_input(call(16, 64, 12, 1.0)), "rank % 8 != 0");
    assert!(is_bad_input(call(16, 64, 136, 1.0)), "rank > 128");
    assert!(is_bad_input(call(16, 64, 16, f32::NAN)), "alpha NaN");
    assert!(is_bad_input(call(32, 64, 16, 1.0)), "dy too short");
    assert!(is_bad_input(call(16, 64, 32, 1.0)), "B too short");
    assert!(call(0, 64, 16, 1.0).is_ok(), "m = 0 is a no-op");
    let mut short = ok(g.zeros::<f32>(10));
    let r = lora_drop::lora_up_backward(
        &g, &d.dy, 16, 64, &d.b, &d.xa, 16, 1.0, &mut dyb, &mut short,
    );
    assert!(is_bad_input(r), "grad_b too short");
}
