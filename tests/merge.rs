//! `palign merge` against mergekit 0.1.5 (tests/fixtures/merge, written by
//! tools/make_merge_fixtures.py): merged tensors equal mergekit's, the output scores like
//! transformers scores mergekit's merge, DARE's random drop behaves statistically, and bad
//! configs are exit-code-2 errors that name the culprit.

use palign::merge::params::{Scalar, Setting};
use palign::model::weights::{to_f32, write_file, FloatDtype, TensorOut, Weights};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fx() -> PathBuf {
    root().join("tests/fixtures")
}

fn run(args: &[&str]) -> Output {
    // Config paths are relative to the repository root, as mergekit read them.
    Command::new(env!("CARGO_BIN_EXE_palign"))
        .env("PALIGN_DEVICE", "cpu")
        .args(args)
        .current_dir(root())
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> Output {
    let o = run(args);
    assert!(
        o.status.success(),
        "palign {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// PERTURBED (see tools/make_merge_fixtures.py `perturb`): tiny-llama plus u·amp, with
/// u = (h>>8)/2^24 − 0.5, h = (i·2654435761 + j·40503) mod 2^32 for element i of the j-th
/// tensor in name order, amp 0.2 for matrices and 0.02 for vectors; each step one f32 op.
fn perturbed() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        let src = fx().join("tiny-llama");
        for f in std::fs::read_dir(&src).unwrap() {
            let f = f.unwrap();
            if f.file_name() != "model.safetensors" {
                std::fs::copy(f.path(), d.path().join(f.file_name())).unwrap();
            }
        }
        let w = Weights::open_dir(&src).unwrap();
        let mut names: Vec<&String> = w.names().collect();
        names.sort();
        let mut out = Vec::new();
        for (j, name) in names.iter().enumerate() {
            let e = w.get(name).unwrap();
            let x = to_f32(w.bytes(e), e.dtype).unwrap();
            let amp: f32 = if e.shape.len() == 2 { 0.2 } else { 0.02 };
            let y: Vec<f32> = x
                .iter()
                .enumerate()
                .map(|(i, &v)| {
                    let h = (i as u64 * 2654435761 + j as u64 * 40503) & 0xFFFF_FFFF;
                    let u = (h >> 8) as f32 / 16777216.0 - 0.5;
                    v + u * amp
                })
                .collect();
            out.push(TensorOut::float(
                name.as_str(),
                e.shape.clone(),
                FloatDtype::F32,
                &y,
            ));
        }
        write_file(&d.path().join("model.safetensors"), &out).unwrap();
        d
    })
    .path()
}

