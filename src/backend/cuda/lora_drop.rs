//! Launchers for kernels/lora_drop.cu: the rank-r adapter factors of up to 3 LoRA
//! "heads" that share one input X `[m, k]` (q/k/v, gate/up), with each head's dropout
//! mask applied inside the kernel, so X (or dX) is read once for all heads:
//!
//! ```text
//! lora_down    xa_i[m, r_i]  = bf16( drop_i(X) · A_iᵀ )
//! lora_grad_a  dA_i[r_i, k] += alpha · dyb_iᵀ · drop_i(X)                     (f32)
//! lora_dx_acc  dX[m, k]      = bf16( dX + Σ_i alpha·scale_i·mask_i ∘ (dyb_i·A_i) )
//! ```
//!
//! and, for the up projection B `[n, r]`, [`lora_up_backward`]: `dyb = bf16(dY·B)` and
//! `dB += alpha·dYᵀ·xa` in one pass over dY `[m, n]`.
//!
//! `drop_i(X)[e] = keep ? bf16(X[e]·scale_i) : 0` with `scale_i = 1/(1 − p_i)` and
//! `keep = cpu::rng::dropout_keep(stream_i, e, p_i)`, `e = row·k + col`: the operand
//! [`super::elementwise::dropout_bf16`] materialises, so the factors equal the unfused
//! path's up to the order of the f32 sums (and, for dX, one rounding instead of three).
//!
//! Limits: 1 to 3 heads, each rank a multiple of 8 in 8..=128, `k` a multiple of 8, any
//! `m`; buffers 16-byte aligned (whole pool buffers are). One launch holds heads of at
//! most [`MAX_TILES`]·8 ranks in total whose shared memory fits the device; larger sets
//! are split over launches by [`plan_launches`] (for `lora_dx_acc` each launch then
//! rounds dX once). All results are deterministic: `lora_grad_a` splits `m` over blocks
//! with per-block partial sums that `lora_grad_a_finish` adds in a fixed order.

use std::ops::Range;

use cudarc::driver::DeviceRepr;
use half::bf16;

use super::params::{LoraDropHeadParams, LoraDropParams, LoraUpParams};
use super::{DeviceBuffer, Gpu};
use crate::error::{bad, Error, Result};

// SAFETY: bindgen's #[repr(C)] translation of kernels/params.h (bytemuck::Pod is
// derived, which rules out padding); the kernels' only argument, passed by value.
unsafe impl DeviceRepr for LoraDropParams {}
// SAFETY: as above, for lora_up_backward's kernels.
unsafe impl DeviceRepr for LoraUpParams {}

/// The kernels of kernels/lora_drop.cu (all listed in `KERNEL_NAMES`).
pub const KERNELS: &[&str] = &[
    "lora_down_nt4",
    "lora_down_nt8",
    "lora_down_nt16",
    "lora_down_nt24",
    "lora_grad_a_nt4",
    "lora_grad_a_nt8",
    "lora_grad_a_nt16",
    "lora_grad_a_nt24",
    "lora_grad_a_finish",
    "lora_dx_acc",
    "lora_up_backward_nt4",
    "lora_up_backward_nt8",
    "lora_up_backward_nt16",
    "lora_up_backward_finish",
];

/// Heads per call.
pub const MAX_HEADS: usize = 3;
/// Largest rank of one head.
pub const MAX_RANK: usize = 128;
/// Ranks are multiples of this (one mma tile of ranks).
pub const RANK_MULTIPLE: usize = 8;
/// `k` is a multiple of this (16-byte vectors of bf16).
pub const K_MULTIPLE: usize = 8;
/// Accumulator tiles (8 ranks each) of the largest kernel instance: at most 192 ranks
/// over the heads of one launch.
pub const MAX_TILES: usize = 24;
/// The instances `lora_down_ntN` / `lora_grad_a_ntN`: N accumulator tiles.
const TILE_BUCKETS: [usize; 4] = [4, 8, 16, 24];

