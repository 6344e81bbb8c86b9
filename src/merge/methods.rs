//! The merge kernels on one tensor, f32 (formulas from mergekit 0.1.5 `merge_methods/slerp.py`,
//! `linear.py`, `generalized_task_arithmetic.py` and `sparsify.py`; facts only). Reductions
//! (norms, dots, L1 sums) accumulate in f64 and are rounded to f32, which keeps them within an
//! ulp of torch's f32 reductions.

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

fn rescale(delta: &[f32], kept: &mut [f32], how: Rescale, density: f64) {
    match how {
        Rescale::None => {}
        Rescale::InvDensity => {
            let d = density as f32;
            kept.iter_mut().for_each(|x| *x /= d);
        }
        Rescale::L1 => {
            let l1 = |v: &[f32]| v.iter().map(|x| x.abs() as f64).sum::<f64>() as f32;
            let (before, after) = (l1(delta), l1(kept));
            if before < RESCALE_EPS || after < RESCALE_EPS {
                return;
            }
            let s = before / after;
            kept.iter_mut().for_each(|x| *x *= s);
        }
    }
}

/// TIES trim: keep the `max(1, ⌊density·n⌋)` largest-magnitude entries (ties at the cut are
/// broken arbitrarily, as torch's unstable argsort does).
pub fn magnitude(delta: &[f32], density: f64, how: Rescale) -> Vec<f32> {
    if density >= 1.0 {
        return delta.to_vec();
    }
    if density <= 0.0 || delta.is_empty() {
        return vec![0.0; delta.len()];
    }
    let k = ((density * delta.len() as f64) as usize).max(1);
    let mut order: Vec<u32> = (0..delta.len() as u32).collect();
    order.select_nth_unstable_by(k - 1, |&a, &b| {
        delta[b as usize].abs().total_cmp(&delta[a as usize].abs())
    });
    let mut kept = vec![0f32; delta.len()];
    for &i in &order[..k] {
        kept[i as usize] = delta[i as usize];
    }
    rescale(delta, &mut kept, how, density);
    kept
}

/// DARE drop: keep each entry with probability `density`, then rescale.
pub fn bernoulli(delta: &[f32], density: f64, how: Rescale, rng: &mut impl Rng) -> Vec<f32> {
    if density >= 1.0 {
        return delta.to_vec();
    }
    let mut kept: Vec<f32> = delta
        .iter()
        .map(|&x| {
            if rng.random::<f64>() < density {
                x
            } else {
                0.0
            }
        })
        .collect();
    rescale(delta, &mut kept, how, density);
    kept
}

/// TIES sign election and disjoint merge of already sparsified, *weighted* deltas:
/// majority sign = sign of `Σ δᵢ` (≥ 0 → +), keep `δᵢ` whose sign agrees, sum them, and
/// (if `normalize`) divide by the sum of the weights of the agreeing models (0 → 1).
/// Returns `base + λ·merged`.
pub fn ties_combine(
    base: &[f32],
    deltas: &[Vec<f32>],
    weights: &[f32],
    normalize: bool,
    lambda: f32,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(base.len());
    for (i, &b) in base.iter().enumerate() {
        let total: f32 = deltas.iter().map(|d| d[i]).sum();
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
        if normalize {
            mixed /= if divisor == 0.0 { 1.0 } else { divisor };
        }
        if lambda != 1.0 {
            mixed *= lambda;
        }
        out.push(b + mixed);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

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
    fn magnitude_keeps_the_largest_and_rescale_matches_l1() {
        let d = [0.1, -0.5, 0.3, -0.05];
        assert_eq!(magnitude(&d, 0.5, Rescale::None), vec![0.0, -0.5, 0.3, 0.0]);
        let r = magnitude(&d, 0.5, Rescale::L1);
        let l1: f32 = r.iter().map(|x| x.abs()).sum();
        assert!((l1 - 0.95).abs() < 1e-6, "{l1}");
        // density 0.1 of 4 entries still keeps one
        assert_eq!(magnitude(&d, 0.1, Rescale::None), vec![0.0, -0.5, 0.0, 0.0]);
    }

    #[test]
    fn ties_elects_by_weighted_sum_and_averages_agreeing_weights() {
        // element 0: +0.3·1 and −0.1·1 → majority +, only model 0 agrees → 0.3/1
        // element 1: −0.4 and +0.2 → majority −, only model 0 → −0.4/1
        // element 2: both zero → nothing agrees → base
        let deltas = vec![vec![0.3, -0.4, 0.0], vec![-0.1, 0.2, 0.0]];
        let out = ties_combine(&[1.0, 1.0, 1.0], &deltas, &[1.0, 1.0], true, 1.0);
        let want = [1.3f32, 0.6, 1.0];
        assert!(
            out.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6),
            "{out:?}"
        );
        let w = [0.5f32, 0.5];
        let wd: Vec<Vec<f32>> = vec![vec![0.5 * 0.2], vec![0.5 * 0.4]];
        let out = ties_combine(&[0.0], &wd, &w, true, 2.0);
        // both agree: (0.1 + 0.2) / (0.5 + 0.5) · λ=2
        assert!((out[0] - 0.6).abs() < 1e-6, "{out:?}");
    }

    #[test]
    fn bernoulli_keeps_about_density_and_inverse_density_rescales_survivors() {
        let d = vec![1.0f32; 20000];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let r = bernoulli(&d, 0.3, Rescale::InvDensity, &mut rng);
        let kept = r.iter().filter(|&&x| x != 0.0).count() as f64 / d.len() as f64;
        assert!((kept - 0.3).abs() < 0.02, "{kept}");
        assert!(r.iter().all(|&x| x == 0.0 || (x - 1.0 / 0.3).abs() < 1e-6));
    }
}
