//! LLaMA / Mistral decoder (transformers' `LlamaForCausalLM` / `MistralForCausalLM`):
//! embedding → L × [RMSNorm → GQA attention with RoPE (+ sliding window) → residual →
//! RMSNorm → SwiGLU MLP → residual] → RMSNorm → lm_head. Written in `crate::ops` only.

use super::config::ModelConfig;
use super::weights::Weights;
use crate::error::{bad, Result};
use crate::lora::{Adapter, LoraPair};
use crate::ops::{self, AttnShape, Group, LinearWeight, Packing, Rope};
use crate::quant::{self, Nf4Tensor, SourceDtype};
use crate::tensor::Tensor;
use std::path::Path;
use std::sync::Arc;

/// The projections of one decoder layer, in PEFT's target-module names.
pub const PROJ_NAMES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

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
    /// What a saving forward keeps for backward (`--recompute`).
    pub recompute: Recompute,
    /// A saving forward also computes each target row's log-prob gradient with respect
    /// to its hidden state, so the backward needs no second pass through the lm_head
    /// (the default; `PALIGN_LOGPROB_GRAD=backward` turns it off; see
    /// `ops::target_logprobs_and_grad`).
    pub lm_grad_in_forward: bool,
}

/// The default of `Model::lm_grad_in_forward`: on, unless `PALIGN_LOGPROB_GRAD` is
/// `backward` (or `off`, `0`).
/// On an H200 (benches/RESULTS.md, 2026-11-28) the lm_head log-prob forward + backward at
/// 8192 tokens took 8.26 ms this way against 11.02 ms with the chunked backward, and its
/// GPU parity tests passed.
pub fn lm_grad_in_forward_default() -> bool {
    crate::switches::LOGPROB_GRAD_IN_FORWARD.get()
}

/// One sequence to score: all its ids and how many of them are prompt.
#[derive(Clone, Debug)]
pub struct ScoreSeq {
    pub ids: Vec<u32>,
    pub prompt_len: usize,
}

impl Layer {
    /// The seven projections, in `PROJ_NAMES` order.
    pub fn projections(&self) -> [&LinearWeight; 7] {
        [
            &self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down,
        ]
    }

    /// `projections`, mutable.
    pub fn projections_mut(&mut self) -> [&mut LinearWeight; 7] {
        [
            &mut self.q,
            &mut self.k,
            &mut self.v,
            &mut self.o,
            &mut self.gate,
            &mut self.up,
            &mut self.down,
        ]
    }

    /// Moves the layer's weights to the device, as `Model::to_device` does (a no-op for
    /// a layer already there).
    pub fn to_device(&mut self) -> Result<()> {
        if self.input_norm.is_cuda() {
            return Ok(());
        }
        self.input_norm = self.input_norm.to_cuda_bf16()?;
        self.post_norm = self.post_norm.to_cuda_bf16()?;
        for w in self.projections_mut() {
            *w = w.to_device()?;
        }
        Ok(())
    }

    /// The full HF name of a projection's weight.
    pub fn weight_name(layer: usize, proj: &str) -> String {
        let block = if matches!(proj, "gate_proj" | "up_proj" | "down_proj") {
            "mlp"
        } else {
            "self_attn"
        };
        format!("model.layers.{layer}.{block}.{proj}.weight")
    }

