//! Compiles kernels/*.cu with nvcc into ONE fatbin, embedded in the crate by
//! `src/backend/cuda/mod.rs` through `$OUT_DIR/palign_kernels.rs`.
//!
//! - nvcc: `$NVCC`, `$CUDA_HOME/bin`, `$CUDA_PATH/bin`, `PATH`, `/usr/local/cuda/bin`, then
//!   the project's own install (`tools/install-nvcc.sh`: `$PALIGN_CUDA_DIR` or
//!   `~/.cache/palign/cuda-13.0`). A user's toolkit comes first because the kernels must
//!   load on that user's driver. `PALIGN_NVCC_SEARCH=0` looks at `$NVCC` only.
//! - archs: SASS for sm_80, sm_86, sm_89, sm_90a plus PTX for compute_80 (JIT on newer
//!   GPUs). `PALIGN_CUDA_ARCHS="90a"` or `"80,90a"` builds only those SASS targets; add
//!   `compute_80` to the list to keep the PTX.
//! - no nvcc: a cargo warning, an empty fatbin and `KERNELS_COMPILED = false` (CPU-only
//!   build). `PALIGN_REQUIRE_KERNELS=1` (CI) turns that, and any compile error, into a
//!   build failure.
//! - ptxas runs verbose, for its performance advisories (C75xx "Potential Performance
//!   Loss", e.g. wgmma serialized by the compiler; C7519, a warpgroup.arrive it had to
//!   add after a misplaced wgmma.fence): each is a cargo warning, and under
//!   `PALIGN_REQUIRE_KERNELS=1` a build failure, since nothing else would show that a
//!   kernel lost its asynchrony. The rest of the verbose report is dropped.
//! - one module: the .cu files are compiled as one translation unit (a generated file
//!   that #includes them all), since `cuModuleLoadData` takes one image per arch and
//!   separate non-relocatable cubins cannot be linked. nvcc `--threads` compiles the
//!   archs in parallel, which is where the time goes.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const DEFAULT_SASS: &[&str] = &["80", "86", "89", "90a"];
const DEFAULT_PTX: &[&str] = &["80"];
const MIN_NVCC: (u32, u32) = (12, 4);
const FATBIN: &str = "palign_kernels.fatbin";
const ENV_VARS: &[&str] = &[
    "NVCC",
    "NVCC_CCBIN",
    "CUDA_HOME",
    "CUDA_PATH",
    "PALIGN_CUDA_ARCHS",
    "PALIGN_REQUIRE_KERNELS",
    "PALIGN_NVCC_SEARCH",
    "PALIGN_CUDA_DIR",
    "XDG_CACHE_HOME",
    "HOME",
];

struct Nvcc {
    path: PathBuf,
    version: (u32, u32),
}

