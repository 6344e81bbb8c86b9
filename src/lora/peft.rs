//! PEFT's adapter folder: `adapter_config.json` + `adapter_model.safetensors` with keys
//! `base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}.weight`
//! (peft `docs/source/developer_guides/checkpoint.md`; the adapter name is stripped).
//! The config carries exactly the fields PEFT writes, since older PEFT rejects unknown keys.

use super::{proj_index, Adapter, LoraConfig, LoraPair};
use crate::error::{bad, Error, Result};
use crate::model::llama::PROJ_NAMES;
use crate::model::weights::{self, FloatDtype, TensorOut, Weights};
use crate::tensor::Tensor;
use serde_json::{json, Value};
use std::path::Path;

fn key(layer: usize, proj: &str, ab: &str) -> String {
    let block = if matches!(proj, "gate_proj" | "up_proj" | "down_proj") {
        "mlp"
    } else {
        "self_attn"
    };
    format!("base_model.model.model.layers.{layer}.{block}.{proj}.lora_{ab}.weight")
}

/// An f32 setting as the Python float it came from: 0.05, not the f32's exact
/// 0.05000000074505806.
fn py_float(x: f32) -> Value {
    json!(x.to_string().parse::<f64>().unwrap_or(x as f64))
}

/// adapter_config.json as PEFT writes it for a LoRA on a causal LM.
pub fn config_json(cfg: &LoraConfig, base_model: &str) -> Value {
    json!({
        "alpha_pattern": {},
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "lora_alpha": py_float(cfg.alpha),
        "lora_dropout": py_float(cfg.dropout),
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": cfg.r,
        "rank_pattern": {},
        "revision": null,
        "target_modules": cfg.targets,
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": cfg.use_rslora
    })
}

/// Writes the two adapter files into an existing folder (each atomically).
pub fn save(adapter: &Adapter, dir: &Path, base_model: &str) -> Result<()> {
    let mut tensors = Vec::new();
    for (l, p, pair) in adapter.pairs() {
        let name = PROJ_NAMES[p];
        tensors.push(TensorOut::float(
            key(l, name, "A"),
            pair.a.shape.clone(),
            FloatDtype::F32,
            pair.a.cpu(),
        ));
        tensors.push(TensorOut::float(
            key(l, name, "B"),
            pair.b.shape.clone(),
            FloatDtype::F32,
            pair.b.cpu(),
        ));
    }
    weights::write_file(&dir.join("adapter_model.safetensors"), &tensors)?;
    let text =
        serde_json::to_vec_pretty(&config_json(&adapter.cfg, base_model)).expect("json serializes");
    crate::fsio::write_bytes_atomic(&dir.join("adapter_config.json"), &text)
}

/// Reads the LoRA hyper-parameters of adapter_config.json.
pub fn load_config(dir: &Path) -> Result<LoraConfig> {
    let path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::read(&path, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| bad(format!("{}: not valid JSON: {e}", path.display())))?;
    let err = |m: String| bad(format!("{}: {m}", path.display()));
    match v.get("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        other => return Err(err(format!("peft_type must be \"LORA\", got {other:?}"))),
    }
    let r = v
        .get("r")
        .and_then(Value::as_u64)
        .filter(|&r| r > 0)
        .ok_or_else(|| err("`r` must be a positive integer".into()))? as usize;
    let alpha = v
        .get("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| err("`lora_alpha` is missing".into()))? as f32;
    let dropout = v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0) as f32;
    for (k, unsupported) in [("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out")] {
        if v.get(k).and_then(Value::as_bool) == Some(true) {
            return Err(err(format!("{unsupported} adapters are not supported")));
        }
    }
    for k in ["rank_pattern", "alpha_pattern"] {
        if v.get(k)
            .and_then(Value::as_object)
            .is_some_and(|o| !o.is_empty())
        {
            return Err(err(format!("per-module `{k}` is not supported")));
        }
    }
    if v.get("modules_to_save")
        .is_some_and(|m| !m.is_null() && m.as_array().is_none_or(|a| !a.is_empty()))
    {
        return Err(err(
            "`modules_to_save` (fully trained extra modules) is not supported".into(),
        ));
    }
    let targets = match v.get("target_modules") {
        Some(Value::Array(a)) => {
            let names: Vec<&str> = a.iter().filter_map(Value::as_str).collect();
            LoraConfig::parse_targets(&names.join(","))
                .map_err(|e| err(e.to_string().replace("--targets: ", "target_modules: ")))?
        }
        Some(Value::String(s)) if s == "all-linear" => {
            PROJ_NAMES.iter().map(|p| p.to_string()).collect()
        }
        _ => return Err(err("`target_modules` must be a list of module names".into())),
    };
    let cfg = LoraConfig {
        r,
        alpha,
        dropout,
        targets,
        use_rslora: v
            .get("use_rslora")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    };
    Ok(cfg)
}