/// Writes `yaml` (with `@P@` = PERTURBED) to a temp folder and runs `palign merge` on it.
fn merge_yaml(yaml: &str, extra: &[&str]) -> (tempfile::TempDir, Output) {
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("merge.yaml");
    std::fs::write(&cfg, yaml.replace("@P@", perturbed().to_str().unwrap())).unwrap();
    let out = d.path().join("out");
    let mut args = vec![
        "merge",
        "--quiet",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    let o = run(&args);
    (d, o)
}

fn merge_ok(yaml: &str, extra: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let (d, o) = merge_yaml(yaml, extra);
    assert!(
        o.status.success(),
        "merge failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = d.path().join("out");
    (d, out)
}

fn config(name: &str) -> String {
    std::fs::read_to_string(fx().join(format!("merge/configs/{name}.yaml"))).unwrap()
}

fn read(w: &Weights, name: &str) -> (Vec<f32>, Vec<usize>) {
    let e = w.get(name).unwrap_or_else(|| panic!("no tensor {name}"));
    (to_f32(w.bytes(e), e.dtype).unwrap(), e.shape.clone())
}

/// Compares palign's merge of configs/NAME.yaml with mergekit's stored tensors; returns the
/// largest per-tensor max|Δ|/max|expected|. bf16 outputs may differ by one bf16 ulp where
/// the f32 value sits on a rounding boundary.
fn check_against_mergekit(name: &str) -> f32 {
    let (_d, out) = merge_ok(&config(name), &[]);
    let got = Weights::open_dir(&out).unwrap();
    let exp =
        Weights::open_files(&[fx().join(format!("merge/expected/{name}.safetensors"))]).unwrap();
    let mut worst = 0f32;
    let mut ulps = 0;
    let mut names: Vec<&String> = exp.names().collect();
    names.sort();
    for key in names {
        let (e, eshape) = read(&exp, key);
        let (tensor, rows) = match key.strip_suffix(']').and_then(|k| k.split_once("[:")) {
            Some((t, r)) => (t, Some(r.parse::<usize>().unwrap())),
            None => (key.as_str(), None),
        };
        let (mut g, gshape) = read(&got, tensor);
        if let Some(r) = rows {
            g.truncate(r * gshape[1]);
        } else {
            assert_eq!(gshape, eshape, "{name}: {tensor} shape");
        }
        assert_eq!(
            got.get(tensor).unwrap().dtype,
            exp.get(key).unwrap().dtype,
            "{name}: {tensor} dtype"
        );
        let scale = e.iter().fold(0f32, |m, x| m.max(x.abs()));
        let bf16 = exp.get(key).unwrap().dtype == safetensors::Dtype::BF16;
        let mut max = 0f32;
        let mut off_by_ulp = 0;
        for (a, b) in g.iter().zip(&e) {
            let d = (a - b).abs();
            if bf16 && d > 0.0 {
                // one bf16 ulp at b: 2^(exponent(b) − 7)
                let ulp = f32::from_bits(b.abs().to_bits() & 0x7f80_0000) / 128.0;
                assert!(d <= ulp * 1.0001, "{name}: {tensor}: {a} vs {b}");
                off_by_ulp += 1;
                continue;
            }
            max = max.max(d);
        }
        let rel = max / scale;
        if bf16 {
            assert!(
                off_by_ulp * 100 <= e.len(),
                "{name}: {tensor}: {off_by_ulp} of {} bf16 values off by one ulp",
                e.len()
            );
        }
        assert!(rel <= 1e-6, "{name}: {tensor}: max rel diff {rel:e}");
        worst = worst.max(rel);
        ulps += off_by_ulp;
    }
    eprintln!("{name}: max rel diff vs mergekit {worst:e}, {ulps} bf16 values one ulp off");
    worst
}

/// Compares palign's merge of configs/NAME.yaml with mergekit's stored tensors bit for bit;
/// panics with the number of differing elements per tensor if any differ.
fn check_bits_against_mergekit(name: &str) {
    let (_d, out) = merge_ok(&config(name), &[]);
    let got = Weights::open_dir(&out).unwrap();
    let exp =
        Weights::open_files(&[fx().join(format!("merge/expected/{name}.safetensors"))]).unwrap();
    let mut names: Vec<&String> = exp.names().collect();
    names.sort();
    let (mut total, mut report) = (0, Vec::new());
    for key in names {
        let tensor = key.split_once("[:").map_or(key.as_str(), |(t, _)| t);
        let (e, g) = (exp.get(key).unwrap(), got.get(tensor).unwrap());
        assert_eq!(g.dtype, e.dtype, "{name}: {tensor} dtype");
        let (eb, gb) = (exp.bytes(e), got.bytes(g));
        let width = if e.dtype == safetensors::Dtype::F32 {
            4
        } else {
            2
        };
        let differ = eb
            .chunks(width)
            .zip(gb.chunks(width))
            .filter(|(a, b)| a != b)
            .count();
        total += eb.len() / width;
        if differ > 0 {
            report.push(format!("{key}: {differ} of {}", eb.len() / width));
        }
    }
    assert!(
        report.is_empty(),
        "{name}: elements that differ from mergekit:\n{}",
        report.join("\n")
    );
    eprintln!("{name}: all {total} stored elements equal mergekit's, bit for bit");
}

#[test]
fn slerp_scalar_t_matches_mergekit() {
    check_against_mergekit("slerp_scalar");
}

#[test]
fn slerp_anchor_lists_with_filters_match_mergekit() {
    check_against_mergekit("slerp_anchors");
}

#[test]
fn linear_matches_mergekit() {
    check_against_mergekit("linear");
}

#[test]
fn ties_two_models_matches_mergekit() {
    check_against_mergekit("ties");
}

#[test]
fn ties_three_models_int8_mask_lambda_matches_mergekit() {
    check_against_mergekit("ties3");
}

#[test]
fn dare_ties_at_density_one_matches_mergekit() {
    check_against_mergekit("dare_d1");
}

#[test]
fn sharded_tied_mistral_ties_matches_mergekit() {
    check_against_mergekit("mistral_ties");
}

#[test]
fn bf16_lora_cache_and_dtype_cast_match_mergekit() {
    check_against_mergekit("linear_bf16");
}

/// `dtype: bfloat16`: mergekit's ties rounds every op to bf16 (weights 0.3/0.7 included).
#[test]
fn ties_in_bf16_matches_mergekit_bit_for_bit() {
    check_bits_against_mergekit("ties_bf16");
}

/// bf16 with three models, the L1 rescale of the trim, no normalize and lambda 0.9.
#[test]
fn ties_in_bf16_with_rescale_and_lambda_matches_mergekit_bit_for_bit() {
    check_bits_against_mergekit("ties3_bf16");
}

/// The paper's dare_ties parameters in bf16 (density 1), written as f32 via `out_dtype`.
#[test]
fn dare_ties_in_bf16_matches_mergekit_bit_for_bit() {
    check_bits_against_mergekit("dare_bf16");
}

/// No `dtype`, bf16 inputs: the merge runs in their promoted dtype, bf16.
#[test]
fn ties_of_bf16_inputs_merges_in_bf16_like_mergekit() {
    check_bits_against_mergekit("ties_bf16_inputs");
}

/// The merged folder is a model palign scores like transformers scores mergekit's merge.
#[test]
fn merged_output_is_an_hf_folder_that_scores_like_mergekits() {
    let (d, out) = merge_ok(&config("ties3"), &[]);
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["dtype"], "float32");
    assert_eq!(cfg["num_hidden_layers"], 2);
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
    assert_eq!(meta.tensors().len(), 21);

    let scored = d.path().join("scores.jsonl");
    ok(&[
        "score",
        "--quiet",
        "--model",
        out.to_str().unwrap(),
        "--data",
        fx().join("data/score_ids.jsonl").to_str().unwrap(),
        "--out",
        scored.to_str().unwrap(),
    ]);
    let rows = |p: &Path| -> Vec<Value> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let got = rows(&scored);
    let want = rows(&fx().join("merge/expected/scores_ties3.jsonl"));
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        let (a, b) = (g["logp"].as_f64().unwrap(), w["logp"].as_f64().unwrap());
        assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
    }
}

