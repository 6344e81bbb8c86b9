//! palign: parameter-efficient preference alignment (LoRA/QLoRA, SFT + DPO) for
//! LLaMA/Mistral models, with a CPU reference backend and hand-written CUDA kernels.
//! See README.md for the map of modules.

pub mod backend;
pub mod commands;
pub mod data;
pub mod error;
pub mod eval;
pub mod fsio;
pub mod grid;
pub mod lora;
pub mod merge;
pub mod model;
pub mod ops;
pub mod packing;
pub mod plot;
pub mod quant;
pub mod switches;
pub mod tensor;
pub mod train;

pub use error::{Error, Result};
