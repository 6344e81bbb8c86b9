//! Tensor = shape + storage. The model code only holds `Tensor`s and calls `crate::ops`,
//! which dispatch on the storage: CPU tensors go to the f32 reference
//! (`backend::cpu::ops`), device tensors to the CUDA launchers (`backend::cuda::tensor_ops`).

use crate::backend::cuda::{DeviceBuffer, Gpu};
use crate::error::{Error, Result};
use half::bf16;

/// Where a tensor's elements live and in what type. CPU storage is f32 (the reference
/// backend widens bf16/f16 weights at load); on the device activations and frozen
/// weights are bf16, adapter weights, gradients and per-row statistics f32 (DESIGN.md,
/// "Numerics").
#[derive(Debug)]
pub enum Storage {
    Cpu(Vec<f32>),
    CudaBf16(DeviceBuffer<bf16>),
    CudaF32(DeviceBuffer<f32>),
}

#[derive(Debug)]
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

    /// Zeros on the host (f32) or, with `cuda`, on the device (bf16, no host copy).
    pub fn zeros_on(shape: &[usize], cuda: bool) -> Result<Self> {
        if !cuda {
            return Ok(Self::zeros(shape));
        }
        let n = shape.iter().product();
        Ok(Tensor::cuda_bf16(Gpu::get()?.zeros(n)?, shape))
    }

    /// A bf16 device tensor over `buf` (which must hold exactly the shape's elements).
    pub fn cuda_bf16(buf: DeviceBuffer<bf16>, shape: &[usize]) -> Self {
        assert_eq!(buf.len(), shape.iter().product::<usize>(), "bf16 {shape:?}");
        Tensor {
            shape: shape.to_vec(),
            storage: Storage::CudaBf16(buf),
        }
    }

    /// An f32 device tensor over `buf`.
    pub fn cuda_f32(buf: DeviceBuffer<f32>, shape: &[usize]) -> Self {
        assert_eq!(buf.len(), shape.iter().product::<usize>(), "f32 {shape:?}");
        Tensor {
            shape: shape.to_vec(),
            storage: Storage::CudaF32(buf),
        }
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

    pub fn is_cuda(&self) -> bool {
        !matches!(self.storage, Storage::Cpu(_))
    }

    /// The CPU data. Model code above `ops` never calls this; it is for ops, tests and
    /// I/O, which only see CPU tensors (a device tensor here is a bug in palign).
    pub fn cpu(&self) -> &[f32] {
        match &self.storage {
            Storage::Cpu(v) => v,
            _ => unreachable!("Tensor::cpu on a device tensor"),
        }
    }

    pub fn cpu_mut(&mut self) -> &mut [f32] {
        match &mut self.storage {
            Storage::Cpu(v) => v,
            _ => unreachable!("Tensor::cpu_mut on a device tensor"),
        }
    }

    pub fn into_vec(self) -> Vec<f32> {
        match self.storage {
            Storage::Cpu(v) => v,
            _ => unreachable!("Tensor::into_vec on a device tensor"),
        }
    }

    /// The bf16 device buffer, or an error naming what was expected.
    pub fn bf16_buf(&self) -> Result<&DeviceBuffer<bf16>> {
        match &self.storage {
            Storage::CudaBf16(b) => Ok(b),
            _ => Err(self.wrong("a bf16 device tensor")),
        }
    }

    pub fn bf16_buf_mut(&mut self) -> Result<&mut DeviceBuffer<bf16>> {
        let e = self.wrong("a bf16 device tensor");
        match &mut self.storage {
            Storage::CudaBf16(b) => Ok(b),
            _ => Err(e),
        }
    }

    pub fn f32_buf(&self) -> Result<&DeviceBuffer<f32>> {
        match &self.storage {
            Storage::CudaF32(b) => Ok(b),
            _ => Err(self.wrong("an f32 device tensor")),
        }
    }

    pub fn f32_buf_mut(&mut self) -> Result<&mut DeviceBuffer<f32>> {
        let e = self.wrong("an f32 device tensor");
        match &mut self.storage {
            Storage::CudaF32(b) => Ok(b),
            _ => Err(e),
        }
    }

    fn wrong(&self, want: &str) -> Error {
        let have = match self.storage {
            Storage::Cpu(_) => "a CPU tensor",
            Storage::CudaBf16(_) => "a bf16 device tensor",
            Storage::CudaF32(_) => "an f32 device tensor",
        };
        Error::Cuda(format!(
            "internal: expected {want}, got {have} of shape {:?}",
            self.shape
        ))
    }

    /// A copy: plain for CPU tensors, a device-to-device copy for device tensors.
    pub fn try_clone(&self) -> Result<Tensor> {
        Ok(match &self.storage {
            Storage::Cpu(v) => Tensor::from_vec(v.clone(), &self.shape),
            Storage::CudaBf16(b) => Tensor::cuda_bf16(Gpu::get()?.copy(b)?, &self.shape),
            Storage::CudaF32(b) => Tensor::cuda_f32(Gpu::get()?.copy(b)?, &self.shape),
        })
    }

    /// The values as a CPU f32 tensor (a download for device tensors; bf16 widens exactly).
    pub fn to_cpu(&self) -> Result<Tensor> {
        Ok(match &self.storage {
            Storage::Cpu(v) => Tensor::from_vec(v.clone(), &self.shape),
            Storage::CudaBf16(b) => {
                use rayon::prelude::*;
                // In parallel: a decode step's logits are slots × vocab (8M at 256 × 32000).
                let v = Gpu::get()?.download(b)?;
                Tensor::from_vec(v.par_iter().map(|x| x.to_f32()).collect(), &self.shape)
            }
            Storage::CudaF32(b) => Tensor::from_vec(Gpu::get()?.download(b)?, &self.shape),
        })
    }

    /// A bf16 device copy (values rounded to nearest even).
    pub fn to_cuda_bf16(&self) -> Result<Tensor> {
        let gpu = Gpu::get()?;
        Ok(match &self.storage {
            Storage::Cpu(v) => {
                use rayon::prelude::*;
                let h: Vec<bf16> = v.par_iter().map(|&x| bf16::from_f32(x)).collect();
                Tensor::cuda_bf16(gpu.upload(&h)?, &self.shape)
            }
            Storage::CudaBf16(b) => Tensor::cuda_bf16(gpu.copy(b)?, &self.shape),
            Storage::CudaF32(b) => {
                let mut out = gpu.alloc::<bf16>(b.len())?;
                crate::backend::cuda::ops::cast_f32_to_bf16(&gpu, b, &mut out)?;
                Tensor::cuda_bf16(out, &self.shape)
            }
        })
    }

    /// An f32 device copy.
    pub fn to_cuda_f32(&self) -> Result<Tensor> {
        let gpu = Gpu::get()?;
        Ok(match &self.storage {
            Storage::Cpu(v) => Tensor::cuda_f32(gpu.upload(v)?, &self.shape),
            Storage::CudaF32(b) => Tensor::cuda_f32(gpu.copy(b)?, &self.shape),
            Storage::CudaBf16(b) => {
                let mut out = gpu.alloc::<f32>(b.len())?;
                crate::backend::cuda::ops::cast_bf16_to_f32(&gpu, b, &mut out)?;
                Tensor::cuda_f32(out, &self.shape)
            }
        })
    }
}
