//! `tokenizer.json` through the `tokenizers` crate, with BOS/EOS from
//! `tokenizer_config.json` (transformers' `add_bos_token` rule: one BOS, never two).

use crate::error::{bad, Error, Result};
use serde_json::Value;
use std::path::Path;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    /// Whether encoding with special tokens puts BOS first (LLaMA/Mistral: yes).
    pub add_bos: bool,
}

/// `bos_token` may be a plain string or an AddedToken object `{"content": ...}`.
fn token_field(cfg: &Value, key: &str) -> Option<String> {
    match cfg.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` (+ `tokenizer_config.json` when present). The model's
    /// config ids fill in BOS/EOS the tokenizer files leave out.
    pub fn load(dir: &Path, cfg_bos: Option<u32>, cfg_eos: Option<u32>) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(bad(format!(
                "{}: tokenizer.json is missing (convert tokenizer.model with transformers first)",
                dir.display()
            )));
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| bad(format!("{}: cannot load: {e}", path.display())))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::read(&cfg_path, e))?;
            serde_json::from_str(&text)
                .map_err(|e| bad(format!("{}: not valid JSON: {e}", cfg_path.display())))?
        } else {
            Value::Null
        };
        let lookup = |key: &str| token_field(&cfg, key).and_then(|t| inner.token_to_id(&t));
        let bos_id = lookup("bos_token").or(cfg_bos);
        let eos_id = lookup("eos_token").or(cfg_eos);
        // Explicit `add_bos_token` wins; otherwise ask the post-processor what it adds.
        let add_bos = match cfg.get("add_bos_token").and_then(Value::as_bool) {
            Some(b) => b,
            None => match bos_id {
                Some(b) => inner
                    .encode("a", true)
                    .map(|e| e.get_ids().first() == Some(&b))
                    .unwrap_or(false),
                None => false,
            },
        };
        if add_bos && bos_id.is_none() {
            return Err(bad(format!(
                "{}: add_bos_token is set but no BOS token is defined",
                dir.display()
            )));
        }
        Ok(Tokenizer {
            inner,
            bos_id,
            eos_id,
            add_bos,
        })
    }

    pub fn from_parts(
        inner: tokenizers::Tokenizer,
        bos_id: Option<u32>,
        eos_id: Option<u32>,
        add_bos: bool,
    ) -> Self {
        Tokenizer {
            inner,
            bos_id,
            eos_id,
            add_bos,
        }
    }

    /// Ids of `text`; with `special`, BOS first (once, even if the text starts with it).
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| bad(format!("tokenizer: {e}")))?;
        let mut ids = enc.get_ids().to_vec();
        if special && self.add_bos {
            let b = self.bos_id.expect("checked at load");
            if ids.first() != Some(&b) {
                ids.insert(0, b);
            }
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| bad(format!("tokenizer: {e}")))
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, t: &str) -> Option<u32> {
        self.inner.token_to_id(t)
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