#[test]
fn mistral_output_stays_tied() {
    let (_d, out) = merge_ok(&config("mistral_ties"), &[]);
    let w = Weights::open_dir(&out).unwrap();
    assert!(w.get("lm_head.weight").is_none());
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["tie_word_embeddings"], true);
    assert_eq!(cfg["sliding_window"], 8);
}

/// Slices stack layer ranges: [0,2] then [1,2] gives 3 layers, the last a copy of layer 1.
#[test]
fn slices_stack_layer_ranges() {
    let yaml = "merge_method: slerp
base_model: tests/fixtures/tiny-llama
slices:
  - sources:
      - {model: tests/fixtures/tiny-llama, layer_range: [0, 2]}
      - {model: \"@P@\", layer_range: [0, 2]}
  - sources:
      - {model: tests/fixtures/tiny-llama, layer_range: [1, 2]}
      - {model: \"@P@\", layer_range: [1, 2]}
parameters: {t: 0.0}
";
    let (_d, out) = merge_ok(yaml, &[]);
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["num_hidden_layers"], 3);
    let got = Weights::open_dir(&out).unwrap();
    let base = Weights::open_dir(&fx().join("tiny-llama")).unwrap();
    // t = 0 is the base, up to slerp's f32 rounding of sin(θ)/sin(θ).
    for (o, b) in [(0, 0), (1, 1), (2, 1)] {
        let name = |l| format!("model.layers.{l}.self_attn.q_proj.weight");
        let (g, _) = read(&got, &name(o));
        let (x, _) = read(&base, &name(b));
        let d = g
            .iter()
            .zip(&x)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(d < 1e-6, "out layer {o} vs base layer {b}: {d}");
    }
}

fn dare_yaml(density: f64, rescale: &str) -> String {
    format!(
        "merge_method: dare_ties
base_model: tests/fixtures/tiny-llama
models:
  - model: \"@P@\"
    parameters: {{weight: 1.0, density: {density}}}
parameters: {{rescale: {rescale}}}
"
    )
}

/// (kept fraction, Σ|out−base| / Σ|P−base|, per-entry out−base over P−base) for DARE with
/// one model of weight 1: every nonzero survivor wins its sign election, so out − base is
/// exactly the rescaled survivor.
fn dare_stats(out: &Path) -> (f64, f64, Vec<f64>) {
    let got = Weights::open_dir(out).unwrap();
    let base = Weights::open_dir(&fx().join("tiny-llama")).unwrap();
    let p = Weights::open_dir(perturbed()).unwrap();
    let (mut kept, mut total, mut l1_out, mut l1_in) = (0usize, 0usize, 0f64, 0f64);
    let mut ratios = Vec::new();
    let mut names: Vec<&String> = base.names().collect();
    names.sort();
    for name in names {
        let (g, _) = read(&got, name);
        let (b, _) = read(&base, name);
        let (x, _) = read(&p, name);
        for ((g, b), x) in g.iter().zip(&b).zip(&x) {
            let delta = (x - b) as f64;
            total += 1;
            l1_in += delta.abs();
            if g != b {
                kept += 1;
                let d = (g - b) as f64;
                l1_out += d.abs();
                if delta.abs() > 1e-3 {
                    ratios.push(d / delta);
                }
            }
        }
    }
    (kept as f64 / total as f64, l1_out / l1_in, ratios)
}

#[test]
fn dare_keeps_about_density_and_l1_rescale_preserves_the_l1_norm() {
    let (_d, out) = merge_ok(&dare_yaml(0.3, "true"), &["--seed", "7"]);
    let (frac, l1, ratios) = dare_stats(&out);
    // ~180k entries: the kept fraction's standard deviation is about 0.001.
    assert!((frac - 0.3).abs() < 0.01, "kept {frac}");
    assert!((l1 - 1.0).abs() < 1e-3, "L1 ratio {l1}");
    // Survivors are scaled, not reshuffled: per tensor one factor ≈ 1/density.
    let mean = ratios.iter().sum::<f64>() / ratios.len() as f64;
    assert!((mean - 1.0 / 0.3).abs() < 0.2, "mean scale {mean}");
}

#[test]
fn dare_inverse_density_and_no_rescale() {
    let (_d, out) = merge_ok(&dare_yaml(0.5, "density"), &[]);
    let (frac, l1, ratios) = dare_stats(&out);
    assert!((frac - 0.5).abs() < 0.01, "kept {frac}");
    // E[Σ|kept|/density] = Σ|δ|: holds statistically, not exactly.
    assert!((l1 - 1.0).abs() < 0.02, "L1 ratio {l1}");
    assert!(
        ratios.iter().all(|r| (r - 2.0).abs() < 1e-3),
        "not 1/density"
    );
    let (_d2, out) = merge_ok(&dare_yaml(0.5, "false"), &[]);
    let (_, l1, ratios) = dare_stats(&out);
    assert!((l1 - 0.5).abs() < 0.02, "L1 ratio {l1}");
    assert!(
        ratios.iter().all(|r| (r - 1.0).abs() < 1e-3),
        "survivors changed"
    );
}

#[test]
fn dare_seed_decides_the_drop() {
    let bytes = |seed: &str| {
        let (_d, out) = merge_ok(&dare_yaml(0.5, "true"), &["--seed", seed]);
        std::fs::read(out.join("model.safetensors")).unwrap()
    };
    let a = bytes("1");
    assert_eq!(a, bytes("1"), "same seed, different output");
    assert_ne!(a, bytes("2"), "different seeds, same output");
}

/// At density 1 nothing is dropped, so DARE-TIES is TIES without trimming, bit for bit.
#[test]
fn dare_at_density_one_is_ties_without_trim() {
    let yaml = |m: &str| {
        format!(
            "merge_method: {m}
base_model: tests/fixtures/tiny-llama
models:
  - model: tests/fixtures/tiny-llama+tests/fixtures/train/tiny-llama/init_adapter
    parameters: {{weight: 0.7, density: 1.0}}
  - model: \"@P@\"
    parameters: {{weight: 0.6, density: 1.0}}
parameters: {{normalize: true}}
"
        )
    };
    let (_a, x) = merge_ok(&yaml("dare_ties"), &["--seed", "3"]);
    let (_b, y) = merge_ok(&yaml("ties"), &[]);
    assert_eq!(
        std::fs::read(x.join("model.safetensors")).unwrap(),
        std::fs::read(y.join("model.safetensors")).unwrap()
    );
}

/// mergekit's evaluate_setting on gradients and filters, as stored by the fixture tool.
#[test]
fn parameter_gradients_and_filters_match_mergekit() {
    let cases: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(fx().join("merge/expected/params.json")).unwrap(),
    )
    .unwrap();
    assert!(cases.len() > 50);
    for c in &cases {
        // JSON is YAML: parse the setting as the config parser would see it.
        let yaml: serde_norway::Value =
            serde_norway::from_str(&c["setting"]["t"].to_string()).unwrap();
        let s = Setting::parse(&yaml, "t").unwrap();
        let got = s.evaluate(c["tensor"].as_str().unwrap(), c["t"].as_f64().unwrap());
        match (&got, c["value"].as_f64()) {
            (Some(Scalar::Num(g)), Some(w)) => assert!((g - w).abs() <= 1e-12, "{c}: {g}"),
            (None, None) => {}
            _ => panic!("{c}: got {got:?}"),
        }
    }
}

