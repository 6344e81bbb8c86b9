//! `palign demo`: the whole pipeline on the tiny model finishes and learns the
//! preference (held-out accuracy rises from chance), writing every promised file.

use std::process::Command;

#[test]
fn demo_runs_end_to_end_and_learns() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("demo");
    let o = Command::new(env!("CARGO_BIN_EXE_palign"))
        .env("PALIGN_DEVICE", "cpu")
        .args(["demo", "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for f in [
        "curves.png",
        "curves.svg",
        "report.txt",
        "sft/adapter_model.safetensors",
        "dpo/metrics.jsonl",
        "merged/config.json",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let acc = |name: &str| -> f64 {
        let line = stdout
            .lines()
            .find(|l| l.trim_start().starts_with(name))
            .unwrap_or_else(|| panic!("{name} row: {stdout}"));
        line.split("accuracy")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(acc("base") <= 0.7, "{stdout}");
    assert!(acc("+ DPO adapter") >= 0.85, "{stdout}");
    assert!(
        (acc("merged") - acc("+ DPO adapter")).abs() <= 0.05,
        "merging keeps the behaviour: {stdout}"
    );
    // a second run refuses to overwrite
    let o = Command::new(env!("CARGO_BIN_EXE_palign"))
        .env("PALIGN_DEVICE", "cpu")
        .args(["demo", "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
}
