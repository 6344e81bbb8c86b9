//! Which attention tile variant runs, chosen per GPU and shape by measurement, as the NF4
//! dispatcher chooses its path: the first call for a shape runs every candidate of
//! [`FWD_VARIANTS`] / [`BWD_VARIANTS`] on the call's own inputs, drops any whose outputs
//! disagree with the reference variant's, times the rest and keeps the fastest, in
//! `~/.cache/palign/attn-tune-<gpu>.json` ([`super::tune`]). The best tiles differ between
//! GPUs (an A100's 164 KB of shared memory per block against an H100's 227 KB, its
//! slower tensor cores), so a choice measured on one GPU is not reused on another.
//!
//! `PALIGN_ATTN_TUNE` says which variants are candidates: `on` (the default) only those
//! marked `verified` (their parity tests passed on a GPU), `all` every variant that fits
//! the GPU, `off` none (the defaults, as before tuning existed). `PALIGN_ATTN_FWD` /
//! `PALIGN_ATTN_BWD` still force one variant. A candidate whose kernel faults would take
//! the process with it, which is why unverified variants are opt-in.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, OnceLock};

use half::bf16;
use serde::{Deserialize, Serialize};

use super::attention::{
    attention_backward_with, attention_forward_with, bwd_variant, bwd_variant_from_env,
    fwd_variant, fwd_variant_from_env, AttnGradInputs, AttnGrads, BwdConfig, BwdVariant,
    FwdVariant, SeqLayout, BWD_VARIANTS, FWD_VARIANTS,
};
use super::tune::{Choice, TuneCache, TuneEntry};
use super::{DeviceBuffer, Gpu};
use crate::backend::cpu::ops::AttnShape;
use crate::error::{bad, Result};

/// A variant's name (a row of [`FWD_VARIANTS`] or [`BWD_VARIANTS`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AttnChoice(pub String);

impl Choice for AttnChoice {
    const FORMAT: &'static str = "palign-attn-tune";
    const PREFIX: &'static str = "attn-tune";
    const ENV: &'static str = "PALIGN_ATTN_TUNE_CACHE";
}

/// Which variants compete ([`PALIGN_ATTN_TUNE`](self)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TuneMode {
    /// No measurement: the default forward, and the backward that fits.
    Off,
    /// The variants whose parity has been checked on a GPU.
    Verified,
    /// Every variant that fits the GPU.
    All,
}

impl TuneMode {
    /// `PALIGN_ATTN_TUNE`'s value (unset or empty: `on`).
    pub fn parse(v: Option<&str>) -> Result<TuneMode> {
        match v.unwrap_or("") {
            "" | "on" | "1" => Ok(TuneMode::Verified),
            "all" => Ok(TuneMode::All),
            "off" | "0" => Ok(TuneMode::Off),
            other => Err(bad(format!(
                "PALIGN_ATTN_TUNE={other:?}: expected on, all or off"
            ))),
        }
    }
}

/// Rows per sequence in buckets (powers of two from 64), so batches of varying length
/// measure few shapes.
fn len_bucket(max_len: usize) -> usize {
    max_len.next_power_of_two().max(64)
}

/// The cache key of a forward or backward (`pass`) at this shape: head dim, heads / KV
/// heads, whether a window applies, and the longest sequence's bucket.
pub fn tune_key(pass: &str, shape: &AttnShape, max_len: usize) -> String {
    format!(
        "{pass} d{} h{}/{} {} len<={}",
        shape.head_dim,
        shape.n_heads,
        shape.n_kv_heads,
        if shape.window.is_some_and(|w| w < max_len) {
            "window"
        } else {
            "causal"
        },
        len_bucket(max_len)
    )
}

/// The forward variants that may run at head dim `d` on a GPU allowing `max_smem` bytes
/// per block (and running the sm_90a wgmma kernels: `wgmma`); the default (which needs no
/// opt-in) first, as the reference.
pub fn fwd_candidates(
    d: usize,
    max_smem: usize,
    wgmma: bool,
    mode: TuneMode,
) -> Vec<&'static FwdVariant> {
    FWD_VARIANTS
        .iter()
        .enumerate()
        .filter(|(i, v)| {
            *i == 0
                || (mode != TuneMode::Off
                    && v.smem(d) <= max_smem
                    && (wgmma || !v.wgmma)
                    && wanted(mode, v.verified))
        })
        .map(|(_, v)| v)
        .collect()
}

