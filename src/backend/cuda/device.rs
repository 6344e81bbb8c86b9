//! The CUDA device: driver check, context, one stream, the kernel module loaded once
//! from the embedded fatbin, the caching allocator, cuBLAS, and event timers.
//!
//! One `Gpu` per process (device 0; pick another with CUDA_VISIBLE_DEVICES), created on
//! first use by [`Gpu::get`]. All work goes to one stream, so ordering is implicit and
//! cudarc's per-buffer event tracking is switched off.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytemuck::Pod;
use cudarc::driver::{
    result as cu, sys, CudaContext, CudaEvent, CudaFunction, CudaModule, CudaStream, DeviceRepr,
    DriverError, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;

use super::alloc::{DeviceBuffer, Pool, PoolStats, RawAlloc};
use super::blas::Blas;
use super::{BUILD_NOTE, FATBIN, KERNEL_NAMES, TARGETS};
use crate::error::{Error, Result};

pub(crate) fn cuda_err(what: &str) -> impl Fn(DriverError) -> Error + '_ {
    move |e| Error::Cuda(format!("{what}: {e}"))
}

/// The process-wide device (see the module docs).
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    functions: HashMap<&'static str, CudaFunction>,
    pool: Arc<Pool>,
    blas: Mutex<Option<Blas>>,
    /// Dynamic shared memory each kernel has opted in to so far (`opt_in_smem`).
    smem_opt_in: Mutex<HashMap<String, usize>>,
    name: String,
    compute_capability: (i32, i32),
    sm_count: u32,
    /// CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN.
    max_smem_optin: usize,
    /// CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE, bytes.
    l2_bytes: usize,
    driver_version: i32,
    // The loaded fatbin (the functions hold it too).
    _module: Arc<CudaModule>,
}

static GPU: Mutex<Option<Arc<Gpu>>> = Mutex::new(None);

/// cuMemAlloc/cuMemFree for the pool.
struct DriverAlloc {
    ctx: Arc<CudaContext>,
}

impl RawAlloc for DriverAlloc {
    fn alloc(&self, bytes: usize) -> Result<u64> {
        self.ctx
            .bind_to_thread()
            .map_err(cuda_err("bind context"))?;
        // SAFETY: a plain allocation in the bound context; the memory is uninitialized
        // and only ever used through DeviceBuffer<T: Pod>.
        unsafe { cu::malloc_sync(bytes) }.map_err(cuda_err("cuMemAlloc"))
    }
    fn free(&self, ptr: u64) {
        // Queued kernels may still use a cached block: wait for them first (frees only
        // happen in empty_cache and on out-of-memory, never in a warm step). Errors here
        // mean the context is already broken; nothing useful to do.
        if self.ctx.bind_to_thread().is_ok() && self.ctx.synchronize().is_ok() {
            // SAFETY: `ptr` came from `alloc` and the pool hands it out only once.
            let _ = unsafe { cu::free_sync(ptr) };
        }
    }
}

impl Gpu {
    /// The device, initialized on first call. Errors (never panics) when there is no
    /// driver, no device, or no compiled kernels.
    pub fn get() -> Result<Arc<Gpu>> {
        let mut slot = GPU.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(g) = slot.as_ref() {
            return Ok(g.clone());
        }
        let g = Arc::new(Gpu::init()?);
        *slot = Some(g.clone());
        Ok(g)
    }

