//! LoRA adapters with PEFT's semantics (peft `tuners/lora/layer.py`, facts only):
//! `y = x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ`, `s = alpha/r` (`alpha/√r` with rslora), A `[r, in]`
//! initialised kaiming-uniform(a=√5) = U(±1/√in), B `[out, r]` zero; dropout only on the
//! adapter's input. PEFT-format load/save lives in `peft.rs`.

pub mod fold;
pub mod peft;

use crate::error::{bad, Result};
use crate::model::llama::Layer;
use crate::model::llama::PROJ_NAMES;
use crate::model::ModelConfig;
use crate::tensor::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The hyper-parameters of an adapter.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f32,
    pub dropout: f32,
    /// Subset of `PROJ_NAMES`, in that order.
    pub targets: Vec<String>,
    pub use_rslora: bool,
}

impl LoraConfig {
    pub fn scale(&self) -> f32 {
        if self.use_rslora {
            self.alpha / (self.r as f32).sqrt()
        } else {
            self.alpha / self.r as f32
        }
    }

    /// Parses `--targets q_proj,v_proj` (also `all`), checking every name.
    pub fn parse_targets(s: &str) -> Result<Vec<String>> {
        if s.trim() == "all" {
            return Ok(PROJ_NAMES.iter().map(|p| p.to_string()).collect());
        }
        let wanted: Vec<&str> = s
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .collect();
        if wanted.is_empty() {
            return Err(bad("--targets: no target modules given"));
        }
        for t in &wanted {
            if !PROJ_NAMES.contains(t) {
                return Err(bad(format!(
                    "--targets: unknown module `{t}` (choose from {})",
                    PROJ_NAMES.join(",")
                )));
            }
        }
        Ok(PROJ_NAMES
            .iter()
            .filter(|p| wanted.contains(p))
            .map(|p| p.to_string())
            .collect())
    }

    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(bad("--rank must be at least 1"));
        }
        // Finite too: an infinite scale makes every output NaN (and run.json would
        // store `null`).
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(bad(format!(
                "--alpha must be a positive number (got {})",
                self.alpha
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(bad(format!(
                "--dropout must be in [0, 1) (got {})",
                self.dropout
            )));
        }
        Ok(())
    }
}

/// One adapted projection: A `[r, in]`, B `[out, r]`.
#[derive(Debug)]
pub struct LoraPair {
    pub a: Tensor,
    pub b: Tensor,
}

/// Adapter weights for every layer; `layers[l][p]` is the pair on `PROJ_NAMES[p]`.
/// On the CPU the pairs are f32; on the device the compute copies are bf16 and
/// gradients (from [`Adapter::zeros_like`]) f32.
#[derive(Debug)]
pub struct Adapter {
    pub cfg: LoraConfig,
    pub layers: Vec<[Option<LoraPair>; 7]>,
}

pub fn proj_index(name: &str) -> Option<usize> {
    PROJ_NAMES.iter().position(|p| *p == name)
}

impl Adapter {
    /// PEFT's initialisation from `seed`: A ~ U(±1/√in), B = 0.
    pub fn init(model: &ModelConfig, cfg: LoraConfig, seed: u64) -> Result<Adapter> {
        cfg.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut layers = Vec::with_capacity(model.num_layers);
        for _ in 0..model.num_layers {
            let mut slots: [Option<LoraPair>; 7] = Default::default();
            for (p, name) in PROJ_NAMES.iter().enumerate() {
                if !cfg.targets.iter().any(|t| t == name) {
                    continue;
                }
                let [out, inp] = Layer::proj_shape(model, name);
                let bound = 1.0 / (inp as f32).sqrt();
                let a: Vec<f32> = (0..cfg.r * inp)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                slots[p] = Some(LoraPair {
                    a: Tensor::from_vec(a, &[cfg.r, inp]),
                    b: Tensor::zeros(&[out, cfg.r]),
                });
            }
            layers.push(slots);
        }
        Ok(Adapter { cfg, layers })
    }

    /// Every (layer, projection, pair), in a fixed order (layers, then PROJ_NAMES).
    pub fn pairs(&self) -> impl Iterator<Item = (usize, usize, &LoraPair)> {
        self.layers.iter().enumerate().flat_map(|(l, s)| {
            s.iter()
                .enumerate()
                .filter_map(move |(p, x)| x.as_ref().map(|x| (l, p, x)))
        })
    }

    pub fn pairs_mut(&mut self) -> impl Iterator<Item = (usize, usize, &mut LoraPair)> {
        self.layers.iter_mut().enumerate().flat_map(|(l, s)| {
            s.iter_mut()
                .enumerate()
                .filter_map(move |(p, x)| x.as_mut().map(|x| (l, p, x)))
        })
    }

    pub fn num_params(&self) -> usize {
        self.pairs()
            .map(|(_, _, p)| p.a.numel() + p.b.numel())
            .sum()
    }

