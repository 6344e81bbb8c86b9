//! The PALIGN_* environment switches that pick among equivalent paths (kernels, defaults
//! measured on a GPU). Each is read through one table, so every switch takes its values
//! the same way, and `check` refuses an unknown value where the command line starts
//! (exit 2) instead of a silent fallback deep inside a run. The switches that name a
//! kernel variant or a tuning mode (PALIGN_ATTN_FWD/BWD, PALIGN_ATTN_TUNE,
//! PALIGN_LORA_DROP, PALIGN_NF4_PATH, PALIGN_DEVICE) keep their own parsers, which
//! already refuse unknown values where they are read.

use crate::error::{bad, Result};

/// A switch: its variable, the values it takes and what each means, and the value when
/// the variable is unset or empty.
pub struct Switch<T: 'static> {
    pub name: &'static str,
    pub table: &'static [(&'static str, T)],
    pub default: T,
}

/// The spellings of on and off that every on/off switch takes.
pub const ON_OFF: &[(&str, bool)] = &[
    ("1", true),
    ("on", true),
    ("true", true),
    ("0", false),
    ("off", false),
    ("false", false),
];

impl<T: Copy> Switch<T> {
    /// The switch's value; an error naming the variable and its values when it holds
    /// anything else.
    pub fn read(&self) -> Result<T> {
        self.parse(std::env::var(self.name).ok().as_deref())
    }

    /// `read` for code that cannot fail: a bad value (which `check` refuses before any
    /// command runs) reads as the default.
    pub fn get(&self) -> T {
        self.read().unwrap_or(self.default)
    }

    /// The value `v` (the variable's text, `None`: unset) stands for.
    pub fn parse(&self, v: Option<&str>) -> Result<T> {
        match v {
            None | Some("") => Ok(self.default),
            Some(v) => self
                .table
                .iter()
                .find(|(k, _)| *k == v)
                .map(|&(_, t)| t)
                .ok_or_else(|| {
                    let names: Vec<&str> = self.table.iter().map(|(k, _)| *k).collect();
                    bad(format!(
                        "{}={v:?}: expected one of {}",
                        self.name,
                        names.join(", ")
                    ))
                }),
        }
    }
}

/// `fused`: the tensor-core lm_head log-prob forward; `chunked` (default): cuBLAS logits
/// per chunk + one kernel.
pub const LOGPROB_FUSED: Switch<bool> = Switch {
    name: "PALIGN_LOGPROB",
    table: &[("chunked", false), ("fused", true)],
    default: false,
};

/// Whether training takes the lm_head gradient in the forward (`forward`, default) or in
/// the backward (`backward`; `off`/`0` as before).
pub const LOGPROB_GRAD_IN_FORWARD: Switch<bool> = Switch {
    name: "PALIGN_LOGPROB_GRAD",
    table: &[
        ("forward", true),
        ("on", true),
        ("1", true),
        ("true", true),
        ("backward", false),
        ("off", false),
        ("0", false),
        ("false", false),
    ],
    default: true,
};

/// Shared-prompt computation in packed batches (default on).
pub const SHARE_PREFIX: Switch<bool> = Switch {
    name: "PALIGN_SHARE_PREFIX",
    table: ON_OFF,
    default: true,
};

/// The fused NF4 + LoRA kernels (default off).
pub const FUSED_LORA: Switch<bool> = Switch {
    name: "PALIGN_FUSED_LORA",
    table: ON_OFF,
    default: false,
};

/// The one-pass LoRA up-projection backward (`fused`) or two cuBLAS products (`unfused`,
/// default).
pub const LORA_UP_FUSED: Switch<bool> = Switch {
    name: "PALIGN_LORA_UP",
    table: &[("unfused", false), ("fused", true)],
    default: false,
};

/// Greedy decoding picks the token on the device (default on).
pub const DEVICE_ARGMAX: Switch<bool> = Switch {
    name: "PALIGN_DEVICE_ARGMAX",
    table: ON_OFF,
    default: true,
};

/// The NF4 dispatcher may time the wgmma GEMM on sm_90 (default off).
pub const NF4_WGMMA: Switch<bool> = Switch {
    name: crate::backend::cuda::nf4::WGMMA_ENV,
    table: ON_OFF,
    default: false,
};

/// Every switch above, read once: the first bad value is an error.
pub fn check() -> Result<()> {
    for s in [
        &LOGPROB_FUSED,
        &LOGPROB_GRAD_IN_FORWARD,
        &SHARE_PREFIX,
        &FUSED_LORA,
        &LORA_UP_FUSED,
        &DEVICE_ARGMAX,
        &NF4_WGMMA,
    ] {
        s.read()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_read_through_the_table() {
        let s = &LOGPROB_GRAD_IN_FORWARD;
        assert!(s.parse(None).unwrap());
        assert!(s.parse(Some("")).unwrap());
        assert!(!s.parse(Some("backward")).unwrap());
        assert!(!s.parse(Some("0")).unwrap());
        assert!(FUSED_LORA.parse(Some("on")).unwrap());
        assert!(!SHARE_PREFIX.parse(Some("false")).unwrap());
        let e = FUSED_LORA.parse(Some("yes")).unwrap_err();
        assert!(e.is_bad_input());
        assert_eq!(
            e.to_string(),
            r#"PALIGN_FUSED_LORA="yes": expected one of 1, on, true, 0, off, false"#
        );
        // Case matters, as it does for every other PALIGN_* value.
        assert!(LORA_UP_FUSED.parse(Some("Fused")).is_err());
    }
}