/// The backward variants that may run (the sm_90a wgmma ones only with `wgmma`); the first
/// is the reference: the default where it fits (A100, H100), else the small kernel (99 KB
/// GPUs).
pub fn bwd_candidates(
    d: usize,
    max_smem: usize,
    wgmma: bool,
    mode: TuneMode,
) -> Vec<&'static BwdConfig> {
    let fits =
        |v: &BwdConfig| v.kernel(d).is_some() && v.smem(d) <= max_smem && (wgmma || !v.wgmma);
    let Some(reference) = BWD_VARIANTS[..2].iter().find(|v| fits(v)) else {
        return Vec::new();
    };
    let others = BWD_VARIANTS.iter().filter(|v| {
        mode != TuneMode::Off && fits(v) && wanted(mode, v.verified) && v.name != reference.name
    });
    std::iter::once(reference).chain(others).collect()
}

fn wanted(mode: TuneMode, verified: bool) -> bool {
    mode == TuneMode::All || verified
}

/// One output of a trial run, compared with the reference's in groups of `width`
/// values (one query row's head vector, or single log-sum-exps).
#[derive(Clone, Debug)]
pub struct Output {
    pub values: Vec<f32>,
    pub width: usize,
    /// Allowed error relative to the group's largest finite |value|.
    pub rtol: f32,
    /// Absolute allowance.
    pub atol: f32,
    /// Allowance relative to the whole output's largest finite |value| (catches garbage
    /// in rows that should be near 0, such as padding).
    pub gtol: f32,
}

impl Output {
    /// A bf16 output of head vectors (`width` = head_dim): variants differ by where f32
    /// sums and bf16 roundings fall, about one bf16 ulp (0.4%) per value; 2% of each
    /// vector's largest value, plus 0.1% of the output's, leaves room without letting a
    /// wrong index or a race (errors of the order of the values) through.
    pub fn heads(values: Vec<bf16>, width: usize) -> Output {
        Output {
            values: values.into_iter().map(|x| x.to_f32()).collect(),
            width,
            rtol: 2e-2,
            atol: 0.0,
            gtol: 1e-3,
        }
    }
}

fn max_finite(v: &[f32]) -> f32 {
    v.iter()
        .filter(|x| x.is_finite())
        .fold(0.0f32, |m, x| m.max(x.abs()))
}

/// Whether a candidate's output agrees with the reference's: same length, and each value
/// equal (NaN with NaN, ±inf with itself) or within
/// `rtol`·(its group's largest |want|) + `atol` + `gtol`·(the output's largest |want|).
pub fn agrees(got: &Output, want: &Output) -> bool {
    if got.values.len() != want.values.len() || want.width == 0 {
        return false;
    }
    let floor = want.atol + want.gtol * max_finite(&want.values);
    got.values
        .chunks(want.width)
        .zip(want.values.chunks(want.width))
        .all(|(g, w)| {
            let bound = want.rtol * max_finite(w) + floor;
            g.iter()
                .zip(w)
                .all(|(&g, &w)| g == w || (g.is_nan() && w.is_nan()) || (g - w).abs() <= bound)
        })
}

/// A shape's trial runs: [`measure`] calls `run` for each candidate, `read` for what it
/// wrote, and `time` for its milliseconds per call.
pub trait Trial<T> {
    fn run(&mut self, c: T) -> Result<()>;
    fn read(&mut self) -> Result<Vec<Output>>;
    /// Milliseconds per call (the caller has run it once); None without event timing.
    fn time(&mut self, c: T) -> Result<Option<f64>>;
}