fn main() {
    let manifest =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let kernel_dir = manifest.join("kernels");

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    for var in ENV_VARS {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rustc-check-cfg=cfg(palign_kernels)");

    let require = env::var("PALIGN_REQUIRE_KERNELS").is_ok_and(|v| v == "1");
    let (sass, ptx) = match archs() {
        Ok(a) => a,
        Err(msg) => fail(&msg),
    };

    let mut sources = Vec::new();
    if let Ok(rd) = fs::read_dir(&kernel_dir) {
        for entry in rd.flatten() {
            let path = entry.path();
            println!("cargo:rerun-if-changed={}", path.display());
            if path.extension().is_some_and(|e| e == "cu") {
                sources.push(path);
            }
        }
    }
    sources.sort();

    let result = find_nvcc().and_then(|nvcc| {
        println!("cargo:rerun-if-changed={}", nvcc.path.display());
        compile(&nvcc, &kernel_dir, &sources, &sass, &ptx, &out_dir).map(|secs| (nvcc, secs))
    });
    match result {
        Ok((nvcc, (secs, advisories))) => {
            if require && !advisories.is_empty() {
                fail(&format!(
                    "ptxas performance advisories (PALIGN_REQUIRE_KERNELS=1 makes them errors):\n{}",
                    advisories.join("\n")
                ));
            }
            let targets: Vec<String> = sass
                .iter()
                .map(|a| format!("sm_{a}"))
                .chain(ptx.iter().map(|a| format!("compute_{a}")))
                .collect();
            let note = format!(
                "nvcc {}.{} ({}), {} files, {:.1} s",
                nvcc.version.0,
                nvcc.version.1,
                nvcc.path.display(),
                sources.len(),
                secs
            );
            write_generated(&out_dir, true, &targets.join(" "), &note);
            println!("cargo:rustc-cfg=palign_kernels");
        }
        Err(msg) => {
            if require {
                fail(&format!(
                    "{msg}\n(PALIGN_REQUIRE_KERNELS=1 makes this an error)"
                ));
            }
            // One cargo:warning per line: cargo shows only the first line of each.
            let mut lines = msg.lines();
            let first = lines.next().unwrap_or_default();
            println!("cargo:warning=palign: building without CUDA kernels (CPU only): {first}");
            for line in lines.take(40) {
                println!("cargo:warning={line}");
            }
            if let Err(e) = fs::write(out_dir.join(FATBIN), []) {
                fail(&format!(
                    "cannot write {}: {e}",
                    out_dir.join(FATBIN).display()
                ));
            }
            write_generated(&out_dir, false, "", &msg);
        }
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("error: palign build.rs: {msg}");
    std::process::exit(1);
}

/// SASS archs and PTX archs from `PALIGN_CUDA_ARCHS`, or the defaults.
fn archs() -> Result<(Vec<String>, Vec<String>), String> {
    let Ok(spec) = env::var("PALIGN_CUDA_ARCHS") else {
        let own = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        return Ok((own(DEFAULT_SASS), own(DEFAULT_PTX)));
    };
    let (mut sass, mut ptx) = (Vec::new(), Vec::new());
    for tok in spec
        .split([',', ' ', ';'])
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        let (list, arch) = match tok.strip_prefix("compute_") {
            Some(a) => (&mut ptx, a),
            None => (&mut sass, tok.strip_prefix("sm_").unwrap_or(tok)),
        };
        let digits = arch.trim_end_matches(['a', 'f']);
        let ok = digits.len() >= 2
            && digits.chars().all(|c| c.is_ascii_digit())
            && arch.len() - digits.len() <= 1;
        if !ok {
            return Err(format!(
                "PALIGN_CUDA_ARCHS: cannot read {tok:?} (want e.g. \"80,90a\" or \"sm_86,compute_80\")"
            ));
        }
        list.push(arch.to_string());
    }
    if sass.is_empty() && ptx.is_empty() {
        return Err("PALIGN_CUDA_ARCHS is set but names no arch".into());
    }
    Ok((sass, ptx))
}

/// The first nvcc in the search order that runs and is new enough.
fn find_nvcc() -> Result<Nvcc, String> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = env::var_os("NVCC") {
        candidates.push(PathBuf::from(p));
    }
    let search = !env::var("PALIGN_NVCC_SEARCH").is_ok_and(|v| v == "0");
    if search {
        for var in ["CUDA_HOME", "CUDA_PATH"] {
            if let Some(home) = env::var_os(var) {
                candidates.push(PathBuf::from(home).join("bin/nvcc"));
            }
        }
        if let Some(path) = env::var_os("PATH") {
            candidates.extend(env::split_paths(&path).map(|d| d.join("nvcc")));
        }
        candidates.push(PathBuf::from("/usr/local/cuda/bin/nvcc"));
        if let Some(dir) = project_cuda_dir() {
            candidates.push(dir.join("bin/nvcc"));
        }
    }

    let mut rejected = Vec::new();
    if let Some(p) = env::var_os("NVCC") {
        if !Path::new(&p).is_file() {
            rejected.push(format!("$NVCC={} is not a file", Path::new(&p).display()));
        }
    }
    for cand in candidates {
        if !cand.is_file() {
            continue;
        }
        match nvcc_version(&cand) {
            Some(v) if v >= MIN_NVCC => {
                return Ok(Nvcc {
                    path: cand,
                    version: v,
                })
            }
            Some(v) => rejected.push(format!("{} is {}.{}", cand.display(), v.0, v.1)),
            None => rejected.push(format!("{} does not run", cand.display())),
        }
    }
    let mut msg = if search {
        "nvcc not found ($NVCC, $CUDA_HOME/bin, $CUDA_PATH/bin, PATH, /usr/local/cuda/bin, \
         ~/.cache/palign/cuda-13.0/bin); run tools/install-nvcc.sh or set NVCC"
            .to_string()
    } else {
        "nvcc not found (PALIGN_NVCC_SEARCH=0: only $NVCC is used)".to_string()
    };
    if !rejected.is_empty() {
        msg.push_str(&format!(
            "; skipped (nvcc {}.{}+ needed): {}",
            MIN_NVCC.0,
            MIN_NVCC.1,
            rejected.join(", ")
        ));
    }
    Err(msg)
}

/// Where tools/install-nvcc.sh installs (keep the two in sync).
fn project_cuda_dir() -> Option<PathBuf> {
    if let Some(d) = env::var_os("PALIGN_CUDA_DIR") {
        return Some(PathBuf::from(d));
    }
    let cache = match env::var_os("XDG_CACHE_HOME") {
        Some(x) if !x.is_empty() => PathBuf::from(x),
        _ => PathBuf::from(env::var_os("HOME")?).join(".cache"),
    };
    Some(cache.join("palign/cuda-13.0"))
}

