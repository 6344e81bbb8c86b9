//! The training loop shared by SFT and DPO: data order, micro-batches, loss and
//! adapter gradients, `clip_grad_norm_`, AdamW, schedule, metrics, checkpoints, resume.

use super::checkpoint::{self, AdamState, State};
use super::device::DeviceTrainer;
use super::loss::{DpoCfg, DpoKind};
use super::memplan;
use super::{Method, Settings, TrainArgs};
use crate::backend::cpu::optim::{clip_grad_norm, AdamWScalars};
use crate::commands::{Common, Device};
use crate::data::examples::{
    pref_examples, sft_examples, Encoder, Limits, PrefExample, SftExample,
};
use crate::data::sources::{self, Kind, LoadOptions};
use crate::error::{bad, Error, Result};
use crate::lora::{peft, Adapter};
use crate::model::llama::{Dropout, Recompute, SeqBatch};
use crate::model::{Model, ScoreSeq, Template, Tokenizer};
use crate::ops;
use crate::tensor::Tensor;
use serde_json::json;
use std::io::Write;
use std::path::Path;

/// The examples of a run.
pub(crate) enum Examples {
    Sft(Vec<SftExample>),
    Pref(Vec<PrefExample>),
}

impl Examples {
    fn len(&self) -> usize {
        match self {
            Examples::Sft(v) => v.len(),
            Examples::Pref(v) => v.len(),
        }
    }
}

fn seq(e: &SftExample) -> ScoreSeq {
    ScoreSeq {
        ids: e.ids.clone(),
        prompt_len: e.prompt_len,
    }
}

/// Reference log-probs of one pair: (chosen, rejected), sums over completion tokens.
type RefPair = (f64, f64);

