//! Batched generation with a KV cache (`palign generate`).
//!
//! Up to `batch_size` sequences are in flight, each in a KV-cache slot. Waiting prompts
//! enter free slots together: one packed forward over their prompt tokens (the training
//! forward's windowed attention; at most PREFILL_TOKENS of them, one prompt at least)
//! fills their cache rows and gives their first token. Then
//! every step feeds each live sequence's newest token through the decoder once, attending
//! to its cached keys, so a step costs one token per sequence, never the prefix again.
//! A finished sequence frees its slot for the next prompt (continuous batching); with
//! many slots, waiting prompts enter once a sixteenth of the slots are free (`prefill_now`).
//!
//! Each input row samples from its own ChaCha8 stream (seed, row index), and every op works
//! row by row, so on the CPU a row's output does not depend on which rows share its batch
//! (prompts that begin alike share their prefill rows, which are the same rows either
//! way). On the device, kernel choices by shape and the shared prefill's summation order
//! can move logits in the last bits, which can flip a near-tie.

use super::kv_cache::KvCache;
use super::llama::{Model, PackedSeqs};
use super::tokenizer::Tokenizer;
use crate::error::{bad, Result};
use crate::lora::Adapter;
use crate::ops::{self, Packing, Rope};
use crate::tensor::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// How to generate.
#[derive(Clone, Debug)]
pub struct GenConfig {
    pub max_new_tokens: usize,
    /// 0: greedy (argmax, ties to the lowest id, as `torch.argmax`).
    pub temperature: f32,
    /// Top-k filter before the nucleus (transformers' `TopKLogitsWarper`); 0: off.
    pub top_k: usize,
    /// Nucleus sampling mass in [0, 1]; 1 keeps every token.
    pub top_p: f32,
    pub seed: u64,
    /// Ids that end a sequence; the EOS token is kept in the output ids.
    pub eos_ids: Vec<u32>,
    /// Sequences decoded at once (KV-cache slots).
    pub batch_size: usize,
    /// Per input row, fewer tokens than `max_new_tokens` (`palign bench generate --vary`
    /// stands in for rows ending at different lengths with it); empty: none.
    pub row_max_new_tokens: Vec<usize>,
}

impl GenConfig {
    /// The most tokens row `row` generates.
    pub fn max_new_for(&self, row: usize) -> usize {
        self.row_max_new_tokens
            .get(row)
            .map_or(self.max_new_tokens, |&n| n.clamp(1, self.max_new_tokens))
    }

    pub fn validate(&self) -> Result<()> {
        if self.max_new_tokens == 0 {
            return Err(bad("--max-new-tokens must be at least 1"));
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(bad("--temperature must be a number >= 0"));
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            return Err(bad("--top-p must be in [0, 1]"));
        }
        if self.batch_size == 0 {
            return Err(bad("--batch-size must be at least 1"));
        }
        Ok(())
    }
}

/// Why a sequence ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    Eos,
    Stop,
    Length,
}

impl Finish {
    pub fn name(self) -> &'static str {
        match self {
            Finish::Eos => "eos",
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// One row's result: the generated ids (as transformers' `generate` returns them after
/// the prompt: an EOS that ended it included, the tokens that completed a stop string too).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generated {
    pub ids: Vec<u32>,
    pub finish: Finish,
}

/// Stop strings, matched on the decoded output text (special tokens skipped).
pub struct Stopper<'a> {
    pub tokenizer: &'a Tokenizer,
    pub stops: &'a [String],
}

impl Stopper<'_> {
    fn hit(&self, ids: &[u32]) -> Result<bool> {
        if self.stops.is_empty() {
            return Ok(false);
        }
        let text = self.tokenizer.decode(ids, true)?;
        Ok(stop_at(&text, self.stops).is_some())
    }
}

/// Byte offset of the earliest stop string in `text`.
pub fn stop_at(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

/// `text` cut before its earliest stop string.
pub fn cut_at_stop<'t>(text: &'t str, stops: &[String]) -> &'t str {
    &text[..stop_at(text, stops).unwrap_or(text.len())]
}

pub use crate::ops::argmax;

/// Draws a token from `softmax(logits / temperature)` restricted to the top-p nucleus
/// (transformers' `TemperatureLogitsWarper` then `TopPLogitsWarper`: in descending order,
/// a token is kept while the probability before it is < top_p, and at least one always).
/// Temperature 0 is greedy.
pub fn sample(
    logits: &[f32],
    temperature: f32,
    top_k: usize,
    top_p: f32,
    rng: &mut ChaCha8Rng,
) -> u32 {
    if temperature == 0.0 {
        return argmax(logits);
    }
    let z: Vec<f32> = logits.iter().map(|&l| l / temperature).collect();
    // transformers' warpers in its order: temperature, top-k (every score below the k-th
    // largest is dropped; ties with it stay), then top-p on what is left, renormalized.
    let floor = if top_k > 0 && top_k < z.len() {
        let mut s = z.clone();
        let (_, kth, _) = s.select_nth_unstable_by(top_k - 1, |a, b| b.total_cmp(a));
        *kth
    } else {
        f32::NEG_INFINITY
    };
    let mx = z.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<f64> = z
        .iter()
        .map(|&v| {
            if v < floor {
                0.0
            } else {
                ((v - mx) as f64).exp()
            }
        })
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    let kept = if top_p >= 1.0 {
        // (Tokens top-k dropped have probability 0: never the fallback pick below.)
        (0..probs.len()).filter(|&i| probs[i] > 0.0).collect()
    } else {
        nucleus(&probs, top_p as f64)
    };
    let mass: f64 = kept.iter().map(|&i| probs[i]).sum();
    let u = rng.random::<f64>() * mass;
    let mut cum = 0.0;
    for &i in &kept {
        cum += probs[i];
        if u < cum {
            return i as u32;
        }
    }
    *kept.last().expect("the nucleus keeps at least one token") as u32
}