    fn init() -> Result<Gpu> {
        // SAFETY: only tries to dlopen libcuda and closes it again.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::Cuda(
                "no CUDA driver found (libcuda.so could not be loaded); use --device cpu".into(),
            ));
        }
        cu::init().map_err(cuda_err("the CUDA driver failed to initialize"))?;
        let mut driver_version = 0;
        // SAFETY: writes one int.
        unsafe { sys::cuDriverGetVersion(&mut driver_version) }
            .result()
            .map_err(cuda_err("cuDriverGetVersion"))?;
        let count = cu::device::get_count().map_err(cuda_err("counting CUDA devices"))?;
        if count < 1 {
            return Err(Error::Cuda("no CUDA device found; use --device cpu".into()));
        }
        if !super::kernels_compiled() {
            return Err(Error::Cuda(format!(
                "this palign was built without CUDA kernels ({BUILD_NOTE}); rebuild with nvcc \
                 (tools/install-nvcc.sh) or use --device cpu"
            )));
        }

        let ctx = CudaContext::new(0).map_err(cuda_err("creating a CUDA context"))?;
        // SAFETY: no CudaSlice exists yet; all our work is ordered on one stream.
        unsafe { ctx.disable_event_tracking() };
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let cc = ctx
            .compute_capability()
            .map_err(cuda_err("compute capability"))?;
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(cuda_err("SM count"))?
            .max(1) as u32;
        let max_smem_optin = ctx
            .attribute(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .map_err(cuda_err("max shared memory per block"))?
            .max(0) as usize;
        let l2_bytes = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
            .map_err(cuda_err("L2 cache size"))?
            .max(0) as usize;
        let stream = ctx.new_stream().map_err(cuda_err("creating a stream"))?;

        let module = ctx
            .load_module(Ptx::from_binary(FATBIN.to_vec()))
            .map_err(|e| {
                Error::Cuda(format!(
                "cannot load the embedded kernels on {name} (sm_{}{}): {e}; they were built for \
                 [{TARGETS}] ({BUILD_NOTE}); rebuild with PALIGN_CUDA_ARCHS including this GPU, \
                 or with an nvcc no newer than the driver",
                cc.0, cc.1
            ))
            })?;
        let mut functions = HashMap::new();
        for &k in KERNEL_NAMES {
            let f = module
                .load_function(k)
                .map_err(|e| Error::Cuda(format!("kernel {k} missing from the fatbin: {e}")))?;
            functions.insert(k, f);
        }
        let pool = Pool::new(Box::new(DriverAlloc { ctx: ctx.clone() }));
        Ok(Gpu {
            ctx,
            stream,
            functions,
            pool,
            blas: Mutex::new(None),
            smem_opt_in: Mutex::new(HashMap::new()),
            name,
            compute_capability: cc,
            sm_count,
            max_smem_optin,
            l2_bytes,
            driver_version,
            _module: module,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }
    /// The L2 cache's size in bytes.
    pub fn l2_bytes(&self) -> usize {
        self.l2_bytes
    }
    /// The driver's CUDA version, e.g. 13000 for 13.0.
    pub fn driver_version(&self) -> i32 {
        self.driver_version
    }
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The most dynamic shared memory a block may opt in to on this device (read once, at
    /// open: the attention tuner and the launchers ask on every call).
    pub fn max_smem_optin(&self) -> Result<usize> {
        Ok(self.max_smem_optin)
    }

    /// Lets kernel `name` launch with `bytes` of dynamic shared memory: above 48 KiB a
    /// kernel must opt in, once per size (the largest asked so far is kept). Held under
    /// one lock so no launch sees the kernel before its attribute is set.
    pub fn opt_in_smem(&self, name: &str, bytes: usize) -> Result<()> {
        let mut set = self
            .smem_opt_in
            .lock()
            .map_err(|_| Error::Cuda("shared-memory opt-in lock poisoned".into()))?;
        if set.get(name).is_some_and(|&b| b >= bytes) {
            return Ok(());
        }
        let max = self.max_smem_optin()?;
        if bytes > max {
            return Err(Error::Cuda(format!(
                "{name} needs {bytes} bytes of shared memory per block; {} allows {max}",
                self.name
            )));
        }
        self.bind()?;
        self.function(name)?
            .set_attribute(
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
            .map_err(cuda_err("cuFuncSetAttribute(max dynamic shared memory)"))?;
        set.insert(name.to_string(), bytes);
        Ok(())
    }

    /// Device memory this process could still take, in bytes: what the driver reports
    /// free plus what the caching pool holds unused.
    pub fn available_bytes(&self) -> Result<usize> {
        self.bind()?;
        let (free, _total) = cu::mem_get_info().map_err(cuda_err("cuMemGetInfo"))?;
        let st = self.pool.stats();
        Ok(free + st.reserved_bytes.saturating_sub(st.in_use_bytes))
    }

    fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(cuda_err("bind context"))
    }

    /// A kernel of the module by its extern "C" name.
    pub fn function(&self, name: &str) -> Result<&CudaFunction> {
        self.functions
            .get(name)
            .ok_or_else(|| Error::Cuda(format!("no kernel named {name} in the module")))
    }

    /// Launch `name` with its params struct as the only argument. `grid == 0` is a no-op.
    pub(crate) fn launch<P: DeviceRepr>(
        &self,
        name: &str,
        grid: u32,
        block: u32,
        params: &P,
    ) -> Result<()> {
        self.launch_smem(name, grid, block, 0, params)
    }

    /// [`Gpu::launch`] with `smem` bytes of dynamic shared memory (at most 48 KB unless
    /// the kernel opted in: [`Gpu::opt_in_smem`]).
    pub(crate) fn launch_smem<P: DeviceRepr>(
        &self,
        name: &str,
        grid: u32,
        block: u32,
        smem: u32,
        params: &P,
    ) -> Result<()> {
        if grid == 0 {
            return Ok(());
        }
        self.launch_grid(name, (grid, 1, 1), block, smem, params)
    }

    /// Launch `name` on a 3-D grid of `block`-thread blocks with `smem` bytes of dynamic
    /// shared memory, its params struct as the only argument: the one place every
    /// launcher (here and in the kernel families' modules) goes through. No check of the
    /// grid: a zero dimension is the driver's error.
    pub(crate) fn launch_grid<P: DeviceRepr>(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        params: &P,
    ) -> Result<()> {
        let f = self.function(name)?;
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (block, 1, 1),
            shared_mem_bytes: smem,
        };
        let mut b = self.stream.launch_builder(f);
        b.arg(params);
        // SAFETY: every kernel takes exactly one argument, its params struct from
        // kernels/params.h (the Rust type is the bindgen translation); the launchers
        // check the buffers behind its pointers and the shared memory the kernel needs
        // (the kernels that depend on it trap when it is short).
        unsafe { b.launch(cfg) }.map_err(cuda_err(name))?;
        Ok(())
    }

    /// An uninitialized buffer of `len` elements (from the caching pool).
    pub fn alloc<T: Pod>(&self, len: usize) -> Result<DeviceBuffer<T>> {
        DeviceBuffer::new(&self.pool, len)
    }

    pub fn zeros<T: Pod>(&self, len: usize) -> Result<DeviceBuffer<T>> {
        let mut b = self.alloc(len)?;
        self.memset_zero(&mut b)?;
        Ok(b)
    }

    pub fn memset_zero<T: Pod>(&self, buf: &mut DeviceBuffer<T>) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: the range is the buffer's own allocation.
        unsafe { cu::memset_d8_async(buf.ptr(), 0, buf.bytes(), self.stream.cu_stream()) }
            .map_err(cuda_err("cuMemsetD8Async"))
    }

    /// A new buffer holding a copy of `host`.
    pub fn upload<T: Pod>(&self, host: &[T]) -> Result<DeviceBuffer<T>> {
        let mut b = self.alloc(host.len())?;
        self.copy_to_device(host, &mut b)?;
        Ok(b)
    }

    /// Copy `host` into `dst` (same length). Returns once `host` may be reused.
    pub fn copy_to_device<T: Pod>(&self, host: &[T], dst: &mut DeviceBuffer<T>) -> Result<()> {
        if host.len() != dst.len() {
            return Err(Error::Cuda(format!(
                "copy to device: {} host elements into a buffer of {}",
                host.len(),
                dst.len()
            )));
        }
        if host.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: sizes match; from pageable memory the driver stages the data before
        // returning, so `host` may be dropped afterwards.
        unsafe { cu::memcpy_htod_async(dst.ptr(), host, self.stream.cu_stream()) }
            .map_err(cuda_err("cuMemcpyHtoDAsync"))
    }

    /// A new buffer holding a device-to-device copy of `src` (queued on the stream).
    pub fn copy<T: Pod>(&self, src: &DeviceBuffer<T>) -> Result<DeviceBuffer<T>> {
        let mut dst = self.alloc(src.len())?;
        self.copy_device(src, &mut dst)?;
        Ok(dst)
    }

    /// Copy `src` into `dst` (same length), device to device.
    pub fn copy_device<T: Pod>(
        &self,
        src: &DeviceBuffer<T>,
        dst: &mut DeviceBuffer<T>,
    ) -> Result<()> {
        if src.len() != dst.len() {
            return Err(Error::Cuda(format!(
                "device copy: {} elements into a buffer of {}",
                src.len(),
                dst.len()
            )));
        }
        if src.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: both ranges are their buffers' own allocations, of equal byte size.
        unsafe { cu::memcpy_dtod_async(dst.ptr(), src.ptr(), src.bytes(), self.stream.cu_stream()) }
            .map_err(cuda_err("cuMemcpyDtoDAsync"))
    }

    /// Copy `src` to the host, waiting for all queued work first.
    pub fn download<T: Pod>(&self, src: &DeviceBuffer<T>) -> Result<Vec<T>> {
        let mut host = vec![T::zeroed(); src.len()];
        self.copy_to_host(src, &mut host)?;
        Ok(host)
    }

    pub fn copy_to_host<T: Pod>(&self, src: &DeviceBuffer<T>, host: &mut [T]) -> Result<()> {
        if host.len() != src.len() {
            return Err(Error::Cuda(format!(
                "copy to host: a buffer of {} into {} host elements",
                src.len(),
                host.len()
            )));
        }
        if host.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: sizes match; the stream is synchronized before `host` is read.
        unsafe { cu::memcpy_dtoh_async(host, src.ptr(), self.stream.cu_stream()) }
            .map_err(cuda_err("cuMemcpyDtoHAsync"))?;
        self.synchronize()
    }

    /// Wait for all queued work; reports asynchronous kernel errors.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(cuda_err("synchronize"))
    }

    pub fn pool_stats(&self) -> PoolStats {
        self.pool.stats()
    }

    /// Restart the pool's peak-memory counter at the bytes in use now.
    pub fn reset_peak(&self) {
        self.pool.reset_peak();
    }

    /// Give cached device memory back to the driver (e.g. before a phase with other sizes).
    pub fn empty_cache(&self) -> Result<()> {
        self.synchronize()?;
        self.pool.empty_cache();
        Ok(())
    }

    /// Run `f` with the cuBLAS handle, created on first use (workspace from the pool).
    /// The mutex gives one thread at a time the handle and its workspace.
    pub(crate) fn with_blas<R>(&self, f: impl FnOnce(&Blas) -> Result<R>) -> Result<R> {
        let mut slot = self.blas.lock().unwrap_or_else(|e| e.into_inner());
        let blas = match slot.take() {
            Some(b) => b,
            None => Blas::new(self)?,
        };
        let r = f(&blas);
        *slot = Some(blas);
        r
    }

    /// Whether [`Timer::elapsed_ms`] works here (a CUDA 12.8+ driver): kernel choices are
    /// measured only where it does.
    pub fn can_time_events(&self) -> bool {
        self.driver_version >= 12080
    }

    /// Start a timer: an event recorded now on the stream.
    pub fn timer(&self) -> Result<Timer> {
        let start = self
            .stream
            .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(cuda_err("cuEventRecord"))?;
        Ok(Timer { start })
    }
}

/// GPU time between two events on the stream (kernel time, not host time).
pub struct Timer {
    start: CudaEvent,
}

impl Timer {
    /// Milliseconds from the start event to now; waits for the queued work.
    pub fn elapsed_ms(&self, gpu: &Gpu) -> Result<f32> {
        // cudarc's CUDA 13 bindings call cuEventElapsedTime_v2 (driver 12.8+), and a
        // missing driver symbol would be a panic inside cudarc, so refuse first.
        if !gpu.can_time_events() {
            return Err(Error::Cuda(format!(
                "event timing needs a CUDA 12.8+ driver (this one is {}.{})",
                gpu.driver_version / 1000,
                gpu.driver_version % 1000 / 10
            )));
        }
        let end = gpu
            .stream
            .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(cuda_err("cuEventRecord"))?;
        self.start
            .elapsed_ms(&end)
            .map_err(cuda_err("cuEventElapsedTime"))
    }
}
