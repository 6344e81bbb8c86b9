//! Flash attention on the GPU (kernels/attention.cu): forward (O and lse), backward (dQ,
//! dK, dV recomputing the probabilities) and decode (one new query per sequence against a
//! KV cache). Same semantics as `backend::cpu::ops::attention_{forward,backward,decode}`:
//! causal, GQA (query head h reads KV head h / (H / Hkv)), Mistral's sliding window
//! (query i sees keys i−W+1..=i), scale 1/√d, bf16 tensors, f32 accumulation and lse.
//!
//! Tensors are token rows: q/o/dq `[rows, H, d]`, k/v/dk/dv `[rows, Hkv, d]`, lse
//! `[rows, H]`. A [`SeqLayout`] says where each sequence's rows are: a packed batch
//! (`cu_seqlens` offsets, [`SeqLayout::packed`]) or a right-padded `[B, T]` batch
//! ([`SeqLayout::padded`]: sequence b at rows b·T .. b·T + len_b). Rows outside every
//! sequence (padding) come out as zeros in every output.
//!
//! Backward: dQ is accumulated in an f32 buffer with atomics (one kernel per KV tile adds
//! its share) and converted to bf16 by a last pass; dK/dV of a KV head are summed over its
//! query-head group inside the kernel (each block owns a KV tile and loops over the group),
//! so there is no reduction pass. `D = rowsum(dO∘O)` comes from a small pre-pass that also
//! zeroes the dQ accumulator. Workspaces come from the device's caching pool.
//!
//! Tile configurations: the forward and the backward each come in a few variants (the
//! tables [`FWD_VARIANTS`], [`BWD_VARIANTS`]; the first of each is the default).
//! [`attention_forward`] / [`attention_backward`] run the one measured fastest for the
//! shape on this GPU ([`super::attn_tune`], cached on disk), or the one
//! `PALIGN_ATTN_FWD=<name>` / `PALIGN_ATTN_BWD=<name>` (read once) names.

use std::sync::OnceLock;

use cudarc::driver::DeviceRepr;
use half::bf16;

use super::attn_tune::{bwd_candidates, AttnTuner, TuneMode};
use super::params::*;
use super::{DeviceBuffer, Gpu};
use crate::backend::cpu::ops::AttnShape;
use crate::error::{bad, Result};
use crate::packing::Packing;

// SAFETY: bindgen's #[repr(C)] translations of kernels/params.h (bytemuck::Pod is derived,
// which proves there is no padding); each is its kernel's only argument, by value.
unsafe impl DeviceRepr for AttnFwdParams {}
unsafe impl DeviceRepr for AttnBwdPrepParams {}
unsafe impl DeviceRepr for AttnBwdParams {}
unsafe impl DeviceRepr for AttnDqParams {}
unsafe impl DeviceRepr for AttnDecodeParams {}

// Tile sizes: keep in sync with the constants and instantiations in kernels/attention.cu
// (each kernel traps if its dynamic shared memory is smaller than it needs; the CPU test
// `variant_tables_match_the_kernels` in tests/gpu_attention.rs compares the tables below
// with the kernel file).
/// The smallest tile of rows any forward or backward kernel takes (the launch grid's y).
const MIN_TILE: usize = 64;
const DEC_WARPS: usize = 4;
const DEC_GROUP: usize = 8;
const DEC_UNROLL: usize = 4;
/// Launch grids' y and z limit.
const GRID_YZ: usize = 65535;
/// Shared memory a kernel may use without opting in.
const SMEM_DEFAULT: usize = 48 * 1024;
/// Opt-in shared memory per block on sm_86/sm_89 (RTX 30xx/40xx); sm_80 163 KB, sm_90 227 KB.
pub const SMEM_SM86: usize = 99 * 1024;
pub const SMEM_SM90: usize = 227 * 1024;

/// One forward kernel configuration, `fwd<D, WARPS, MT, BN, STAGES>` in
/// kernels/attention.cu: `warps` warps of `16·mt` query rows each, `bn` keys per KV tile,
/// K/V single- (`stages` 1) or double-buffered (2). With `wgmma`, `fwd_wgmma<D, WARPS / 4,
/// BN, STAGES>` instead (sm_90a only): `warps / 4` warpgroups of 64 rows (`mt` 1), K/V in
/// `stages` stages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FwdVariant {
    /// `w<warps>m<mt>n<bn>s<stages>`: what `PALIGN_ATTN_FWD` names.
    pub name: &'static str,
    pub warps: usize,
    pub mt: usize,
    pub bn: usize,
    pub stages: usize,
    /// The kernels for head_dim 64 and 128.
    pub kernels: [&'static str; 2],
    /// Offered on sm_86/sm_89 GPUs (fits their 99 KB per block at head_dim 128).
    pub sm86: bool,
    /// Its GPU parity tests have passed (tests/gpu_attention.rs, benches/RESULTS.md), so
    /// the tuner ([`super::attn_tune`]) tries it by default. So far that means on an H200
    /// (sm_90a); the sm_80/86 builds have run on kemu only.
    pub verified: bool,
    /// Warpgroup MMAs: runs only on compute capability 9.0 with sm_90a SASS
    /// ([`super::nf4::wgmma_supported`]).
    pub wgmma: bool,
    /// wgmma only (`OVL`, a `p` after the name): a tile's P·V is issued behind the next
    /// tile's S and runs under its softmax (FA3's intra-warpgroup overlap).
    pub overlap: bool,
}

