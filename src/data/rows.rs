//! Tokenizing a prompt/completion pair exactly as CLI.md fixes it: render with the
//! template, tokenize `prompt_text + completion_text` once (one BOS), take the prompt
//! length from `prompt_text` alone, append EOS after the completion.

use crate::error::{bad, Result};
use crate::model::{Template, Tokenizer};

/// A prompt and a completion as text, before the template.
#[derive(Clone, Debug)]
pub struct PairText<'a> {
    pub prompt: &'a str,
    pub completion: &'a str,
}

/// Ids of the whole sequence and the prompt length.
pub fn encode_pair(
    tok: &Tokenizer,
    template: Template,
    pair: &PairText,
) -> Result<(Vec<u32>, usize)> {
    let prompt_text = template.prompt(pair.prompt);
    let completion_text = template.completion(pair.completion);
    encode_rendered(tok, &prompt_text, &completion_text)
}

/// As `encode_pair`, for text already rendered.
pub fn encode_rendered(
    tok: &Tokenizer,
    prompt_text: &str,
    completion_text: &str,
) -> Result<(Vec<u32>, usize)> {
    let mut ids = tok.encode(&format!("{prompt_text}{completion_text}"), true)?;
    let prompt_len = tok.encode(prompt_text, true)?.len();
    let eos = tok
        .eos_id
        .ok_or_else(|| bad("the tokenizer defines no EOS token"))?;
    // The joint tokenization can merge across the boundary; never let the prompt
    // length run past the sequence.
    let prompt_len = prompt_len.min(ids.len());
    ids.push(eos);
    Ok((ids, prompt_len))
}
