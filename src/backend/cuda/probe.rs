//! Probes of the hardware primitives the kernels are built on (kernels/probe.cu), for
//! tests/gpu_probe.rs: one sm_90a warpgroup MMA of each form the kernels use, on operands
//! whose exact product is known, so a GPU run that fails a wgmma kernel's parity test also
//! says which primitive (descriptor, swizzle, transpose flag, register fragment) is misread.

use cudarc::driver::DeviceRepr;

use super::params::WgmmaProbeParams;
use super::Gpu;
use crate::error::{bad, Result};

// SAFETY: a plain C struct of kernels/params.h (bindgen), passed by value.
unsafe impl DeviceRepr for WgmmaProbeParams {}

/// The forms, by number: what each is, its N (D is 64 x N) and its kernel.
pub const WGMMA_FORMS: [(&str, usize, &str); 5] = [
    ("m64n128k16, A and B K-major", 128, "wgmma_probe_0"),
    ("m64n64k16, A and B K-major", 64, "wgmma_probe_1"),
    ("m64n64k16, A and B MN-major", 64, "wgmma_probe_2"),
    (
        "m64n64k16, A from registers, B MN-major",
        64,
        "wgmma_probe_3",
    ),
    (
        "m64n256k16, A from registers, B K-major",
        256,
        "wgmma_probe_4",
    ),
];

/// PROBE_SMEM in kernels/probe.cu: the A and B tiles and the 1024-byte alignment.
const PROBE_SMEM: u32 = 8192 + 256 * 128 + 1024;

/// D = (1 if `accumulate`) + A·B by one wgmma of form `form` ([`WGMMA_FORMS`]), for A
/// `[64][16]` and B `[16][N]` row-major; D comes back `[64][N]` row-major. The values should be
/// ones bf16 holds exactly (the operands are rounded to bf16). Needs compute capability
/// 9.0 and sm_90a kernels.
pub fn wgmma_probe(
    gpu: &Gpu,
    form: usize,
    accumulate: bool,
    a: &[f32],
    b: &[f32],
) -> Result<Vec<f32>> {
    let Some(&(_, n, kernel)) = WGMMA_FORMS.get(form) else {
        return Err(bad(format!(
            "wgmma probe: form {form} (0..{} exist)",
            WGMMA_FORMS.len()
        )));
    };
    if a.len() != 64 * 16 || b.len() != 16 * n {
        return Err(bad(format!(
            "wgmma probe: A has {} values (64 x 16 wanted), B {} (16 x {n})",
            a.len(),
            b.len()
        )));
    }
    let cc = gpu.compute_capability();
    if !super::nf4::wgmma_supported(cc, super::TARGETS) {
        return Err(bad(format!(
            "wgmma probe: needs compute capability 9.0 and sm_90a kernels; this GPU is {}.{} \
             and the kernels were built for [{}]",
            cc.0,
            cc.1,
            super::TARGETS
        )));
    }
    let da = gpu.upload(a)?;
    let db = gpu.upload(b)?;
    let d = gpu.zeros::<f32>(64 * n)?;
    let p = WgmmaProbeParams {
        a: da.ptr(),
        b: db.ptr(),
        d: d.ptr(),
        form: form as i32,
        accumulate: i32::from(accumulate),
    };
    gpu.launch_smem(kernel, 1, 128, PROBE_SMEM, &p)?;
    gpu.download(&d)
}
