//! Counter-based dropout randomness, identical on both backends.
//!
//! A mask element is a pure function of (seed, step, call, element index), so the CUDA
//! kernel (`kernels/elementwise.cu`, `dropout_keep`) draws the same mask as the CPU
//! reference, and backward recomputes the mask instead of storing it. The mixer is
//! SplitMix64 (Steele, Lea and Flood, "Fast splittable pseudorandom number generators",
//! OOPSLA 2014; constants from that paper), applied to a per-call stream key plus the
//! element index. The uniform is the top 24 bits, so it is exact in f32 and in CUDA.

/// SplitMix64's finalizer over `z + golden gamma`.
pub fn splitmix64(z: u64) -> u64 {
    let mut z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The stream key of one dropout call: `call` counts the masks drawn within `step`.
pub fn dropout_stream(seed: u64, step: u64, call: u64) -> u64 {
    splitmix64(splitmix64(seed ^ splitmix64(step)) ^ call)
}

/// Uniform in [0, 1) with 24 random bits for element `i` of a stream.
pub fn uniform(stream: u64, i: u64) -> f32 {
    (splitmix64(stream.wrapping_add(i)) >> 40) as f32 * (1.0 / 16_777_216.0)
}

/// Whether element `i` is kept (dropped with probability `p`).
pub fn dropout_keep(stream: u64, i: u64, p: f32) -> bool {
    uniform(stream, i) >= p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_the_reference_sequence() {
        // The reference generator's state advances by the gamma and outputs the mix of
        // the new state; from state 0 its first outputs are these published values
        // (the SplitMix64 test vector used by e.g. the xoshiro authors' seeding code).
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
        assert_eq!(splitmix64(0x9E37_79B9_7F4A_7C15), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn keep_rate_is_close_to_one_minus_p() {
        for &p in &[0.05f32, 0.1, 0.5] {
            let s = dropout_stream(42, 3, 7);
            let n = 200_000u64;
            let kept = (0..n).filter(|&i| dropout_keep(s, i, p)).count() as f64 / n as f64;
            assert!(
                (kept - (1.0 - p as f64)).abs() < 0.005,
                "p {p}: kept {kept}"
            );
        }
    }

    #[test]
    fn streams_differ_by_seed_step_and_call() {
        let a = dropout_stream(1, 0, 0);
        assert_ne!(a, dropout_stream(2, 0, 0));
        assert_ne!(a, dropout_stream(1, 1, 0));
        assert_ne!(a, dropout_stream(1, 0, 1));
        assert!(uniform(a, 0) >= 0.0 && uniform(a, 0) < 1.0);
    }
}
