//! The merge kernels on one tensor (formulas from mergekit 0.1.5 `merge_methods/slerp.py`,
//! `linear.py`, `generalized_task_arithmetic.py` and `sparsify.py`; facts only). Reductions
//! (norms, dots, L1 sums) accumulate in f64 and are rounded to f32, which keeps them within an
//! ulp of torch's f32 reductions.
//!
//! Slerp and linear work in f32 whatever the inputs (mergekit casts to f32 and back). TIES and
//! DARE-TIES work in the *merge dtype* (see `super`): with bf16 or f16 every elementwise torch
//! op rounds its f32 result to that dtype, so each step below is an f32 op followed by
//! [`round`]. Facts checked on torch 2.15 (CPU), which the kernels here follow:
//! - `a − b`, `a · b`, `a / b` on two bf16 tensors equal the f32 op rounded once to bf16
//!   (round-to-nearest-even);
//! - a Python float operand (`lambda`, DARE's old `/ density`) stays an f32 scalar: the product
//!   is `bf16(x · f32(λ))`, not `bf16(x · bf16(λ))`;
//! - `torch.tensor(weights, dtype=bf16)` rounds each weight through f32 to bf16 (0.3 → 0.30078);
//! - `.sum(dim=0)` over bf16 accumulates in f32 in model order and rounds once; a whole-tensor
//!   `.abs().sum()` (the L1 rescale) is an f32 sum rounded once to bf16;
//! - the `before < 1e-7` test of the rescale gives the same answer whether 1e-7 is rounded to
//!   bf16 or not (no bf16 value lies between 1e-7 and bf16(1e-7)).

use crate::model::weights::FloatDtype;
use rand::Rng;

/// mergekit's `DOT_THRESHOLD`: above it (in |cos|) slerp falls back to lerp.
pub const DOT_THRESHOLD: f32 = 0.9995;
/// Norms at or below this are treated as 1 (mergekit slerp's `eps`).
const NORM_EPS: f32 = 1e-8;
/// L1 norms below this disable rescaling (mergekit `rescaled_masked_tensor`'s `eps`).
const RESCALE_EPS: f32 = 1e-7;

fn norm(v: &[f32]) -> f32 {
    v.iter()
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt() as f32
}

/// Spherical interpolation of the whole tensor (flattened) from `v0` (t=0) to `v1` (t=1).
/// Returns the result and the cosine between the inputs.
pub fn slerp(t: f32, v0: &[f32], v1: &[f32]) -> (Vec<f32>, f32) {
    let (mut n0, mut n1) = (norm(v0), norm(v1));
    if n0 <= NORM_EPS {
        n0 = 1.0;
    }
    if n1 <= NORM_EPS {
        n1 = 1.0;
    }
    // Normalize before multiplying, as mergekit does, so huge tensors cannot overflow.
    let dot = v0
        .iter()
        .zip(v1)
        .map(|(&a, &b)| ((a / n0) as f64) * ((b / n1) as f64))
        .sum::<f64>() as f32;
    let dot = dot.clamp(-1.0, 1.0);
    let (ca, cb) = if dot.abs() > DOT_THRESHOLD {
        (1.0 - t, t)
    } else {
        let theta = dot.acos();
        let s = theta.sin();
        (((1.0 - t) * theta).sin() / s, (t * theta).sin() / s)
    };
    let out = v0.iter().zip(v1).map(|(&a, &b)| ca * a + cb * b).collect();
    (out, dot)
}

/// `Σ wᵢ·xᵢ`, divided by `Σ wᵢ` when `normalize`.
pub fn linear(inputs: &[&[f32]], weights: &[f32], normalize: bool) -> Vec<f32> {
    let n = inputs[0].len();
    let mut out = vec![0f32; n];
    for (x, &w) in inputs.iter().zip(weights) {
        for (o, &v) in out.iter_mut().zip(x.iter()) {
            *o += v * w;
        }
    }
    if normalize {
        let total: f32 = weights.iter().sum();
        for o in &mut out {
            *o /= total;
        }
    }
    out
}

