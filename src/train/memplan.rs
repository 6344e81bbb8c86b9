//! `--recompute auto`: the activation plan that recomputes least while its estimated
//! peak fits the device. The three plans give the same results (tests/backward_fd.rs
//! checks it), so the choice only trades memory for time.
//!
//! The estimate counts what one saving forward keeps (bf16 activations, f32 norm and
//! attention statistics, per layer and token, as `model::llama::LayerTrace` holds them)
//! plus the transient working set of a layer's backward. On an H200 (benches/RESULTS.md,
//! 2026-11-27, Mistral-7B shape, rank 16) the measured peaks were 40.1 GiB for SFT QLoRA
//! with `none` at 8192 tokens and 13.5 GiB for DPO QLoRA with `full` at 16384 policy
//! tokens; this model plus the weights gives 39.8 and 13.2 GiB (the unit tests below).
//! On 2026-11-28 DPO QLoRA with `none` (12288 rows saved for 16384 tokens, prompts
//! shared) peaked at 59.6 GiB against an estimate of 57.5: 3.5% under, inside the
//! headroom below.

use crate::model::config::ModelConfig;
use crate::model::llama::Recompute;

const BF16: u64 = 2;
const F32: u64 = 4;
/// Fixed transient buffers: the NF4 dequant scratch of the largest projection, the
/// logits chunk (32 MiB) and its staging, cuBLAS's workspace.
const FIXED_WORK: u64 = 256 << 20;
/// Headroom kept free for allocator rounding (pool buckets are ≤ 12.5% over) and
/// fragmentation.
const HEADROOM: f64 = 0.12;

/// Bytes one layer's full trace keeps per token (`Recompute::None`).
fn layer_trace_per_token(cfg: &ModelConfig, rank_sum: usize) -> u64 {
    let h = cfg.hidden_size as u64;
    let hq = (cfg.num_heads * cfg.head_dim) as u64;
    let kv = (cfg.num_kv_heads * cfg.head_dim) as u64;
    let i = cfg.intermediate_size as u64;
    let attention = (h + hq + 2 * kv + hq) * BF16 + (cfg.num_heads as u64 + 1) * F32; // n1 q k v a, lse rstd1
    let rest = (h + h + h + 3 * i) * BF16 + F32; // x h1 n2 g u act, rstd2
    attention + rest + rank_sum as u64 * BF16 // the adapters' xa
}

/// Bytes of attention-block activations per token per layer (`--recompute attention`
/// drops them and recomputes the block in backward).
fn attention_per_token(cfg: &ModelConfig) -> u64 {
    let h = cfg.hidden_size as u64;
    let hq = (cfg.num_heads * cfg.head_dim) as u64;
    let kv = (cfg.num_kv_heads * cfg.head_dim) as u64;
    (h + hq + 2 * kv + hq) * BF16 + (cfg.num_heads as u64 + 1) * F32
}

/// Activations a saving forward of `tokens` tokens keeps under `plan`; `rank_sum` is the
/// summed adapter rank of one layer (rank × adapted projections).
pub fn saved_bytes(cfg: &ModelConfig, plan: Recompute, tokens: usize, rank_sum: usize) -> u64 {
    let t = tokens as u64;
    let layers = cfg.num_layers as u64;
    let full = layer_trace_per_token(cfg, rank_sum);
    match plan {
        Recompute::None => layers * t * full,
        Recompute::Attention => layers * t * (full - attention_per_token(cfg)),
        // Layer inputs, plus the one layer being replayed.
        Recompute::Full => layers * t * cfg.hidden_size as u64 * BF16 + t * full,
    }
}

/// The transient peak of a layer's backward over `tokens` tokens: the MLP's gradients
/// (d_act, dg, du) and a few hidden-sized ones, plus the fixed buffers.
pub fn working_bytes(cfg: &ModelConfig, tokens: usize) -> u64 {
    let per_token = (3 * cfg.intermediate_size + 4 * cfg.hidden_size) as u64 * BF16;
    tokens as u64 * per_token + FIXED_WORK
}