impl FwdVariant {
    /// Query rows per block.
    pub const fn rows(&self) -> usize {
        16 * self.mt * self.warps
    }
    pub const fn threads(&self) -> usize {
        32 * self.warps
    }
    /// Dynamic shared memory at head_dim `d`; mirrors `fwd_smem_bytes` (and, wgmma,
    /// `fwd_wgmma_smem_bytes`: 1 KB more to align the tiles to 1024 bytes) in the kernel file.
    pub const fn smem(&self, d: usize) -> usize {
        (16 * self.mt * self.warps + 2 * self.stages * self.bn) * d * 2
            + if self.wgmma { 1024 } else { 0 }
    }
    /// Whether this variant can run on `gpu`.
    pub fn runs_on(&self, gpu: &Gpu) -> bool {
        !self.wgmma || super::nf4::wgmma_supported(gpu.compute_capability(), super::TARGETS)
    }
    pub fn kernel(&self, d: usize) -> &'static str {
        self.kernels[usize::from(d != 64)]
    }
}

/// The forward variants; the first is the default. Why these (per KV tile and warp at
/// d = 128): `w4m1n64s1` reads all of K and V (32 KB) from shared memory for 16 query rows,
/// 256 B per mma, about twice the time of the mmas themselves at 128 B/clk/SM;
/// `w4m2n64s1` gives each warp 32 rows, so every K/V fragment feeds two mmas (160 B per
/// mma with Q re-read from shared memory): FlashAttention-2's d = 128 forward tile;
/// `w4m2n64s2` adds K/V double-buffering (one barrier per tile); `w8m1n64s2` keeps 16
/// rows per warp with 8 warps and double-buffering (half the K/V loads per query).
/// `wg2n128s2` and `wg2n128s3` (sm_90a): FA3's move of the same math to warpgroup MMAs,
/// 2 warpgroups x 64 rows, 128 keys a tile, K/V in 2 or 3 stages (3: a tile's P·V stays in
/// flight across the next barrier); `wg2n128s3p`: s3 with FA3's intra-warpgroup overlap
/// (a tile's softmax runs while the previous tile's P·V is on the tensor cores);
/// `wg2n64s2`: 64-key tiles, small enough (97 KB, 126 registers) for two blocks an SM,
/// whose softmax and wgmmas can then overlap.
pub static FWD_VARIANTS: [FwdVariant; 8] = [
    FwdVariant {
        name: "w4m1n64s1",
        warps: 4,
        mt: 1,
        bn: 64,
        stages: 1,
        kernels: ["attention_fwd_bf16_d64", "attention_fwd_bf16_d128"],
        sm86: true,
        verified: true,
        wgmma: false,
        overlap: false,
    },
    FwdVariant {
        name: "w4m2n64s1",
        warps: 4,
        mt: 2,
        bn: 64,
        stages: 1,
        kernels: [
            "attention_fwd_w4m2n64s1_bf16_d64",
            "attention_fwd_w4m2n64s1_bf16_d128",
        ],
        sm86: true,
        verified: true,
        wgmma: false,
        overlap: false,
    },
    FwdVariant {
        name: "w4m2n64s2",
        warps: 4,
        mt: 2,
        bn: 64,
        stages: 2,
        kernels: [
            "attention_fwd_w4m2n64s2_bf16_d64",
            "attention_fwd_w4m2n64s2_bf16_d128",
        ],
        sm86: true,
        verified: true,
        wgmma: false,
        overlap: false,
    },
    FwdVariant {
        name: "w8m1n64s2",
        warps: 8,
        mt: 1,
        bn: 64,
        stages: 2,
        kernels: [
            "attention_fwd_w8m1n64s2_bf16_d64",
            "attention_fwd_w8m1n64s2_bf16_d128",
        ],
        sm86: true,
        verified: true,
        wgmma: false,
        overlap: false,
    },
    FwdVariant {
        name: "wg2n128s2",
        warps: 8,
        mt: 1,
        bn: 128,
        stages: 2,
        kernels: [
            "attention_fwd_wg2n128s2_bf16_d64",
            "attention_fwd_wg2n128s2_bf16_d128",
        ],
        sm86: false,
        verified: false,
        wgmma: true,
        overlap: false,
    },
    FwdVariant {
        name: "wg2n128s3",
        warps: 8,
        mt: 1,
        bn: 128,
        stages: 3,
        kernels: [
            "attention_fwd_wg2n128s3_bf16_d64",
            "attention_fwd_wg2n128s3_bf16_d128",
        ],
        sm86: false,
        verified: false,
        wgmma: true,
        overlap: false,
    },
    FwdVariant {
        name: "wg2n128s3p",
        warps: 8,
        mt: 1,
        bn: 128,
        stages: 3,
        kernels: [
            "attention_fwd_wg2n128s3p_bf16_d64",
            "attention_fwd_wg2n128s3p_bf16_d128",
        ],
        sm86: false,
        verified: false,
        wgmma: true,
        overlap: true,
    },
    FwdVariant {
        name: "wg2n64s2",
        warps: 8,
        mt: 1,
        bn: 64,
        stages: 2,
        kernels: [
            "attention_fwd_wg2n64s2_bf16_d64",
            "attention_fwd_wg2n64s2_bf16_d128",
        ],
        sm86: false,
        verified: false,
        wgmma: true,
        overlap: false,
    },
];

// The default forward never needs the opt-in (it runs on every sm_80+ GPU as is), and no
// kernel takes a smaller tile than the grid limit in SeqSpec::new assumes.
const _: () = {
    assert!(FWD_VARIANTS[0].smem(128) <= SMEM_DEFAULT);
    let mut i = 0;
    while i < FWD_VARIANTS.len() {
        assert!(FWD_VARIANTS[i].rows() >= MIN_TILE);
        i += 1;
    }
    let mut i = 0;
    while i < BWD_VARIANTS.len() {
        assert!(BWD_VARIANTS[i].keys() >= MIN_TILE);
        i += 1;
    }
};

