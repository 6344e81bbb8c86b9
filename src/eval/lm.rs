//! A language model as the evaluations use it: load (model, adapter, `--quant nf4`,
//! tokenizer), score continuations the lm-evaluation-harness way, and generate text.

use crate::error::{bad, Result};
use crate::lora::Adapter;
use crate::model::generate::{self, cut_at_stop, GenConfig, Stopper};
use crate::model::llama::PackedSeqs;
use crate::model::{Model, Tokenizer};
use crate::ops;
use std::path::{Path, PathBuf};

pub struct Lm {
    pub dir: PathBuf,
    pub model: Model,
    pub adapter: Option<Adapter>,
    pub tok: Tokenizer,
    pub eos: Vec<u32>,
}

/// One multiple-choice item: shared context ids and each choice's continuation ids.
#[derive(Clone, Debug)]
pub struct ChoiceItem {
    pub context: Vec<u32>,
    pub choices: Vec<Vec<u32>>,
}

/// A sequence to run and the (position, target) pairs read from it: the target's
/// log-prob given the tokens up to and including that position.
type ReadSeq = (Vec<u32>, Vec<(usize, u32)>);

/// A generated continuation: decoded text (special tokens skipped, cut before the first
/// stop string), how many tokens were generated and why it ended.
#[derive(Clone, Debug)]
pub struct GenText {
    pub text: String,
    pub n_tokens: usize,
    pub finish: &'static str,
}

impl Lm {
    /// Loads a model (and adapter) for evaluation, moved to the GPU with `Device::Cuda`.
    pub fn load(
        dir: &Path,
        adapter: Option<&Path>,
        quant: Option<&str>,
        device: crate::commands::Device,
    ) -> Result<Lm> {
        let (model, adapter) = crate::commands::load_model_adapter(dir, adapter, quant, device)?;
        let tok = Tokenizer::load(
            dir,
            model.cfg.bos_token_id,
            model.cfg.eos_token_ids.first().copied(),
        )?;
        if tok.vocab_size() > model.cfg.vocab_size {
            return Err(bad(format!(
                "{}: tokenizer has {} tokens but vocab_size is {}",
                dir.display(),
                tok.vocab_size(),
                model.cfg.vocab_size
            )));
        }
        let eos = generate::eos_ids(dir, &model, Some(&tok))?;
        Ok(Lm {
            dir: dir.to_path_buf(),
            model,
            adapter,
            tok,
            eos,
        })
    }

