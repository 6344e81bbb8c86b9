//! Safetensors files: memory-mapped reading (single file or shards listed in
//! `model.safetensors.index.json`) and writing with `{"format":"pt"}` metadata.
//! Layout (safetensors spec): u64 LE header length, JSON header, packed tensor bytes.

use crate::error::{bad, Error, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Where one tensor lives.
#[derive(Clone, Debug)]
pub struct Entry {
    pub file: usize,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub start: usize,
    pub end: usize,
}

/// All tensors of a checkpoint, memory-mapped; bytes are read only when asked for.
pub struct Weights {
    files: Vec<(PathBuf, Mmap)>,
    index: HashMap<String, Entry>,
}

fn map_file(path: &Path) -> Result<Mmap> {
    let f = std::fs::File::open(path).map_err(|e| Error::read(path, e))?;
    // SAFETY: the file is opened read-only; palign never writes a checkpoint it is reading
    // (outputs go to a temporary name first).
    unsafe { Mmap::map(&f) }.map_err(|e| Error::read(path, e))
}

impl Weights {
    /// Opens `model.safetensors`, or the shards of `model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if single.exists() {
            return Self::open_files(&[single]);
        }
        if !index.exists() {
            return Err(bad(format!(
                "{}: no model.safetensors or model.safetensors.index.json",
                dir.display()
            )));
        }
        let text = std::fs::read_to_string(&index).map_err(|e| Error::read(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| bad(format!("{}: not valid JSON: {e}", index.display())))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad(format!("{}: missing `weight_map` object", index.display())))?;
        let mut shard_names: Vec<&str> = Vec::new();
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| {
                bad(format!(
                    "{}: weight_map[{name}] is not a string",
                    index.display()
                ))
            })?;
            if file.contains('/') || file.contains('\\') {
                return Err(bad(format!(
                    "{}: shard name {file} must be a plain file name",
                    index.display()
                )));
            }
            if !shard_names.contains(&file) {
                shard_names.push(file);
            }
        }
        shard_names.sort();
        let paths: Vec<PathBuf> = shard_names.iter().map(|f| dir.join(f)).collect();
        let w = Self::open_files(&paths)?;
        for (name, file) in map {
            let e = w.index.get(name).ok_or_else(|| {
                bad(format!(
                    "{}: lists `{name}` but {} does not hold it",
                    index.display(),
                    file
                ))
            })?;
            if w.files[e.file].0.file_name().and_then(|n| n.to_str()) != file.as_str() {
                return Err(bad(format!(
                    "{}: `{name}` is not in the shard the index names",
                    index.display()
                )));
            }
        }
        Ok(w)
    }

    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let mmap = map_file(path)?;
            let (n, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| {
                bad(format!(
                    "{}: not a valid safetensors file: {e}",
                    path.display()
                ))
            })?;
            let base = 8 + n;
            for (name, info) in meta.tensors() {
                let entry = Entry {
                    file: i,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: base + info.data_offsets.0,
                    end: base + info.data_offsets.1,
                };
                if index.insert(name.clone(), entry).is_some() {
                    return Err(bad(format!(
                        "{}: tensor `{name}` appears in two shards",
                        path.display()
                    )));
                }
            }
            files.push((path.clone(), mmap));
        }
        Ok(Weights { files, index })
    }

    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.index.get(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.index.keys()
    }

    pub fn bytes(&self, e: &Entry) -> &[u8] {
        &self.files[e.file].1[e.start..e.end]
    }

    pub fn path_of(&self, e: &Entry) -> &Path {
        &self.files[e.file].0
    }

    /// A required tensor, checked for presence and shape.
    pub fn entry(&self, name: &str, shape: &[usize]) -> Result<&Entry> {
        let e = self
            .get(name)
            .ok_or_else(|| bad(format!("weights: tensor `{name}` is missing")))?;
        if e.shape != shape {
            return Err(bad(format!(
                "weights: tensor `{name}` has shape {:?}, config.json implies {:?}",
                e.shape, shape
            )));
        }
        Ok(e)
    }

    /// A required float tensor widened to f32.
    pub fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let e = self.entry(name, shape)?;
        to_f32(self.bytes(e), e.dtype).map_err(|m| bad(format!("weights: tensor `{name}`: {m}")))
    }
}

/// Widen F32/BF16/F16 little-endian bytes to f32 (in parallel: a 7B checkpoint is
/// 7 billion values, and reading them also pages the file in).
pub fn to_f32(bytes: &[u8], dtype: Dtype) -> std::result::Result<Vec<f32>, String> {
    use rayon::prelude::*;
    Ok(match dtype {
        Dtype::F32 => bytes
            .par_chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::BF16 => bytes
            .par_chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F16 => bytes
            .par_chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(format!(
                "dtype {other:?} is not a float type (F32, BF16, F16)"
            ))
        }
    })
}