/// The forward variant called `name`.
pub fn fwd_variant(name: &str) -> Result<&'static FwdVariant> {
    FWD_VARIANTS.iter().find(|v| v.name == name).ok_or_else(|| {
        let known: Vec<&str> = FWD_VARIANTS.iter().map(|v| v.name).collect();
        bad(format!(
            "no attention forward variant {name:?} (known: {})",
            known.join(", ")
        ))
    })
}

/// One backward kernel configuration, `bwd<D, WARPS, BM, STAGES, ASYNC>` in
/// kernels/attention.cu: `warps` warps of 16 keys each, `bm` queries per step, Q/dO/lse/D
/// single- or double-buffered, and (`async_io`) lse/D by cp.async and paired dQ atomics.
/// With `warp_grid`, `bwdg<D, WARPS, BM, STAGES>` instead: the same block of `16·warps`
/// keys, each product tiled over the warps as a grid, Pᵀ and dSᵀ through shared memory
/// (always `async_io`). With `wgmma`, `bwd_wgmma<D, WARPS / 4, BM, STAGES>` (sm_90a only):
/// warpgroups of 64 keys, dSᵀ through shared memory (also `async_io`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BwdConfig {
    /// `w<warps>q<bm>s<stages>` plus `a` for `async_io`: what `PALIGN_ATTN_BWD` names.
    pub name: &'static str,
    pub warps: usize,
    pub bm: usize,
    pub stages: usize,
    pub async_io: bool,
    /// `bwdg` (warp-grid tiling) rather than `bwd` (16 keys per warp).
    pub warp_grid: bool,
    /// The kernels for head_dim 64 and 128, where there is one.
    pub kernels: [Option<&'static str>; 2],
    /// Offered on sm_86/sm_89 GPUs (fits their 99 KB per block at head_dim 128).
    pub sm86: bool,
    /// Its GPU parity tests have passed (on an H200 so far), so the tuner tries it by
    /// default.
    pub verified: bool,
    /// Warpgroup MMAs: runs only on compute capability 9.0 with sm_90a SASS.
    pub wgmma: bool,
}

impl BwdConfig {
    /// Keys per block.
    pub const fn keys(&self) -> usize {
        16 * self.warps
    }
    pub const fn threads(&self) -> usize {
        32 * self.warps
    }
    /// Dynamic shared memory at head_dim `d`; mirrors `bwd_smem_bytes` (`bwdg_smem_bytes`
    /// with `warp_grid`: Pᵀ as well as dSᵀ; `bwd_wgmma_smem_bytes` with `wgmma`: 1 KB to
    /// align the tiles) in the kernel file.
    pub const fn smem(&self, d: usize) -> usize {
        let (bn, bm, st) = (self.keys(), self.bm, self.stages);
        let staged = if self.warp_grid { 2 } else { 1 }; // [keys][queries] bf16 tiles
        (2 * bn * d + 2 * st * bm * d + staged * bn * bm) * 2
            + 2 * st * bm * 4
            + if self.wgmma { 1024 } else { 0 }
    }
    /// Whether this variant can run on `gpu`.
    pub fn runs_on(&self, gpu: &Gpu) -> bool {
        !self.wgmma || super::nf4::wgmma_supported(gpu.compute_capability(), super::TARGETS)
    }
    pub fn kernel(&self, d: usize) -> Option<&'static str> {
        self.kernels[usize::from(d != 64)]
    }
}

/// The backward variants; the first is the default where it fits (the second where not).
/// `w8q64s2a`, `w4q64s2a`: lse/D by cp.async instead of loads that stall two warps in every
/// prefetch, dQ by paired atomics; `w4q64s2a` also runs two 4-warp blocks per H100 SM
/// (105 KB each) instead of one 8-warp block, so one block's barriers overlap the other's
/// work, at twice the dQ atomics per FLOP.
/// `w8q64s2g`, `w4q64s2g`: FlashAttention-2's backward warp layout (a 32 x 32 tile of Sᵀ
/// and dPᵀ per warp, 32 keys x d/2 of dK/dV, Pᵀ/dSᵀ through shared memory): each ldmatrix
/// fragment feeds 2-4 mmas instead of 2, 243 B of shared-memory traffic per mma at d = 128
/// instead of 301; `w4q64s2g` fits two blocks per H100 SM (113 KB each).
/// `wg2q64s2` (sm_90a, head_dim 128): the same products on warpgroup MMAs, FA3's move.
pub static BWD_VARIANTS: [BwdConfig; 7] = [
    BwdConfig {
        name: "w8q64s2",
        warps: 8,
        bm: 64,
        stages: 2,
        async_io: false,
        warp_grid: false,
        kernels: [
            Some("attention_bwd_bf16_d64"),
            Some("attention_bwd_bf16_d128"),
        ],
        sm86: false,
        verified: true,
        wgmma: false,
    },
    BwdConfig {
        name: "w4q64s1",
        warps: 4,
        bm: 64,
        stages: 1,
        async_io: false,
        warp_grid: false,
        kernels: [None, Some("attention_bwd_small_bf16_d128")],
        sm86: true,
        verified: true,
        wgmma: false,
    },
    BwdConfig {
        name: "w8q64s2a",
        warps: 8,
        bm: 64,
        stages: 2,
        async_io: true,
        warp_grid: false,
        kernels: [
            Some("attention_bwd_w8q64s2a_bf16_d64"),
            Some("attention_bwd_w8q64s2a_bf16_d128"),
        ],
        sm86: false,
        verified: true,
        wgmma: false,
    },
    BwdConfig {
        name: "w4q64s2a",
        warps: 4,
        bm: 64,
        stages: 2,
        async_io: true,
        warp_grid: false,
        kernels: [
            Some("attention_bwd_w4q64s2a_bf16_d64"),
            Some("attention_bwd_w4q64s2a_bf16_d128"),
        ],
        sm86: false,
        verified: true,
        wgmma: false,
    },
    BwdConfig {
        name: "w8q64s2g",
        warps: 8,
        bm: 64,
        stages: 2,
        async_io: true,
        warp_grid: true,
        kernels: [
            Some("attention_bwd_w8q64s2g_bf16_d64"),
            Some("attention_bwd_w8q64s2g_bf16_d128"),
        ],
        sm86: false,
        verified: true,
        wgmma: false,
    },
    BwdConfig {
        name: "w4q64s2g",
        warps: 4,
        bm: 64,
        stages: 2,
        async_io: true,
        warp_grid: true,
        kernels: [
            Some("attention_bwd_w4q64s2g_bf16_d64"),
            Some("attention_bwd_w4q64s2g_bf16_d128"),
        ],
        sm86: false,
        verified: true,
        wgmma: false,
    },
    BwdConfig {
        name: "wg2q64s2",
        warps: 8,
        bm: 64,
        stages: 2,
        async_io: true,
        warp_grid: false,
        kernels: [None, Some("attention_bwd_wg2q64s2_bf16_d128")],
        sm86: false,
        verified: false,
        wgmma: true,
    },
];