/// (major, minor) from `nvcc --version` ("... release 13.0, V13.0.88").
fn nvcc_version(nvcc: &Path) -> Option<(u32, u32)> {
    let out = Command::new(nvcc).arg("--version").output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let rest = text.split("release ").nth(1)?;
    let ver = rest.split(',').next()?.trim();
    let mut parts = ver.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Compile all sources as one unit into `$OUT_DIR/palign_kernels.fatbin`; returns seconds.
fn compile(
    nvcc: &Nvcc,
    kernel_dir: &Path,
    sources: &[PathBuf],
    sass: &[String],
    ptx: &[String],
    out_dir: &Path,
) -> Result<(f64, Vec<String>), String> {
    if sources.is_empty() {
        return Err(format!("no .cu files in {}", kernel_dir.display()));
    }
    let unit = out_dir.join("palign_kernels.cu");
    let mut text = String::from("// Generated by build.rs: every kernels/*.cu in one unit.\n");
    for s in sources {
        text.push_str(&format!("#include \"{}\"\n", s.display()));
    }
    fs::write(&unit, text).map_err(|e| format!("cannot write {}: {e}", unit.display()))?;

    let n_targets = sass.len() + ptx.len();
    let jobs = env::var("NUM_JOBS")
        .ok()
        .and_then(|j| j.parse::<usize>().ok())
        .unwrap_or(1)
        .clamp(1, n_targets.max(1));
    let fatbin = out_dir.join(FATBIN);
    let mut cmd = Command::new(&nvcc.path);
    cmd.arg("-fatbin")
        .args(["--threads", &jobs.to_string()])
        .args(["-O3", "-lineinfo", "-std=c++17", "--expt-relaxed-constexpr"])
        .args(["-Xptxas", "-v"])
        // Uncompressed, so the kernel names stay visible to the embedding test.
        .arg("--no-compress")
        .arg("-I")
        .arg(kernel_dir);
    for a in sass {
        cmd.args(["-gencode", &format!("arch=compute_{a},code=sm_{a}")]);
    }
    for a in ptx {
        cmd.args(["-gencode", &format!("arch=compute_{a},code=compute_{a}")]);
    }
    cmd.arg("-o").arg(&fatbin).arg(&unit);

    let t0 = Instant::now();
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {}: {e}", nvcc.path.display()))?;
    let secs = t0.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!(
            "nvcc failed ({}):\n{:?}\n{stderr}",
            out.status, cmd
        ));
    }
    // Surface warnings and ptxas's performance advisories; drop its verbose report
    // (registers, stack, compile times: `ptxas info` lines and their indented details).
    let mut advisories = Vec::new();
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        // C7519: ptxas had to add a warpgroup.arrive, i.e. registers a wgmma uses were
        // written after its wgmma.fence: the fence is in the wrong place.
        if line.contains("Potential Performance Loss") || line.contains("(C7519)") {
            advisories.push(line.to_string());
        } else if line.starts_with("ptxas info") || line.starts_with(' ') {
            continue;
        }
        println!("cargo:warning=nvcc: {line}");
    }
    match fs::metadata(&fatbin) {
        Ok(m) if m.len() > 0 => Ok((secs, advisories)),
        _ => Err(format!("nvcc produced no {}", fatbin.display())),
    }
}

fn write_generated(out_dir: &Path, compiled: bool, targets: &str, note: &str) {
    // FNV-1a (64 bits) of the fatbin: a change detector for caches of measured kernel
    // choices, computed here once rather than by every process that reads a cache.
    let bytes = fs::read(out_dir.join(FATBIN)).unwrap_or_default();
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let text = format!(
        "// Generated by build.rs.\n\
         /// The kernels as one fatbin (empty when built without nvcc).\n\
         pub static FATBIN: &[u8] = include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{FATBIN}\"));\n\
         /// Whether build.rs compiled the kernels.\n\
         pub const KERNELS_COMPILED: bool = {compiled};\n\
         /// GPU targets in the fatbin (`sm_XX` SASS, `compute_XX` PTX).\n\
         pub const TARGETS: &str = {targets:?};\n\
         /// How the kernels were built, or why they were not.\n\
         pub const BUILD_NOTE: &str = {note:?};\n\
         /// FNV-1a hash of FATBIN, as 16 hex digits.\n\
         pub const FATBIN_HASH: &str = \"{hash:016x}\";\n"
    );
    let path = out_dir.join("palign_kernels.rs");
    if let Err(e) = fs::write(&path, text) {
        fail(&format!("cannot write {}: {e}", path.display()));
    }
}