    /// `[out, in]` of each projection.
    pub fn proj_shape(cfg: &ModelConfig, proj: &str) -> [usize; 2] {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (q, kv) = (
            cfg.num_heads * cfg.head_dim,
            cfg.num_kv_heads * cfg.head_dim,
        );
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

/// The tensors besides the projections that `Model::from_weights` reads, with their
/// shapes: the embedding, each layer's two norms, the final norm, lm_head unless tied.
pub fn dense_tensors(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (v, h) = (cfg.vocab_size, cfg.hidden_size);
    let mut t = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
    for l in 0..cfg.num_layers {
        t.push((format!("model.layers.{l}.input_layernorm.weight"), vec![h]));
        t.push((
            format!("model.layers.{l}.post_attention_layernorm.weight"),
            vec![h],
        ));
    }
    t.push(("model.norm.weight".to_string(), vec![h]));
    if !cfg.tie_word_embeddings {
        t.push(("lm_head.weight".to_string(), vec![v, h]));
    }
    t
}

/// Checks, without reading them, that the tensors of [`dense_tensors`] are there with
/// their shapes and a float dtype (what `palign quantize` copies as they are).
pub fn check_dense_tensors(cfg: &ModelConfig, w: &Weights) -> Result<()> {
    use safetensors::Dtype;
    for (name, shape) in dense_tensors(cfg) {
        let e = w.entry(&name, &shape)?;
        if !matches!(e.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
            return Err(bad(format!(
                "weights: tensor `{name}` has dtype {:?}; F32, BF16 or F16 expected",
                e.dtype
            )));
        }
    }
    Ok(())
}

/// A dense projection in bitsandbytes' NF4, recording the checkpoint's dtype (config.json
/// `torch_dtype`; f32 when absent) as the quantized tensor's source dtype.
fn to_nf4(
    cfg: &ModelConfig,
    t: &Tensor,
    blocksize: usize,
    double_quant: bool,
) -> Result<Nf4Tensor> {
    let dtype = cfg
        .dtype
        .as_deref()
        .and_then(SourceDtype::parse)
        .unwrap_or(SourceDtype::F32);
    quant::quantize_nf4_from(
        t.cpu(),
        dtype,
        [t.shape[0], t.shape[1]],
        blocksize,
        double_quant,
    )
}

impl Model {
    /// Loads config.json and the safetensors weights of a model folder.
    pub fn load(dir: &Path) -> Result<Model> {
        Self::load_with(dir, None, false)
    }

    /// `load`, with `nf4 = Some((blocksize, double_quant))` quantizing every dense decoder
    /// projection as it is read (what `quantize_nf4` makes of it; projections a 4-bit
    /// checkpoint stores in NF4 stay as they are), and with `cuda` moving each layer to
    /// the device as soon as it is read (then the rest: `to_device`). The f32 copies of
    /// all projections never exist at once: a 7B load holds about one layer and the
    /// embeddings on the host (plus the NF4 weights when they stay there), not 30 GB.
    pub fn load_with(dir: &Path, nf4: Option<(usize, bool)>, cuda: bool) -> Result<Model> {
        let cfg = ModelConfig::load(dir)?;
        let w = Weights::open_dir(dir)?;
        Self::from_weights_with(cfg, &w, nf4, cuda).map_err(|e| match e {
            crate::Error::BadInput(m) => bad(format!("{}: {m}", dir.display())),
            other => other,
        })
    }

    pub fn from_weights(cfg: ModelConfig, w: &Weights) -> Result<Model> {
        Self::from_weights_with(cfg, w, None, false)
    }

    fn from_weights_with(
        cfg: ModelConfig,
        w: &Weights,
        nf4: Option<(usize, bool)>,
        cuda: bool,
    ) -> Result<Model> {
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let embed = Arc::new(dense(w, "model.embed_tokens.weight", &[v, h])?);
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let proj = |p: &str| -> Result<LinearWeight> {
                let shape = Layer::proj_shape(&cfg, p);
                let name = Layer::weight_name(l, p);
                if w.contains(&format!("{name}.absmax")) {
                    // A bitsandbytes 4-bit checkpoint: keep the weight in NF4.
                    let q = Nf4Tensor::from_bnb_entries(&name, |n| {
                        w.get(n)
                            .map(|e| (format!("{:?}", e.dtype), e.shape.clone(), w.bytes(e)))
                    })?;
                    if q.shape != shape {
                        return Err(bad(format!(
                            "weights: 4-bit tensor `{name}` has shape {:?}, config.json implies {shape:?}",
                            q.shape
                        )));
                    }
                    return Ok(LinearWeight::Nf4(Arc::new(q)));
                }
                let t = dense(w, &name, &shape)?;
                Ok(match nf4 {
                    Some((bs, dq)) => LinearWeight::Nf4(Arc::new(to_nf4(&cfg, &t, bs, dq)?)),
                    None => LinearWeight::Dense(Arc::new(t)),
                })
            };
            layers.push(Layer {
                input_norm: dense(w, &format!("model.layers.{l}.input_layernorm.weight"), &[h])?,
                q: proj("q_proj")?,
                k: proj("k_proj")?,
                v: proj("v_proj")?,
                o: proj("o_proj")?,
                post_norm: dense(
                    w,
                    &format!("model.layers.{l}.post_attention_layernorm.weight"),
                    &[h],
                )?,
                gate: proj("gate_proj")?,
                up: proj("up_proj")?,
                down: proj("down_proj")?,
            });
            if cuda {
                layers[l].to_device()?;
            }
        }
        if w.contains(&format!(
            "model.layers.{}.input_layernorm.weight",
            cfg.num_layers
        )) {
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
        let mut model = Model {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            recompute: Recompute::None,
            lm_grad_in_forward: lm_grad_in_forward_default(),
        };
        if cuda {
            model.to_device()?;
        }
        Ok(model)
    }

    /// Quantizes every dense decoder projection to NF4 in memory (`--quant nf4`, QLoRA
    /// bases), exactly as bitsandbytes would from the weights as stored; embeddings,
    /// norms and lm_head stay as they are.
    pub fn quantize_nf4(&mut self, blocksize: usize, double_quant: bool) -> Result<()> {
        for layer in &mut self.layers {
            for w in layer.projections_mut() {
                if let LinearWeight::Dense(t) = w {
                    *w =
                        LinearWeight::Nf4(Arc::new(to_nf4(&self.cfg, t, blocksize, double_quant)?));
                }
            }
        }
        Ok(())
    }

    /// Moves every weight to the device: dense weights and norms as bf16 (rounded to
    /// nearest even, as `model.to(torch.bfloat16)` does), NF4 weights in their packed
    /// form. A tied lm_head stays shared with the embedding.
    /// Layers already there (`load_with` moves each as it is read) are left alone.
    pub fn to_device(&mut self) -> Result<()> {
        for l in &mut self.layers {
            l.to_device()?;
        }
        if self.embed.is_cuda() {
            return Ok(());
        }
        let tied = matches!(&self.lm_head, LinearWeight::Dense(t) if Arc::ptr_eq(t, &self.embed));
        let embed = Arc::new(self.embed.to_cuda_bf16()?);
        self.norm = self.norm.to_cuda_bf16()?;
        self.lm_head = if tied {
            LinearWeight::Dense(embed.clone())
        } else {
            self.lm_head.to_device()?
        };
        self.embed = embed;
        Ok(())
    }

    /// Whether the weights live on the device.
    pub fn is_cuda(&self) -> bool {
        self.embed.is_cuda()
    }

    /// Whether the decoder projections are NF4 (a QLoRA base).
    pub fn is_nf4(&self) -> bool {
        self.layers
            .first()
            .is_some_and(|l| matches!(l.q, LinearWeight::Nf4(_) | LinearWeight::Nf4Cuda(_)))
    }

    pub(crate) fn attn_shape(&self) -> AttnShape {
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
            Some(i) => Err(bad(format!(
                "token id {i} is outside the vocabulary (size {})",
                self.cfg.vocab_size
            ))),
            None => Ok(()),
        }
    }

    /// Runs the model over packed sequences and returns `log p(targets[i])` predicted at
    /// hidden row `rows[i]`. With `adapter`, LoRA is applied (dropout only when `dropout`
    /// is given). With `save`, the returned `Trace` holds what `backward` needs.
    ///
    /// Memory plan of the CPU reference: forward saves every layer's inputs and
    /// activations (norm inputs and rstd, q/k after RoPE, v, attention output and
    /// log-sum-exp, gate/up/SwiGLU output, each LoRA's `drop(x)·Aᵀ` and dropout mask);
    /// backward recomputes only the attention probabilities (from the lse) and the
    /// lm_head logits (chunked), which are the two tokens² / tokens×vocab tensors.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        adapter: Option<&Adapter>,
        ids: &[u32],
        pack: &Packing,
        rows: &[usize],
        targets: &[u32],
        mut dropout: Option<&mut Dropout>,
        save: bool,
    ) -> Result<(Tensor, Option<Trace>)> {
        let c = &self.cfg;
        let rope = Rope::new(c.head_dim, c.rope_theta, pack.positions());
        let mut x = ops::embedding(&self.embed, ids)?;
        let mut layers = Vec::new();
        let drop_cfg = dropout.as_deref().map(|d| (d.p, d.seed, d.step));
        for (li, layer) in self.layers.iter().enumerate() {
            let lora = adapter.map(|a| (&a.layers[li], a.cfg.scale()));
            if save && self.recompute == Recompute::Full {
                let calls = dropout.as_deref().map_or(0, |d| d.calls);
                let input = x.try_clone()?;
                x = self
                    .layer_forward(layer, lora, x, pack, &rope, dropout.as_deref_mut(), false)?
                    .0;
                layers.push(LayerSaved::Input { x: input, calls });
                continue;
            }
            let (out, trace) =
                self.layer_forward(layer, lora, x, pack, &rope, dropout.as_deref_mut(), save)?;
            x = out;
            layers.extend(trace.map(|t| LayerSaved::Trace(Box::new(t))));
        }
        let (hn, rstd_final) = ops::rmsnorm(&x, &self.norm, c.rms_norm_eps)?;
        let hidden_rows = ops::gather_rows(&hn, rows)?;
        let (lp, lm) = if save && self.lm_grad_in_forward {
            let (lp, grad) = ops::target_logprobs_and_grad(&hidden_rows, &self.lm_head, targets)?;
            (lp, LmSaved::Grad(grad))
        } else {
            let (lp, lse) = ops::target_logprobs(&hidden_rows, &self.lm_head, targets)?;
            (lp, LmSaved::Hidden { hidden_rows, lse })
        };
        let trace = save.then(|| Trace {
            pack: pack.clone(),
            rope,
            layers,
            dropout: drop_cfg,
            x_final: x,
            rstd_final,
            lm,
            rows: rows.to_vec(),
            targets: targets.to_vec(),
        });
        Ok((lp, trace))
    }