/// The backward variant called `name`.
pub fn bwd_variant(name: &str) -> Result<&'static BwdConfig> {
    BWD_VARIANTS.iter().find(|v| v.name == name).ok_or_else(|| {
        let known: Vec<&str> = BWD_VARIANTS.iter().map(|v| v.name).collect();
        bad(format!(
            "no attention backward variant {name:?} (known: {})",
            known.join(", ")
        ))
    })
}

/// The variant an environment variable names, read once per process (`None`: unset or
/// empty). An unknown name is an error at every launch, not a silent fallback.
fn env_variant<T: 'static>(
    cell: &'static OnceLock<std::result::Result<Option<&'static T>, String>>,
    var: &str,
    find: fn(&str) -> Result<&'static T>,
) -> Result<Option<&'static T>> {
    cell.get_or_init(|| match std::env::var(var) {
        Ok(v) if v.is_empty() => Ok(None),
        Ok(v) => find(&v).map(Some).map_err(|e| format!("{var}: {e}")),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(e) => Err(format!("{var}: {e}")),
    })
    .clone()
    .map_err(bad)
}

/// The forward variant `PALIGN_ATTN_FWD` names, if set.
pub fn fwd_variant_from_env() -> Result<Option<&'static FwdVariant>> {
    static CELL: OnceLock<std::result::Result<Option<&'static FwdVariant>, String>> =
        OnceLock::new();
    env_variant(&CELL, "PALIGN_ATTN_FWD", fwd_variant)
}

/// The backward variant `PALIGN_ATTN_BWD` names, if set.
pub fn bwd_variant_from_env() -> Result<Option<&'static BwdConfig>> {
    static CELL: OnceLock<std::result::Result<Option<&'static BwdConfig>, String>> =
        OnceLock::new();
    env_variant(&CELL, "PALIGN_ATTN_BWD", bwd_variant)
}

/// Which backward kernel runs. `Auto` takes `PALIGN_ATTN_BWD` when set, else `Large` when
/// the GPU has the shared memory (A100, H100: up to 227 KB per block), else `Small` (RTX
/// 30xx/40xx: 99 KB).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BwdVariant {
    Auto,
    /// 8 warps, 128 keys per block, double-buffered query tiles (`w8q64s2`).
    Large,
    /// head_dim 128 only: 4 warps, 64 keys per block, single-buffered, 74 KB (`w4q64s1`).
    Small,
    /// A row of [`BWD_VARIANTS`].
    Named(&'static BwdConfig),
}

/// Where each sequence's rows are (host side, validated): sequence s is rows
/// `starts[s] .. starts[s] + lens[s]` of `n_rows`.
#[derive(Clone, Debug)]
pub struct SeqSpec {
    starts: Vec<usize>,
    lens: Vec<usize>,
    n_rows: usize,
    /// Every row belongs to a sequence (no padding to zero).
    dense: bool,
}

impl SeqSpec {
    /// A packed batch from `cu_seqlens`-style offsets: sequence s is rows
    /// `offsets[s]..offsets[s+1]` (offsets start at 0 and never decrease).
    pub fn packed(offsets: &[usize]) -> Result<SeqSpec> {
        if offsets.first() != Some(&0) {
            return Err(bad("attention: sequence offsets must start with 0"));
        }
        if let Some(w) = offsets.windows(2).find(|w| w[1] < w[0]) {
            return Err(bad(format!(
                "attention: sequence offsets decrease ({} then {})",
                w[0], w[1]
            )));
        }
        let starts = offsets[..offsets.len() - 1].to_vec();
        let lens = offsets.windows(2).map(|w| w[1] - w[0]).collect();
        Self::new(starts, lens, offsets[offsets.len() - 1], true)
    }

    /// A right-padded `[B, T]` batch: sequence b is rows `b·T .. b·T + lens[b]`, the rest of
    /// its T rows are padding (outputs there are zero).
    pub fn padded(padded_len: usize, lens: &[usize]) -> Result<SeqSpec> {
        if let Some((b, &l)) = lens.iter().enumerate().find(|(_, &l)| l > padded_len) {
            return Err(bad(format!(
                "attention: sequence {b} has {l} tokens, more than the padded length {padded_len}"
            )));
        }
        let starts = (0..lens.len()).map(|b| b * padded_len).collect();
        let dense = lens.iter().all(|&l| l == padded_len);
        let rows = lens
            .len()
            .checked_mul(padded_len)
            .ok_or_else(|| bad("attention: padded batch too large"))?;
        Self::new(starts, lens.to_vec(), rows, dense)
    }

