//! The merge configuration: mergekit's YAML layout (mergekit 0.1.5 `config.py`,
//! `MergeConfiguration`), restricted to what palign implements. Unknown keys are errors, so
//! a typo never silently changes a merge.

use super::params::{key_text, kind, parse_params, Params};
use crate::error::{bad, Result};
use crate::model::weights::FloatDtype;
use serde_norway::{Mapping, Value};
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Slerp,
    Linear,
    Ties,
    DareTies,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Slerp => "slerp",
            Method::Linear => "linear",
            Method::Ties => "ties",
            Method::DareTies => "dare_ties",
        }
    }

    /// The parameters the method reads (mergekit's spec for it); any other name is an error.
    pub fn known_params(self) -> &'static [&'static str] {
        match self {
            Method::Slerp => &["t"],
            Method::Linear => &["weight", "normalize"],
            Method::Ties | Method::DareTies => &[
                "weight",
                "density",
                "normalize",
                "rescale",
                "lambda",
                "int8_mask",
            ],
        }
    }

    /// Whether the base model is an input with its own role (mergekit `BasePolicy.REQUIRED`).
    pub fn needs_base(self) -> bool {
        !matches!(self, Method::Linear)
    }
}

/// `DIR` or `DIR+ADAPTER_DIR` (mergekit's `ModelReference`): the text names the input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelRef {
    pub text: String,
    pub model: PathBuf,
    pub adapter: Option<PathBuf>,
}

impl ModelRef {
    pub fn parse(text: &str, at: &str) -> Result<ModelRef> {
        let parts: Vec<&str> = text.split('+').collect();
        let (model, adapter) = match parts.as_slice() {
            [m] => (*m, None),
            [m, a] => (*m, Some(*a)),
            _ => {
                return Err(bad(format!(
                    "{at}: `{text}`: write a model as DIR or DIR+ADAPTER_DIR (one `+`)"
                )))
            }
        };
        if model.is_empty() || adapter == Some("") {
            return Err(bad(format!("{at}: `{text}`: empty model or adapter path")));
        }
        Ok(ModelRef {
            text: text.to_string(),
            model: PathBuf::from(model),
            adapter: adapter.map(PathBuf::from),
        })
    }
}

/// One input of an output slice: a model and the layers taken from it.
#[derive(Clone, Debug)]
pub struct SourceDef {
    /// Index into `MergeConfig::models`.
    pub model: usize,
    /// `None` in the `models:` form: all of the model's layers.
    pub layer_range: Option<(usize, usize)>,
    pub params: Params,
}

#[derive(Clone, Debug)]
pub struct SliceDef {
    pub sources: Vec<SourceDef>,
    pub base: Option<usize>,
    pub params: Params,
}

#[derive(Clone, Debug)]
pub struct MergeConfig {
    pub method: Method,
    /// Every distinct model reference, in order of first mention.
    pub models: Vec<ModelRef>,
    pub base: Option<usize>,
    /// True for the `models:` form (one slice over all layers, base added if unlisted).
    pub models_form: bool,
    pub slices: Vec<SliceDef>,
    pub params: Params,
    /// Inputs are cast to this before merging (mergekit loads them so).
    pub dtype: Option<FloatDtype>,
    pub out_dtype: Option<FloatDtype>,
}

fn mapping<'a>(v: &'a Value, at: &str) -> Result<&'a Mapping> {
    v.as_mapping()
        .ok_or_else(|| bad(format!("{at}: expected a mapping, got {}", kind(v))))
}

fn string(v: &Value, at: &str) -> Result<String> {
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| bad(format!("{at}: expected a string, got {}", kind(v))))
}

fn check_keys(m: &Mapping, allowed: &[&str], at: &str) -> Result<()> {
    for k in m.keys() {
        let name = key_text(k);
        if !allowed.contains(&name.as_str()) {
            return Err(bad(format!(
                "{at}: unknown key `{name}` (palign reads: {})",
                allowed.join(", ")
            )));
        }
    }
    Ok(())
}

fn dtype_of(v: &Value, at: &str) -> Result<Option<FloatDtype>> {
    if v.is_null() {
        return Ok(None);
    }
    let s = string(v, at)?;
    let name = s.strip_prefix("torch.").unwrap_or(&s);
    FloatDtype::from_torch_name(name).map(Some).ok_or_else(|| {
        bad(format!(
            "{at}: unknown dtype `{s}` (bfloat16, float16, float32)"
        ))
    })
}

struct Parser {
    models: Vec<ModelRef>,
}

