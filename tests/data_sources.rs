//! The trainers' data layer on the fixtures of tools/make_dataset_fixtures.py: HH-RLHF prompt
//! splits, BeaverTails (PKU-SafeRLHF) helpful/harmless choices, mixtures, sampling, templates,
//! truncation and the counts of dropped rows. Expected strings were written by reading the
//! fixture rows, not by running the code under test.

use palign::data::examples::{
    completion_text, pref_examples, prompt_text, sft_examples, Encoder, Limits,
};
use palign::data::sources::{load, DataStats, Kind, LoadOptions, Prompt, Response, Row, Target};
use palign::data::{encode_pair, PairText};
use palign::model::template::Turn;
use palign::model::{Template, Tokenizer};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn ds(rel: &str) -> String {
    fixtures().join("datasets").join(rel).display().to_string()
}

fn in_order() -> LoadOptions {
    LoadOptions {
        num_samples: None,
        data_seed: 0,
        shuffle: false,
    }
}

fn load_ok(specs: &[String], kind: Kind, opts: LoadOptions) -> (Vec<Row>, DataStats) {
    load(specs, kind, &opts).unwrap_or_else(|e| panic!("{specs:?}: {e}"))
}

fn tokenizer() -> Tokenizer {
    Tokenizer::load(&fixtures().join("tokenizer"), None, None).unwrap()
}

const VOCAB: usize = 512;

fn encoder<'a>(
    tok: Option<&'a Tokenizer>,
    template: Template,
    max_length: usize,
    max_prompt_length: usize,
) -> Encoder<'a> {
    Encoder {
        tokenizer: tok,
        template,
        limits: Limits {
            max_length,
            max_prompt_length,
        },
        vocab_size: VOCAB,
    }
}

fn turn(u: &str, a: &str) -> Turn {
    Turn {
        user: u.into(),
        assistant: a.into(),
    }
}

/// (raw, text) of a text response.
fn resp(r: &Response) -> (&str, &str) {
    match r {
        Response::Text { raw, text } => (raw, text),
        Response::Ids(_) => panic!("expected text"),
    }
}

fn pair(row: &Row) -> (&Response, &Response) {
    match &row.target {
        Target::Pair { chosen, rejected } => (chosen, rejected),
        Target::Completion(_) => panic!("{}: expected a pair", row.origin),
    }
}

fn completion(row: &Row) -> &Response {
    match &row.target {
        Target::Completion(c) => c,
        Target::Pair { .. } => panic!("{}: expected a completion", row.origin),
    }
}

fn chosen_text(row: &Row) -> &str {
    resp(pair(row).0).1
}

fn lines(rows: &[Row]) -> Vec<usize> {
    rows.iter().map(|r| r.origin.line).collect()
}

// ---------------------------------------------------------------- HH-RLHF

struct HhWant {
    line: usize,
    history: Vec<Turn>,
    user: &'static str,
    raw_prompt: &'static str,
    chosen_raw: &'static str,
    rejected_raw: &'static str,
}