    fn new(starts: Vec<usize>, lens: Vec<usize>, n_rows: usize, dense: bool) -> Result<SeqSpec> {
        if starts.is_empty() {
            return Err(bad("attention: a batch needs at least one sequence"));
        }
        if n_rows > i32::MAX as usize {
            return Err(bad(format!(
                "attention: {n_rows} token rows exceed the kernels' i32 row index"
            )));
        }
        let max_len = lens.iter().copied().max().unwrap_or(0);
        if max_len.div_ceil(MIN_TILE) > GRID_YZ {
            return Err(bad(format!(
                "attention: a sequence of {max_len} tokens is longer than the kernels support"
            )));
        }
        Ok(SeqSpec {
            starts,
            lens,
            n_rows,
            dense,
        })
    }

    pub fn n_seqs(&self) -> usize {
        self.starts.len()
    }
    /// Token rows the tensors must have.
    pub fn n_rows(&self) -> usize {
        self.n_rows
    }
    pub fn max_len(&self) -> usize {
        self.lens.iter().copied().max().unwrap_or(0)
    }
}

/// A [`SeqSpec`] on the device. Build it once per batch and reuse it for every layer.
pub struct SeqLayout {
    starts: DeviceBuffer<u32>,
    lens: DeviceBuffer<u32>,
    n_rows: usize,
    max_len: usize,
    dense: bool,
}

impl SeqLayout {
    pub fn new(gpu: &Gpu, spec: &SeqSpec) -> Result<SeqLayout> {
        let to_u32 = |v: &[usize]| -> Vec<u32> { v.iter().map(|&x| x as u32).collect() };
        Ok(SeqLayout {
            starts: gpu.upload(&to_u32(&spec.starts))?,
            lens: gpu.upload(&to_u32(&spec.lens))?,
            n_rows: spec.n_rows,
            max_len: spec.max_len(),
            dense: spec.dense,
        })
    }

    /// [`SeqSpec::packed`] on the device.
    pub fn packed(gpu: &Gpu, offsets: &[usize]) -> Result<SeqLayout> {
        Self::new(gpu, &SeqSpec::packed(offsets)?)
    }

    /// The CPU backend's packing of a batch.
    pub fn from_packing(gpu: &Gpu, pack: &Packing) -> Result<SeqLayout> {
        Self::packed(gpu, &pack.offsets)
    }

    /// [`SeqSpec::padded`] on the device.
    pub fn padded(gpu: &Gpu, padded_len: usize, lens: &[usize]) -> Result<SeqLayout> {
        Self::new(gpu, &SeqSpec::padded(padded_len, lens)?)
    }

    pub fn n_seqs(&self) -> usize {
        self.starts.len()
    }
    pub fn n_rows(&self) -> usize {
        self.n_rows
    }
    pub fn max_len(&self) -> usize {
        self.max_len
    }
}

/// Whether the CUDA kernels take this shape (head_dim 64 or 128, H a multiple of Hkv, a
/// window of at least 1); every launcher checks it first.
pub fn check_shape(shape: &AttnShape) -> Result<()> {
    shape_params(shape).map(|_| ())
}

/// (H, Hkv, d, window or 0, scale) of a valid shape.
fn shape_params(shape: &AttnShape) -> Result<(usize, usize, usize, i32, f32)> {
    let AttnShape {
        n_heads: h,
        n_kv_heads: hkv,
        head_dim: d,
        window,
    } = *shape;
    if d != 64 && d != 128 {
        return Err(bad(format!(
            "attention: head_dim {d} is not supported by the CUDA kernels (64 or 128)"
        )));
    }
    if hkv == 0 || h == 0 || !h.is_multiple_of(hkv) {
        return Err(bad(format!(
            "attention: {h} query heads are not a multiple of {hkv} KV heads"
        )));
    }
    let w = match window {
        Some(0) => return Err(bad("attention: a sliding window must be at least 1")),
        // Windows past i32 mean "no window" for any sequence the kernels accept.
        Some(w) => w.min(i32::MAX as usize) as i32,
        None => 0,
    };
    if h.checked_mul(d).is_none_or(|x| x > i32::MAX as usize) {
        return Err(bad(format!("attention: {h} heads of {d} are too many")));
    }
    Ok((h, hkv, d, w, 1.0 / (d as f32).sqrt()))
}

fn need<T: bytemuck::Pod>(buf: &DeviceBuffer<T>, n: usize, what: &str) -> Result<()> {
    super::launch::need(buf, n, &format!("attention {what}"))
}

fn grid_x(n: usize, what: &str) -> Result<u32> {
    u32::try_from(n)
        .ok()
        .filter(|&x| x <= i32::MAX as u32)
        .ok_or_else(|| bad(format!("attention: {what} = {n} exceeds the launch grid")))
}

fn launch<P: DeviceRepr>(
    gpu: &Gpu,
    name: &'static str,
    grid: (u32, u32, u32),
    block: u32,
    smem: usize,
    params: &P,
) -> Result<()> {
    if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
        return Ok(());
    }
    gpu.function(name)?; // a missing kernel is named before any shared-memory opt-in
    if smem > SMEM_DEFAULT {
        gpu.opt_in_smem(name, smem)?;
    }
    gpu.launch_grid(name, grid, block, smem as u32, params)
}

/// Forward: `out` (bf16 `[rows, H, d]`) and `lse` (f32 `[rows, H]`, natural log) from q,
/// k, v. Padding rows of the layout are zero in both. Runs the variant
/// `PALIGN_ATTN_FWD` names, else the one measured fastest for this shape on this GPU
/// ([`AttnTuner`]).
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    gpu: &Gpu,
    q: &DeviceBuffer<bf16>,
    k: &DeviceBuffer<bf16>,
    v: &DeviceBuffer<bf16>,
    layout: &SeqLayout,
    shape: AttnShape,
    out: &mut DeviceBuffer<bf16>,
    lse: &mut DeviceBuffer<f32>,
) -> Result<()> {
    check_shape(&shape)?;
    AttnTuner::global(gpu)?
        .forward(gpu, q, k, v, layout, shape, out, lse)
        .map(|_| ())
}

