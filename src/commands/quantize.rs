//! `palign quantize --model DIR --out DIR [--blocksize 64] [--no-double-quant]`: writes a
//! checkpoint that transformers + bitsandbytes loads as 4-bit (CLI.md).
//!
//! The decoder's 7 projections per layer become bitsandbytes NF4 tensor groups
//! (`Nf4Tensor::to_bnb_entries`); every other tensor (embeddings, norms, lm_head) is
//! copied byte for byte in its stored dtype, as transformers leaves them. config.json
//! gains the `quantization_config` transformers writes for
//! `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", ...)`.
//!
//! Streaming: tensors are read from the memory-mapped input one at a time; only the
//! quantized bytes of the shard being written are held in memory. Shards hold at most
//! `--max-shard-bytes` (2 GB by default, to bound that memory) and are listed in
//! `model.safetensors.index.json` when there is more than one.

use super::Common;
use crate::error::{bad, Error, Result};
use crate::fsio::StagedDir;
use crate::model::llama::{Layer, PROJ_NAMES};
use crate::model::weights::{to_f32, Entry, Weights};
use crate::model::ModelConfig;
use crate::quant::{self, SourceDtype};
use safetensors::Dtype;
use serde_json::{json, Value};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Hugging Face model folder with f32, bf16 or f16 weights.
    #[arg(long)]
    pub model: PathBuf,
    /// Output model folder (must not exist, or be empty).
    #[arg(long)]
    pub out: PathBuf,
    /// NF4 block size: a power of two from 32 to 4096.
    #[arg(long, default_value_t = quant::DEFAULT_BLOCKSIZE)]
    pub blocksize: usize,
    /// Keep the per-block absmax in f32 instead of double-quantizing it to 8 bits.
    #[arg(long)]
    pub no_double_quant: bool,
    /// Largest safetensors shard in bytes (a bigger single tensor gets a shard of its own).
    #[arg(long, default_value_t = 2_000_000_000, hide = true)]
    pub max_shard_bytes: u64,
}

/// Files of a model folder that are not weights or config and travel with it.
const SIDE_FILES: [&str; 10] = [
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
];

/// One tensor of an output shard: borrowed from the input map, or freshly quantized.
struct OutTensor<'a> {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    data: Cow<'a, [u8]>,
}

/// Sizes accumulated for the summary.
#[derive(Default)]
struct Stats {
    proj_count: usize,
    proj_params: u64,
    proj_in_bytes: u64,
    proj_nf4_bytes: u64,
    params: u64,
    in_bytes: u64,
    file_bytes: u64,
}

/// `quantization_config` as transformers 5.24 writes it for a bitsandbytes 4-bit NF4
/// model (the field set of tests/fixtures/tiny-llama-bnb-4bit/config.json).
fn quantization_config(compute_dtype: &str, double_quant: bool) -> Value {
    json!({
        "_load_in_4bit": true,
        "_load_in_8bit": false,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": null,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": true,
        "load_in_8bit": false,
        "quant_method": "bitsandbytes",
    })
}

fn source_dtype(d: Dtype) -> Option<SourceDtype> {
    match d {
        Dtype::F32 => Some(SourceDtype::F32),
        Dtype::BF16 => Some(SourceDtype::BF16),
        Dtype::F16 => Some(SourceDtype::F16),
        _ => None,
    }
}

/// Orders names the way a model reads: numeric parts compare as numbers
/// (layer 2 before layer 10), so shards hold consecutive layers.
fn natural_key(name: &str) -> Vec<(u8, u64, &str)> {
    name.split('.')
        .map(|p| match p.parse::<u64>() {
            Ok(n) => (0, n, ""),
            Err(_) => (1, 0, p),
        })
        .collect()
}

/// Upper estimate of a quantized group's bytes, for planning shards before quantizing.
fn nf4_size_estimate(numel: usize, blocksize: usize, double_quant: bool) -> u64 {
    let blocks = numel.div_ceil(blocksize);
    let scales = if double_quant {
        blocks + 4 * blocks.div_ceil(quant::NESTED_BLOCKSIZE) + 4 * 256
    } else {
        4 * blocks
    };
    (numel.div_ceil(2) + scales + 4 * 16 + 256) as u64
}

/// Writes one safetensors file: tensors sorted by name, `{"format":"pt"}` metadata (which
/// transformers requires), header padded with spaces so the data starts 8-byte aligned.
/// Returns the file size.
fn write_shard(path: &Path, tensors: &mut [OutTensor]) -> Result<u64> {
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    let mut header = BTreeMap::new();
    header.insert("__metadata__".to_string(), json!({"format": "pt"}));
    let mut offset = 0usize;
    for t in tensors.iter() {
        let end = offset + t.data.len();
        header.insert(
            t.name.clone(),
            json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut h = serde_json::to_vec(&header).map_err(|e| bad(format!("header: {e}")))?;
    while (8 + h.len()) % 8 != 0 {
        h.push(b' ');
    }
    crate::fsio::write_atomic(path, |w| {
        w.write_all(&(h.len() as u64).to_le_bytes())?;
        w.write_all(&h)?;
        for t in tensors.iter() {
            w.write_all(&t.data)?;
        }
        Ok(())
    })?;
    Ok((8 + h.len() + offset) as u64)
}

/// Human-readable decimal size.
fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.2} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} KB", b / 1e3)
    } else {
        format!("{bytes} B")
    }
}