fn fails_with(yaml: &str, needles: &[&str]) {
    let (d, o) = merge_yaml(yaml, &[]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(2), "{yaml}\n{err}");
    for n in needles {
        assert!(err.contains(n), "{yaml}\nexpected `{n}` in: {err}");
    }
    assert!(!d.path().join("out").exists(), "a failed merge left output");
}

#[test]
fn bad_configs_are_exit_2_and_name_the_culprit() {
    let b = "tests/fixtures/tiny-llama";
    fails_with("merge_method: [slerp\n", &["not valid YAML"]);
    fails_with(
        &format!("merge_methd: slerp\nmodels: [{{model: {b}}}]\n"),
        &["merge_methd"],
    );
    fails_with(
        &format!("merge_method: model_stock\nmodels: [{{model: {b}}}]\n"),
        &["model_stock"],
    );
    fails_with(
        &format!("merge_method: ties\nbase_model: {b}\nmodels:\n  - model: {b}\n  - model: no/such/dir\n    parameters: {{weight: 1}}\n"),
        &["no/such/dir"],
    );
    fails_with(
        &format!("merge_method: ties\nbase_model: {b}\nmodels:\n  - model: \"@P@\"\n"),
        &["weight", "missing"],
    );
    fails_with(
        &format!(
            "merge_method: slerp\nbase_model: {b}\nmodels:\n  - model: {b}\n  - model: \"@P@\"\n"
        ),
        &["`t`"],
    );
    fails_with(
        &format!("merge_method: slerp\nbase_model: {b}\nmodels:\n  - model: {b}\n  - model: \"@P@\"\n  - model: {b}+tests/fixtures/train/tiny-llama/init_adapter\nparameters: {{t: 0.5}}\n"),
        &["exactly two"],
    );
    fails_with(
        &format!("merge_method: linear\nslices:\n  - sources:\n      - {{model: {b}, layer_range: [0, 3]}}\nparameters: {{weight: 1}}\n"),
        &["layer_range", "2 layers"],
    );
    fails_with(
        &format!("merge_method: ties\nbase_model: {b}\nmodels:\n  - model: \"@P@\"\n    parameters: {{weight: 1, densty: 0.5}}\n"),
        &["densty"],
    );
    fails_with(
        &format!("merge_method: linear\nmodels:\n  - model: {b}\n    parameters: {{weight: 1}}\n  - model: tests/fixtures/tiny-mistral\n    parameters: {{weight: 1}}\n"),
        &["tests/fixtures/tiny-mistral", "MistralForCausalLM"],
    );
}