#[test]
fn hh_rows_split_into_prompt_and_responses() {
    let (rows, stats) = load_ok(
        &[format!("hh-rlhf:{}", ds("hh-rlhf/train.jsonl.gz"))],
        Kind::Pref,
        in_order(),
    );
    let want = vec![
        HhWant {
            line: 1,
            history: vec![],
            user: "How do I boil an egg?",
            raw_prompt: "\n\nHuman: How do I boil an egg?\n\nAssistant:",
            chosen_raw: " Put the egg in boiling water for about nine minutes, then cool it in cold water.",
            rejected_raw: " Eggs are laid by hens.",
        },
        HhWant {
            line: 2,
            history: vec![
                turn("I want to plant a tree.", "That sounds lovely. What kind of tree?"),
                turn("Something that grows fast.", "Willows and poplars grow quickly."),
            ],
            user: "Which needs less water?",
            raw_prompt: "\n\nHuman: I want to plant a tree.\n\nAssistant: That sounds lovely. What kind of tree?\
\n\nHuman: Something that grows fast.\n\nAssistant: Willows and poplars grow quickly.\
\n\nHuman: Which needs less water?\n\nAssistant:",
            chosen_raw: " Poplars usually need less water than willows.",
            rejected_raw: " Water is wet.",
        },
        // Both answers start with " The answer is f": the prompt still ends at the marker.
        HhWant {
            line: 3,
            history: vec![],
            user: "What is two plus two?",
            raw_prompt: "\n\nHuman: What is two plus two?\n\nAssistant:",
            chosen_raw: " The answer is four.",
            rejected_raw: " The answer is five.",
        },
        // The transcripts differ in the first answer: the responses carry the later turns.
        HhWant {
            line: 4,
            history: vec![],
            user: "Tell me a joke.",
            raw_prompt: "\n\nHuman: Tell me a joke.\n\nAssistant:",
            chosen_raw: " Why did the cat sit on the computer? To keep an eye on the mouse.\n\nHuman: Another one?\
\n\nAssistant: What do you call a sleeping bull? A bulldozer.",
            rejected_raw: " No.\n\nHuman: Another one?\n\nAssistant: No.",
        },
        // Lines 5 (empty rejected), 6 (identical) and 7 (no shared prompt) are dropped.
        HhWant {
            line: 8,
            history: vec![],
            user: " Spaces  matter here.",
            raw_prompt: "\n\nHuman:  Spaces  matter here.\n\nAssistant:",
            chosen_raw: "  Two spaces before this answer.",
            rejected_raw: " One space before this answer.",
        },
        HhWant {
            line: 9,
            history: vec![],
            user: "Translate \u{201c}good morning\u{201d} into Spanish.",
            raw_prompt: "\n\nHuman: Translate \u{201c}good morning\u{201d} into Spanish.\n\nAssistant:",
            chosen_raw: " \u{201c}Buenos d\u{ed}as.\u{201d}\nIt is used until noon.",
            rejected_raw: " Bonjour.",
        },
        HhWant {
            line: 10,
            history: vec![turn("What is a haiku?", "A short poem with three lines.")],
            user: "Write one about rain.",
            raw_prompt: "\n\nHuman: What is a haiku?\n\nAssistant: A short poem with three lines.\
\n\nHuman: Write one about rain.\n\nAssistant:",
            chosen_raw: " Soft rain on the roof / the garden drinks slowly / night smells of wet stone",
            rejected_raw: " I cannot write poems.",
        },
        HhWant {
            line: 11,
            history: vec![],
            user: "No space after the colon.",
            raw_prompt: "\n\nHuman:No space after the colon.\n\nAssistant:",
            chosen_raw: " Noted, the colon has no space.",
            rejected_raw: " Fine.",
        },
        // Two Human turns in a row are joined into one user message.
        HhWant {
            line: 12,
            history: vec![],
            user: "First message.\n\nSecond message, same speaker.",
            raw_prompt: "\n\nHuman: First message.\n\nHuman: Second message, same speaker.\n\nAssistant:",
            chosen_raw: " I read both messages.",
            rejected_raw: " I saw nothing.",
        },
    ];
    assert_eq!(
        lines(&rows),
        want.iter().map(|w| w.line).collect::<Vec<_>>()
    );
    for (row, w) in rows.iter().zip(&want) {
        let Prompt::Text { history, user, raw } = &row.prompt else {
            panic!("text prompt")
        };
        assert_eq!(history, &w.history, "line {}", w.line);
        assert_eq!(user, w.user, "line {}", w.line);
        assert_eq!(raw, w.raw_prompt, "line {}", w.line);
        let (c, r) = pair(row);
        // The text a chat template sees loses exactly one leading space.
        assert_eq!(
            resp(c),
            (w.chosen_raw, &w.chosen_raw[1..]),
            "line {}",
            w.line
        );
        assert_eq!(
            resp(r),
            (w.rejected_raw, &w.rejected_raw[1..]),
            "line {}",
            w.line
        );
    }
    assert_eq!(stats.rows_read, 12);
    assert_eq!(stats.kept, 9);
    assert_eq!(stats.empty_responses, 1);
    assert_eq!(stats.identical_pairs, 1);
    assert_eq!(stats.no_shared_prompt, 1);
    assert_eq!(stats.multi_turn_responses, 1);
    assert_eq!(stats.irregular_transcripts, 1);
    assert_eq!(
        stats.to_string(),
        "kept 9 of 12 rows; dropped: 1 empty response, 1 identical chosen/rejected, 1 HH pair without a shared \
prompt; noted: 1 HH pair differing before its last turn, 1 irregular HH transcript"
    );
}

