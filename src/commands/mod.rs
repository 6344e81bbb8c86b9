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

/// Where the device name came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSource {
    /// `--device`
    Flag,
    /// `PALIGN_DEVICE` (with `--device auto`)
    Env,
}

impl DeviceSource {
    /// The flag or variable, for messages.
    pub fn name(self) -> &'static str {
        match self {
            DeviceSource::Flag => "--device",
            DeviceSource::Env => "PALIGN_DEVICE",
        }
    }

    /// How a value of it reads in a message: `--device cuda` or `PALIGN_DEVICE=cuda`.
    fn with_value(self, v: &str) -> String {
        match self {
            DeviceSource::Flag => format!("--device {v}"),
            DeviceSource::Env => format!("PALIGN_DEVICE={v}"),
        }
    }
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
        let (device, source) = self.device_choice()?;
        match device.as_str() {
            "auto" => Ok(match crate::backend::cuda::available() {
                Ok(()) => Device::Cuda,
                Err(_) => Device::Cpu,
            }),
            "cuda" => match crate::backend::cuda::available() {
                Ok(()) => Ok(Device::Cuda),
                Err(crate::Error::Cuda(m)) => {
                    Err(bad(format!("{}: {m}", source.with_value("cuda"))))
                }
                Err(e) => Err(e),
            },
            _ => Ok(Device::Cpu),
        }
    }

    /// The device asked for, checked but not opened: `--device`, or `PALIGN_DEVICE`
    /// standing in for `--device auto` (the CPU-golden tests pin cpu with it, so they stay
    /// CPU tests on a GPU host; grid children inherit it). An unknown name is bad input
    /// naming where it came from.
    pub fn device_choice(&self) -> Result<(String, DeviceSource)> {
        let env = std::env::var("PALIGN_DEVICE")
            .ok()
            .filter(|d| !d.is_empty());
        let (name, source) = match (self.device.as_str(), env) {
            ("auto", Some(d)) => (d, DeviceSource::Env),
            (d, _) => (d.to_string(), DeviceSource::Flag),
        };
        match name.as_str() {
            "auto" | "cpu" | "cuda" => Ok((name, source)),
            other => Err(bad(format!(
                "{}: unknown device `{other}` (auto, cpu, cuda)",
                source.name()
            ))),
        }
    }

    /// `setup` for commands that only run on the CPU: `auto` means the CPU there, and an
    /// explicit `--device cuda` is refused (`PALIGN_DEVICE=cuda` stands in for `auto`, so
    /// a grid's CPU-only cells still run under it). Unknown names are refused either way.
    pub fn setup_cpu_only(&self, command: &str) -> Result<()> {
        let (device, source) = self.device_choice()?;
        if device == "cuda" && source == DeviceSource::Flag {
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
