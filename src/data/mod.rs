//! Training and scoring data: JSONL rows (plain, .gz, .xz) and their tokenization with
//! the CLI.md rules (templates, one BOS, EOS after the completion).

pub mod examples;
pub mod jsonl;
pub mod rows;
pub mod sources;

pub use rows::{encode_pair, PairText};