/// Runs the reference (`cands[0]`) for the outputs to compare with, then each other
/// candidate: one whose launch fails or whose outputs disagree is rejected (the
/// reference's own failure is an error); the reference and the others are timed. Returns the entry choosing the fastest,
/// or None without event timing.
pub fn measure<T: Copy>(
    cands: &[T],
    name: impl Fn(T) -> &'static str,
    trial: &mut impl Trial<T>,
) -> Result<Option<TuneEntry<AttnChoice>>> {
    let Some(&reference) = cands.first() else {
        return Ok(None);
    };
    trial.run(reference)?;
    let want = trial.read()?;
    let mut ms = BTreeMap::new();
    let mut rejected = Vec::new();
    for (i, &c) in cands.iter().enumerate() {
        // The reference has just run (its warm-up); each other candidate runs once to
        // be compared. A candidate's launch error only rules it out (a sticky device
        // fault still surfaces at the next call).
        let agreed = i == 0
            || match trial.run(c) {
                Ok(()) => {
                    let got = trial.read()?;
                    got.len() == want.len() && got.iter().zip(&want).all(|(g, w)| agrees(g, w))
                }
                Err(_) => false,
            };
        if !agreed {
            rejected.push(name(c).to_string());
            continue;
        }
        match trial.time(c)? {
            Some(t) => ms.insert(name(c).to_string(), t),
            None => return Ok(None),
        };
    }
    Ok(fastest(ms, rejected))
}

/// The measured choices of this process, backed by this GPU's cache file.
pub struct AttnTuner {
    cache: Mutex<TuneCache<AttnChoice>>,
    mode: TuneMode,
    /// The keys this process has looked up or measured (what [`Self::summary`] lists).
    used: Mutex<BTreeSet<String>>,
}

impl AttnTuner {
    pub fn new(cache: TuneCache<AttnChoice>, mode: TuneMode) -> AttnTuner {
        AttnTuner {
            cache: Mutex::new(cache),
            mode,
            used: Mutex::new(BTreeSet::new()),
        }
    }

