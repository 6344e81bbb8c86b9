//! `config.json` of `LlamaForCausalLM` / `MistralForCausalLM`, as transformers 4.x and
//! 5.x write it. Field names and defaults follow transformers' `LlamaConfig` and
//! `MistralConfig` (5.x moves `rope_theta` into `rope_parameters`, renames
//! `torch_dtype` to `dtype`).

use crate::error::{bad, Error, Result};
use serde_json::Value;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
}

impl Arch {
    pub fn class_name(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
        }
    }
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
        }
    }
}

#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub max_position_embeddings: usize,
    /// Mistral's sliding window (query i sees keys i−W+1..i); `None` for full causal.
    pub sliding_window: Option<usize>,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// `torch_dtype` / `dtype` as written ("float32", "bfloat16", "float16").
    pub dtype: Option<String>,
    /// The raw `quantization_config` object, when the checkpoint is quantized.
    pub quantization_config: Option<Value>,
    /// The whole file, kept so outputs can carry unknown fields through unchanged.
    pub raw: Value,
}

fn ctx(e: impl std::fmt::Display) -> Error {
    bad(format!("config.json: {e}"))
}

fn get_usize(v: &Value, key: &str) -> Result<Option<usize>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
            ctx(format!(
                "field `{key}` must be a non-negative integer, got {x}"
            ))
        }),
    }
}

fn need_usize(v: &Value, key: &str) -> Result<usize> {
    match get_usize(v, key)? {
        Some(0) => Err(ctx(format!("field `{key}` must be positive"))),
        Some(n) => Ok(n),
        None => Err(ctx(format!("field `{key}` is missing"))),
    }
}

fn get_f64(v: &Value, key: &str) -> Result<Option<f64>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_f64()
            .map(Some)
            .ok_or_else(|| ctx(format!("field `{key}` must be a number, got {x}"))),
    }
}

/// Token ids may be a number or a list of numbers (e.g. several EOS ids).
fn get_ids(v: &Value, key: &str) -> Result<Vec<u32>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_u64().map(|n| n as u32))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ctx(format!("field `{key}` must hold integers"))),
        Some(x) => x
            .as_u64()
            .map(|n| vec![n as u32])
            .ok_or_else(|| ctx(format!("field `{key}` must be an integer"))),
    }
}

