//! Chat templates of the paper's Appendix C and CLI.md. Rendering is plain text; the
//! tokenizer adds the single BOS. Vicuna is FastChat's `vicuna_v1.1` conversation
//! (system text, `USER:`/`ASSISTANT:`, earlier answers end with `</s>`); Mistral-Instruct
//! is `[INST] q [/INST]` with earlier answers followed by `</s>`.

use crate::error::{bad, Result};

pub const VICUNA_SYSTEM: &str =
    "A chat between a curious user and an artificial intelligence assistant. \
The assistant gives helpful, detailed, and polite answers to the user's questions.";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Template {
    None,
    Vicuna,
    Mistral,
}

/// One earlier exchange of a multi-turn prompt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Turn {
    pub user: String,
    pub assistant: String,
}

impl std::str::FromStr for Template {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Template::None),
            "vicuna" => Ok(Template::Vicuna),
            "mistral" => Ok(Template::Mistral),
            _ => Err(bad(format!(
                "--template: unknown template `{s}` (none, vicuna, mistral)"
            ))),
        }
    }
}

impl Template {
    pub fn name(self) -> &'static str {
        match self {
            Template::None => "none",
            Template::Vicuna => "vicuna",
            Template::Mistral => "mistral",
        }
    }

    /// `prompt_text` for a single-turn prompt.
    pub fn prompt(self, prompt: &str) -> String {
        self.prompt_with_history(&[], prompt)
    }

    /// `prompt_text` with earlier turns rendered before the final user message.
    pub fn prompt_with_history(self, history: &[Turn], prompt: &str) -> String {
        let mut s = String::new();
        match self {
            Template::None => {
                for t in history {
                    s.push_str(&t.user);
                    s.push_str(&t.assistant);
                }
                s.push_str(prompt);
            }
            Template::Vicuna => {
                s.push_str(VICUNA_SYSTEM);
                s.push(' ');
                for t in history {
                    s.push_str(&format!("USER: {} ASSISTANT: {}</s>", t.user, t.assistant));
                }
                s.push_str(&format!("USER: {prompt} ASSISTANT:"));
            }
            Template::Mistral => {
                for t in history {
                    s.push_str(&format!("[INST] {} [/INST]{}</s>", t.user, t.assistant));
                }
                s.push_str(&format!("[INST] {prompt} [/INST]"));
            }
        }
        s
    }

    /// `completion_text`: Vicuna puts one space after `ASSISTANT:`.
    pub fn completion(self, completion: &str) -> String {
        match self {
            Template::Vicuna => format!(" {completion}"),
            Template::None | Template::Mistral => completion.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_turn_matches_cli_contract() {
        assert_eq!(
            Template::Vicuna.prompt("Hi?"),
            "A chat between a curious user and an artificial intelligence assistant. The assistant gives \
helpful, detailed, and polite answers to the user's questions. USER: Hi? ASSISTANT:"
        );
        assert_eq!(Template::Vicuna.completion("Yes."), " Yes.");
        assert_eq!(Template::Mistral.prompt("Hi?"), "[INST] Hi? [/INST]");
        assert_eq!(Template::Mistral.completion("Yes."), "Yes.");
        assert_eq!(Template::None.prompt("Hi?"), "Hi?");
    }

    #[test]
    fn multi_turn_closes_earlier_answers_with_eos() {
        let h = [Turn {
            user: "a".into(),
            assistant: "b".into(),
        }];
        assert!(Template::Vicuna
            .prompt_with_history(&h, "c")
            .ends_with("questions. USER: a ASSISTANT: b</s>USER: c ASSISTANT:"));
        assert_eq!(
            Template::Mistral.prompt_with_history(&h, "c"),
            "[INST] a [/INST]b</s>[INST] c [/INST]"
        );
    }

    #[test]
    fn unknown_template_is_bad_input() {
        let e = "chatml".parse::<Template>().unwrap_err();
        assert!(e.is_bad_input() && e.to_string().contains("chatml"));
    }
}