/// Refuses a folder that is already quantized (bitsandbytes or any other method).
fn check_not_quantized(dir: &Path, cfg: &ModelConfig, w: &Weights) -> Result<()> {
    if let Some(q) = &cfg.quantization_config {
        let method = q
            .get("quant_method")
            .and_then(Value::as_str)
            .unwrap_or("unknown");
        return Err(bad(format!(
            "{}: already quantized (config.json has a quantization_config, quant_method {method}); palign quantize needs f32, bf16 or f16 weights",
            dir.display()
        )));
    }
    if let Some(n) = w
        .names()
        .find(|n| n.ends_with(".absmax") || n.contains(".quant_state."))
    {
        return Err(bad(format!(
            "{}: already quantized (tensor `{n}` is bitsandbytes 4-bit state); palign quantize needs f32, bf16 or f16 weights",
            dir.display()
        )));
    }
    Ok(())
}

pub fn run(args: &Args, common: &Common) -> Result<()> {
    common.setup_cpu_only("quantize")?;
    quant::check_blocksize(args.blocksize).map_err(|e| bad(format!("--blocksize: {e}")))?;
    if args.max_shard_bytes == 0 {
        return Err(bad("--max-shard-bytes must be positive"));
    }
    let double_quant = !args.no_double_quant;
    let cfg = ModelConfig::load(&args.model)?;
    let w = Weights::open_dir(&args.model)?;
    check_not_quantized(&args.model, &cfg, &w)?;
    // The tensors copied as they are must load too (embedding, norms, lm_head).
    crate::model::llama::check_dense_tensors(&cfg, &w)
        .map_err(|e| bad(format!("{}: {e}", args.model.display())))?;

    // The 7 projections of every layer, checked for shape and a float dtype.
    let mut projections = HashSet::new();
    let mut first_dtype = None;
    for l in 0..cfg.num_layers {
        for p in PROJ_NAMES {
            let name = Layer::weight_name(l, p);
            let e = w
                .entry(&name, &Layer::proj_shape(&cfg, p))
                .map_err(|e| bad(format!("{}: {e}", args.model.display())))?;
            let d = source_dtype(e.dtype).ok_or_else(|| {
                bad(format!(
                    "{}: tensor `{name}` has dtype {:?}; palign quantize needs F32, BF16 or F16",
                    args.model.display(),
                    e.dtype
                ))
            })?;
            first_dtype.get_or_insert(d);
            projections.insert(name);
        }
    }
    // bitsandbytes computes in the dtype the model runs in: the config's, else the stored one.
    let compute_dtype = cfg
        .dtype
        .as_deref()
        .and_then(SourceDtype::parse)
        .or(first_dtype)
        .unwrap_or(SourceDtype::F32);

    let staged = StagedDir::new(&args.out)?;

    // Plan shards over all tensors in model order, each projection group kept whole.
    let mut names: Vec<&String> = w.names().collect();
    names.sort_by(|a, b| natural_key(a).cmp(&natural_key(b)));
    let mut shards: Vec<Vec<&String>> = vec![vec![]];
    let mut shard_size = 0u64;
    for name in names {
        let e = w.get(name).expect("listed by names()");
        let numel: usize = e.shape.iter().product();
        let size = if projections.contains(name) {
            nf4_size_estimate(numel, args.blocksize, double_quant)
        } else {
            (e.end - e.start) as u64
        };
        let current = shards.last_mut().expect("never empty");
        if !current.is_empty() && shard_size + size > args.max_shard_bytes {
            shards.push(vec![name]);
            shard_size = size;
        } else {
            current.push(name);
            shard_size += size;
        }
    }

    let n_shards = shards.len();
    let pb = super::progress_bar(projections.len() as u64, common.progress(), "quantize");
    let mut stats = Stats::default();
    let mut weight_map = BTreeMap::new();
    let mut total_size = 0u64;
    for (i, shard) in shards.iter().enumerate() {
        let file = if n_shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n_shards:05}.safetensors", i + 1)
        };
        let mut tensors = Vec::new();
        for &name in shard {
            let e = w.get(name).expect("listed by names()");
            let numel: usize = e.shape.iter().product();
            stats.params += numel as u64;
            stats.in_bytes += (e.end - e.start) as u64;
            if projections.contains(name) {
                tensors.extend(quantize_one(
                    &w,
                    name,
                    e,
                    args.blocksize,
                    double_quant,
                    &mut stats,
                )?);
                pb.inc(1);
            } else {
                tensors.push(OutTensor {
                    name: name.clone(),
                    dtype: format!("{:?}", e.dtype),
                    shape: e.shape.clone(),
                    data: Cow::Borrowed(w.bytes(e)),
                });
            }
        }
        for t in &tensors {
            weight_map.insert(t.name.clone(), file.clone());
            total_size += t.data.len() as u64;
        }
        stats.file_bytes += write_shard(&staged.path().join(&file), &mut tensors)?;
    }
    pb.finish_and_clear();

    if n_shards > 1 {
        let index = json!({"metadata": {"total_size": total_size}, "weight_map": weight_map});
        write_json(&staged.path().join("model.safetensors.index.json"), &index)?;
    }
    let mut config = cfg.raw.clone();
    config["quantization_config"] = quantization_config(compute_dtype.as_str(), double_quant);
    write_json(&staged.path().join("config.json"), &config)?;
    for f in SIDE_FILES {
        let src = args.model.join(f);
        if src.is_file() {
            let dst = staged.path().join(f);
            std::fs::copy(&src, &dst).map_err(|e| Error::write(&dst, e))?;
        }
    }
    staged.commit()?;

    let dq = if double_quant {
        "double quant"
    } else {
        "f32 absmax"
    };
    eprintln!(
        "quantized {} projections to NF4 (blocksize {}, {dq}): {} parameters, {} -> {}, {:.3} bits per parameter",
        stats.proj_count,
        args.blocksize,
        stats.proj_params,
        human(stats.proj_in_bytes),
        human(stats.proj_nf4_bytes),
        8.0 * stats.proj_nf4_bytes as f64 / stats.proj_params.max(1) as f64
    );
    eprintln!(
        "wrote {} ({} safetensors file{}): {} (from {}), {:.3} bits per parameter over {} parameters",
        args.out.display(),
        n_shards,
        if n_shards == 1 { "" } else { "s" },
        human(stats.file_bytes),
        human(stats.in_bytes),
        8.0 * stats.file_bytes as f64 / stats.params.max(1) as f64,
        stats.params
    );
    Ok(())
}