/// The transient peak of a layer's attention backward over shared prefixes, whose
/// inputs and gradients live in the expanded layout of `tokens` rows: q, k, v, o and dO
/// gathered there, dQ/dK/dV there, and the kernel's f32 dQ accumulator.
pub fn attention_working_bytes(cfg: &ModelConfig, tokens: usize) -> u64 {
    let hq = (cfg.num_heads * cfg.head_dim) as u64;
    let kv = (cfg.num_kv_heads * cfg.head_dim) as u64;
    let per_token = (3 * hq + 2 * kv) * BF16 + (hq + 2 * kv) * BF16 + hq * F32;
    tokens as u64 * per_token + FIXED_WORK
}

/// The micro-batch a plan must hold: `rows` token rows computed (a prompt shared by a
/// DPO pair counted once), `tokens` before sharing (the rows attention expands to).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MicroBatch {
    pub rows: usize,
    pub tokens: usize,
}

impl MicroBatch {
    /// A micro-batch without shared prompts.
    pub fn plain(tokens: usize) -> Self {
        MicroBatch {
            rows: tokens,
            tokens,
        }
    }
}

/// The activation bytes `plan` is estimated to need for micro-batch `mb`: what the saving
/// forward keeps plus the larger of a layer's backward and attention working sets.
fn estimate(cfg: &ModelConfig, plan: Recompute, mb: MicroBatch, rank_sum: usize) -> u64 {
    let working = working_bytes(cfg, mb.rows).max(attention_working_bytes(cfg, mb.tokens));
    saved_bytes(cfg, plan, mb.rows, rank_sum) + working
}

/// The first of none, attention, full whose estimate fits `available` bytes (with
/// headroom); `full` when none does. Also returns the estimate of the chosen plan.
pub fn choose(
    cfg: &ModelConfig,
    mb: MicroBatch,
    rank_sum: usize,
    available: u64,
) -> (Recompute, u64) {
    let budget = (available as f64 * (1.0 - HEADROOM)) as u64;
    let need = |p| estimate(cfg, p, mb, rank_sum);
    for plan in [Recompute::None, Recompute::Attention] {
        if need(plan) <= budget {
            return (plan, need(plan));
        }
    }
    (Recompute::Full, need(Recompute::Full))
}

