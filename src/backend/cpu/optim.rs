//! CPU references for the optimizer: AdamW and global gradient-norm clipping, f32,
//! pinned to PyTorch. The CUDA kernels (kernels/adamw.cu, kernels/grad_norm.cu) use the
//! same scalars ([`AdamWScalars`]) and are parity-tested against these functions.

use crate::error::{bad, Result};

/// The per-step scalars of `torch.optim.AdamW`, computed as torch does: in Python
/// floats (f64), then rounded to f32 when they meet an f32 tensor.
///
/// Source: torch/optim/adam.py `_single_tensor_adam` (AdamW = Adam with
/// `decoupled_weight_decay=True`), non-capturable path:
/// ```text
/// param.mul_(1 - lr * weight_decay)
/// exp_avg.lerp_(grad, 1 - beta1)
/// exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
/// step_size = lr / (1 - beta1 ** step)
/// denom = (exp_avg_sq.sqrt() / sqrt(1 - beta2 ** step)).add_(eps)
/// param.addcdiv_(exp_avg, denom, value=-step_size)
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWScalars {
    pub decay: f32,
    pub beta1: f32,
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    pub step_size: f32,
    pub bc2_sqrt: f32,
    pub eps: f32,
}

impl AdamWScalars {
    /// Scalars for the 1-based `step`.
    pub fn new(
        step: u64,
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    ) -> Result<Self> {
        if step == 0 {
            return Err(bad("adamw: step is 1-based, got 0"));
        }
        if !(0.0..1.0).contains(&beta1) || !(0.0..1.0).contains(&beta2) {
            return Err(bad(format!(
                "adamw: betas must be in [0, 1), got ({beta1}, {beta2})"
            )));
        }
        let t = step.min(i32::MAX as u64) as i32;
        let bc1 = 1.0 - beta1.powi(t);
        let bc2 = 1.0 - beta2.powi(t);
        Ok(AdamWScalars {
            decay: (1.0 - lr * weight_decay) as f32,
            beta1: beta1 as f32,
            one_minus_beta1: (1.0 - beta1) as f32,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            step_size: (lr / bc1) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            eps: eps as f32,
        })
    }

    /// One element's update, in torch's operation order. `g` is already clipped.
    #[inline]
    pub fn update(&self, p: &mut f32, g: f32, m: &mut f32, v: &mut f32) {
        *p *= self.decay;
        *m = lerp(*m, g, self.one_minus_beta1);
        *v = *v * self.beta2 + self.one_minus_beta2 * g * g;
        let denom = v.sqrt() / self.bc2_sqrt + self.eps;
        *p += -self.step_size * (*m / denom);
    }
}

/// torch's lerp (aten/src/ATen/native/Lerp.h): two forms chosen by |w| for accuracy.
#[inline]
pub fn lerp(start: f32, end: f32, w: f32) -> f32 {
    if w.abs() < 0.5 {
        start + w * (end - start)
    } else {
        end - (end - start) * (1.0 - w)
    }
}

/// One AdamW step (torch.optim.AdamW semantics, see [`AdamWScalars`]) over one tensor.
/// `step` is 1-based: the first call uses step 1.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    params: &mut [f32],
    grads: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    step: u64,
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
) -> Result<()> {
    let n = params.len();
    if grads.len() != n || m.len() != n || v.len() != n {
        return Err(bad(format!(
            "adamw: lengths differ (params {n}, grads {}, m {}, v {})",
            grads.len(),
            m.len(),
            v.len()
        )));
    }
    let s = AdamWScalars::new(step, lr, beta1, beta2, eps, weight_decay)?;
    for i in 0..n {
        s.update(&mut params[i], grads[i], &mut m[i], &mut v[i]);
    }
    Ok(())
}