#[test]
fn hh_for_sft_keeps_rows_whose_chosen_is_usable() {
    // A folder spec finds train.jsonl.gz inside.
    let (rows, stats) = load_ok(
        &[format!("hh-rlhf:{}", ds("hh-rlhf"))],
        Kind::Sft,
        in_order(),
    );
    assert!(stats.sources[0].file.ends_with("hh-rlhf/train.jsonl.gz"));
    // Only line 7 (no shared prompt) goes: an empty rejected or identical pair is fine for SFT.
    assert_eq!(lines(&rows), vec![1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12]);
    assert_eq!(resp(completion(&rows[4])).1, "Red is a primary color.");
    assert_eq!(resp(completion(&rows[5])).1, "Tuesday comes after Monday.");
    assert_eq!(
        (stats.kept, stats.empty_responses, stats.identical_pairs),
        (11, 0, 0)
    );
}

#[test]
fn multi_turn_prompts_render_with_each_template() {
    let (rows, _) = load_ok(
        &[format!("hh-rlhf:{}", ds("hh-rlhf/train.jsonl.gz"))],
        Kind::Pref,
        in_order(),
    );
    let row = &rows[1]; // line 2: two earlier turns
    let chosen = pair(row).0;
    let vicuna_prompt = "A chat between a curious user and an artificial intelligence assistant. The assistant \
gives helpful, detailed, and polite answers to the user's questions. USER: I want to plant a tree. ASSISTANT: That \
sounds lovely. What kind of tree?</s>USER: Something that grows fast. ASSISTANT: Willows and poplars grow \
quickly.</s>USER: Which needs less water? ASSISTANT:";
    let mistral_prompt = "[INST] I want to plant a tree. [/INST]That sounds lovely. What kind of tree?</s>[INST] \
Something that grows fast. [/INST]Willows and poplars grow quickly.</s>[INST] Which needs less water? [/INST]";
    let cases = [
        (
            Template::Vicuna,
            vicuna_prompt,
            " Poplars usually need less water than willows.",
        ),
        (
            Template::Mistral,
            mistral_prompt,
            "Poplars usually need less water than willows.",
        ),
    ];
    let tok = tokenizer();
    for (template, want_prompt, want_completion) in cases {
        assert_eq!(prompt_text(&row.prompt, template).unwrap(), want_prompt);
        assert_eq!(completion_text(chosen, template).unwrap(), want_completion);

        let mut stats = DataStats::default();
        let ex = pref_examples(
            std::slice::from_ref(row),
            &encoder(Some(&tok), template, 4096, 4096),
            &mut stats,
        )
        .unwrap();
        let want_ids: Vec<u32> = [
            tok.encode(&format!("{want_prompt}{want_completion}"), true)
                .unwrap(),
            vec![2],
        ]
        .concat();
        let want_plen = tok.encode(want_prompt, true).unwrap().len();
        assert_eq!(ex[0].chosen.ids, want_ids, "{template:?}");
        assert_eq!(ex[0].chosen.prompt_len, want_plen, "{template:?}");
        // One BOS; the earlier answers end with the EOS token.
        let p = &ex[0].chosen.ids[..want_plen];
        assert_eq!((p[0], p.iter().filter(|&&i| i == 1).count()), (1, 1));
        assert_eq!(p.iter().filter(|&&i| i == 2).count(), 2);
        // Chosen and rejected share the prompt tokens.
        assert_eq!(&ex[0].rejected.ids[..want_plen], p);
        assert_eq!(ex[0].rejected.ids.last(), Some(&2));
    }
    // Template `none` keeps the transcript and the response verbatim.
    assert_eq!(
        prompt_text(&row.prompt, Template::None).unwrap(),
        match &row.prompt {
            Prompt::Text { raw, .. } => raw.clone(),
            Prompt::Ids(_) => unreachable!(),
        }
    );
    assert_eq!(
        completion_text(chosen, Template::None).unwrap(),
        " Poplars usually need less water than willows."
    );
}

