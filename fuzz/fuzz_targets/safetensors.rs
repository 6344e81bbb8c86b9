//! Safetensors reading: `Weights::open_files` on one file, or `Weights::open_dir` on a
//! folder with `model.safetensors.index.json` and shards, then every tensor's bytes and
//! its f32 widening.
//!
//! Input: byte 0 picks the mode (bit 0 clear: the rest is one `model.safetensors`; set:
//! the rest is split at `SEP` into the index JSON and shards `model-1.safetensors`, ...).
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use palign::model::weights::{to_f32, Weights};

const SEP: &[u8] = b"\n@@shard@@\n";

fn read_all(w: &Weights) {
    let names: Vec<String> = w.names().cloned().collect();
    for name in names {
        let e = w.get(&name).expect("listed name").clone();
        let bytes = w.bytes(&e);
        assert_eq!(bytes.len(), e.end - e.start);
        let _ = w.path_of(&e);
        if let Ok(v) = to_f32(bytes, e.dtype) {
            // Every float dtype palign reads has whole elements (safetensors checks sizes).
            let numel: usize = e.shape.iter().product();
            assert_eq!(v.len(), numel, "{name}: {:?} {:?}", e.dtype, e.shape);
        }
        let _ = w.f32(&name, &e.shape);
        let _ = w.entry(&name, &[1]);
    }
    let _ = w.f32("missing", &[1]);
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let dir = common::fresh_dir("safetensors");
    if mode & 1 == 0 {
        let path = dir.join("model.safetensors");
        std::fs::write(&path, rest).expect("write input");
        if let Ok(w) = Weights::open_files(&[path]) {
            read_all(&w);
        }
    } else {
        let parts = common::split(rest, SEP);
        std::fs::write(dir.join("model.safetensors.index.json"), parts[0]).expect("write input");
        for (i, shard) in parts[1..].iter().enumerate() {
            let path = dir.join(format!("model-{}.safetensors", i + 1));
            std::fs::write(path, shard).expect("write input");
        }
        if let Ok(w) = Weights::open_dir(&dir) {
            read_all(&w);
        }
    }
});