    /// One projection `x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ`.
    pub(crate) fn proj(
        x: &Tensor,
        w: &LinearWeight,
        lora: Option<(&LoraPair, f32)>,
        dropout: Option<&mut Dropout>,
    ) -> Result<(Tensor, Option<LoraSaved>)> {
        let mask = match lora {
            Some(_) => dropout.and_then(Dropout::draw),
            None => None,
        };
        let [out] = Self::proj_group(x, [ProjIn::new(w, lora, mask)])?;
        Ok(out)
    }

    /// Projections of one shared input (q/k/v; gate/up; o or down alone):
    /// `y_i = x·W_iᵀ + s·(drop_i(x)·A_iᵀ)·B_iᵀ`, each adapter with its own mask (drawn by
    /// the caller, or replayed when a recompute runs the projections again). The
    /// adapters' down-projections are one `ops::lora_down` (on the device one pass over x
    /// where `PALIGN_LORA_DROP` takes the fused kernel, else a dropout copy and a GEMM per
    /// adapter).
    pub fn proj_group<const N: usize>(
        x: &Tensor,
        projs: [ProjIn; N],
    ) -> Result<[(Tensor, Option<LoraSaved>); N]> {
        if !ops::lora_fused_wanted(x) {
            return Self::proj_group_unfused(x, projs);
        }
        // The fused NF4 kernels take one adapter at a time; what they don't take goes
        // the unfused way, alone.
        let out: Vec<_> = projs
            .into_iter()
            .map(|p| match Self::proj_fused(x, &p)? {
                Some(done) => Ok(done),
                None => Self::proj_group_unfused(x, [p]).map(|[r]| r),
            })
            .collect::<Result<_>>()?;
        out.try_into()
            .map_err(|_| bad("internal: projection group size"))
    }

    /// One adapted projection through the fused NF4 LoRA kernel (the adapter as an
    /// extra K slab of the base GEMM), where it applies.
    fn proj_fused(x: &Tensor, p: &ProjIn) -> Result<Option<(Tensor, Option<LoraSaved>)>> {
        let Some((pair, s)) = p.lora else {
            return Ok(None);
        };
        let dropped = p.mask.map(|m| ops::dropout(x, m)).transpose()?;
        Ok(
            ops::lora_fused_forward(x, dropped.as_ref(), p.w, pair, s)?.map(|(y, xa)| {
                let saved = LoraSaved {
                    xa,
                    xa_scaled: true,
                    mask: p.mask,
                };
                (y, Some(saved))
            }),
        )
    }

    fn proj_group_unfused<const N: usize>(
        x: &Tensor,
        projs: [ProjIn; N],
    ) -> Result<[(Tensor, Option<LoraSaved>); N]> {
        let heads: Vec<ops::LoraHead> = projs
            .iter()
            .filter_map(|p| {
                p.lora.map(|(pair, _)| ops::LoraHead {
                    a: &pair.a,
                    mask: p.mask,
                })
            })
            .collect();
        let mut xas = ops::lora_down(x, &heads)?.into_iter();
        let out: Vec<_> = projs
            .iter()
            .map(|p| {
                let mut y = ops::linear(x, p.w)?;
                let Some((pair, s)) = p.lora else {
                    return Ok((y, None));
                };
                let xa = xas.next().ok_or_else(|| bad("internal: lora_down heads"))?;
                ops::matmul_t_acc_(&mut y, &xa, &pair.b, s)?;
                let saved = LoraSaved {
                    xa,
                    xa_scaled: false,
                    mask: p.mask,
                };
                Ok((y, Some(saved)))
            })
            .collect::<Result<_>>()?;
        out.try_into()
            .map_err(|_| bad("internal: projection group size"))
    }

