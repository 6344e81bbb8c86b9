//! LLaMA / Mistral decoder (transformers' `LlamaForCausalLM` / `MistralForCausalLM`):
//! embedding → L × [RMSNorm → GQA attention with RoPE (+ sliding window) → residual →
//! RMSNorm → SwiGLU MLP → residual] → RMSNorm → lm_head. Written in `crate::ops` only.

use super::config::ModelConfig;
use super::weights::Weights;
use crate::error::{bad, Result};
use crate::ops::{self, AttnShape, LinearWeight, Packing, Rope};
use crate::tensor::Tensor;
use std::path::Path;
use std::sync::Arc;

/// The projections of one decoder layer, in PEFT's target-module names.
pub const PROJ_NAMES: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

pub struct Layer {
    pub input_norm: Tensor,
    pub q: LinearWeight,
    pub k: LinearWeight,
    pub v: LinearWeight,
    pub o: LinearWeight,
    pub post_norm: Tensor,
    pub gate: LinearWeight,
    pub up: LinearWeight,
    pub down: LinearWeight,
}

pub struct Model {
    pub cfg: ModelConfig,
    pub embed: Arc<Tensor>,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    /// `lm_head`; with tied embeddings it shares `embed`'s storage.
    pub lm_head: LinearWeight,
}

/// One sequence to score: all its ids and how many of them are prompt.
#[derive(Clone, Debug)]
pub struct ScoreSeq {
    pub ids: Vec<u32>,
    pub prompt_len: usize,
}

impl Layer {
    /// The full HF name of a projection's weight.
    pub fn weight_name(layer: usize, proj: &str) -> String {
        let block = if matches!(proj, "gate_proj" | "up_proj" | "down_proj") { "mlp" } else { "self_attn" };
        format!("model.layers.{layer}.{block}.{proj}.weight")
    }

    /// `[out, in]` of each projection.
    pub fn proj_shape(cfg: &ModelConfig, proj: &str) -> [usize; 2] {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (q, kv) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
        match proj {
            "q_proj" => [q, h],
            "k_proj" | "v_proj" => [kv, h],
            "o_proj" => [h, q],
            "gate_proj" | "up_proj" => [i, h],
            "down_proj" => [h, i],
            _ => unreachable!("unknown projection {proj}"),
        }
    }
}

fn dense(w: &Weights, name: &str, shape: &[usize]) -> Result<Tensor> {
    Ok(Tensor::from_vec(w.f32(name, shape)?, shape))
}

impl Model {
    /// Loads config.json and the safetensors weights of a model folder.
    pub fn load(dir: &Path) -> Result<Model> {
        let cfg = ModelConfig::load(dir)?;
        let w = Weights::open_dir(dir)?;
        Self::from_weights(cfg, &w).map_err(|e| match e {
            crate::Error::BadInput(m) => bad(format!("{}: {m}", dir.display())),
            other => other,
        })
    }

