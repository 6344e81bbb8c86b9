//! `palign sft` and `palign dpo`: LoRA/QLoRA training on the CPU reference backend with
//! semantics pinned to peft + torch + TRL (CLI.md "Training options" and "Semantics").

pub mod checkpoint;
pub mod device;
pub mod loss;
pub mod memplan;
pub mod runner;
pub mod schedule;

use crate::error::{bad, Result};
use crate::lora::LoraConfig;
use loss::{DpoCfg, DpoKind};
use schedule::Schedule;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Sft,
    Dpo,
}

/// Flags shared by `sft` and `dpo`; unset ones take the paper's Table 6 default for the method.
// Numeric flags take values written with a space that start with `-` (`--lr -1`,
// `--weight-decay -inf`; `allow_negative_numbers` / `allow_hyphen_values`), so their own
// range checks in `Settings::resolve` name them instead of clap's "unexpected argument".
#[derive(clap::Args, Debug, Clone)]
pub struct TrainArgs {
    /// Hugging Face model folder (f32/bf16/f16 or a bitsandbytes 4-bit checkpoint).
    #[arg(long)]
    pub model: PathBuf,
    /// Dataset specs: jsonl:PATH, hh-rlhf:PATH, pku-saferlhf:PATH:helpful|harmless (repeatable).
    #[arg(long, required = true)]
    pub data: Vec<String>,
    /// Output folder (adapter, metrics.jsonl, run.json, checkpoint/).
    #[arg(long)]
    pub out: PathBuf,
    /// lora or qlora (the base quantized to NF4 at load).
    #[arg(long)]
    pub peft: Option<String>,
    /// nf4: quantize the base at load time (the same as --peft qlora).
    #[arg(long)]
    pub quant: Option<String>,
    #[arg(long, allow_negative_numbers = true)]
    pub rank: Option<usize>,
    #[arg(long, allow_hyphen_values = true)]
    pub alpha: Option<f32>,
    #[arg(long, allow_hyphen_values = true)]
    pub dropout: Option<f32>,
    /// Comma-separated target modules, or `all`.
    #[arg(long)]
    pub targets: Option<String>,
    #[arg(long, allow_hyphen_values = true)]
    pub lr: Option<f64>,
    /// constant, cosine or linear.
    #[arg(long)]
    pub scheduler: Option<String>,
    #[arg(long, allow_negative_numbers = true)]
    pub warmup_steps: Option<usize>,
    /// Sequences (SFT) or pairs (DPO) per optimizer step.
    #[arg(long, allow_negative_numbers = true)]
    pub batch_size: Option<usize>,
    #[arg(long, allow_negative_numbers = true)]
    pub grad_accum: Option<usize>,
    #[arg(long, allow_negative_numbers = true)]
    pub steps: Option<usize>,
    #[arg(long, allow_hyphen_values = true)]
    pub max_grad_norm: Option<f64>,
    #[arg(long, allow_hyphen_values = true)]
    pub weight_decay: Option<f64>,
    #[arg(long, allow_hyphen_values = true)]
    pub adam_beta1: Option<f64>,
    #[arg(long, allow_hyphen_values = true)]
    pub adam_beta2: Option<f64>,
    #[arg(long, allow_hyphen_values = true)]
    pub adam_eps: Option<f64>,
    #[arg(long, allow_negative_numbers = true)]
    pub max_length: Option<usize>,
    #[arg(long, allow_negative_numbers = true)]
    pub max_prompt_length: Option<usize>,
    /// Chat template for text rows: none, vicuna, mistral.
    #[arg(long, default_value = "none")]
    pub template: String,
    /// Seed of the data order (mixtures, --num-samples, epochs).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub data_seed: u64,
    /// Rows in file order (specs in the order given).
    #[arg(long)]
    pub no_shuffle: bool,
    /// Keep this many rows after shuffling.
    #[arg(long, allow_negative_numbers = true)]
    pub num_samples: Option<usize>,
    /// Start from this PEFT adapter (its rank/alpha/targets win).
    #[arg(long)]
    pub init_adapter: Option<PathBuf>,
    /// Write checkpoint/ every N steps (0: only at the end).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub save_every: usize,
    /// Continue the run in --out from its checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Log a metrics row every N steps.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    pub log_every: usize,
    /// Activation memory plan: `none` saves every layer's activations, `attention`
    /// recomputes each attention block in backward, `full` saves only layer inputs and
    /// recomputes each layer (about one extra forward); `auto` takes the first of these
    /// whose estimated peak fits the device (`none` on the CPU). Results do not change.
    #[arg(long, default_value = "auto")]
    pub recompute: String,
    /// Held-out data evaluated every --eval-every steps.
    #[arg(long)]
    pub eval_data: Vec<String>,
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub eval_every: usize,
    /// Stop after this many steps as if interrupted (the checkpoint stays; for tests
    /// and for splitting long runs).
    #[arg(long, hide = true, allow_negative_numbers = true)]
    pub stop_after: Option<usize>,
    // DPO only.
    /// DPO β.
    #[arg(long, allow_hyphen_values = true)]
    pub beta: Option<f64>,
    #[arg(long, allow_hyphen_values = true)]
    pub label_smoothing: Option<f64>,
    /// sigmoid (DPO) or ipo.
    #[arg(long)]
    pub loss: Option<String>,
    /// Reference = base + this adapter (default: the base with adapters off).
    #[arg(long)]
    pub ref_adapter: Option<PathBuf>,
    /// Compute reference log-probs once before training and store them in --out.
    #[arg(long)]
    pub precompute_ref: bool,
    /// Apply --dropout while training DPO. By default DPO trains without dropout, as
    /// TRL's DPOTrainer does (`disable_dropout`, default true); adapter_config.json keeps
    /// the --dropout value either way.
    #[arg(long)]
    pub keep_dropout: bool,
}

