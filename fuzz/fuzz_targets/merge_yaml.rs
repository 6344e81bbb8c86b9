//! The merge YAML (`merge::config::MergeConfig::parse`: mergekit's layout and palign's
//! checks, no models read), then every parameter setting evaluated the way a merge asks
//! for it (per tensor name, at several gradient positions).
#![no_main]

use libfuzzer_sys::fuzz_target;
use palign::merge::config::MergeConfig;
use palign::merge::params::{lookup, Params};

const TENSORS: [&str; 3] = ["model.layers.3.mlp.up_proj.weight", "lm_head.weight", ""];
const TS: [f64; 4] = [0.0, 0.37, 0.5, 1.0];

fn evaluate(p: &Params) {
    for (name, setting) in p {
        for tensor in TENSORS {
            for t in TS {
                if let Some(s) = setting.evaluate(tensor, t) {
                    let _ = s.as_f64(name);
                    let _ = s.as_bool(name);
                }
                let _ = lookup(&[p], name, tensor, t);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = MergeConfig::parse(text) else {
        return;
    };
    assert!(!cfg.slices.is_empty() && !cfg.models.is_empty());
    assert!(cfg.base.is_none_or(|b| b < cfg.models.len()));
    evaluate(&cfg.params);
    for s in &cfg.slices {
        assert!(!s.sources.is_empty());
        assert!(s.base.is_none_or(|b| b < cfg.models.len()));
        evaluate(&s.params);
        for src in &s.sources {
            assert!(src.model < cfg.models.len());
            if let Some((a, b)) = src.layer_range {
                assert!(a < b);
            }
            evaluate(&src.params);
        }
    }
    let _ = cfg.method.name();
    let _ = cfg.method.needs_base();
});
