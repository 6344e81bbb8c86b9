//! CPU reference ops, f32, row-major. These define the semantics every CUDA kernel is
//! tested against, pinned to transformers' LLaMA/Mistral code (facts cited per op).

use rayon::prelude::*;

/// A read-only strided matrix view: element (r, c) is `data[r * rs + c * cs]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major `rows × cols` matrix.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        debug_assert!(data.len() >= rows * cols);
        MatRef {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }
    /// Rows `rows × cols` starting at `data[0]`, `rs` elements apart (a column block of
    /// a wider row-major matrix, e.g. one head of `[tokens, heads·head_dim]`).
    pub fn strided(data: &'a [f32], rows: usize, cols: usize, rs: usize) -> Self {
        debug_assert!(rows == 0 || data.len() >= (rows - 1) * rs + cols);
        MatRef {
            data,
            rows,
            cols,
            rs,
            cs: 1,
        }
    }
    /// The transpose, without copying.
    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// `c = beta·c + alpha·(a·b)` with `c` row-major `a.rows × b.cols`; `beta = 0` ignores
/// what `c` held. Threads through rayon when the product is large enough to pay for it.
pub fn gemm(a: MatRef, b: MatRef, c: &mut [f32], alpha: f32, beta: f32) {
    gemm_impl(a, b, c, alpha, beta, true);
}

/// `gemm` on the calling thread only: for products inside tasks that are already
/// spread over the rayon pool (attention per sequence and head).
pub fn gemm_serial(a: MatRef, b: MatRef, c: &mut [f32], alpha: f32, beta: f32) {
    gemm_impl(a, b, c, alpha, beta, false);
}

/// `alpha·(a·b)` in a new row-major `a.rows × b.cols` buffer, threaded like `gemm`.
/// The buffer is not zero-filled first (gemm writes every element): one memset fewer
/// per op output.
pub fn gemm_new(a: MatRef, b: MatRef, alpha: f32) -> Vec<f32> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(k, b.rows, "gemm inner dimensions");
    if m == 0 || n == 0 || k == 0 {
        return vec![0.0; m * n];
    }
    let mut c = Vec::with_capacity(m * n);
    // SAFETY: non-empty, shapes checked above, `c` has room for m·n; with beta = 0 gemm
    // writes all m·n elements without reading them, so set_len exposes initialized data.
    unsafe {
        gemm_raw(a, b, c.as_mut_ptr(), alpha, 0.0, true);
        c.set_len(m * n);
    }
    c
}

fn gemm_impl(a: MatRef, b: MatRef, c: &mut [f32], alpha: f32, beta: f32, threads: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(k, b.rows, "gemm inner dimensions");
    assert!(c.len() >= m * n, "gemm output too small");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c[..m * n].iter_mut().for_each(|v| *v *= beta);
        return;
    }
    // SAFETY: non-empty, shapes checked above, `c` holds m·n initialized elements.
    unsafe { gemm_raw(a, b, c.as_mut_ptr(), alpha, beta, threads) }
}

/// Panics unless every element the view addresses lies inside its slice.
fn check_view(v: &MatRef) {
    let last = (v.rows - 1) * v.rs + (v.cols - 1) * v.cs;
    assert!(last < v.data.len(), "matrix view runs past its data");
}

/// `c = beta·c + alpha·(a·b)` through the gemm crate (row-major `c`, `a.rows × b.cols`).
///
/// # Safety
/// m, n, k ≥ 1, `a.cols == b.rows`, and `c` valid for m·n writes (and reads when
/// beta ≠ 0). The views are checked here.
unsafe fn gemm_raw(a: MatRef, b: MatRef, c: *mut f32, alpha: f32, beta: f32, threads: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    check_view(&a);
    check_view(&b);
    let par = if threads && m * n * k >= 1 << 18 && rayon::current_num_threads() > 1 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // gemm's convention: dst = alpha·dst + beta·(lhs·rhs), dst read only when asked.
    gemm::gemm(
        m,
        n,
        k,
        c,
        1,
        n as isize,
        beta != 0.0,
        a.data.as_ptr(),
        a.cs as isize,
        a.rs as isize,
        b.data.as_ptr(),
        b.cs as isize,
        b.rs as isize,
        beta,
        alpha,
        false,
        false,
        false,
        par,
    );
}

/// `out = x · wᵀ`: x is `[m, k]`, w is `[n, k]` (a PyTorch `nn.Linear` weight), out `[m, n]`.
pub fn linear(x: &[f32], m: usize, w: &[f32], n: usize, out: &mut [f32]) {
    let k = x.len().checked_div(m).unwrap_or(0);
    gemm(
        MatRef::new(x, m, k),
        MatRef::new(w, n, k).t(),
        out,
        1.0,
        0.0,
    );
}

/// Embedding lookup: `out[t] = table[ids[t]]`. Ids were range-checked by the caller.
pub fn embedding(table: &[f32], hidden: usize, ids: &[u32], out: &mut [f32]) {
    out.par_chunks_mut(hidden)
        .zip(ids.par_iter())
        .for_each(|(row, &id)| {
            let s = id as usize * hidden;
            row.copy_from_slice(&table[s..s + hidden]);
        });
}

/// RMSNorm (transformers `LlamaRMSNorm`, f32): `y = w · x / sqrt(mean(x²) + eps)`.
/// Saves `rstd = 1/sqrt(mean(x²)+eps)` per row for the backward.
pub fn rmsnorm_forward(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32], rstd: &mut [f32]) {
    let h = weight.len();
    out.par_chunks_mut(h)
        .zip(x.par_chunks(h))
        .zip(rstd.par_iter_mut())
        .for_each(|((y, x), r)| {
            let ms = x.iter().map(|v| v * v).sum::<f32>() / h as f32;
            *r = 1.0 / (ms + eps).sqrt();
            for i in 0..h {
                y[i] = weight[i] * (x[i] * *r);
            }
        });
}

