//! One module per CLI command; `main.rs` parses flags and calls `run` of these.

pub mod bench;
pub mod demo;
pub mod eval;
pub mod generate;
pub mod grid;
pub mod init_tiny;
pub mod merge;
pub mod merge_adapter;
pub mod quantize;
pub mod score;

use crate::error::{bad, Result};

/// Options every command takes (CLI.md).
#[derive(clap::Args, Clone, Debug)]
pub struct Common {
    /// auto: CUDA when a device and compiled kernels exist, else CPU.
    #[arg(long, default_value = "auto", global = true)]
    pub device: String,
    /// CPU threads (default: all cores).
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    /// Random seed.
    #[arg(long, default_value_t = 0, global = true)]
    pub seed: u64,
    /// Hide progress bars.
    #[arg(long, global = true)]
    pub quiet: bool,
}

/// The backend a command runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda,
}

impl Common {
    /// Sets the thread pool and resolves `--device`.
    pub fn setup(&self) -> Result<Device> {
        if let Some(n) = self.threads {
            if n == 0 {
                return Err(bad("--threads must be at least 1"));
            }
            // Fails only if a pool was already built (tests calling twice): keep that one.
            let _ = rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build_global();
        }
        // `PALIGN_DEVICE` stands in for `--device auto` (the CPU-golden tests pin cpu with
        // it, so they stay CPU tests on a GPU host; grid children inherit it).
        let env = std::env::var("PALIGN_DEVICE").ok();
        let device = match (self.device.as_str(), env.as_deref()) {
            ("auto", Some(d)) if !d.is_empty() => d,
            (d, _) => d,
        };
        match device {
            "cpu" => Ok(Device::Cpu),
            "auto" => Ok(match crate::backend::cuda::available() {
                Ok(()) => Device::Cuda,
                Err(_) => Device::Cpu,
            }),
            "cuda" => match crate::backend::cuda::available() {
                Ok(()) => Ok(Device::Cuda),
                Err(crate::Error::Cuda(m)) => Err(bad(format!("--device cuda: {m}"))),
                Err(e) => Err(e),
            },
            other => Err(bad(format!(
                "--device: unknown device `{other}` (auto, cpu, cuda)"
            ))),
        }
    }

    /// `setup` for commands that only run on the CPU: `auto` means the CPU there, and an
    /// explicit `--device cuda` is refused.
    pub fn setup_cpu_only(&self, command: &str) -> Result<()> {
        if self.device == "cuda" {
            return Err(bad(format!(
                "--device cuda: `{command}` runs on the CPU only; use --device cpu or auto"
            )));
        }
        let mut cpu = self.clone();
        cpu.device = "cpu".into();
        cpu.setup().map(|_| ())
    }

    /// Whether to draw progress bars: not with --quiet, and only on a terminal.
    pub fn progress(&self) -> bool {
        use std::io::IsTerminal;
        !self.quiet && std::io::stderr().is_terminal()
    }
}

/// A progress bar on stderr, hidden when `show` is false.
pub fn progress_bar(len: u64, show: bool, what: &str) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(len);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec} ETA {eta}")
            .expect("static template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// Checks `--quant` (nf4, or none).
pub fn check_quant(quant: Option<&str>) -> Result<()> {
    match quant {
        None | Some("nf4") => Ok(()),
        Some(q) => Err(bad(format!("--quant: unknown quantization `{q}` (nf4)"))),
    }
}

/// A model folder (`--quant nf4`: its projections quantized as they load) and an optional
/// PEFT adapter, both on `device`: what `score`, `generate` and `eval` run.
pub fn load_model_adapter(
    model: &std::path::Path,
    adapter: Option<&std::path::Path>,
    quant: Option<&str>,
    device: Device,
) -> Result<(crate::model::Model, Option<crate::lora::Adapter>)> {
    check_quant(quant)?;
    let nf4 = quant.map(|_| (crate::quant::DEFAULT_BLOCKSIZE, true));
    let cuda = device == Device::Cuda;
    let m = crate::model::Model::load_with(model, nf4, cuda)?;
    let mut a = adapter
        .map(|dir| crate::lora::peft::load(dir, &m.cfg))
        .transpose()?;
    if cuda {
        a = a.map(|a| a.to_device_bf16()).transpose()?;
    }
    Ok((m, a))
}