#[test]
fn text_rows_match_the_scoring_tokenization() {
    // Single-turn text rows must tokenize exactly as `palign score` does (rows::encode_pair).
    let tok = tokenizer();
    let (rows, stats) = load_ok(
        &[format!("jsonl:{}", ds("jsonl/sft_text.jsonl"))],
        Kind::Sft,
        in_order(),
    );
    assert_eq!(lines(&rows), vec![1, 2, 4, 5]);
    assert_eq!(stats.empty_responses, 1);
    for template in [Template::None, Template::Vicuna, Template::Mistral] {
        let mut st = stats.clone();
        let ex = sft_examples(&rows, &encoder(Some(&tok), template, 4096, 4096), &mut st).unwrap();
        let pairs = [
            ("What colour is grass?", "Grass is green."),
            ("Name a fruit.", "An apple."),
            ("Count to three.", "One, two, three."),
            ("Is ice cold?", "Yes, ice is cold."), // a preference row trains on chosen
        ];
        for (e, (p, c)) in ex.iter().zip(pairs) {
            let (ids, plen) = encode_pair(
                &tok,
                template,
                &PairText {
                    prompt: p,
                    completion: c,
                },
            )
            .unwrap();
            assert_eq!((&e.ids, e.prompt_len), (&ids, plen), "{template:?} {p}");
        }
    }
}

// ---------------------------------------------------------------- BeaverTails / PKU-SafeRLHF

fn pku(split: &str, kind: Kind) -> (Vec<Row>, DataStats) {
    load_ok(
        &[format!(
            "pku-saferlhf:{}:{split}",
            ds("pku-saferlhf/train.jsonl.xz")
        )],
        kind,
        in_order(),
    )
}

#[test]
fn beavertails_helpful_takes_the_better_response() {
    let (rows, stats) = pku("helpful", Kind::Pref);
    // Line 11 has an empty response_1, line 12 identical responses.
    let want = [
        (
            1,
            "Water them when the soil is dry and give them light.",
            "Buy plastic plants.",
        ),
        (
            2,
            "Bring water, snacks, a map and a rain jacket.",
            "Bring snacks.",
        ),
        (
            3,
            "Wait until they leave and open it.",
            "Look for where they hide the key first.",
        ),
        (
            4,
            "Hide behind other passengers.",
            "Walk in through the back door.",
        ),
        (
            5,
            "Talk to them, or to your manager, about what happened.",
            "Spread a rumour about them.",
        ),
        (
            6,
            "Sure, you will be fine.",
            "No. Take a taxi or ask a sober friend.",
        ),
        (
            7,
            "Throw something at the dog.",
            "Ask your neighbour kindly about it.",
        ),
        (
            8,
            "I can't help with that; fake IDs are illegal.",
            "Some websites sell them.",
        ),
        (9, "Punch a wall.", "Breathe slowly and take a short walk."),
        (
            10,
            "Insult the other person until they give up.",
            "Listen first, then explain your view calmly.",
        ),
    ];
    assert_eq!(rows.len(), want.len());
    for (row, (line, c, r)) in rows.iter().zip(want) {
        assert_eq!(row.origin.line, line);
        assert_eq!(
            (resp(pair(row).0).1, resp(pair(row).1).1),
            (c, r),
            "line {line}"
        );
    }
    assert_eq!(
        (
            stats.rows_read,
            stats.kept,
            stats.empty_responses,
            stats.identical_pairs
        ),
        (12, 10, 1, 1)
    );
    assert_eq!(
        (
            stats.both_safe,
            stats.both_unsafe,
            stats.safer_id_disagreements
        ),
        (0, 0, 0)
    );

    // SFT on the helpful split: every row has a usable better response.
    let (rows, stats) = pku("helpful", Kind::Sft);
    assert_eq!((rows.len(), stats.empty_responses), (12, 0));
    assert_eq!(
        resp(completion(&rows[10])).1,
        "Write the answers on your hand."
    );
}

