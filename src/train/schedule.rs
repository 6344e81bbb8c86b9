//! Learning-rate schedules with transformers' semantics (`get_scheduler`: linear warmup
//! `s/w`, then constant, linear decay `(T−s)/(T−w)`, or half-cosine
//! `0.5·(1+cos(π·(s−w)/(T−w)))`), evaluated at step s counted from 0. transformers'
//! `constant` takes no warm-up (it ignores `num_warmup_steps`); `constant_with_warmup` does.

use crate::error::{bad, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    Constant,
    ConstantWithWarmup,
    Linear,
    Cosine,
}

impl std::str::FromStr for Schedule {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "constant" => Ok(Schedule::Constant),
            "constant_with_warmup" => Ok(Schedule::ConstantWithWarmup),
            "linear" => Ok(Schedule::Linear),
            "cosine" => Ok(Schedule::Cosine),
            _ => Err(bad(format!(
                "--scheduler: unknown schedule `{s}` (constant, constant_with_warmup, cosine, linear)"
            ))),
        }
    }
}

impl Schedule {
    pub fn name(self) -> &'static str {
        match self {
            Schedule::Constant => "constant",
            Schedule::ConstantWithWarmup => "constant_with_warmup",
            Schedule::Linear => "linear",
            Schedule::Cosine => "cosine",
        }
    }

    /// Whether `warmup` steps change this schedule (transformers' `constant` ignores them;
    /// the CLI refuses the pair rather than drop the user's warm-up silently).
    pub fn takes_warmup(self) -> bool {
        self != Schedule::Constant
    }

    /// Learning rate of step `s` (0-based) of `total` with `warmup` warm-up steps.
    pub fn lr(self, base: f64, s: usize, total: usize, warmup: usize) -> f64 {
        let warmup = if self.takes_warmup() { warmup } else { 0 };
        if s < warmup {
            return base * s as f64 / warmup.max(1) as f64;
        }
        let span = total.saturating_sub(warmup).max(1) as f64;
        let progress = (s - warmup) as f64 / span;
        match self {
            Schedule::Constant | Schedule::ConstantWithWarmup => base,
            Schedule::Linear => base * ((total as f64 - s as f64) / span).max(0.0),
            Schedule::Cosine => {
                base * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay() {
        let c = Schedule::Cosine;
        assert_eq!(c.lr(1.0, 0, 10, 2), 0.0);
        assert_eq!(c.lr(1.0, 1, 10, 2), 0.5);
        assert_eq!(c.lr(1.0, 2, 10, 2), 1.0);
        assert!((c.lr(1.0, 6, 10, 2) - 0.5).abs() < 1e-12); // halfway through the decay
        assert!((Schedule::Linear.lr(2.0, 6, 10, 2) - 1.0).abs() < 1e-12);
        assert_eq!(Schedule::Constant.lr(3.0, 9, 10, 0), 3.0);
        assert!("step".parse::<Schedule>().is_err());
    }

    #[test]
    fn constant_ignores_warmup_as_transformers_does() {
        // transformers 5.x: get_scheduler("constant", num_warmup_steps=2) gives 1.0 at
        // every step; "constant_with_warmup" gives s/2 for s < 2, then 1.0.
        for s in 0..5 {
            assert_eq!(Schedule::Constant.lr(1.0, s, 5, 2), 1.0);
        }
        let w: Vec<f64> = (0..5)
            .map(|s| Schedule::ConstantWithWarmup.lr(1.0, s, 5, 2))
            .collect();
        assert_eq!(w, [0.0, 0.5, 1.0, 1.0, 1.0]);
        assert!(!Schedule::Constant.takes_warmup() && Schedule::ConstantWithWarmup.takes_warmup());
        let c: Schedule = "constant_with_warmup".parse().unwrap();
        assert_eq!(c.name(), "constant_with_warmup");
    }
}