/// How surviving delta entries are scaled after a drop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rescale {
    None,
    /// Match the delta's L1 norm (mergekit ≥ 2024-09, and 0.1.5's `rescale: true`).
    L1,
    /// Divide by the density (DARE's paper and mergekit before the L1 change).
    InvDensity,
}

/// `x` rounded to `dtype` and back (round-to-nearest-even, as torch's casts): what a torch op
/// in that dtype stores after computing in f32. The identity for f32.
pub fn round(x: f32, dtype: FloatDtype) -> f32 {
    match dtype {
        FloatDtype::F32 => x,
        FloatDtype::BF16 => half::bf16::from_f32(x).to_f32(),
        FloatDtype::F16 => half::f16::from_f32(x).to_f32(),
    }
}

/// Scales the survivors `kept` of `delta`, in `dtype` (mergekit `rescaled_masked_tensor`).
fn rescale(delta: &[f32], kept: &mut [f32], how: Rescale, density: f64, dtype: FloatDtype) {
    match how {
        Rescale::None => {}
        Rescale::InvDensity => {
            let d = density as f32;
            kept.iter_mut().for_each(|x| *x = round(*x / d, dtype));
        }
        Rescale::L1 => {
            let l1 = |v: &[f32]| round(v.iter().map(|x| x.abs() as f64).sum::<f64>() as f32, dtype);
            let (before, after) = (l1(delta), l1(kept));
            if before < RESCALE_EPS || after < RESCALE_EPS {
                return;
            }
            let s = round(before / after, dtype);
            kept.iter_mut().for_each(|x| *x = round(*x * s, dtype));
        }
    }
}

/// TIES trim: keep the `max(1, ⌊density·n⌋)` largest-magnitude entries, then rescale in
/// `dtype`. Entries tied at the cut are chosen as mergekit chooses them (see `top_k`).
pub fn magnitude(delta: &[f32], density: f64, how: Rescale, dtype: FloatDtype) -> Vec<f32> {
    if density >= 1.0 {
        return delta.to_vec();
    }
    if density <= 0.0 || delta.is_empty() {
        return vec![0.0; delta.len()];
    }
    let k = ((density * delta.len() as f64) as usize).max(1);
    let mut kept = vec![0f32; delta.len()];
    for i in top_k(delta, k) {
        kept[i as usize] = delta[i as usize];
    }
    rescale(delta, &mut kept, how, density, dtype);
    kept
}

/// The indices of the `k` largest `|δ|`, as mergekit's `argsort(|δ|.float(),
/// descending=True)[:k]` picks them. When the k-th magnitude is tied across the cut, which
/// of the tied entries survive depends on the sort: torch's CPU sort (stable=False) is
/// libstdc++'s `std::sort` over (value, index) pairs with `a > b` (checked against torch 2.15
/// on tensors with many ties), emulated by [`torch_argsort_desc`]. Otherwise, or when the tied
/// value is 0 (a kept zero is a dropped zero), a selection gives the same set, faster.
/// Ties are rare in f32 and common in bf16.
fn top_k(delta: &[f32], k: usize) -> Vec<u32> {
    let mag: Vec<f32> = delta.iter().map(|x| x.abs()).collect();
    let mut order: Vec<u32> = (0..mag.len() as u32).collect();
    order.select_nth_unstable_by(k - 1, |&a, &b| mag[b as usize].total_cmp(&mag[a as usize]));
    let cut = mag[order[k - 1] as usize];
    if cut == 0.0 || mag.iter().filter(|&&m| m >= cut).count() == k {
        order.truncate(k);
        return order;
    }
    let mut sorted = torch_argsort_desc(&mag);
    sorted.truncate(k);
    sorted
}