    /// Checks the adapter fits a model's shapes and layer count.
    pub fn check_fits(&self, model: &ModelConfig) -> Result<()> {
        if self.layers.len() != model.num_layers {
            return Err(bad(format!(
                "adapter has {} layers, the model has {}",
                self.layers.len(),
                model.num_layers
            )));
        }
        for (l, p, pair) in self.pairs() {
            let [out, inp] = Layer::proj_shape(model, PROJ_NAMES[p]);
            if pair.a.shape != [self.cfg.r, inp] || pair.b.shape != [out, self.cfg.r] {
                return Err(bad(format!(
                    "adapter layer {l} {}: lora_A {:?} / lora_B {:?} do not fit the model ([{}, {inp}] / [{out}, {}])",
                    PROJ_NAMES[p], pair.a.shape, pair.b.shape, self.cfg.r, self.cfg.r
                )));
            }
        }
        Ok(())
    }

    /// A copy with every pair mapped by `f` (e.g. moved to the device).
    pub fn try_map(&self, mut f: impl FnMut(&Tensor) -> Result<Tensor>) -> Result<Adapter> {
        let mut layers = Vec::with_capacity(self.layers.len());
        for slots in &self.layers {
            let mut out: [Option<LoraPair>; 7] = Default::default();
            for (o, s) in out.iter_mut().zip(slots) {
                if let Some(p) = s {
                    *o = Some(LoraPair {
                        a: f(&p.a)?,
                        b: f(&p.b)?,
                    });
                }
            }
            layers.push(out);
        }
        Ok(Adapter {
            cfg: self.cfg.clone(),
            layers,
        })
    }

    /// Zeroed f32 gradients with the same layout, where the adapter lives.
    pub fn zeros_like(&self) -> Result<Adapter> {
        self.try_map(|t| match t.is_cuda() {
            false => Ok(Tensor::zeros(&t.shape)),
            true => Ok(Tensor::cuda_f32(
                crate::backend::cuda::Gpu::get()?.zeros(t.numel())?,
                &t.shape,
            )),
        })
    }

    /// The bf16 device copy the model multiplies with on the GPU.
    pub fn to_device_bf16(&self) -> Result<Adapter> {
        self.try_map(Tensor::to_cuda_bf16)
    }

    /// An f32 copy on the device (master weights, optimizer moments).
    pub fn to_device_f32(&self) -> Result<Adapter> {
        self.try_map(Tensor::to_cuda_f32)
    }

    /// The values on the host as f32 (a download for device adapters).
    pub fn to_cpu(&self) -> Result<Adapter> {
        self.try_map(Tensor::to_cpu)
    }

    /// A copy (CPU adapters; device ones copy on the device).
    pub fn try_clone(&self) -> Result<Adapter> {
        self.try_map(Tensor::try_clone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_in_canonical_order_and_reject_unknown() {
        assert_eq!(
            LoraConfig::parse_targets("v_proj, q_proj").unwrap(),
            vec!["q_proj", "v_proj"]
        );
        assert_eq!(LoraConfig::parse_targets("all").unwrap().len(), 7);
        let e = LoraConfig::parse_targets("q_proj,lm_head")
            .unwrap_err()
            .to_string();
        assert!(e.contains("lm_head"), "{e}");
    }

    #[test]
    fn init_is_peft_kaiming_uniform_and_zero_b() {
        let cfg = crate::model::tiny::config_json(crate::model::Arch::Mistral);
        let mc = ModelConfig::from_json(cfg).unwrap();
        let lc = LoraConfig {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: vec!["k_proj".into(), "down_proj".into()],
            use_rslora: false,
        };
        let a = Adapter::init(&mc, lc.clone(), 3).unwrap();
        a.check_fits(&mc).unwrap();
        assert_eq!(a.pairs().count(), 2 * mc.num_layers);
        for (_, p, pair) in a.pairs() {
            let inp = pair.a.shape[1];
            let bound = 1.0 / (inp as f32).sqrt();
            assert!(pair.a.cpu().iter().all(|v| v.abs() <= bound));
            // spread over the interval, not a constant
            let mx = pair
                .a
                .cpu()
                .iter()
                .cloned()
                .fold(0.0f32, |m, v| m.max(v.abs()));
            assert!(mx > 0.9 * bound, "{}", PROJ_NAMES[p]);
            assert!(pair.b.cpu().iter().all(|&v| v == 0.0));
        }
        let b = Adapter::init(&mc, lc, 3).unwrap();
        assert_eq!(
            a.layers[1][1].as_ref().unwrap().a.cpu(),
            b.layers[1][1].as_ref().unwrap().a.cpu()
        );
        assert_eq!(lc_scale(), 2.0);
    }

    fn lc_scale() -> f32 {
        LoraConfig {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: vec![],
            use_rslora: false,
        }
        .scale()
    }
}
