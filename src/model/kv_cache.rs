//! KV cache for incremental decoding: per layer, the post-RoPE keys and values of every
//! sequence in flight. Each sequence owns a slot of `capacity` rows used as a ring: position
//! p lives in row `slot · capacity + p % capacity`. With Mistral's sliding window W the
//! capacity is W, so the ring holds exactly the keys a new query at position p may see
//! (p−W+1..=p, transformers' `DynamicSlidingWindowLayer` semantics); without a window it
//! is the longest sequence the run can produce.

use super::config::ModelConfig;
use crate::error::Result;
use crate::ops::{self, AttnShape};
use crate::tensor::Tensor;

pub struct KvCache {
    /// Per layer: keys / values `[slots · capacity, n_kv_heads · head_dim]`.
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    capacity: usize,
    slots: usize,
}

impl KvCache {
    /// A cache for `slots` sequences of at most `max_len` tokens each (bf16 on the
    /// device when `cuda`, else f32 on the host).
    pub fn new(cfg: &ModelConfig, slots: usize, max_len: usize, cuda: bool) -> Result<Self> {
        let capacity = Self::capacity_for(cfg, max_len);
        let shape = [slots * capacity, cfg.num_kv_heads * cfg.head_dim];
        let zeros = || Tensor::zeros_on(&shape, cuda);
        Ok(KvCache {
            k: (0..cfg.num_layers)
                .map(|_| zeros())
                .collect::<Result<_>>()?,
            v: (0..cfg.num_layers)
                .map(|_| zeros())
                .collect::<Result<_>>()?,
            capacity,
            slots,
        })
    }

    /// Rows a slot keeps for sequences of at most `max_len` tokens: Mistral's window, or
    /// the whole sequence.
    pub fn capacity_for(cfg: &ModelConfig, max_len: usize) -> usize {
        match cfg.sliding_window {
            Some(w) => w.min(max_len),
            None => max_len,
        }
        .max(1)
    }

    /// Rows kept per sequence.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn slots(&self) -> usize {
        self.slots
    }

    /// The cache row holding position `pos` of the sequence in `slot`.
    pub fn row(&self, slot: usize, pos: usize) -> usize {
        slot * self.capacity + pos % self.capacity
    }

    /// Whether position `pos` of a sequence that will have `len` tokens after this step
    /// still matters for later queries (older ones would be overwritten in the ring).
    pub fn keeps(&self, pos: usize, len: usize) -> bool {
        pos + self.capacity >= len
    }

    /// Writes row `src[i]` of this step's `k` / `v` (one layer) into cache row `dst[i]`.
    pub fn store(
        &mut self,
        layer: usize,
        src: &[usize],
        dst: &[usize],
        k: &Tensor,
        v: &Tensor,
    ) -> Result<()> {
        ops::copy_rows(&mut self.k[layer], dst, k, src)?;
        ops::copy_rows(&mut self.v[layer], dst, v, src)
    }

    /// Attention of query row i (the newest token of the sequence in `slots[i]`, whose
    /// `lens[i]` tokens including itself are stored) against that sequence's cached keys.
    pub fn attend(
        &self,
        layer: usize,
        q: &Tensor,
        slots: &[usize],
        lens: &[usize],
        shape: AttnShape,
    ) -> Result<Tensor> {
        let starts: Vec<usize> = slots.iter().map(|&s| s * self.capacity).collect();
        let visible: Vec<usize> = lens.iter().map(|&n| n.min(self.capacity)).collect();
        ops::attention_decode(q, &self.k[layer], &self.v[layer], &starts, &visible, shape)
    }
}
