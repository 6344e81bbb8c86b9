//! The tensors bitsandbytes saves for one 4-bit weight (`Linear4bit._save_to_state_dict`
//! → `QuantState.as_dict(packed=True)`), independent of any safetensors reader:
//!
//! | name | dtype | shape |
//! |---|---|---|
//! | `{p}` | U8 | [(n+1)/2, 1] packed codes |
//! | `{p}.absmax` | U8 (double quant) or F32 | [blocks] |
//! | `{p}.quant_map` | F32 | [16] |
//! | `{p}.nested_absmax` | F32 | [ceil(blocks/256)] (double quant only) |
//! | `{p}.nested_quant_map` | F32 | [256] (double quant only) |
//! | `{p}.quant_state.bitsandbytes__nf4` | U8 | [len] UTF-8 of `json.dumps` of the rest |
//!
//! The JSON has, in this order, quant_type, blocksize, dtype, shape and with double
//! quantization nested_blocksize, nested_dtype, nested_offset (bnb 0.50.2 wrote these
//! in tests/fixtures/nf4/linear4bit_state.safetensors).

use super::{check_blocksize, Absmax, DoubleQuant, Nf4Tensor, SourceDtype, NF4_CODE};
use crate::error::{bad, Result};

/// One named tensor of the bitsandbytes representation.
#[derive(Clone, Debug, PartialEq)]
pub struct BnbEntry {
    pub name: String,
    /// safetensors dtype: "U8" or "F32".
    pub dtype: &'static str,
    pub shape: Vec<usize>,
    /// Little-endian bytes.
    pub data: Vec<u8>,
}

const QUANT_STATE_SUFFIX: &str = "quant_state.bitsandbytes__nf4";

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn entry(name: String, dtype: &'static str, shape: Vec<usize>, data: Vec<u8>) -> BnbEntry {
    BnbEntry {
        name,
        dtype,
        shape,
        data,
    }
}