// Tile geometry of lora_grad_a and lora_dx_acc (kernels/lora_drop.cu: BR, BN, TILE_LD,
// GA_STAGES, DX_STAGES); the kernels trap if the shared memory given is short.
const BR: usize = 32;
const BN: usize = 128;
const TILE_LD: usize = BN + 8;
const TILE_ELEMS: usize = BR * TILE_LD;
const GA_STAGES: usize = 3;
const DX_STAGES: usize = 2;
const THREADS: u32 = 256;
/// Without opting in, a block may use 48 KiB of shared memory.
const SMEM_DEFAULT: usize = 48 << 10;
/// Room left for the kernels' static shared memory (a 168-byte head table) when sizing
/// the dynamic part against the device's opt-in limit, which bounds their sum.
const STATIC_SMEM_MARGIN: usize = 1 << 10;

/// SplitMix64's increment, added to `stream + e` before mixing (cpu/rng.rs).
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;
const C1: u64 = 0xBF58_476D_1CE4_E5B9;
const C2: u64 = 0x94D0_49BB_1331_11EB;

/// One adapter of a call: `a` is A `[rank, k]` (ignored by [`lora_grad_a`]), `stream`
/// the dropout stream (`cpu::rng::dropout_stream`), `p` in [0, 1) (0: no dropout).
#[derive(Clone, Copy)]
pub struct DropHead<'a> {
    pub a: &'a DeviceBuffer<bf16>,
    pub rank: usize,
    pub stream: u64,
    pub p: f32,
}

// ---------------------------------------------------------------- host-side logic

/// The kernels' integer form of `u >= p`: with `u = N / 2^24` (N the top 24 bits of the
/// mix) and p an f32, `u >= p ⇔ N >= ceil(p·2^24)` (p·2^24 is exact in f64), i.e. the
/// top 32 bits `>= ceil(p·2^24) << 8`. `p = 0` gives 0 (every element kept).
pub fn keep_threshold(p: f32) -> u32 {
    // p < 1 in f32 means p <= 1 − 2^-24, so the ceiling is at most 2^24 − 1.
    ((p as f64 * 16_777_216.0).ceil() as u32) << 8
}

/// Host mirror of the kernels' `keep_bits`, the mask of elements `e0 + offsets[i]` of
/// `stream` (bit i), in the same two forms: the split 32-bit form when the counter's
/// high word is shared by every element, else plain 64-bit SplitMix64. Tested against
/// `cpu::rng::dropout_keep`, so the device transcription has a checked reference.
pub fn keep_bits_host(stream: u64, e0: u64, offsets: &[u32], thresh: u32) -> u32 {
    const C1_LO: u32 = C1 as u32;
    const C1_HI: u32 = (C1 >> 32) as u32;
    const C2_LO: u32 = C2 as u32;
    const C2_HI: u32 = (C2 >> 32) as u32;
    let base = stream.wrapping_add(GAMMA).wrapping_add(e0);
    let span = offsets.iter().copied().max().unwrap_or(0);
    let (lo, hi) = (base as u32, (base >> 32) as u32);
    let funnel = |l: u32, h: u32, s: u32| ((((h as u64) << 32) | l as u64) >> s) as u32;
    let mut bits = 0u32;
    if lo <= u32::MAX - span {
        let h1 = hi ^ (hi >> 30);
        let s = h1.wrapping_mul(C1_LO);
        for (i, &o) in offsets.iter().enumerate() {
            let l = lo + o;
            let l1 = l ^ funnel(l, hi, 30);
            let w = (l1 as u64 * C1_LO as u64).wrapping_add((s as u64) << 32);
            let l2 = w as u32;
            let h2 = ((w >> 32) as u32).wrapping_add(l1.wrapping_mul(C1_HI));
            let l3 = l2 ^ funnel(l2, h2, 27);
            let h3 = h2 ^ (h2 >> 27);
            let top = ((l3 as u64 * C2_LO as u64) >> 32) as u32;
            let top = top
                .wrapping_add(l3.wrapping_mul(C2_HI))
                .wrapping_add(h3.wrapping_mul(C2_LO));
            bits |= ((top >= thresh) as u32) << i;
        }
    } else {
        for (i, &o) in offsets.iter().enumerate() {
            let mut z = base.wrapping_add(o as u64);
            z = (z ^ (z >> 30)).wrapping_mul(C1);
            z = (z ^ (z >> 27)).wrapping_mul(C2);
            bits |= ((((z >> 32) as u32) >= thresh) as u32) << i;
        }
    }
    bits
}