    /// Ids of a prompt text with the tokenizer's BOS rule.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.tok.encode(text, true)
    }

    /// lm-evaluation-harness's `_encode_pair`: trailing whitespace of the context
    /// (`context.rstrip()`) moves to the continuation; context ids = tok(context); continuation ids = tok(context +
    /// continuation) after the first len(context ids) ids. Both with the BOS rule, no EOS.
    pub fn encode_continuation(&self, context: &str, cont: &str) -> Result<(Vec<u32>, Vec<u32>)> {
        let trimmed = context.trim_end();
        let spaces = &context[trimmed.len()..];
        let cont = format!("{spaces}{cont}");
        let whole = self.encode(&format!("{trimmed}{cont}"))?;
        let ctx = self.encode(trimmed)?;
        let cont_ids = whole.get(ctx.len()..).unwrap_or(&[]).to_vec();
        Ok((ctx, cont_ids))
    }

    /// An item with one context and several continuations (lm-eval's rule for each; the
    /// context's ids are the same for every choice).
    pub fn choice_item(&self, context: &str, choices: &[&str]) -> Result<ChoiceItem> {
        let mut item = ChoiceItem {
            context: Vec::new(),
            choices: Vec::with_capacity(choices.len()),
        };
        for c in choices {
            let (ctx, cont) = self.encode_continuation(context, c)?;
            if cont.is_empty() {
                return Err(bad(format!(
                    "the continuation {c:?} encodes to no tokens after its context"
                )));
            }
            item.context = ctx;
            item.choices.push(cont);
        }
        if item.context.is_empty() {
            return Err(bad(
                "a context encodes to no tokens (the tokenizer adds no BOS): nothing to condition on",
            ));
        }
        Ok(item)
    }

    /// Per-token log-probabilities of every choice of every item, in one packed forward.
    /// When every choice of an item is one token, the item is one sequence (its context)
    /// read at the last position for each choice; otherwise each choice is its own
    /// sequence context + continuation, as lm-eval feeds it. Consecutive sequences that
    /// begin with the same tokens (the few-shot header of a subject's questions, an
    /// item's context before each choice) compute them once (`PackedSeqs`).
    pub fn choice_logprobs(&self, items: &[ChoiceItem]) -> Result<Vec<Vec<Vec<f32>>>> {
        let mut seqs: Vec<ReadSeq> = Vec::new();
        for it in items {
            self.model.check_ids(&it.context)?;
            for c in &it.choices {
                self.model.check_ids(c)?;
            }
            let n = it.context.len();
            if it.choices.iter().all(|c| c.len() == 1) {
                let reads = it.choices.iter().map(|c| (n - 1, c[0])).collect();
                seqs.push((it.context.clone(), reads));
            } else {
                for c in &it.choices {
                    let ids = [it.context.as_slice(), c].concat();
                    let reads = c.iter().enumerate().map(|(j, &t)| (n - 1 + j, t)).collect();
                    seqs.push((ids, reads));
                }
            }
        }
        if seqs.is_empty() {
            return Ok(vec![]);
        }
        let ids: Vec<&[u32]> = seqs.iter().map(|(ids, _)| ids.as_slice()).collect();
        let packed = PackedSeqs::new(&ids, true);
        let (mut rows, mut targets) = (vec![], vec![]);
        for (i, (_, reads)) in seqs.iter().enumerate() {
            for &(pos, t) in reads {
                rows.push(packed.row(i, pos));
                targets.push(t);
            }
        }
        let (lp, _) = self.model.forward(
            self.adapter.as_ref(),
            &packed.ids,
            &packed.pack,
            &rows,
            &targets,
            None,
            false,
        )?;
        let lp = ops::to_host(&lp)?;
        let mut at = 0;
        Ok(items
            .iter()
            .map(|it| {
                it.choices
                    .iter()
                    .map(|c| {
                        at += c.len();
                        lp[at - c.len()..at].to_vec()
                    })
                    .collect()
            })
            .collect())
    }

    /// Generates a continuation of each prompt (ids, used verbatim): row `r` samples
    /// with `rng_of(r)`, and `on_result(r, text)` takes each row as it finishes.
    pub fn generate_each(
        &self,
        prompts: &[Vec<u32>],
        cfg: &GenConfig,
        stops: &[String],
        rng_of: &dyn Fn(usize) -> rand_chacha::ChaCha8Rng,
        mut on_result: impl FnMut(usize, GenText) -> Result<()>,
    ) -> Result<()> {
        let cfg = GenConfig {
            eos_ids: self.eos.clone(),
            ..cfg.clone()
        };
        let stopper = Stopper {
            tokenizer: &self.tok,
            stops,
        };
        generate::generate_each(
            &self.model,
            self.adapter.as_ref(),
            prompts,
            &cfg,
            Some(&stopper),
            rng_of,
            |row, g| {
                let text = self.tok.decode(&g.ids, true)?;
                let t = GenText {
                    text: cut_at_stop(&text, stops).to_string(),
                    n_tokens: g.ids.len(),
                    finish: g.finish.name(),
                };
                on_result(row, t)
            },
        )?;
        Ok(())
    }
}

/// Sum of per-token log-probabilities in f64.
pub fn sum(lp: &[f32]) -> f64 {
    lp.iter().map(|&x| x as f64).sum()
}

/// Index of the largest value (the first among ties, as numpy's argmax).
pub fn argmax(x: &[f64]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}
