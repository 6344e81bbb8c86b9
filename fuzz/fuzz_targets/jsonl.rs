//! Dataset rows: `data::jsonl::read_objects`, `data::sources::load` with each dataset
//! kind, tokenization into SFT/DPO examples with the test tokenizer, and the HH-RLHF
//! transcript splitting on the raw text.
//!
//! Input: byte 0 picks the dataset kind (bits 0-2), SFT or DPO (bit 3), the template
//! (bits 4-5) and the file's compression (bits 6-7); byte 1 is `--max-length` - 2 and
//! byte 2 `--max-prompt-length` - 1; the rest is the file.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use palign::data::examples::{pref_examples, sft_examples, Encoder, Limits};
use palign::data::jsonl::read_objects;
use palign::data::sources::{hh_prompt_len, hh_turns, load, Kind, LoadOptions};
use palign::model::{Template, Tokenizer};
use std::sync::OnceLock;

fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        Tokenizer::load(&common::fixture("tokenizer"), None, None).expect("test tokenizer loads")
    })
}

/// The HH-RLHF helpers on arbitrary text: chosen and rejected split at the first NUL.
fn hh_text(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (chosen, rejected) = text.split_once('\0').unwrap_or((&text, &text));
    let _ = hh_turns(chosen);
    if let Some(end) = hh_prompt_len(chosen, rejected) {
        assert!(end <= chosen.len() && end <= rejected.len());
        assert_eq!(chosen.as_bytes()[..end], rejected.as_bytes()[..end]);
        assert!(chosen[..end].ends_with("\n\nAssistant:"));
        let _ = hh_turns(&chosen[..end]);
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let (head, body) = data.split_at(3);
    let (flags, max_len, max_prompt) = (head[0], head[1], head[2]);
    hh_text(body);

    let kind_text = match flags & 7 {
        1 => "hh-rlhf",
        2 => "pku-saferlhf",
        3 => "pku-saferlhf",
        4 => "pku-saferlhf",
        _ => "jsonl",
    };
    let split = match flags & 7 {
        2 => ":helpful",
        3 => ":harmless",
        4 => ":harmless-loose",
        _ => "",
    };
    let kind = if flags & 8 == 0 {
        Kind::Sft
    } else {
        Kind::Pref
    };
    let template = match (flags >> 4) & 3 {
        1 => Template::Vicuna,
        2 => Template::Mistral,
        _ => Template::None,
    };
    let ext = match flags >> 6 {
        1 => "jsonl.gz",
        2 => "jsonl.xz",
        _ => "jsonl",
    };

    let dir = common::fresh_dir("jsonl");
    let path = dir.join(format!("train.{ext}"));
    std::fs::write(&path, body).expect("write input");
    let _ = read_objects(&path);

    let spec = format!("{kind_text}:{}{split}", path.display());
    let opts = LoadOptions {
        num_samples: None,
        data_seed: 1,
        shuffle: true,
    };
    let Ok((rows, mut stats)) = load(&[spec], kind, &opts) else {
        return;
    };
    assert!(!rows.is_empty());
    let _ = stats.to_string();
    let tok = tokenizer();
    let enc = Encoder {
        tokenizer: Some(tok),
        template,
        limits: Limits {
            max_length: 2 + max_len as usize,
            max_prompt_length: 1 + max_prompt as usize,
        },
        vocab_size: tok.vocab_size(),
    };
    match kind {
        Kind::Sft => {
            if let Ok(ex) = sft_examples(&rows, &enc, &mut stats) {
                for e in &ex {
                    assert!(e.prompt_len >= 1 && e.prompt_len < e.ids.len());
                    assert!(e.ids.len() <= enc.limits.max_length);
                    assert!(e.prompt_len <= enc.limits.max_prompt_length);
                }
            }
        }
        Kind::Pref => {
            if let Ok(ex) = pref_examples(&rows, &enc, &mut stats) {
                for p in &ex {
                    for e in [&p.chosen, &p.rejected] {
                        assert!(e.prompt_len >= 1 && e.prompt_len < e.ids.len());
                        assert!(e.ids.len() <= enc.limits.max_length);
                        assert!(e.prompt_len <= enc.limits.max_prompt_length);
                    }
                }
            }
        }
    }
    let _ = stats.to_string();
});