/// Quantizes one projection from its stored bytes into bitsandbytes' tensor group.
fn quantize_one(
    w: &Weights,
    name: &str,
    e: &Entry,
    blocksize: usize,
    double_quant: bool,
    stats: &mut Stats,
) -> Result<Vec<OutTensor<'static>>> {
    let dtype = source_dtype(e.dtype).expect("checked before writing");
    let values = to_f32(w.bytes(e), e.dtype).map_err(|m| bad(format!("`{name}`: {m}")))?;
    let t = quant::quantize_nf4_from(
        &values,
        dtype,
        [e.shape[0], e.shape[1]],
        blocksize,
        double_quant,
    )?;
    stats.proj_count += 1;
    stats.proj_params += t.numel() as u64;
    stats.proj_in_bytes += (e.end - e.start) as u64;
    stats.proj_nf4_bytes += t.nbytes() as u64;
    Ok(t.to_bnb_entries(name)
        .into_iter()
        .map(|b| OutTensor {
            name: b.name,
            dtype: b.dtype.to_string(),
            shape: b.shape,
            data: Cow::Owned(b.data),
        })
        .collect())
}

/// Pretty JSON with a trailing newline, as transformers writes its config files.
fn write_json(path: &Path, v: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(v).map_err(|e| bad(format!("{e}")))?;
    text.push('\n');
    crate::fsio::write_bytes_atomic(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order_puts_layer_2_before_10() {
        let mut v = vec![
            "model.layers.10.mlp.up_proj.weight",
            "model.norm.weight",
            "model.layers.2.mlp.up_proj.weight",
            "lm_head.weight",
            "model.embed_tokens.weight",
        ];
        v.sort_by(|a, b| natural_key(a).cmp(&natural_key(b)));
        assert_eq!(
            v,
            [
                "lm_head.weight",
                "model.embed_tokens.weight",
                "model.layers.2.mlp.up_proj.weight",
                "model.layers.10.mlp.up_proj.weight",
                "model.norm.weight",
            ]
        );
    }

    #[test]
    fn estimate_bounds_the_real_size() {
        for (rows, cols, bs, dq) in [(64, 64, 64, true), (192, 64, 128, false), (7, 9, 32, true)] {
            let w: Vec<f32> = (0..rows * cols).map(|i| (i as f32).sin()).collect();
            let t = quant::quantize_nf4(&w, [rows, cols], bs, dq).unwrap();
            let real: usize = t.to_bnb_entries("x").iter().map(|e| e.data.len()).sum();
            let est = nf4_size_estimate(rows * cols, bs, dq) as usize;
            assert!(real <= est && est <= real + 256, "{real} vs {est}");
        }
    }
}