/// RMSNorm backward for the input only (the weight is frozen):
/// with `n = x·rstd`, `dx = rstd · (g − n · mean(g·n))` where `g = dy·w`.
pub fn rmsnorm_backward(dy: &[f32], x: &[f32], weight: &[f32], rstd: &[f32], dx: &mut [f32]) {
    let h = weight.len();
    dx.par_chunks_mut(h)
        .zip(dy.par_chunks(h).zip(x.par_chunks(h)))
        .zip(rstd.par_iter())
        .for_each(|((dx, (dy, x)), &r)| {
            let mut dot = 0.0f32;
            for i in 0..h {
                dot += dy[i] * weight[i] * x[i] * r;
            }
            let mean = dot / h as f32;
            for i in 0..h {
                dx[i] = r * (dy[i] * weight[i] - x[i] * r * mean);
            }
        });
}

/// RoPE tables as transformers builds them (f32): `inv_freq[i] = 1/theta^(2i/d)`,
/// angle = `position · inv_freq[i]`; returns (cos, sin), each `[max_pos, d/2]`.
pub fn rope_tables(head_dim: usize, theta: f32, max_pos: usize) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let mut cos = vec![0.0; max_pos * half];
    let mut sin = vec![0.0; max_pos * half];
    for p in 0..max_pos {
        for i in 0..half {
            let a = p as f32 * inv[i];
            cos[p * half + i] = a.cos();
            sin[p * half + i] = a.sin();
        }
    }
    (cos, sin)
}

/// Rotate-half RoPE in place (transformers `apply_rotary_pos_emb`): for i < d/2,
/// `y[i] = x[i]·cos − x[i+d/2]·sin`, `y[i+d/2] = x[i+d/2]·cos + x[i]·sin`.
pub fn rope_forward(
    x: &mut [f32],
    n_heads: usize,
    head_dim: usize,
    positions: &[u32],
    cos: &[f32],
    sin: &[f32],
) {
    rope_rotate(x, n_heads, head_dim, positions, cos, sin, 1.0);
}

/// RoPE backward: the rotation is orthogonal, so the gradient rotates by −angle.
pub fn rope_backward(
    dx: &mut [f32],
    n_heads: usize,
    head_dim: usize,
    positions: &[u32],
    cos: &[f32],
    sin: &[f32],
) {
    rope_rotate(dx, n_heads, head_dim, positions, cos, sin, -1.0);
}

fn rope_rotate(
    x: &mut [f32],
    n_heads: usize,
    head_dim: usize,
    positions: &[u32],
    cos: &[f32],
    sin: &[f32],
    sign: f32,
) {
    let half = head_dim / 2;
    x.par_chunks_mut(n_heads * head_dim)
        .zip(positions.par_iter())
        .for_each(|(row, &p)| {
            let c = &cos[p as usize * half..(p as usize + 1) * half];
            let s = &sin[p as usize * half..(p as usize + 1) * half];
            for head in row.chunks_mut(head_dim) {
                for i in 0..half {
                    let (a, b) = (head[i], head[i + half]);
                    let si = sign * s[i];
                    head[i] = a * c[i] - b * si;
                    head[i + half] = b * c[i] + a * si;
                }
            }
        });
}

/// The logistic sigmoid `1 / (1 + e^−x)`.
#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// SiLU, `x·σ(x)`, as torch computes it in f32.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// Elements per rayon task in elementwise ops: large enough that the inner loop
/// vectorizes and the task overhead vanishes.
const ELEMS_PER_TASK: usize = 1 << 14;

/// SwiGLU (transformers `LlamaMLP`): `out = silu(gate) · up`.
pub fn swiglu_forward(gate: &[f32], up: &[f32], out: &mut [f32]) {
    out.par_chunks_mut(ELEMS_PER_TASK)
        .zip(gate.par_chunks(ELEMS_PER_TASK))
        .zip(up.par_chunks(ELEMS_PER_TASK))
        .for_each(|((o, g), u)| {
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                *o = silu(g) * u;
            }
        });
}

/// SwiGLU backward: `dup = dout·silu(g)`, `dgate = dout·up·σ(g)·(1 + g·(1 − σ(g)))`.
pub fn swiglu_backward(dout: &[f32], gate: &[f32], up: &[f32], dgate: &mut [f32], dup: &mut [f32]) {
    dgate
        .par_chunks_mut(ELEMS_PER_TASK)
        .zip(dup.par_chunks_mut(ELEMS_PER_TASK))
        .zip(dout.par_chunks(ELEMS_PER_TASK))
        .zip(
            gate.par_chunks(ELEMS_PER_TASK)
                .zip(up.par_chunks(ELEMS_PER_TASK)),
        )
        .for_each(|(((dg, du), dout), (gate, up))| {
            let inputs = dout.iter().zip(gate).zip(up);
            for ((dg, du), ((&d, &g), &u)) in dg.iter_mut().zip(du.iter_mut()).zip(inputs) {
                let sig = sigmoid(g);
                *du = d * g * sig;
                *dg = d * u * sig * (1.0 + g * (1.0 - sig));
            }
        });
}

pub use crate::packing::Packing;

/// Shape of a causal GQA attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Mistral's sliding window W: query i sees keys i−W+1..=i. `None`: all earlier keys.
    pub window: Option<usize>,
}

impl AttnShape {
    /// First key a query at position `i` may see.
    pub fn first_key(&self, i: usize) -> usize {
        match self.window {
            Some(w) => (i + 1).saturating_sub(w),
            None => 0,
        }
    }
}

/// Query rows per block in the attention GEMMs: bounds the score scratch to
/// `ATTN_BLOCK × keys` and lets a block skip keys none of its queries can see.
const ATTN_BLOCK: usize = 64;