/// Loads, filters and tokenizes `specs` for this run: the training data (`--data`,
/// sampled with `--num-samples`) when `sample`, else `--eval-data`, which errors name.
fn load_examples(
    specs: &[String],
    s: &Settings,
    model: &Model,
    model_dir: &Path,
    sample: bool,
) -> Result<(Examples, String)> {
    let kind = if s.method == Method::Sft {
        Kind::Sft
    } else {
        Kind::Pref
    };
    let opts = LoadOptions {
        num_samples: if sample { s.num_samples } else { None },
        data_seed: s.data_seed,
        shuffle: sample && s.shuffle,
    };
    let flag = if sample { "--data" } else { "--eval-data" };
    let (rows, mut stats) = sources::load_as(flag, specs, kind, &opts)?;
    let tok = if model_dir.join("tokenizer.json").exists() {
        Some(Tokenizer::load(
            model_dir,
            model.cfg.bos_token_id,
            model.cfg.eos_token_ids.first().copied(),
        )?)
    } else {
        None
    };
    let enc = Encoder {
        tokenizer: tok.as_ref(),
        template: s.template.parse::<Template>()?,
        limits: Limits {
            max_length: s.max_length,
            max_prompt_length: s.max_prompt_length,
        },
        vocab_size: model.cfg.vocab_size,
    };
    let ex = match s.method {
        Method::Sft => Examples::Sft(sft_examples(&rows, &enc, &mut stats)?),
        Method::Dpo => Examples::Pref(pref_examples(&rows, &enc, &mut stats)?),
    };
    if ex.len() == 0 {
        return Err(bad(format!("{flag}: no usable examples ({stats})")));
    }
    let hashes = stats
        .sources
        .iter()
        .map(|src| {
            Ok(format!(
                "{} sha256:{}",
                src.file.display(),
                sha256_file(&src.file)?
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((ex, format!("{stats}\n{}", hashes.join("\n"))))
}

fn sha256_file(p: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut f = std::fs::File::open(p).map_err(|e| Error::read(p, e))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| Error::read(p, e))?;
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Example index of global sample `i`: epoch 0 is the loader's order (already shuffled
/// with --data-seed unless --no-shuffle); each later epoch reshuffles with its own seed.
fn sample_index(
    i: usize,
    n: usize,
    s: &Settings,
    cache: &mut Option<(usize, Vec<usize>)>,
) -> usize {
    let (epoch, pos) = (i / n, i % n);
    if epoch == 0 || !s.shuffle {
        return pos;
    }
    if cache.as_ref().map(|c| c.0) != Some(epoch) {
        let mut order: Vec<usize> = (0..n).collect();
        sources::shuffle(&mut order, s.data_seed.wrapping_add(epoch as u64));
        *cache = Some((epoch, order));
    }
    cache.as_ref().expect("filled above").1[pos]
}

/// The examples of training step `step`: its `--batch-size` samples through `sample_index`.
/// Training and the memory plan's scan both take them from here, so they see the same
/// batches.
fn step_indices(
    step: usize,
    n: usize,
    s: &Settings,
    cache: &mut Option<(usize, Vec<usize>)>,
) -> Vec<usize> {
    (0..s.batch_size)
        .map(|k| sample_index(step * s.batch_size + k, n, s, cache))
        .collect()
}

/// Everything logged for one step.
#[derive(Default)]
struct StepOut {
    loss: f64,
    tokens: usize,
    rewards_c: f64,
    rewards_r: f64,
    accuracies: f64,
    logps_c: f64,
    logps_r: f64,
}

/// A micro-batch's packing: a prompt shared by several sequences (a DPO pair's) is
/// computed once, unless dropout is on (each copy then draws its own masks, as in the
/// Python stack).
fn batch(seqs: &[ScoreSeq], dropout: bool) -> SeqBatch {
    if dropout {
        SeqBatch::new(seqs)
    } else {
        SeqBatch::sharing_prefixes(seqs)
    }
}

/// The sequences of examples `idx` in the order a micro-batch packs them.
fn micro_seqs(ex: &Examples, idx: &[usize]) -> Vec<ScoreSeq> {
    match ex {
        Examples::Sft(v) => idx.iter().map(|&i| seq(&v[i])).collect(),
        Examples::Pref(v) => idx
            .iter()
            .flat_map(|&i| [seq(&v[i].chosen), seq(&v[i].rejected)])
            .collect(),
    }
}

/// The token ids of `micro_seqs`, borrowed.
fn micro_ids<'e>(ex: &'e Examples, idx: &[usize]) -> Vec<&'e [u32]> {
    match ex {
        Examples::Sft(v) => idx.iter().map(|&i| v[i].ids.as_slice()).collect(),
        Examples::Pref(v) => idx
            .iter()
            .flat_map(|&i| [v[i].chosen.ids.as_slice(), v[i].rejected.ids.as_slice()])
            .collect(),
    }
}

/// Token rows a micro-batch of these ids computes in the policy pass (`batch`'s rule).
fn policy_saving(ids: &[&[u32]], s: &Settings) -> usize {
    if s.train_dropout() > 0.0 {
        0
    } else {
        SeqBatch::prefix_saving(ids)
    }
}

/// Token rows a training step over `idx` computes once instead of once per sequence
/// (shared prompts), as (policy pass, reference pass): the reference never has dropout.
pub(crate) fn shared_tokens(ex: &Examples, idx: &[usize], s: &Settings) -> (usize, usize) {
    let (mut policy, mut reference) = (0, 0);
    for chunk in idx.chunks(s.micro_batch()) {
        let ids = micro_ids(ex, chunk);
        policy += policy_saving(&ids, s);
        if matches!(ex, Examples::Pref(_)) {
            reference += SeqBatch::prefix_saving(&ids);
        }
    }
    (policy, reference)
}

/// The largest training micro-batch of the steps whose examples `steps` yields, as
/// (token rows the policy pass computes, tokens before prompts are shared: the rows
/// attention expands to), each the maximum over the micro-batches: what the memory
/// plan must hold.
pub(crate) fn largest_micro_batch(
    ex: &Examples,
    steps: impl IntoIterator<Item = Vec<usize>>,
    s: &Settings,
) -> (usize, usize) {
    let mut most = (0, 0);
    for idx in steps {
        for chunk in idx.chunks(s.micro_batch()) {
            let ids = micro_ids(ex, chunk);
            let tokens: usize = ids.iter().map(|x| x.len()).sum();
            most.0 = most.0.max(tokens - policy_saving(&ids, s));
            most.1 = most.1.max(tokens);
        }
    }
    most
}

struct Ctx<'a> {
    model: &'a Model,
    s: &'a Settings,
    ref_adapter: Option<&'a Adapter>,
    /// Precomputed reference log-probs, one per example (DPO with --precompute-ref).
    ref_cache: Option<&'a [RefPair]>,
}

impl Ctx<'_> {
    /// Reference log-probs of the pairs `idx` of `ex` (preference examples).
    fn reference(&self, ex: &Examples, idx: &[usize], kind: DpoKind) -> Result<Vec<RefPair>> {
        if let Some(c) = self.ref_cache {
            return Ok(idx.iter().map(|&i| c[i]).collect());
        }
        let lp = self.model.sequence_logprobs(
            &micro_seqs(ex, idx),
            self.ref_adapter,
            kind == DpoKind::Ipo,
        )?;
        let lp = ops::to_host(&lp)?;
        Ok(lp.chunks(2).map(|c| (c[0] as f64, c[1] as f64)).collect())
    }

    /// Forward + backward of one micro-batch; `norm` is the step's loss denominator
    /// (completion tokens for SFT, pairs for DPO). Returns the micro-batch's share.
    fn micro_step(
        &self,
        adapter: &Adapter,
        ex: &Examples,
        idx: &[usize],
        norm: f64,
        dropout: Option<&mut Dropout>,
        grads: Option<&mut Adapter>,
    ) -> Result<StepOut> {
        let mut out = StepOut::default();
        match ex {
            Examples::Sft(_) => {
                let b = batch(&micro_seqs(ex, idx), dropout.is_some());
                let (lp, trace) = self.model.forward(
                    Some(adapter),
                    &b.ids,
                    &b.pack,
                    &b.rows,
                    &b.targets,
                    dropout,
                    grads.is_some(),
                )?;
                let n = lp.numel();
                out.loss = -ops::to_host(&lp)?.iter().map(|&x| x as f64).sum::<f64>() / norm;
                out.tokens = b.tokens;
                if let (Some(g), Some(t)) = (grads, trace) {
                    let d = Tensor::from_vec(vec![(-1.0 / norm) as f32; n], &[n]);
                    self.model.backward(adapter, &t, &d, g)?;
                }
            }
            Examples::Pref(_) => {
                let cfg: DpoCfg = self.s.dpo().expect("dpo settings");
                let refs = self.reference(ex, idx, cfg.kind)?;
                // Chosen and rejected of every pair in one batched forward.
                let b = batch(&micro_seqs(ex, idx), dropout.is_some());
                let (lp, trace) = self.model.forward(
                    Some(adapter),
                    &b.ids,
                    &b.pack,
                    &b.rows,
                    &b.targets,
                    dropout,
                    grads.is_some(),
                )?;
                // Sequence values, loss and per-token gradient stay where the model
                // runs; only per-pair numbers come back for the metrics.
                let pol = ops::segment_sums(&lp, &b.counts, cfg.kind == DpoKind::Ipo)?;
                let refv: Vec<f32> = refs
                    .iter()
                    .flat_map(|&(c, r)| [c as f32, r as f32])
                    .collect();
                let refv = Tensor::from_vec(refv, &[2 * refs.len()]);
                let d = ops::dpo_loss(&cfg, norm, &pol, &refv, &b.counts)?;
                let pol = ops::to_host(&pol)?;
                for k in 0..refs.len() {
                    let (rwc, rwr) = (d.reward_chosen[k] as f64, d.reward_rejected[k] as f64);
                    out.loss += d.loss[k] as f64 / norm;
                    out.rewards_c += rwc / norm;
                    out.rewards_r += rwr / norm;
                    out.accuracies += if rwc > rwr { 1.0 } else { 0.0 } / norm;
                    out.logps_c += pol[2 * k] as f64 / norm;
                    out.logps_r += pol[2 * k + 1] as f64 / norm;
                }
                out.tokens = b.tokens;
                if let (Some(g), Some(t)) = (grads, trace) {
                    self.model.backward(adapter, &t, &d.dlogp, g)?;
                }
            }
        }
        Ok(out)
    }
}