/// The top-p nucleus in descending probability (ties: lower id first). Sorts only the
/// top k candidates, doubling k until they hold the mass, since vocabularies are large.
fn nucleus(probs: &[f64], top_p: f64) -> Vec<usize> {
    let desc = |a: &usize, b: &usize| probs[*b].total_cmp(&probs[*a]).then(a.cmp(b));
    let n = probs.len();
    let mut idx: Vec<usize> = (0..n).collect();
    let mut k = n.min(64);
    loop {
        if k < n {
            idx.select_nth_unstable_by(k - 1, desc);
        }
        idx[..k].sort_by(desc);
        let mut before = 0.0;
        for (rank, &t) in idx[..k].iter().enumerate() {
            if rank > 0 && before >= top_p {
                idx.truncate(rank);
                return idx;
            }
            before += probs[t];
        }
        if k == n {
            return idx;
        }
        k = (2 * k).min(n);
    }
}

/// A sequence in flight.
struct Live {
    /// Input row index.
    row: usize,
    slot: usize,
    /// Tokens stored in the cache (prompt + fed-back outputs) = the next position.
    len: usize,
    out: Vec<u32>,
    rng: ChaCha8Rng,
}

/// What one forward runs over.
struct Step {
    ids: Vec<u32>,
    positions: Vec<u32>,
    /// Token rows whose K/V go to the cache, and the cache rows they go to.
    src: Vec<usize>,
    dst: Vec<usize>,
    attn: Attn,
    /// Token rows whose next-token logits are wanted.
    last_rows: Vec<usize>,
}

enum Attn {
    /// Whole prompts, packed: causal (windowed) attention among their own tokens.
    Prompts(Packing),
    /// One new token per sequence against its cache slot holding `lens` tokens.
    Cached { slots: Vec<usize>, lens: Vec<usize> },
}

struct Generator<'a> {
    model: &'a Model,
    adapter: Option<&'a Adapter>,
    cache: KvCache,
    /// cos/sin for every position the run can reach; `positions` is set per step.
    rope: Rope,
    /// Greedy tokens chosen on the device (`device_argmax`), not from host logits.
    argmax_on_device: bool,
}

/// What a forward hands to token choice: the logits rows on the host, or (greedy on the
/// device) each row's token already chosen there.
enum Next {
    Logits(Vec<f32>),
    Tokens(Vec<u32>),
}

/// Whether greedy decoding on the device picks its tokens there (the default;
/// `PALIGN_DEVICE_ARGMAX=0`, `off` or `false` copies the logits rows to the host): a
/// decode step then copies one id per sequence instead of its logits row (128 KiB at a
/// 32000 vocabulary). On an H200 (benches/RESULTS.md, 2026-11-28) the kernel passed its
/// parity tests and `bench generate` (128 rows, 256 + 128 tokens, QLoRA) ran 1.06x faster.
pub fn device_argmax() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| crate::switches::DEVICE_ARGMAX.get())
}

