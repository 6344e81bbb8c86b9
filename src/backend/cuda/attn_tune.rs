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

use std::collections::BTreeMap;
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
/// per block; the default (which needs no opt-in) first, as the reference.
pub fn fwd_candidates(d: usize, max_smem: usize, mode: TuneMode) -> Vec<&'static FwdVariant> {
    FWD_VARIANTS
        .iter()
        .enumerate()
        .filter(|(i, v)| {
            *i == 0 || (mode != TuneMode::Off && v.smem(d) <= max_smem && wanted(mode, v.verified))
        })
        .map(|(_, v)| v)
        .collect()
}

/// The backward variants that may run; the first is the reference: the default where it
/// fits (A100, H100), else the small kernel (99 KB GPUs).
pub fn bwd_candidates(d: usize, max_smem: usize, mode: TuneMode) -> Vec<&'static BwdConfig> {
    let fits = |v: &BwdConfig| v.kernel(d).is_some() && v.smem(d) <= max_smem;
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

/// Whether a candidate's output agrees with the reference's: no NaN where the reference
/// has none, and max |got − want| ≤ `rtol`·max |want| + `atol`. Variants differ only in
/// the order of f32 sums and where bf16 roundings fall, a few bf16 ulps of the largest
/// value; a wrong index or a race gives O(1) errors.
pub fn agrees(got: &[f32], want: &[f32], rtol: f32, atol: f32) -> bool {
    if got.len() != want.len() {
        return false;
    }
    let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let bound = rtol * scale + atol;
    got.iter()
        .zip(want)
        .all(|(g, w)| (w.is_nan() && g.is_nan()) || (g - w).abs() <= bound)
}

/// bf16 outputs agree to 2% of their largest value (about 5 ulps); f32 log-sum-exps to
/// 1e-3 plus 1e-4 relative.
const OUT_RTOL: f32 = 2e-2;

fn widen(v: Vec<bf16>) -> Vec<f32> {
    v.into_iter().map(|x| x.to_f32()).collect()
}

/// The measured choices of this process, backed by this GPU's cache file.
pub struct AttnTuner {
    cache: Mutex<TuneCache<AttnChoice>>,
    mode: TuneMode,
}