/// The plan `--recompute ARG` names: `auto` is [`choose`] over `available` device bytes
/// (`None`: on the CPU, where `none` is kept), with a line on stderr unless `quiet`.
pub fn resolve(
    arg: &str,
    cfg: &ModelConfig,
    mb: MicroBatch,
    rank_sum: usize,
    available: Option<u64>,
    quiet: bool,
) -> crate::error::Result<Recompute> {
    if arg != "auto" {
        return arg.parse();
    }
    let Some(available) = available else {
        return Ok(Recompute::None);
    };
    let (plan, need) = choose(cfg, mb, rank_sum, available);
    if !quiet {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let shared = if mb.rows < mb.tokens {
            format!(" ({} before shared prompts)", mb.tokens)
        } else {
            String::new()
        };
        eprintln!(
            "memory: --recompute auto chose {} for {} token rows in the largest micro-batch{shared} (about {:.1} GiB of activations, {:.1} GiB available)",
            plan.name(),
            mb.rows,
            gib(need),
            gib(available)
        );
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mistral-7B's shape (config.json facts: hidden 4096, 32 layers, 32 heads of 128,
    /// 8 KV heads, intermediate 14336, vocab 32000).
    fn mistral() -> ModelConfig {
        let raw = serde_json::json!({
            "architectures": ["MistralForCausalLM"], "model_type": "mistral",
            "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 32768,
            "sliding_window": 4096, "tie_word_embeddings": false
        });
        ModelConfig::from_json(raw).unwrap()
    }

    const GIB: f64 = (1u64 << 30) as f64;

    /// What the device held besides activations in those runs: NF4 weights of the 7.11B
    /// linear parameters at 0.5 B + absmax (~3.6 GiB), bf16 embedding and lm_head
    /// (0.49 GiB), the rank-16 adapter with f32 masters, moments, gradients and a bf16
    /// copy (42M × 18 B ≈ 0.7 GiB).
    const FIXED_GIB: f64 = 3.6 + 0.49 + 0.7;

    #[test]
    fn estimates_match_the_measured_h200_peaks() {
        let cfg = mistral();
        let rank_sum = 7 * 16;
        let sft = (saved_bytes(&cfg, Recompute::None, 8192, rank_sum) + working_bytes(&cfg, 8192))
            as f64
            / GIB
            + FIXED_GIB;
        assert!(
            (sft - 40.1).abs() < 1.5,
            "SFT none at 8192 tokens: {sft:.2} GiB vs 40.1"
        );
        let dpo = (saved_bytes(&cfg, Recompute::Full, 16384, rank_sum) + working_bytes(&cfg, 16384))
            as f64
            / GIB
            + FIXED_GIB;
        assert!(
            (dpo - 13.5).abs() < 1.5,
            "DPO full at 16384 tokens: {dpo:.2} GiB vs 13.5"
        );
        // 2026-11-28 (same GPU and shape): DPO QLoRA with `none` peaked at 59.6 GiB. Its
        // policy pass shares each pair's 256-token prompt (no dropout in DPO training, as
        // TRL), so 12288 rows are saved for 16384 tokens, as `choose` counts them.
        let mb = MicroBatch {
            rows: 12288,
            tokens: 16384,
        };
        let dpo_none = estimate(&cfg, Recompute::None, mb, rank_sum) as f64 / GIB + FIXED_GIB;
        // Under the peak is the dangerous side: more than 3 GiB (5%) under would leave
        // less than half of the headroom.
        assert!(
            (-3.0..1.5).contains(&(dpo_none - 59.6)),
            "DPO none at 12288 rows: {dpo_none:.2} GiB vs 59.6"
        );
    }

    #[test]
    fn resolve_reads_names_and_keeps_none_on_the_cpu() {
        let cfg = mistral();
        assert_eq!(
            resolve("auto", &cfg, MicroBatch::plain(8192), 112, None, true).unwrap(),
            Recompute::None
        );
        assert_eq!(
            resolve("full", &cfg, MicroBatch::plain(8192), 112, None, true).unwrap(),
            Recompute::Full
        );
        let small = Some(8u64 << 30);
        assert_eq!(
            resolve("auto", &cfg, MicroBatch::plain(8192), 112, small, true).unwrap(),
            Recompute::Full
        );
        let e = resolve("some", &cfg, MicroBatch::plain(8192), 112, None, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--recompute") && e.contains("auto"), "{e}");
    }

    #[test]
    fn plans_are_ordered_and_auto_picks_the_cheapest_that_fits() {
        let cfg = mistral();
        let r = 7 * 16;
        let t = 8192;
        let [none, attn, full] = [Recompute::None, Recompute::Attention, Recompute::Full]
            .map(|p| saved_bytes(&cfg, p, t, r));
        assert!(none > attn && attn > full, "{none} {attn} {full}");
        let gib = |g: f64| (g * GIB) as u64;
        // An 80 GB card after the weights: everything saved.
        assert_eq!(
            choose(&cfg, MicroBatch::plain(t), r, gib(74.0)).0,
            Recompute::None
        );
        // A 40 GB A100 after ~5 GiB of weights: SFT at 8192 tokens must recompute.
        let (plan, need) = choose(&cfg, MicroBatch::plain(t), r, gib(34.0));
        assert_ne!(plan, Recompute::None);
        assert!(need as f64 <= 34.0 * GIB * (1.0 - HEADROOM) || plan == Recompute::Full);
        // The paper's DPO (16 pairs x 2 x 512 policy tokens) on that card: full.
        assert_eq!(
            choose(&cfg, MicroBatch::plain(16384), r, gib(34.0)).0,
            Recompute::Full
        );
        // With real data the largest micro-batch is far below 16 × 2 × 512: 8000 tokens
        // of which 3000 are prompt rows shared by a pair fit on that card with `none`.
        let mb = MicroBatch {
            rows: 5000,
            tokens: 8000,
        };
        assert_eq!(choose(&cfg, mb, r, gib(34.0)).0, Recompute::None);
        // The expanded attention's working set grows with the tokens before sharing.
        let few = MicroBatch {
            rows: 1000,
            tokens: 1000,
        };
        let many = MicroBatch {
            rows: 1000,
            tokens: 16384,
        };
        assert!(choose(&cfg, many, r, gib(74.0)).1 > choose(&cfg, few, r, gib(74.0)).1);
        // Nothing fits: full, the smallest.
        assert_eq!(
            choose(&cfg, MicroBatch::plain(t), r, gib(1.0)).0,
            Recompute::Full
        );
    }
}
