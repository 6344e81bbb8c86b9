//! `palign merge`: mergekit-style model merging (slerp, linear, ties, dare_ties) of
//! LLaMA/Mistral folders, streamed tensor by tensor from memory-mapped inputs, so a 7B merge
//! holds about one tensor per input model. Semantics follow mergekit 0.1.5 (facts only):
//! - the `models:` form is one slice over all layers, with `base_model` added as an input
//!   when it is not listed; the `slices:` form stacks the given layer ranges;
//! - a layer's gradient position is `offset/(n−1)` within its slice (1 for a one-layer
//!   slice); embeddings, the final norm and `lm_head` use position 0;
//! - `dtype` casts every input on load (`io/tasks.py` `LoadTensor`). The *merge dtype* of a
//!   tensor is `dtype`, else the promotion of its inputs' dtypes (`merge_methods/dtype.py`
//!   `promoted_dtype`: equal dtypes stay, bf16 with f16 or f32 gives f32); the method runs on
//!   inputs cast to it and its result is in it (`merge_methods/base.py`
//!   `GroupMergeMethod._execute`). slerp and linear compute in f32 and cast back to it; ties
//!   and dare_ties compute in it, op by op (see `methods`). The written tensor is then cast to
//!   `out_dtype` (`SaveTensor`) when given. palign writes `out_dtype`, else `dtype`, else the
//!   base's dtype;
//! - `DIR+ADAPTER` folds the adapter (peft `merge_and_unload`) and rounds the result to the
//!   base's dtype, as mergekit's LoRA cache saves it, before anything else.

pub mod config;
pub mod methods;
pub mod params;

use crate::error::{bad, Result};
use crate::lora::{fold, peft, Adapter};
use crate::model::llama::{Layer, PROJ_NAMES};
use crate::model::weights::{self, FloatDtype, Planned, Weights};
use crate::model::ModelConfig;
use config::{MergeConfig, Method, ModelRef};
use methods::Rescale;
use params::{lookup, Params, Scalar};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use safetensors::Dtype;
use std::path::Path;

/// mergekit's LLaMA/Mistral layout (`_data/architectures/llama.json`, identical for
/// mistral): these tensors, in this order, are what a merge writes.
const PRE_WEIGHTS: [&str; 1] = ["model.embed_tokens.weight"];
const LAYER_WEIGHTS: [&str; 9] = [
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.up_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.down_proj.weight",
];
const NORM: &str = "model.norm.weight";
/// Optional: absent from tied-embedding checkpoints.
const LM_HEAD: &str = "lm_head.weight";

fn layer_name(layer: usize, suffix: &str) -> String {
    format!("model.layers.{layer}.{suffix}")
}

/// Rounds f32 values through a storage dtype (as a cast to it and back would).
fn round_to(v: &mut [f32], dtype: FloatDtype) {
    if dtype != FloatDtype::F32 {
        v.iter_mut().for_each(|x| *x = methods::round(*x, dtype));
    }
}

/// The dtype torch promotes a group of input dtypes to (`torch.promote_types`).
fn promote(dtypes: impl IntoIterator<Item = FloatDtype>) -> FloatDtype {
    dtypes
        .into_iter()
        .reduce(|a, b| if a == b { a } else { FloatDtype::F32 })
        .unwrap_or(FloatDtype::F32)
}

/// One input model: memory-mapped weights, with its adapter (if any) folded on read.
pub struct Input {
    pub reference: ModelRef,
    pub cfg: ModelConfig,
    weights: Weights,
    adapter: Option<Adapter>,
    /// The dtype a folded weight is stored in (mergekit's LoRA cache keeps the base's).
    fold_dtype: FloatDtype,
}

impl Input {
    pub fn open(r: &ModelRef) -> Result<Input> {
        if !r.model.is_dir() {
            return Err(bad(format!(
                "model `{}`: {} is not a folder (palign merges local model folders)",
                r.text,
                r.model.display()
            )));
        }
        let cfg = ModelConfig::load(&r.model)?;
        let weights = Weights::open_dir(&r.model)?;
        let adapter = match &r.adapter {
            Some(dir) => {
                let a = peft::load(dir, &cfg)
                    .map_err(|e| bad(format!("model `{}`: adapter: {e}", r.text)))?;
                a.check_fits(&cfg)
                    .map_err(|e| bad(format!("model `{}`: {e}", r.text)))?;
                Some(a)
            }
            None => None,
        };
        let fold_dtype = fold::output_dtype(None, &cfg)?;
        Ok(Input {
            reference: r.clone(),
            cfg,
            weights,
            adapter,
            fold_dtype,
        })
    }