/// Every resolved setting of a run; serialized into run.json and the checkpoint, and
/// compared on `--resume`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub method: Method,
    pub model: String,
    pub data: Vec<String>,
    pub peft: String,
    pub rank: usize,
    pub alpha: f32,
    pub dropout: f32,
    pub targets: Vec<String>,
    pub lr: f64,
    pub scheduler: String,
    pub warmup_steps: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub steps: usize,
    pub max_grad_norm: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    pub max_length: usize,
    pub max_prompt_length: usize,
    pub template: String,
    pub seed: u64,
    pub data_seed: u64,
    pub shuffle: bool,
    pub num_samples: Option<usize>,
    pub init_adapter: Option<String>,
    pub beta: Option<f64>,
    pub label_smoothing: Option<f64>,
    pub loss: Option<String>,
    pub ref_adapter: Option<String>,
    pub precompute_ref: bool,
    /// DPO: whether `dropout` is applied in training (`--keep-dropout`); `None` for SFT,
    /// which always applies it (and for DPO runs from before the flag, which did).
    #[serde(default)]
    pub keep_dropout: Option<bool>,
    pub eval_data: Vec<String>,
    pub eval_every: usize,
}

/// The paper's Table 6 defaults (CLI.md).
struct Defaults {
    rank: usize,
    alpha: f32,
    dropout: f32,
    targets: &'static str,
    lr: f64,
    scheduler: &'static str,
    max_grad_norm: f64,
    weight_decay: f64,
}

fn defaults(m: Method) -> Defaults {
    match m {
        Method::Sft => Defaults {
            rank: 64,
            alpha: 16.0,
            dropout: 0.1,
            targets: "q_proj,v_proj",
            lr: 2e-4,
            scheduler: "constant",
            max_grad_norm: 0.3,
            weight_decay: 0.001,
        },
        Method::Dpo => Defaults {
            rank: 16,
            alpha: 32.0,
            dropout: 0.05,
            targets: "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
            lr: 5e-5,
            scheduler: "cosine",
            max_grad_norm: 1.0,
            weight_decay: 0.0,
        },
    }
}

fn positive(v: usize, flag: &str) -> Result<usize> {
    if v == 0 {
        Err(bad(format!("{flag} must be at least 1")))
    } else {
        Ok(v)
    }
}

