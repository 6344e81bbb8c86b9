//! Hugging Face model directories: config, safetensors, tokenizer, chat templates and
//! the LLaMA/Mistral forward.

pub mod config;
pub mod generate;
pub mod kv_cache;
pub mod llama;
pub mod roberta;
pub mod template;
pub mod tiny;
pub mod tokenizer;
pub mod weights;

pub use config::{Arch, ModelConfig};
pub use llama::{Model, ScoreSeq};
pub use template::Template;
pub use tokenizer::Tokenizer;
