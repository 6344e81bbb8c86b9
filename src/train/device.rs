//! The trainer's state on the GPU: f32 master adapter weights and AdamW moments, the
//! bf16 copy of the adapter the model multiplies with, and the fused optimizer.
//!
//! This is the mixed precision peft + torch autocast runs: LoRA parameters and their
//! optimizer state stay f32, products run in bf16 with f32 accumulation, and adapter
//! gradients are accumulated in f32 (the GEMMs write f32 directly). One optimizer step
//! = global grad norm → (NaN check on the host) → clip folded into fused AdamW → bf16
//! refresh of the compute copy. The host sees the weights only at checkpoints.

use super::checkpoint::AdamState;
use crate::backend::cpu::optim::AdamWScalars;
use crate::backend::cuda::ops::{cast_f32_to_bf16, AdamWTensor, FusedAdamW, GradNorm};
use crate::backend::cuda::Gpu;
use crate::error::Result;
use crate::lora::Adapter;
use std::sync::Arc;

pub struct DeviceTrainer {
    gpu: Arc<Gpu>,
    /// What the model multiplies with (bf16).
    pub compute: Adapter,
    master: Adapter,
    m: Adapter,
    v: Adapter,
    /// Optimizer steps done (torch's `state["step"]`).
    pub step: u64,
    adamw: FusedAdamW,
    norm: GradNorm,
}

impl DeviceTrainer {
    /// Uploads a host adapter and its optimizer state.
    pub fn upload(adapter: &Adapter, opt: &AdamState) -> Result<DeviceTrainer> {
        let gpu = Gpu::get()?;
        Ok(DeviceTrainer {
            compute: adapter.to_device_bf16()?,
            master: adapter.to_device_f32()?,
            m: opt.m.to_device_f32()?,
            v: opt.v.to_device_f32()?,
            step: opt.step,
            adamw: FusedAdamW::new(),
            norm: GradNorm::new(&gpu)?,
            gpu,
        })
    }

    /// Zeroed f32 gradients for one step.
    pub fn zero_grads(&self) -> Result<Adapter> {
        self.compute.zeros_like()
    }

    /// The global L2 norm of `grads` before clipping (reads it back: the NaN check
    /// needs it on the host before any weight changes).
    pub fn grad_norm(&mut self, grads: &mut Adapter, max_norm: f32) -> Result<f32> {
        let mut bufs = Vec::new();
        for (_, _, p) in grads.pairs_mut() {
            let (a, b) = (&mut p.a, &mut p.b);
            bufs.push(a.f32_buf_mut()?);
            bufs.push(b.f32_buf_mut()?);
        }
        self.norm.compute(&self.gpu, &mut bufs, max_norm, false)?;
        Ok(self.norm.read(&self.gpu)?.0)
    }

    /// AdamW with the clip coefficient of the last [`grad_norm`](Self::grad_norm),
    /// then the bf16 refresh of the compute copy.
    pub fn apply(&mut self, grads: &Adapter, sc: &AdamWScalars) -> Result<()> {
        self.step += 1;
        let mut tensors = Vec::new();
        let masters = self.master.pairs_mut();
        let ms = self.m.pairs_mut();
        let vs = self.v.pairs_mut();
        for ((((_, _, p), (_, _, g)), (_, _, m)), (_, _, v)) in
            masters.zip(grads.pairs()).zip(ms).zip(vs)
        {
            tensors.push(AdamWTensor {
                param: p.a.f32_buf_mut()?,
                grad: g.a.f32_buf()?,
                m: m.a.f32_buf_mut()?,
                v: v.a.f32_buf_mut()?,
            });
            tensors.push(AdamWTensor {
                param: p.b.f32_buf_mut()?,
                grad: g.b.f32_buf()?,
                m: m.b.f32_buf_mut()?,
                v: v.b.f32_buf_mut()?,
            });
        }
        self.adamw
            .step(&self.gpu, &mut tensors, sc, Some(&self.norm))?;
        drop(tensors);
        for ((_, _, c), (_, _, p)) in self.compute.pairs_mut().zip(self.master.pairs()) {
            cast_f32_to_bf16(&self.gpu, p.a.f32_buf()?, c.a.bf16_buf_mut()?)?;
            cast_f32_to_bf16(&self.gpu, p.b.f32_buf()?, c.b.bf16_buf_mut()?)?;
        }
        Ok(())
    }

    /// The f32 master weights and optimizer state, on the host (for checkpoints).
    pub fn download(&self) -> Result<(Adapter, AdamState)> {
        Ok((
            self.master.to_cpu()?,
            AdamState {
                m: self.m.to_cpu()?,
                v: self.v.to_cpu()?,
                step: self.step,
            },
        ))
    }
}
