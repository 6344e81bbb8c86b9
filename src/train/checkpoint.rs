//! `--out DIR/checkpoint/`: the adapter (PEFT format), AdamW moments
//! (`optimizer.safetensors`) and `state.json` (step, seeds, data position, settings).
//! Written as a new folder then swapped in by renames, so a kill at any moment leaves
//! either the previous checkpoint or the new one whole.

use super::Settings;
use crate::error::{bad, Error, Result};
use crate::lora::{peft, Adapter};
use crate::model::llama::PROJ_NAMES;
use crate::model::weights::{self, FloatDtype, TensorOut, Weights};
use crate::model::ModelConfig;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// AdamW state: first and second moments in the adapter's layout, and the step count.
#[derive(Debug)]
pub struct AdamState {
    pub m: Adapter,
    pub v: Adapter,
    pub step: u64,
}

impl AdamState {
    /// The state before the first step: zero moments where `adapter` lives.
    pub fn zeros(adapter: &Adapter) -> Result<AdamState> {
        Ok(AdamState {
            m: adapter.zeros_like()?,
            v: adapter.zeros_like()?,
            step: 0,
        })
    }
}

#[derive(Serialize, Deserialize, Debug)]
pub struct State {
    /// Optimizer steps done.
    pub step: usize,
    /// Training examples consumed (the data position; the order is a function of
    /// `data_seed` and the epoch, so this fixes where the next batch starts).
    pub samples_seen: usize,
    /// Dropout masks of step s are counter-based streams of (seed, s), so the RNG state is
    /// (seed, step) and needs nothing else stored.
    pub rng: String,
    pub settings: Settings,
}

pub fn dir(out: &Path) -> PathBuf {
    out.join("checkpoint")
}

fn old_dir(out: &Path) -> PathBuf {
    out.join("checkpoint.old")
}

fn moment_key(l: usize, p: usize, ab: &str, which: &str) -> String {
    format!("layers.{l}.{}.lora_{ab}.{which}", PROJ_NAMES[p])
}

pub fn save(out: &Path, adapter: &Adapter, opt: &AdamState, state: &State) -> Result<()> {
    let tmp = out.join(format!("checkpoint.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(|e| Error::write(&tmp, e))?;
    peft::save(adapter, &tmp, &state.settings.model)?;
    let mut t = Vec::new();
    for (which, ad) in [("exp_avg", &opt.m), ("exp_avg_sq", &opt.v)] {
        for (l, p, pair) in ad.pairs() {
            t.push(TensorOut::float(
                moment_key(l, p, "A", which),
                pair.a.shape.clone(),
                FloatDtype::F32,
                pair.a.cpu(),
            ));
            t.push(TensorOut::float(
                moment_key(l, p, "B", which),
                pair.b.shape.clone(),
                FloatDtype::F32,
                pair.b.cpu(),
            ));
        }
    }
    weights::write_file(&tmp.join("optimizer.safetensors"), &t)?;
    let json = serde_json::to_vec_pretty(state).expect("state serializes");
    crate::fsio::write_bytes_atomic(&tmp.join("state.json"), &json)?;
    // Swap: current → .old, tmp → current, drop .old.
    let (cur, old) = (dir(out), old_dir(out));
    let _ = std::fs::remove_dir_all(&old);
    if cur.exists() {
        std::fs::rename(&cur, &old).map_err(|e| Error::write(&cur, e))?;
    }
    std::fs::rename(&tmp, &cur).map_err(|e| Error::write(&cur, e))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// Removes what killed runs leave half-written: `checkpoint.tmp-*` folders and the
/// `.NAME.tmp-PID` files of interrupted atomic writes (`crate::fsio`).
pub fn remove_stale(out: &Path) {
    if let Ok(rd) = std::fs::read_dir(out) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("checkpoint.tmp-") {
                let _ = std::fs::remove_dir_all(e.path());
            } else if is_stale(&name) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Whether a name in `--out` is one [`remove_stale`] removes.
pub fn is_stale(name: &str) -> bool {
    name.starts_with("checkpoint.tmp-") || (name.starts_with('.') && name.contains(".tmp-"))
}

/// Whether `out` holds a checkpoint (possibly only the `.old` one of an interrupted swap).
pub fn exists(out: &Path) -> bool {
    dir(out).join("state.json").exists() || old_dir(out).join("state.json").exists()
}

pub fn load(out: &Path, model: &ModelConfig) -> Result<(Adapter, AdamState, State)> {
    let d = if dir(out).join("state.json").exists() {
        dir(out)
    } else {
        old_dir(out)
    };
    let text = std::fs::read_to_string(d.join("state.json"))
        .map_err(|e| Error::read(&d.join("state.json"), e))?;
    let state: State = serde_json::from_str(&text)
        .map_err(|e| bad(format!("{}: unreadable checkpoint state: {e}", d.display())))?;
    let adapter = peft::load(&d, model)?;
    let w = Weights::open_files(&[d.join("optimizer.safetensors")])?;
    let mut m = adapter.zeros_like()?;
    let mut v = adapter.zeros_like()?;
    for (which, ad) in [("exp_avg", &mut m), ("exp_avg_sq", &mut v)] {
        for (l, p, pair) in ad.pairs_mut() {
            let a = w.f32(&moment_key(l, p, "A", which), &pair.a.shape)?;
            pair.a.cpu_mut().copy_from_slice(&a);
            let b = w.f32(&moment_key(l, p, "B", which), &pair.b.shape)?;
            pair.b.cpu_mut().copy_from_slice(&b);
        }
    }
    let opt = AdamState {
        m,
        v,
        step: state.step as u64,
    };
    Ok((adapter, opt, state))
}
