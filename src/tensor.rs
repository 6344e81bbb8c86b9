//! Tensor = shape + storage. The model code only holds `Tensor`s and calls `crate::ops`,
//! which dispatch on the storage; the CUDA backend adds its variant behind the same ops.

/// Where a tensor's elements live. CPU storage is f32 (the reference backend widens
/// bf16/f16 weights at load).
#[derive(Clone, Debug)]
pub enum Storage {
    Cpu(Vec<f32>),
}

#[derive(Clone, Debug)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub storage: Storage,
}

impl Tensor {
    pub fn from_vec(v: Vec<f32>, shape: &[usize]) -> Self {
        assert_eq!(
            v.len(),
            shape.iter().product::<usize>(),
            "tensor data does not fit shape {shape:?}"
        );
        Tensor {
            shape: shape.to_vec(),
            storage: Storage::Cpu(v),
        }
    }

    pub fn zeros(shape: &[usize]) -> Self {
        Self::from_vec(vec![0.0; shape.iter().product()], shape)
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Rows of a 2-D tensor (first dimension).
    pub fn rows(&self) -> usize {
        self.shape[0]
    }

    /// Last dimension.
    pub fn cols(&self) -> usize {
        *self.shape.last().unwrap_or(&1)
    }

    /// The CPU data. Model code above `ops` never calls this; it is for ops, tests and I/O.
    pub fn cpu(&self) -> &[f32] {
        match &self.storage {
            Storage::Cpu(v) => v,
        }
    }

    pub fn cpu_mut(&mut self) -> &mut [f32] {
        match &mut self.storage {
            Storage::Cpu(v) => v,
        }
    }

    pub fn into_vec(self) -> Vec<f32> {
        match self.storage {
            Storage::Cpu(v) => v,
        }
    }
}