impl Generator<'_> {
    /// Runs the decoder over one step's tokens, filling the cache; returns the logits
    /// `[last_rows.len(), vocab]` on the host, or their argmax.
    fn forward(&mut self, step: Step) -> Result<Next> {
        let m = self.model;
        self.rope.set_positions(step.positions.clone());
        let mut x = ops::embedding(&m.embed, &step.ids)?;
        for li in 0..m.layers.len() {
            x = self.layer(li, x, &step)?;
        }
        let last = ops::gather_rows(&x, &step.last_rows)?;
        let (h, _) = ops::rmsnorm(&last, &m.norm, m.cfg.rms_norm_eps)?;
        let logits = ops::linear(&h, &m.lm_head)?;
        Ok(if self.argmax_on_device {
            Next::Tokens(ops::argmax_rows(&logits)?)
        } else {
            Next::Logits(ops::to_host(&logits)?)
        })
    }

    /// One decoder layer (as `Model::layer_forward`, no dropout, nothing saved), storing
    /// this step's post-RoPE K/V in the cache before attending.
    fn layer(&mut self, li: usize, x: Tensor, step: &Step) -> Result<Tensor> {
        let (m, c) = (self.model, &self.model.cfg);
        let l = &m.layers[li];
        let lora = self.adapter.map(|a| (&a.layers[li], a.cfg.scale()));
        let proj = |x: &Tensor, w, p: usize| {
            let pair = lora.and_then(|(slots, s)| slots[p].as_ref().map(|pair| (pair, s)));
            Model::proj(x, w, pair, None).map(|(y, _)| y)
        };
        let (n1, _) = ops::rmsnorm(&x, &l.input_norm, c.rms_norm_eps)?;
        let mut q = proj(&n1, &l.q, 0)?;
        let mut k = proj(&n1, &l.k, 1)?;
        let v = proj(&n1, &l.v, 2)?;
        ops::rope_qk_(&mut q, &mut k, c.num_heads, c.num_kv_heads, &self.rope)?;
        self.cache.store(li, &step.src, &step.dst, &k, &v)?;
        let a = match &step.attn {
            Attn::Prompts(pack) => ops::attention(&q, &k, &v, pack, m.attn_shape())?.0,
            Attn::Cached { slots, lens } => {
                self.cache.attend(li, &q, slots, lens, m.attn_shape())?
            }
        };
        let mut h = x;
        ops::add_(&mut h, &proj(&a, &l.o, 3)?)?;
        let (n2, _) = ops::rmsnorm(&h, &l.post_norm, c.rms_norm_eps)?;
        let act = ops::swiglu(&proj(&n2, &l.gate, 4)?, &proj(&n2, &l.up, 5)?)?;
        ops::add_(&mut h, &proj(&act, &l.down, 6)?)?;
        Ok(h)
    }

    /// Prefill: the prompts of `seqs` (fresh, `len` 0) in one packed forward. Prompts
    /// that begin with the same tokens (few-shot exemplars, a shared system prompt)
    /// compute them once; their K/V rows are stored into every sharer's cache slot.
    fn prefill(&mut self, seqs: &mut [Live], prompts: &[Vec<u32>]) -> Result<Next> {
        let ids: Vec<&[u32]> = seqs.iter().map(|s| prompts[s.row].as_slice()).collect();
        let packed = PackedSeqs::new(&ids, true);
        let (mut src, mut dst, mut last_rows) = (Vec::new(), Vec::new(), Vec::new());
        for (i, s) in seqs.iter_mut().enumerate() {
            let len = ids[i].len();
            for pos in 0..len {
                // Keys that fall out of the window before any later query would be
                // overwritten in the ring; skip them.
                if self.cache.keeps(pos, len) {
                    src.push(packed.row(i, pos));
                    dst.push(self.cache.row(s.slot, pos));
                }
            }
            last_rows.push(packed.row(i, len - 1));
            s.len = len;
        }
        self.forward(Step {
            positions: packed.pack.positions(),
            ids: packed.ids,
            src,
            dst,
            attn: Attn::Prompts(packed.pack),
            last_rows,
        })
    }

    /// Decode: each live sequence's newest token, one forward.
    fn decode(&mut self, seqs: &mut [Live]) -> Result<Next> {
        let n = seqs.len();
        let step = Step {
            ids: seqs
                .iter()
                .map(|s| *s.out.last().expect("sampled"))
                .collect(),
            positions: seqs.iter().map(|s| s.len as u32).collect(),
            src: (0..n).collect(),
            dst: seqs.iter().map(|s| self.cache.row(s.slot, s.len)).collect(),
            attn: Attn::Cached {
                slots: seqs.iter().map(|s| s.slot).collect(),
                lens: seqs.iter().map(|s| s.len + 1).collect(),
            },
            last_rows: (0..n).collect(),
        };
        for s in seqs.iter_mut() {
            s.len += 1;
        }
        self.forward(step)
    }
}

/// Samples the next token of each sequence from its logits row (or takes the one chosen
/// on the device) and says which finished.
fn advance(
    seqs: &mut [Live],
    next: &Next,
    cfg: &GenConfig,
    stop: Option<&Stopper>,
) -> Result<Vec<Option<Finish>>> {
    let vocab = match next {
        Next::Logits(z) => z.len() / seqs.len().max(1),
        Next::Tokens(_) => 0,
    };
    seqs.par_iter_mut()
        .enumerate()
        .map(|(i, s)| {
            let t = match next {
                Next::Tokens(t) => t[i],
                Next::Logits(z) => sample(
                    &z[i * vocab..(i + 1) * vocab],
                    cfg.temperature,
                    cfg.top_k,
                    cfg.top_p,
                    &mut s.rng,
                ),
            };
            s.out.push(t);
            Ok(if cfg.eos_ids.contains(&t) {
                Some(Finish::Eos)
            } else if stop.map_or(Ok(false), |st| st.hit(&s.out))? {
                Some(Finish::Stop)
            } else if s.out.len() >= cfg.max_new_for(s.row) {
                Some(Finish::Length)
            } else {
                None
            })
        })
        .collect()
}

/// Where a generation's time went (`palign bench generate`). Each forward ends by
/// copying its logits to the host, so its wall time includes the device's work.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenStats {
    /// Prefill forwards, the prompt tokens they took (every prompt's, shared rows
    /// included) and their seconds.
    pub prefills: usize,
    pub prefill_tokens: usize,
    pub prefill_secs: f64,
    /// Decode forwards, the tokens they fed (one per live sequence) and their seconds.
    pub decode_steps: usize,
    pub decode_tokens: usize,
    pub decode_secs: f64,
    /// Host seconds spent choosing tokens and checking stop strings after prefills and
    /// after decode steps.
    pub prefill_sample_secs: f64,
    pub decode_sample_secs: f64,
}

