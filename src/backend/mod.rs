//! Backends: `cpu` is the f32 reference for every op; `cuda` holds the device
//! runtime and kernel launchers. Model code calls ops that dispatch on storage.

pub mod cpu;
pub mod cuda;
