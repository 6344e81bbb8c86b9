//! RoBERTa sequence classifier (transformers' `RobertaForSequenceClassification`), for
//! scoring text with nicholasKluge/ToxicityModel: embeddings (word + position + token type
//! → LayerNorm) → L × [self-attention → dense → residual → LayerNorm → dense → GELU →
//! dense → residual → LayerNorm] → head on `<s>` (dense → tanh → out_proj).
//! Sequences are packed, not padded: each attends only to itself. Written in `crate::ops`.

use super::weights::Weights;
use crate::error::{bad, Error, Result};
use crate::ops::{self, LinearWeight, Packing};
use crate::tensor::Tensor;
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;
use tokenizers::utils::truncation::{
    truncate_encodings, TruncationDirection, TruncationParams, TruncationStrategy,
};
use tokenizers::PostProcessor;

/// The ToxicityModel card's call: `tokenizer(prompt, response, truncation=True,
/// max_length=512)`.
pub const DEFAULT_MAX_LENGTH: usize = 512;

/// The `config.json` fields the encoder needs (transformers `RobertaConfig`).
#[derive(Clone, Debug)]
pub struct RobertaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub intermediate_size: usize,
    pub layer_norm_eps: f32,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub pad_token_id: u32,
    pub num_labels: usize,
}

fn cfg_err(e: impl std::fmt::Display) -> Error {
    bad(format!("config.json: {e}"))
}

fn need_usize(v: &Value, key: &str) -> Result<usize> {
    match v.get(key) {
        Some(x) => match x.as_u64() {
            Some(n) if n > 0 => Ok(n as usize),
            _ => Err(cfg_err(format!(
                "field `{key}` must be a positive integer, got {x}"
            ))),
        },
        None => Err(cfg_err(format!("field `{key}` is missing"))),
    }
}

impl RobertaConfig {
    /// Parses `config.json`; defaults are `RobertaConfig`'s (transformers) where the
    /// field may be left out. Rejects anything this encoder does not compute.
    pub fn from_json(v: &Value) -> Result<Self> {
        if let Some(t) = v.get("model_type").and_then(Value::as_str) {
            if t != "roberta" {
                return Err(cfg_err(format!(
                    "model_type is \"{t}\", expected \"roberta\" (a RobertaForSequenceClassification)"
                )));
            }
        }
        let act = v
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("gelu");
        if act != "gelu" {
            return Err(cfg_err(format!(
                "hidden_act \"{act}\" is not supported (only \"gelu\")"
            )));
        }
        if let Some(p) = v.get("position_embedding_type").and_then(Value::as_str) {
            if p != "absolute" {
                return Err(cfg_err(format!(
                    "position_embedding_type \"{p}\" is not supported (only \"absolute\")"
                )));
            }
        }
        if v.get("is_decoder").and_then(Value::as_bool) == Some(true) {
            return Err(cfg_err("is_decoder is true; the scorer is an encoder"));
        }
        let eps = match v.get("layer_norm_eps") {
            None | Some(Value::Null) => 1e-12,
            Some(x) => x.as_f64().filter(|e| *e > 0.0).ok_or_else(|| {
                cfg_err(format!("layer_norm_eps must be a positive number, got {x}"))
            })?,
        };
        let pad = match v.get("pad_token_id") {
            None | Some(Value::Null) => 1,
            Some(x) => x
                .as_u64()
                .ok_or_else(|| cfg_err(format!("pad_token_id must be an integer, got {x}")))?,
        };
        // transformers writes `id2label` rather than `num_labels`; either gives the count.
        let num_labels = match (v.get("num_labels"), v.get("id2label")) {
            (Some(_), _) => need_usize(v, "num_labels")?,
            (None, Some(Value::Object(m))) if !m.is_empty() => m.len(),
            _ => 2,
        };
        let cfg = RobertaConfig {
            vocab_size: need_usize(v, "vocab_size")?,
            hidden_size: need_usize(v, "hidden_size")?,
            num_layers: need_usize(v, "num_hidden_layers")?,
            num_heads: need_usize(v, "num_attention_heads")?,
            intermediate_size: need_usize(v, "intermediate_size")?,
            layer_norm_eps: eps as f32,
            max_position_embeddings: need_usize(v, "max_position_embeddings")?,
            type_vocab_size: match v.get("type_vocab_size") {
                None => 2,
                Some(_) => need_usize(v, "type_vocab_size")?,
            },
            pad_token_id: pad as u32,
            num_labels,
        };
        if !cfg.hidden_size.is_multiple_of(cfg.num_heads) {
            return Err(cfg_err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                cfg.hidden_size, cfg.num_heads
            )));
        }
        if cfg.pad_token_id as usize + 1 >= cfg.max_position_embeddings {
            return Err(cfg_err(format!(
                "max_position_embeddings {} leaves no positions after pad_token_id {}",
                cfg.max_position_embeddings, cfg.pad_token_id
            )));
        }
        Ok(cfg)
    }

    /// Longest input the position table holds: positions run from pad + 1 to pad + len
    /// (transformers `create_position_ids_from_input_ids`), so 512 for roberta-base's 514.
    pub fn max_tokens(&self) -> usize {
        self.max_position_embeddings - self.pad_token_id as usize - 1
    }
}