/// Generates a continuation of every prompt (token ids, used verbatim). Results come
/// back in input order; `on_done(row)` is called as each row finishes.
pub fn generate(
    model: &Model,
    adapter: Option<&Adapter>,
    prompts: &[Vec<u32>],
    cfg: &GenConfig,
    stop: Option<&Stopper>,
    on_done: impl FnMut(usize),
) -> Result<Vec<Generated>> {
    generate_timed(model, adapter, prompts, cfg, stop, on_done).map(|(g, _)| g)
}

/// `generate`, also saying where the time went.
pub fn generate_timed(
    model: &Model,
    adapter: Option<&Adapter>,
    prompts: &[Vec<u32>],
    cfg: &GenConfig,
    stop: Option<&Stopper>,
    mut on_done: impl FnMut(usize),
) -> Result<(Vec<Generated>, GenStats)> {
    let mut results: Vec<Option<Generated>> = vec![None; prompts.len()];
    let rng_of = |row: usize| row_rng(cfg.seed, row as u64);
    let stats = generate_each(model, adapter, prompts, cfg, stop, &rng_of, |row, g| {
        on_done(row);
        results[row] = Some(g);
        Ok(())
    })?;
    let results = results
        .into_iter()
        .map(|r| r.expect("every row finishes"))
        .collect();
    Ok((results, stats))
}

/// The sampling stream `generate` gives a row: ChaCha8 seeded with `seed`, stream `stream`.
pub fn row_rng(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// Prompt tokens one prefill forward takes at most (it takes one prompt in any case):
/// bounds the prefill's working memory, which `auto_batch` sets aside.
pub const PREFILL_TOKENS: usize = 16384;

/// How many sequences generation decodes at once: `auto` (fit the device's memory) or a
/// number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchChoice {
    Auto,
    Fixed(usize),
}

impl std::str::FromStr for BatchChoice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(BatchChoice::Auto),
            _ => match s.parse::<usize>() {
                Ok(n) if n > 0 => Ok(BatchChoice::Fixed(n)),
                _ => Err(format!("`{s}` is not `auto` or a whole number >= 1")),
            },
        }
    }
}

impl std::fmt::Display for BatchChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BatchChoice::Auto => f.write_str("auto"),
            BatchChoice::Fixed(n) => write!(f, "{n}"),
        }
    }
}

impl BatchChoice {
    /// The number of KV-cache slots: `auto` is `auto_batch` on the device and
    /// `cpu_default` on the CPU.
    pub fn resolve(
        self,
        model: &Model,
        prompts: &[Vec<u32>],
        max_new_tokens: usize,
        cpu_default: usize,
    ) -> Result<usize> {
        Ok(match self {
            BatchChoice::Fixed(n) => n,
            BatchChoice::Auto => auto_batch(model, prompts, max_new_tokens)?.unwrap_or(cpu_default),
        })
    }
}

/// Most sequences `--batch-size auto` decodes at once. A decode step reads the weights once
/// and each sequence's cached keys; past a few hundred sequences the cache reads dominate
/// and tokens/s stops growing, while host sampling keeps growing.
pub const MAX_AUTO_BATCH: usize = 256;

/// Sequences decoded at once for `--batch-size auto`: on the device, as many KV-cache
/// slots as fit its free memory (`batch_for_memory`); None on the CPU, where the caller's
/// default stands.
pub fn auto_batch(
    model: &Model,
    prompts: &[Vec<u32>],
    max_new_tokens: usize,
) -> Result<Option<usize>> {
    if !model.embed.is_cuda() {
        return Ok(None);
    }
    let free = crate::backend::cuda::Gpu::get()?.available_bytes()? as f64;
    Ok(Some(batch_for_memory(
        &model.cfg,
        prompts,
        max_new_tokens,
        free,
    )))
}

/// The slots that fit `free` device bytes: each holds its bf16 K/V rows for every layer
/// (the longest sequence, or Mistral's window) and its logits row; a prefill's working
/// set (PREFILL_TOKENS rows of one layer's activations, doubled for temporaries) is set
/// aside, and 15% of the memory is left alone. At least 1, at most MAX_AUTO_BATCH and the
/// number of prompts.
pub fn batch_for_memory(
    c: &crate::model::ModelConfig,
    prompts: &[Vec<u32>],
    max_new_tokens: usize,
    free: f64,
) -> usize {
    let max_len = prompts.iter().map(Vec::len).max().unwrap_or(0) + max_new_tokens;
    let capacity = KvCache::capacity_for(c, max_len);
    let (q, kv) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    let per_slot = (c.num_layers * 2 * kv * capacity * 2 + c.vocab_size * 6) as f64;
    // A prefill takes up to PREFILL_TOKENS, or one longer prompt alone.
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let rows = prompts
        .iter()
        .map(Vec::len)
        .sum::<usize>()
        .min(PREFILL_TOKENS)
        .max(longest);
    let layer = 4 * c.hidden_size + q + 2 * kv + 3 * c.intermediate_size;
    let prefill = (rows * layer * 2 * 2) as f64;
    let fit = ((0.85 * free - prefill) / per_slot).floor().max(1.0) as usize;
    fit.min(MAX_AUTO_BATCH).min(prompts.len()).max(1)
}