impl AttnTuner {
    pub fn new(cache: TuneCache<AttnChoice>, mode: TuneMode) -> AttnTuner {
        AttnTuner {
            cache: Mutex::new(cache),
            mode,
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
        e.covers(&e.choice.0, names).then(|| e.choice.0.clone())
    }

    fn remember(&self, key: String, entry: TuneEntry<AttnChoice>) {
        let mut c = self.lock();
        c.insert(key, entry);
        // Best effort: a read-only cache folder costs a re-measure in the next process.
        let _ = c.save();
    }

    /// Every cached choice as `key: variant (ms per call)` (the bench prints what it ran).
    pub fn summary(&self) -> Vec<String> {
        self.lock()
            .entries()
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
        let forced = std::env::var_os("PALIGN_ATTN_FWD").is_some_and(|v| !v.is_empty());
        let cands = fwd_candidates(shape.head_dim, gpu.max_smem_optin()?, self.mode);
        let chosen = if forced {
            fwd_variant_from_env()?
        } else if cands.len() < 2 {
            cands[0]
        } else {
            let key = tune_key("fwd", &shape, layout.max_len());
            let names: Vec<&str> = cands.iter().map(|c| c.name).collect();
            match self.cached(&key, &names) {
                Some(name) => fwd_variant(&name)?,
                None => {
                    let run = |c, out: &mut DeviceBuffer<bf16>, lse: &mut DeviceBuffer<f32>| {
                        attention_forward_with(gpu, q, k, v, layout, shape, out, lse, c)
                    };
                    // The first candidate's outputs are the reference.
                    run(cands[0], out, lse)?;
                    let (want_o, want_l) = (widen(gpu.download(out)?), gpu.download(lse)?);
                    let mut ms = BTreeMap::new();
                    let mut rejected = Vec::new();
                    for &c in &cands {
                        run(c, out, lse)?; // also the warm-up
                        if !(agrees(&widen(gpu.download(out)?), &want_o, OUT_RTOL, 0.0)
                            && agrees(&gpu.download(lse)?, &want_l, 1e-4, 1e-3))
                        {
                            rejected.push(c.name.to_string());
                            continue;
                        }
                        match time_ms(gpu, || run(c, out, lse))? {
                            Some(t) => ms.insert(c.name.to_string(), t),
                            None => break, // no event timing on this driver
                        };
                    }
                    match fastest(ms, rejected) {
                        Some(e) => {
                            let c = fwd_variant(&e.choice.0)?;
                            self.remember(key, e);
                            c
                        }
                        None => cands[0],
                    }
                }
            }
        };
        attention_forward_with(gpu, q, k, v, layout, shape, out, lse, chosen)?;
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
        let AttnGrads { dq, dk, dv } = grads;
        let cands = bwd_candidates(shape.head_dim, gpu.max_smem_optin()?, self.mode);
        let Some(&first) = cands.first() else {
            return Err(bad(format!(
                "attention backward: no kernel for head_dim {} fits this GPU's shared memory",
                shape.head_dim
            )));
        };
        let run = |c: &'static BwdConfig, dq: &mut _, dk: &mut _, dv: &mut _| {
            let g = AttnGrads { dq, dk, dv };
            attention_backward_with(gpu, x, layout, shape, g, BwdVariant::Named(c))
        };
        let chosen = if let Some(f) = bwd_variant_from_env()? {
            f
        } else if cands.len() < 2 {
            first
        } else {
            let key = tune_key("bwd", &shape, layout.max_len());
            let names: Vec<&str> = cands.iter().map(|c| c.name).collect();
            match self.cached(&key, &names) {
                Some(name) => bwd_variant(&name)?,
                None => {
                    let read = |dq: &DeviceBuffer<bf16>, dk: &_, dv: &_| -> Result<[Vec<f32>; 3]> {
                        Ok([
                            widen(gpu.download(dq)?),
                            widen(gpu.download(dk)?),
                            widen(gpu.download(dv)?),
                        ])
                    };
                    run(first, dq, dk, dv)?;
                    let want = read(dq, dk, dv)?;
                    let mut ms = BTreeMap::new();
                    let mut rejected = Vec::new();
                    for &c in &cands {
                        run(c, dq, dk, dv)?; // also the warm-up
                        let got = read(dq, dk, dv)?;
                        if !got
                            .iter()
                            .zip(&want)
                            .all(|(g, w)| agrees(g, w, OUT_RTOL, 0.0))
                        {
                            rejected.push(c.name.to_string());
                            continue;
                        }
                        match time_ms(gpu, || run(c, dq, dk, dv))? {
                            Some(t) => ms.insert(c.name.to_string(), t),
                            None => break,
                        };
                    }
                    match fastest(ms, rejected) {
                        Some(e) => {
                            let c = bwd_variant(&e.choice.0)?;
                            self.remember(key, e);
                            c
                        }
                        None => first,
                    }
                }
            }
        };
        run(chosen, dq, dk, dv)?;
        Ok(chosen)
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
                    let f = fwd_candidates(d, max, mode);
                    assert_eq!(f[0].name, FWD_VARIANTS[0].name);
                    assert!(f.iter().all(|v| v.smem(d) <= max.max(48 * 1024)));
                    let b = bwd_candidates(d, max, mode);
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
        // An H100 at d = 128: by default the two checked backward kernels compete; with
        // `all`, every variant.
        assert_eq!(
            names(&bwd_candidates(128, H100, TuneMode::Verified), bname),
            ["w8q64s2", "w4q64s1"]
        );
        assert_eq!(
            bwd_candidates(128, H100, TuneMode::All).len(),
            BWD_VARIANTS.len()
        );
        assert_eq!(
            fwd_candidates(128, H100, TuneMode::All).len(),
            FWD_VARIANTS.len()
        );
        assert_eq!(
            names(&fwd_candidates(128, H100, TuneMode::Verified), fname),
            ["w4m1n64s1"]
        );
        // A 99 KB GPU at d = 128: the default backward does not fit; the small one is the
        // reference, and the rest are those marked as fitting there.
        let rtx = bwd_candidates(128, RTX, TuneMode::All);
        assert_eq!(rtx[0].name, "w4q64s1");
        assert!(rtx.iter().all(|v| v.sm86), "{:?}", names(&rtx, bname));
        // No backward at all below what the smallest kernel needs.
        assert!(bwd_candidates(128, 48 * 1024, TuneMode::All).is_empty());
    }

    #[test]
    fn agreement_allows_rounding_and_catches_errors() {
        let want: Vec<f32> = (0..1000)
            .map(|i| ((i * 37) % 101) as f32 / 25.0 - 2.0)
            .collect();
        let max = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        // A few bf16 ulps everywhere: fine.
        let near: Vec<f32> = want.iter().map(|x| x * (1.0 + 8.0 / 256.0 * 0.1)).collect();
        assert!(agrees(&near, &want, OUT_RTOL, 0.0));
        // One element off by 5% of the largest value: rejected.
        let mut one = want.clone();
        one[617] += 0.05 * max;
        assert!(!agrees(&one, &want, OUT_RTOL, 0.0));
        // NaN where the reference has a number, or a length mismatch: rejected.
        let mut nan = want.clone();
        nan[3] = f32::NAN;
        assert!(!agrees(&nan, &want, OUT_RTOL, 0.0));
        assert!(agrees(&nan, &nan, OUT_RTOL, 0.0));
        assert!(!agrees(&want[1..], &want, OUT_RTOL, 0.0));
        // The absolute floor for values near 0 (log-sum-exps).
        assert!(agrees(&[1e-3], &[0.0], 0.0, 1e-3));
        assert!(!agrees(&[2e-3], &[0.0], 0.0, 1e-3));
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
        let tuner = AttnTuner::new(back, TuneMode::All);
        assert_eq!(tuner.summary(), [format!("{key}: w8q64s2 (1.0000 ms)")]);
    }
}