    /// The process's tuner: this GPU's cache file and `PALIGN_ATTN_TUNE`.
    pub fn global(gpu: &Gpu) -> Result<&'static AttnTuner> {
        static T: OnceLock<AttnTuner> = OnceLock::new();
        if let Some(t) = T.get() {
            return Ok(t);
        }
        let mode = TuneMode::parse(std::env::var("PALIGN_ATTN_TUNE").ok().as_deref())?;
        Ok(T.get_or_init(|| AttnTuner::new(TuneCache::for_gpu(gpu.name()), mode)))
    }

    pub fn mode(&self) -> TuneMode {
        self.mode
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TuneCache<AttnChoice>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cached choice for `key` when it covers today's candidates.
    fn cached(&self, key: &str, names: &[&str]) -> Option<String> {
        let c = self.lock();
        let e = c.get(key)?;
        let hit = e.covers(&e.choice.0, names).then(|| e.choice.0.clone());
        if hit.is_some() {
            self.mark_used(key);
        }
        hit
    }

    fn mark_used(&self, key: &str) {
        let mut u = self.used.lock().unwrap_or_else(|e| e.into_inner());
        u.insert(key.to_string());
    }

    fn remember(&self, key: String, entry: TuneEntry<AttnChoice>) {
        self.mark_used(&key);
        let mut c = self.lock();
        c.insert(key, entry);
        // Best effort: a read-only cache folder costs a re-measure in the next process.
        let _ = c.save();
    }

    /// The choices this process used, as `key: variant (ms per call)` (the bench prints
    /// what it ran; the cache file may hold other shapes from earlier processes).
    pub fn summary(&self) -> Vec<String> {
        let used = self.used.lock().unwrap_or_else(|e| e.into_inner()).clone();
        self.lock()
            .entries()
            .filter(|(k, _)| used.contains(k.as_str()))
            .map(|(k, e)| {
                let ms = e.ms.get(&e.choice.0).copied().unwrap_or(f64::NAN);
                format!("{k}: {} ({ms:.4} ms)", e.choice.0)
            })
            .collect()
    }

    /// The forward on the variant `PALIGN_ATTN_FWD` forces, else the measured fastest
    /// for this shape (measured now if it is not cached). Returns the variant that wrote
    /// `out` and `lse`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        gpu: &Gpu,
        q: &DeviceBuffer<bf16>,
        k: &DeviceBuffer<bf16>,
        v: &DeviceBuffer<bf16>,
        layout: &SeqLayout,
        shape: AttnShape,
        out: &mut DeviceBuffer<bf16>,
        lse: &mut DeviceBuffer<f32>,
    ) -> Result<&'static FwdVariant> {
        let mut trial = FwdTrial {
            gpu,
            q,
            k,
            v,
            layout,
            shape,
            out,
            lse,
        };
        let chosen = match fwd_variant_from_env()? {
            Some(f) => f,
            None => {
                let wgmma = super::nf4::wgmma_supported(gpu.compute_capability(), super::TARGETS);
                let cands = fwd_candidates(shape.head_dim, gpu.max_smem_optin()?, wgmma, self.mode);
                let key = || tune_key("fwd", &shape, layout.max_len());
                self.choose(gpu, key, &cands, |c| c.name, fwd_variant, &mut trial)?
            }
        };
        trial.run(chosen)?;
        Ok(chosen)
    }

    /// The backward on the variant `PALIGN_ATTN_BWD` forces, else the measured fastest
    /// for this shape. Returns the variant that wrote `grads`.
    pub fn backward(
        &self,
        gpu: &Gpu,
        x: AttnGradInputs<'_>,
        layout: &SeqLayout,
        shape: AttnShape,
        grads: AttnGrads<'_>,
    ) -> Result<&'static BwdConfig> {
        let mut trial = BwdTrial {
            gpu,
            x,
            layout,
            shape,
            grads,
        };
        let chosen = match bwd_variant_from_env()? {
            Some(f) => f,
            None => {
                let wgmma = super::nf4::wgmma_supported(gpu.compute_capability(), super::TARGETS);
                let cands = bwd_candidates(shape.head_dim, gpu.max_smem_optin()?, wgmma, self.mode);
                if cands.is_empty() {
                    return Err(bad(format!(
                        "attention backward: no kernel for head_dim {} fits this GPU's shared memory",
                        shape.head_dim
                    )));
                }
                let key = || tune_key("bwd", &shape, layout.max_len());
                self.choose(gpu, key, &cands, |c| c.name, bwd_variant, &mut trial)?
            }
        };
        trial.run(chosen)?;
        Ok(chosen)
    }

    /// The candidate to run for `key`: the only one, the cached choice, or the winner
    /// of a measurement now (remembered and saved); the reference where nothing can be
    /// timed.
    fn choose<T: Copy>(
        &self,
        gpu: &Gpu,
        key: impl FnOnce() -> String,
        cands: &[T],
        name: impl Fn(T) -> &'static str,
        by_name: fn(&str) -> Result<T>,
        trial: &mut impl Trial<T>,
    ) -> Result<T> {
        let reference = cands[0];
        if cands.len() < 2 || !gpu.can_time_events() {
            return Ok(reference);
        }
        let key = key();
        let names: Vec<&str> = cands.iter().map(|&c| name(c)).collect();
        if let Some(n) = self.cached(&key, &names) {
            return by_name(&n);
        }
        Ok(match measure(cands, name, trial)? {
            Some(e) => {
                let c = by_name(&e.choice.0)?;
                self.remember(key, e);
                c
            }
            None => reference,
        })
    }
}

/// A forward's trial runs on the call's own buffers.
struct FwdTrial<'a, 'b> {
    gpu: &'a Gpu,
    q: &'a DeviceBuffer<bf16>,
    k: &'a DeviceBuffer<bf16>,
    v: &'a DeviceBuffer<bf16>,
    layout: &'a SeqLayout,
    shape: AttnShape,
    out: &'b mut DeviceBuffer<bf16>,
    lse: &'b mut DeviceBuffer<f32>,
}

impl Trial<&'static FwdVariant> for FwdTrial<'_, '_> {
    fn run(&mut self, c: &'static FwdVariant) -> Result<()> {
        let t = self;
        attention_forward_with(t.gpu, t.q, t.k, t.v, t.layout, t.shape, t.out, t.lse, c)
    }
    fn read(&mut self) -> Result<Vec<Output>> {
        let lse = Output {
            values: self.gpu.download(self.lse)?,
            width: 1,
            rtol: 1e-4,
            atol: 1e-3,
            gtol: 0.0,
        };
        let o = Output::heads(self.gpu.download(self.out)?, self.shape.head_dim);
        Ok(vec![o, lse])
    }
    fn time(&mut self, c: &'static FwdVariant) -> Result<Option<f64>> {
        let gpu = self.gpu;
        time_ms(gpu, || self.run(c))
    }
}