/// Whether waiting prompts enter now. A prefill forward reads every weight once for its
/// few new rows, as a decode step does for all live rows, so with many slots the free
/// ones wait until there are a sixteenth of them (or room for every waiting prompt, or
/// nothing is live): fewer, larger prefills. Outputs do not depend on it (rows are
/// independent); up to 15 of 256 slots idle for a few steps.
fn prefill_now(free: usize, slots: usize, waiting: usize, live: usize) -> bool {
    waiting > 0 && free > 0 && (live == 0 || free >= (slots / 16).max(1).min(waiting))
}

/// The generation loop under `generate`: row `r` samples with `rng_of(r)`, and
/// `on_result(r, generated)` takes each row as it finishes (not in input order).
pub fn generate_each(
    model: &Model,
    adapter: Option<&Adapter>,
    prompts: &[Vec<u32>],
    cfg: &GenConfig,
    stop: Option<&Stopper>,
    rng_of: &dyn Fn(usize) -> ChaCha8Rng,
    mut on_result: impl FnMut(usize, Generated) -> Result<()>,
) -> Result<GenStats> {
    cfg.validate()?;
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(bad(format!("prompt {i} has no tokens")));
        }
        model.check_ids(p)?;
    }
    if let Some(a) = adapter {
        a.check_fits(&model.cfg)?;
    }
    let max_len = prompts.iter().map(Vec::len).max().unwrap_or(0) + cfg.max_new_tokens;
    let slots = cfg.batch_size.min(prompts.len()).max(1);
    let c = &model.cfg;
    let mut g = Generator {
        model,
        adapter,
        cache: KvCache::new(c, slots, max_len, model.embed.is_cuda())?,
        rope: Rope::new(c.head_dim, c.rope_theta, vec![max_len as u32]),
        argmax_on_device: cfg.temperature == 0.0 && model.is_cuda() && device_argmax(),
    };
    let mut free: Vec<usize> = (0..slots).rev().collect();
    let mut next = 0;
    let mut live: Vec<Live> = Vec::new();
    let mut stats = GenStats::default();
    while next < prompts.len() || !live.is_empty() {
        let t0 = std::time::Instant::now();
        let (mut seqs, logits) = if prefill_now(free.len(), slots, prompts.len() - next, live.len())
        {
            // Waiting prompts fill the free slots, up to PREFILL_TOKENS (one at least).
            let mut n = 1;
            let mut tokens = prompts[next].len();
            while n < free.len()
                && next + n < prompts.len()
                && tokens + prompts[next + n].len() <= PREFILL_TOKENS
            {
                tokens += prompts[next + n].len();
                n += 1;
            }
            let mut fresh: Vec<Live> = (next..next + n)
                .map(|row| Live {
                    row,
                    slot: free.pop().expect("counted"),
                    len: 0,
                    out: Vec::new(),
                    rng: rng_of(row),
                })
                .collect();
            next += n;
            let logits = g.prefill(&mut fresh, prompts)?;
            stats.prefills += 1;
            stats.prefill_tokens += tokens;
            stats.prefill_secs += t0.elapsed().as_secs_f64();
            (fresh, logits)
        } else {
            let logits = g.decode(&mut live)?;
            stats.decode_steps += 1;
            stats.decode_tokens += live.len();
            stats.decode_secs += t0.elapsed().as_secs_f64();
            (std::mem::take(&mut live), logits)
        };
        let prefilled = seqs.first().is_some_and(|s| s.out.is_empty());
        let t1 = std::time::Instant::now();
        let finished = advance(&mut seqs, &logits, cfg, stop)?;
        let secs = t1.elapsed().as_secs_f64();
        if prefilled {
            stats.prefill_sample_secs += secs;
        } else {
            stats.decode_sample_secs += secs;
        }
        for (s, fin) in seqs.into_iter().zip(finished) {
            match fin {
                Some(finish) => {
                    free.push(s.slot);
                    on_result(s.row, Generated { ids: s.out, finish })?;
                }
                None => live.push(s),
            }
        }
    }
    Ok(stats)
}