/// One optimizer step over the examples `idx` (step number `step`, learning rate `lr`):
/// micro-batches of forward + backward into fresh gradients, the NaN checks, clipping
/// and AdamW. Returns the step's summed outputs and the gradient norm before clipping.
/// A non-finite loss or gradient is `Error::Diverged` naming which, and changes nothing.
fn train_step(
    ctx: &Ctx,
    weights: &mut TrainWeights,
    ex: &Examples,
    idx: &[usize],
    step: usize,
    lr: f64,
) -> Result<(StepOut, f32)> {
    let s = ctx.s;
    let norm = step_norm(ex, idx);
    let mut grads = weights.zero_grads()?;
    let p = s.train_dropout();
    let mut dropout = (p > 0.0).then(|| Dropout::new(p, s.seed, step as u64));
    let mut acc = StepOut::default();
    for chunk in idx.chunks(s.micro_batch()) {
        add_out(
            &mut acc,
            ctx.micro_step(
                weights.adapter(),
                ex,
                chunk,
                norm,
                dropout.as_mut(),
                Some(&mut grads),
            )?,
        );
    }
    if !acc.loss.is_finite() {
        return Err(Error::Diverged(format!("the loss is {}", acc.loss)));
    }
    let grad_norm = weights.grad_norm(&mut grads, s.max_grad_norm as f32)?;
    if !grad_norm.is_finite() {
        return Err(Error::Diverged(format!("the gradient norm is {grad_norm}")));
    }
    weights.apply(&grads, lr, s)?;
    Ok((acc, grad_norm))
}

fn add_out(acc: &mut StepOut, o: StepOut) {
    acc.loss += o.loss;
    acc.tokens += o.tokens;
    acc.rewards_c += o.rewards_c;
    acc.rewards_r += o.rewards_r;
    acc.accuracies += o.accuracies;
    acc.logps_c += o.logps_c;
    acc.logps_r += o.logps_r;
}

/// The step's loss denominator: completion tokens (SFT) or pairs (DPO).
fn step_norm(ex: &Examples, idx: &[usize]) -> f64 {
    match ex {
        Examples::Sft(v) => idx
            .iter()
            .map(|&i| v[i].ids.len() - v[i].prompt_len)
            .sum::<usize>() as f64,
        Examples::Pref(_) => idx.len() as f64,
    }
}

fn metrics_row(
    method: Method,
    step: usize,
    o: &StepOut,
    lr: f64,
    grad_norm: f32,
    secs: f64,
) -> serde_json::Value {
    let mut row = json!({
        "step": step, "loss": o.loss, "lr": lr, "grad_norm": grad_norm,
        "tokens": o.tokens, "tokens_per_s": o.tokens as f64 / secs.max(1e-9),
    });
    if method == Method::Dpo {
        row["rewards/chosen"] = json!(o.rewards_c);
        row["rewards/rejected"] = json!(o.rewards_r);
        row["rewards/accuracies"] = json!(o.accuracies);
        row["rewards/margins"] = json!(o.rewards_c - o.rewards_r);
        row["logps/chosen"] = json!(o.logps_c);
        row["logps/rejected"] = json!(o.logps_r);
    }
    row
}

