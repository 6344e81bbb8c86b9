//! The sm_90a warpgroup MMA forms on their own (kernels/probe.cu), against exact CPU
//! products. The wgmma kernels (attention forward/backward, NF4 GEMMs) are written from one
//! reading of the PTX ISA's layouts, which kemu emulates from the same reading; these
//! probes are what a GPU run reads first when such a kernel fails its parity test: each
//! prints `PROBE <form>: mismatches=N` and, for a wrong one, where and what pattern (D
//! transposed, rows shifted by 8, ...).
//!
//! The operands are small integers, so every product and sum is exact in f32 and the
//! expected D is known bit for bit; any difference is a layout error, not rounding.
//! On a GPU without sm_90a wgmma the test checks that the probe refuses and says SKIPPED.

mod common;

use common::{assert_kernels_registered, gpu};
use palign::backend::cuda::{self, nf4, probe};

#[test]
fn probe_kernel_is_registered_and_in_the_fatbin() {
    let names: Vec<&str> = probe::WGMMA_FORMS.iter().map(|f| f.2).collect();
    assert_kernels_registered(&names);
}

/// A [64][16] and B [16][n]: small integers in -4..=4 with no symmetry that would hide a
/// transpose or a shift (different strides for rows and columns).
fn operands(n: usize, seed: usize) -> (Vec<f32>, Vec<f32>) {
    let a = (0..64 * 16)
        .map(|i| ((i / 16 * 7 + i % 16 * 3 + seed) % 9) as f32 - 4.0)
        .collect();
    let b = (0..16 * n)
        .map(|i| ((i / n * 5 + i % n * 11 + 2 * seed) % 9) as f32 - 4.0)
        .collect();
    (a, b)
}

fn product(a: &[f32], b: &[f32], n: usize, init: f32) -> Vec<f32> {
    let mut d = vec![init; 64 * n];
    for m in 0..64 {
        for c in 0..n {
            for k in 0..16 {
                d[m * n + c] += a[m * 16 + k] * b[k * n + c];
            }
        }
    }
    d
}

/// Names what a wrong D looks like, for the report: which known misreadings match.
fn pattern(got: &[f32], a: &[f32], b: &[f32], n: usize, init: f32) -> String {
    let mut seen = Vec::new();
    // An operand read with the other major-ness (its transpose flag or descriptor wrong):
    // the tile written one way and read the other gives X'[i][j] = X[j][i] where both
    // indices are below 16, else 0 (checked on kemu by flipping B's flag in form 3).
    let other_b: Vec<f32> = (0..16 * n)
        .map(|i| {
            let (k, c) = (i / n, i % n);
            if c < 16 {
                b[c * n + k]
            } else {
                0.0
            }
        })
        .collect();
    if product(a, &other_b, n, init) == got {
        seen.push("B read with the other major-ness");
    }
    let other_a: Vec<f32> = (0..64 * 16)
        .map(|i| {
            let (m, k) = (i / 16, i % 16);
            if m < 16 {
                a[k * 16 + m]
            } else {
                0.0
            }
        })
        .collect();
    if product(&other_a, b, n, init) == got {
        seen.push("A read with the other major-ness");
    }
    // Rows g and g + 8 of each 16-row group swapped (the fragment's row halves).
    let mut swapped = vec![0.0; 64 * n];
    let want = product(a, b, n, init);
    for m in 0..64 {
        let src = if m % 16 < 8 { m + 8 } else { m - 8 };
        swapped[m * n..(m + 1) * n].copy_from_slice(&want[src * n..(src + 1) * n]);
    }
    if swapped == got {
        seen.push("rows g and g+8 swapped");
    }
    if got.iter().all(|&x| x == init) {
        seen.push("D untouched (no product added)");
    }
    if seen.is_empty() {
        "no known pattern".to_string()
    } else {
        seen.join(", ")
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn wgmma_forms_give_exact_products() {
    let g = gpu();
    if !nf4::wgmma_supported(g.compute_capability(), cuda::TARGETS) {
        let (a, b) = operands(64, 0);
        let e = probe::wgmma_probe(&g, 1, true, &a, &b).expect_err("needs sm_90a");
        assert!(e.to_string().contains("compute capability 9.0"), "{e}");
        println!(
            "SKIPPED wgmma probe: {} is sm_{}{} (the probe refuses: {e})",
            g.name(),
            g.compute_capability().0,
            g.compute_capability().1
        );
        return;
    }
    let mut bad = Vec::new();
    for (form, &(what, n, _)) in probe::WGMMA_FORMS.iter().enumerate() {
        for accumulate in [false, true] {
            let init = if accumulate { 1.0 } else { 0.0 };
            let (a, b) = operands(n, form);
            let got = probe::wgmma_probe(&g, form, accumulate, &a, &b)
                .unwrap_or_else(|e| panic!("form {form}: {e}"));
            let want = product(&a, &b, n, init);
            let wrong: Vec<usize> = (0..want.len()).filter(|&i| got[i] != want[i]).collect();
            let case = format!("form {form} ({what}) accumulate={accumulate}");
            match wrong.first() {
                None => println!("PROBE {case}: mismatches=0 of {}", want.len()),
                Some(&i) => {
                    println!(
                        "PROBE {case}: mismatches={} of {}; first D[{}][{}] = {} (want {}); {}",
                        wrong.len(),
                        want.len(),
                        i / n,
                        i % n,
                        got[i],
                        want[i],
                        pattern(&got, &a, &b, n, init)
                    );
                    bad.push(case);
                }
            }
        }
    }
    assert!(bad.is_empty(), "wrong wgmma forms: {bad:?}");
}

#[test]
#[ignore = "needs a CUDA device"]
fn wgmma_probe_rejects_bad_input() {
    let g = gpu();
    let (a, b) = operands(64, 0);
    let e = probe::wgmma_probe(&g, 5, false, &a, &b).expect_err("no form 5");
    assert!(e.to_string().contains("form 5"), "{e}");
    let e = probe::wgmma_probe(&g, 0, false, &a, &b).expect_err("form 0 takes B 16 x 128");
    assert!(e.to_string().contains("16 x 128"), "{e}");
}