    pub fn has(&self, name: &str) -> bool {
        self.weights.contains(name)
    }

    /// (layer, projection index) of a decoder projection weight name.
    fn projection(&self, name: &str) -> Option<(usize, usize)> {
        let rest = name.strip_prefix("model.layers.")?;
        let l: usize = rest.split('.').next()?.parse().ok()?;
        PROJ_NAMES
            .iter()
            .position(|p| Layer::weight_name(l, p) == name)
            .map(|p| (l, p))
    }

    /// The logical shape of a float or 4-bit tensor, without reading it.
    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        let e = self.weights.get(name).ok_or_else(|| {
            bad(format!(
                "model `{}` has no tensor `{name}`",
                self.reference.text
            ))
        })?;
        if self.weights.contains(&format!("{name}.absmax")) {
            return match self.projection(name) {
                Some((_, p)) => Ok(Layer::proj_shape(&self.cfg, PROJ_NAMES[p]).to_vec()),
                None => Err(bad(format!(
                    "model `{}`: 4-bit tensor `{name}` is not a decoder projection",
                    self.reference.text
                ))),
            };
        }
        if !matches!(e.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
            return Err(bad(format!(
                "model `{}`: tensor `{name}` has dtype {:?}; only float and bitsandbytes 4-bit weights can be merged",
                self.reference.text, e.dtype
            )));
        }
        // A projection must match config.json (an adapter is folded in by its dimensions,
        // and the merged model is loaded by them).
        if let Some((_, p)) = self.projection(name) {
            let want = Layer::proj_shape(&self.cfg, PROJ_NAMES[p]);
            if e.shape != want {
                return Err(bad(format!(
                    "model `{}`: tensor `{name}` has shape {:?}, config.json implies {want:?}",
                    self.reference.text, e.shape
                )));
            }
        }
        Ok(e.shape.clone())
    }

    /// The dtype of a tensor as [`Input::read`] gives it before any `dtype` cast (what
    /// mergekit would load): the base's for a projection with an adapter folded in (mergekit's
    /// LoRA cache), else as stored; 4-bit weights, which mergekit cannot read, count as f32.
    fn dtype(&self, name: &str) -> FloatDtype {
        let adapted = self.adapter.as_ref().is_some_and(|a| {
            self.projection(name)
                .is_some_and(|(l, p)| a.layers[l][p].is_some())
        });
        if adapted {
            return self.fold_dtype;
        }
        match self.weights.get(name).map(|e| e.dtype) {
            Some(Dtype::BF16) => FloatDtype::BF16,
            Some(Dtype::F16) => FloatDtype::F16,
            _ => FloatDtype::F32,
        }
    }

    /// A tensor as f32: adapter folded in and rounded to the base's dtype, then cast to
    /// `cast` (the config's `dtype`) when given.
    pub fn read(&self, name: &str, cast: Option<FloatDtype>) -> Result<Vec<f32>> {
        let (mut v, shape) = fold::weight_f32(&self.weights, name)
            .map_err(|e| bad(format!("model `{}`: {e}", self.reference.text)))?;
        if let Some(a) = &self.adapter {
            if let Some((l, p)) = self.projection(name) {
                if let Some(pair) = &a.layers[l][p] {
                    fold::add_lora(
                        &mut v,
                        shape[0],
                        shape[1],
                        pair.a.cpu(),
                        pair.b.cpu(),
                        a.cfg.r,
                        a.cfg.scale(),
                    );
                    round_to(&mut v, self.fold_dtype);
                }
            }
        }
        if let Some(d) = cast {
            round_to(&mut v, d);
        }
        Ok(v)
    }
}

/// What to compute for one output tensor, with every parameter resolved.
#[derive(Clone, Debug)]
enum Op {
    Slerp {
        t: f32,
        base: usize,
        other: usize,
    },
    Linear {
        weights: Vec<f32>,
        normalize: bool,
    },
    Ties {
        base: usize,
        /// (source position, weight, density)
        others: Vec<(usize, f32, f64)>,
        dare: bool,
        normalize: bool,
        rescale: Rescale,
        lambda: f32,
    },
}

/// One output tensor: its inputs (input index, tensor name in that input) and the op.
#[derive(Clone, Debug)]
struct Job {
    name: String,
    inputs: Vec<(usize, String)>,
    shape: Vec<usize>,
    /// The merge dtype: what mergekit computes this tensor in.
    dtype: FloatDtype,
    op: Op,
}