/// [`attention_forward`] with a chosen kernel variant (tests and benches run them all).
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_with(
    gpu: &Gpu,
    q: &DeviceBuffer<bf16>,
    k: &DeviceBuffer<bf16>,
    v: &DeviceBuffer<bf16>,
    layout: &SeqLayout,
    shape: AttnShape,
    out: &mut DeviceBuffer<bf16>,
    lse: &mut DeviceBuffer<f32>,
    variant: &'static FwdVariant,
) -> Result<()> {
    let (h, hkv, d, window, scale) = shape_params(&shape)?;
    if !variant.runs_on(gpu) {
        return Err(bad(format!(
            "attention forward variant {} needs an sm_90a GPU (compute capability 9.0) and \
             a build with sm_90a in PALIGN_CUDA_ARCHS",
            variant.name
        )));
    }
    let rows = layout.n_rows;
    need(q, rows * h * d, "q")?;
    need(k, rows * hkv * d, "k")?;
    need(v, rows * hkv * d, "v")?;
    need(out, rows * h * d, "out")?;
    need(lse, rows * h, "lse")?;
    if !layout.dense {
        gpu.memset_zero(out)?;
        gpu.memset_zero(lse)?;
    }
    let p = AttnFwdParams {
        o: out.ptr(),
        lse: lse.ptr(),
        q: q.ptr(),
        k: k.ptr(),
        v: v.ptr(),
        seq_start: layout.starts.ptr(),
        seq_len: layout.lens.ptr(),
        n_seqs: layout.n_seqs() as i32,
        n_heads: h as i32,
        n_kv_heads: hkv as i32,
        window,
        scale,
        _pad: 0,
    };
    let grid = (
        grid_x(h * layout.n_seqs(), "heads x sequences")?,
        layout.max_len.div_ceil(variant.rows()) as u32,
        1,
    );
    launch(
        gpu,
        variant.kernel(d),
        grid,
        variant.threads() as u32,
        variant.smem(d),
        &p,
    )
}

/// Saved forward tensors and the output gradient for [`attention_backward`].
#[derive(Clone, Copy)]
pub struct AttnGradInputs<'a> {
    pub q: &'a DeviceBuffer<bf16>,
    pub k: &'a DeviceBuffer<bf16>,
    pub v: &'a DeviceBuffer<bf16>,
    /// The forward's output.
    pub o: &'a DeviceBuffer<bf16>,
    /// Gradient of the loss with respect to `o`.
    pub d_o: &'a DeviceBuffer<bf16>,
    /// The forward's log-sum-exp.
    pub lse: &'a DeviceBuffer<f32>,
}

/// The gradients [`attention_backward`] writes (all overwritten).
pub struct AttnGrads<'a> {
    pub dq: &'a mut DeviceBuffer<bf16>,
    pub dk: &'a mut DeviceBuffer<bf16>,
    pub dv: &'a mut DeviceBuffer<bf16>,
}

/// Backward: dQ, dK, dV (bf16) from the saved q, k, v, o, lse and dO. Padding rows are
/// zero. Uses `rows·H·(d+1)` f32 of pool workspace. Runs the variant `PALIGN_ATTN_BWD`
/// names, else the one measured fastest for this shape on this GPU ([`AttnTuner`]).
pub fn attention_backward(
    gpu: &Gpu,
    x: AttnGradInputs<'_>,
    layout: &SeqLayout,
    shape: AttnShape,
    grads: AttnGrads<'_>,
) -> Result<()> {
    check_shape(&shape)?;
    AttnTuner::global(gpu)?
        .backward(gpu, x, layout, shape, grads)
        .map(|_| ())
}