#[test]
fn non_finite_and_out_of_range_parameters_are_refused() {
    let b = "tests/fixtures/tiny-llama";
    fails_with(
        &format!("merge_method: slerp\nbase_model: {b}\nmodels:\n  - model: {b}\n  - model: \"@P@\"\nparameters: {{t: .nan}}\n"),
        &["`t`", "finite"],
    );
    fails_with(
        &format!("merge_method: linear\nmodels:\n  - model: {b}\n    parameters: {{weight: .inf}}\n  - model: \"@P@\"\n    parameters: {{weight: 1}}\n"),
        &["`weight`", "finite"],
    );
    fails_with(
        &format!("merge_method: linear\nmodels:\n  - model: {b}\n    parameters: {{weight: 1.0e39}}\n  - model: \"@P@\"\n    parameters: {{weight: 1}}\n"),
        &["`weight`", "finite"],
    );
    fails_with(
        &format!("merge_method: linear\nmodels:\n  - model: {b}\n    parameters: {{weight: 0}}\n  - model: \"@P@\"\n    parameters: {{weight: 0}}\n"),
        &["sum to 0"],
    );
    for d in ["2", "-0.5"] {
        fails_with(
            &format!("merge_method: ties\nbase_model: {b}\nmodels:\n  - model: \"@P@\"\n    parameters: {{weight: 1, density: {d}}}\n"),
            &["`density`", "[0, 1]"],
        );
    }
}