/// Keys `j0..i1` that some query of the block `i0..i1` may see.
fn key_range(shape: &AttnShape, i0: usize, i1: usize) -> (usize, usize) {
    let j0 = shape.first_key(i0);
    (j0, i1 - j0)
}

/// Causal attention over packed sequences (transformers eager attention: scores scaled
/// by 1/√d, softmax in f32). q `[tokens, H·d]`, k/v `[tokens, Hkv·d]`, out `[tokens, H·d]`.
/// Query head h reads KV head h / (H / Hkv) (GQA). Saves the log-sum-exp per (token, head).
/// Per (sequence, head) and block of query rows: `S = scale·Q·Kᵀ`, masked row softmax,
/// `O = P·V`, the two products as GEMMs.
pub fn attention_forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    pack: &Packing,
    shape: AttnShape,
    out: &mut [f32],
    lse: &mut [f32],
) {
    debug_assert!(
        pack.prefixes().is_none(),
        "shared prefixes: use ops::attention"
    );
    let AttnShape {
        n_heads,
        n_kv_heads,
        head_dim: d,
        ..
    } = shape;
    let group = n_heads / n_kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let (qw, kw) = (n_heads * d, n_kv_heads * d);
    // One task per (sequence, head); each writes a disjoint column block of `out`.
    let tasks: Vec<(usize, usize)> = (0..pack.n_seqs())
        .filter(|&s| !pack.range(s).is_empty())
        .flat_map(|s| (0..n_heads).map(move |h| (s, h)))
        .collect();
    let results: Vec<(usize, usize, Vec<f32>, Vec<f32>)> = tasks
        .par_iter()
        .map(|&(s, h)| {
            let r = pack.range(s);
            let t = r.len();
            let qh = &q[r.start * qw + h * d..];
            let kh = &k[r.start * kw + (h / group) * d..];
            let vh = &v[r.start * kw + (h / group) * d..];
            let mut o = vec![0.0f32; t * d];
            let mut l = vec![0.0f32; t];
            let mut scratch = vec![0.0f32; ATTN_BLOCK.min(t) * t];
            for i0 in (0..t).step_by(ATTN_BLOCK) {
                let i1 = (i0 + ATTN_BLOCK).min(t);
                let (j0, nk) = key_range(&shape, i0, i1);
                let p = &mut scratch[..(i1 - i0) * nk];
                let keys = MatRef::strided(&kh[j0 * kw..], nk, d, kw);
                let queries = MatRef::strided(&qh[i0 * qw..], i1 - i0, d, qw);
                gemm_serial(queries, keys.t(), p, scale, 0.0);
                for (row, i) in p.chunks_mut(nk).zip(i0..i1) {
                    l[i] = masked_softmax(row, shape.first_key(i) - j0, i - j0);
                }
                gemm_serial(
                    MatRef::new(p, i1 - i0, nk),
                    MatRef::strided(&vh[j0 * kw..], nk, d, kw),
                    &mut o[i0 * d..i1 * d],
                    1.0,
                    0.0,
                );
            }
            (s, h, o, l)
        })
        .collect();
    for (s, h, o, l) in results {
        let r = pack.range(s);
        for i in 0..r.len() {
            out[(r.start + i) * qw + h * d..][..d].copy_from_slice(&o[i * d..(i + 1) * d]);
            lse[(r.start + i) * n_heads + h] = l[i];
        }
    }
}

/// Softmax in place over `row[lo..=hi]` (max subtracted first), zero elsewhere;
/// returns the log-sum-exp of the visible scores.
fn masked_softmax(row: &mut [f32], lo: usize, hi: usize) -> f32 {
    let mx = row[lo..=hi]
        .iter()
        .cloned()
        .fold(f32::NEG_INFINITY, f32::max);
    for x in &mut row[lo..=hi] {
        *x = (*x - mx).exp();
    }
    let sum: f32 = row[lo..=hi].iter().sum();
    for x in &mut row[lo..=hi] {
        *x /= sum;
    }
    row[..lo].fill(0.0);
    row[hi + 1..].fill(0.0);
    mx + sum.ln()
}

/// Decode attention: one new query per sequence against that sequence's cached keys and
/// values. Query row i attends to every cache row `starts[i] .. starts[i] + lens[i]` (the
/// caller keeps only keys inside the window there, in any order: softmax is order-free).
/// Same math as `attention_forward`: scores scaled by 1/√d, f32 softmax, GQA head h / group.
/// q and out `[n, H·d]`, k/v `[cache rows, Hkv·d]`.
pub fn attention_decode(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    starts: &[usize],
    lens: &[usize],
    shape: AttnShape,
    out: &mut [f32],
) {
    let AttnShape {
        n_heads,
        n_kv_heads,
        head_dim: d,
        ..
    } = shape;
    let group = n_heads / n_kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let (qw, kw) = (n_heads * d, n_kv_heads * d);
    // One task per (query row, head): chunk `idx` of `out` is row idx / H, head idx % H.
    out.par_chunks_mut(d).enumerate().for_each(|(idx, o)| {
        let (i, h) = (idx / n_heads, idx % n_heads);
        let kh = h / group;
        let qi = &q[i * qw + h * d..][..d];
        let rows = starts[i]..starts[i] + lens[i];
        let mut p: Vec<f32> = rows
            .clone()
            .map(|j| dot_lanes(qi, &k[j * kw + kh * d..][..d]) * scale)
            .collect();
        let mx = p.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f32;
        for pj in &mut p {
            *pj = (*pj - mx).exp();
            sum += *pj;
        }
        o.fill(0.0);
        for (j, pj) in rows.zip(&p) {
            let w = pj / sum;
            for (oc, vc) in o.iter_mut().zip(&v[j * kw + kh * d..][..d]) {
                *oc += w * vc;
            }
        }
    });
}