/// An output slice with its sources resolved to inputs.
struct Slice<'a> {
    /// (input index, first layer, parameters)
    sources: Vec<(usize, usize, &'a Params)>,
    /// Position of the base among `sources`.
    base: Option<usize>,
    params: &'a Params,
    len: usize,
}

/// Parameters for one tensor of one slice.
struct Resolver<'a> {
    method: Method,
    slice: &'a Slice<'a>,
    global: &'a Params,
    inputs: &'a [Input],
    t: f64,
}

impl Resolver<'_> {
    fn shared(&self, name: &str, tensor: &str) -> Option<Scalar> {
        lookup(&[self.slice.params, self.global], name, tensor, self.t)
    }

    fn per_input(&self, pos: usize, name: &str, tensor: &str) -> Option<Scalar> {
        let own = self.slice.sources[pos].2;
        lookup(&[own, self.slice.params, self.global], name, tensor, self.t)
    }

    fn what(&self, pos: usize, name: &str, tensor: &str) -> String {
        let model = &self.inputs[self.slice.sources[pos].0].reference.text;
        format!("parameter `{name}` of model `{model}` (tensor {tensor})")
    }

    fn op(&self, out_name: &str, in_names: &[String]) -> Result<Op> {
        let shared_f = |k: &str, default: f64| -> Result<f64> {
            match self.shared(k, out_name) {
                Some(s) => s.as_f64(&format!("parameter `{k}` (tensor {out_name})")),
                None => Ok(default),
            }
        };
        let shared_b = |k: &str, default: bool| -> Result<bool> {
            match self.shared(k, out_name) {
                Some(s) => s.as_bool(&format!("parameter `{k}` (tensor {out_name})")),
                None => Ok(default),
            }
        };
        let input_f = |pos: usize, k: &str, default: Option<f64>| -> Result<f64> {
            let what = self.what(pos, k, &in_names[pos]);
            match self.per_input(pos, k, &in_names[pos]) {
                Some(s) => s.as_f64(&what),
                None => default.ok_or_else(|| bad(format!("{what} is missing"))),
            }
        };
        match self.method {
            Method::Slerp => {
                let base = self.slice.base.expect("checked in plan");
                let t = match self.shared("t", out_name) {
                    Some(s) => s.as_f64(&format!("parameter `t` (tensor {out_name})"))?,
                    None => {
                        return Err(bad(format!(
                            "slerp needs parameter `t` (missing for tensor {out_name})"
                        )))
                    }
                };
                Ok(Op::Slerp {
                    t: t as f32,
                    base,
                    other: 1 - base,
                })
            }
            Method::Linear => {
                let weights: Vec<f32> = (0..self.slice.sources.len())
                    .map(|p| input_f(p, "weight", None).map(|w| w as f32))
                    .collect::<Result<_>>()?;
                let normalize = shared_b("normalize", true)?;
                if normalize && weights.iter().sum::<f32>() == 0.0 {
                    return Err(bad(format!(
                        "linear: the weights of tensor {out_name} sum to 0, which normalize divides by"
                    )));
                }
                Ok(Op::Linear { weights, normalize })
            }
            Method::Ties | Method::DareTies => {
                let dare = self.method == Method::DareTies;
                let base = self.slice.base.expect("checked in plan");
                let mut others = Vec::new();
                for p in (0..self.slice.sources.len()).filter(|&p| p != base) {
                    let w = input_f(p, "weight", None)? as f32;
                    let d = input_f(p, "density", Some(1.0))?;
                    if !(0.0..=1.0).contains(&d) {
                        return Err(bad(format!(
                            "{}: expected a fraction in [0, 1], got {d}",
                            self.what(p, "density", &in_names[p])
                        )));
                    }
                    others.push((p, w, d));
                }
                // Validated like mergekit does, though it only changes the mask's dtype there.
                shared_b("int8_mask", false)?;
                let rescale = match self.shared("rescale", out_name) {
                    None => {
                        if dare {
                            Rescale::L1
                        } else {
                            Rescale::None
                        }
                    }
                    Some(Scalar::Str(s)) if s == "l1" => Rescale::L1,
                    Some(Scalar::Str(s)) if s == "density" => Rescale::InvDensity,
                    Some(s) => {
                        if s.as_bool(&format!(
                            "parameter `rescale` (tensor {out_name}; true, false, l1 or density)"
                        ))? {
                            Rescale::L1
                        } else {
                            Rescale::None
                        }
                    }
                };
                Ok(Op::Ties {
                    base,
                    others,
                    dare,
                    normalize: shared_b("normalize", !dare)?,
                    rescale,
                    lambda: shared_f("lambda", 1.0)? as f32,
                })
            }
        }
    }
}