/// A backward's trial runs on the call's own gradient buffers.
struct BwdTrial<'a, 'b> {
    gpu: &'a Gpu,
    x: AttnGradInputs<'a>,
    layout: &'a SeqLayout,
    shape: AttnShape,
    grads: AttnGrads<'b>,
}

impl Trial<&'static BwdConfig> for BwdTrial<'_, '_> {
    fn run(&mut self, c: &'static BwdConfig) -> Result<()> {
        let g = AttnGrads {
            dq: &mut *self.grads.dq,
            dk: &mut *self.grads.dk,
            dv: &mut *self.grads.dv,
        };
        let variant = BwdVariant::Named(c);
        attention_backward_with(self.gpu, self.x, self.layout, self.shape, g, variant)
    }
    fn read(&mut self) -> Result<Vec<Output>> {
        let d = self.shape.head_dim;
        [&*self.grads.dq, &*self.grads.dk, &*self.grads.dv]
            .into_iter()
            .map(|b| Ok(Output::heads(self.gpu.download(b)?, d)))
            .collect()
    }
    fn time(&mut self, c: &'static BwdConfig) -> Result<Option<f64>> {
        let gpu = self.gpu;
        time_ms(gpu, || self.run(c))
    }
}

/// Milliseconds per call of `f` over a few timed calls (the caller has warmed it up);
/// None when the driver cannot time events.
fn time_ms(gpu: &Gpu, mut f: impl FnMut() -> Result<()>) -> Result<Option<f64>> {
    const REPS: usize = 3;
    let timer = gpu.timer()?;
    for _ in 0..REPS {
        f()?;
    }
    Ok(timer.elapsed_ms(gpu).ok().map(|t| t as f64 / REPS as f64))
}