/// A RoPE parameter block we can honour: absent, or type "default" (plain rotate-half).
fn check_rope_block(block: &Value, key: &str) -> Result<()> {
    if block.is_null() {
        return Ok(());
    }
    let kind = block
        .get("rope_type")
        .or_else(|| block.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    if kind != "default" {
        return Err(ctx(format!(
            "`{key}` of type \"{kind}\" is not supported (only plain RoPE, rope_type \"default\")"
        )));
    }
    Ok(())
}

impl ModelConfig {
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::read(&path, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| bad(format!("{}: not valid JSON: {e}", path.display())))?;
        Self::from_json(v).map_err(|e| match e {
            Error::BadInput(m) => bad(format!("{}: {}", dir.display(), m)),
            other => other,
        })
    }

    pub fn from_json(v: Value) -> Result<Self> {
        if !v.is_object() {
            return Err(ctx("expected a JSON object"));
        }
        let archs: Vec<&str> = v
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        let arch = if archs.contains(&"MistralForCausalLM")
            || (archs.is_empty() && model_type == "mistral")
        {
            Arch::Mistral
        } else if archs.contains(&"LlamaForCausalLM") || (archs.is_empty() && model_type == "llama")
        {
            Arch::Llama
        } else {
            let what = if archs.is_empty() {
                model_type.to_string()
            } else {
                archs.join(", ")
            };
            return Err(ctx(format!(
                "unknown architecture `{what}` (supported: LlamaForCausalLM, MistralForCausalLM)"
            )));
        };
        let hidden_size = need_usize(&v, "hidden_size")?;
        let num_heads = need_usize(&v, "num_attention_heads")?;
        let num_kv_heads = get_usize(&v, "num_key_value_heads")?.unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(ctx(format!(
                "num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads ({num_kv_heads})"
            )));
        }
        let head_dim = match get_usize(&v, "head_dim")? {
            Some(d) => d,
            None => {
                if hidden_size % num_heads != 0 {
                    return Err(ctx("hidden_size is not a multiple of num_attention_heads and head_dim is not given"));
                }
                hidden_size / num_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(ctx(format!("head_dim {head_dim} must be even for RoPE")));
        }
        if let Some(act) = v.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(ctx(format!(
                    "hidden_act `{act}` is not supported (only silu)"
                )));
            }
        }
        for key in ["attention_bias", "mlp_bias"] {
            if v.get(key).and_then(Value::as_bool) == Some(true) {
                return Err(ctx(format!("`{key}: true` is not supported")));
            }
        }
        // transformers 5.x: rope_parameters {rope_type, rope_theta}; 4.x: rope_theta + rope_scaling.
        let rope_params = v.get("rope_parameters").cloned().unwrap_or(Value::Null);
        check_rope_block(&rope_params, "rope_parameters")?;
        check_rope_block(
            v.get("rope_scaling").unwrap_or(&Value::Null),
            "rope_scaling",
        )?;
        let rope_theta = get_f64(&rope_params, "rope_theta")?
            .or(get_f64(&v, "rope_theta")?)
            .unwrap_or(10000.0) as f32;
        if !(rope_theta.is_finite() && rope_theta > 0.0) {
            return Err(ctx("rope_theta must be a positive number"));
        }
        let rms_norm_eps = get_f64(&v, "rms_norm_eps")?.unwrap_or(1e-6) as f32;
        if !(rms_norm_eps.is_finite() && rms_norm_eps >= 0.0) {
            return Err(ctx("rms_norm_eps must be a number >= 0"));
        }
        let sliding_window = match arch {
            // LLaMA has no window; transformers' MistralConfig defaults it to 4096.
            Arch::Llama => None,
            Arch::Mistral => match v.get("sliding_window") {
                None => Some(4096),
                Some(Value::Null) => None,
                Some(_) => match get_usize(&v, "sliding_window")? {
                    Some(0) => return Err(ctx("sliding_window must be positive or null")),
                    w => w,
                },
            },
        };
        let dtype = v
            .get("dtype")
            .or_else(|| v.get("torch_dtype"))
            .and_then(Value::as_str)
            .map(str::to_string);
        let quantization_config = v
            .get("quantization_config")
            .filter(|q| !q.is_null())
            .cloned();
        let bos = get_ids(&v, "bos_token_id")?;
        Ok(ModelConfig {
            arch,
            vocab_size: need_usize(&v, "vocab_size")?,
            hidden_size,
            intermediate_size: need_usize(&v, "intermediate_size")?,
            num_layers: need_usize(&v, "num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            max_position_embeddings: get_usize(&v, "max_position_embeddings")?.unwrap_or(2048),
            sliding_window,
            // Both LlamaConfig and MistralConfig default to untied embeddings.
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            bos_token_id: bos.first().copied(),
            eos_token_ids: get_ids(&v, "eos_token_id")?,
            dtype,
            quantization_config,
            raw: v,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 32,
               "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4})
    }

    #[test]
    fn llama_defaults_are_transformers_defaults() {
        let c = ModelConfig::from_json(base()).unwrap();
        assert_eq!(c.arch, Arch::Llama);
        assert_eq!((c.num_kv_heads, c.head_dim), (4, 8));
        assert_eq!(c.rope_theta, 10000.0);
        assert!(!c.tie_word_embeddings);
        assert_eq!(c.sliding_window, None);
    }

    #[test]
    fn norm_eps_and_rope_theta_must_be_usable_numbers() {
        for (k, bad) in [
            ("rms_norm_eps", json!(-1.0)),
            ("rms_norm_eps", json!(1e39)),
            ("rope_theta", json!(0.0)),
            ("rope_theta", json!(1e39)),
        ] {
            let mut v = base();
            v[k] = bad.clone();
            let e = ModelConfig::from_json(v).unwrap_err();
            assert!(
                e.is_bad_input() && e.to_string().contains(k),
                "{k}={bad}: {e}"
            );
        }
        let mut v = base();
        v["rms_norm_eps"] = json!(0.0);
        assert_eq!(ModelConfig::from_json(v).unwrap().rms_norm_eps, 0.0);
    }

    #[test]
    fn transformers5_rope_parameters_and_dtype() {
        let mut v = base();
        v["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 500000.0});
        v["dtype"] = json!("bfloat16");
        v["head_dim"] = json!(16);
        let c = ModelConfig::from_json(v).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.dtype.as_deref(), Some("bfloat16"));
    }

    #[test]
    fn mistral_window_null_number_or_default() {
        let mut v = base();
        v["architectures"] = json!(["MistralForCausalLM"]);
        assert_eq!(
            ModelConfig::from_json(v.clone()).unwrap().sliding_window,
            Some(4096)
        );
        v["sliding_window"] = Value::Null;
        assert_eq!(
            ModelConfig::from_json(v.clone()).unwrap().sliding_window,
            None
        );
        v["sliding_window"] = json!(8);
        assert_eq!(ModelConfig::from_json(v).unwrap().sliding_window, Some(8));
    }

    #[test]
    fn unsupported_inputs_name_the_field() {
        let mut v = base();
        v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0});
        let e = ModelConfig::from_json(v).unwrap_err().to_string();
        assert!(e.contains("rope_scaling") && e.contains("llama3"), "{e}");
        let mut v = base();
        v["architectures"] = json!(["GPT2LMHeadModel"]);
        assert!(ModelConfig::from_json(v)
            .unwrap_err()
            .to_string()
            .contains("GPT2LMHeadModel"));
        let mut v = base();
        v.as_object_mut().unwrap().remove("hidden_size");
        assert!(ModelConfig::from_json(v)
            .unwrap_err()
            .to_string()
            .contains("hidden_size"));
        let mut v = base();
        v["num_key_value_heads"] = json!(3);
        assert!(ModelConfig::from_json(v)
            .unwrap_err()
            .to_string()
            .contains("num_key_value_heads"));
    }

    #[test]
    fn eos_may_be_a_list() {
        let mut v = base();
        v["eos_token_id"] = json!([2, 7]);
        assert_eq!(ModelConfig::from_json(v).unwrap().eos_token_ids, vec![2, 7]);
    }
}