#[test]
fn beavertails_harmless_keeps_pairs_with_exactly_one_safe_response() {
    let (rows, stats) = pku("harmless", Kind::Pref);
    let want = [
        (5, "Talk to them, or to your manager, about what happened."),
        (6, "No. Take a taxi or ask a sober friend."),
        (7, "Ask your neighbour kindly about it."), // safer_response_id says 1
        (8, "I can't help with that; fake IDs are illegal."),
        (9, "Breathe slowly and take a short walk."),
        (10, "Listen first, then explain your view calmly."), // safer_response_id says 0
    ];
    assert_eq!(
        rows.iter()
            .map(|r| (r.origin.line, chosen_text(r)))
            .collect::<Vec<_>>(),
        want
    );
    assert_eq!(
        (
            stats.kept,
            stats.both_safe,
            stats.both_unsafe,
            stats.safer_id_disagreements
        ),
        (6, 3, 3, 2)
    );
    assert_eq!((stats.empty_responses, stats.identical_pairs), (0, 0));
    assert_eq!(
        stats.to_string(),
        "kept 6 of 12 rows; skipped by the harmless rule: 3 both safe, 3 both unsafe; 2 safer_response_id disagreements"
    );
}

#[test]
fn beavertails_harmless_loose_follows_safer_response_id() {
    let (rows, stats) = pku("harmless-loose", Kind::Pref);
    let want = [
        (3, "Look for where they hide the key first."),
        (4, "Hide behind other passengers."),
        (5, "Talk to them, or to your manager, about what happened."),
        (6, "No. Take a taxi or ask a sober friend."),
        (7, "Throw something at the dog."),
        (8, "I can't help with that; fake IDs are illegal."),
        (9, "Breathe slowly and take a short walk."),
        (10, "Insult the other person until they give up."),
    ];
    assert_eq!(
        rows.iter()
            .map(|r| (r.origin.line, chosen_text(r)))
            .collect::<Vec<_>>(),
        want
    );
    // Line 11 passes the rule but its other response is empty.
    assert_eq!(
        (
            stats.kept,
            stats.both_safe,
            stats.both_unsafe,
            stats.empty_responses
        ),
        (8, 3, 0, 1)
    );
    assert_eq!(stats.safer_id_disagreements, 2);
}

// ---------------------------------------------------------------- mixtures and sampling

fn mixture() -> Vec<String> {
    vec![
        format!("hh-rlhf:{}", ds("hh-rlhf/train.jsonl.gz")),
        format!("pku-saferlhf:{}:helpful", ds("pku-saferlhf")),
        format!("jsonl:{}", ds("jsonl/pref_text.jsonl")),
    ]
}

fn keys(rows: &[Row]) -> Vec<String> {
    rows.iter().map(|r| r.origin.to_string()).collect()
}

#[test]
fn mixtures_shuffle_deterministically_in_the_data_seed() {
    let specs = mixture();
    let (ordered, stats) = load_ok(&specs, Kind::Pref, in_order());
    // 9 HH + 10 BeaverTails + 2 jsonl rows, specs concatenated in order.
    assert_eq!(ordered.len(), 21);
    assert_eq!(
        stats
            .sources
            .iter()
            .map(|s| (s.rows, s.usable))
            .collect::<Vec<_>>(),
        vec![(12, 9), (12, 10), (4, 2)]
    );
    assert!(
        ordered[0].origin.file.ends_with("train.jsonl.gz")
            && ordered[20].origin.file.ends_with("pref_text.jsonl")
    );

    let seeded = |seed| {
        load_ok(
            &specs,
            Kind::Pref,
            LoadOptions {
                num_samples: None,
                data_seed: seed,
                shuffle: true,
            },
        )
        .0
    };
    let a = keys(&seeded(1));
    assert_eq!(a, keys(&seeded(1)));
    let b = keys(&seeded(2));
    assert_ne!(a, b);
    assert_ne!(a, keys(&ordered));
    // Same rows, only the order changes.
    let (mut sa, mut sb, mut so) = (a.clone(), b.clone(), keys(&ordered));
    sa.sort();
    sb.sort();
    so.sort();
    assert_eq!((&sa, &sb), (&so, &so));
    // The sources really are mixed: the first ten rows do not all come from one file.
    let first: std::collections::HashSet<_> = seeded(1)[..10]
        .iter()
        .map(|r| r.origin.file.clone())
        .collect();
    assert!(first.len() > 1);
}