/// A planned merge: inputs opened, every output tensor resolved and shape-checked.
pub struct Plan {
    pub inputs: Vec<Input>,
    /// Index of the input whose config, tokenizer and dtype the output takes.
    pub donor: usize,
    pub out_dtype: FloatDtype,
    pub num_layers: usize,
    cast: Option<FloatDtype>,
    jobs: Vec<Job>,
    seed: u64,
}

impl Plan {
    pub fn new(cfg: &MergeConfig, seed: u64) -> Result<Plan> {
        let inputs: Vec<Input> = cfg.models.iter().map(Input::open).collect::<Result<_>>()?;
        let method = cfg.method;
        // Normalise both forms into slices of (input, first layer) sources.
        let mut slices = Vec::new();
        for (i, s) in cfg.slices.iter().enumerate() {
            let at = if cfg.models_form {
                "models".to_string()
            } else {
                format!("slices[{i}]")
            };
            let mut sources: Vec<(usize, usize, &Params)> = Vec::new();
            let mut ranges = Vec::new();
            for src in &s.sources {
                if sources.iter().any(|x| x.0 == src.model) {
                    return Err(bad(format!(
                        "{at}: model `{}` is listed twice",
                        cfg.models[src.model].text
                    )));
                }
                let n = inputs[src.model].cfg.num_layers;
                let (a, b) = src.layer_range.unwrap_or((0, n));
                if b > n {
                    return Err(bad(format!(
                        "{at}: layer_range [{a}, {b}] of `{}` goes past its {n} layers",
                        cfg.models[src.model].text
                    )));
                }
                sources.push((src.model, a, &src.params));
                ranges.push(b - a);
            }
            let base_model = s.base.or(cfg.base);
            // The models form adds an unlisted base as an input (mergekit's normalize_config).
            static EMPTY: Params = Vec::new();
            if let (true, Some(b)) = (cfg.models_form, base_model) {
                if !sources.iter().any(|x| x.0 == b) {
                    sources.push((b, 0, &EMPTY));
                    ranges.push(inputs[b].cfg.num_layers);
                }
            }
            if ranges.iter().any(|&r| r != ranges[0]) {
                return Err(bad(format!(
                    "{at}: every source must contribute the same number of layers, got {ranges:?}"
                )));
            }
            let base = if method.needs_base() {
                let b = base_model
                    .ok_or_else(|| bad(format!("{} needs `base_model`", method.name())))?;
                Some(sources.iter().position(|x| x.0 == b).ok_or_else(|| {
                    bad(format!(
                        "{at}: base model `{}` is not among the sources; {} takes it as an input",
                        cfg.models[b].text,
                        method.name()
                    ))
                })?)
            } else {
                None
            };
            if method == Method::Slerp && sources.len() != 2 {
                return Err(bad(format!(
                    "{at}: slerp merges exactly two models (the base and one other), got {}",
                    sources.len()
                )));
            }
            slices.push(Slice {
                sources,
                base,
                params: &s.params,
                len: ranges[0],
            });
        }
        let donor = cfg.base.unwrap_or(slices[0].sources[0].0);
        let arch = inputs[donor].cfg.arch;
        for inp in &inputs {
            if inp.cfg.arch != arch {
                return Err(bad(format!(
                    "model `{}` is {} but `{}` is {}: merge models of one architecture",
                    inp.reference.text,
                    inp.cfg.arch.class_name(),
                    inputs[donor].reference.text,
                    arch.class_name()
                )));
            }
        }

        let mut jobs = Vec::new();
        let mut add =
            |slice: &Slice, out_name: String, in_names: Vec<String>, t: f64| -> Result<()> {
                let r = Resolver {
                    method,
                    slice,
                    global: &cfg.params,
                    inputs: &inputs,
                    t,
                };
                let mut shape: Option<(Vec<usize>, usize)> = None;
                for (pos, (inp, _, _)) in slice.sources.iter().enumerate() {
                    let s = inputs[*inp].shape(&in_names[pos])?;
                    match &shape {
                        None => shape = Some((s, *inp)),
                        Some((s0, i0)) if *s0 != s => {
                            return Err(bad(format!(
                                "tensor `{}` has shape {s:?} in `{}` but {s0:?} in `{}`",
                                in_names[pos],
                                inputs[*inp].reference.text,
                                inputs[*i0].reference.text
                            )))
                        }
                        _ => {}
                    }
                }
                let op = r.op(&out_name, &in_names)?;
                let dtype = cfg.dtype.unwrap_or_else(|| {
                    promote(
                        slice
                            .sources
                            .iter()
                            .zip(&in_names)
                            .map(|(s, n)| inputs[s.0].dtype(n)),
                    )
                });
                jobs.push(Job {
                    name: out_name,
                    inputs: slice
                        .sources
                        .iter()
                        .zip(in_names)
                        .map(|(s, n)| (s.0, n))
                        .collect(),
                    shape: shape.expect("a slice has sources").0,
                    dtype,
                    op,
                });
                Ok(())
            };
        let first = &slices[0];
        let last = slices.last().expect("at least one slice");
        for name in PRE_WEIGHTS {
            add(
                first,
                name.into(),
                vec![name.into(); first.sources.len()],
                0.0,
            )?;
        }
        let mut out_layer = 0;
        for s in &slices {
            for off in 0..s.len {
                let t = if s.len > 1 {
                    off as f64 / (s.len - 1) as f64
                } else {
                    1.0
                };
                for suffix in LAYER_WEIGHTS {
                    let in_names = s
                        .sources
                        .iter()
                        .map(|(_, a, _)| layer_name(a + off, suffix))
                        .collect();
                    add(s, layer_name(out_layer, suffix), in_names, t)?;
                }
                out_layer += 1;
            }
        }
        add(
            last,
            NORM.into(),
            vec![NORM.into(); last.sources.len()],
            0.0,
        )?;
        let with_head: Vec<bool> = last
            .sources
            .iter()
            .map(|s| inputs[s.0].has(LM_HEAD))
            .collect();
        if with_head.iter().all(|&h| h) {
            add(
                last,
                LM_HEAD.into(),
                vec![LM_HEAD.into(); last.sources.len()],
                0.0,
            )?;
        } else if with_head.iter().any(|&h| h) {
            let (a, b) = (
                with_head.iter().position(|&h| h).expect("some"),
                with_head.iter().position(|&h| !h).expect("some"),
            );
            return Err(bad(format!(
                "`{}` has an lm_head.weight but `{}` does not (untied vs tied embeddings)",
                inputs[last.sources[a].0].reference.text, inputs[last.sources[b].0].reference.text
            )));
        }
        for inp in &inputs {
            check_layout(inp)?;
        }
        let out_dtype = cfg
            .out_dtype
            .or(cfg.dtype)
            .map(Ok)
            .unwrap_or_else(|| fold::output_dtype(None, &inputs[donor].cfg))?;
        Ok(Plan {
            inputs,
            donor,
            out_dtype,
            num_layers: out_layer,
            cast: cfg.dtype,
            jobs,
            seed,
        })
    }