    /// Backward of `proj_group`: dX summed over the group; each adapter's dA, dB
    /// accumulated into its gradient. The adapters' shares of dX and dA take one pass
    /// over dX and one over x for the whole group on the device.
    pub fn proj_group_backward(x: &Tensor, projs: Vec<ProjGrad>) -> Result<Tensor> {
        if !ops::lora_fused_wanted(x) {
            return Self::proj_group_backward_unfused(x, projs);
        }
        // The fused NF4 kernels take one adapter at a time (no dropout); the others go
        // the unfused way, alone.
        let mut dx: Option<Tensor> = None;
        for p in projs {
            let d = match Self::proj_fused_backward(x, p)? {
                Ok(d) => d,
                Err(p) => Self::proj_group_backward_unfused(x, vec![p])?,
            };
            match dx.as_mut() {
                None => dx = Some(d),
                Some(acc) => ops::add_(acc, &d)?,
            }
        }
        dx.ok_or_else(|| bad("internal: empty projection group"))
    }

    /// dX = dY·W + (s·dY·B)·A in one NF4 kernel, dA += (s·dY·B)ᵀ·x, dB += s·dYᵀ·xa,
    /// where the fused kernel applies (an adapter, no dropout); else `p` back.
    fn proj_fused_backward<'a>(
        x: &Tensor,
        p: ProjGrad<'a>,
    ) -> Result<std::result::Result<Tensor, ProjGrad<'a>>> {
        let (Some((pair, s)), Some(saved)) = (p.lora, p.saved) else {
            return Ok(Err(p));
        };
        if saved.mask.is_some() || p.grad.is_none() {
            return Ok(Err(p));
        }
        let Some((dx, dyb_s)) = ops::lora_fused_backward(p.dy, p.w, pair, s)? else {
            return Ok(Err(p));
        };
        let grad = p.grad.ok_or_else(|| bad("internal: no gradient"))?;
        ops::add_at_b_(&mut grad.a, &dyb_s, x, 1.0)?;
        // The fused forward saved xa with s folded in.
        let xa_alpha = if saved.xa_scaled { 1.0 } else { s };
        ops::add_at_b_(&mut grad.b, p.dy, &saved.xa, xa_alpha)?;
        Ok(Ok(dx))
    }

    fn proj_group_backward_unfused(x: &Tensor, projs: Vec<ProjGrad>) -> Result<Tensor> {
        // The base products: the first makes dX, the others accumulate in their GEMMs.
        let (first, rest) = projs
            .split_first()
            .ok_or_else(|| bad("internal: empty projection group"))?;
        let mut dx = ops::linear_backward(first.dy, first.w)?;
        for p in rest {
            ops::linear_backward_acc_(&mut dx, p.dy, p.w)?;
        }
        let (mut heads, mut dybs, mut grads_a, mut scale) = (vec![], vec![], vec![], None);
        for p in projs {
            let (Some((pair, s)), Some(saved), Some(grad)) = (p.lora, p.saved, p.grad) else {
                continue;
            };
            if scale.is_some_and(|s0| s0 != s) {
                return Err(bad("internal: adapters of one group with different scales"));
            }
            scale = Some(s);
            // dB += s·dYᵀ·(drop(x)·Aᵀ) (the fused forward saved xa with s folded in), and
            // dY·B [m, r] for dA and dX.
            let xa_alpha = if saved.xa_scaled { 1.0 } else { s };
            dybs.push(ops::lora_up_backward_(
                &mut grad.b,
                p.dy,
                &saved.xa,
                &pair.b,
                xa_alpha,
            )?);
            heads.push(ops::LoraHead {
                a: &pair.a,
                mask: saved.mask,
            });
            grads_a.push(&mut grad.a);
        }
        if let Some(s) = scale {
            let dybs: Vec<&Tensor> = dybs.iter().collect();
            ops::lora_grad_a_(&mut grads_a, x, &heads, &dybs, s)?;
            ops::lora_dx_acc_(&mut dx, &heads, &dybs, s)?;
        }
        Ok(dx)
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        l: &Layer,
        lora: Option<(&[Option<LoraPair>; 7], f32)>,
        x: Tensor,
        pack: &Packing,
        rope: &Rope,
        mut dropout: Option<&mut Dropout>,
        save: bool,
    ) -> Result<(Tensor, Option<LayerTrace>)> {
        let c = &self.cfg;
        let pair = |p: usize| lora.and_then(|(slots, s)| slots[p].as_ref().map(|x| (x, s)));
        // Masks in projection order (q, k, v, o, gate, up, down), as a recompute replays.
        let mut draw = |p: usize| match pair(p) {
            Some(_) => dropout.as_deref_mut().and_then(Dropout::draw),
            None => None,
        };
        let qkv_masks = [draw(0), draw(1), draw(2)];
        let (attn, [s0, s1, s2]) = self.attention_block(l, lora, &x, pack, rope, qkv_masks)?;
        let [(o, s3)] = Self::proj_group(&attn.a, [ProjIn::new(&l.o, pair(3), draw(3))])?;
        // Residuals add into the fresh projection output: no copy of the saved input.
        let mut h1 = o;
        ops::add_(&mut h1, &x)?;
        let (n2, rstd2) = ops::rmsnorm(&h1, &l.post_norm, c.rms_norm_eps)?;
        let gate = ProjIn::new(&l.gate, pair(4), draw(4));
        let up = ProjIn::new(&l.up, pair(5), draw(5));
        let [(g, s4), (u, s5)] = Self::proj_group(&n2, [gate, up])?;
        let act = ops::swiglu(&g, &u)?;
        let [(d, s6)] = Self::proj_group(&act, [ProjIn::new(&l.down, pair(6), draw(6))])?;
        let mut out = d;
        ops::add_(&mut out, &h1)?;
        if !save {
            return Ok((out, None));
        }
        let t = LayerTrace {
            x,
            // `--recompute attention`: backward runs the attention block again. (With
            // `full` this is the backward's replay, which keeps everything.)
            attn: (self.recompute != Recompute::Attention).then_some(attn),
            h1,
            rstd2,
            n2,
            g,
            u,
            act,
            lora: [s0, s1, s2, s3, s4, s5, s6],
        };
        Ok((out, Some(t)))
    }

    /// `n1 = rmsnorm(x)`, q/k/v projections, RoPE, attention: the part of a layer that
    /// `--recompute attention` runs again in backward (with the same dropout masks).
    #[allow(clippy::too_many_arguments)]
    fn attention_block(
        &self,
        l: &Layer,
        lora: Option<(&[Option<LoraPair>; 7], f32)>,
        x: &Tensor,
        pack: &Packing,
        rope: &Rope,
        masks: [Option<ops::DropMask>; 3],
    ) -> Result<(AttnSaved, [Option<LoraSaved>; 3])> {
        let c = &self.cfg;
        let pair = |p: usize| lora.and_then(|(slots, s)| slots[p].as_ref().map(|x| (x, s)));
        let (n1, rstd1) = ops::rmsnorm(x, &l.input_norm, c.rms_norm_eps)?;
        let [(mut q, s0), (mut k, s1), (v, s2)] = Self::proj_group(
            &n1,
            [
                ProjIn::new(&l.q, pair(0), masks[0]),
                ProjIn::new(&l.k, pair(1), masks[1]),
                ProjIn::new(&l.v, pair(2), masks[2]),
            ],
        )?;
        ops::rope_qk_(&mut q, &mut k, c.num_heads, c.num_kv_heads, rope)?;
        let (a, lse) = ops::attention(&q, &k, &v, pack, self.attn_shape())?;
        let saved = AttnSaved {
            n1,
            rstd1,
            q,
            k,
            v,
            a,
            lse,
        };
        Ok((saved, [s0, s1, s2]))
    }

    #[allow(clippy::too_many_arguments)]
    /// Backward of one layer: from ∂L/∂(layer output) to ∂L/∂(layer input),
    /// accumulating this layer's adapter gradients into `grads`.
    fn layer_backward(
        &self,
        l: &Layer,
        lora: Option<(&[Option<LoraPair>; 7], f32)>,
        t: &LayerTrace,
        dout: Tensor,
        pack: &Packing,
        rope: &Rope,
        grads: &mut [Option<LoraPair>; 7],
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let pair = |p: usize| lora.and_then(|(slots, s)| slots[p].as_ref().map(|x| (x, s)));
        let [g0, g1, g2, g3, g4, g5, g6] = grads;
        let recomputed;
        let at = match &t.attn {
            Some(a) => a,
            None => {
                let mask = |p: usize| t.lora[p].as_ref().and_then(|s| s.mask);
                let masks = [mask(0), mask(1), mask(2)];
                recomputed = self.attention_block(l, lora, &t.x, pack, rope, masks)?.0;
                &recomputed
            }
        };
        // MLP: out = h1 + down(swiglu(gate(n2), up(n2))), n2 = rmsnorm(h1)
        let d_act = Self::proj_group_backward(
            &t.act,
            vec![ProjGrad::new(
                &dout,
                &l.down,
                pair(6),
                t.lora[6].as_ref(),
                g6.as_mut(),
            )],
        )?;
        let (dg, du) = ops::swiglu_backward(&d_act, &t.g, &t.u)?;
        let dn2 = Self::proj_group_backward(
            &t.n2,
            vec![
                ProjGrad::new(&dg, &l.gate, pair(4), t.lora[4].as_ref(), g4.as_mut()),
                ProjGrad::new(&du, &l.up, pair(5), t.lora[5].as_ref(), g5.as_mut()),
            ],
        )?;
        // The residual stream's gradient plus the norm branch's, summed by the norm's
        // backward itself (no separate add pass).
        let mut dh1 = dout;
        ops::rmsnorm_backward_acc_(&mut dh1, &dn2, &t.h1, &l.post_norm, &t.rstd2)?;
        drop(dn2);
        // Attention: h1 = x + o(attn(rope(q(n1)), rope(k(n1)), v(n1))), n1 = rmsnorm(x)
        let da = Self::proj_group_backward(
            &at.a,
            vec![ProjGrad::new(
                &dh1,
                &l.o,
                pair(3),
                t.lora[3].as_ref(),
                g3.as_mut(),
            )],
        )?;
        let (mut dq, mut dk, dv) = ops::attention_backward(
            &at.q,
            &at.k,
            &at.v,
            &at.a,
            &da,
            &at.lse,
            pack,
            self.attn_shape(),
        )?;
        ops::rope_qk_backward_(&mut dq, &mut dk, c.num_heads, c.num_kv_heads, rope)?;
        let dn1 = Self::proj_group_backward(
            &at.n1,
            vec![
                ProjGrad::new(&dq, &l.q, pair(0), t.lora[0].as_ref(), g0.as_mut()),
                ProjGrad::new(&dk, &l.k, pair(1), t.lora[1].as_ref(), g1.as_mut()),
                ProjGrad::new(&dv, &l.v, pair(2), t.lora[2].as_ref(), g2.as_mut()),
            ],
        )?;
        let mut dx = dh1;
        ops::rmsnorm_backward_acc_(&mut dx, &dn1, &t.x, &l.input_norm, &at.rstd1)?;
        Ok(dx)
    }

    /// Gradients of the adapter weights, given `dlogp[i] = ∂L/∂ log p(targets[i])` (f32
    /// `[targets]`, host or device) for the targets of the forward that produced `trace`.
    /// Accumulates into `grads` (same layout as `adapter`), so micro-batches add up.
    pub fn backward(
        &self,
        adapter: &Adapter,
        trace: &Trace,
        dlogp: &Tensor,
        grads: &mut Adapter,
    ) -> Result<()> {
        let d_rows = match &trace.lm {
            LmSaved::Hidden { hidden_rows, lse } => ops::target_logprobs_backward(
                hidden_rows,
                &self.lm_head,
                &trace.targets,
                lse,
                dlogp,
            )?,
            LmSaved::Grad(grad) => ops::scale_rows(grad, dlogp)?,
        };
        let mut d_hidden = ops::zeros_like(&trace.x_final)?;
        ops::scatter_add_rows(&mut d_hidden, &trace.rows, &d_rows)?;
        let mut dx =
            ops::rmsnorm_backward(&d_hidden, &trace.x_final, &self.norm, &trace.rstd_final)?;
        let scale = adapter.cfg.scale();
        for (li, layer) in self.layers.iter().enumerate().rev() {
            let lora = Some((&adapter.layers[li], scale));
            let recomputed;
            let t = match &trace.layers[li] {
                LayerSaved::Trace(t) => t,
                LayerSaved::Input { x, calls } => {
                    let mut d = trace.dropout.map(|(p, seed, step)| Dropout {
                        p,
                        seed,
                        step,
                        calls: *calls,
                    });
                    let (_, t) = self.layer_forward(
                        layer,
                        lora,
                        x.try_clone()?,
                        &trace.pack,
                        &trace.rope,
                        d.as_mut(),
                        true,
                    )?;
                    recomputed = t.ok_or_else(|| bad("internal: recompute saved nothing"))?;
                    &recomputed
                }
            };
            dx = self.layer_backward(
                layer,
                lora,
                t,
                dx,
                &trace.pack,
                &trace.rope,
                &mut grads.layers[li],
            )?;
        }
        Ok(())
    }

    /// Per-token log-probabilities of each sequence's completion (the ids after
    /// `prompt_len`), each conditioned on everything before it.
    pub fn completion_logprobs(
        &self,
        seqs: &[ScoreSeq],
        adapter: Option<&Adapter>,
    ) -> Result<Vec<Vec<f32>>> {
        let (b, lp) = self.completion_forward(seqs, adapter)?;
        Ok(b.split(&ops::to_host(&lp)?))
    }

    /// Each sequence's completion log-prob, summed (or, with `mean`, averaged over its
    /// completion tokens), reduced where the model runs: f32 `[seqs]`.
    pub fn sequence_logprobs(
        &self,
        seqs: &[ScoreSeq],
        adapter: Option<&Adapter>,
        mean: bool,
    ) -> Result<Tensor> {
        let (b, lp) = self.completion_forward(seqs, adapter)?;
        ops::segment_sums(&lp, &b.counts, mean)
    }

    fn completion_forward(
        &self,
        seqs: &[ScoreSeq],
        adapter: Option<&Adapter>,
    ) -> Result<(SeqBatch, Tensor)> {
        for s in seqs {
            self.check_ids(&s.ids)?;
            if s.prompt_len == 0 || s.prompt_len >= s.ids.len() {
                return Err(bad(
                    "a sequence needs at least one prompt and one completion token",
                ));
            }
        }
        // No dropout here, so sequences that share a prompt can compute it once.
        let b = SeqBatch::sharing_prefixes(seqs);
        let (lp, _) = self.forward(adapter, &b.ids, &b.pack, &b.rows, &b.targets, None, false)?;
        Ok((b, lp))
    }
}