/// Keeps the metrics rows of steps ≤ `upto` (resume: rows past the checkpoint are redone).
fn trim_metrics(path: &Path, upto: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= upto)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    crate::fsio::write_bytes_atomic(path, kept.as_bytes())
}

fn append(path: &Path, row: &serde_json::Value) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::write(path, e))?;
    writeln!(f, "{row}").map_err(|e| Error::write(path, e))
}

/// What `--out` held before this invocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OutState {
    /// Nothing: the folder is created once every input has been checked.
    Missing,
    /// An empty folder (with `--resume`: possibly holding only what killed runs leave
    /// half-written): a fresh run goes into it.
    Empty,
    /// A run to continue (`--resume` with a checkpoint or run.json).
    Run,
}

/// Checks `--out` without writing anything: a new run needs a missing or empty folder;
/// `--resume` continues a run there, or starts one in a missing or empty folder.
fn check_out(out: &Path, resume: bool, steps: usize) -> Result<OutState> {
    let run_json = out.join("run.json");
    let empty = |ignore_stale: bool| {
        out.is_dir()
            && std::fs::read_dir(out)
                .map(|d| {
                    d.flatten().all(|e| {
                        ignore_stale && checkpoint::is_stale(&e.file_name().to_string_lossy())
                    })
                })
                .unwrap_or(false)
    };
    if resume {
        if run_json.exists() {
            let v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&run_json).unwrap_or_default())
                    .unwrap_or_default();
            if v["finished"].as_bool() == Some(true)
                && v["settings"]["steps"].as_u64() == Some(steps as u64)
            {
                return Err(bad(format!(
                    "{}: the run already finished ({steps} steps); nothing to resume",
                    out.display()
                )));
            }
        }
        // Killed before the first checkpoint: the run restarts from step 0 (run.json
        // still pins its settings).
        if checkpoint::exists(out) || run_json.exists() {
            return Ok(OutState::Run);
        }
        // Killed before anything was written (or never started): a fresh start, so a
        // script may always pass --resume.
        if !out.exists() {
            return Ok(OutState::Missing);
        }
        if !empty(true) {
            return Err(bad(format!(
                "--resume: {} holds no palign run",
                out.display()
            )));
        }
        return Ok(OutState::Empty);
    }
    if !out.exists() {
        return Ok(OutState::Missing);
    }
    if !empty(false) {
        let what = if run_json.exists() || checkpoint::exists(out) {
            "holds a run"
        } else {
            "is not empty"
        };
        return Err(bad(format!(
            "--out {} {what}; use --resume to continue it or choose another folder",
            out.display()
        )));
    }
    Ok(OutState::Empty)
}

/// Makes `--out` ready for writing, once every input has been checked: the folder when
/// it is missing, without what killed runs left half-written. Nothing is removed when the
/// run fails later: run.json (and metrics, precomputed references) make a folder
/// resumable, and a diverged run's metrics are its record.
fn open_out(out: &Path, state: OutState) -> Result<()> {
    if state == OutState::Missing {
        std::fs::create_dir(out).map_err(|e| Error::write(out, e))?;
    }
    checkpoint::remove_stale(out);
    Ok(())
}

/// `--resume` continues only the same run: every setting but the evaluation cadence must match.
fn same_settings(saved: &Settings, s: &Settings, out: &Path) -> Result<()> {
    let mut saved = saved.clone();
    saved.eval_every = s.eval_every;
    saved.eval_data = s.eval_data.clone();
    if saved.method == crate::train::Method::Dpo && saved.keep_dropout.is_none() {
        // A DPO run from before --keep-dropout, which applied --dropout in training.
        saved.keep_dropout = Some(true);
    }
    if saved.dropout == 0.0 && s.dropout == 0.0 {
        // Without dropout the flag changes nothing.
        saved.keep_dropout = s.keep_dropout;
    }
    if saved.schedule() == s.schedule() {
        // A run from before constant_with_warmup: `constant` with warm-up warmed up.
        saved.scheduler = s.scheduler.clone();
    }
    if &saved == s {
        return Ok(());
    }
    let (a, b) = (
        serde_json::to_value(&saved).expect("json"),
        serde_json::to_value(s).expect("json"),
    );
    let field = a
        .as_object()
        .and_then(|o| {
            o.iter()
                .find(|(k, v)| b.get(k.as_str()) != Some(v))
                .map(|(k, _)| k.clone())
        })
        .unwrap_or_default();
    let hint = if field == "keep_dropout" && saved.keep_dropout == Some(true) {
        " (that run applied --dropout in DPO training: resume with --keep-dropout)"
    } else {
        ""
    };
    Err(bad(format!(
        "--resume: setting `{field}` differs from the run in {}{hint}",
        out.display()
    )))
}

/// Writes run.json atomically.
fn write_run_json(out: &Path, s: &Settings, data: &str, finished: bool, step: usize) -> Result<()> {
    let v = json!({
        "palign_version": env!("CARGO_PKG_VERSION"),
        "settings": s,
        "data": data.lines().collect::<Vec<_>>(),
        "finished": finished,
        "steps_done": step,
    });
    crate::fsio::write_bytes_atomic(
        &out.join("run.json"),
        &serde_json::to_vec_pretty(&v).expect("json"),
    )
}

