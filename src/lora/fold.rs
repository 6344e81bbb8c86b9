//! Folding an adapter into its base (peft's `merge_and_unload`): `W' = W + s·B·A`,
//! computed in f32 from the stored weight (an NF4 weight is dequantized first), then
//! written in the output dtype. Streams tensor by tensor, so a 7B fold needs about one
//! tensor of memory beyond the memory-mapped input.

use super::Adapter;
use crate::backend::cpu::ops::{gemm, MatRef};
use crate::error::{bad, Error, Result};
use crate::model::llama::{Layer, PROJ_NAMES};
use crate::model::weights::{self, FloatDtype, Planned, Weights};
use crate::model::ModelConfig;
use crate::quant::Nf4Tensor;
use safetensors::Dtype;
use std::path::Path;

/// Suffixes of the tensors bitsandbytes stores beside a 4-bit weight.
const BNB_SUFFIXES: [&str; 5] = [
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
    ".quant_state.",
];

fn is_bnb_aux(name: &str) -> bool {
    BNB_SUFFIXES
        .iter()
        .any(|s| name.contains(&format!(".weight{s}")))
}

/// (layer, projection index) of a decoder projection weight name.
fn projection_of(name: &str, cfg: &ModelConfig) -> Option<(usize, usize)> {
    (0..cfg.num_layers).find_map(|l| {
        PROJ_NAMES
            .iter()
            .position(|p| Layer::weight_name(l, p) == name)
            .map(|p| (l, p))
    })
}

/// A weight as f32: dense (F32/BF16/F16) or a bitsandbytes NF4 group, dequantized.
pub fn weight_f32(w: &Weights, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
    let e = w
        .get(name)
        .ok_or_else(|| bad(format!("weights: tensor `{name}` is missing")))?;
    if w.contains(&format!("{name}.absmax")) {
        let q = Nf4Tensor::from_bnb_entries(name, |n| {
            w.get(n)
                .map(|e| (format!("{:?}", e.dtype), e.shape.clone(), w.bytes(e)))
        })?;
        return Ok((q.dequantize(), q.shape.to_vec()));
    }
    let v =
        weights::to_f32(w.bytes(e), e.dtype).map_err(|m| bad(format!("weights: `{name}`: {m}")))?;
    Ok((v, e.shape.clone()))
}

/// `w += s·B·A` for one projection.
pub fn add_lora(w: &mut [f32], out: usize, inp: usize, a: &[f32], b: &[f32], r: usize, s: f32) {
    gemm(MatRef::new(b, out, r), MatRef::new(a, r, inp), w, s, 1.0);
}

/// The output dtype: `--dtype`, else the base's (config `dtype`/`torch_dtype`), else f32.
pub fn output_dtype(flag: Option<&str>, cfg: &ModelConfig) -> Result<FloatDtype> {
    match flag {
        Some(s) => FloatDtype::from_torch_name(s).ok_or_else(|| {
            bad(format!(
                "--dtype: unknown dtype `{s}` (bfloat16, float16, float32)"
            ))
        }),
        None => Ok(cfg
            .dtype
            .as_deref()
            .and_then(FloatDtype::from_torch_name)
            .unwrap_or(FloatDtype::F32)),
    }
}

/// config.json of a merged (dense) model: the base's, without `quantization_config`,
/// with the dtype of the written weights.
pub fn dense_config(cfg: &ModelConfig, dtype: FloatDtype) -> serde_json::Value {
    let mut v = cfg.raw.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("quantization_config");
        let key = if o.contains_key("dtype") {
            "dtype"
        } else {
            "torch_dtype"
        };
        o.insert(key.into(), serde_json::json!(dtype.torch_name()));
    }
    v
}

/// Copies the tokenizer and generation files of a model folder, when present.
pub fn copy_side_files(from: &Path, to: &Path) -> Result<()> {
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "generation_config.json",
    ] {
        let src = from.join(f);
        if src.exists() {
            let bytes = std::fs::read(&src).map_err(|e| Error::read(&src, e))?;
            crate::fsio::write_bytes_atomic(&to.join(f), &bytes)?;
        }
    }
    Ok(())
}

/// Writes base + adapter (folded) into the existing folder `out` as an HF model folder.
pub fn fold_model(
    model_dir: &Path,
    adapter: Option<&Adapter>,
    out: &Path,
    dtype: FloatDtype,
) -> Result<()> {
    let cfg = ModelConfig::load(model_dir)?;
    let w = Weights::open_dir(model_dir)?;
    if let Some(a) = adapter {
        a.check_fits(&cfg)?;
    }
    let mut planned = Vec::new();
    for name in w.names() {
        if is_bnb_aux(name) {
            continue;
        }
        let e = w.get(name).expect("listed");
        let is_float = matches!(e.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16);
        let nf4 = w.contains(&format!("{name}.absmax"));
        let (st, shape, nbytes) = if nf4 {
            let [o, i] = projection_of(name, &cfg)
                .map(|(_, p)| Layer::proj_shape(&cfg, PROJ_NAMES[p]))
                .ok_or_else(|| bad(format!("4-bit tensor `{name}` is not a decoder projection")))?;
            (dtype.st_name(), vec![o, i], o * i * dtype_bytes(dtype))
        } else if is_float {
            // A projection must have the shape config.json gives it (an adapter is folded
            // in by those dimensions).
            if let Some((_, p)) = projection_of(name, &cfg) {
                w.entry(name, &Layer::proj_shape(&cfg, PROJ_NAMES[p]))
                    .map_err(|e| bad(format!("{}: {e}", model_dir.display())))?;
            }
            let n: usize = e.shape.iter().product();
            (dtype.st_name(), e.shape.clone(), n * dtype_bytes(dtype))
        } else {
            return Err(bad(format!("tensor `{name}` has dtype {:?}; only float and bitsandbytes 4-bit weights can be merged", e.dtype)));
        };
        planned.push(Planned {
            name: name.clone(),
            dtype: st,
            shape,
            nbytes,
        });
    }
    weights::write_sharded(out, planned, weights::MAX_SHARD_BYTES, |t| {
        let (mut v, shape) = weight_f32(&w, &t.name)?;
        if let (Some(a), Some((l, p))) = (adapter, projection_of(&t.name, &cfg)) {
            if let Some(pair) = &a.layers[l][p] {
                add_lora(
                    &mut v,
                    shape[0],
                    shape[1],
                    pair.a.cpu(),
                    pair.b.cpu(),
                    a.cfg.r,
                    a.cfg.scale(),
                );
            }
        }
        Ok(dtype.encode(&v))
    })?;
    let text = serde_json::to_vec_pretty(&dense_config(&cfg, dtype)).expect("json");
    crate::fsio::write_bytes_atomic(&out.join("config.json"), &text)?;
    copy_side_files(model_dir, out)
}

fn dtype_bytes(d: FloatDtype) -> usize {
    match d {
        FloatDtype::F32 => 4,
        FloatDtype::BF16 | FloatDtype::F16 => 2,
    }
}