/// The entry choosing the fastest timed candidate (None when none was timed).
pub fn fastest(ms: BTreeMap<String, f64>, rejected: Vec<String>) -> Option<TuneEntry<AttnChoice>> {
    let best = ms
        .iter()
        .min_by(|a, b| a.1.total_cmp(b.1))
        .map(|(name, _)| name.clone())?;
    let mut e = TuneEntry::new(AttnChoice(best), ms);
    e.rejected = rejected;
    Some(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(h: usize, hkv: usize, d: usize, window: Option<usize>) -> AttnShape {
        AttnShape {
            n_heads: h,
            n_kv_heads: hkv,
            head_dim: d,
            window,
        }
    }

    #[test]
    fn modes_parse_and_unknown_values_are_errors() {
        assert_eq!(TuneMode::parse(None).unwrap(), TuneMode::Verified);
        assert_eq!(TuneMode::parse(Some("")).unwrap(), TuneMode::Verified);
        assert_eq!(TuneMode::parse(Some("on")).unwrap(), TuneMode::Verified);
        assert_eq!(TuneMode::parse(Some("all")).unwrap(), TuneMode::All);
        assert_eq!(TuneMode::parse(Some("off")).unwrap(), TuneMode::Off);
        let e = TuneMode::parse(Some("fast")).unwrap_err().to_string();
        assert!(e.contains("PALIGN_ATTN_TUNE") && e.contains("fast"), "{e}");
    }

    #[test]
    fn keys_bucket_lengths_and_tell_windows_apart() {
        let s = shape(32, 8, 128, None);
        assert_eq!(tune_key("fwd", &s, 512), "fwd d128 h32/8 causal len<=512");
        assert_eq!(tune_key("fwd", &s, 300), tune_key("fwd", &s, 512));
        assert_ne!(tune_key("fwd", &s, 513), tune_key("fwd", &s, 512));
        assert_eq!(tune_key("fwd", &s, 1), tune_key("fwd", &s, 64));
        assert_ne!(tune_key("bwd", &s, 512), tune_key("fwd", &s, 512));
        // A window only counts where it cuts the sequence (Mistral's 4096 at 512 tokens
        // does not).
        let w = shape(32, 8, 128, Some(4096));
        assert_eq!(tune_key("fwd", &w, 512), tune_key("fwd", &s, 512));
        assert_ne!(tune_key("fwd", &w, 8192), tune_key("fwd", &s, 8192));
        assert_ne!(
            tune_key("fwd", &shape(32, 32, 128, None), 512),
            tune_key("fwd", &s, 512)
        );
    }

    const H100: usize = 227 * 1024;
    const RTX: usize = 99 * 1024;

    fn names<T>(v: &[&T], name: impl Fn(&T) -> &'static str) -> Vec<&'static str> {
        v.iter().map(|x| name(x)).collect()
    }

    #[test]
    fn candidates_start_with_the_reference_and_fit_the_gpu() {
        let fname = |v: &FwdVariant| v.name;
        let bname = |v: &BwdConfig| v.name;
        for d in [64, 128] {
            for max in [48 * 1024, RTX, 163 * 1024, H100] {
                for mode in [TuneMode::Off, TuneMode::Verified, TuneMode::All] {
                    let f = fwd_candidates(d, max, true, mode);
                    assert_eq!(f[0].name, FWD_VARIANTS[0].name);
                    assert!(f.iter().all(|v| v.smem(d) <= max.max(48 * 1024)));
                    let no_wgmma = fwd_candidates(d, max, false, mode);
                    assert!(no_wgmma.iter().all(|v| !v.wgmma));
                    assert_eq!(
                        names(&no_wgmma, fname),
                        names(&f, fname)
                            .into_iter()
                            .filter(|n| !n.starts_with("wg"))
                            .collect::<Vec<_>>()
                    );
                    let b = bwd_candidates(d, max, true, mode);
                    assert!(b.iter().all(|v| v.kernel(d).is_some() && v.smem(d) <= max));
                    if mode == TuneMode::Off {
                        assert_eq!(f.len(), 1);
                        assert!(b.len() <= 1);
                    }
                    if mode != TuneMode::All {
                        assert!(f
                            .iter()
                            .all(|v| v.verified || v.name == FWD_VARIANTS[0].name));
                        assert!(b.iter().skip(1).all(|v| v.verified));
                    }
                    let mut uniq = names(&b, bname);
                    uniq.dedup();
                    assert_eq!(uniq.len(), b.len(), "{uniq:?}");
                }
            }
        }
        // An H100 at d = 128: every variant fits, and all but the wgmma forwards have passed
        // their GPU parity tests (H200, 2026-11-28), so the default mode offers those.
        assert_eq!(
            bwd_candidates(128, H100, true, TuneMode::All).len(),
            BWD_VARIANTS.len()
        );
        assert_eq!(
            fwd_candidates(128, H100, true, TuneMode::All).len(),
            FWD_VARIANTS.len()
        );
        let verified_bwd: Vec<&str> = BWD_VARIANTS
            .iter()
            .filter(|v| v.verified)
            .map(|v| v.name)
            .collect();
        assert_eq!(
            names(&bwd_candidates(128, H100, true, TuneMode::Verified), bname),
            verified_bwd
        );
        assert!(bwd_candidates(128, 163 * 1024, false, TuneMode::All)
            .iter()
            .all(|v| !v.wgmma));
        let verified: Vec<&str> = FWD_VARIANTS
            .iter()
            .filter(|v| v.verified)
            .map(|v| v.name)
            .collect();
        assert_eq!(
            names(&fwd_candidates(128, H100, true, TuneMode::Verified), fname),
            verified
        );
        // An A100 (sm_80) never gets a wgmma forward, even under `all`.
        assert!(fwd_candidates(128, 163 * 1024, false, TuneMode::All)
            .iter()
            .all(|v| !v.wgmma));
        // A variant not yet checked on a GPU competes only under `all`.
        assert!(!wanted(TuneMode::Verified, false));
        assert!(wanted(TuneMode::All, false));
        assert!(wanted(TuneMode::Verified, true));
        // A 99 KB GPU at d = 128: the default backward does not fit; the small one is the
        // reference, and the rest are those marked as fitting there.
        let rtx = bwd_candidates(128, RTX, true, TuneMode::All);
        assert_eq!(rtx[0].name, "w4q64s1");
        assert!(rtx.iter().all(|v| v.sm86), "{:?}", names(&rtx, bname));
        // No backward at all below what the smallest kernel needs.
        assert!(bwd_candidates(128, 48 * 1024, true, TuneMode::All).is_empty());
    }

    fn out(values: Vec<f32>, width: usize) -> Output {
        Output {
            values,
            width,
            rtol: 2e-2,
            atol: 0.0,
            gtol: 1e-3,
        }
    }

    #[test]
    fn agreement_allows_rounding_and_catches_errors() {
        // Eight head vectors of 16 values; vector 5 is 100x smaller than the others.
        let want: Vec<f32> = (0..128)
            .map(|i| {
                let v = ((i * 37) % 101) as f32 / 25.0 - 2.0;
                if i / 16 == 5 {
                    v / 100.0
                } else {
                    v
                }
            })
            .collect();
        let w = out(want.clone(), 16);
        let max = max_finite(&want);
        // About 3 bf16 ulps everywhere, the small vector included: fine.
        let near: Vec<f32> = want.iter().map(|x| x * (1.0 + 3.0 / 256.0)).collect();
        assert!(agrees(&out(near, 16), &w));
        // One element off by 5% of the largest value: rejected.
        let mut one = want.clone();
        one[17] += 0.05 * max;
        assert!(!agrees(&out(one, 16), &w));
        // Errors confined to the small vector: 50% of its values, far below 2% of the
        // whole output's largest value, are still caught (the bound is per vector).
        let mut small = want.clone();
        for v in &mut small[80..96] {
            *v *= 1.5;
        }
        assert!(!agrees(&out(small.clone(), 16), &w));
        // ... which a whole-output bound would have let through.
        assert!(agrees(&out(small, 128), &out(want.clone(), 128)));
        // Garbage in an all-zero (padding) vector: rejected by the output-wide floor.
        let mut padded = want.clone();
        padded[32..48].fill(0.0);
        let mut junk = padded.clone();
        junk[40] = 0.01 * max;
        assert!(!agrees(&out(junk, 16), &out(padded.clone(), 16)));
        assert!(agrees(&out(padded.clone(), 16), &out(padded, 16)));
        // NaN where the reference has a number, or a length mismatch: rejected; NaN and
        // ±inf where the reference has the same: fine.
        let mut nan = want.clone();
        nan[3] = f32::NAN;
        assert!(!agrees(&out(nan.clone(), 16), &w));
        assert!(agrees(&out(nan.clone(), 16), &out(nan, 16)));
        let mut inf = want.clone();
        inf[9] = f32::INFINITY;
        assert!(agrees(&out(inf.clone(), 16), &out(inf.clone(), 16)));
        assert!(!agrees(&w, &out(inf, 16)));
        assert!(!agrees(&out(want[1..].to_vec(), 16), &w));
        // Log-sum-exps: an absolute floor per value.
        let lse = |v: f32| Output {
            values: vec![v],
            width: 1,
            rtol: 1e-4,
            atol: 1e-3,
            gtol: 0.0,
        };
        assert!(agrees(&lse(1e-3), &lse(0.0)));
        assert!(!agrees(&lse(2e-3), &lse(0.0)));
    }

    /// Candidates of a fake kernel family: what each one writes, how long it takes,
    /// whether its launch fails.
    struct Fake {
        outputs: Vec<Vec<f32>>,
        ms: Vec<Option<f64>>,
        fails: Vec<bool>,
        current: Option<usize>,
        runs: Vec<usize>,
    }

    impl Trial<usize> for Fake {
        fn run(&mut self, c: usize) -> Result<()> {
            self.runs.push(c);
            if self.fails[c] {
                self.current = None;
                return Err(bad(format!("candidate {c} failed to launch")));
            }
            self.current = Some(c);
            Ok(())
        }
        fn read(&mut self) -> Result<Vec<Output>> {
            let c = self.current.expect("read after a failed run");
            Ok(vec![out(self.outputs[c].clone(), 4)])
        }
        fn time(&mut self, c: usize) -> Result<Option<f64>> {
            assert_eq!(self.current, Some(c), "timed without a good run first");
            Ok(self.ms[c])
        }
    }

    const NAMES: [&str; 4] = ["ref", "fast_wrong", "fast", "broken"];

    fn fake() -> Fake {
        let good = vec![1.0, -2.0, 3.0, 0.5];
        Fake {
            outputs: vec![good.clone(), vec![1.0, -2.0, 3.0, 2.5], good.clone(), good],
            ms: vec![Some(2.0), Some(0.5), Some(1.0), Some(0.1)],
            fails: vec![false, false, false, true],
            current: None,
            runs: vec![],
        }
    }

    #[test]
    fn measurement_rejects_disagreeing_and_failing_candidates() {
        let mut f = fake();
        let e = measure(&[0, 1, 2, 3], |c| NAMES[c], &mut f)
            .unwrap()
            .unwrap();
        // The fastest agreeing candidate wins; the faster wrong one and the one that
        // fails are recorded as rejected, never timed.
        assert_eq!(e.choice.0, "fast");
        assert_eq!(e.rejected, ["fast_wrong", "broken"]);
        assert_eq!(e.ms.keys().collect::<Vec<_>>(), ["fast", "ref"]);
        // The reference ran first (for the outputs to compare with).
        assert_eq!(f.runs[0], 0);
        assert!(e.covers(&e.choice.0, &NAMES));

        // The reference failing is an error, not a rejection.
        let mut f = fake();
        f.fails[0] = true;
        assert!(measure(&[0, 2], |c| NAMES[c], &mut f).is_err());
        // No event timing: no entry (the caller runs the reference).
        let mut f = fake();
        f.ms[0] = None;
        assert!(measure(&[0, 2], |c| NAMES[c], &mut f).unwrap().is_none());
        // Every candidate but the reference rejected: the reference.
        let mut f = fake();
        let e = measure(&[0, 1, 3], |c| NAMES[c], &mut f).unwrap().unwrap();
        assert_eq!(e.choice.0, "ref");
    }

    #[test]
    fn the_fastest_timed_candidate_wins_and_rejections_are_kept() {
        let ms: BTreeMap<String, f64> =
            [("w4m1n64s1", 2.0), ("w4m2n64s2", 1.5), ("w8m1n64s2", 1.75)]
                .map(|(k, v)| (k.to_string(), v))
                .into();
        let e = fastest(ms.clone(), vec!["w4m2n64s1".into()]).unwrap();
        assert_eq!(e.choice.0, "w4m2n64s2");
        // It answers for today's candidates, a rejected one included, but not for a set
        // with a candidate it never saw.
        let all = ["w4m1n64s1", "w4m2n64s1", "w4m2n64s2", "w8m1n64s2"];
        assert!(e.covers(&e.choice.0, &all));
        assert!(!e.covers(&e.choice.0, &["w4m1n64s1", "w4m2n64s2", "new"]));
        // A winner that is no longer a candidate (PALIGN_ATTN_TUNE back to `on`) is not
        // used.
        assert!(!e.covers(&e.choice.0, &["w4m1n64s1"]));
        assert!(fastest(BTreeMap::new(), vec!["x".into()]).is_none());
    }

    #[test]
    fn the_cache_file_round_trips_and_names_its_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("attn-tune-test.json");
        let mut c: TuneCache<AttnChoice> = TuneCache::load(&path, "GPU A");
        assert!(c.is_empty());
        let ms: BTreeMap<String, f64> =
            [("w8q64s2".to_string(), 1.0), ("w4q64s1".to_string(), 1.25)].into();
        let e = fastest(ms, vec!["w8q64s2g".into()]).unwrap();
        let key = tune_key("bwd", &shape(32, 8, 128, None), 512);
        c.insert(key.clone(), e.clone());
        c.save().unwrap();
        let back: TuneCache<AttnChoice> = TuneCache::load(&path, "GPU A");
        assert_eq!(back.get(&key), Some(&e));
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v["format"], "palign-attn-tune");
        assert_eq!(v["entries"][&key]["choice"], "w8q64s2");
        assert_eq!(v["entries"][&key]["rejected"][0], "w8q64s2g");
        // Not another GPU's, and not the NF4 dispatcher's file format.
        assert!(TuneCache::<AttnChoice>::load(&path, "GPU B").is_empty());
        let nf4: super::super::nf4::DispatchCache = TuneCache::load(&path, "GPU A");
        assert!(nf4.is_empty());
        // The summary lists only what this process looked up, not the whole file.
        let tuner = AttnTuner::new(back, TuneMode::All);
        assert!(tuner.summary().is_empty());
        assert_eq!(
            tuner.cached(&key, &["w8q64s2", "w4q64s1"]).as_deref(),
            Some("w8q64s2")
        );
        assert_eq!(tuner.summary(), [format!("{key}: w8q64s2 (1.0000 ms)")]);
    }
}