/// Python's `repr(float)` (what `json.dumps` writes): the shortest digits that read
/// back to the same double, positional when the decimal exponent is in -4..16,
/// otherwise `d.ddde-XX`.
pub(crate) fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    if x == 0.0 {
        return if x.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    // Rust's {:e} gives the shortest round-trip digits too, as "d.ddde<exp>".
    let sci = format!("{:e}", x.abs());
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    let sign = if x < 0.0 { "-" } else { "" };
    let point = exp + 1; // digits are 0.d1d2... x 10^point
    if (-4 < point) && (point <= 16) {
        let s = if point <= 0 {
            format!("0.{}{}", "0".repeat((-point) as usize), digits)
        } else if point as usize >= digits.len() {
            format!("{}{}.0", digits, "0".repeat(point as usize - digits.len()))
        } else {
            format!(
                "{}.{}",
                &digits[..point as usize],
                &digits[point as usize..]
            )
        };
        format!("{sign}{s}")
    } else {
        let m = if digits.len() == 1 {
            digits.clone()
        } else {
            format!("{}.{}", &digits[..1], &digits[1..])
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{m}e{esign}{:02}", exp.abs())
    }
}

impl Nf4Tensor {
    /// The quant-state JSON exactly as bitsandbytes serialises it (`json.dumps` with its
    /// default ", " and ": " separators, keys in `QuantState.as_dict` order).
    pub fn quant_state_json(&self) -> String {
        let mut s = format!(
            "{{\"quant_type\": \"nf4\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}, {}]",
            self.blocksize,
            self.dtype.as_str(),
            self.shape[0],
            self.shape[1]
        );
        if let Absmax::Double(d) = &self.absmax {
            s += &format!(
                ", \"nested_blocksize\": {}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
                d.blocksize2,
                python_float_repr(d.offset as f64)
            );
        }
        s.push('}');
        s
    }

    /// The tensors bitsandbytes writes for this weight under `prefix` (e.g.
    /// "model.layers.0.mlp.down_proj.weight").
    pub fn to_bnb_entries(&self, prefix: &str) -> Vec<BnbEntry> {
        let mut out = vec![entry(
            prefix.to_string(),
            "U8",
            vec![self.packed.len(), 1],
            self.packed.clone(),
        )];
        match &self.absmax {
            Absmax::Plain(a) => {
                out.push(entry(
                    format!("{prefix}.absmax"),
                    "F32",
                    vec![a.len()],
                    f32_bytes(a),
                ));
                out.push(entry(
                    format!("{prefix}.quant_map"),
                    "F32",
                    vec![16],
                    f32_bytes(&NF4_CODE),
                ));
            }
            Absmax::Double(d) => {
                out.push(entry(
                    format!("{prefix}.absmax"),
                    "U8",
                    vec![d.q.len()],
                    d.q.clone(),
                ));
                out.push(entry(
                    format!("{prefix}.quant_map"),
                    "F32",
                    vec![16],
                    f32_bytes(&NF4_CODE),
                ));
                out.push(entry(
                    format!("{prefix}.nested_absmax"),
                    "F32",
                    vec![d.absmax2.len()],
                    f32_bytes(&d.absmax2),
                ));
                out.push(entry(
                    format!("{prefix}.nested_quant_map"),
                    "F32",
                    vec![d.code2.len()],
                    f32_bytes(&d.code2),
                ));
            }
        }
        let json = self.quant_state_json().into_bytes();
        out.push(entry(
            format!("{prefix}.{QUANT_STATE_SUFFIX}"),
            "U8",
            vec![json.len()],
            json,
        ));
        out
    }

    /// Reads back the group of tensors bitsandbytes saved under `prefix`, with or without
    /// double quantization. `lookup(name)` returns (safetensors dtype, shape, bytes) of
    /// a tensor or None when it is missing. Every size is checked; errors are
    /// `BadInput` naming the tensor at fault.
    pub fn from_bnb_entries<F, D>(prefix: &str, lookup: F) -> Result<Nf4Tensor>
    where
        F: Fn(&str) -> Option<(String, Vec<usize>, D)>,
        D: AsRef<[u8]>,
    {
        let get = |suffix: &str| -> Result<(String, String, Vec<usize>, D)> {
            let name = if suffix.is_empty() {
                prefix.to_string()
            } else {
                format!("{prefix}.{suffix}")
            };
            match lookup(&name) {
                Some((dt, shape, data)) => Ok((name, dt, shape, data)),
                None => Err(bad(format!(
                    "4-bit weight {prefix}: tensor {name} is missing"
                ))),
            }
        };

        let (qs_name, qs_dtype, _, qs_data) = match get(QUANT_STATE_SUFFIX) {
            Ok(v) => v,
            Err(e) => {
                let fp4 = format!("{prefix}.quant_state.bitsandbytes__fp4");
                if lookup(&fp4).is_some() {
                    return Err(bad(format!(
                        "{fp4}: FP4 weights are not supported, only NF4"
                    )));
                }
                return Err(e);
            }
        };
        if qs_dtype != "U8" {
            return Err(bad(format!("{qs_name}: dtype {qs_dtype}, expected U8")));
        }
        let json: serde_json::Value = serde_json::from_slice(qs_data.as_ref())
            .map_err(|e| bad(format!("{qs_name}: not a JSON quant state: {e}")))?;
        let field = |k: &str| {
            json.get(k)
                .ok_or_else(|| bad(format!("{qs_name}: quant state has no \"{k}\"")))
        };
        let uint = |k: &str| -> Result<usize> {
            field(k)?
                .as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| bad(format!("{qs_name}: \"{k}\" is not a non-negative integer")))
        };
        let quant_type = field("quant_type")?.as_str().unwrap_or("");
        if quant_type != "nf4" {
            return Err(bad(format!(
                "{qs_name}: quant_type {quant_type:?}, only \"nf4\" is supported"
            )));
        }
        let blocksize = uint("blocksize")?;
        check_blocksize(blocksize).map_err(|e| bad(format!("{qs_name}: {e}")))?;
        let dtype_name = field("dtype")?.as_str().unwrap_or("");
        let dtype = SourceDtype::parse(dtype_name)
            .ok_or_else(|| bad(format!("{qs_name}: unsupported dtype {dtype_name:?}")))?;
        let dims: Vec<usize> = field("shape")?
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_u64().map(|u| u as usize))
                    .collect()
            })
            .unwrap_or_default();
        if dims.len() != 2 || field("shape")?.as_array().map(|a| a.len()) != Some(2) {
            return Err(bad(format!(
                "{qs_name}: shape must be [out, in], got {}",
                field("shape")?
            )));
        }
        let shape = [dims[0], dims[1]];
        let n = shape[0]
            .checked_mul(shape[1])
            .filter(|&n| n > 0)
            .ok_or_else(|| bad(format!("{qs_name}: invalid shape {shape:?}")))?;
        let nblocks = n.div_ceil(blocksize);

        // Packed codes: bitsandbytes may store them in another quant_storage dtype
        // (e.g. bf16 for FSDP); the bytes are the same, so only their count matters.
        let (w_name, _, _, w_data) = get("")?;
        let packed = w_data.as_ref().to_vec();
        if packed.len() != n.div_ceil(2) {
            return Err(bad(format!(
                "{w_name}: {} bytes of packed codes, shape {shape:?} needs {}",
                packed.len(),
                n.div_ceil(2)
            )));
        }

        let (qm_name, qm_dtype, _, qm_data) = get("quant_map")?;
        // bitsandbytes' kernels use the built-in NF4 table, not this tensor; check its size.
        check_f32(&qm_name, &qm_dtype, qm_data.as_ref(), 16)?;

        let nested = json.get("nested_offset").is_some();
        let (am_name, am_dtype, _, am_data) = get("absmax")?;
        let absmax = if nested {
            let blocksize2 = uint("nested_blocksize")?;
            if blocksize2 == 0 {
                return Err(bad(format!("{qs_name}: nested_blocksize must be positive")));
            }
            let offset = field("nested_offset")?
                .as_f64()
                .ok_or_else(|| bad(format!("{qs_name}: nested_offset is not a number")))?
                as f32;
            if am_dtype != "U8" || am_data.as_ref().len() != nblocks {
                return Err(bad(format!(
                    "{am_name}: expected U8 [{nblocks}] (double-quantized absmax), got {am_dtype} of {} bytes",
                    am_data.as_ref().len()
                )));
            }
            let (n2_name, n2_dtype, _, n2_data) = get("nested_absmax")?;
            let absmax2 = check_f32(
                &n2_name,
                &n2_dtype,
                n2_data.as_ref(),
                nblocks.div_ceil(blocksize2),
            )?;
            let (c2_name, c2_dtype, _, c2_data) = get("nested_quant_map")?;
            let code2 = check_f32(&c2_name, &c2_dtype, c2_data.as_ref(), 256)?;
            Absmax::Double(DoubleQuant {
                q: am_data.as_ref().to_vec(),
                code2,
                absmax2,
                offset,
                blocksize2,
            })
        } else {
            Absmax::Plain(check_f32(&am_name, &am_dtype, am_data.as_ref(), nblocks)?)
        };
        Ok(Nf4Tensor {
            shape,
            blocksize,
            packed,
            absmax,
            dtype,
        })
    }
}