/// [`attention_backward`] with a chosen kernel (tests run both on one GPU).
pub fn attention_backward_with(
    gpu: &Gpu,
    x: AttnGradInputs<'_>,
    layout: &SeqLayout,
    shape: AttnShape,
    grads: AttnGrads<'_>,
    variant: BwdVariant,
) -> Result<()> {
    let (h, hkv, d, window, scale) = shape_params(&shape)?;
    let rows = layout.n_rows;
    let (nq, nkv) = (rows * h * d, rows * hkv * d);
    need(x.q, nq, "q")?;
    need(x.k, nkv, "k")?;
    need(x.v, nkv, "v")?;
    need(x.o, nq, "o")?;
    need(x.d_o, nq, "d_o")?;
    need(x.lse, rows * h, "lse")?;
    need(grads.dq, nq, "dq")?;
    need(grads.dk, nkv, "dk")?;
    need(grads.dv, nkv, "dv")?;
    if variant == BwdVariant::Small && d != 128 {
        return Err(bad(
            "attention backward: the small kernel is for head_dim 128",
        ));
    }
    let config = match variant {
        BwdVariant::Large => &BWD_VARIANTS[0],
        BwdVariant::Small => &BWD_VARIANTS[1],
        BwdVariant::Named(c) => c,
        // The tuner's reference: the default where it fits, else the small kernel.
        BwdVariant::Auto => match bwd_variant_from_env()? {
            Some(c) => c,
            None => bwd_candidates(d, gpu.max_smem_optin()?, false, TuneMode::Off)
                .first()
                .copied()
                .unwrap_or(&BWD_VARIANTS[0]),
        },
    };
    if !config.runs_on(gpu) {
        return Err(bad(format!(
            "attention backward variant {} needs an sm_90a GPU (compute capability 9.0) and \
             a build with sm_90a in PALIGN_CUDA_ARCHS",
            config.name
        )));
    }
    let kernel = config.kernel(d).ok_or_else(|| {
        bad(format!(
            "attention backward: variant {} has no head_dim {d} kernel",
            config.name
        ))
    })?;

    let delta = gpu.alloc::<f32>(rows * h)?;
    let dq_accum = gpu.alloc::<f32>(nq)?;
    let prep = AttnBwdPrepParams {
        delta: delta.ptr(),
        dq_accum: dq_accum.ptr(),
        o: x.o.ptr(),
        d_o: x.d_o.ptr(),
        n_rows: rows as i32,
        n_heads: h as i32,
        head_dim: d as i32,
        _pad: 0,
    };
    // One warp per (row, head), 8 per block.
    let prep_grid = grid_x((rows * h).div_ceil(8), "rows x heads")?;
    launch(
        gpu,
        "attention_bwd_prep_bf16",
        (prep_grid, 1, 1),
        256,
        0,
        &prep,
    )?;
    if !layout.dense {
        gpu.memset_zero(grads.dk)?;
        gpu.memset_zero(grads.dv)?;
    }
    let p = AttnBwdParams {
        dq_accum: dq_accum.ptr(),
        dk: grads.dk.ptr(),
        dv: grads.dv.ptr(),
        q: x.q.ptr(),
        k: x.k.ptr(),
        v: x.v.ptr(),
        d_o: x.d_o.ptr(),
        lse: x.lse.ptr(),
        delta: delta.ptr(),
        seq_start: layout.starts.ptr(),
        seq_len: layout.lens.ptr(),
        n_seqs: layout.n_seqs() as i32,
        n_heads: h as i32,
        n_kv_heads: hkv as i32,
        window,
        scale,
        _pad: 0,
    };
    let grid = (
        grid_x(hkv * layout.n_seqs(), "KV heads x sequences")?,
        layout.max_len.div_ceil(config.keys()) as u32,
        1,
    );
    launch(
        gpu,
        kernel,
        grid,
        config.threads() as u32,
        config.smem(d),
        &p,
    )?;
    let dq = AttnDqParams {
        dq: grads.dq.ptr(),
        dq_accum: dq_accum.ptr(),
        n: nq as i64,
        scale,
        _pad: 0,
    };
    let dq_grid = (nq / 4).div_ceil(256).min(gpu.sm_count() as usize * 16) as u32;
    launch(gpu, "attention_bwd_dq_bf16", (dq_grid, 1, 1), 256, 0, &dq)?;
    // The workspaces go back to the pool; the stream orders their next use after ours.
    drop((delta, dq_accum));
    Ok(())
}

/// One decode step's sequences (host side, validated): for query i, cache position `pos` of
/// its sequence is row `slot_starts[i] + pos % capacity` and `lens[i]` positions (the new
/// token included) are stored; with a window W it sees positions `max(0, len − W) .. len`.
/// `capacity` is the ring size per slot (`KvCache`: the window, or the longest sequence).
#[derive(Clone, Debug)]
pub struct DecodeSpec {
    slot_starts: Vec<usize>,
    lens: Vec<usize>,
    capacity: usize,
    window: Option<usize>,
    cache_rows: usize,
    max_visible: usize,
}

impl DecodeSpec {
    pub fn new(
        slot_starts: &[usize],
        lens: &[usize],
        capacity: usize,
        window: Option<usize>,
        cache_rows: usize,
    ) -> Result<DecodeSpec> {
        if slot_starts.len() != lens.len() || lens.is_empty() {
            return Err(bad(format!(
                "attention decode: {} slot starts for {} sequences",
                slot_starts.len(),
                lens.len()
            )));
        }
        if lens.len() > GRID_YZ {
            return Err(bad(format!(
                "attention decode: {} sequences in one step (at most {GRID_YZ})",
                lens.len()
            )));
        }
        if capacity == 0 || capacity > i32::MAX as usize || cache_rows > i32::MAX as usize {
            return Err(bad(format!(
                "attention decode: capacity {capacity} / cache rows {cache_rows} out of range"
            )));
        }
        if window == Some(0) {
            return Err(bad("attention decode: a sliding window must be at least 1"));
        }
        let mut max_visible = 0;
        for (i, (&start, &len)) in slot_starts.iter().zip(lens).enumerate() {
            if len == 0 || len > i32::MAX as usize {
                return Err(bad(format!(
                    "attention decode: sequence {i} has {len} cached tokens (needs at least the new one)"
                )));
            }
            let visible = window.map_or(len, |w| len.min(w));
            if visible > capacity {
                return Err(bad(format!(
                    "attention decode: sequence {i} sees {visible} positions but its ring holds {capacity}"
                )));
            }
            if start.saturating_add(len.min(capacity)) > cache_rows {
                return Err(bad(format!(
                    "attention decode: sequence {i} (rows from {start}) runs past the {cache_rows} cache rows"
                )));
            }
            max_visible = max_visible.max(visible);
        }
        Ok(DecodeSpec {
            slot_starts: slot_starts.to_vec(),
            lens: lens.to_vec(),
            capacity,
            window,
            cache_rows,
            max_visible,
        })
    }
}

/// A [`DecodeSpec`] on the device (one per decode step, shared by the layers).
pub struct DecodeBatch {
    slot_start: DeviceBuffer<u32>,
    seq_len: DeviceBuffer<u32>,
    capacity: usize,
    window: Option<usize>,
    cache_rows: usize,
    max_visible: usize,
}

impl DecodeBatch {
    pub fn new(gpu: &Gpu, spec: &DecodeSpec) -> Result<DecodeBatch> {
        let to_u32 = |v: &[usize]| -> Vec<u32> { v.iter().map(|&x| x as u32).collect() };
        Ok(DecodeBatch {
            slot_start: gpu.upload(&to_u32(&spec.slot_starts))?,
            seq_len: gpu.upload(&to_u32(&spec.lens))?,
            capacity: spec.capacity,
            window: spec.window,
            cache_rows: spec.cache_rows,
            max_visible: spec.max_visible,
        })
    }

