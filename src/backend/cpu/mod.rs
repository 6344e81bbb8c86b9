//! CPU reference ops: f32 math, threaded with rayon, GEMM through the `gemm` crate.

pub mod alloc;
pub mod ops;
pub mod optim;
pub mod rng;