fn ref_path(out: &Path) -> std::path::PathBuf {
    out.join("ref_logps.jsonl")
}

/// Reference log-probs of every pair, computed once (`--precompute-ref`) and stored
/// in `--out`, or read back from there on `--resume`.
fn precomputed_ref(ctx: &Ctx, ex: &Examples, out: &Path, kind: DpoKind) -> Result<Vec<RefPair>> {
    let Examples::Pref(v) = ex else {
        return Ok(vec![]);
    };
    let p = ref_path(out);
    if p.exists() {
        let rows: Vec<RefPair> = std::fs::read_to_string(&p)
            .map_err(|e| Error::read(&p, e))?
            .lines()
            .map(|l| {
                let r: serde_json::Value =
                    serde_json::from_str(l).map_err(|e| bad(format!("{}: {e}", p.display())))?;
                Ok((
                    r["chosen"].as_f64().unwrap_or(f64::NAN),
                    r["rejected"].as_f64().unwrap_or(f64::NAN),
                ))
            })
            .collect::<Result<_>>()?;
        if rows.len() == v.len() {
            return Ok(rows);
        }
        return Err(bad(format!(
            "{}: {} rows for {} pairs",
            p.display(),
            rows.len(),
            v.len()
        )));
    }
    let mut all = Vec::with_capacity(v.len());
    for chunk in (0..v.len()).collect::<Vec<_>>().chunks(16) {
        all.extend(ctx.reference(ex, chunk, kind)?);
    }
    crate::fsio::write_atomic(&p, |w| {
        for (c, r) in &all {
            writeln!(w, "{}", json!({"chosen": c, "rejected": r}))?;
        }
        Ok(())
    })?;
    Ok(all)
}

/// Mean loss (and DPO accuracy) over held-out examples, no dropout, no gradients.
fn evaluate(ctx: &Ctx, adapter: &Adapter, ex: &Examples) -> Result<StepOut> {
    // The precomputed reference rows are the training pairs'; held-out pairs get theirs
    // from the reference model.
    let ctx = &Ctx {
        ref_cache: None,
        ..*ctx
    };
    let idx: Vec<usize> = (0..ex.len()).collect();
    let norm = step_norm(ex, &idx);
    let mut acc = StepOut::default();
    for chunk in idx.chunks(ctx.s.micro_batch()) {
        add_out(
            &mut acc,
            ctx.micro_step(adapter, ex, chunk, norm, None, None)?,
        );
    }
    Ok(acc)
}

