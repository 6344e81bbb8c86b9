//! mergekit's parameter settings (mergekit 0.1.5 `config.py` `evaluate_setting`, facts only):
//! a setting is a scalar, a gradient (a list of anchors interpolated at `t`), or a list of
//! `{filter, value}` conditions where the first whose filter is a substring of the tensor
//! name (or is absent / `*`) wins. Settings are looked up in scopes from the most specific
//! (a source's) to the global one; the first scope that yields a value wins.

use crate::error::{bad, Result};
use serde_norway::Value;

/// One scalar as written in YAML.
#[derive(Clone, Debug, PartialEq)]
pub enum Scalar {
    Num(f64),
    Bool(bool),
    Str(String),
}

/// A scalar or a gradient (anchor list).
#[derive(Clone, Debug, PartialEq)]
pub enum Value1 {
    One(Scalar),
    Anchors(Vec<Scalar>),
}

/// A parameter setting.
#[derive(Clone, Debug, PartialEq)]
pub enum Setting {
    Plain(Value1),
    /// `(filter, value)` pairs; `None` matches every tensor.
    Filtered(Vec<(Option<String>, Value1)>),
}

fn scalar(v: &Value, at: &str) -> Result<Scalar> {
    match v {
        Value::Number(n) => n
            .as_f64()
            .map(Scalar::Num)
            .ok_or_else(|| bad(format!("{at}: number {n} is out of range"))),
        Value::Bool(b) => Ok(Scalar::Bool(*b)),
        Value::String(s) => Ok(Scalar::Str(s.clone())),
        other => Err(bad(format!(
            "{at}: expected a number, a boolean or a string, got {}",
            kind(other)
        ))),
    }
}

/// A short name for a YAML value's type, for error messages.
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

fn value1(v: &Value, at: &str) -> Result<Value1> {
    match v {
        Value::Sequence(items) => Ok(Value1::Anchors(
            items
                .iter()
                .enumerate()
                .map(|(i, x)| scalar(x, &format!("{at}[{i}]")))
                .collect::<Result<_>>()?,
        )),
        other => Ok(Value1::One(scalar(other, at)?)),
    }
}

fn condition(v: &Value, at: &str) -> Result<(Option<String>, Value1)> {
    let Value::Mapping(m) = v else {
        return Err(bad(format!("{at}: expected a {{filter, value}} mapping")));
    };
    let mut filter = None;
    let mut value = None;
    for (k, x) in m {
        match k.as_str() {
            Some("filter") => match x {
                Value::String(s) => filter = Some(s.clone()),
                Value::Null => {}
                other => {
                    return Err(bad(format!(
                        "{at}.filter: expected a string, got {}",
                        kind(other)
                    )))
                }
            },
            Some("value") => value = Some(value1(x, &format!("{at}.value"))?),
            _ => {
                return Err(bad(format!(
                    "{at}: unknown key `{}` (a condition has `filter` and `value`)",
                    key_text(k)
                )))
            }
        }
    }
    let value = value.ok_or_else(|| bad(format!("{at}: `value` is missing")))?;
    Ok((filter, value))
}

/// A YAML key as text (keys are normally strings).
pub fn key_text(k: &Value) -> String {
    match k {
        Value::String(s) => s.clone(),
        other => serde_norway::to_string(other)
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "?".into()),
    }
}

impl Setting {
    /// Parses one setting at YAML path `at` (for messages).
    pub fn parse(v: &Value, at: &str) -> Result<Setting> {
        match v {
            Value::Mapping(_) => Ok(Setting::Filtered(vec![condition(v, at)?])),
            Value::Sequence(items) if items.iter().any(|x| x.is_mapping()) => {
                let conds = items
                    .iter()
                    .enumerate()
                    .map(|(i, x)| condition(x, &format!("{at}[{i}]")))
                    .collect::<Result<_>>()?;
                Ok(Setting::Filtered(conds))
            }
            other => Ok(Setting::Plain(value1(other, at)?)),
        }
    }

    /// The value for `tensor` at gradient position `t` in [0, 1], or `None` when no
    /// condition matches (or the anchor list is empty): the next scope is asked then.
    pub fn evaluate(&self, tensor: &str, t: f64) -> Option<Scalar> {
        match self {
            Setting::Plain(v) => eval_value(v, t),
            Setting::Filtered(conds) => conds
                .iter()
                .find(|(f, _)| match f.as_deref() {
                    None | Some("*") => true,
                    Some(f) => !tensor.is_empty() && tensor.contains(f),
                })
                .and_then(|(_, v)| eval_value(v, t)),
        }
    }
}

/// Numeric anchors interpolate linearly at `t·(n−1)`; other anchors are picked by
/// `floor(t·(n−1))` (mergekit's rule for booleans and strings).
fn eval_value(v: &Value1, t: f64) -> Option<Scalar> {
    match v {
        Value1::One(s) => Some(s.clone()),
        Value1::Anchors(a) if a.is_empty() => None,
        Value1::Anchors(a) => {
            let nums: Option<Vec<f64>> = a
                .iter()
                .map(|s| match s {
                    Scalar::Num(x) => Some(*x),
                    _ => None,
                })
                .collect();
            let scaled = t * (a.len() - 1) as f64;
            let i0 = (scaled as usize).min(a.len() - 1);
            match nums {
                Some(x) => {
                    let i1 = (i0 + 1).min(a.len() - 1);
                    let frac = scaled - i0 as f64;
                    Some(Scalar::Num((1.0 - frac) * x[i0] + frac * x[i1]))
                }
                None => Some(a[i0].clone()),
            }
        }
    }
}