/// Sequences packed for one forward, with the rows and targets of their completions.
pub struct SeqBatch {
    pub ids: Vec<u32>,
    pub pack: Packing,
    /// The row whose hidden state predicts each target: for token p of a sequence, the
    /// row of its token p−1 (a shared prefix's row when p−1 is in the prefix, so one row
    /// can appear twice).
    pub rows: Vec<usize>,
    pub targets: Vec<u32>,
    /// Completion tokens per sequence.
    pub counts: Vec<usize>,
    /// Tokens of the sequences as given (`ids.len()` counts a shared prefix once).
    pub tokens: usize,
}

/// Whether shared prefixes are on (`SeqBatch::sharing_prefixes` and `PackedSeqs` for
/// training, scoring, evaluation and generation's prefill); `PALIGN_SHARE_PREFIX=off`
/// turns them off, for comparisons and as an escape hatch.
pub fn prefix_sharing_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| crate::switches::SHARE_PREFIX.get())
}

impl SeqBatch {
    /// Each sequence packed on its own.
    pub fn new(seqs: &[ScoreSeq]) -> Self {
        Self::build(seqs, false)
    }

    /// Like `new`, but consecutive sequences that begin with the same tokens (a DPO
    /// pair's prompt, several completions of one prompt) store and compute those tokens
    /// once (`crate::packing`). Same log-probs up to float summation order, for passes
    /// without dropout only: with dropout each copy of a prompt draws its own masks, and
    /// sharing them would change the noise the loss sees. Falls back to `new` when the
    /// shared tokens are under 1/32 of the batch (the attention's gathers would cost more
    /// than they save) or sharing is turned off.
    pub fn sharing_prefixes(seqs: &[ScoreSeq]) -> Self {
        Self::build(seqs, true)
    }