/// Dot product with 8 independent partial sums, so it vectorizes: decode attention spends
/// most of its time here, one short dot per cached key.
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// One (sequence, KV head) task's share of the attention backward: (seq, head, dQ of
/// its query group, dK, dV).
type KvHeadGrads = (usize, usize, Vec<f32>, Vec<f32>, Vec<f32>);

/// Attention backward (recomputing probabilities from the saved log-sum-exp):
/// `P = exp(S − lse)`, `dV = Pᵀ·dO`, `dP = dO·Vᵀ`, `D_i = dO_i·O_i`,
/// `dS = P ∘ (dP − D)`, `dQ = scale·dS·K`, `dK = scale·dSᵀ·Q`; dK/dV of a KV head sum over
/// its query-head group. The five products are GEMMs per block of query rows.
/// All outputs are overwritten.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    d_o: &[f32],
    lse: &[f32],
    pack: &Packing,
    shape: AttnShape,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    debug_assert!(
        pack.prefixes().is_none(),
        "shared prefixes: use ops::attention"
    );
    let AttnShape {
        n_heads,
        n_kv_heads,
        head_dim: d,
        ..
    } = shape;
    let group = n_heads / n_kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let (qw, kw) = (n_heads * d, n_kv_heads * d);
    // One task per (sequence, KV head): it owns that head's dK/dV rows and its group's dQ.
    let tasks: Vec<(usize, usize)> = (0..pack.n_seqs())
        .filter(|&s| !pack.range(s).is_empty())
        .flat_map(|s| (0..n_kv_heads).map(move |kh| (s, kh)))
        .collect();
    let results: Vec<KvHeadGrads> = tasks
        .par_iter()
        .map(|&(s, kh)| {
            let r = pack.range(s);
            let t = r.len();
            let kb = &k[r.start * kw + kh * d..];
            let vb = &v[r.start * kw + kh * d..];
            let mut gq = vec![0.0f32; group * t * d];
            let mut gk = vec![0.0f32; t * d];
            let mut gv = vec![0.0f32; t * d];
            let mut p_scratch = vec![0.0f32; ATTN_BLOCK.min(t) * t];
            let mut ds_scratch = vec![0.0f32; ATTN_BLOCK.min(t) * t];
            for g in 0..group {
                let h = kh * group + g;
                let at = r.start * qw + h * d;
                let (qh, doh, oh) = (&q[at..], &d_o[at..], &o[at..]);
                for i0 in (0..t).step_by(ATTN_BLOCK) {
                    let i1 = (i0 + ATTN_BLOCK).min(t);
                    let (b, (j0, nk)) = (i1 - i0, key_range(&shape, i0, i1));
                    let queries = MatRef::strided(&qh[i0 * qw..], b, d, qw);
                    let d_out = MatRef::strided(&doh[i0 * qw..], b, d, qw);
                    let keys = MatRef::strided(&kb[j0 * kw..], nk, d, kw);
                    let values = MatRef::strided(&vb[j0 * kw..], nk, d, kw);
                    let p = &mut p_scratch[..b * nk];
                    let ds = &mut ds_scratch[..b * nk];
                    gemm_serial(queries, keys.t(), p, scale, 0.0); // S
                    gemm_serial(d_out, values.t(), ds, 1.0, 0.0); // dP
                    for (bi, i) in (i0..i1).enumerate() {
                        let l = lse[(r.start + i) * n_heads + h];
                        let di = dot(&doh[i * qw..][..d], &oh[i * qw..][..d]);
                        let (lo, hi) = (shape.first_key(i) - j0, i - j0);
                        let (pr, dsr) = (&mut p[bi * nk..][..nk], &mut ds[bi * nk..][..nk]);
                        for (p, ds) in pr[lo..=hi].iter_mut().zip(&mut dsr[lo..=hi]) {
                            *p = (*p - l).exp();
                            *ds = *p * (*ds - di) * scale;
                        }
                        for row in [pr, dsr] {
                            row[..lo].fill(0.0);
                            row[hi + 1..].fill(0.0);
                        }
                    }
                    let (p, ds) = (MatRef::new(p, b, nk), MatRef::new(ds, b, nk));
                    gemm_serial(p.t(), d_out, &mut gv[j0 * d..i1 * d], 1.0, 1.0);
                    let gq_rows = &mut gq[(g * t + i0) * d..(g * t + i1) * d];
                    gemm_serial(ds, keys, gq_rows, 1.0, 0.0);
                    gemm_serial(ds.t(), queries, &mut gk[j0 * d..i1 * d], 1.0, 1.0);
                }
            }
            (s, kh, gq, gk, gv)
        })
        .collect();
    for (s, kh, gq, gk, gv) in results {
        let r = pack.range(s);
        let t = r.len();
        for i in 0..t {
            let row = r.start + i;
            for g in 0..group {
                let h = kh * group + g;
                dq[row * qw + h * d..][..d].copy_from_slice(&gq[(g * t + i) * d..][..d]);
            }
            dk[row * kw + kh * d..][..d].copy_from_slice(&gk[i * d..][..d]);
            dv[row * kw + kh * d..][..d].copy_from_slice(&gv[i * d..][..d]);
        }
    }
}

#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Log-softmax of one row of logits at index `target`: `z[t] − log Σ exp(z)`, in f32
/// with the max subtracted first (as torch's log_softmax does).
pub fn log_softmax_at(logits: &[f32], target: usize) -> f32 {
    let mx = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|z| (z - mx).exp()).sum();
    logits[target] - mx - sum.ln()
}

/// `out[i] = log_softmax(row i of logits)[targets[i]]` for logits `[rows, v]`.
pub fn log_softmax_rows_at(logits: &[f32], v: usize, targets: &[u32], out: &mut [f32]) {
    out.par_iter_mut()
        .zip(logits.par_chunks(v).zip(targets.par_iter()))
        .for_each(|(o, (z, &t))| *o = log_softmax_at(z, t as usize));
}