/// Consecutive groups of heads (by index), one launch each: each group holds at most
/// [`MAX_TILES`] tiles of 8 ranks and satisfies `fits` (shared memory). Greedy, in order.
/// Errors when a single head does not fit.
pub fn plan_launches(
    ranks: &[usize],
    fits: impl Fn(&[usize]) -> bool,
) -> Result<Vec<Range<usize>>> {
    let ok = |g: &[usize]| g.iter().sum::<usize>() / RANK_MULTIPLE <= MAX_TILES && fits(g);
    let mut groups = Vec::new();
    let mut start = 0;
    for end in 1..=ranks.len() {
        if !ok(&ranks[start..end]) {
            if end - start == 1 {
                return Err(bad(format!(
                    "LoRA dropout kernels: a head of rank {} does not fit one launch",
                    ranks[start]
                )));
            }
            groups.push(start..end - 1);
            start = end - 1;
            if !ok(&ranks[start..end]) {
                return Err(bad(format!(
                    "LoRA dropout kernels: a head of rank {} does not fit one launch",
                    ranks[start]
                )));
            }
        }
    }
    if start < ranks.len() {
        groups.push(start..ranks.len());
    }
    Ok(groups)
}

/// The instance (N of `_ntN`) for heads of these ranks: the fewest tiles that hold them.
pub fn tile_bucket(ranks: &[usize]) -> Option<usize> {
    let tiles = ranks.iter().sum::<usize>() / RANK_MULTIPLE;
    TILE_BUCKETS.iter().copied().find(|&n| tiles <= n)
}

/// bf16 per shared-memory row of a rank tile: an odd number of 16-byte chunks.
fn rank_ld(r: usize) -> usize {
    8 * ((r / 8) | 1)
}

/// Dynamic shared memory of `lora_grad_a_nt*` for heads of these ranks.
pub fn grad_a_smem_bytes(ranks: &[usize]) -> usize {
    let stage = TILE_ELEMS + ranks.iter().map(|&r| BR * rank_ld(r)).sum::<usize>();
    2 * (GA_STAGES * stage + ranks.len() * TILE_ELEMS)
}

/// Dynamic shared memory of `lora_dx_acc` for heads of these ranks.
pub fn dx_acc_smem_bytes(ranks: &[usize]) -> usize {
    let r16 = |r: usize| r.next_multiple_of(16);
    let a: usize = ranks.iter().map(|&r| r16(r) * TILE_LD).sum();
    let stage = TILE_ELEMS + ranks.iter().map(|&r| BR * rank_ld(r16(r))).sum::<usize>();
    2 * (a + DX_STAGES * stage)
}

/// `(splits, rows_per_split)` for the kernels whose blocks are 128 columns by a range of
/// rows: about two blocks per SM, ranges a multiple of 32 rows, none empty.
pub fn split_rows(m: usize, k: usize, sms: usize) -> (usize, usize) {
    let col_blocks = k.div_ceil(BN).max(1);
    let want = (2 * sms.max(1)).div_ceil(col_blocks);
    let splits = want.clamp(1, m.div_ceil(BR).max(1));
    let rows = m.div_ceil(splits).next_multiple_of(BR).max(BR);
    (m.div_ceil(rows).max(1), rows)
}

// ---------------------------------------------------------------- checks