pub fn run(args: &TrainArgs, common: &Common, method: Method) -> Result<()> {
    let device = common.setup()?;
    let mut s = Settings::resolve(args, method, common.seed)?;
    let out = args.out.as_path();
    // Every input is checked, loaded and read before --out is touched, so bad input
    // leaves nothing behind (and a rerun with the input fixed starts cleanly).
    let out_state = check_out(out, args.resume, s.steps)?;
    if out_state != OutState::Run {
        s.check_new_run()?;
    }
    if args.recompute != "auto" {
        args.recompute.parse::<Recompute>()?; // a bad name fails before any loading
    }
    // QLoRA: the frozen base in bitsandbytes' NF4 (blocksize 64, double quant).
    let nf4 = (s.peft == "qlora").then_some((crate::quant::DEFAULT_BLOCKSIZE, true));
    let mut model = Model::load_with(&args.model, nf4, device == Device::Cuda)?;
    let mut adapter = match &args.init_adapter {
        Some(d) => {
            let a = peft::load(d, &model.cfg)?;
            // The initial adapter's rank/alpha/targets win over the flags.
            s.rank = a.cfg.r;
            s.alpha = a.cfg.alpha;
            s.targets = a.cfg.targets.clone();
            let mut a = a;
            a.cfg.dropout = s.dropout;
            a
        }
        None => Adapter::init(&model.cfg, s.lora(), s.seed)?,
    };
    let (ex, data_desc) = load_examples(&s.data, &s, &model, &args.model, true)?;
    let eval = if s.eval_data.is_empty() {
        None
    } else {
        Some(load_examples(&s.eval_data, &s, &model, &args.model, false)?.0)
    };
    let mut ref_adapter = match &args.ref_adapter {
        Some(d) => Some(peft::load(d, &model.cfg)?),
        None => None,
    };
    let show = common.progress();
    if !common.quiet {
        eprintln!("data: {}", data_desc.lines().next().unwrap_or(""));
    }
    let mut opt = AdamState::zeros(&adapter)?;
    let mut start = 0;
    // From here on --out is written (every input was checked above).
    open_out(out, out_state)?;
    if args.resume && checkpoint::exists(out) {
        let (a, o, st) = checkpoint::load(out, &model.cfg)?;
        same_settings(&st.settings, &s, out)?;
        let mut a = a;
        a.cfg.dropout = s.dropout;
        adapter = a;
        opt = o;
        start = st.step;
        trim_metrics(&out.join("metrics.jsonl"), start)?;
    } else if args.resume && out.join("run.json").exists() {
        let run_json = out.join("run.json");
        let v: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&run_json).map_err(|e| Error::read(&run_json, e))?,
        )
        .map_err(|e| bad(format!("{}: {e}", run_json.display())))?;
        let saved: Settings = serde_json::from_value(v["settings"].clone())
            .map_err(|e| bad(format!("{}: unreadable settings: {e}", run_json.display())))?;
        same_settings(&saved, &s, out)?;
        trim_metrics(&out.join("metrics.jsonl"), 0)?;
    } else {
        write_run_json(out, &s, &data_desc, false, 0)?;
    }
    let mut weights = if device == Device::Cuda {
        ref_adapter = ref_adapter.map(|a| a.to_device_bf16()).transpose()?;
        TrainWeights::Cuda(DeviceTrainer::upload(&adapter, &opt)?)
    } else {
        TrainWeights::Cpu { adapter, opt }
    };
    // The plan, once the weights are on the device (`auto` looks at what is left), for the
    // largest micro-batch this run will train on (packed without padding, prompts shared
    // where the pass allows; usually far below batch × --max-length).
    let available = match device {
        Device::Cuda => Some(crate::backend::cuda::Gpu::get()?.available_bytes()? as u64),
        Device::Cpu => None,
    };
    // (Forward-only passes, evaluation and --precompute-ref, run when no activations are
    // saved: no plan changes what they need.)
    let n = ex.len();
    let mb = if args.recompute == "auto" && available.is_some() {
        let mut cache = None;
        let steps = (start..s.steps).map(|step| step_indices(step, n, &s, &mut cache));
        let (rows, tokens) = largest_micro_batch(&ex, steps, &s);
        memplan::MicroBatch { rows, tokens }
    } else {
        memplan::MicroBatch::plain(0) // not used: a named plan, or the CPU
    };
    model.recompute = memplan::resolve(
        &args.recompute,
        &model.cfg,
        mb,
        s.rank * s.targets.len(),
        available,
        common.quiet,
    )?;
    let mut ctx = Ctx {
        model: &model,
        s: &s,
        ref_adapter: ref_adapter.as_ref(),
        ref_cache: None,
    };
    let ref_rows;
    if s.precompute_ref {
        ref_rows = precomputed_ref(&ctx, &ex, out, s.dpo().expect("dpo").kind)?;
        ctx.ref_cache = Some(&ref_rows);
    }
    let sched = s.schedule();
    let metrics = out.join("metrics.jsonl");
    let pb = crate::commands::progress_bar(s.steps as u64, show, method_name(method));
    pb.set_position(start as u64);
    let mut order_cache = None;
    let stop = args.stop_after.unwrap_or(usize::MAX);
    let mut step = start;
    while step < s.steps && step < stop {
        let t0 = std::time::Instant::now();
        let idx = step_indices(step, n, &s, &mut order_cache);
        let lr = sched.lr(s.lr, step, s.steps, s.warmup_steps);
        let (acc, grad_norm) =
            train_step(&ctx, &mut weights, &ex, &idx, step, lr).map_err(|e| match e {
                Error::Diverged(what) => diverged(out, step, &what),
                other => other,
            })?;
        step += 1;
        let secs = t0.elapsed().as_secs_f64();
        if step % args.log_every == 0 || step == s.steps {
            let mut row = metrics_row(method, step, &acc, lr, grad_norm, secs);
            if let Some(b) = weights.peak_bytes() {
                row["peak_mem_gib"] = json!(b as f64 / (1u64 << 30) as f64);
            }
            append(&metrics, &row)?;
        }
        if let (Some(e), true) = (&eval, s.eval_every > 0 && step % s.eval_every.max(1) == 0) {
            let r = evaluate(&ctx, weights.adapter(), e)?;
            let mut row = json!({"step": step, "eval_loss": r.loss});
            if method == Method::Dpo {
                row["eval_rewards/accuracies"] = json!(r.accuracies);
                row["eval_rewards/margins"] = json!(r.rewards_c - r.rewards_r);
            }
            append(&metrics, &row)?;
        }
        pb.set_message(format!(
            "{} loss {:.4} {:.0} tok/s",
            method_name(method),
            acc.loss,
            acc.tokens as f64 / secs.max(1e-9)
        ));
        pb.inc(1);
        let save_now =
            (args.save_every > 0 && step % args.save_every == 0) || step == s.steps || step == stop;
        if save_now {
            let state = State {
                step,
                samples_seen: step * s.batch_size,
                rng: format!("splitmix64 dropout streams, seed {} step {step}", s.seed),
                settings: s.clone(),
            };
            weights.with_host(|a, o| checkpoint::save(out, a, o, &state))?;
        }
    }
    pb.finish_and_clear();
    if step < s.steps {
        eprintln!(
            "stopped after step {step} of {}; continue with --resume",
            s.steps
        );
        return Ok(());
    }
    weights.with_host(|a, _| peft::save(a, out, &s.model))?;
    write_run_json(out, &s, &data_desc, true, step)?;
    if !common.quiet {
        eprintln!(
            "{}: {} steps done; adapter written to {}",
            method_name(method),
            step,
            out.display()
        );
        if let Some(b) = weights.peak_bytes() {
            eprintln!(
                "peak device memory: {:.2} GiB (tensors from palign's pool; cuBLAS and the CUDA context come on top)",
                b as f64 / (1u64 << 30) as f64
            );
        }
    }
    Ok(())
}