/// Backward of `log_softmax_rows_at`, in place: row i of `logits` becomes the gradient
/// of `g[i] · log_softmax(z_i)[t_i]`, i.e. `g_i · (onehot(t_i) − softmax(z_i))`.
pub fn log_softmax_rows_at_backward(logits: &mut [f32], v: usize, targets: &[u32], g: &[f32]) {
    logits
        .par_chunks_mut(v)
        .zip(targets.par_iter().zip(g.par_iter()))
        .for_each(|(z, (&t, &g))| {
            let mx = z.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = z.iter().map(|x| (x - mx).exp()).sum();
            for x in z.iter_mut() {
                *x = -g * (*x - mx).exp() / sum;
            }
            z[t as usize] += g;
        });
}

/// `y += alpha·x` elementwise.
pub fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    y.par_chunks_mut(ELEMS_PER_TASK)
        .zip(x.par_chunks(ELEMS_PER_TASK))
        .for_each(|(y, x)| {
            for (a, b) in y.iter_mut().zip(x) {
                *a += alpha * b;
            }
        });
}

/// `y += x` elementwise.
pub fn add_inplace(y: &mut [f32], x: &[f32]) {
    y.par_iter_mut()
        .zip(x.par_iter())
        .for_each(|(a, b)| *a += b);
}

/// `y[r] += bias` for every row `r` of `y` (`nn.Linear`'s bias, row-major `[rows, n]`).
pub fn add_bias(y: &mut [f32], bias: &[f32]) {
    y.par_chunks_mut(bias.len()).for_each(|row| {
        for (a, b) in row.iter_mut().zip(bias) {
            *a += b;
        }
    });
}

/// LayerNorm over the last dimension (torch `nn.LayerNorm`, f32):
/// `y = (x − mean) / sqrt(var + eps) · w + b`, with the biased variance.
pub fn layernorm_forward(x: &[f32], weight: &[f32], bias: &[f32], eps: f32, out: &mut [f32]) {
    let h = weight.len();
    out.par_chunks_mut(h)
        .zip(x.par_chunks(h))
        .for_each(|(y, x)| {
            let mean = x.iter().sum::<f32>() / h as f32;
            let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / h as f32;
            let r = 1.0 / (var + eps).sqrt();
            for i in 0..h {
                y[i] = (x[i] - mean) * r * weight[i] + bias[i];
            }
        });
}

/// GELU, exact erf form (torch `F.gelu` default, transformers' `"gelu"`):
/// `x · 0.5 · (1 + erf(x / √2))`.
#[inline]
pub fn gelu(x: f32) -> f32 {
    x * 0.5 * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// GELU in place.
pub fn gelu_inplace(x: &mut [f32]) {
    x.par_iter_mut().for_each(|v| *v = gelu(*v));
}

/// tanh in place (RoBERTa's classification head).
pub fn tanh_inplace(x: &mut [f32]) {
    x.par_iter_mut().for_each(|v| *v = v.tanh());
}

/// Bidirectional (encoder) attention over packed sequences: every token of a sequence
/// sees every token of the same sequence and nothing else, which is what an encoder with
/// a padding mask computes for the unpadded rows. Scores scaled by 1/√d, f32 softmax.
/// q/k/v/out `[tokens, H·d]`. Per (sequence, head) and block of query rows:
/// `S = scale·Q·Kᵀ`, row softmax, `O = P·V`.
pub fn attention_bidir_forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    pack: &Packing,
    n_heads: usize,
    d: usize,
    out: &mut [f32],
) {
    let scale = 1.0 / (d as f32).sqrt();
    let w = n_heads * d;
    let tasks: Vec<(usize, usize)> = (0..pack.n_seqs())
        .filter(|&s| !pack.range(s).is_empty())
        .flat_map(|s| (0..n_heads).map(move |h| (s, h)))
        .collect();
    let results: Vec<(usize, usize, Vec<f32>)> = tasks
        .par_iter()
        .map(|&(s, h)| {
            let r = pack.range(s);
            let t = r.len();
            let at = r.start * w + h * d;
            let (qh, kh, vh) = (&q[at..], &k[at..], &v[at..]);
            let keys = MatRef::strided(kh, t, d, w);
            let values = MatRef::strided(vh, t, d, w);
            let mut o = vec![0.0f32; t * d];
            let mut scratch = vec![0.0f32; ATTN_BLOCK.min(t) * t];
            for i0 in (0..t).step_by(ATTN_BLOCK) {
                let i1 = (i0 + ATTN_BLOCK).min(t);
                let p = &mut scratch[..(i1 - i0) * t];
                let queries = MatRef::strided(&qh[i0 * w..], i1 - i0, d, w);
                gemm_serial(queries, keys.t(), p, scale, 0.0);
                for row in p.chunks_mut(t) {
                    masked_softmax(row, 0, t - 1);
                }
                gemm_serial(
                    MatRef::new(p, i1 - i0, t),
                    values,
                    &mut o[i0 * d..i1 * d],
                    1.0,
                    0.0,
                );
            }
            (s, h, o)
        })
        .collect();
    for (s, h, o) in results {
        let r = pack.range(s);
        for i in 0..r.len() {
            out[(r.start + i) * w + h * d..][..d].copy_from_slice(&o[i * d..(i + 1) * d]);
        }
    }
}