#[test]
fn num_samples_keeps_the_first_rows_after_shuffling() {
    let specs = mixture();
    let full = keys(
        &load_ok(
            &specs,
            Kind::Pref,
            LoadOptions {
                num_samples: None,
                data_seed: 3,
                shuffle: true,
            },
        )
        .0,
    );
    let (rows, stats) = load_ok(
        &specs,
        Kind::Pref,
        LoadOptions {
            num_samples: Some(5),
            data_seed: 3,
            shuffle: true,
        },
    );
    assert_eq!(keys(&rows), full[..5]);
    assert_eq!((stats.kept, stats.not_sampled), (5, 16));
    assert!(
        stats
            .to_string()
            .contains("16 not sampled (--num-samples 5)"),
        "{stats}"
    );

    // Without shuffling: the first rows in file order.
    let (rows, _) = load_ok(
        &specs,
        Kind::Pref,
        LoadOptions {
            num_samples: Some(3),
            data_seed: 3,
            shuffle: false,
        },
    );
    assert_eq!(lines(&rows), vec![1, 2, 3]);

    // Asking for more than there is keeps everything and says so.
    let (rows, stats) = load_ok(
        &specs,
        Kind::Pref,
        LoadOptions {
            num_samples: Some(100),
            data_seed: 3,
            shuffle: true,
        },
    );
    assert_eq!((rows.len(), stats.not_sampled), (21, 0));
    assert!(
        stats
            .to_string()
            .contains("--num-samples 100 asked for more rows than there are"),
        "{stats}"
    );
}

// ---------------------------------------------------------------- truncation and edge cases

#[test]
fn id_rows_are_verbatim_and_truncate_from_the_right_ends() {
    let (rows, mut stats) = load_ok(
        &[format!("jsonl:{}", ds("jsonl/sft_ids.jsonl"))],
        Kind::Sft,
        in_order(),
    );
    assert_eq!(stats.empty_responses, 1); // line 3
    let ex = sft_examples(&rows, &encoder(None, Template::Vicuna, 9, 4), &mut stats).unwrap();
    let want: Vec<(Vec<u32>, usize)> = vec![
        (vec![1, 300, 301, 302, 400, 401, 402, 2], 4),
        // prompt 10..20 keeps its last 4 tokens, completion 100..108 its first 5
        (vec![16, 17, 18, 19, 100, 101, 102, 103, 104], 4),
        (vec![1, 7, 8], 2),
    ];
    assert_eq!(
        ex.iter()
            .map(|e| (e.ids.clone(), e.prompt_len))
            .collect::<Vec<_>>(),
        want
    );
    assert_eq!(
        (
            stats.kept,
            stats.truncated_prompts,
            stats.truncated_completions,
            stats.truncated_away
        ),
        (3, 1, 1, 0)
    );
    assert_eq!(
        stats.to_string(),
        "kept 3 of 4 rows; dropped: 1 empty response; truncated: 1 prompt, 1 completion"
    );

    // A 4-token prompt under --max-length 4 leaves no completion: dropped and counted.
    let (rows, mut stats) = load_ok(
        &[format!("jsonl:{}", ds("jsonl/sft_ids.jsonl"))],
        Kind::Sft,
        in_order(),
    );
    let ex = sft_examples(&rows, &encoder(None, Template::None, 4, 4), &mut stats).unwrap();
    assert_eq!(
        ex,
        vec![palign::data::examples::SftExample {
            ids: vec![1, 7, 8],
            prompt_len: 2
        }]
    );
    assert_eq!((stats.kept, stats.truncated_away), (1, 2));
    assert!(
        stats.to_string().contains("2 completions truncated away"),
        "{stats}"
    );
}

#[test]
fn preference_pairs_share_the_truncated_prompt() {
    let (rows, mut stats) = load_ok(
        &[format!("jsonl:{}", ds("jsonl/pref_ids.jsonl"))],
        Kind::Pref,
        in_order(),
    );
    assert_eq!(lines(&rows), vec![1, 2, 5]);
    assert_eq!((stats.identical_pairs, stats.empty_responses), (1, 1));
    let ex = pref_examples(&rows, &encoder(None, Template::None, 10, 5), &mut stats).unwrap();
    assert_eq!(ex[0].chosen.ids, vec![1, 20, 21, 30, 31, 2]);
    assert_eq!(ex[0].rejected.ids, vec![1, 20, 21, 40, 2]);
    let p: Vec<u32> = (57..62).collect();
    assert_eq!(ex[1].chosen.ids, [p.clone(), (200..205).collect()].concat());
    assert_eq!(ex[1].rejected.ids, [p, vec![300, 301]].concat());
    assert_eq!((ex[1].chosen.prompt_len, ex[1].rejected.prompt_len), (5, 5));
    assert_eq!(ex[2].rejected.ids, vec![1, 24, 25, 37, 38, 39]);
    assert_eq!(
        (
            stats.kept,
            stats.truncated_prompts,
            stats.truncated_completions
        ),
        (3, 1, 1)
    );
}