    pub fn n(&self) -> usize {
        self.seq_len.len()
    }
}

/// The KV cache of one layer: k and v `[cache rows, Hkv, d]`.
pub struct KvCacheView<'a> {
    pub k: &'a DeviceBuffer<bf16>,
    pub v: &'a DeviceBuffer<bf16>,
}

/// Decode attention: `out[i]` (bf16 `[n, H, d]`) for the new query `q[i]` (`[n, H, d]`)
/// of each sequence of `batch` against the cache. Splits long caches over several blocks.
pub fn attention_decode(
    gpu: &Gpu,
    q: &DeviceBuffer<bf16>,
    cache: KvCacheView<'_>,
    batch: &DecodeBatch,
    shape: AttnShape,
    out: &mut DeviceBuffer<bf16>,
) -> Result<()> {
    attention_decode_with(gpu, q, cache, batch, shape, out, None)
}

/// [`attention_decode`] with the number of splits of the cache positions chosen by the
/// caller (`None`: enough blocks to fill the GPU, at least 128 positions each).
pub fn attention_decode_with(
    gpu: &Gpu,
    q: &DeviceBuffer<bf16>,
    cache: KvCacheView<'_>,
    batch: &DecodeBatch,
    shape: AttnShape,
    out: &mut DeviceBuffer<bf16>,
    splits: Option<usize>,
) -> Result<()> {
    let (h, hkv, d, window, scale) = shape_params(&shape)?;
    if shape.window != batch.window {
        return Err(bad(format!(
            "attention decode: the batch was built for window {:?}, the shape has {:?}",
            batch.window, shape.window
        )));
    }
    let n = batch.n();
    need(q, n * h * d, "q")?;
    need(out, n * h * d, "out")?;
    need(cache.k, batch.cache_rows * hkv * d, "k cache")?;
    need(cache.v, batch.cache_rows * hkv * d, "v cache")?;
    let group = h / hkv;
    let head_chunks = group.div_ceil(DEC_GROUP);
    let blocks = n * hkv * head_chunks;
    let max_vis = batch.max_visible.max(1);
    let want = match splits {
        Some(0) => return Err(bad("attention decode: at least one split")),
        Some(s) => s,
        None if max_vis <= 256 => 1,
        None => (2 * gpu.sm_count() as usize)
            .div_ceil(blocks)
            .min(max_vis.div_ceil(128)),
    };
    // Whole groups of DEC_WARPS·DEC_UNROLL positions per split.
    let quantum = DEC_WARPS * DEC_UNROLL;
    let split_size = max_vis.div_ceil(want.max(1)).div_ceil(quantum) * quantum;
    let n_splits = max_vis.div_ceil(split_size);
    let (part_o, part_ml) = if n_splits > 1 {
        (
            Some(gpu.alloc::<f32>(n * h * n_splits * d)?),
            Some(gpu.alloc::<f32>(n * h * n_splits * 2)?),
        )
    } else {
        (None, None)
    };
    let p = AttnDecodeParams {
        out: out.ptr(),
        part_o: part_o.as_ref().map_or(0, |b| b.ptr()),
        part_ml: part_ml.as_ref().map_or(0, |b| b.ptr()),
        q: q.ptr(),
        k_cache: cache.k.ptr(),
        v_cache: cache.v.ptr(),
        slot_start: batch.slot_start.ptr(),
        seq_len: batch.seq_len.ptr(),
        n: n as i32,
        n_heads: h as i32,
        n_kv_heads: hkv as i32,
        head_dim: d as i32,
        window,
        capacity: batch.capacity as i32,
        n_splits: n_splits as i32,
        split_size: split_size as i32,
        head_chunks: head_chunks as i32,
        scale,
    };
    let name = if d == 64 {
        "attention_decode_bf16_d64"
    } else {
        "attention_decode_bf16_d128"
    };
    let grid = (
        grid_x(n_splits, "splits")?,
        u32::try_from(hkv * head_chunks)
            .ok()
            .filter(|&y| y as usize <= GRID_YZ)
            .ok_or_else(|| bad(format!("attention decode: {hkv} KV heads are too many")))?,
        n as u32,
    );
    launch(gpu, name, grid, 32 * DEC_WARPS as u32, 0, &p)?;
    if n_splits > 1 {
        let grid = (grid_x(n * h, "queries x heads")?, 1, 1);
        launch(gpu, "attention_decode_combine_bf16", grid, 128, 0, &p)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backward_kernels_fit_their_targets() {
        // A100/H100 opt-in limits are 163/227 KB, RTX 30xx/40xx 99 KB.
        assert!(BWD_VARIANTS[0].smem(128) <= 163 * 1024);
        assert!(BWD_VARIANTS[1].smem(128) <= SMEM_SM86);
        assert!(BWD_VARIANTS[0].smem(64) <= SMEM_SM86);
        assert_eq!(BWD_VARIANTS[1].kernel(64), None);
        // The warp-grid kernels fit an A100 at d = 128, and two w4q64s2g blocks fit one H100
        // SM (228 KB of shared memory, 1 KB reserved per block).
        assert!(bwd_variant("w8q64s2g").unwrap().smem(128) <= 163 * 1024);
        assert!(2 * (bwd_variant("w4q64s2g").unwrap().smem(128) + 1024) <= 228 * 1024);
    }

    #[test]
    fn variants_are_found_by_name() {
        assert_eq!(fwd_variant("w4m2n64s2").unwrap().rows(), 128);
        assert_eq!(bwd_variant("w4q64s2a").unwrap().keys(), 64);
        assert_eq!(bwd_variant("w8q64s2g").unwrap().keys(), 128);
        let e = fwd_variant("w4m3").unwrap_err().to_string();
        assert!(e.contains("w4m1n64s1") && e.contains("w4m3"), "{e}");
        assert!(bwd_variant("").is_err());
    }
}