impl Parser {
    fn model(&mut self, v: &Value, at: &str) -> Result<usize> {
        let text = string(v, at)?;
        if let Some(i) = self.models.iter().position(|m| m.text == text) {
            return Ok(i);
        }
        self.models.push(ModelRef::parse(&text, at)?);
        Ok(self.models.len() - 1)
    }

    fn layer_range(v: &Value, at: &str) -> Result<(usize, usize)> {
        let items = v
            .as_sequence()
            .filter(|s| s.len() == 2)
            .ok_or_else(|| bad(format!("{at}: expected [start, end] (two layer indices)")))?;
        let num = |x: &Value| {
            x.as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| bad(format!("{at}: layer indices must be non-negative integers")))
        };
        let (a, b) = (num(&items[0])?, num(&items[1])?);
        if a >= b {
            return Err(bad(format!(
                "{at}: [{a}, {b}] is empty (start must be < end)"
            )));
        }
        Ok((a, b))
    }
}

impl MergeConfig {
    pub fn parse(text: &str) -> Result<MergeConfig> {
        let root: Value =
            serde_norway::from_str(text).map_err(|e| bad(format!("not valid YAML: {e}")))?;
        let top = mapping(&root, "top level")?;
        check_keys(
            top,
            &[
                "merge_method",
                "base_model",
                "models",
                "slices",
                "parameters",
                "dtype",
                "out_dtype",
                "tokenizer_source",
            ],
            "top level",
        )?;
        let get = |k: &str| top.get(k).unwrap_or(&Value::Null);
        let method_name = string(get("merge_method"), "merge_method")
            .map_err(|_| bad("`merge_method` is missing (slerp, linear, ties, dare_ties)"))?;
        let method = match method_name.as_str() {
            "slerp" => Method::Slerp,
            "linear" => Method::Linear,
            "ties" => Method::Ties,
            "dare_ties" => Method::DareTies,
            other => {
                return Err(bad(format!(
                    "merge_method: unknown method `{other}` (palign implements slerp, linear, ties, dare_ties)"
                )))
            }
        };
        // The tokenizer files are always copied from the base; only that choice is accepted.
        match get("tokenizer_source") {
            Value::Null => {}
            Value::String(s) if s == "base" => {}
            other => {
                return Err(bad(format!(
                    "tokenizer_source: only `base` is supported, got {}",
                    serde_norway::to_string(other).unwrap_or_default().trim()
                )))
            }
        }
        let mut p = Parser { models: vec![] };
        let base = match get("base_model") {
            Value::Null => None,
            v => Some(p.model(v, "base_model")?),
        };
        let params = parse_params(get("parameters"), "parameters")?;
        let (models_v, slices_v) = (get("models"), get("slices"));
        let models_form = match (models_v.is_null(), slices_v.is_null()) {
            (false, true) => true,
            (true, false) => false,
            _ => return Err(bad("give exactly one of `models` or `slices`")),
        };
        let mut slices = Vec::new();
        if models_form {
            let list = models_v
                .as_sequence()
                .filter(|l| !l.is_empty())
                .ok_or_else(|| bad("models: expected a non-empty list"))?;
            let mut sources = Vec::new();
            for (i, item) in list.iter().enumerate() {
                let at = format!("models[{i}]");
                let m = mapping(item, &at)?;
                check_keys(m, &["model", "parameters"], &at)?;
                let model_v = m
                    .get("model")
                    .ok_or_else(|| bad(format!("{at}: `model` is missing")))?;
                sources.push(SourceDef {
                    model: p.model(model_v, &format!("{at}.model"))?,
                    layer_range: None,
                    params: parse_params(
                        m.get("parameters").unwrap_or(&Value::Null),
                        &format!("{at}.parameters"),
                    )?,
                });
            }
            slices.push(SliceDef {
                sources,
                base: None,
                params: vec![],
            });
        } else {
            let list = slices_v
                .as_sequence()
                .filter(|l| !l.is_empty())
                .ok_or_else(|| bad("slices: expected a non-empty list"))?;
            for (i, item) in list.iter().enumerate() {
                let at = format!("slices[{i}]");
                let m = mapping(item, &at)?;
                check_keys(m, &["sources", "base_model", "parameters"], &at)?;
                let srcs = m
                    .get("sources")
                    .and_then(Value::as_sequence)
                    .filter(|l| !l.is_empty())
                    .ok_or_else(|| bad(format!("{at}.sources: expected a non-empty list")))?;
                let mut sources = Vec::new();
                for (j, s) in srcs.iter().enumerate() {
                    let at = format!("{at}.sources[{j}]");
                    let sm = mapping(s, &at)?;
                    check_keys(sm, &["model", "layer_range", "parameters"], &at)?;
                    let model_v = sm
                        .get("model")
                        .ok_or_else(|| bad(format!("{at}: `model` is missing")))?;
                    let range_v = sm
                        .get("layer_range")
                        .ok_or_else(|| bad(format!("{at}: `layer_range` is missing")))?;
                    sources.push(SourceDef {
                        model: p.model(model_v, &format!("{at}.model"))?,
                        layer_range: Some(Parser::layer_range(
                            range_v,
                            &format!("{at}.layer_range"),
                        )?),
                        params: parse_params(
                            sm.get("parameters").unwrap_or(&Value::Null),
                            &format!("{at}.parameters"),
                        )?,
                    });
                }
                let slice_base = match m.get("base_model") {
                    None | Some(Value::Null) => None,
                    Some(v) => Some(p.model(v, &format!("{at}.base_model"))?),
                };
                slices.push(SliceDef {
                    sources,
                    base: slice_base,
                    params: parse_params(
                        m.get("parameters").unwrap_or(&Value::Null),
                        &format!("{at}.parameters"),
                    )?,
                });
            }
        }
        let cfg = MergeConfig {
            method,
            models: p.models,
            base,
            models_form,
            slices,
            params,
            dtype: dtype_of(get("dtype"), "dtype")?,
            out_dtype: dtype_of(get("out_dtype"), "out_dtype")?,
        };
        cfg.check_param_names()?;
        Ok(cfg)
    }