/// A range a numeric flag must fall in: the test and how the error words it.
type Range = (fn(f64) -> bool, &'static str);
const POSITIVE: Range = (|v| v > 0.0, "a positive number");
const NON_NEGATIVE: Range = (|v| v >= 0.0, "a non-negative number");
/// [0, 1): Adam's betas.
const UNIT: Range = (|v| (0.0..1.0).contains(&v), "a number in [0, 1)");

/// `v` when it is finite and in `range`; otherwise a one-line error naming `flag`.
fn number(v: f64, flag: &str, (ok, what): Range) -> Result<f64> {
    if v.is_finite() && ok(v) {
        Ok(v)
    } else {
        Err(bad(format!("{flag} must be {what} (got {v})")))
    }
}

fn path_str(p: &std::path::Path) -> String {
    p.to_string_lossy().into_owned()
}

impl Settings {
    pub fn resolve(a: &TrainArgs, method: Method, seed: u64) -> Result<Settings> {
        let d = defaults(method);
        let peft = match a.quant.as_deref() {
            None => a.peft.clone().unwrap_or_else(|| "qlora".into()),
            Some("nf4") => "qlora".into(),
            Some(q) => return Err(bad(format!("--quant: unknown quantization `{q}` (nf4)"))),
        };
        if peft != "lora" && peft != "qlora" {
            return Err(bad(format!(
                "--peft: unknown method `{peft}` (lora, qlora)"
            )));
        }
        let targets = LoraConfig::parse_targets(a.targets.as_deref().unwrap_or(d.targets))?;
        let scheduler: Schedule = a.scheduler.as_deref().unwrap_or(d.scheduler).parse()?;
        let batch_size = positive(a.batch_size.unwrap_or(16), "--batch-size")?;
        let grad_accum = positive(a.grad_accum.unwrap_or(1), "--grad-accum")?;
        if batch_size % grad_accum != 0 {
            return Err(bad(format!(
                "--batch-size {batch_size} must be a multiple of --grad-accum {grad_accum} (micro-batches of equal size)"
            )));
        }
        // Every number must be finite: NaN or ±inf trains nothing useful, and run.json
        // (JSON has neither) would store `null`, which `--resume` cannot read back.
        let lr = number(a.lr.unwrap_or(d.lr), "--lr", NON_NEGATIVE)?;
        let max_grad_norm = number(
            a.max_grad_norm.unwrap_or(d.max_grad_norm),
            "--max-grad-norm",
            POSITIVE,
        )?;
        let weight_decay = number(
            a.weight_decay.unwrap_or(d.weight_decay),
            "--weight-decay",
            NON_NEGATIVE,
        )?;
        let b1 = number(a.adam_beta1.unwrap_or(0.9), "--adam-beta1", UNIT)?;
        let b2 = number(a.adam_beta2.unwrap_or(0.999), "--adam-beta2", UNIT)?;
        let eps = number(a.adam_eps.unwrap_or(1e-8), "--adam-eps", POSITIVE)?;
        if a.log_every == 0 {
            return Err(bad("--log-every must be at least 1"));
        }
        if a.eval_every > 0 && a.eval_data.is_empty() {
            return Err(bad("--eval-every needs --eval-data"));
        }
        let (beta, label_smoothing, loss) = match method {
            Method::Sft => {
                if a.beta.is_some()
                    || a.label_smoothing.is_some()
                    || a.loss.is_some()
                    || a.ref_adapter.is_some()
                    || a.precompute_ref
                    || a.keep_dropout
                {
                    return Err(bad("--beta, --label-smoothing, --loss, --ref-adapter, --precompute-ref and --keep-dropout are for `palign dpo`"));
                }
                (None, None, None)
            }
            Method::Dpo => {
                let beta = number(a.beta.unwrap_or(0.1), "--beta", POSITIVE)?;
                let ls = number(
                    a.label_smoothing.unwrap_or(0.0),
                    "--label-smoothing",
                    (|v| (0.0..0.5).contains(&v), "a number in [0, 0.5)"),
                )?;
                let loss = a.loss.clone().unwrap_or_else(|| "sigmoid".into());
                loss.parse::<DpoKind>()?;
                (Some(beta), Some(ls), Some(loss))
            }
        };
        let s = Settings {
            method,
            model: path_str(&a.model),
            data: a.data.clone(),
            peft,
            rank: a.rank.unwrap_or(d.rank),
            alpha: a.alpha.unwrap_or(d.alpha),
            dropout: a.dropout.unwrap_or(d.dropout),
            targets,
            lr,
            scheduler: scheduler.name().into(),
            warmup_steps: a.warmup_steps.unwrap_or(0),
            batch_size,
            grad_accum,
            steps: positive(a.steps.unwrap_or(700), "--steps")?,
            max_grad_norm,
            weight_decay,
            adam_beta1: b1,
            adam_beta2: b2,
            adam_eps: eps,
            max_length: a.max_length.unwrap_or(512),
            max_prompt_length: a.max_prompt_length.unwrap_or(256),
            template: a.template.parse::<crate::model::Template>()?.name().into(),
            seed,
            data_seed: a.data_seed,
            shuffle: !a.no_shuffle,
            num_samples: a.num_samples,
            init_adapter: a.init_adapter.as_deref().map(path_str),
            beta,
            label_smoothing,
            loss,
            ref_adapter: a.ref_adapter.as_deref().map(path_str),
            precompute_ref: a.precompute_ref,
            keep_dropout: (method == Method::Dpo).then_some(a.keep_dropout),
            eval_data: a.eval_data.clone(),
            eval_every: a.eval_every,
        };
        if a.num_samples == Some(0) {
            return Err(bad("--num-samples must be at least 1"));
        }
        s.lora().validate()?;
        crate::data::examples::Limits {
            max_length: s.max_length,
            max_prompt_length: s.max_prompt_length,
        }
        .check()?;
        Ok(s)
    }

    pub fn lora(&self) -> LoraConfig {
        LoraConfig {
            r: self.rank,
            alpha: self.alpha,
            dropout: self.dropout,
            targets: self.targets.clone(),
            use_rslora: false,
        }
    }

    /// Examples per micro-batch (`--batch-size` ÷ `--grad-accum`, a whole number by
    /// `resolve`).
    pub fn micro_batch(&self) -> usize {
        self.batch_size / self.grad_accum
    }

    /// The adapter dropout applied in training: `dropout`, except for DPO without
    /// `--keep-dropout`. TRL's DPOTrainer sets p = 0 on every `nn.Dropout` of the policy
    /// (peft's lora_dropout included) unless `disable_dropout=False` (trl 1.16,
    /// `DPOConfig.disable_dropout` and `trainer/utils.py::disable_dropout_in_model`).
    pub fn train_dropout(&self) -> f32 {
        match (self.method, self.keep_dropout) {
            (Method::Dpo, Some(false)) => 0.0,
            _ => self.dropout,
        }
    }

    /// The schedule the learning rate follows. `constant` with warm-up steps exists only
    /// in runs from before `constant_with_warmup` (new runs refuse the pair:
    /// [`Settings::check_new_run`]), and those warmed up: they keep doing so on --resume.
    pub fn schedule(&self) -> Schedule {
        match self.scheduler.parse().expect("validated in resolve") {
            Schedule::Constant if self.warmup_steps > 0 => Schedule::ConstantWithWarmup,
            s => s,
        }
    }

    /// Checks for a run that starts now (not one resumed): transformers' `constant` has no
    /// warm-up, so warm-up steps with it are refused rather than dropped silently.
    pub fn check_new_run(&self) -> Result<()> {
        if self.scheduler == Schedule::Constant.name() && self.warmup_steps > 0 {
            return Err(bad(
                "--warmup-steps: transformers' `constant` schedule has no warm-up; use --scheduler constant_with_warmup",
            ));
        }
        Ok(())
    }

    pub fn dpo(&self) -> Option<DpoCfg> {
        Some(DpoCfg {
            beta: self.beta?,
            label_smoothing: self.label_smoothing?,
            kind: self.loss.as_deref()?.parse().ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(method: Method, extra: &[&str]) -> Result<Settings> {
        #[derive(clap::Parser)]
        struct P {
            #[command(flatten)]
            a: TrainArgs,
        }
        use clap::Parser;
        let mut argv = vec!["t", "--model", "m", "--data", "d", "--out", "o"];
        argv.extend(extra);
        let p = P::try_parse_from(argv).map_err(|e| bad(e.to_string()))?;
        Settings::resolve(&p.a, method, 0)
    }

    /// Every numeric training flag refuses NaN, ±inf and out-of-range values with an
    /// error naming the flag; negative numbers reach the flag's own check (not clap's
    /// "unexpected argument").
    #[test]
    fn constant_with_warmup_is_refused_for_new_runs_only() {
        let s = resolve(
            Method::Sft,
            &["--scheduler", "constant", "--warmup-steps", "3"],
        )
        .unwrap();
        assert!(s
            .check_new_run()
            .unwrap_err()
            .to_string()
            .contains("constant_with_warmup"));
        // A run saved by a version where `constant` warmed up keeps warming up on --resume,
        // and matches the same run asked for as constant_with_warmup.
        assert_eq!(s.schedule(), Schedule::ConstantWithWarmup);
        let w = resolve(
            Method::Sft,
            &["--scheduler", "constant_with_warmup", "--warmup-steps", "3"],
        )
        .unwrap();
        assert_eq!(w.schedule(), s.schedule());
        w.check_new_run().unwrap();
        let c = resolve(Method::Sft, &["--scheduler", "constant"]).unwrap();
        assert_eq!(c.schedule(), Schedule::Constant);
        c.check_new_run().unwrap();
    }

    #[test]
    fn numeric_flags_refuse_non_finite_and_out_of_range_values() {
        let flags: &[(Method, &str, &[&str])] = &[
            (Method::Sft, "--lr", &["NaN", "inf", "-inf", "-1", "1e400"]),
            (Method::Sft, "--alpha", &["NaN", "inf", "-1", "0", "1e39"]),
            (Method::Dpo, "--alpha", &["inf"]),
            (Method::Sft, "--dropout", &["NaN", "inf", "-0.1", "1"]),
            (Method::Sft, "--weight-decay", &["NaN", "inf", "-inf", "-1"]),
            (Method::Sft, "--max-grad-norm", &["NaN", "inf", "0", "-1"]),
            (Method::Sft, "--adam-beta1", &["NaN", "inf", "-0.5", "1"]),
            (Method::Sft, "--adam-beta2", &["NaN", "-inf", "1", "2"]),
            (Method::Sft, "--adam-eps", &["NaN", "inf", "0", "-1e-8"]),
            (Method::Dpo, "--beta", &["NaN", "inf", "0", "-1"]),
            (
                Method::Dpo,
                "--label-smoothing",
                &["NaN", "inf", "-0.1", "0.5"],
            ),
        ];
        for (method, flag, values) in flags {
            for v in *values {
                let e = resolve(*method, &[flag, v]).expect_err(&format!("{flag} {v}"));
                let msg = e.to_string();
                assert!(
                    e.is_bad_input() && msg.starts_with(flag) && !msg.contains('\n'),
                    "{flag} {v}: {msg}"
                );
            }
        }
        // In range, they pass (and are kept).
        let s = resolve(
            Method::Dpo,
            &[
                "--lr",
                "0",
                "--weight-decay",
                "0",
                "--adam-beta1",
                "0",
                "--alpha",
                "8",
                "--dropout",
                "0",
                "--label-smoothing",
                "0.25",
                "--max-grad-norm",
                "0.5",
            ],
        )
        .unwrap();
        assert_eq!((s.lr, s.weight_decay, s.adam_beta1), (0.0, 0.0, 0.0));
        assert_eq!((s.alpha, s.label_smoothing), (8.0, Some(0.25)));
    }

    #[test]
    fn length_limits_are_checked_before_any_loading() {
        for (flag, v) in [("--max-length", "1"), ("--max-prompt-length", "0")] {
            let msg = resolve(Method::Sft, &[flag, v]).unwrap_err().to_string();
            assert!(msg.starts_with(flag), "{msg}");
        }
        let msg = resolve(Method::Sft, &["--steps", "-1"])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("--steps"), "{msg}");
    }
}