/// transformers' `generate` default for `top_k` when sampling: generation_config.json's
/// `top_k` (0 or null: no filter), else 50 (`GenerationConfig`'s default).
pub fn default_top_k(dir: &std::path::Path) -> Result<usize> {
    let path = dir.join("generation_config.json");
    if !path.exists() {
        return Ok(50);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| crate::error::Error::read(&path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| bad(format!("{}: not valid JSON: {e}", path.display())))?;
    match v.get("top_k") {
        None => Ok(50),
        Some(serde_json::Value::Null) => Ok(0),
        Some(k) => k.as_u64().map(|k| k as usize).ok_or_else(|| {
            bad(format!(
                "{}: top_k must be a non-negative integer",
                path.display()
            ))
        }),
    }
}

/// EOS ids of a model folder: config.json's, generation_config.json's (what transformers'
/// `generate` stops at; LLaMA-3 lists several there) and the tokenizer's.
pub fn eos_ids(dir: &std::path::Path, model: &Model, tok: Option<&Tokenizer>) -> Result<Vec<u32>> {
    let mut ids = model.cfg.eos_token_ids.clone();
    let path = dir.join("generation_config.json");
    if path.exists() {
        let text =
            std::fs::read_to_string(&path).map_err(|e| crate::error::Error::read(&path, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| bad(format!("{}: not valid JSON: {e}", path.display())))?;
        match v.get("eos_token_id") {
            Some(serde_json::Value::Array(a)) => {
                ids.extend(a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32))
            }
            Some(x) => ids.extend(x.as_u64().map(|x| x as u32)),
            None => {}
        }
    }
    ids.extend(tok.and_then(|t| t.eos_id));
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_lowest_id_among_ties() {
        assert_eq!(argmax(&[0.0, 3.0, 1.0, 3.0]), 1);
        assert_eq!(argmax(&[-1.0]), 0);
    }

    #[test]
    fn nucleus_keeps_the_smallest_prefix_reaching_top_p() {
        let p = [0.1, 0.4, 0.3, 0.2];
        assert_eq!(nucleus(&p, 0.5), vec![1, 2]); // 0.4 < 0.5, then 0.7 ≥ 0.5
        assert_eq!(nucleus(&p, 0.4), vec![1]); // exactly reaching top_p stops
        assert_eq!(nucleus(&p, 0.0), vec![1]); // at least one token
        assert_eq!(nucleus(&p, 1.0), vec![1, 2, 3, 0]);
        // ties keep the lower id first; more candidates than the first k = 64
        let flat = vec![1.0 / 300.0; 300];
        let kept = nucleus(&flat, 0.5);
        assert_eq!(kept.len(), 150);
        assert_eq!(kept[..3], [0, 1, 2]);
    }

    #[test]
    fn sampling_follows_the_distribution_and_the_seed() {
        let logits = [0.0f32, (3.0f32).ln(), f32::NEG_INFINITY];
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let n = 20000;
        let ones = (0..n)
            .filter(|_| sample(&logits, 1.0, 0, 1.0, &mut rng) == 1)
            .count();
        // p(1) = 3/4; 5 sigma ≈ 0.015
        assert!((ones as f64 / n as f64 - 0.75).abs() < 0.015, "{ones}");
        // top_p 0.5 keeps only token 1; temperature 0 is argmax
        assert!((0..100).all(|_| sample(&logits, 1.0, 0, 0.5, &mut rng) == 1));
        assert_eq!(sample(&logits, 0.0, 0, 1.0, &mut rng), 1);
    }

    #[test]
    fn top_k_keeps_the_k_largest_and_their_ties() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let logits = [0.0f32, (3.0f32).ln(), (2.0f32).ln(), f32::NEG_INFINITY];
        assert!((0..200).all(|_| sample(&logits, 1.0, 1, 1.0, &mut rng) == 1));
        // k = 2: tokens 1 and 2 with p = 3/5, 2/5 (token 0 would take 1/6 without it).
        let n = 20000;
        let mut hits = [0usize; 4];
        for _ in 0..n {
            hits[sample(&logits, 1.0, 2, 1.0, &mut rng) as usize] += 1;
        }
        assert_eq!(hits[0] + hits[3], 0);
        assert!((hits[1] as f64 / n as f64 - 0.6).abs() < 0.02, "{hits:?}");
        // Scores equal to the k-th largest stay (transformers drops only `< kth`).
        let flat = [1.0f32, 1.0, 1.0, 0.0];
        let mut seen = [false; 4];
        for _ in 0..300 {
            seen[sample(&flat, 1.0, 1, 1.0, &mut rng) as usize] = true;
        }
        assert_eq!(seen, [true, true, true, false]);
        // Then top-p on the renormalized rest: k = 2 leaves 0.6 / 0.4; top_p 0.5 keeps 1.
        assert!((0..200).all(|_| sample(&logits, 1.0, 2, 0.5, &mut rng) == 1));
    }

    #[test]
    fn top_k_default_follows_generation_config() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(default_top_k(d.path()).unwrap(), 50);
        let gc = d.path().join("generation_config.json");
        for (text, want) in [
            (r#"{"eos_token_id": 2}"#, Some(50)),
            (r#"{"top_k": 20}"#, Some(20)),
            (r#"{"top_k": 0}"#, Some(0)),
            (r#"{"top_k": null}"#, Some(0)),
            (r#"{"top_k": "x"}"#, None),
            ("{", None),
        ] {
            std::fs::write(&gc, text).unwrap();
            let got = default_top_k(d.path());
            match want {
                Some(k) => assert_eq!(got.unwrap(), k, "{text}"),
                None => assert!(got.unwrap_err().is_bad_input(), "{text}"),
            }
        }
    }

    fn fixture(p: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(p)
    }

    /// Logits of the last token of each sequence, by one prefill of the whole sequence.
    fn full_forward(model: &Model, adapter: Option<&Adapter>, seqs: &[Vec<u32>]) -> Vec<f32> {
        let max_len = seqs.iter().map(Vec::len).max().unwrap();
        let c = &model.cfg;
        let mut g = Generator {
            model,
            adapter,
            cache: KvCache::new(c, seqs.len(), max_len, false).unwrap(),
            rope: Rope::new(c.head_dim, c.rope_theta, vec![max_len as u32]),
            argmax_on_device: false,
        };
        let mut live: Vec<Live> = (0..seqs.len())
            .map(|i| Live {
                row: i,
                slot: i,
                len: 0,
                out: vec![],
                rng: ChaCha8Rng::seed_from_u64(0),
            })
            .collect();
        logits(g.prefill(&mut live, seqs).unwrap())
    }

    fn logits(next: Next) -> Vec<f32> {
        match next {
            Next::Logits(z) => z,
            Next::Tokens(_) => panic!("host logits expected"),
        }
    }

    /// Decoding token by token through the cache (ring wrapping past Mistral's window of
    /// 8, an adapter, NF4) gives the logits of re-running the whole sequence.
    #[test]
    fn cached_decode_equals_full_forward() {
        for (name, nf4, with_adapter) in [
            ("tiny-llama", false, false),
            ("tiny-mistral", false, true),
            ("tiny-mistral", true, false),
        ] {
            let mut model = Model::load(&fixture(name)).unwrap();
            if nf4 {
                model.quantize_nf4(64, true).unwrap();
            }
            let adapter = with_adapter.then(|| {
                crate::lora::peft::load(&fixture(&format!("train/{name}/init_adapter")), &model.cfg)
                    .unwrap()
            });
            // prompts of 3 and 11 tokens, each then fed 14 more (forced) tokens
            let seqs: Vec<Vec<u32>> = [3usize, 11]
                .iter()
                .map(|&n| {
                    (0..n as u32 + 14)
                        .map(|i| 3 + (i * 37 + n as u32) % 500)
                        .collect()
                })
                .collect();
            let prompts: Vec<Vec<u32>> = vec![seqs[0][..3].to_vec(), seqs[1][..11].to_vec()];
            let c = &model.cfg;
            let mut g = Generator {
                model: &model,
                adapter: adapter.as_ref(),
                cache: KvCache::new(c, 3, 32, false).unwrap(),
                rope: Rope::new(c.head_dim, c.rope_theta, vec![32]),
                argmax_on_device: false,
            };
            // slots 2 and 0: the slot index must not matter
            let mut live: Vec<Live> = [2usize, 0]
                .iter()
                .enumerate()
                .map(|(row, &slot)| Live {
                    row,
                    slot,
                    len: 0,
                    out: vec![],
                    rng: ChaCha8Rng::seed_from_u64(0),
                })
                .collect();
            let mut logits = logits(g.prefill(&mut live, &prompts).unwrap());
            let vocab = c.vocab_size;
            for step in 0..14 {
                let want: Vec<Vec<u32>> =
                    live.iter().map(|s| seqs[s.row][..s.len].to_vec()).collect();
                let full = full_forward(&model, adapter.as_ref(), &want);
                let d = logits
                    .iter()
                    .zip(&full)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                assert!(d < 1e-4, "{name} nf4={nf4} step {step}: max |Δ logit| {d}");
                assert_eq!(logits.len(), 2 * vocab);
                for s in live.iter_mut() {
                    s.out.push(seqs[s.row][s.len]);
                }
                logits = self::logits(g.decode(&mut live).unwrap());
            }
        }
    }

    /// The stats count what the loop ran: 5 prompts in 2 slots, 3 tokens each, no EOS.
    /// Pairs enter together and finish together, so prefill (2), decode, decode; again;
    /// then the last prompt alone: 3 prefills and 6 decode steps of 2+2+2+2+1+1 tokens.
    #[test]
    fn stats_count_the_forwards_of_continuous_batching() {
        let model = Model::load(&fixture("tiny-llama")).unwrap();
        let prompts: Vec<Vec<u32>> = [4usize, 7, 1, 5, 9]
            .iter()
            .map(|&n| {
                (0..n as u32)
                    .map(|i| 3 + (i * 31 + n as u32) % 500)
                    .collect()
            })
            .collect();
        let cfg = GenConfig {
            max_new_tokens: 3,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            eos_ids: vec![],
            batch_size: 2,
            row_max_new_tokens: Vec::new(),
        };
        let (out, st) = generate_timed(&model, None, &prompts, &cfg, None, |_| {}).unwrap();
        assert!(out
            .iter()
            .all(|g| g.ids.len() == 3 && g.finish == Finish::Length));
        assert_eq!((st.prefills, st.prefill_tokens), (3, 26));
        assert_eq!((st.decode_steps, st.decode_tokens), (6, 10));
        assert!(st.prefill_secs > 0.0 && st.decode_secs > 0.0);
        // the stats change nothing: the same outputs as `generate`
        let plain = generate(&model, None, &prompts, &cfg, None, |_| {}).unwrap();
        assert_eq!(plain, out);
    }

    /// A prefill takes waiting prompts up to PREFILL_TOKENS: 33 prompts of 500 tokens in
    /// 64 free slots are two prefills (32 + 1), with the outputs of prefills of 4.
    #[test]
    fn prefill_takes_prompts_up_to_the_token_budget() {
        let model = Model::load(&fixture("tiny-llama")).unwrap();
        let prompts: Vec<Vec<u32>> = (0..33u32)
            .map(|r| (0..500u32).map(|i| 3 + (r * 7 + i * 13) % 500).collect())
            .collect();
        let cfg = |batch_size| GenConfig {
            max_new_tokens: 2,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            eos_ids: vec![],
            batch_size,
            row_max_new_tokens: Vec::new(),
        };
        let (out, st) = generate_timed(&model, None, &prompts, &cfg(64), None, |_| {}).unwrap();
        assert_eq!((st.prefills, st.prefill_tokens), (2, 33 * 500));
        let (small, st4) = generate_timed(&model, None, &prompts, &cfg(4), None, |_| {}).unwrap();
        assert_eq!(st4.prefills, 9);
        assert_eq!(out, small);
    }

    #[test]
    fn prefills_wait_for_a_sixteenth_of_the_slots() {
        // up to 31 slots: any free slot refills at once (as before)
        assert!(prefill_now(1, 31, 10, 30));
        // 64 slots: 4 free needed while others decode; fewer if fewer prompts wait
        assert!(!prefill_now(3, 64, 10, 61));
        assert!(prefill_now(4, 64, 10, 60));
        assert!(prefill_now(2, 64, 2, 62));
        // nothing live: go; nothing waiting or no slot: no
        assert!(prefill_now(1, 64, 10, 0));
        assert!(!prefill_now(8, 64, 0, 56));
        assert!(!prefill_now(0, 64, 10, 64));
    }

    /// Rows finishing at different steps (an EOS set the tiny model hits early and late):
    /// 80 prompts through 64 slots refill 4 at a time (4 prefills here; refilling every
    /// free slot at once made 11), and every row's output equals generating it alone.
    #[test]
    fn refills_in_batches_give_each_rows_own_output() {
        let model = Model::load(&fixture("tiny-llama")).unwrap();
        let prompts: Vec<Vec<u32>> = (0..80u32)
            .map(|r| {
                (0..2 + r % 7)
                    .map(|i| 3 + (r * 53 + i * 29) % 500)
                    .collect()
            })
            .collect();
        let cfg = |batch_size| GenConfig {
            max_new_tokens: 60,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            eos_ids: (3..15).collect(),
            batch_size,
            row_max_new_tokens: Vec::new(),
        };
        let (alone, _) = generate_timed(&model, None, &prompts, &cfg(1), None, |_| {}).unwrap();
        let (pooled, st) = generate_timed(&model, None, &prompts, &cfg(64), None, |_| {}).unwrap();
        assert_eq!(pooled, alone);
        let lens: std::collections::BTreeSet<usize> = alone.iter().map(|g| g.ids.len()).collect();
        assert!(lens.len() > 3, "rows must end at different steps: {lens:?}");
        assert!(st.prefills <= 1 + 16 / 4 + 1, "{} prefills", st.prefills);
    }

    /// The auto batch follows the KV cache's size: Mistral-7B's 8 KV heads keep 128 KiB
    /// per token, LLaMA-2-7B's 32 heads 512 KiB, so on 30 GiB free at 768 tokens
    /// (256 prompt + 512 new) about 250 Mistral slots fit but only about 70 LLaMA ones.
    #[test]
    fn auto_batch_fits_the_kv_cache_in_free_memory() {
        let cfg = |kv: usize, window: Option<usize>| {
            crate::model::ModelConfig::from_json(serde_json::json!({
                "architectures": [if window.is_some() { "MistralForCausalLM" } else { "LlamaForCausalLM" }],
                "hidden_size": 4096,
                "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": kv, "vocab_size": 32000,
                "rms_norm_eps": 1e-5, "sliding_window": window,
            }))
            .unwrap()
        };
        let prompts = vec![vec![1u32; 256]; 1000];
        let gib = (1u64 << 30) as f64;
        let mistral = batch_for_memory(&cfg(8, None), &prompts, 512, 30.0 * gib);
        let llama = batch_for_memory(&cfg(32, None), &prompts, 512, 30.0 * gib);
        // 0.85 · 30 GiB less a 4.3 GB prefill, over 96 MiB (Mistral) / 384 MiB (LLaMA)
        assert!((200..=256).contains(&mistral), "{mistral}");
        assert!((50..=70).contains(&llama), "{llama}");
        assert!(llama * 4 <= mistral + 8, "{llama} {mistral}");
        // a sliding window shorter than the sequences caps each slot's rows
        let windowed = batch_for_memory(&cfg(32, Some(192)), &prompts, 512, 30.0 * gib);
        assert!(windowed >= 3 * llama, "{windowed} {llama}");
        // bounds: never more than the prompts or MAX_AUTO_BATCH, never less than one
        assert_eq!(
            batch_for_memory(&cfg(8, None), &prompts[..10], 512, 30.0 * gib),
            10
        );
        assert_eq!(
            batch_for_memory(&cfg(8, None), &prompts, 8, 500.0 * gib),
            MAX_AUTO_BATCH
        );
        assert_eq!(batch_for_memory(&cfg(8, None), &prompts, 512, 1e6), 1);
    }

    #[test]
    fn stop_strings_cut_at_the_earliest_match() {
        let stops = vec!["END".to_string(), "\n\n".to_string()];
        assert_eq!(cut_at_stop("a\n\nb END", &stops), "a");
        assert_eq!(cut_at_stop("abc END\n\n", &stops), "abc ");
        assert_eq!(cut_at_stop("no stop", &stops), "no stop");
    }
}
