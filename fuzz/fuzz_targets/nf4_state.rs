//! bitsandbytes NF4 state: `Nf4Tensor::from_bnb_entries` on a tensor group made from the
//! input, then dequantization, and a round trip through `to_bnb_entries` when it parses.
//!
//! Input: byte 0 holds dtype flags (below); the rest is split at `SEP` into the quant-state
//! JSON, packed codes, absmax, quant_map, nested_absmax and nested_quant_map, in that
//! order. Missing parts are missing tensors.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use palign::quant::Nf4Tensor;

const SEP: &[u8] = b"\n@@\n";
const PREFIX: &str = "model.layers.0.mlp.up_proj.weight";
/// Tensor name suffixes in input order ("" is the packed codes).
const SUFFIXES: [&str; 5] = [
    "",
    "absmax",
    "quant_map",
    "nested_absmax",
    "nested_quant_map",
];
/// Largest weight the target dequantizes (the parser ties numel to the packed bytes, so
/// inputs never get here; this guards against that check going away).
const MAX_NUMEL: usize = 1 << 22;

type Lookup = Box<dyn Fn(&str) -> Option<(String, Vec<usize>, Vec<u8>)>>;

/// A lookup over (name, dtype, bytes) triples, as a safetensors reader would give.
fn lookup_of(tensors: Vec<(String, &'static str, Vec<u8>)>) -> Lookup {
    Box::new(move |name: &str| {
        tensors
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, dt, d)| (dt.to_string(), vec![d.len()], d.clone()))
    })
}

fn check(t: &Nf4Tensor) {
    let n = t.numel();
    assert!(n > 0 && t.packed.len() == n.div_ceil(2));
    if n > MAX_NUMEL {
        return;
    }
    let _ = t.bits_per_param();
    let _ = t.scales();
    let all = t.dequantize();
    assert_eq!(all.len(), n);
    // Row-wise dequantization must agree with the whole-tensor (parallel) one.
    let [rows, cols] = t.shape;
    let mut row_wise = vec![0.0f32; n];
    t.dequantize_rows(0, rows, &mut row_wise).expect("all rows");
    assert!(all
        .iter()
        .zip(&row_wise)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
    let mut one = vec![0.0f32; cols];
    t.dequantize_rows(rows - 1, rows, &mut one)
        .expect("last row");
    assert!(t.dequantize_rows(0, rows + 1, &mut one).is_err());
    assert!(t.dequantize_into(&mut one[..0]).is_err());

    // What palign writes must read back to the same tensors. (Offsets that overflow f32
    // print as Infinity, which is not JSON, so they cannot round-trip.)
    let finite = match &t.absmax {
        palign::quant::Absmax::Double(d) => d.offset.is_finite(),
        palign::quant::Absmax::Plain(_) => true,
    };
    if finite {
        let entries = t.to_bnb_entries(PREFIX);
        let back = Nf4Tensor::from_bnb_entries(
            PREFIX,
            lookup_of(
                entries
                    .iter()
                    .map(|e| (e.name.clone(), e.dtype, e.data.clone()))
                    .collect(),
            ),
        )
        .expect("palign's own entries parse");
        assert_eq!(back.to_bnb_entries(PREFIX), entries);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let parts = common::split(rest, SEP);
    let pick = |bit: u8, a: &'static str, b: &'static str| if flags & bit == 0 { a } else { b };
    let state_suffix = pick(32, "nf4", "fp4");
    let mut tensors = vec![(
        format!("{PREFIX}.quant_state.bitsandbytes__{state_suffix}"),
        pick(16, "U8", "I8"),
        parts[0].to_vec(),
    )];
    let dtypes = [
        pick(1, "U8", "BF16"),
        pick(2, "F32", "U8"),
        pick(4, "F32", "F16"),
        pick(8, "F32", "BF16"),
        "F32",
    ];
    for (i, part) in parts[1..].iter().enumerate().take(SUFFIXES.len()) {
        let name = if SUFFIXES[i].is_empty() {
            PREFIX.to_string()
        } else {
            format!("{PREFIX}.{}", SUFFIXES[i])
        };
        tensors.push((name, dtypes[i], part.to_vec()));
    }
    if let Ok(t) = Nf4Tensor::from_bnb_entries(PREFIX, lookup_of(tensors)) {
        check(&t);
    }
});