/// A base whose projection disagrees with its own config.json: merge-adapter and a
/// `DIR+ADAPTER` merge refuse it (they fold by config dimensions), and so does a plain merge.
#[test]
fn a_base_that_disagrees_with_its_config_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let src = fx().join("tiny-llama");
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), d.path().join(f.file_name())).unwrap();
    }
    let cfg_path = d.path().join("config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let inter = cfg["intermediate_size"].as_u64().unwrap();
    cfg["intermediate_size"] = (inter - 8).into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let bad_base = d.path().to_str().unwrap();
    fails_with(
        &format!("merge_method: linear\nmodels:\n  - model: {bad_base}\n    parameters: {{weight: 1}}\n  - model: {b}\n    parameters: {{weight: 1}}\n", b = "tests/fixtures/tiny-llama"),
        &["mlp", "config.json implies", bad_base],
    );
    // An adapter that fits the (edited) config: the fixture's attention pairs only.
    let ad = tempfile::tempdir().unwrap();
    let src_ad = fx().join("train/tiny-llama/init_adapter");
    let aw = Weights::open_files(&[src_ad.join("adapter_model.safetensors")]).unwrap();
    let kept: Vec<TensorOut> = aw
        .names()
        .filter(|n| n.contains("self_attn"))
        .map(|n| {
            let (x, shape) = read(&aw, n);
            TensorOut::float(n.as_str(), shape, FloatDtype::F32, &x)
        })
        .collect();
    write_file(&ad.path().join("adapter_model.safetensors"), &kept).unwrap();
    let mut acfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src_ad.join("adapter_config.json")).unwrap())
            .unwrap();
    acfg["target_modules"] = serde_json::json!(["q_proj", "k_proj", "v_proj", "o_proj"]);
    std::fs::write(ad.path().join("adapter_config.json"), acfg.to_string()).unwrap();
    let out = d.path().join("folded");
    let o = run(&[
        "merge-adapter",
        "--model",
        bad_base,
        "--adapter",
        ad.path().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(
        err.lines().filter(|l| !l.trim().is_empty()).count(),
        1,
        "{err}"
    );
    assert!(
        err.contains("config.json implies") && !err.contains("panicked"),
        "{err}"
    );
    assert!(!out.exists());
}

/// Same architecture, different shapes: the message names the tensor and both models.
#[test]
fn shape_mismatch_names_the_tensor() {
    let d = tempfile::tempdir().unwrap();
    let src = fx().join("tiny-llama");
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), d.path().join(f.file_name())).unwrap();
    }
    // 2 KV heads instead of 4: k_proj and v_proj become [32, 64].
    let w = Weights::open_dir(&src).unwrap();
    let mut out = Vec::new();
    for name in w.names() {
        let (mut x, mut shape) = read(&w, name);
        if name.contains("k_proj") || name.contains("v_proj") {
            x.truncate(32 * 64);
            shape = vec![32, 64];
        }
        out.push(TensorOut::float(name.as_str(), shape, FloatDtype::F32, &x));
    }
    write_file(&d.path().join("model.safetensors"), &out).unwrap();
    let cfg_path = d.path().join("config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["num_key_value_heads"] = 2.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let other = d.path().to_str().unwrap();
    fails_with(
        &format!("merge_method: linear\nmodels:\n  - model: tests/fixtures/tiny-llama\n    parameters: {{weight: 1}}\n  - model: {other}\n    parameters: {{weight: 1}}\n"),
        &["model.layers.0.self_attn.k_proj.weight", "[32, 64]", other],
    );
}

/// A bitsandbytes 4-bit input is dequantized (mergekit cannot read these; palign can).
#[test]
fn nf4_inputs_are_dequantized() {
    let yaml = "merge_method: linear
models:
  - model: tests/fixtures/tiny-llama-bnb-4bit
    parameters: {weight: 2.0}
";
    let (_d, out) = merge_ok(yaml, &[]);
    let got = Weights::open_dir(&out).unwrap();
    let src = Weights::open_dir(&fx().join("tiny-llama-bnb-4bit")).unwrap();
    assert_eq!(got.names().count(), 21);
    for name in [
        "model.layers.1.mlp.down_proj.weight",
        "model.embed_tokens.weight",
    ] {
        let (want, shape) = palign::lora::fold::weight_f32(&src, name).unwrap();
        let (g, gshape) = read(&got, name);
        assert_eq!(gshape, shape);
        // 2·x / 2 is exact in f32
        assert_eq!(g, want, "{name}");
    }
}