/// `nn.Linear` with a bias.
struct Dense {
    w: LinearWeight,
    b: Tensor,
}

impl Dense {
    fn load(w: &Weights, name: &str, out: usize, inp: usize) -> Result<Self> {
        Ok(Dense {
            w: LinearWeight::Dense(Arc::new(Tensor::from_vec(
                w.f32(&format!("{name}.weight"), &[out, inp])?,
                &[out, inp],
            ))),
            b: Tensor::from_vec(w.f32(&format!("{name}.bias"), &[out])?, &[out]),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = ops::linear(x, &self.w)?;
        ops::add_bias_(&mut y, &self.b);
        Ok(y)
    }
}

struct LayerNorm {
    w: Tensor,
    b: Tensor,
    eps: f32,
}

impl LayerNorm {
    fn load(w: &Weights, name: &str, h: usize, eps: f32) -> Result<Self> {
        Ok(LayerNorm {
            w: Tensor::from_vec(w.f32(&format!("{name}.weight"), &[h])?, &[h]),
            b: Tensor::from_vec(w.f32(&format!("{name}.bias"), &[h])?, &[h]),
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        ops::layernorm(x, &self.w, &self.b, self.eps)
    }
}

struct EncoderLayer {
    q: Dense,
    k: Dense,
    v: Dense,
    attn_out: Dense,
    attn_norm: LayerNorm,
    inter: Dense,
    out: Dense,
    out_norm: LayerNorm,
}

impl EncoderLayer {
    fn load(w: &Weights, cfg: &RobertaConfig, i: usize) -> Result<Self> {
        let (h, m, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        let p = format!("roberta.encoder.layer.{i}");
        Ok(EncoderLayer {
            q: Dense::load(w, &format!("{p}.attention.self.query"), h, h)?,
            k: Dense::load(w, &format!("{p}.attention.self.key"), h, h)?,
            v: Dense::load(w, &format!("{p}.attention.self.value"), h, h)?,
            attn_out: Dense::load(w, &format!("{p}.attention.output.dense"), h, h)?,
            attn_norm: LayerNorm::load(w, &format!("{p}.attention.output.LayerNorm"), h, eps)?,
            inter: Dense::load(w, &format!("{p}.intermediate.dense"), m, h)?,
            out: Dense::load(w, &format!("{p}.output.dense"), h, m)?,
            out_norm: LayerNorm::load(w, &format!("{p}.output.LayerNorm"), h, eps)?,
        })
    }

    /// Post-LN block (BERT/RoBERTa): `x = LN(x + attn(x))`, `x = LN(x + FFN(x))`.
    fn forward(&self, x: &Tensor, pack: &Packing, n_heads: usize) -> Result<Tensor> {
        let d = x.cols() / n_heads;
        let (q, k, v) = (self.q.forward(x)?, self.k.forward(x)?, self.v.forward(x)?);
        let a = ops::attention_bidir(&q, &k, &v, pack, n_heads, d);
        let mut y = self.attn_out.forward(&a)?;
        ops::add_(&mut y, x)?;
        let x = self.attn_norm.forward(&y);
        let mut hmid = self.inter.forward(&x)?;
        ops::gelu_(&mut hmid);
        let mut y = self.out.forward(&hmid)?;
        ops::add_(&mut y, &x)?;
        Ok(self.out_norm.forward(&y))
    }
}

pub struct RobertaClassifier {
    pub cfg: RobertaConfig,
    tokenizer: tokenizers::Tokenizer,
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    emb_norm: LayerNorm,
    layers: Vec<EncoderLayer>,
    head_dense: Dense,
    head_out: Dense,
}

impl RobertaClassifier {
    /// Loads an HF `RobertaForSequenceClassification` folder: `config.json`,
    /// `model.safetensors` (or its sharded index) and `tokenizer.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        if !cfg_path.exists() {
            return Err(bad(format!("{}: config.json is missing", dir.display())));
        }
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::read(&cfg_path, e))?;
        let raw: Value = serde_json::from_str(&text)
            .map_err(|e| bad(format!("{}: not valid JSON: {e}", cfg_path.display())))?;
        let cfg = RobertaConfig::from_json(&raw)?;

        let has_st = dir.join("model.safetensors").exists()
            || dir.join("model.safetensors.index.json").exists();
        if !has_st && dir.join("pytorch_model.bin").exists() {
            return Err(bad(format!(
                "{}: only pytorch_model.bin is present; palign reads safetensors only. Convert with \
                 `AutoModelForSequenceClassification.from_pretrained(dir).save_pretrained(dir)` \
                 (transformers writes model.safetensors)",
                dir.display()
            )));
        }
        let w = Weights::open_dir(dir)?;

        let tok_path = dir.join("tokenizer.json");
        if !tok_path.exists() {
            return Err(bad(format!(
                "{}: tokenizer.json is missing (save the tokenizer with transformers' fast \
                 tokenizer to write it)",
                dir.display()
            )));
        }
        let mut tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| bad(format!("{}: cannot load: {e}", tok_path.display())))?;
        // transformers replaces the file's truncation/padding with the call's settings;
        // `encode_pair` truncates itself and never pads.
        tokenizer
            .with_truncation(None)
            .map_err(|e| bad(format!("{}: {e}", tok_path.display())))?;
        tokenizer.with_padding(None);

        let (h, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        let table = |name: &str, rows: usize| -> Result<Tensor> {
            Ok(Tensor::from_vec(w.f32(name, &[rows, h])?, &[rows, h]))
        };
        let e = "roberta.embeddings";
        let model = RobertaClassifier {
            word: table(&format!("{e}.word_embeddings.weight"), cfg.vocab_size)?,
            position: table(
                &format!("{e}.position_embeddings.weight"),
                cfg.max_position_embeddings,
            )?,
            token_type: table(
                &format!("{e}.token_type_embeddings.weight"),
                cfg.type_vocab_size,
            )?,
            emb_norm: LayerNorm::load(&w, &format!("{e}.LayerNorm"), h, eps)?,
            layers: (0..cfg.num_layers)
                .map(|i| EncoderLayer::load(&w, &cfg, i))
                .collect::<Result<_>>()?,
            head_dense: Dense::load(&w, "classifier.dense", h, h)?,
            head_out: Dense::load(&w, "classifier.out_proj", cfg.num_labels, h)?,
            tokenizer,
            cfg,
        };
        Ok(model)
    }

    /// Input ids of `tokenizer(prompt, response, truncation=True, max_length=max_length)`:
    /// the tokenizer's post-processor makes `<s> A </s></s> B </s>`, and longest-first
    /// truncation trims the longer text first, as the `tokenizers` library does for
    /// transformers. An empty response encodes the prompt alone, as transformers'
    /// `_encode_plus` does (`[(text, text_pair)] if text_pair else [text]`).
    pub fn encode_pair(&self, prompt: &str, response: &str, max_length: usize) -> Result<Vec<u32>> {
        let tok_err = |e: tokenizers::Error| bad(format!("tokenizer: {e}"));
        let a = self.tokenizer.encode(prompt, false).map_err(tok_err)?;
        let b = if response.is_empty() {
            None
        } else {
            Some(self.tokenizer.encode(response, false).map_err(tok_err)?)
        };
        let added = self
            .tokenizer
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(b.is_some()));
        let budget = max_length.checked_sub(added).ok_or_else(|| {
            bad(format!(
                "max_length {max_length} is shorter than the {added} special tokens of the input"
            ))
        })?;
        let params = TruncationParams {
            max_length: budget,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
            direction: TruncationDirection::Right,
        };
        let (a, b) = truncate_encodings(a, b, &params).map_err(tok_err)?;
        let enc = self.tokenizer.post_process(a, b, true).map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Logits (`num_labels` each) for `(prompt, response)` pairs, encoded as
    /// `encode_pair` does, `batch` pairs per forward.
    pub fn score_pairs(
        &self,
        pairs: &[(String, String)],
        batch: usize,
        max_length: usize,
    ) -> Result<Vec<Vec<f32>>> {
        if batch == 0 {
            return Err(bad("batch size must be at least 1"));
        }
        if max_length > self.cfg.max_tokens() {
            return Err(bad(format!(
                "max_length {max_length} exceeds the {} tokens the model's position table holds",
                self.cfg.max_tokens()
            )));
        }
        let mut out = Vec::with_capacity(pairs.len());
        for chunk in pairs.chunks(batch) {
            let seqs = chunk
                .iter()
                .map(|(p, r)| self.encode_pair(p, r, max_length))
                .collect::<Result<Vec<_>>>()?;
            out.extend(self.score_ids(&seqs)?);
        }
        Ok(out)
    }

    /// Logits of already-encoded sequences, all in one packed forward.
    pub fn score_ids(&self, seqs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let cfg = &self.cfg;
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        for s in seqs {
            if s.is_empty() {
                return Err(bad("cannot score an empty token sequence"));
            }
            if s.len() > cfg.max_tokens() {
                return Err(bad(format!(
                    "{} tokens exceed the {} the model's position table holds",
                    s.len(),
                    cfg.max_tokens()
                )));
            }
            if let Some(&id) = s.iter().find(|&&id| id as usize >= cfg.vocab_size) {
                return Err(bad(format!(
                    "token id {id} is outside the model's vocabulary of {}",
                    cfg.vocab_size
                )));
            }
            ids.extend_from_slice(s);
            positions.extend(position_ids(s, cfg.pad_token_id));
        }
        if seqs.is_empty() {
            return Ok(vec![]);
        }
        let pack = Packing::from_lengths(&seqs.iter().map(Vec::len).collect::<Vec<_>>());

        // Embeddings; token types are all 0 (the scorer's call passes none).
        let mut x = ops::embedding(&self.word, &ids)?;
        ops::add_(&mut x, &ops::embedding(&self.position, &positions)?)?;
        ops::add_(
            &mut x,
            &ops::embedding(&self.token_type, &vec![0; ids.len()])?,
        )?;
        let mut x = self.emb_norm.forward(&x);
        for layer in &self.layers {
            x = layer.forward(&x, &pack, cfg.num_heads)?;
        }

        // Head on the first token (`<s>`) of each sequence: dense → tanh → out_proj.
        let firsts: Vec<usize> = (0..pack.n_seqs()).map(|s| pack.range(s).start).collect();
        let mut hcls = self.head_dense.forward(&ops::gather_rows(&x, &firsts)?)?;
        ops::tanh_(&mut hcls);
        let logits = ops::to_host(&self.head_out.forward(&hcls)?)?;
        Ok(logits.chunks(cfg.num_labels).map(<[f32]>::to_vec).collect())
    }
}

/// RoBERTa's position ids (transformers `create_position_ids_from_input_ids`): non-pad
/// tokens count up from `pad + 1`; a pad token gets `pad` and does not advance the count.
pub fn position_ids(ids: &[u32], pad: u32) -> Vec<u32> {
    let mut n = 0;
    ids.iter()
        .map(|&id| {
            if id == pad {
                pad
            } else {
                n += 1;
                pad + n
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_skip_pads() {
        assert_eq!(position_ids(&[0, 5, 1, 7, 2], 1), [2, 3, 1, 4, 5]);
        assert_eq!(position_ids(&[], 1), Vec::<u32>::new());
    }

    #[test]
    fn config_defaults_and_rejections() {
        let base = serde_json::json!({
            "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 16,
            "max_position_embeddings": 514, "id2label": {"0": "LABEL_0"}
        });
        let c = RobertaConfig::from_json(&base).unwrap();
        assert_eq!((c.num_labels, c.pad_token_id, c.type_vocab_size), (1, 1, 2));
        assert_eq!(c.max_tokens(), 512);
        let mut v = base.clone();
        v["hidden_act"] = "relu".into();
        assert!(RobertaConfig::from_json(&v).unwrap_err().is_bad_input());
        let mut v = base.clone();
        v["num_attention_heads"] = 3.into();
        assert!(RobertaConfig::from_json(&v).is_err());
        let mut v = base;
        v.as_object_mut().unwrap().remove("hidden_size");
        assert!(RobertaConfig::from_json(&v).is_err());
    }
}
