//! `config.json` (`ModelConfig::from_json`) and PEFT `adapter_config.json`
//! (`lora::peft::load_config`), both on the whole input.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use palign::lora::peft::load_config;
use palign::model::ModelConfig;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        if let Ok(c) = ModelConfig::from_json(v) {
            assert!(c.vocab_size > 0 && c.hidden_size > 0 && c.num_layers > 0);
            assert!(c.num_kv_heads > 0 && c.num_heads % c.num_kv_heads == 0);
            assert!(c.head_dim % 2 == 0 && c.rope_theta > 0.0);
            let _ = (c.arch.class_name(), c.arch.model_type());
        }
    }
    let dir = common::fresh_dir("adapter");
    std::fs::write(dir.join("adapter_config.json"), data).expect("write input");
    if let Ok(c) = load_config(&dir) {
        assert!(c.r > 0 && !c.targets.is_empty());
        let _ = c.validate();
        let _ = c.scale();
    }
});