impl Scalar {
    /// As a float parameter (numeric strings accepted, as pydantic's lax mode does); NaN,
    /// infinities and values beyond f32 (the merge's arithmetic) are refused: they would
    /// only write a model of NaNs.
    pub fn as_f64(&self, what: &str) -> Result<f64> {
        let x = match self {
            Scalar::Num(x) => *x,
            Scalar::Str(s) => s
                .trim()
                .parse::<f64>()
                .map_err(|_| bad(format!("{what}: expected a number, got \"{s}\"")))?,
            Scalar::Bool(b) => return Err(bad(format!("{what}: expected a number, got {b}"))),
        };
        if !(x.is_finite() && x.abs() <= f32::MAX as f64) {
            return Err(bad(format!("{what}: expected a finite number, got {x}")));
        }
        Ok(x)
    }

    /// As a boolean parameter (`true`/`false`, or 0/1).
    pub fn as_bool(&self, what: &str) -> Result<bool> {
        match self {
            Scalar::Bool(b) => Ok(*b),
            Scalar::Num(x) if *x == 0.0 || *x == 1.0 => Ok(*x == 1.0),
            Scalar::Str(s) if s == "true" || s == "false" => Ok(s == "true"),
            other => Err(bad(format!(
                "{what}: expected true or false, got {other:?}"
            ))),
        }
    }
}

/// Named settings of one scope, in YAML order.
pub type Params = Vec<(String, Setting)>;

/// Parses a `parameters:` mapping.
pub fn parse_params(v: &Value, at: &str) -> Result<Params> {
    match v {
        Value::Null => Ok(vec![]),
        Value::Mapping(m) => m
            .iter()
            .map(|(k, x)| {
                let name = key_text(k);
                let s = Setting::parse(x, &format!("{at}.{name}"))?;
                Ok((name, s))
            })
            .collect(),
        other => Err(bad(format!(
            "{at}: expected a mapping, got {}",
            kind(other)
        ))),
    }
}

/// The first value any scope (most specific first) gives `name` for `tensor` at `t`.
pub fn lookup(scopes: &[&Params], name: &str, tensor: &str, t: f64) -> Option<Scalar> {
    scopes.iter().find_map(|p| {
        p.iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, s)| s.evaluate(tensor, t))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setting(yaml: &str) -> Setting {
        let v: Value = serde_norway::from_str(yaml).unwrap();
        Setting::parse(&v, "t").unwrap()
    }

    #[test]
    fn anchors_interpolate_and_filters_pick_the_first_match() {
        let s = setting("[0.0, 1.0, 0.0]");
        // t=0.25 lies halfway between anchors 0 and 1; t=0.75 halfway back down.
        assert_eq!(s.evaluate("x", 0.25), Some(Scalar::Num(0.5)));
        assert_eq!(s.evaluate("x", 0.75), Some(Scalar::Num(0.5)));
        assert_eq!(s.evaluate("x", 1.0), Some(Scalar::Num(0.0)));
        let f = setting("[{filter: mlp, value: 0.7}, {value: [2, 4]}]");
        assert_eq!(f.evaluate("a.mlp.up", 0.5), Some(Scalar::Num(0.7)));
        assert_eq!(f.evaluate("a.self_attn.q", 0.5), Some(Scalar::Num(3.0)));
        let only = setting("{filter: mlp, value: 1}");
        assert_eq!(only.evaluate("model.norm.weight", 0.0), None);
        let bools = setting("[false, true]");
        assert_eq!(bools.evaluate("x", 0.9), Some(Scalar::Bool(false)));
        assert_eq!(bools.evaluate("x", 1.0), Some(Scalar::Bool(true)));
    }

    #[test]
    fn scopes_fall_through_when_nothing_matches() {
        let v: Value = serde_norway::from_str("{t: {filter: mlp, value: 1}}").unwrap();
        let inner = parse_params(&v, "p").unwrap();
        let v: Value = serde_norway::from_str("{t: 0.5}").unwrap();
        let outer = parse_params(&v, "p").unwrap();
        assert_eq!(
            lookup(&[&inner, &outer], "t", "x.mlp.y", 0.0),
            Some(Scalar::Num(1.0))
        );
        assert_eq!(
            lookup(&[&inner, &outer], "t", "x.norm", 0.0),
            Some(Scalar::Num(0.5))
        );
        assert_eq!(lookup(&[&inner], "t", "x.norm", 0.0), None);
        let bad_cond: Value = serde_norway::from_str("[{filter: mlp, valu: 1}]").unwrap();
        let e = Setting::parse(&bad_cond, "parameters.t").unwrap_err();
        assert!(e.to_string().contains("valu"), "{e}");
    }
}