fn check_heads(what: &str, m: usize, k: usize, heads: &[DropHead<'_>]) -> Result<()> {
    if heads.is_empty() || heads.len() > MAX_HEADS {
        return Err(bad(format!(
            "{what}: {} heads (1 to {MAX_HEADS} share one input)",
            heads.len()
        )));
    }
    if k == 0 || !k.is_multiple_of(K_MULTIPLE) {
        return Err(bad(format!(
            "{what}: k = {k} must be a positive multiple of {K_MULTIPLE} (16-byte rows)"
        )));
    }
    if i32::try_from(m).is_err() || i32::try_from(k).is_err() || m.checked_mul(k).is_none() {
        return Err(bad(format!(
            "{what}: m = {m}, k = {k} exceed the kernels' i32 dims"
        )));
    }
    for (i, h) in heads.iter().enumerate() {
        if h.rank == 0 || h.rank > MAX_RANK || !h.rank.is_multiple_of(RANK_MULTIPLE) {
            return Err(bad(format!(
                "{what}: head {i} has rank {}; ranks are multiples of {RANK_MULTIPLE} \
                 from {RANK_MULTIPLE} to {MAX_RANK}",
                h.rank
            )));
        }
        if !(0.0..1.0).contains(&h.p) {
            return Err(bad(format!(
                "{what}: head {i} has dropout p = {}, not in [0, 1)",
                h.p
            )));
        }
    }
    Ok(())
}

fn need<T: bytemuck::Pod>(what: &str, name: &str, buf: &DeviceBuffer<T>, n: usize) -> Result<()> {
    if buf.len() < n {
        return Err(bad(format!(
            "{what}: {name} needs {n} elements, the buffer holds {}",
            buf.len()
        )));
    }
    if !buf.ptr().is_multiple_of(16) {
        return Err(bad(format!(
            "{what}: {name} must be 16-byte aligned (whole pool buffers are)"
        )));
    }
    Ok(())
}

fn count_matches(what: &str, name: &str, have: usize, heads: usize) -> Result<()> {
    if have != heads {
        return Err(bad(format!("{what}: {have} {name} for {heads} heads")));
    }
    Ok(())
}

fn head_params(h: &DropHead<'_>, alpha: f32) -> LoraDropHeadParams {
    // The same f32 scale as elementwise::dropout_bf16.
    let scale = 1.0 / (1.0 - h.p);
    LoraDropHeadParams {
        a: h.a.ptr(),
        dyb: 0,
        xa: 0,
        grad: 0,
        stream: h.stream,
        rank: h.rank as i32,
        thresh: keep_threshold(h.p),
        scale,
        coef: alpha * scale,
    }
}

fn params(
    heads: [LoraDropHeadParams; MAX_HEADS],
    n_heads: usize,
    m: usize,
    k: usize,
) -> LoraDropParams {
    LoraDropParams {
        head: heads,
        x: 0,
        dx: 0,
        partial: 0,
        m: m as i32,
        k: k as i32,
        n_heads: n_heads as i32,
        row_warps: 0,
        rows_per_split: 0,
        splits: 0,
        alpha: 0.0,
        _pad: 0,
    }
}

fn empty_head() -> LoraDropHeadParams {
    bytemuck::Zeroable::zeroed()
}

fn launch<P: DeviceRepr>(
    gpu: &Gpu,
    name: &str,
    grid: (u32, u32),
    smem: usize,
    p: &P,
) -> Result<()> {
    if grid.0 == 0 || grid.1 == 0 {
        return Ok(());
    }
    gpu.function(name)?; // a missing kernel is named before any shared-memory opt-in
                         // The 48 KiB default covers static and dynamic shared memory together.
    if smem + STATIC_SMEM_MARGIN > SMEM_DEFAULT {
        // The device limit covers static and dynamic shared memory together.
        let max = gpu.max_smem_optin()?;
        if smem + STATIC_SMEM_MARGIN > max {
            return Err(Error::Cuda(format!(
                "{name} needs {smem} bytes of shared memory per block; {} allows {max}",
                gpu.name()
            )));
        }
        gpu.opt_in_smem(name, smem)?;
    }
    // The launchers checked every buffer behind p's pointers against the shapes the
    // kernel addresses.
    gpu.launch_grid(name, (grid.0, grid.1, 1), THREADS, smem as u32, p)
}

fn ranks_of(heads: &[DropHead<'_>]) -> Vec<usize> {
    heads.iter().map(|h| h.rank).collect()
}

fn bucket_name(kind: &str, ranks: &[usize]) -> Result<String> {
    let nt = tile_bucket(ranks).ok_or_else(|| {
        bad(format!(
            "{kind}: ranks {ranks:?} exceed one launch (launcher bug: the plan splits them)"
        ))
    })?;
    Ok(format!("{kind}_nt{nt}"))
}

// ---------------------------------------------------------------- launchers

/// `outs[i][m, r_i] = bf16(drop_i(x) · A_iᵀ)` for `x` `[m, k]`: the adapters' down
/// projection (unscaled; the caller folds `s` into the up projection as today).
pub fn lora_down(
    gpu: &Gpu,
    x: &DeviceBuffer<bf16>,
    m: usize,
    k: usize,
    heads: &[DropHead<'_>],
    outs: &mut [&mut DeviceBuffer<bf16>],
) -> Result<()> {
    const WHAT: &str = "lora_down";
    check_heads(WHAT, m, k, heads)?;
    count_matches(WHAT, "outputs", outs.len(), heads.len())?;
    need(WHAT, "x", x, m * k)?;
    for (h, out) in heads.iter().zip(outs.iter()) {
        need(WHAT, "A", h.a, h.rank * k)?;
        need(WHAT, "output", out, m * h.rank)?;
    }
    if m == 0 {
        return Ok(());
    }
    let ranks = ranks_of(heads);
    for group in plan_launches(&ranks, |_| true)? {
        let name = bucket_name("lora_down", &ranks[group.clone()])?;
        let mut hp = [empty_head(); MAX_HEADS];
        for (slot, i) in group.clone().enumerate() {
            hp[slot] = head_params(&heads[i], 0.0);
            hp[slot].xa = outs[i].ptr();
        }
        let mut p = params(hp, group.len(), m, k);
        p.x = x.ptr();
        // 64 rows per block when the heads are wide: A is re-read per block (from L2).
        let tiles = ranks[group].iter().sum::<usize>() / RANK_MULTIPLE;
        p.row_warps = if tiles > 8 { 4 } else { 2 };
        let grid = m.div_ceil(16 * p.row_warps as usize);
        launch(gpu, &name, (grid as u32, 1), 0, &p)?;
    }
    Ok(())
}

/// `grads[i][r_i, k] += alpha · dybs[i]ᵀ · drop_i(x)` in f32 for `x` `[m, k]` and
/// `dybs[i]` `[m, r_i]` (`alpha` is the LoRA scale s when dyb = dY·B). `heads[i].a` is
/// not read. `m` is split over blocks; the partial sums are added in a fixed order.
#[allow(clippy::too_many_arguments)]
pub fn lora_grad_a(
    gpu: &Gpu,
    x: &DeviceBuffer<bf16>,
    m: usize,
    k: usize,
    heads: &[DropHead<'_>],
    dybs: &[&DeviceBuffer<bf16>],
    alpha: f32,
    grads: &mut [&mut DeviceBuffer<f32>],
) -> Result<()> {
    const WHAT: &str = "lora_grad_a";
    check_heads(WHAT, m, k, heads)?;
    count_matches(WHAT, "dyb factors", dybs.len(), heads.len())?;
    count_matches(WHAT, "gradients", grads.len(), heads.len())?;
    if !alpha.is_finite() {
        return Err(bad(format!("{WHAT}: alpha = {alpha} is not finite")));
    }
    need(WHAT, "x", x, m * k)?;
    for ((h, dyb), grad) in heads.iter().zip(dybs).zip(grads.iter()) {
        need(WHAT, "dyb", dyb, m * h.rank)?;
        need(WHAT, "grad", grad, h.rank * k)?;
    }
    if m == 0 {
        return Ok(());
    }
    let ranks = ranks_of(heads);
    let budget = gpu.max_smem_optin()?.saturating_sub(STATIC_SMEM_MARGIN);
    let (splits, rows) = split_rows(m, k, gpu.sm_count() as usize);
    let col_blocks = k.div_ceil(BN);
    for group in plan_launches(&ranks, |g| grad_a_smem_bytes(g) <= budget)? {
        let gr = &ranks[group.clone()];
        let name = bucket_name("lora_grad_a", gr)?;
        let sum_rank: usize = gr.iter().sum();
        let mut hp = [empty_head(); MAX_HEADS];
        for (slot, i) in group.clone().enumerate() {
            hp[slot] = head_params(&heads[i], alpha);
            hp[slot].dyb = dybs[i].ptr();
            hp[slot].grad = grads[i].ptr();
        }
        let mut p = params(hp, group.len(), m, k);
        p.x = x.ptr();
        p.rows_per_split = rows as i32;
        p.splits = splits as i32;
        p.alpha = alpha;
        // One row range per column block: the kernel adds into dA itself.
        let partial = if splits > 1 {
            Some(gpu.alloc::<f32>(splits * sum_rank * k)?)
        } else {
            None
        };
        p.partial = partial.as_ref().map_or(0, |b| b.ptr());
        let smem = grad_a_smem_bytes(gr);
        launch(gpu, &name, (col_blocks as u32, splits as u32), smem, &p)?;
        if partial.is_some() {
            let vec4 = (sum_rank * k) / 4;
            let blocks = vec4
                .div_ceil(THREADS as usize)
                .min(gpu.sm_count() as usize * 16);
            launch(gpu, "lora_grad_a_finish", (blocks as u32, 1), 0, &p)?;
        }
        // `partial` returns to the pool here; the single stream orders its reuse after
        // the kernels above.
    }
    Ok(())
}

/// The launches [`lora_dx_acc`] makes on this device for heads of these ranks (each
/// rounds dX once: tests bound the error by the values after each).
pub fn dx_acc_launches(gpu: &Gpu, ranks: &[usize]) -> Result<Vec<Range<usize>>> {
    let budget = gpu.max_smem_optin()?.saturating_sub(STATIC_SMEM_MARGIN);
    plan_launches(ranks, |g| dx_acc_smem_bytes(g) <= budget)
}

/// `dx[m, k] = bf16(dx + Σ_i alpha·scale_i·mask_i ∘ (dybs[i]·A_i))`, in place, f32 math
/// and one rounding per launch (a single launch unless the heads are split). With
/// `dybs[i] = dY·B_i` and `alpha = s` this is the adapters' input gradient under
/// dropout, `s·drop'(dY·B·A)`.
pub fn lora_dx_acc(
    gpu: &Gpu,
    dx: &mut DeviceBuffer<bf16>,
    m: usize,
    k: usize,
    heads: &[DropHead<'_>],
    dybs: &[&DeviceBuffer<bf16>],
    alpha: f32,
) -> Result<()> {
    const WHAT: &str = "lora_dx_acc";
    check_heads(WHAT, m, k, heads)?;
    count_matches(WHAT, "dyb factors", dybs.len(), heads.len())?;
    if !alpha.is_finite() {
        return Err(bad(format!("{WHAT}: alpha = {alpha} is not finite")));
    }
    need(WHAT, "dx", dx, m * k)?;
    for (h, dyb) in heads.iter().zip(dybs) {
        need(WHAT, "A", h.a, h.rank * k)?;
        need(WHAT, "dyb", dyb, m * h.rank)?;
    }
    if m == 0 {
        return Ok(());
    }
    let ranks = ranks_of(heads);
    let (splits, rows) = split_rows(m, k, gpu.sm_count() as usize);
    let col_blocks = k.div_ceil(BN);
    for group in dx_acc_launches(gpu, &ranks)? {
        let mut hp = [empty_head(); MAX_HEADS];
        for (slot, i) in group.clone().enumerate() {
            hp[slot] = head_params(&heads[i], alpha);
            hp[slot].dyb = dybs[i].ptr();
        }
        let mut p = params(hp, group.len(), m, k);
        p.dx = dx.ptr();
        p.rows_per_split = rows as i32;
        p.splits = splits as i32;
        let smem = dx_acc_smem_bytes(&ranks[group]);
        launch(
            gpu,
            "lora_dx_acc",
            (col_blocks as u32, splits as u32),
            smem,
            &p,
        )?;
    }
    Ok(())
}

// ---------------------------------------------------------------- lora_up_backward

/// The instances `lora_up_backward_ntN` (N accumulator tiles of 8 ranks).
const UP_BUCKETS: [usize; 3] = [4, 8, 16];

/// The `lora_up_backward_ntN` instance for a rank: the fewest tiles that hold it.
pub fn up_bucket(rank: usize) -> Option<usize> {
    UP_BUCKETS
        .iter()
        .copied()
        .find(|&n| rank <= n * RANK_MULTIPLE)
}

/// Dynamic shared memory of `lora_up_backward_nt*`: B `[128][ld]` resident, then
/// `GA_STAGES` x (dY `[32][TILE_LD]`, xa `[32][ld]`), bf16.
pub fn up_backward_smem_bytes(rank: usize) -> usize {
    let ld = rank_ld(rank);
    2 * (BN * ld + GA_STAGES * (TILE_ELEMS + BR * ld))
}

/// f32 scratch of [`lora_up_backward`]: `(dyb partial, dB partial)` elements, i.e.
/// `ceil(n/128)·m·r` and `splits·n·r` (0 when m is not split).
pub fn up_backward_scratch(m: usize, n: usize, rank: usize, splits: usize) -> (usize, usize) {
    let db = if splits > 1 { splits * n * rank } else { 0 };
    (n.div_ceil(BN) * m * rank, db)
}

/// `dyb = bf16(dY·B)` and `dB += alpha·dYᵀ·xa` in one pass over dY `[m, n]`.
///
/// `b` is B `[n, rank]`, `xa` `[m, rank]`, `dyb` `[m, rank]` (overwritten), `grad_b`
/// `[n, rank]` f32 (accumulated). Limits: `n` a multiple of 8, `rank` a multiple of 8 in
/// 8..=128, 16-byte aligned buffers. Deterministic: both reductions go through per-block
/// f32 partials summed in a fixed order by `lora_up_backward_finish`.
#[allow(clippy::too_many_arguments)]
pub fn lora_up_backward(
    gpu: &Gpu,
    dy: &DeviceBuffer<bf16>,
    m: usize,
    n: usize,
    b: &DeviceBuffer<bf16>,
    xa: &DeviceBuffer<bf16>,
    rank: usize,
    alpha: f32,
    dyb: &mut DeviceBuffer<bf16>,
    grad_b: &mut DeviceBuffer<f32>,
) -> Result<()> {
    const WHAT: &str = "lora_up_backward";
    if n == 0 || !n.is_multiple_of(K_MULTIPLE) {
        return Err(bad(format!(
            "{WHAT}: n = {n} must be a positive multiple of {K_MULTIPLE} (16-byte rows)"
        )));
    }
    if rank == 0 || rank > MAX_RANK || !rank.is_multiple_of(RANK_MULTIPLE) {
        return Err(bad(format!(
            "{WHAT}: rank {rank}; ranks are multiples of {RANK_MULTIPLE} from \
             {RANK_MULTIPLE} to {MAX_RANK}"
        )));
    }
    if i32::try_from(m).is_err() || i32::try_from(n).is_err() || m.checked_mul(n).is_none() {
        return Err(bad(format!(
            "{WHAT}: m = {m}, n = {n} exceed the kernels' i32 dims"
        )));
    }
    if !alpha.is_finite() {
        return Err(bad(format!("{WHAT}: alpha = {alpha} is not finite")));
    }
    need(WHAT, "dy", dy, m * n)?;
    need(WHAT, "B", b, n * rank)?;
    need(WHAT, "xa", xa, m * rank)?;
    need(WHAT, "dyb", dyb, m * rank)?;
    need(WHAT, "grad_b", grad_b, n * rank)?;
    if m == 0 {
        return Ok(());
    }
    let nt = up_bucket(rank)
        .ok_or_else(|| bad(format!("{WHAT}: rank {rank} has no kernel instance")))?;
    let smem = up_backward_smem_bytes(rank);
    let (splits, rows) = split_rows(m, n, gpu.sm_count() as usize);
    let col_blocks = n.div_ceil(BN);
    let (y_len, db_len) = up_backward_scratch(m, n, rank, splits);
    let y_part = gpu.alloc::<f32>(y_len)?;
    let db_part = if db_len > 0 {
        Some(gpu.alloc::<f32>(db_len)?)
    } else {
        None
    };
    let p = LoraUpParams {
        dy: dy.ptr(),
        b: b.ptr(),
        xa: xa.ptr(),
        dyb: dyb.ptr(),
        grad_b: grad_b.ptr(),
        dyb_partial: y_part.ptr(),
        db_partial: db_part.as_ref().map_or(0, |d| d.ptr()),
        m: m as i32,
        n: n as i32,
        rank: rank as i32,
        rows_per_split: rows as i32,
        splits: splits as i32,
        col_blocks: col_blocks as i32,
        alpha,
        _pad: 0,
    };
    let name = format!("lora_up_backward_nt{nt}");
    launch(gpu, &name, (col_blocks as u32, splits as u32), smem, &p)?;
    let vec4 = (m * rank).max(db_len / splits.max(1)) / 4;
    let blocks = vec4
        .div_ceil(THREADS as usize)
        .min(gpu.sm_count() as usize * 16);
    launch(gpu, "lora_up_backward_finish", (blocks as u32, 1), 0, &p)?;
    // The partials return to the pool here; the single stream orders their reuse after
    // the kernels above.
    Ok(())
}
