//! Allocator settings for the CPU backend.
//!
//! Every op returns a fresh output buffer, and a training step frees its activations
//! when it ends. With glibc's defaults (mallopt(3)), large buffers are mapped and
//! unmapped one by one, and free memory at the top of the heap goes back to the kernel
//! once it passes the trim threshold, so each step page-faults its activations in
//! again: about 10% of a CPU training step and 20% of a scoring call on the benches
//! (benches/RESULTS.md). Raising both limits keeps one step's memory for the next; the
//! process then stays at its peak resident size, as a training run does anyway.

/// Allocations up to this size come from the heap (glibc caps the setting at 32 MiB on
/// 64-bit). Setting it also turns off glibc's adaptive threshold.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: i32 = 32 << 20;
/// Free memory at the top of the heap that is kept rather than returned to the kernel.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: i32 = 1 << 30;

/// Applies the settings above; call once at start-up. glibc only (elsewhere a no-op).
/// Returns whether the allocator accepted them.
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; both values are in range.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        true
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn allocator_accepts_the_settings() {
        assert!(super::keep_freed_memory());
    }
}