    pub fn from_weights(cfg: ModelConfig, w: &Weights) -> Result<Model> {
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let embed = Arc::new(dense(w, "model.embed_tokens.weight", &[v, h])?);
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let proj = |p: &str| -> Result<LinearWeight> {
                let shape = Layer::proj_shape(&cfg, p);
                Ok(LinearWeight::Dense(Arc::new(dense(w, &Layer::weight_name(l, p), &shape)?)))
            };
            layers.push(Layer {
                input_norm: dense(w, &format!("model.layers.{l}.input_layernorm.weight"), &[h])?,
                q: proj("q_proj")?,
                k: proj("k_proj")?,
                v: proj("v_proj")?,
                o: proj("o_proj")?,
                post_norm: dense(w, &format!("model.layers.{l}.post_attention_layernorm.weight"), &[h])?,
                gate: proj("gate_proj")?,
                up: proj("up_proj")?,
                down: proj("down_proj")?,
            });
        }
        if w.contains(&format!("model.layers.{}.input_layernorm.weight", cfg.num_layers)) {
            return Err(bad(format!(
                "weights hold more layers than num_hidden_layers = {} in config.json",
                cfg.num_layers
            )));
        }
        let norm = dense(w, "model.norm.weight", &[h])?;
        // Tied checkpoints usually omit lm_head; transformers then reuses the embedding.
        let lm_head = if cfg.tie_word_embeddings {
            LinearWeight::Dense(embed.clone())
        } else {
            LinearWeight::Dense(Arc::new(dense(w, "lm_head.weight", &[v, h])?))
        };
        Ok(Model { cfg, embed, layers, norm, lm_head })
    }

    fn attn_shape(&self) -> AttnShape {
        AttnShape {
            n_heads: self.cfg.num_heads,
            n_kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
            window: self.cfg.sliding_window,
        }
    }

    /// Checks every id is inside the vocabulary.
    pub fn check_ids(&self, ids: &[u32]) -> Result<()> {
        match ids.iter().find(|&&i| i as usize >= self.cfg.vocab_size) {
            Some(i) => Err(bad(format!("token id {i} is outside the vocabulary (size {})", self.cfg.vocab_size))),
            None => Ok(()),
        }
    }

    /// Final-norm hidden states `[tokens, hidden]` of packed sequences.
    pub fn forward_hidden(&self, ids: &[u32], pack: &Packing) -> Tensor {
        let c = &self.cfg;
        let rope = Rope::new(c.head_dim, c.rope_theta, pack.positions());
        let mut x = ops::embedding(&self.embed, ids);
        for layer in &self.layers {
            self.layer_forward(layer, &mut x, pack, &rope);
        }
        ops::rmsnorm(&x, &self.norm, c.rms_norm_eps).0
    }

    fn layer_forward(&self, l: &Layer, x: &mut Tensor, pack: &Packing, rope: &Rope) {
        let c = &self.cfg;
        let (n, _) = ops::rmsnorm(x, &l.input_norm, c.rms_norm_eps);
        let mut q = ops::linear(&n, &l.q);
        let mut k = ops::linear(&n, &l.k);
        let v = ops::linear(&n, &l.v);
        ops::rope_(&mut q, c.num_heads, c.head_dim, rope);
        ops::rope_(&mut k, c.num_kv_heads, c.head_dim, rope);
        let (a, _) = ops::attention(&q, &k, &v, pack, self.attn_shape());
        ops::add_(x, &ops::linear(&a, &l.o));
        let (n, _) = ops::rmsnorm(x, &l.post_norm, c.rms_norm_eps);
        let g = ops::linear(&n, &l.gate);
        let u = ops::linear(&n, &l.up);
        ops::add_(x, &ops::linear(&ops::swiglu(&g, &u), &l.down));
    }

    /// Per-token log-probabilities of each sequence's completion (the ids after
    /// `prompt_len`), each conditioned on everything before it.
    pub fn completion_logprobs(&self, seqs: &[ScoreSeq]) -> Result<Vec<Vec<f32>>> {
        let mut ids = Vec::new();
        for s in seqs {
            self.check_ids(&s.ids)?;
            if s.prompt_len == 0 || s.prompt_len >= s.ids.len() {
                return Err(bad("a sequence needs at least one prompt and one completion token"));
            }
            ids.extend_from_slice(&s.ids);
        }
        let pack = Packing::from_lengths(&seqs.iter().map(|s| s.ids.len()).collect::<Vec<_>>());
        let hidden = self.forward_hidden(&ids, &pack);
        // Row r predicts token r+1 of its sequence: keep rows prompt_len-1 .. len-2.
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        for (si, s) in seqs.iter().enumerate() {
            let base = pack.offsets[si];
            for p in s.prompt_len..s.ids.len() {
                rows.push(base + p - 1);
                targets.push(s.ids[p]);
            }
        }
        let lp = ops::target_logprobs(&ops::gather_rows(&hidden, &rows), &self.lm_head, &targets);
        let mut out = Vec::with_capacity(seqs.len());
        let mut at = 0;
        for s in seqs {
            let n = s.ids.len() - s.prompt_len;
            out.push(lp[at..at + n].to_vec());
            at += n;
        }
        Ok(out)
    }
}