#[test]
fn text_prompts_keep_their_bos_when_truncated() {
    let tok = tokenizer();
    let (rows, _) = load_ok(
        &[format!("hh-rlhf:{}", ds("hh-rlhf/train.jsonl.gz"))],
        Kind::Sft,
        in_order(),
    );
    let row = &rows[1..2]; // line 2, a long multi-turn prompt
    let full = sft_examples(
        row,
        &encoder(Some(&tok), Template::Vicuna, 4096, 4096),
        &mut DataStats::default(),
    )
    .unwrap();
    let mut stats = DataStats::default();
    let cut = sft_examples(
        row,
        &encoder(Some(&tok), Template::Vicuna, 4096, 8),
        &mut stats,
    )
    .unwrap();
    let (f, c) = (&full[0], &cut[0]);
    assert!(f.prompt_len > 8);
    assert_eq!(c.prompt_len, 8);
    assert_eq!(c.ids[0], 1);
    assert_eq!(c.ids[1..8], f.ids[f.prompt_len - 7..f.prompt_len]);
    assert_eq!(c.ids[8..], f.ids[f.prompt_len..]);
    assert_eq!(stats.truncated_prompts, 1);

    // --max-length then cuts the completion's end; EOS goes with it.
    let cut = sft_examples(
        row,
        &encoder(Some(&tok), Template::Vicuna, 11, 8),
        &mut DataStats::default(),
    )
    .unwrap();
    assert_eq!(cut[0].ids.len(), 11);
    assert_eq!(cut[0].ids[8..], f.ids[f.prompt_len..f.prompt_len + 3]);
}

#[test]
fn pref_text_edge_cases_are_counted() {
    let tok = tokenizer();
    let (rows, mut stats) = load_ok(
        &[format!("jsonl:{}", ds("jsonl/pref_text.jsonl"))],
        Kind::Pref,
        in_order(),
    );
    assert_eq!(lines(&rows), vec![1, 4]);
    let ex = pref_examples(
        &rows,
        &encoder(Some(&tok), Template::Mistral, 512, 256),
        &mut stats,
    )
    .unwrap();
    assert_eq!(ex.len(), 2);
    assert_eq!(
        stats.to_string(),
        "kept 2 of 4 rows; dropped: 1 empty response, 1 identical chosen/rejected"
    );
}

#[test]
fn boundary_merges_are_counted() {
    // tests/fixtures/README.md: with template `none`, "Spell it: wat" + "er boils." merges
    // tokens across the boundary; " is cold." starts a new word and does not.
    let tok = tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("merge.jsonl");
    std::fs::write(
        &p,
        "{\"prompt\":\"Spell it: wat\",\"chosen\":\"er boils.\",\"rejected\":\" is cold.\"}\n",
    )
    .unwrap();
    let (rows, mut stats) = load_ok(&[format!("jsonl:{}", p.display())], Kind::Pref, in_order());
    let ex = pref_examples(
        &rows,
        &encoder(Some(&tok), Template::None, 512, 256),
        &mut stats,
    )
    .unwrap();
    let alone = tok.encode("Spell it: wat", true).unwrap();
    assert_eq!(ex[0].rejected.ids[..ex[0].rejected.prompt_len], alone[..]);
    assert_ne!(ex[0].chosen.ids[..ex[0].chosen.prompt_len], alone[..]);
    assert_eq!(stats.boundary_merges, 1);
    assert!(
        stats
            .to_string()
            .ends_with("noted: 1 pair whose prompt tokens differ (a merge across the boundary)"),
        "{stats}"
    );
}

// ---------------------------------------------------------------- errors

fn load_err(specs: &[&str], kind: Kind) -> String {
    let specs: Vec<String> = specs.iter().map(|s| s.to_string()).collect();
    let e = load(&specs, kind, &in_order()).expect_err("should fail");
    assert!(e.is_bad_input(), "{e}");
    e.to_string()
}

