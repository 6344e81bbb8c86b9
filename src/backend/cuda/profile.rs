//! Per-kernel-family GPU time of a training step (`palign bench train`'s breakdown).
//!
//! While a profile is open, every device op of `tensor_ops` records an event before and
//! after its launches; [`finish`] waits once and sums the event intervals by family.
//! Off (the default), the cost is one uncontended mutex check per op.

use std::collections::BTreeMap;
use std::sync::Mutex;

use cudarc::driver::{sys, CudaEvent};

use super::device::{cuda_err, Gpu};
use crate::error::{Error, Result};

struct Open {
    spans: Vec<(&'static str, CudaEvent, CudaEvent)>,
}

static PROFILE: Mutex<Option<Open>> = Mutex::new(None);

fn lock() -> std::sync::MutexGuard<'static, Option<Open>> {
    PROFILE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Start collecting (drops an unfinished profile).
pub fn start() {
    *lock() = Some(Open { spans: Vec::new() });
}

fn event(gpu: &Gpu) -> Result<CudaEvent> {
    gpu.stream()
        .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(cuda_err("cuEventRecord"))
}

/// Runs `f`, charging its GPU time to `family` when a profile is open.
pub fn scope<R>(gpu: &Gpu, family: &'static str, f: impl FnOnce() -> Result<R>) -> Result<R> {
    if lock().is_none() {
        return f();
    }
    let a = event(gpu)?;
    let r = f()?;
    let b = event(gpu)?;
    if let Some(p) = lock().as_mut() {
        p.spans.push((family, a, b));
    }
    Ok(r)
}

/// Closes the profile: milliseconds per family (waits for the queued work).
pub fn finish(gpu: &Gpu) -> Result<BTreeMap<&'static str, f64>> {
    let Some(open) = lock().take() else {
        return Ok(BTreeMap::new());
    };
    if gpu.driver_version() < 12080 {
        return Err(Error::Cuda(
            "the kernel-family breakdown needs event timing (a CUDA 12.8+ driver)".into(),
        ));
    }
    gpu.synchronize()?;
    let mut out = BTreeMap::new();
    for (family, a, b) in open.spans {
        let ms = a.elapsed_ms(&b).map_err(cuda_err("cuEventElapsedTime"))? as f64;
        *out.entry(family).or_insert(0.0) += ms;
    }
    Ok(out)
}