    /// The token rows `sharing_prefixes` would save on sequences with these ids (0 when
    /// it would not share), without building the batch.
    pub fn prefix_saving(ids: &[&[u32]]) -> usize {
        shared_groups(ids).map_or(0, |g| saving(&g))
    }

    fn build(seqs: &[ScoreSeq], share: bool) -> Self {
        let ids: Vec<&[u32]> = seqs.iter().map(|s| s.ids.as_slice()).collect();
        let packed = PackedSeqs::new(&ids, share);
        let (mut rows, mut targets, mut counts) = (Vec::new(), Vec::new(), Vec::new());
        for (i, s) in seqs.iter().enumerate() {
            for p in s.prompt_len..s.ids.len() {
                rows.push(packed.row(i, p - 1));
                targets.push(s.ids[p]);
            }
            counts.push(s.ids.len() - s.prompt_len);
        }
        SeqBatch {
            ids: packed.ids,
            pack: packed.pack,
            rows,
            targets,
            counts,
            tokens: seqs.iter().map(|s| s.ids.len()).sum(),
        }
    }

    /// Splits per-target values back into per-sequence lists.
    pub fn split(&self, v: &[f32]) -> Vec<Vec<f32>> {
        let mut at = 0;
        self.counts
            .iter()
            .map(|&n| {
                at += n;
                v[at - n..at].to_vec()
            })
            .collect()
    }
}