/// Checks an F32 tensor of `len` values and decodes it.
fn check_f32(name: &str, dtype: &str, data: &[u8], len: usize) -> Result<Vec<f32>> {
    if dtype != "F32" || data.len() != 4 * len {
        return Err(bad(format!(
            "{name}: expected F32 [{len}], got {dtype} of {} bytes",
            data.len()
        )));
    }
    Ok(data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::super::quantize_nf4_from;
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn python_repr_matches_python() {
        // Values and what CPython 3.11 repr() prints for them.
        let cases = [
            (2.639940023422241, "2.639940023422241"),
            (0.10048703849315643, "0.10048703849315643"),
            (1.0, "1.0"),
            (0.0001, "0.0001"),
            (1e-05, "1e-05"),
            (1.5e-05, "1.5e-05"),
            (-0.00012345, "-0.00012345"),
            (123456.0, "123456.0"),
            (1e16, "1e+16"),
            (9999999999999998.0, "9999999999999998.0"),
            (1.25e-10, "1.25e-10"),
            (-0.0, "-0.0"),
        ];
        for (x, want) in cases {
            assert_eq!(python_float_repr(x), want, "{x}");
        }
    }

    fn weights(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.1)
            .collect()
    }

    fn as_map(entries: &[BnbEntry]) -> HashMap<String, BnbEntry> {
        entries
            .iter()
            .map(|e| (e.name.clone(), e.clone()))
            .collect()
    }

    #[test]
    fn entries_round_trip() {
        for (dq, dtype) in [
            (true, SourceDtype::BF16),
            (false, SourceDtype::F32),
            (true, SourceDtype::F16),
        ] {
            let w = weights(130 * 70);
            let t = quantize_nf4_from(&w, dtype, [130, 70], 64, dq).unwrap();
            let entries = t.to_bnb_entries("m.w");
            let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
            if dq {
                assert_eq!(
                    names,
                    [
                        "m.w",
                        "m.w.absmax",
                        "m.w.quant_map",
                        "m.w.nested_absmax",
                        "m.w.nested_quant_map",
                        "m.w.quant_state.bitsandbytes__nf4"
                    ]
                );
            } else {
                assert_eq!(names.len(), 4);
            }
            for e in &entries {
                let elem = if e.dtype == "F32" { 4 } else { 1 };
                assert_eq!(
                    e.data.len(),
                    elem * e.shape.iter().product::<usize>(),
                    "{}",
                    e.name
                );
            }
            assert_eq!(entries[0].shape, vec![4550, 1]);
            let map = as_map(&entries);
            let back = Nf4Tensor::from_bnb_entries("m.w", |name| {
                map.get(name)
                    .map(|e| (e.dtype.to_string(), e.shape.clone(), e.data.as_slice()))
            })
            .unwrap();
            assert_eq!(back, t);
            assert_eq!(back.dequantize(), t.dequantize());
        }
    }

    #[test]
    fn json_blob_format() {
        let w = weights(64 * 64);
        let t = quantize_nf4(&w, [64, 64], 64, false).unwrap();
        assert_eq!(
            t.quant_state_json(),
            r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [64, 64]}"#
        );
        let t = quantize_nf4_from(&w, SourceDtype::BF16, [64, 64], 128, true).unwrap();
        let Absmax::Double(d) = &t.absmax else {
            panic!()
        };
        let want = format!(
            r#"{{"quant_type": "nf4", "blocksize": 128, "dtype": "bfloat16", "shape": [64, 64], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": {}}}"#,
            python_float_repr(d.offset as f64)
        );
        assert_eq!(t.quant_state_json(), want);
    }

    use super::super::quantize_nf4;

    type Spoil = Box<dyn Fn(&mut HashMap<String, BnbEntry>)>;

    #[test]
    fn bad_groups_name_the_tensor() {
        let w = weights(48 * 80);
        let t = quantize_nf4(&w, [48, 80], 64, true).unwrap();
        let good = as_map(&t.to_bnb_entries("w"));
        let read = |map: &HashMap<String, BnbEntry>| {
            Nf4Tensor::from_bnb_entries("w", |name| {
                map.get(name)
                    .map(|e| (e.dtype.to_string(), e.shape.clone(), e.data.clone()))
            })
        };
        assert!(read(&good).is_ok());
        let cases: Vec<(&str, Spoil)> = vec![
            (
                "w.absmax",
                Box::new(|m| {
                    m.get_mut("w.absmax").unwrap().data.pop();
                }),
            ),
            (
                "w.nested_absmax",
                Box::new(|m| {
                    m.remove("w.nested_absmax");
                }),
            ),
            (
                "w.nested_quant_map",
                Box::new(|m| {
                    m.get_mut("w.nested_quant_map").unwrap().dtype = "F16";
                }),
            ),
            (
                "w",
                Box::new(|m| {
                    m.get_mut("w").unwrap().data.push(0);
                }),
            ),
            (
                "w.quant_map",
                Box::new(|m| {
                    m.get_mut("w.quant_map").unwrap().data.truncate(8);
                }),
            ),
            (
                "w.quant_state.bitsandbytes__nf4",
                Box::new(|m| {
                    m.get_mut("w.quant_state.bitsandbytes__nf4").unwrap().data =
                        b"{\"quant_type\": \"nf4\"".to_vec();
                }),
            ),
            (
                "w.quant_state.bitsandbytes__nf4",
                Box::new(|m| {
                    let e = m.get_mut("w.quant_state.bitsandbytes__nf4").unwrap();
                    e.data = String::from_utf8(e.data.clone())
                        .unwrap()
                        .replace("64,", "48,")
                        .into_bytes();
                }),
            ),
            (
                "w.quant_state.bitsandbytes__nf4",
                Box::new(|m| {
                    let e = m.get_mut("w.quant_state.bitsandbytes__nf4").unwrap();
                    e.data = String::from_utf8(e.data.clone())
                        .unwrap()
                        .replace("[48, 80]", "[48, 80, 1]")
                        .into_bytes();
                }),
            ),
        ];
        for (culprit, spoil) in cases {
            let mut m = good.clone();
            spoil(&mut m);
            let err = read(&m).unwrap_err();
            assert!(err.is_bad_input());
            assert!(err.to_string().contains(culprit), "{culprit}: {err}");
        }
        let mut m = good.clone();
        let qs = m.remove("w.quant_state.bitsandbytes__nf4").unwrap();
        m.insert("w.quant_state.bitsandbytes__fp4".into(), qs);
        let err = read(&m).unwrap_err();
        assert!(err.to_string().contains("FP4"), "{err}");
    }
}