/// The permutation torch's CPU `argsort(descending=True)` returns: the order libstdc++'s
/// `std::sort` leaves (value, index) pairs in. Equal keys end wherever that algorithm's
/// swaps put them, so its steps are reproduced exactly: introsort with the median of
/// (first+1, middle, last−1) as pivot, an unguarded partition, runs of 16 left to one final
/// insertion sort, heapsort past depth 2·⌊log2 n⌋. Checked against torch on tie-heavy
/// inputs (tests/fixtures/merge/expected/argsort.json); no input tried reached the heapsort.
fn torch_argsort_desc(keys: &[f32]) -> Vec<u32> {
    const THRESHOLD: usize = 16;
    type Pair = (f32, u32);
    // torch's descending key order: NaN before every number (a strict weak order, which
    // the unguarded partition needs; plain `>` is not one with NaN).
    fn comp(a: &Pair, b: &Pair) -> bool {
        (a.0.is_nan() && !b.0.is_nan()) || a.0 > b.0
    }

    fn adjust_heap(v: &mut [Pair], mut hole: usize, len: usize, value: Pair) {
        let top = hole;
        let mut child = hole;
        while child < (len - 1) / 2 {
            child = 2 * (child + 1);
            if comp(&v[child], &v[child - 1]) {
                child -= 1;
            }
            v[hole] = v[child];
            hole = child;
        }
        if len.is_multiple_of(2) && child == (len - 2) / 2 {
            child = 2 * (child + 1);
            v[hole] = v[child - 1];
            hole = child - 1;
        }
        // push_heap
        while hole > top {
            let parent = (hole - 1) / 2;
            if !comp(&v[parent], &value) {
                break;
            }
            v[hole] = v[parent];
            hole = parent;
        }
        v[hole] = value;
    }

    fn heap_sort(v: &mut [Pair]) {
        let len = v.len();
        if len < 2 {
            return;
        }
        for parent in (0..=(len - 2) / 2).rev() {
            adjust_heap(v, parent, len, v[parent]);
        }
        for last in (1..len).rev() {
            let value = v[last];
            v[last] = v[0];
            adjust_heap(v, 0, last, value);
        }
    }

    fn introsort_loop(v: &mut [Pair], mut last: usize, mut depth: u32, first: usize) {
        while last - first > THRESHOLD {
            if depth == 0 {
                heap_sort(&mut v[first..last]);
                return;
            }
            depth -= 1;
            // Median of (first+1, mid, last−1) moved to `first`.
            let (a, b, c) = (first + 1, first + (last - first) / 2, last - 1);
            let m = if comp(&v[a], &v[b]) {
                if comp(&v[b], &v[c]) {
                    b
                } else if comp(&v[a], &v[c]) {
                    c
                } else {
                    a
                }
            } else if comp(&v[a], &v[c]) {
                a
            } else if comp(&v[b], &v[c]) {
                c
            } else {
                b
            };
            v.swap(first, m);
            // Unguarded partition of [first+1, last) around v[first].
            let (mut lo, mut hi) = (first + 1, last);
            loop {
                while comp(&v[lo], &v[first]) {
                    lo += 1;
                }
                hi -= 1;
                while comp(&v[first], &v[hi]) {
                    hi -= 1;
                }
                if lo >= hi {
                    break;
                }
                v.swap(lo, hi);
                lo += 1;
            }
            introsort_loop(v, last, depth, lo);
            last = lo;
        }
    }

    let mut v: Vec<Pair> = keys.iter().copied().zip(0u32..).collect();
    let n = v.len();
    if n > 1 {
        introsort_loop(&mut v, n, 2 * n.ilog2(), 0);
        // Final insertion sort: guarded over the first 16, unguarded after (the maximum of
        // the whole array is then among the first 16, so the scan stops in bounds).
        for i in 1..n {
            let val = v[i];
            let mut j = i;
            if i < THRESHOLD && comp(&val, &v[0]) {
                v.copy_within(0..i, 1);
                j = 0;
            } else {
                while comp(&val, &v[j - 1]) {
                    v[j] = v[j - 1];
                    j -= 1;
                }
            }
            v[j] = val;
        }
    }
    v.into_iter().map(|(_, i)| i).collect()
}