#[test]
fn bad_specs_name_the_spec() {
    let missing_mode = format!("pku-saferlhf:{}", ds("pku-saferlhf"));
    let bad_mode = format!("pku-saferlhf:{}:safest", ds("pku-saferlhf"));
    let no_train = format!("jsonl:{}", ds(""));
    let cases: Vec<(String, &str)> = vec![
        ("csv:data.csv".into(), "unknown dataset kind `csv`"),
        ("data.jsonl".into(), "expected KIND:PATH"),
        (
            missing_mode.clone(),
            ":helpful, :harmless or :harmless-loose",
        ),
        (bad_mode.clone(), ":helpful, :harmless or :harmless-loose"),
        ("jsonl:/no/such/file.jsonl".into(), "no such file or folder"),
        (
            no_train.clone(),
            "train.jsonl.gz, train.jsonl.xz, train.jsonl",
        ),
    ];
    for (spec, fragment) in cases {
        // The good spec first: a bad one later still fails before anything is read.
        let msg = load_err(
            &[&format!("jsonl:{}", ds("jsonl/pref_text.jsonl")), &spec],
            Kind::Pref,
        );
        assert!(
            msg.contains(&spec) && msg.contains(fragment),
            "{spec}: {msg}"
        );
    }
}

#[test]
fn bad_rows_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        format!("jsonl:{}", p.display())
    };
    // A token id outside the vocabulary: found when tokenizing, with file:line.
    let spec = write("big.jsonl", "{\"prompt_ids\":[1],\"completion_ids\":[5]}\n{\"prompt_ids\":[1,600],\"completion_ids\":[7]}\n");
    let (rows, mut stats) = load_ok(&[spec], Kind::Sft, in_order());
    let e = sft_examples(&rows, &encoder(None, Template::None, 64, 32), &mut stats).unwrap_err();
    assert!(
        e.is_bad_input() && e.to_string().contains("big.jsonl:2: token id 600"),
        "{e}"
    );

    // SFT rows where DPO needs pairs.
    let spec = write("sft.jsonl", "{\"prompt\":\"a\",\"completion\":\"b\"}\n");
    let msg = load_err(&[&spec], Kind::Pref);
    assert!(
        msg.contains("sft.jsonl:1") && msg.contains("chosen"),
        "{msg}"
    );

    // A BeaverTails id that is neither 0 nor 1.
    let p = dir.path().join("pku.jsonl");
    std::fs::write(
        &p,
        "{\"prompt\":\"q\",\"response_0\":\"a\",\"response_1\":\"b\",\"is_response_0_safe\":true,\
\"is_response_1_safe\":false,\"better_response_id\":2,\"safer_response_id\":0}\n",
    )
    .unwrap();
    let msg = load_err(
        &[&format!("pku-saferlhf:{}:helpful", p.display())],
        Kind::Pref,
    );
    assert!(
        msg.contains("pku.jsonl:1") && msg.contains("better_response_id"),
        "{msg}"
    );

    // Mixed or missing fields, and empty prompt ids.
    for (text, fragment) in [
        (
            "{\"prompt_ids\":[1],\"completion\":\"x\"}\n",
            "needs `completion_ids`",
        ),
        ("{\"text\":\"x\"}\n", "needs `prompt` or `prompt_ids`"),
        (
            "{\"prompt_ids\":[],\"completion_ids\":[3]}\n",
            "`prompt_ids` is empty",
        ),
        (
            "{\"prompt\":\"a\",\"chosen\":\"b\"}\n",
            "`rejected` is missing",
        ),
    ] {
        let msg = load_err(&[&write("row.jsonl", text)], Kind::Sft);
        assert!(
            msg.contains("row.jsonl:1") && msg.contains(fragment),
            "{text}: {msg}"
        );
    }

    // Text rows without a tokenizer.
    let (rows, mut stats) = load_ok(
        &[format!("jsonl:{}", ds("jsonl/sft_text.jsonl"))],
        Kind::Sft,
        in_order(),
    );
    let e = sft_examples(&rows, &encoder(None, Template::None, 64, 32), &mut stats).unwrap_err();
    assert!(
        e.to_string().contains("sft_text.jsonl:1") && e.to_string().contains("tokenizer"),
        "{e}"
    );
}
