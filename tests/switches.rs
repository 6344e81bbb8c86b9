//! A PALIGN_* switch with a value it does not take is bad input: exit 2, one line naming
//! the variable, before the command writes anything.

use std::process::Command;

#[test]
fn a_bad_switch_value_exits_2_before_any_work() {
    for (var, value) in [
        ("PALIGN_FUSED_LORA", "yes"),
        ("PALIGN_SHARE_PREFIX", "no"),
        ("PALIGN_LOGPROB", "unfused"),
        ("PALIGN_DEVICE_ARGMAX", "2"),
    ] {
        let d = tempfile::tempdir().unwrap();
        let out_dir = d.path().join("tiny");
        let out = Command::new(env!("CARGO_BIN_EXE_palign"))
            .env(var, value)
            .args(["init-tiny", "--arch", "llama", "--out"])
            .arg(&out_dir)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(out.status.code(), Some(2), "{var}={value}: {stderr}");
        assert_eq!(lines.len(), 1, "{var}={value}: {stderr}");
        assert!(
            lines[0].contains(var) && lines[0].contains(value),
            "{stderr}"
        );
        assert!(
            !out_dir.exists(),
            "{var}={value} left {}",
            out_dir.display()
        );
    }
    // The values the switches take still work.
    let d = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_palign"))
        .env("PALIGN_FUSED_LORA", "off")
        .env("PALIGN_LOGPROB_GRAD", "backward")
        .args(["init-tiny", "--arch", "llama", "--out"])
        .arg(d.path().join("tiny"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