    /// Computes one output tensor, in its merge dtype (rounded to it, held as f32).
    fn compute(&self, job: &Job) -> Result<Vec<f32>> {
        let dtype = job.dtype;
        // Inputs are exact in the merge dtype: it is `dtype` (cast on read) or their promotion.
        let read = |pos: usize| {
            let (i, name) = &job.inputs[pos];
            self.inputs[*i].read(name, self.cast)
        };
        Ok(match &job.op {
            Op::Slerp { t, base, other } => {
                let mut v = methods::slerp(*t, &read(*base)?, &read(*other)?).0;
                round_to(&mut v, dtype);
                v
            }
            Op::Linear { weights, normalize } => {
                let xs: Vec<Vec<f32>> = (0..job.inputs.len()).map(read).collect::<Result<_>>()?;
                let refs: Vec<&[f32]> = xs.iter().map(|x| x.as_slice()).collect();
                let mut v = methods::linear(&refs, weights, *normalize);
                round_to(&mut v, dtype);
                v
            }
            Op::Ties {
                base,
                others,
                dare,
                normalize,
                rescale,
                lambda,
            } => {
                let b = read(*base)?;
                let mut deltas = Vec::with_capacity(others.len());
                let mut weights = Vec::with_capacity(others.len());
                for &(pos, w, density) in others {
                    let x = read(pos)?;
                    let delta: Vec<f32> = x
                        .iter()
                        .zip(&b)
                        .map(|(a, c)| methods::round(a - c, dtype))
                        .collect();
                    drop(x);
                    let mut d = if *dare {
                        let mut rng = self.rng(&job.name, &self.inputs[job.inputs[pos].0]);
                        methods::bernoulli(&delta, density, *rescale, &mut rng, dtype)
                    } else {
                        methods::magnitude(&delta, density, *rescale, dtype)
                    };
                    // mergekit's weights are a tensor of the merge dtype.
                    let w = methods::round(w, dtype);
                    d.iter_mut()
                        .for_each(|v| *v = methods::round(*v * w, dtype));
                    deltas.push(d);
                    weights.push(w);
                }
                methods::ties_combine(&b, &deltas, &weights, *normalize, *lambda, dtype)
            }
        })
    }