/// Sequences packed into one batch's rows: each on its own, or consecutive ones that
/// begin with the same tokens storing them once (`crate::packing`).
pub struct PackedSeqs {
    pub ids: Vec<u32>,
    pub pack: Packing,
    /// Per sequence: its group's first row, the shared prefix length, its own first row.
    at: Vec<(usize, usize, usize)>,
}

impl PackedSeqs {
    /// With `share`, sequences are grouped as `SeqBatch::sharing_prefixes` groups them
    /// (when sharing is on and worth it); else each is its own.
    pub fn new(seqs: &[&[u32]], share: bool) -> Self {
        let groups = share
            .then(|| shared_groups(seqs))
            .flatten()
            .unwrap_or_else(|| vec![(1, 0); seqs.len()]);
        // One group after another: its prefix once, then each member's own tokens.
        let (mut layout, mut ids, mut at) = (Vec::new(), Vec::new(), Vec::new());
        let mut rest = seqs;
        for &(n, prefix) in &groups {
            let (group, tail) = rest.split_at(n);
            rest = tail;
            let start = ids.len();
            ids.extend_from_slice(&group[0][..prefix]);
            for s in group {
                at.push((start, prefix, ids.len()));
                ids.extend_from_slice(&s[prefix..]);
            }
            layout.push(Group {
                prefix,
                branches: group.iter().map(|s| s.len() - prefix).collect(),
            });
        }
        let pack = Packing::with_prefixes(&layout);
        PackedSeqs { ids, pack, at }
    }

    /// The row holding token `pos` of sequence `s` (a prefix row is every sharer's).
    pub fn row(&self, s: usize, pos: usize) -> usize {
        let (start, prefix, own) = self.at[s];
        if pos < prefix {
            start + pos
        } else {
            own + pos - prefix
        }
    }
}

/// Runs of consecutive sequences that share a prefix with the run's first, as (count,
/// prefix length). A sequence joins the run when its common prefix with the first is at
/// least the run's and at least its common prefix with the sequence after it (so in
/// chosen/rejected pairs, a chosen whose prompt differs from its rejected's still pairs
/// with the right one). Every sequence keeps at least one token of its own.
fn prefix_groups(seqs: &[&[u32]]) -> Vec<(usize, usize)> {
    let common = |a: &[u32], b: &[u32]| {
        let n = a.iter().zip(b).take_while(|(x, y)| x == y).count();
        n.min(a.len().saturating_sub(1))
            .min(b.len().saturating_sub(1))
    };
    let mut groups = Vec::new();
    let mut i = 0;
    while i < seqs.len() {
        let root = seqs[i];
        let (mut j, mut prefix) = (i + 1, usize::MAX);
        while j < seqs.len() {
            let l = common(root, seqs[j]);
            let with_next = seqs.get(j + 1).map_or(0, |n| common(seqs[j], n));
            if l == 0 || l < with_next || (prefix != usize::MAX && l < prefix) {
                break;
            }
            prefix = prefix.min(l);
            j += 1;
        }
        groups.push((j - i, if j > i + 1 { prefix } else { 0 }));
        i = j;
    }
    groups
}

fn saving(groups: &[(usize, usize)]) -> usize {
    groups.iter().map(|&(n, p)| (n - 1) * p).sum()
}

/// `prefix_groups` when sharing them is worth it: on, and saving at least 1/32 of the
/// tokens (below that the attention's gathers cost more than they save).
fn shared_groups(ids: &[&[u32]]) -> Option<Vec<(usize, usize)>> {
    let groups = prefix_groups(ids);
    let total: usize = ids.iter().map(|s| s.len()).sum();
    (prefix_sharing_enabled() && saving(&groups) * 32 >= total).then_some(groups)
}

/// Dropout on adapter inputs (PEFT's `lora_dropout`): keep with probability 1−p and
/// scale kept values by 1/(1−p). Mask `c` of step `step` is the counter-based stream
/// `rng::dropout_stream(seed, step, c)`, so runs and resumes repeat exactly, the device
/// draws the same masks as the CPU, and backward recomputes a mask from its stream.
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
    pub step: u64,
    /// Masks drawn so far in this step.
    pub calls: u64,
}

impl Dropout {
    pub fn new(p: f32, seed: u64, step: u64) -> Dropout {
        Dropout {
            p,
            seed,
            step,
            calls: 0,
        }
    }