/// Storage dtype of a written float tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloatDtype {
    F32,
    BF16,
    F16,
}

impl FloatDtype {
    /// From the names transformers uses in config.json (`torch_dtype`/`dtype`).
    pub fn from_torch_name(s: &str) -> Option<Self> {
        match s {
            "float32" | "float" => Some(Self::F32),
            "bfloat16" => Some(Self::BF16),
            "float16" | "half" => Some(Self::F16),
            _ => None,
        }
    }
    pub fn torch_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::BF16 => "bfloat16",
            Self::F16 => "float16",
        }
    }
    pub fn st_name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::BF16 => "BF16",
            Self::F16 => "F16",
        }
    }
    /// Round f32 values to this dtype (round-to-nearest-even, as torch's casts) as LE bytes.
    pub fn encode(self, v: &[f32]) -> Vec<u8> {
        match self {
            Self::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Self::BF16 => v
                .iter()
                .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
                .collect(),
            Self::F16 => v
                .iter()
                .flat_map(|x| f16::from_f32(*x).to_le_bytes())
                .collect(),
        }
    }
}

/// One tensor to write.
pub struct TensorOut {
    pub name: String,
    pub dtype: &'static str,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl TensorOut {
    pub fn float(name: impl Into<String>, shape: Vec<usize>, dtype: FloatDtype, v: &[f32]) -> Self {
        TensorOut {
            name: name.into(),
            dtype: dtype.st_name(),
            shape,
            data: dtype.encode(v),
        }
    }
}

/// Serialize tensors (sorted by name, as the safetensors reference writer does) with
/// `{"format":"pt"}` metadata, which transformers requires when loading.
pub fn serialize(tensors: &[TensorOut]) -> Vec<u8> {
    let mut order: Vec<&TensorOut> = tensors.iter().collect();
    order.sort_by(|a, b| a.name.cmp(&b.name));
    let mut header = BTreeMap::new();
    header.insert(
        "__metadata__".to_string(),
        serde_json::json!({"format": "pt"}),
    );
    let mut offset = 0usize;
    for t in &order {
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + t.data.len()]}),
        );
        offset += t.data.len();
    }
    let mut h = serde_json::to_vec(&header).expect("header serializes");
    // Pad the header with spaces so tensor data starts 8-byte aligned (as the spec allows).
    while (8 + h.len()) % 8 != 0 {
        h.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + h.len() + offset);
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    for t in &order {
        out.extend_from_slice(&t.data);
    }
    out
}

/// A tensor to be written by `write_sharded`, whose bytes are produced on demand.
#[derive(Clone, Debug)]
pub struct Planned {
    pub name: String,
    pub dtype: &'static str,
    pub shape: Vec<usize>,
    pub nbytes: usize,
}

/// transformers' default `max_shard_size` ("5GB").
pub const MAX_SHARD_BYTES: usize = 5_000_000_000;

fn header_bytes(tensors: &[&Planned]) -> Vec<u8> {
    let mut header = BTreeMap::new();
    header.insert(
        "__metadata__".to_string(),
        serde_json::json!({"format": "pt"}),
    );
    let mut offset = 0usize;
    for t in tensors {
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + t.nbytes]}),
        );
        offset += t.nbytes;
    }
    let mut h = serde_json::to_vec(&header).expect("header serializes");
    while (8 + h.len()) % 8 != 0 {
        h.push(b' ');
    }
    h
}