    /// Every parameter name anywhere must be one the method reads.
    fn check_param_names(&self) -> Result<()> {
        let known = self.method.known_params();
        let mut scopes: Vec<(&Params, String)> = vec![(&self.params, "parameters".into())];
        for (i, s) in self.slices.iter().enumerate() {
            let prefix = if self.models_form {
                "models".to_string()
            } else {
                format!("slices[{i}]")
            };
            scopes.push((&s.params, format!("{prefix}.parameters")));
            for (j, src) in s.sources.iter().enumerate() {
                let at = if self.models_form {
                    format!("models[{j}].parameters")
                } else {
                    format!("{prefix}.sources[{j}].parameters")
                };
                scopes.push((&src.params, at));
            }
        }
        for (params, at) in scopes {
            for (name, _) in params {
                if !known.contains(&name.as_str()) {
                    return Err(bad(format!(
                        "{at}: unknown parameter `{name}` for {} (it reads: {})",
                        self.method.name(),
                        known.join(", ")
                    )));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_form_parses_and_names_each_reference_once() {
        let c = MergeConfig::parse(
            "merge_method: dare_ties\nbase_model: a\nmodels:\n  - model: a\n  - model: b+ad\n    parameters: {weight: 0.5, density: 0.5}\nparameters: {normalize: true, int8_mask: true}\ndtype: bfloat16\n",
        )
        .unwrap();
        assert_eq!(c.method, Method::DareTies);
        assert_eq!(c.models.len(), 2);
        assert_eq!(c.base, Some(0));
        assert_eq!(
            c.models[1].adapter.as_deref(),
            Some(std::path::Path::new("ad"))
        );
        assert_eq!(c.slices[0].sources.len(), 2);
        assert_eq!(c.dtype, Some(FloatDtype::BF16));
    }

    #[test]
    fn typos_and_unknowns_name_the_key() {
        let cases = [
            (
                "merge_method: slerp\nmodels: [{model: a}]\nparameter: {t: 1}\n",
                "`parameter`",
            ),
            (
                "merge_method: task_arithmetic\nmodels: [{model: a}]\n",
                "task_arithmetic",
            ),
            (
                "merge_method: ties\nmodels: [{model: a, parameters: {densty: 1}}]\n",
                "`densty`",
            ),
            (
                "merge_method: slerp\nmodels: [{model: a}]\nslices: []\n",
                "exactly one",
            ),
            (
                "merge_method: slerp\nslices: [{sources: [{model: a, layer_range: [2, 1]}]}]\n",
                "layer_range",
            ),
            ("merge_method: linear\nmodels: [{model: a+b+c}]\n", "a+b+c"),
            (
                "merge_method: linear\nmodels: [{model: a}]\ndtype: float64\n",
                "float64",
            ),
            ("merge_method: [\n", "not valid YAML"),
        ];
        for (yaml, want) in cases {
            let e = MergeConfig::parse(yaml).unwrap_err();
            assert!(
                e.is_bad_input() && e.to_string().contains(want),
                "{yaml}: {e}"
            );
        }
    }
}