    /// The next mask of this step (`None` when p is 0).
    fn draw(&mut self) -> Option<ops::DropMask> {
        if self.p <= 0.0 {
            return None;
        }
        let stream = crate::backend::cpu::rng::dropout_stream(self.seed, self.step, self.calls);
        self.calls += 1;
        Some(ops::DropMask { stream, p: self.p })
    }
}

/// What one LoRA saved in forward.
pub struct LoraSaved {
    /// `drop(x)·Aᵀ`, `[m, r]` (times s when `xa_scaled`).
    pub xa: Tensor,
    /// The fused NF4 kernel saves `s·drop(x)·Aᵀ` (rounded to bf16 once, scale included).
    pub xa_scaled: bool,
    /// The dropout mask's stream; `None` without dropout.
    pub mask: Option<ops::DropMask>,
}

/// What one layer saved in forward for its backward.
pub struct LayerTrace {
    x: Tensor,
    /// `None` with `--recompute attention`.
    attn: Option<AttnSaved>,
    h1: Tensor,
    rstd2: Tensor,
    n2: Tensor,
    g: Tensor,
    u: Tensor,
    act: Tensor,
    lora: [Option<LoraSaved>; 7],
}

/// The attention block's saved tensors: its norm, q/k after RoPE, v, output and lse.
struct AttnSaved {
    n1: Tensor,
    rstd1: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    lse: Tensor,
}

/// What forward kept of one layer.
enum LayerSaved {
    Trace(Box<LayerTrace>),
    /// `--recompute full`: only the input and the dropout counter at the layer's start;
    /// backward runs the layer forward again.
    Input {
        x: Tensor,
        calls: u64,
    },
}

/// Activation memory plan: what forward saves and backward recomputes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Recompute {
    /// Save every layer's activations (fastest, most memory).
    #[default]
    None,
    /// Recompute each layer's attention block (norm, q/k/v, RoPE, attention).
    Attention,
    /// Save only each layer's input; recompute the whole layer (≈ one extra forward).
    Full,
}

impl Recompute {
    /// The `--recompute` name.
    pub fn name(self) -> &'static str {
        match self {
            Recompute::None => "none",
            Recompute::Attention => "attention",
            Recompute::Full => "full",
        }
    }
}

impl std::str::FromStr for Recompute {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Recompute::None),
            "attention" => Ok(Recompute::Attention),
            "full" => Ok(Recompute::Full),
            _ => Err(bad(format!(
                "--recompute: unknown plan `{s}` (auto, none, attention, full)"
            ))),
        }
    }
}

/// Everything a forward saved for `Model::backward`.
pub struct Trace {
    pack: Packing,
    rope: Rope,
    layers: Vec<LayerSaved>,
    /// The step's dropout (p, seed, step), replayed by `--recompute full`.
    dropout: Option<(f32, u64, u64)>,
    x_final: Tensor,
    rstd_final: Tensor,
    lm: LmSaved,
    rows: Vec<usize>,
    targets: Vec<u32>,
}

/// What the forward keeps for the lm_head log-prob backward.
enum LmSaved {
    /// The target rows' final hidden states and their log-sum-exp (device only; empty
    /// on the CPU): the backward recomputes the logits.
    Hidden { hidden_rows: Tensor, lse: Tensor },
    /// `∂logp_i/∂hidden_i` per target row (`Model::lm_grad_in_forward`).
    Grad(Tensor),
}

/// One projection of a group that shares its input, for `Model::proj_group`.
pub struct ProjIn<'a> {
    w: &'a LinearWeight,
    lora: Option<(&'a LoraPair, f32)>,
    mask: Option<ops::DropMask>,
}

impl<'a> ProjIn<'a> {
    pub fn new(
        w: &'a LinearWeight,
        lora: Option<(&'a LoraPair, f32)>,
        mask: Option<ops::DropMask>,
    ) -> Self {
        ProjIn { w, lora, mask }
    }
}

/// One projection of a group in backward, for `Model::proj_group_backward`.
pub struct ProjGrad<'a> {
    dy: &'a Tensor,
    w: &'a LinearWeight,
    lora: Option<(&'a LoraPair, f32)>,
    saved: Option<&'a LoraSaved>,
    grad: Option<&'a mut LoraPair>,
}

impl<'a> ProjGrad<'a> {
    pub fn new(
        dy: &'a Tensor,
        w: &'a LinearWeight,
        lora: Option<(&'a LoraPair, f32)>,
        saved: Option<&'a LoraSaved>,
        grad: Option<&'a mut LoraPair>,
    ) -> Self {
        ProjGrad {
            dy,
            w,
            lora,
            saved,
            grad,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
    }

    /// Quantizing while loading gives the weights of loading, then quantizing: every
    /// projection (bf16 and f32 checkpoints); a 4-bit checkpoint keeps its own NF4.
    #[test]
    fn load_with_nf4_equals_load_then_quantize() {
        let nf4 = |w: &LinearWeight| match w {
            LinearWeight::Nf4(q) => (**q).clone(),
            _ => panic!("not NF4"),
        };
        for (name, dq) in [("tiny-llama", true), ("tiny-mistral-bf16", false)] {
            let mut want = Model::load(&fixture(name)).unwrap();
            want.quantize_nf4(64, dq).unwrap();
            let got = Model::load_with(&fixture(name), Some((64, dq)), false).unwrap();
            for (a, b) in want.layers.iter().zip(&got.layers) {
                for (x, y) in a.projections().into_iter().zip(b.projections()) {
                    assert_eq!(nf4(x), nf4(y), "{name}");
                }
            }
            assert!(matches!(got.lm_head, LinearWeight::Dense(_)), "{name}");
        }
        let bnb = Model::load(&fixture("tiny-llama-bnb-4bit")).unwrap();
        let again =
            Model::load_with(&fixture("tiny-llama-bnb-4bit"), Some((64, true)), false).unwrap();
        assert_eq!(nf4(&bnb.layers[1].down), nf4(&again.layers[1].down));
    }
}