/// Writes a model's tensors into `dir` as `model.safetensors`, or as shards of at most
/// `max_shard` bytes plus `model.safetensors.index.json` (transformers' layout), pulling
/// each tensor's bytes from `produce` just before it is written, so memory holds one
/// tensor at a time. Tensors are sorted by name; each file is written atomically.
pub fn write_sharded(
    dir: &Path,
    mut planned: Vec<Planned>,
    max_shard: usize,
    mut produce: impl FnMut(&Planned) -> Result<Vec<u8>>,
) -> Result<()> {
    planned.sort_by(|a, b| a.name.cmp(&b.name));
    let mut shards: Vec<Vec<&Planned>> = vec![vec![]];
    let mut size = 0;
    for t in &planned {
        if size > 0 && size + t.nbytes > max_shard {
            shards.push(vec![]);
            size = 0;
        }
        shards.last_mut().expect("one shard").push(t);
        size += t.nbytes;
    }
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", i + 1)
        };
        let path = dir.join(&file);
        let header = header_bytes(shard);
        let mut failure = None;
        crate::fsio::write_atomic(&path, |w| {
            w.write_all(&(header.len() as u64).to_le_bytes())?;
            w.write_all(&header)?;
            for t in shard {
                let bytes = match produce(t) {
                    Ok(b) => b,
                    Err(e) => {
                        failure = Some(e);
                        return Err(std::io::Error::other("tensor production failed"));
                    }
                };
                if bytes.len() != t.nbytes {
                    failure = Some(bad(format!(
                        "tensor {}: produced {} bytes, planned {}",
                        t.name,
                        bytes.len(),
                        t.nbytes
                    )));
                    return Err(std::io::Error::other("size mismatch"));
                }
                w.write_all(&bytes)?;
            }
            Ok(())
        })
        .map_err(|e| failure.take().unwrap_or(e))?;
        for t in shard {
            weight_map.insert(t.name.clone(), file.clone());
        }
    }
    if n > 1 {
        let total: usize = planned.iter().map(|t| t.nbytes).sum();
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        crate::fsio::write_bytes_atomic(
            &dir.join("model.safetensors.index.json"),
            &serde_json::to_vec_pretty(&index).expect("json"),
        )?;
    }
    Ok(())
}

/// Bytes per element of a safetensors dtype name.
pub fn dtype_size(dtype: Dtype) -> usize {
    dtype.bitsize() / 8
}

/// Write a safetensors file atomically.
pub fn write_file(path: &Path, tensors: &[TensorOut]) -> Result<()> {
    crate::fsio::write_bytes_atomic(path, &serialize(tensors))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_files_read_back_and_validate() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("model.safetensors");
        let a = [1.0f32, -2.5, 3.25];
        write_file(
            &p,
            &[
                TensorOut::float("b", vec![3], FloatDtype::BF16, &a),
                TensorOut::float("a", vec![1, 3], FloatDtype::F32, &a),
            ],
        )
        .unwrap();
        let w = Weights::open_dir(d.path()).unwrap();
        assert_eq!(w.f32("a", &[1, 3]).unwrap(), a);
        assert_eq!(w.f32("b", &[3]).unwrap(), a); // exactly representable in bf16
        let e = w.f32("a", &[3]).unwrap_err().to_string();
        assert!(e.contains("`a`") && e.contains("[1, 3]"), "{e}");
        assert!(w
            .f32("zz", &[1])
            .unwrap_err()
            .to_string()
            .contains("`zz` is missing"));
        // the header carries the metadata transformers checks for
        let bytes = std::fs::read(&p).unwrap();
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
    }

    #[test]
    fn sharded_writes_read_back_through_the_index() {
        let d = tempfile::tempdir().unwrap();
        let planned: Vec<Planned> = (0..5)
            .map(|i| Planned {
                name: format!("t{i}"),
                dtype: "F32",
                shape: vec![4],
                nbytes: 16,
            })
            .collect();
        write_sharded(d.path(), planned, 40, |t| {
            let i: f32 = t.name[1..].parse().unwrap();
            Ok(FloatDtype::F32.encode(&[i; 4]))
        })
        .unwrap();
        assert!(d.path().join("model-00003-of-00003.safetensors").exists());
        let w = Weights::open_dir(d.path()).unwrap();
        for i in 0..5 {
            assert_eq!(w.f32(&format!("t{i}"), &[4]).unwrap(), vec![i as f32; 4]);
        }
        // a producer failure leaves no file behind and reports the real error
        let e = tempfile::tempdir().unwrap();
        let p = vec![Planned {
            name: "x".into(),
            dtype: "F32",
            shape: vec![1],
            nbytes: 4,
        }];
        let err = write_sharded(e.path(), p, 100, |_| Err(bad("boom"))).unwrap_err();
        assert!(err.to_string().contains("boom"));
        assert_eq!(std::fs::read_dir(e.path()).unwrap().count(), 0);
    }

    #[test]
    fn truncated_and_lying_files_are_bad_input() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("model.safetensors");
        let full = serialize(&[TensorOut::float("a", vec![4], FloatDtype::F32, &[0.0; 4])]);
        std::fs::write(&p, &full[..full.len() - 3]).unwrap();
        let e = Weights::open_dir(d.path()).err().unwrap();
        assert!(e.is_bad_input() && e.to_string().contains("not a valid safetensors"));
        std::fs::write(&p, &full[..5]).unwrap();
        assert!(Weights::open_dir(d.path()).err().unwrap().is_bad_input());
    }
}