/// The adapter being trained and its optimizer, on the host (f32 reference) or on the
/// device (`DeviceTrainer`).
#[allow(clippy::large_enum_variant)] // one per run
enum TrainWeights {
    Cpu { adapter: Adapter, opt: AdamState },
    Cuda(DeviceTrainer),
}

impl TrainWeights {
    /// The adapter the model multiplies with.
    fn adapter(&self) -> &Adapter {
        match self {
            TrainWeights::Cpu { adapter, .. } => adapter,
            TrainWeights::Cuda(d) => &d.compute,
        }
    }

    fn zero_grads(&self) -> Result<Adapter> {
        match self {
            TrainWeights::Cpu { adapter, .. } => adapter.zeros_like(),
            TrainWeights::Cuda(d) => d.zero_grads(),
        }
    }

    /// The total gradient norm before clipping (`clip_grad_norm_`'s return value); the
    /// CPU clips `grads` in place here, the device folds the clip into AdamW.
    fn grad_norm(&mut self, grads: &mut Adapter, max_norm: f32) -> Result<f32> {
        match self {
            TrainWeights::Cpu { .. } => {
                let mut slices: Vec<&mut [f32]> = grads
                    .pairs_mut()
                    .flat_map(|(_, _, p)| [p.a.cpu_mut(), p.b.cpu_mut()])
                    .collect();
                Ok(clip_grad_norm(&mut slices, max_norm))
            }
            TrainWeights::Cuda(d) => d.grad_norm(grads, max_norm),
        }
    }

    /// One AdamW step at learning rate `lr` with the (clipped) gradients.
    fn apply(&mut self, grads: &Adapter, lr: f64, s: &Settings) -> Result<()> {
        let step = match self {
            TrainWeights::Cpu { opt, .. } => opt.step + 1,
            TrainWeights::Cuda(d) => d.step + 1,
        };
        let sc = AdamWScalars::new(
            step,
            lr,
            s.adam_beta1,
            s.adam_beta2,
            s.adam_eps,
            s.weight_decay,
        )?;
        match self {
            TrainWeights::Cpu { adapter, opt } => {
                opt.step = step;
                let params = adapter
                    .pairs_mut()
                    .flat_map(|(_, _, p)| [p.a.cpu_mut(), p.b.cpu_mut()]);
                let ms = opt
                    .m
                    .pairs_mut()
                    .flat_map(|(_, _, p)| [p.a.cpu_mut(), p.b.cpu_mut()]);
                let vs = opt
                    .v
                    .pairs_mut()
                    .flat_map(|(_, _, p)| [p.a.cpu_mut(), p.b.cpu_mut()]);
                for (((p, g), m), v) in params
                    .zip(grads.pairs().flat_map(|(_, _, p)| [p.a.cpu(), p.b.cpu()]))
                    .zip(ms)
                    .zip(vs)
                {
                    for i in 0..p.len() {
                        sc.update(&mut p[i], g[i], &mut m[i], &mut v[i]);
                    }
                }
                Ok(())
            }
            TrainWeights::Cuda(d) => d.apply(grads, &sc),
        }
    }

    /// Peak bytes of device memory in use so far (None on the CPU).
    fn peak_bytes(&self) -> Option<usize> {
        match self {
            TrainWeights::Cpu { .. } => None,
            TrainWeights::Cuda(_) => crate::backend::cuda::Gpu::get()
                .ok()
                .map(|g| g.pool_stats().peak_in_use_bytes),
        }
    }

    /// Runs `f` with the f32 adapter and optimizer state on the host (a download from
    /// the device).
    fn with_host(&self, f: impl FnOnce(&Adapter, &AdamState) -> Result<()>) -> Result<()> {
        match self {
            TrainWeights::Cpu { adapter, opt } => f(adapter, opt),
            TrainWeights::Cuda(d) => {
                let (a, o) = d.download()?;
                f(&a, &o)
            }
        }
    }
}

/// A non-finite loss or gradient stops the run before the optimizer step, so the last
/// checkpoint on disk is the last good state.
fn diverged(out: &Path, step: usize, what: &str) -> Error {
    let keep = if checkpoint::exists(out) {
        format!(
            "the last good checkpoint is kept in {}",
            checkpoint::dir(out).display()
        )
    } else {
        "no checkpoint was written yet".to_string()
    };
    Error::Diverged(format!(
        "step {}: {what}; training stopped ({keep}; try a lower --lr)",
        step + 1
    ))
}

fn method_name(m: Method) -> &'static str {
    match m {
        Method::Sft => "sft",
        Method::Dpo => "dpo",
    }
}

/// What `palign bench train` measured: wall seconds of each timed step, the step's
/// tokens, the peak device memory, the kernel-family breakdown of one profiled step (ms)
/// and the loss of every step (warm-up included).
pub(crate) struct BenchOut {
    pub step_secs: Vec<f64>,
    pub tokens: usize,
    pub peak_bytes: Option<usize>,
    pub families: std::collections::BTreeMap<&'static str, f64>,
    pub profiled_secs: f64,
    pub losses: Vec<f64>,
}

