//! `palign init-tiny`: a deterministic tiny LLaMA or Mistral model folder (config,
//! random weights, a byte-fallback BPE tokenizer trained on the shipped corpus) that
//! every command accepts. Shapes are small enough for CPU tests and the demo.

use super::config::Arch;
use super::weights::{self, FloatDtype, TensorOut};
use crate::error::{bad, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use std::path::Path;

/// Text the tiny tokenizer is trained on (original text shipped with palign).
pub const CORPUS: &str = include_str!("tiny_corpus.txt");

pub const VOCAB: usize = 512;
const HIDDEN: usize = 128;
const INTERMEDIATE: usize = 344;
const LAYERS: usize = 4;
const HEADS: usize = 4;
const MISTRAL_KV_HEADS: usize = 2;
const MISTRAL_WINDOW: usize = 64;

/// config.json of the tiny model, in transformers' layout.
pub fn config_json(arch: Arch) -> Value {
    let (kv, window) = match arch {
        Arch::Llama => (HEADS, Value::Null),
        Arch::Mistral => (MISTRAL_KV_HEADS, json!(MISTRAL_WINDOW)),
    };
    let mut c = json!({
        "architectures": [arch.class_name()],
        "model_type": arch.model_type(),
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": kv,
        "head_dim": HIDDEN / HEADS,
        "hidden_act": "silu",
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
    });
    if arch == Arch::Mistral {
        c["sliding_window"] = window;
    }
    c
}

/// Random weights: N(0, 0.02²) projections and embeddings (transformers'
/// `initializer_range` default), unit RMSNorm weights. Deterministic in `seed`.
fn weights(arch: Arch, seed: u64) -> Vec<TensorOut> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut normal = |n: usize, std: f32| -> Vec<f32> {
        // Box–Muller: enough for test weights, and fixed across platforms.
        (0..n)
            .map(|_| {
                let u1: f32 = rng.random::<f32>().max(1e-12);
                let u2: f32 = rng.random::<f32>();
                std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
            })
            .collect()
    };
    let kv = if arch == Arch::Mistral {
        MISTRAL_KV_HEADS
    } else {
        HEADS
    };
    let hd = HIDDEN / HEADS;
    let mut out = Vec::new();
    let f = |name: String, shape: Vec<usize>, v: Vec<f32>| {
        TensorOut::float(name, shape, FloatDtype::F32, &v)
    };
    out.push(f(
        "model.embed_tokens.weight".into(),
        vec![VOCAB, HIDDEN],
        normal(VOCAB * HIDDEN, 0.02),
    ));
    for l in 0..LAYERS {
        let shapes = [
            ("self_attn.q_proj", HEADS * hd, HIDDEN),
            ("self_attn.k_proj", kv * hd, HIDDEN),
            ("self_attn.v_proj", kv * hd, HIDDEN),
            ("self_attn.o_proj", HIDDEN, HEADS * hd),
            ("mlp.gate_proj", INTERMEDIATE, HIDDEN),
            ("mlp.up_proj", INTERMEDIATE, HIDDEN),
            ("mlp.down_proj", HIDDEN, INTERMEDIATE),
        ];
        for (name, o, i) in shapes {
            out.push(f(
                format!("model.layers.{l}.{name}.weight"),
                vec![o, i],
                normal(o * i, 0.02),
            ));
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            out.push(f(
                format!("model.layers.{l}.{norm}.weight"),
                vec![HIDDEN],
                vec![1.0; HIDDEN],
            ));
        }
    }
    out.push(f(
        "model.norm.weight".into(),
        vec![HIDDEN],
        vec![1.0; HIDDEN],
    ));
    out.push(f(
        "lm_head.weight".into(),
        vec![VOCAB, HIDDEN],
        normal(VOCAB * HIDDEN, 0.02),
    ));
    out
}

/// Metaspace pre-tokenization (`▁` for spaces, one `▁` prepended, split before each `▁`),
/// as the trained tokenizer's pre-tokenizer will do it.
fn metaspace_pieces(line: &str) -> Vec<String> {
    let s = format!("▁{}", line.replace(' ', "▁"));
    let mut pieces = Vec::new();
    let mut cur = String::new();
    for ch in s.chars() {
        if ch == '▁' && !cur.is_empty() {
            pieces.push(std::mem::take(&mut cur));
        }
        cur.push(ch);
    }
    if !cur.is_empty() {
        pieces.push(cur);
    }
    pieces
}

/// A LLaMA-layout tokenizer.json: `<unk>`=0, `<s>`=1, `</s>`=2, byte tokens
/// `<0x00>`..`<0xFF>` at 3..258 (byte fallback), then BPE tokens learned from `CORPUS`.
pub fn tokenizer_json() -> Result<Value> {
    use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
    use tokenizers::Trainer;
    let specials = ["<unk>", "<s>", "</s>"];
    let learned = VOCAB - specials.len() - 256;
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(learned)
        .min_frequency(2)
        .show_progress(false)
        .build();
    trainer
        .feed(CORPUS.lines(), |l| Ok(metaspace_pieces(l)))
        .map_err(|e| bad(format!("tokenizer training: {e}")))?;
    let mut bpe = BPE::default();
    trainer
        .train(&mut bpe)
        .map_err(|e| bad(format!("tokenizer training: {e}")))?;
    let trained =
        serde_json::to_value(&bpe).map_err(|e| bad(format!("tokenizer training: {e}")))?;
    let mut learned_tokens: Vec<(String, u64)> = trained["vocab"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default();
    learned_tokens.sort_by_key(|(_, id)| *id);
    let mut vocab = serde_json::Map::new();
    for (i, s) in specials.iter().enumerate() {
        vocab.insert(s.to_string(), json!(i));
    }
    for b in 0..256 {
        vocab.insert(format!("<0x{b:02X}>"), json!(3 + b));
    }
    for (tok, _) in learned_tokens {
        if !vocab.contains_key(&tok) && vocab.len() < VOCAB {
            let id = vocab.len();
            vocab.insert(tok, json!(id));
        }
    }
    let added: Vec<Value> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": true},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}
        ]},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": trained["merges"].clone()
        }
    }))
}

pub fn tokenizer_config_json() -> Value {
    json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": true, "add_eos_token": false, "model_max_length": 1024,
        "clean_up_tokenization_spaces": false
    })
}

/// Writes the whole model folder into `dir` (which must exist and be empty or new).
pub fn write_model(dir: &Path, arch: Arch, seed: u64) -> Result<()> {
    let pretty = |v: &Value| serde_json::to_vec_pretty(v).expect("json serializes");
    let tok = tokenizer_json()?;
    // Validate the tokenizer we are about to write by loading it.
    tokenizers::Tokenizer::from_bytes(serde_json::to_vec(&tok).expect("json serializes"))
        .map_err(|e| bad(format!("generated tokenizer does not load: {e}")))?;
    crate::fsio::write_bytes_atomic(&dir.join("config.json"), &pretty(&config_json(arch)))?;
    crate::fsio::write_bytes_atomic(&dir.join("tokenizer.json"), &pretty(&tok))?;
    crate::fsio::write_bytes_atomic(
        &dir.join("tokenizer_config.json"),
        &pretty(&tokenizer_config_json()),
    )?;
    crate::fsio::write_bytes_atomic(
        &dir.join("generation_config.json"),
        &pretty(&json!({"bos_token_id": 1, "eos_token_id": 2})),
    )?;
    weights::write_file(&dir.join("model.safetensors"), &weights(arch, seed))
}
