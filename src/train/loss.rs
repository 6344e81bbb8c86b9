//! Training losses and their gradients with respect to per-sequence log-probs.
//! SFT: mean token cross-entropy over the step's completion tokens. DPO as TRL
//! (`DPOTrainer.dpo_loss`, facts only): with `z = β·((πc−πr) − (rc−rr))`,
//! sigmoid loss `−(1−ls)·logσ(z) − ls·logσ(−z)`; IPO `(z/β − 1/(2β))²` on per-token
//! mean log-probs; rewards `β(π−r)`.

use crate::error::{bad, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DpoKind {
    Sigmoid,
    Ipo,
}

impl std::str::FromStr for DpoKind {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "sigmoid" => Ok(DpoKind::Sigmoid),
            "ipo" => Ok(DpoKind::Ipo),
            _ => Err(bad(format!(
                "--loss: unknown DPO loss `{s}` (sigmoid, ipo)"
            ))),
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct DpoCfg {
    pub beta: f64,
    pub label_smoothing: f64,
    pub kind: DpoKind,
}

/// One pair's loss and ∂loss/∂πc, ∂loss/∂πr (the policy's sequence log-probs, as passed:
/// sums for sigmoid, per-token means for IPO).
#[derive(Clone, Copy, Debug)]
pub struct PairLoss {
    pub loss: f64,
    pub d_chosen: f64,
    pub d_rejected: f64,
}

fn log_sigmoid(x: f64) -> f64 {
    // Stable for large |x|: log σ(x) = −log(1+e^{−x}).
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

pub fn dpo_pair(cfg: &DpoCfg, pc: f64, pr: f64, rc: f64, rr: f64) -> PairLoss {
    let logits = (pc - pr) - (rc - rr);
    match cfg.kind {
        DpoKind::Sigmoid => {
            let z = cfg.beta * logits;
            let ls = cfg.label_smoothing;
            let loss = -(1.0 - ls) * log_sigmoid(z) - ls * log_sigmoid(-z);
            let dz = -(1.0 - ls) * sigmoid(-z) + ls * sigmoid(z);
            PairLoss {
                loss,
                d_chosen: dz * cfg.beta,
                d_rejected: -dz * cfg.beta,
            }
        }
        DpoKind::Ipo => {
            let t = logits - 1.0 / (2.0 * cfg.beta);
            PairLoss {
                loss: t * t,
                d_chosen: 2.0 * t,
                d_rejected: -2.0 * t,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigmoid_loss_and_gradient() {
        let cfg = DpoCfg {
            beta: 0.1,
            label_smoothing: 0.0,
            kind: DpoKind::Sigmoid,
        };
        // zero margin: loss = log 2
        let p = dpo_pair(&cfg, -10.0, -10.0, -12.0, -12.0);
        assert!((p.loss - std::f64::consts::LN_2).abs() < 1e-12);
        // central differences of the loss in πc and πr
        for ls in [0.0, 0.2] {
            let cfg = DpoCfg {
                label_smoothing: ls,
                ..cfg
            };
            let (pc, pr, rc, rr) = (-9.0, -14.0, -10.0, -11.5);
            let h = 1e-5;
            let p = dpo_pair(&cfg, pc, pr, rc, rr);
            let fc = (dpo_pair(&cfg, pc + h, pr, rc, rr).loss
                - dpo_pair(&cfg, pc - h, pr, rc, rr).loss)
                / (2.0 * h);
            let fr = (dpo_pair(&cfg, pc, pr + h, rc, rr).loss
                - dpo_pair(&cfg, pc, pr - h, rc, rr).loss)
                / (2.0 * h);
            assert!((fc - p.d_chosen).abs() < 1e-8 && (fr - p.d_rejected).abs() < 1e-8);
        }
        let ipo = DpoCfg {
            beta: 0.5,
            label_smoothing: 0.0,
            kind: DpoKind::Ipo,
        };
        assert!((dpo_pair(&ipo, 1.0, 0.0, 0.0, 0.0).loss - 0.0).abs() < 1e-12);
    }
}