/// Runs `warmup` + `steps` real training steps (the same `train_step` as `palign sft` /
/// `dpo`) over the whole of `ex` each time, then one profiled step on the device.
pub(crate) fn bench(
    model: &Model,
    s: &Settings,
    ex: &Examples,
    device: Device,
    warmup: usize,
    steps: usize,
) -> Result<BenchOut> {
    let adapter = Adapter::init(&model.cfg, s.lora(), s.seed)?;
    let opt = AdamState::zeros(&adapter)?;
    let gpu = match device {
        Device::Cuda => Some(crate::backend::cuda::Gpu::get()?),
        Device::Cpu => None,
    };
    let mut weights = match device {
        Device::Cuda => TrainWeights::Cuda(DeviceTrainer::upload(&adapter, &opt)?),
        Device::Cpu => TrainWeights::Cpu { adapter, opt },
    };
    let ctx = Ctx {
        model,
        s,
        ref_adapter: None,
        ref_cache: None,
    };
    let idx: Vec<usize> = (0..ex.len()).collect();
    let sync = || gpu.as_ref().map_or(Ok(()), |g| g.synchronize());
    let mut out = BenchOut {
        step_secs: Vec::new(),
        tokens: 0,
        peak_bytes: None,
        families: Default::default(),
        profiled_secs: 0.0,
        losses: Vec::new(),
    };
    for step in 0..warmup + steps + gpu.is_some() as usize {
        let profiled = step == warmup + steps;
        if profiled {
            crate::backend::cuda::profile::start();
        }
        sync()?;
        let t0 = std::time::Instant::now();
        let (o, _) = train_step(&ctx, &mut weights, ex, &idx, step, s.lr)?;
        sync()?;
        let secs = t0.elapsed().as_secs_f64();
        out.losses.push(o.loss);
        out.tokens = o.tokens;
        if profiled {
            out.profiled_secs = secs;
            if let Some(g) = &gpu {
                // No event timing on this driver: the bench still reports the rest.
                out.families = crate::backend::cuda::profile::finish(g).unwrap_or_else(|e| {
                    eprintln!("note: no kernel-family breakdown: {e}");
                    Default::default()
                });
            }
        } else if step >= warmup {
            out.step_secs.push(secs);
        }
        if step + 1 == warmup {
            // Peak memory of the timed steps (as bench_hf.py resets torch's after warm-up).
            if let Some(g) = &gpu {
                g.reset_peak();
            }
        }
    }
    out.peak_bytes = weights.peak_bytes();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::examples::{PrefExample, SftExample};

    fn settings(extra: &[&str]) -> Settings {
        #[derive(clap::Parser)]
        struct P {
            #[command(flatten)]
            a: TrainArgs,
        }
        use clap::Parser;
        let mut argv = vec!["t", "--model", "m", "--data", "d", "--out", "o"];
        argv.extend(["--batch-size", "2", "--steps", "2"]);
        argv.extend(extra);
        Settings::resolve(&P::try_parse_from(argv).unwrap().a, Method::Dpo, 0).unwrap()
    }

    /// Pairs with prompts of 10, 30 and 5 tokens: (15, 17), (34, 36) and (8, 8) tokens.
    fn pairs() -> Examples {
        let pair = |k: u32, prompt: u32, c: u32, r: u32| {
            let p: Vec<u32> = (0..prompt).map(|i| 100 * k + i).collect();
            let with = |base: u32, n: u32| SftExample {
                ids: p
                    .iter()
                    .copied()
                    .chain((0..n).map(|i| base + 10 * k + i))
                    .collect(),
                prompt_len: prompt as usize,
            };
            PrefExample {
                chosen: with(1000, c),
                rejected: with(2000, r),
            }
        };
        Examples::Pref(vec![pair(0, 10, 5, 7), pair(1, 30, 4, 6), pair(2, 5, 3, 3)])
    }

    /// `--recompute auto` sizes for the run's largest micro-batch: every sequence's
    /// tokens (the rows attention expands to), and the rows the policy pass computes,
    /// each prompt once unless dropout is kept.
    #[test]
    fn the_memory_plan_sees_the_largest_micro_batch_of_the_run() {
        let ex = pairs();
        let steps = || [vec![0, 1], vec![2, 0]];
        // Step 1: 102 tokens, 40 of them in two prompts; step 2: 48, with 15.
        assert_eq!(largest_micro_batch(&ex, steps(), &settings(&[])), (62, 102));
        let kept = settings(&["--keep-dropout"]);
        assert_eq!(largest_micro_batch(&ex, steps(), &kept), (102, 102));
        // Micro-batches of one pair: pair 1 alone is the largest (70 tokens, 40 rows).
        let accum = settings(&["--grad-accum", "2"]);
        assert_eq!(largest_micro_batch(&ex, steps(), &accum), (40, 70));
        assert_eq!(shared_tokens(&ex, &[0, 1], &settings(&[])), (40, 40));
        assert_eq!(shared_tokens(&ex, &[0, 1], &kept), (0, 40));
    }
}