/// Deterministic values in [-1, 1) for tests (a 64-bit LCG's high bits).
#[cfg(test)]
pub(crate) fn lcg(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_matmul(a: &[f32], m: usize, k: usize, b: &[f32], n: usize) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|l| a[i * k + l] * b[l * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn linear_matches_naive_product() {
        let (m, k, n) = (7, 13, 5);
        let x = lcg(m * k, 1);
        let w = lcg(n * k, 2);
        let mut wt = vec![0.0; k * n];
        for i in 0..n {
            for j in 0..k {
                wt[j * n + i] = w[i * k + j];
            }
        }
        let want = naive_matmul(&x, m, k, &wt, n);
        let mut got = vec![0.0; m * n];
        linear(&x, m, &w, n, &mut got);
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        // beta accumulates, alpha scales the product
        let mut acc = want.clone();
        gemm(
            MatRef::new(&x, m, k),
            MatRef::new(&w, n, k).t(),
            &mut acc,
            2.0,
            1.0,
        );
        for (a, b) in acc.iter().zip(&want) {
            assert!((a - 3.0 * b).abs() < 1e-4);
        }
    }

    #[test]
    fn rope_backward_inverts_forward_and_rotates_pairs() {
        let (heads, d) = (3, 8);
        let (cos, sin) = rope_tables(d, 10000.0, 16);
        let x = lcg(4 * heads * d, 3);
        let pos = [0u32, 3, 7, 15];
        let mut y = x.clone();
        rope_forward(&mut y, heads, d, &pos, &cos, &sin);
        // position 0 is the identity
        assert_eq!(&y[..heads * d], &x[..heads * d]);
        // a rotation keeps each (i, i+d/2) pair's norm
        let (a, b) = (x[heads * d + 1], x[heads * d + 1 + d / 2]);
        let (c, e) = (y[heads * d + 1], y[heads * d + 1 + d / 2]);
        assert!(((a * a + b * b) - (c * c + e * e)).abs() < 1e-5);
        assert!((a - c).abs() > 1e-4, "position 3 must rotate");
        rope_backward(&mut y, heads, d, &pos, &cos, &sin);
        for (p, q) in y.iter().zip(&x) {
            assert!((p - q).abs() < 1e-5);
        }
    }

    /// f64 finite differences of a scalar loss L = Σ c·f(x) for each backward op.
    fn fd_check(f: impl Fn(&[f32]) -> Vec<f32>, x: &[f32], c: &[f32], analytic: &[f32]) {
        let loss =
            |x: &[f32]| -> f64 { f(x).iter().zip(c).map(|(a, b)| *a as f64 * *b as f64).sum() };
        let h = 1e-2f32;
        for i in 0..x.len() {
            let mut xp = x.to_vec();
            xp[i] += h;
            let mut xm = x.to_vec();
            xm[i] -= h;
            let num = (loss(&xp) - loss(&xm)) / (2.0 * h as f64);
            let a = analytic[i] as f64;
            assert!(
                (num - a).abs() < 2e-3 + 2e-2 * a.abs(),
                "grad[{i}]: fd {num} vs analytic {a}"
            );
        }
    }

    #[test]
    fn rmsnorm_backward_matches_finite_differences() {
        let h = 6;
        let x = lcg(3 * h, 4);
        let w = lcg(h, 5).iter().map(|v| 1.0 + 0.3 * v).collect::<Vec<_>>();
        let c = lcg(3 * h, 6);
        let fwd = |x: &[f32]| {
            let mut y = vec![0.0; x.len()];
            let mut r = vec![0.0; x.len() / h];
            rmsnorm_forward(x, &w, 1e-6, &mut y, &mut r);
            y
        };
        let mut y = vec![0.0; x.len()];
        let mut r = vec![0.0; 3];
        rmsnorm_forward(&x, &w, 1e-6, &mut y, &mut r);
        let mut dx = vec![0.0; x.len()];
        rmsnorm_backward(&c, &x, &w, &r, &mut dx);
        fd_check(fwd, &x, &c, &dx);
    }

    #[test]
    fn swiglu_backward_matches_finite_differences() {
        let n = 10;
        let g = lcg(n, 7).iter().map(|v| 3.0 * v).collect::<Vec<_>>();
        let u = lcg(n, 8);
        let c = lcg(n, 9);
        let mut dg = vec![0.0; n];
        let mut du = vec![0.0; n];
        swiglu_backward(&c, &g, &u, &mut dg, &mut du);
        let fg = |g: &[f32]| {
            let mut o = vec![0.0; n];
            swiglu_forward(g, &u, &mut o);
            o
        };
        fd_check(fg, &g, &c, &dg);
        let fu = |u: &[f32]| {
            let mut o = vec![0.0; n];
            swiglu_forward(&g, u, &mut o);
            o
        };
        fd_check(fu, &u, &c, &du);
    }

    #[test]
    fn rope_backward_matches_finite_differences() {
        let (heads, d) = (2, 4);
        let (cos, sin) = rope_tables(d, 10000.0, 8);
        let pos = [1u32, 5];
        let x = lcg(2 * heads * d, 10);
        let c = lcg(2 * heads * d, 11);
        let mut dx = c.clone();
        rope_backward(&mut dx, heads, d, &pos, &cos, &sin);
        let f = |x: &[f32]| {
            let mut y = x.to_vec();
            rope_forward(&mut y, heads, d, &pos, &cos, &sin);
            y
        };
        fd_check(f, &x, &c, &dx);
    }

    #[test]
    fn attention_respects_window_and_gqa() {
        let shape = AttnShape {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 4,
            window: Some(3),
        };
        let t = 6;
        let q = lcg(t * 16, 12);
        let k = lcg(t * 8, 13);
        let mut v = lcg(t * 8, 14);
        let pack = Packing::from_lengths(&[t]);
        let run = |v: &[f32]| {
            let mut o = vec![0.0; t * 16];
            let mut l = vec![0.0; t * 4];
            attention_forward(&q, &k, v, &pack, shape, &mut o, &mut l);
            o
        };
        let base = run(&v);
        // token 0's value is outside the window of query 5 (keys 3..=5): no effect there
        for x in v.iter_mut().take(8) {
            *x += 10.0;
        }
        let moved = run(&v);
        assert_eq!(&base[5 * 16..6 * 16], &moved[5 * 16..6 * 16]);
        assert_ne!(&base[2 * 16..3 * 16], &moved[2 * 16..3 * 16]);
        // first query attends only to itself: output = its value row (kv head h/2)
        for h in 0..4 {
            for c in 0..4 {
                assert!((base[h * 4 + c] - v[(h / 2) * 4 + c] + 10.0).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn attention_decode_matches_last_row_of_forward() {
        // GQA 4:2, window 3: the last query of a 6-token sequence sees keys 3..=5 only
        let shape = AttnShape {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 4,
            window: Some(3),
        };
        let t = 6;
        let q = lcg(t * 16, 31);
        let k = lcg(t * 8, 32);
        let v = lcg(t * 8, 33);
        let mut o = vec![0.0; t * 16];
        let mut l = vec![0.0; t * 4];
        attention_forward(
            &q,
            &k,
            &v,
            &Packing::from_lengths(&[t]),
            shape,
            &mut o,
            &mut l,
        );
        // the cache holds the window's rows in ring order (5, 3, 4), after 2 junk rows
        let mut kc = lcg(2 * 8, 34);
        let mut vc = lcg(2 * 8, 35);
        for j in [5, 3, 4] {
            kc.extend_from_slice(&k[j * 8..(j + 1) * 8]);
            vc.extend_from_slice(&v[j * 8..(j + 1) * 8]);
        }
        let mut got = vec![0.0; 16];
        attention_decode(&q[5 * 16..], &kc, &vc, &[2], &[3], shape, &mut got);
        for (a, b) in got.iter().zip(&o[5 * 16..]) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn attention_backward_matches_finite_differences() {
        // two packed sequences, GQA 4:2, window 3 shorter than the sequences
        let shape = AttnShape {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 4,
            window: Some(3),
        };
        let pack = Packing::from_lengths(&[5, 4]);
        let t = pack.n_tokens();
        let q = lcg(t * 16, 21);
        let k = lcg(t * 8, 22);
        let v = lcg(t * 8, 23);
        let c = lcg(t * 16, 24);
        let fwd = |q: &[f32], k: &[f32], v: &[f32]| {
            let mut o = vec![0.0; t * 16];
            let mut l = vec![0.0; t * 4];
            attention_forward(q, k, v, &pack, shape, &mut o, &mut l);
            (o, l)
        };
        let (o, l) = fwd(&q, &k, &v);
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        attention_backward(
            &q, &k, &v, &o, &c, &l, &pack, shape, &mut dq, &mut dk, &mut dv,
        );
        fd_check(|x| fwd(x, &k, &v).0, &q, &c, &dq);
        fd_check(|x| fwd(&q, x, &v).0, &k, &c, &dk);
        fd_check(|x| fwd(&q, &k, x).0, &v, &c, &dv);
    }

    /// Naive attention in f64 straight from the definition (scores, masked softmax,
    /// weighted values), for comparing the blocked GEMM version on long sequences.
    fn naive_attention(q: &[f32], k: &[f32], v: &[f32], pack: &Packing, sh: AttnShape) -> Vec<f64> {
        let d = sh.head_dim;
        let (qw, kw) = (sh.n_heads * d, sh.n_kv_heads * d);
        let mut out = vec![0.0f64; q.len()];
        for s in 0..pack.n_seqs() {
            let r = pack.range(s);
            for h in 0..sh.n_heads {
                let kh = h / (sh.n_heads / sh.n_kv_heads);
                for i in 0..r.len() {
                    let keys = sh.first_key(i)..=i;
                    let sc: Vec<f64> = keys
                        .clone()
                        .map(|j| {
                            (0..d)
                                .map(|c| {
                                    q[(r.start + i) * qw + h * d + c] as f64
                                        * k[(r.start + j) * kw + kh * d + c] as f64
                                })
                                .sum::<f64>()
                                / (d as f64).sqrt()
                        })
                        .collect();
                    let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = sc.iter().map(|x| (x - mx).exp()).sum();
                    for (j, x) in keys.zip(&sc) {
                        let w = (x - mx).exp() / z;
                        for c in 0..d {
                            out[(r.start + i) * qw + h * d + c] +=
                                w * v[(r.start + j) * kw + kh * d + c] as f64;
                        }
                    }
                }
            }
        }
        out
    }

    #[test]
    fn attention_blocks_match_naive_on_long_sequences() {
        // Longer than one block of query rows (ATTN_BLOCK), window crossing block edges.
        for window in [None, Some(70)] {
            let shape = AttnShape {
                n_heads: 4,
                n_kv_heads: 2,
                head_dim: 8,
                window,
            };
            let pack = Packing::from_lengths(&[150, 0, 65]);
            let t = pack.n_tokens();
            let q = lcg(t * 32, 31);
            let k = lcg(t * 16, 32);
            let v = lcg(t * 16, 33);
            let mut o = vec![0.0; t * 32];
            let mut l = vec![0.0; t * 4];
            attention_forward(&q, &k, &v, &pack, shape, &mut o, &mut l);
            let want = naive_attention(&q, &k, &v, &pack, shape);
            for (i, (a, b)) in o.iter().zip(&want).enumerate() {
                assert!(
                    (*a as f64 - b).abs() < 1e-5,
                    "{window:?} out[{i}]: {a} vs {b}"
                );
            }

            // Backward: directional derivatives of L = Σ c·o along random directions.
            let c = lcg(t * 32, 34);
            let (mut dq, mut dk, mut dv) =
                (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
            attention_backward(
                &q, &k, &v, &o, &c, &l, &pack, shape, &mut dq, &mut dk, &mut dv,
            );
            let loss = |q: &[f32], k: &[f32], v: &[f32]| -> f64 {
                let o = naive_attention(q, k, v, &pack, shape);
                o.iter().zip(&c).map(|(a, b)| a * *b as f64).sum()
            };
            let eps = 1e-2f32;
            let moved = |x: &[f32], u: &[f32], e: f32| -> Vec<f32> {
                x.iter().zip(u).map(|(a, b)| a + e * b).collect()
            };
            for (which, grad, seed) in [(0, &dq, 35), (1, &dk, 36), (2, &dv, 37)] {
                let x = [&q, &k, &v][which];
                let u = lcg(x.len(), seed);
                let at = |e: f32| {
                    let mut inputs = [q.clone(), k.clone(), v.clone()];
                    inputs[which] = moved(x, &u, e);
                    loss(&inputs[0], &inputs[1], &inputs[2])
                };
                let num = (at(eps) - at(-eps)) / (2.0 * eps as f64);
                let ana: f64 = grad
                    .iter()
                    .zip(&u)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum();
                assert!(
                    (num - ana).abs() < 1e-3 * (1.0 + ana.abs()),
                    "{window:?} input {which}: fd {num} vs analytic {ana}"
                );
            }
        }
    }

    #[test]
    fn log_softmax_rows_backward_matches_finite_differences() {
        let (rows, v) = (3, 37);
        let z = lcg(rows * v, 41)
            .iter()
            .map(|x| 4.0 * x)
            .collect::<Vec<_>>();
        let targets = [5u32, 0, 36];
        let g = [0.7f32, -1.3, 0.4];
        let f = |z: &[f32]| {
            let mut out = vec![0.0; rows];
            log_softmax_rows_at(z, v, &targets, &mut out);
            out
        };
        let mut grad = z.clone();
        log_softmax_rows_at_backward(&mut grad, v, &targets, &g);
        fd_check(f, &z, &g, &grad);
    }

    #[test]
    fn log_softmax_at_normalises() {
        let z = [1.0f32, 2.0, 3.0, 1000.0];
        let total: f32 = (0..4).map(|i| log_softmax_at(&z, i).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!(log_softmax_at(&z, 3).abs() < 1e-6);
    }

    #[test]
    fn layernorm_matches_definition() {
        let h = 7;
        let x = lcg(3 * h, 41)
            .iter()
            .map(|v| 5.0 * v + 2.0)
            .collect::<Vec<_>>();
        let w = lcg(h, 42);
        let b = lcg(h, 43);
        let mut y = vec![0.0; x.len()];
        layernorm_forward(&x, &w, &b, 1e-5, &mut y);
        for r in 0..3 {
            let xr = &x[r * h..(r + 1) * h];
            let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / h as f64;
            let var = xr.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / h as f64;
            for i in 0..h {
                let want = (xr[i] as f64 - mean) / (var + 1e-5).sqrt() * w[i] as f64 + b[i] as f64;
                assert!((y[r * h + i] as f64 - want).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn gelu_matches_normal_cdf() {
        // gelu(x) = x·Φ(x); Φ(1), Φ(2), Φ(−3) from standard normal tables.
        for (x, phi) in [
            (1.0f32, 0.841_344_746_068_542_9f64),
            (2.0, 0.977_249_868_051_820_8),
            (-3.0, 0.001_349_898_031_630_094_6),
        ] {
            assert!((gelu(x) as f64 - x as f64 * phi).abs() < 1e-6, "gelu({x})");
        }
        assert_eq!(gelu(0.0), 0.0);
        let mut v = vec![1.0f32, -1.0];
        gelu_inplace(&mut v);
        assert!((v[0] - v[1] - 1.0).abs() < 1e-6, "gelu(x) − gelu(−x) = x");
    }

    #[test]
    fn bias_and_tanh() {
        let mut y = vec![0.0f32, 1.0, 2.0, 3.0];
        add_bias(&mut y, &[10.0, 20.0]);
        assert_eq!(y, [10.0, 21.0, 12.0, 23.0]);
        let mut t = vec![0.0f32, 0.5, -20.0];
        tanh_inplace(&mut t);
        assert_eq!(t[0], 0.0);
        assert!((t[1] - 0.462_117_16).abs() < 1e-6);
        assert_eq!(t[2], -1.0);
    }

    #[test]
    fn bidirectional_attention_matches_naive_and_stays_in_its_sequence() {
        // Two packed sequences; the first is longer than one block of query rows.
        let (h, d) = (3, 4);
        let w = h * d;
        let pack = Packing::from_lengths(&[70, 5]);
        let t = pack.n_tokens();
        let q = lcg(t * w, 51);
        let k = lcg(t * w, 52);
        let mut v = lcg(t * w, 53);
        let run = |v: &[f32]| {
            let mut o = vec![0.0; t * w];
            attention_bidir_forward(&q, &k, v, &pack, h, d, &mut o);
            o
        };
        let o = run(&v);
        for s in 0..2 {
            let r = pack.range(s);
            for hh in 0..h {
                for i in r.clone() {
                    let sc: Vec<f64> = r
                        .clone()
                        .map(|j| {
                            (0..d)
                                .map(|c| {
                                    q[i * w + hh * d + c] as f64 * k[j * w + hh * d + c] as f64
                                })
                                .sum::<f64>()
                                / (d as f64).sqrt()
                        })
                        .collect();
                    let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = sc.iter().map(|x| (x - mx).exp()).sum();
                    for c in 0..d {
                        let want: f64 = r
                            .clone()
                            .zip(&sc)
                            .map(|(j, x)| (x - mx).exp() / z * v[j * w + hh * d + c] as f64)
                            .sum();
                        assert!((o[i * w + hh * d + c] as f64 - want).abs() < 1e-5);
                    }
                }
            }
        }
        // The last token of sequence 0 moves its first query (no causal mask) but not
        // sequence 1.
        for x in &mut v[69 * w..70 * w] {
            *x += 10.0;
        }
        let moved = run(&v);
        assert_ne!(&o[..w], &moved[..w]);
        assert_eq!(&o[70 * w..], &moved[70 * w..]);
    }
}