    /// DARE's random stream for one (tensor, model): seeded from `--seed` and both names,
    /// so the drop pattern does not depend on the order tensors are written in.
    fn rng(&self, tensor: &str, input: &Input) -> ChaCha8Rng {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(self.seed.to_le_bytes());
        h.update(tensor.as_bytes());
        h.update([0u8]);
        h.update(input.reference.text.as_bytes());
        ChaCha8Rng::from_seed(h.finalize().into())
    }

    /// Writes the merged weights, config.json and the donor's tokenizer files into `out`.
    pub fn write(&self, out: &Path, config_text: &str, progress: bool) -> Result<()> {
        let bytes = match self.out_dtype {
            FloatDtype::F32 => 4,
            FloatDtype::BF16 | FloatDtype::F16 => 2,
        };
        let planned: Vec<Planned> = self
            .jobs
            .iter()
            .map(|j| Planned {
                name: j.name.clone(),
                dtype: self.out_dtype.st_name(),
                shape: j.shape.clone(),
                nbytes: j.shape.iter().product::<usize>() * bytes,
            })
            .collect();
        let pb = crate::commands::progress_bar(self.jobs.len() as u64, progress, "merging");
        weights::write_sharded(out, planned, weights::MAX_SHARD_BYTES, |p| {
            let job = self
                .jobs
                .iter()
                .find(|j| j.name == p.name)
                .expect("planned from jobs");
            let v = self.compute(job)?;
            pb.inc(1);
            Ok(self.out_dtype.encode(&v))
        })?;
        pb.finish_and_clear();
        let donor = &self.inputs[self.donor];
        let mut config = fold::dense_config(&donor.cfg, self.out_dtype);
        if let Some(o) = config.as_object_mut() {
            o.insert("num_hidden_layers".into(), self.num_layers.into());
        }
        let text = serde_json::to_vec_pretty(&config).expect("json");
        crate::fsio::write_bytes_atomic(&out.join("config.json"), &text)?;
        crate::fsio::write_bytes_atomic(&out.join("mergekit_config.yml"), config_text.as_bytes())?;
        fold::copy_side_files(&donor.reference.model, out)
    }
}

/// Every tensor of an input must be one the layout merges (or 4-bit side data, or RoPE's
/// recomputable `inv_freq`): anything else would be silently dropped from the output.
fn check_layout(inp: &Input) -> Result<()> {
    let n = inp.cfg.num_layers;
    for name in inp.weights.names() {
        let known = PRE_WEIGHTS.contains(&name.as_str())
            || name == NORM
            || name == LM_HEAD
            || name.ends_with("rotary_emb.inv_freq")
            || name.contains(".weight.")
            || name
                .strip_prefix("model.layers.")
                .and_then(|r| r.split_once('.'))
                .is_some_and(|(l, suffix)| {
                    l.parse::<usize>().is_ok_and(|l| l < n) && LAYER_WEIGHTS.contains(&suffix)
                });
        if !known {
            return Err(bad(format!(
                "model `{}`: tensor `{name}` is not part of the LLaMA/Mistral layout palign merges",
                inp.reference.text
            )));
        }
    }
    Ok(())
}

/// Reads `config` (mergekit YAML) and writes the merged model into the existing folder `out`.
pub fn merge(config: &Path, out: &Path, seed: u64, progress: bool) -> Result<Plan> {
    let text = std::fs::read_to_string(config).map_err(|e| crate::error::Error::read(config, e))?;
    let cfg = MergeConfig::parse(&text).map_err(|e| bad(format!("{}: {e}", config.display())))?;
    let plan = Plan::new(&cfg, seed)?;
    plan.write(out, &text, progress)?;
    Ok(plan)
}