/// Loads a PEFT adapter for a model with `num_layers` layers; shapes are checked by
/// `Adapter::check_fits` against the model.
pub fn load(dir: &Path, model: &crate::model::ModelConfig) -> Result<Adapter> {
    let cfg = load_config(dir)?;
    let file = dir.join("adapter_model.safetensors");
    if !file.exists() {
        return Err(bad(format!(
            "{}: adapter_model.safetensors is missing",
            dir.display()
        )));
    }
    let w = Weights::open_files(&[file])?;
    let mut layers: Vec<[Option<LoraPair>; 7]> =
        (0..model.num_layers).map(|_| Default::default()).collect();
    let mut found = 0;
    for name in w.names() {
        // base_model.model.model.layers.{l}.{block}.{proj}.lora_{A|B}[.default].weight
        let parts: Vec<&str> = name.split('.').collect();
        let ok = parts.len() >= 9 && parts[..4] == ["base_model", "model", "model", "layers"];
        let (l, proj) = match (
            ok,
            parts.get(4).and_then(|s| s.parse::<usize>().ok()),
            parts.get(6),
        ) {
            (true, Some(l), Some(p)) => (l, *p),
            _ => {
                return Err(bad(format!(
                    "{}: unexpected tensor `{name}`",
                    dir.display()
                )))
            }
        };
        let p = proj_index(proj).ok_or_else(|| {
            bad(format!(
                "{}: tensor `{name}` targets unsupported module `{proj}`",
                dir.display()
            ))
        })?;
        if l >= model.num_layers {
            return Err(bad(format!(
                "{}: tensor `{name}` is for layer {l}, the model has {}",
                dir.display(),
                model.num_layers
            )));
        }
        if parts[7] != "lora_A" && parts[7] != "lora_B" {
            continue;
        }
        if !cfg.targets.iter().any(|t| t == proj) {
            return Err(bad(format!(
                "{}: tensor `{name}` is not in target_modules",
                dir.display()
            )));
        }
        let e = w.get(name).expect("listed name");
        let v = weights::to_f32(w.bytes(e), e.dtype)
            .map_err(|m| bad(format!("{}: `{name}`: {m}", dir.display())))?;
        let t = Tensor::from_vec(v, &e.shape);
        let slot = layers[l][p].get_or_insert_with(|| LoraPair {
            a: Tensor::zeros(&[0]),
            b: Tensor::zeros(&[0]),
        });
        if parts[7] == "lora_A" {
            slot.a = t;
        } else {
            slot.b = t;
        }
        found += 1;
    }
    for (l, slots) in layers.iter().enumerate() {
        for (p, s) in slots.iter().enumerate() {
            if let Some(pair) = s {
                if pair.a.numel() == 0 || pair.b.numel() == 0 {
                    return Err(bad(format!(
                        "{}: layer {l} {} has only one of lora_A / lora_B",
                        dir.display(),
                        PROJ_NAMES[p]
                    )));
                }
                if pair.a.shape[0] != cfg.r {
                    return Err(bad(format!(
                        "{}: layer {l} {}: lora_A has rank {} but adapter_config.json says r = {}",
                        dir.display(),
                        PROJ_NAMES[p],
                        pair.a.shape[0],
                        cfg.r
                    )));
                }
            }
        }
    }
    if found == 0 {
        return Err(bad(format!(
            "{}: adapter_model.safetensors holds no LoRA tensors",
            dir.display()
        )));
    }
    let adapter = Adapter { cfg, layers };
    adapter
        .check_fits(model)
        .map_err(|e| bad(format!("{}: {e}", dir.display())))?;
    Ok(adapter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_then_load_round_trips() {
        let mc = crate::model::ModelConfig::from_json(crate::model::tiny::config_json(
            crate::model::Arch::Llama,
        ))
        .unwrap();
        let cfg = LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.05,
            targets: vec!["q_proj".into(), "up_proj".into()],
            use_rslora: false,
        };
        let mut a = Adapter::init(&mc, cfg, 1).unwrap();
        for (_, _, p) in a.pairs_mut() {
            p.b.cpu_mut()
                .iter_mut()
                .enumerate()
                .for_each(|(i, v)| *v = i as f32 * 0.01);
        }
        let d = tempfile::tempdir().unwrap();
        save(&a, d.path(), "tiny").unwrap();
        let b = load(d.path(), &mc).unwrap();
        assert_eq!(b.cfg, a.cfg);
        for ((l1, p1, x), (l2, p2, y)) in a.pairs().zip(b.pairs()) {
            assert_eq!((l1, p1), (l2, p2));
            assert_eq!(x.a.cpu(), y.a.cpu());
            assert_eq!(x.b.cpu(), y.b.cpu());
        }
        let v: Value = serde_json::from_str(
            &std::fs::read_to_string(d.path().join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(v.as_object().unwrap().len(), 17, "exactly PEFT's fields");
        // The decimal the user gave, as peft writes its Python float (not the f32's
        // 0.05000000074505806).
        assert_eq!(v["lora_dropout"], json!(0.05));
        // a rank that disagrees with the tensors is refused
        let mut v2 = v.clone();
        v2["r"] = json!(8);
        std::fs::write(d.path().join("adapter_config.json"), v2.to_string()).unwrap();
        let e = load(d.path(), &mc).unwrap_err().to_string();
        assert!(e.contains("rank 4") && e.contains("r = 8"), "{e}");
    }
}