/// DARE drop: keep each entry with probability `density`, then rescale. mergekit draws and
/// rescales in bf16 for bf16 tensors (the keep probability is `bf16(density)`), and in f32
/// for f32 and f16 ones (torch has no f16 `bernoulli` on the CPU), rounding to `dtype` after.
/// The random stream is palign's own (see `super::Plan::rng`), not torch's.
pub fn bernoulli(
    delta: &[f32],
    density: f64,
    how: Rescale,
    rng: &mut impl Rng,
    dtype: FloatDtype,
) -> Vec<f32> {
    if density >= 1.0 {
        return delta.to_vec();
    }
    let (work, p) = match dtype {
        FloatDtype::BF16 => (dtype, round(density as f32, dtype) as f64),
        FloatDtype::F32 | FloatDtype::F16 => (FloatDtype::F32, density),
    };
    let mut kept: Vec<f32> = delta
        .iter()
        .map(|&x| if rng.random::<f64>() < p { x } else { 0.0 })
        .collect();
    rescale(delta, &mut kept, how, density, work);
    kept.iter_mut().for_each(|x| *x = round(*x, dtype));
    kept
}

/// TIES sign election and disjoint merge of already sparsified, *weighted* deltas, in
/// `dtype` (`weights` already rounded to it): majority sign = sign of `Σ δᵢ` (≥ 0 → +), keep
/// `δᵢ` whose sign agrees, sum them, and (if `normalize`) divide by the sum of the weights of
/// the agreeing models (0 → 1). Returns `base + λ·merged`. Each sum accumulates in f32 in model
/// order and is rounded once, like torch's `.sum(dim=0)`; `int8_mask` only changes the mask's
/// dtype, and the mask (`sign == majority`) is the same in every dtype.
pub fn ties_combine(
    base: &[f32],
    deltas: &[Vec<f32>],
    weights: &[f32],
    normalize: bool,
    lambda: f32,
    dtype: FloatDtype,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(base.len());
    for (i, &b) in base.iter().enumerate() {
        let total = round(deltas.iter().map(|d| d[i]).sum::<f32>(), dtype);
        let majority = if total >= 0.0 { 1.0f32 } else { -1.0 };
        let (mut mixed, mut divisor) = (0f32, 0f32);
        for (d, &w) in deltas.iter().zip(weights) {
            let x = d[i];
            // torch.sign(0) = 0 never equals the majority, so zeros are left out.
            let agrees = (x > 0.0 && majority > 0.0) || (x < 0.0 && majority < 0.0);
            if agrees {
                mixed += x;
                divisor += w;
            }
        }
        mixed = round(mixed, dtype);
        if normalize {
            let divisor = round(divisor, dtype);
            mixed = round(mixed / if divisor == 0.0 { 1.0 } else { divisor }, dtype);
        }
        if lambda != 1.0 {
            mixed = round(mixed * lambda, dtype);
        }
        out.push(round(b + mixed, dtype));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use FloatDtype::F32;

    #[test]
    fn slerp_of_orthogonal_unit_vectors_follows_the_circle() {
        let (r, dot) = slerp(0.5, &[1.0, 0.0], &[0.0, 1.0]);
        assert!(dot.abs() < 1e-7);
        let h = std::f32::consts::FRAC_1_SQRT_2;
        assert!((r[0] - h).abs() < 1e-6 && (r[1] - h).abs() < 1e-6, "{r:?}");
        // Parallel inputs take the lerp path: a plain weighted average.
        let (r, _) = slerp(0.25, &[2.0, 2.0], &[4.0, 4.0]);
        assert_eq!(r, vec![2.5, 2.5]);
    }

    #[test]
    fn argsort_puts_nan_first_and_never_runs_off_the_slice() {
        // 40 keys (past the insertion-sort threshold), ties and NaNs among them.
        let mut keys: Vec<f32> = (0..40).map(|i| (i % 7) as f32).collect();
        keys[3] = f32::NAN;
        keys[29] = f32::NAN;
        let order = torch_argsort_desc(&keys);
        let mut idx: Vec<u32> = order.clone();
        idx.sort_unstable();
        assert_eq!(idx, (0..40).collect::<Vec<u32>>());
        assert!(order[..2].iter().all(|&i| keys[i as usize].is_nan()));
        let rest: Vec<f32> = order[2..].iter().map(|&i| keys[i as usize]).collect();
        assert!(rest.windows(2).all(|w| w[0] >= w[1]), "{rest:?}");
    }

    #[test]
    fn magnitude_keeps_the_largest_and_rescale_matches_l1() {
        let d = [0.1, -0.5, 0.3, -0.05];
        assert_eq!(
            magnitude(&d, 0.5, Rescale::None, F32),
            vec![0.0, -0.5, 0.3, 0.0]
        );
        let r = magnitude(&d, 0.5, Rescale::L1, F32);
        let l1: f32 = r.iter().map(|x| x.abs()).sum();
        assert!((l1 - 0.95).abs() < 1e-6, "{l1}");
        // density 0.1 of 4 entries still keeps one
        assert_eq!(
            magnitude(&d, 0.1, Rescale::None, F32),
            vec![0.0, -0.5, 0.0, 0.0]
        );
    }

    #[test]
    fn ties_elects_by_weighted_sum_and_averages_agreeing_weights() {
        // element 0: +0.3·1 and −0.1·1 → majority +, only model 0 agrees → 0.3/1
        // element 1: −0.4 and +0.2 → majority −, only model 0 → −0.4/1
        // element 2: both zero → nothing agrees → base
        let deltas = vec![vec![0.3, -0.4, 0.0], vec![-0.1, 0.2, 0.0]];
        let out = ties_combine(&[1.0, 1.0, 1.0], &deltas, &[1.0, 1.0], true, 1.0, F32);
        let want = [1.3f32, 0.6, 1.0];
        assert!(
            out.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6),
            "{out:?}"
        );
        let w = [0.5f32, 0.5];
        let wd: Vec<Vec<f32>> = vec![vec![0.5 * 0.2], vec![0.5 * 0.4]];
        let out = ties_combine(&[0.0], &wd, &w, true, 2.0, F32);
        // both agree: (0.1 + 0.2) / (0.5 + 0.5) · λ=2
        assert!((out[0] - 0.6).abs() < 1e-6, "{out:?}");
    }

    #[test]
    fn bernoulli_keeps_about_density_and_inverse_density_rescales_survivors() {
        let d = vec![1.0f32; 20000];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let r = bernoulli(&d, 0.3, Rescale::InvDensity, &mut rng, F32);
        let kept = r.iter().filter(|&&x| x != 0.0).count() as f64 / d.len() as f64;
        assert!((kept - 0.3).abs() < 0.02, "{kept}");
        assert!(r.iter().all(|&x| x == 0.0 || (x - 1.0 / 0.3).abs() < 1e-6));
    }

    /// torch's CPU `argsort(descending=True)` permutations of keys with many ties, stored by
    /// tools/make_merge_fixtures.py.
    #[test]
    fn argsort_emulation_matches_torch_on_ties() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/merge/expected/argsort.json"
        );
        let cases: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        for c in cases.as_array().unwrap() {
            let keys: Vec<f32> = c["keys_times_8"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k.as_f64().unwrap() as f32 / 8.0)
                .collect();
            let want: Vec<u32> = c["order"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(torch_argsort_desc(&keys), want, "n = {}", keys.len());
            // top_k keeps the same set whether or not it needs the full sort.
            for k in [1, keys.len() / 3, keys.len() / 2] {
                let mut got = top_k(&keys, k.max(1));
                got.sort_unstable();
                let mut want = want[..k.max(1)].to_vec();
                want.sort_unstable();
                assert_eq!(got, want, "n = {}, k = {k}", keys.len());
            }
        }
    }

    #[test]
    fn bf16_ties_rounds_every_step() {
        use FloatDtype::BF16;
        assert_eq!(round(0.3, BF16), 0.30078125);
        // δ = bf16(0.013) = 0.0130005; λ·δ = 0.0117004 → 0.01171875; 1 + that is the midpoint
        // 1.01171875, which rounds to even: 1.015625. Rounded once, 1.0117004 → 1.0078125.
        let d = round(0.013, BF16);
        let out = ties_combine(&[1.0], &[vec![d]], &[1.0], false, 0.9, BF16);
        assert_eq!(out, vec![1.015625]);
        let once = ties_combine(&[1.0], &[vec![d]], &[1.0], false, 0.9, F32);
        assert_eq!(round(once[0], BF16), 1.0078125);
    }
}