/// `torch.nn.utils.clip_grad_norm_(grads, max_norm)` with the L2 norm; returns the
/// total norm before clipping.
///
/// Source: torch/nn/utils/clip_grad.py: `total = ‖[‖g_i‖ for each tensor]‖₂`,
/// `coef = max_norm / (total + 1e-6)`, grads `*= clamp(coef, max=1)`. Per-tensor norms
/// are accumulated in f64 here (torch's f32 reductions are tree-shaped, so far more
/// accurate than a sequential f32 sum) and rounded to f32 like torch's norm tensors.
/// The scale is applied only when `coef < 1` (multiplying by 1 changes nothing).
pub fn clip_grad_norm(grads: &mut [&mut [f32]], max_norm: f32) -> f32 {
    let total_sq: f64 = grads
        .iter()
        .map(|g| {
            let norm = g.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt() as f32;
            norm as f64 * norm as f64
        })
        .sum();
    let total = total_sq.sqrt() as f32;
    let coef = max_norm / (total + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            g.iter_mut().for_each(|x| *x *= coef);
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f32, b: f64, tol: f64) -> bool {
        ((a as f64) - b).abs() <= tol * (1.0 + b.abs())
    }

    #[test]
    fn first_step_by_hand() {
        // Step 1: m̂ = g and v̂ = g², so the update is lr·g/(|g|+eps) ≈ lr·sign(g),
        // applied after the decoupled decay p·(1 − lr·wd).
        let (lr, wd, eps) = (0.1, 0.01, 1e-8);
        let mut p = vec![1.0f32, -2.0, 0.5];
        let g = vec![0.5f32, -3.0, 0.0];
        let (mut m, mut v) = (vec![0.0f32; 3], vec![0.0f32; 3]);
        adamw_step(&mut p, &g, &mut m, &mut v, 1, lr, 0.9, 0.999, eps, wd).unwrap();
        let want = [
            1.0 * (1.0 - 0.001) - 0.1 * 0.5 / (0.5 + 1e-8),
            -2.0 * (1.0 - 0.001) + 0.1 * 3.0 / (3.0 + 1e-8),
            0.5 * (1.0 - 0.001), // zero grad: only the decay moves it
        ];
        for i in 0..3 {
            assert!(
                close(p[i], want[i], 1e-6),
                "p[{i}] = {} want {}",
                p[i],
                want[i]
            );
        }
        assert!(close(m[0], 0.05, 1e-6) && close(v[0], 0.00025, 1e-6));
        assert!(close(m[1], -0.3, 1e-6) && close(v[1], 0.009, 1e-6));
    }

    #[test]
    fn matches_textbook_adamw_in_f64_over_steps() {
        // Independent f64 AdamW (Loshchilov & Hutter, as torch documents it):
        // p -= lr·wd·p; m = b1·m + (1−b1)·g; v = b2·v + (1−b2)·g²;
        // p -= lr · (m/(1−b1^t)) / (sqrt(v/(1−b2^t)) + eps).
        let (lr, b1, b2, eps, wd) = (3e-3, 0.9, 0.95, 1e-6, 0.1);
        let n = 7;
        let mut p32: Vec<f32> = (0..n).map(|i| (i as f32 - 3.0) * 0.37).collect();
        let mut p64: Vec<f64> = p32.iter().map(|&x| x as f64).collect();
        let (mut m32, mut v32) = (vec![0.0f32; n], vec![0.0f32; n]);
        let (mut m64, mut v64) = (vec![0.0f64; n], vec![0.0f64; n]);
        for step in 1..=6u64 {
            // Gradients vary with the step and the index, some negative, one zero.
            let g32: Vec<f32> = (0..n)
                .map(|i| ((i * 3 + step as usize) % 5) as f32 * 0.21 - 0.42)
                .collect();
            adamw_step(
                &mut p32, &g32, &mut m32, &mut v32, step, lr, b1, b2, eps, wd,
            )
            .unwrap();
            for i in 0..n {
                let g = g32[i] as f64;
                p64[i] -= lr * wd * p64[i];
                m64[i] = b1 * m64[i] + (1.0 - b1) * g;
                v64[i] = b2 * v64[i] + (1.0 - b2) * g * g;
                let mhat = m64[i] / (1.0 - b1.powi(step as i32));
                let vhat = v64[i] / (1.0 - b2.powi(step as i32));
                p64[i] -= lr * mhat / (vhat.sqrt() + eps);
            }
        }
        for i in 0..n {
            assert!(
                close(p32[i], p64[i], 1e-5),
                "p[{i}] = {} want {}",
                p32[i],
                p64[i]
            );
            assert!(
                close(m32[i], m64[i], 1e-5),
                "m[{i}] = {} want {}",
                m32[i],
                m64[i]
            );
            assert!(
                close(v32[i], v64[i], 1e-5),
                "v[{i}] = {} want {}",
                v32[i],
                v64[i]
            );
        }
    }

    #[test]
    fn adamw_rejects_bad_input() {
        let mut p = vec![0.0f32; 2];
        let (mut m, mut v) = (vec![0.0f32; 2], vec![0.0f32; 2]);
        assert!(adamw_step(
            &mut p,
            &[1.0],
            &mut m,
            &mut v,
            1,
            1e-3,
            0.9,
            0.999,
            1e-8,
            0.0
        )
        .is_err());
        assert!(adamw_step(
            &mut p,
            &[1.0, 2.0],
            &mut m,
            &mut v,
            0,
            1e-3,
            0.9,
            0.999,
            1e-8,
            0.0
        )
        .is_err());
        assert!(AdamWScalars::new(1, 1e-3, 1.0, 0.999, 1e-8, 0.0).is_err());
    }

    #[test]
    fn lerp_matches_both_forms() {
        assert_eq!(lerp(1.0, 3.0, 0.25), 1.5);
        assert_eq!(lerp(1.0, 3.0, 0.75), 2.5);
        assert_eq!(lerp(-2.0, 2.0, 0.5), 0.0);
    }

    #[test]
    fn clip_scales_when_norm_exceeds_max() {
        // ‖[3, 0]‖² + ‖[4]‖² = 25 → total 5; max_norm 1 → coef 1/(5 + 1e-6).
        let (mut a, mut b) = (vec![3.0f32, 0.0], vec![4.0f32]);
        let total = clip_grad_norm(&mut [&mut a[..], &mut b[..]], 1.0);
        assert!(close(total, 5.0, 1e-7));
        let coef = 1.0 / (5.0 + 1e-6);
        assert!(close(a[0], 3.0 * coef, 1e-6) && a[1] == 0.0 && close(b[0], 4.0 * coef, 1e-6));
    }

    #[test]
    fn clip_leaves_small_grads_alone() {
        let (mut a, mut b) = (vec![0.3f32, -0.4], vec![1.2f32]);
        let total = clip_grad_norm(&mut [&mut a[..], &mut b[..]], 10.0);
        assert!(close(total, (0.09f64 + 0.16 + 1.44).sqrt(), 1e-6));
        assert_eq!((a, b), (vec![0.3f32, -0.4], vec![1.2f32]));
        assert_eq!(clip_grad_norm(&mut [], 1.0), 0.0);
    }
}
