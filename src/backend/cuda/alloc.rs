//! Caching device allocator: size-bucketed free lists over cuMemAlloc.
//!
//! A training step allocates the same sizes every step, so after the first (warm-up)
//! step every request is served from a free list and the driver is never called inside
//! a step (cuMemAlloc/cuMemFree synchronize the device and cost tens of microseconds).
//! Requests are rounded up to a bucket (at most 1/8 over, 512 B minimum) and served
//! only by a block of exactly that bucket, which keeps the bookkeeping trivial.
//!
//! Everything runs on one stream, so a block freed while kernels that use it are still
//! queued can be handed out again at once: the next user's work is queued behind them.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

/// Where the pool gets memory from: the CUDA driver, or a fake in tests.
pub trait RawAlloc: Send + Sync {
    /// A device address of at least `bytes` bytes, 256-byte aligned.
    fn alloc(&self, bytes: usize) -> Result<u64>;
    /// Give back an address from `alloc`.
    fn free(&self, ptr: u64);
}

/// Counters for tests and logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Calls into the raw allocator (cuMemAlloc).
    pub device_allocs: u64,
    /// Calls to free (cuMemFree), from `empty_cache` or a retry after out-of-memory.
    pub device_frees: u64,
    /// Requests served from a free list.
    pub reuses: u64,
    /// Bytes held from the driver (in use + cached).
    pub reserved_bytes: usize,
    /// Bytes handed out and not yet returned (bucket sizes).
    pub in_use_bytes: usize,
    pub peak_in_use_bytes: usize,
}

#[derive(Default)]
struct State {
    free: HashMap<usize, Vec<u64>>,
    stats: PoolStats,
}

/// The allocator. Shared (`Arc`) by the device and by every live block.
pub struct Pool {
    raw: Box<dyn RawAlloc>,
    state: Mutex<State>,
}

/// The bucket a request of `bytes` is served from: 512 B granularity up to 4 KiB, then
/// eight buckets per power of two (so at most 12.5% is wasted).
pub fn bucket_size(bytes: usize) -> usize {
    const MIN: usize = 512;
    if bytes <= MIN {
        return MIN;
    }
    let pow = bytes.next_power_of_two();
    let step = (pow / 16).max(MIN);
    bytes.div_ceil(step) * step
}

impl Pool {
    pub fn new(raw: Box<dyn RawAlloc>) -> Arc<Pool> {
        Arc::new(Pool {
            raw,
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (each update is one
        // statement), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A block of at least `bytes` bytes (a zero-byte request holds no memory).
    pub fn alloc(self: &Arc<Self>, bytes: usize) -> Result<Block> {
        if bytes == 0 {
            return Ok(Block {
                ptr: 0,
                bucket: 0,
                pool: self.clone(),
            });
        }
        let bucket = bucket_size(bytes);
        {
            let mut st = self.lock();
            if let Some(ptr) = st.free.get_mut(&bucket).and_then(|v| v.pop()) {
                st.stats.reuses += 1;
                st.stats.in_use_bytes += bucket;
                st.stats.peak_in_use_bytes = st.stats.peak_in_use_bytes.max(st.stats.in_use_bytes);
                return Ok(Block {
                    ptr,
                    bucket,
                    pool: self.clone(),
                });
            }
        }
        let ptr = match self.raw.alloc(bucket) {
            Ok(p) => p,
            // Out of memory (or fragmentation): give every cached block back and retry.
            Err(_) => {
                self.empty_cache();
                self.raw.alloc(bucket).map_err(|e| {
                    Error::Cuda(format!("cannot allocate {bucket} bytes on the device: {e}"))
                })?
            }
        };
        let mut st = self.lock();
        st.stats.device_allocs += 1;
        st.stats.reserved_bytes += bucket;
        st.stats.in_use_bytes += bucket;
        st.stats.peak_in_use_bytes = st.stats.peak_in_use_bytes.max(st.stats.in_use_bytes);
        Ok(Block {
            ptr,
            bucket,
            pool: self.clone(),
        })
    }

    fn release(&self, ptr: u64, bucket: usize) {
        let mut st = self.lock();
        st.stats.in_use_bytes -= bucket;
        st.free.entry(bucket).or_default().push(ptr);
    }

    /// Return every cached (unused) block to the driver.
    pub fn empty_cache(&self) {
        let cached: Vec<(usize, Vec<u64>)> = self.lock().free.drain().collect();
        let mut freed_bytes = 0;
        let mut count = 0;
        for (bucket, ptrs) in cached {
            for p in ptrs {
                self.raw.free(p);
                freed_bytes += bucket;
                count += 1;
            }
        }
        let mut st = self.lock();
        st.stats.device_frees += count;
        st.stats.reserved_bytes -= freed_bytes;
    }

    /// Restart the peak at the bytes in use now (peak of a phase, e.g. timed steps).
    pub fn reset_peak(&self) {
        let mut st = self.lock();
        st.stats.peak_in_use_bytes = st.stats.in_use_bytes;
    }

    pub fn stats(&self) -> PoolStats {
        self.lock().stats
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Every block holds an Arc to the pool, so none is in use here.
        self.empty_cache();
    }
}

/// Raw device memory from the pool; goes back to the free list when dropped.
pub struct Block {
    ptr: u64,
    bucket: usize,
    pool: Arc<Pool>,
}

impl Block {
    /// The device address (0 for an empty block).
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    /// Usable bytes (the bucket size).
    pub fn capacity(&self) -> usize {
        self.bucket
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        if self.bucket > 0 {
            self.pool.release(self.ptr, self.bucket);
        }
    }
}

/// A typed device array of `len` elements of `T` (plain old data: bf16, f32, u32, ...).
pub struct DeviceBuffer<T> {
    block: Block,
    len: usize,
    _t: PhantomData<T>,
}

impl<T> std::fmt::Debug for DeviceBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceBuffer({} x {} at {:#x})",
            self.len,
            std::any::type_name::<T>(),
            self.block.ptr()
        )
    }
}

impl<T: bytemuck::Pod> DeviceBuffer<T> {
    pub(crate) fn new(pool: &Arc<Pool>, len: usize) -> Result<Self> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| Error::Cuda(format!("buffer of {len} elements overflows")))?;
        Ok(DeviceBuffer {
            block: pool.alloc(bytes)?,
            len,
            _t: PhantomData,
        })
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn bytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }
    /// The device address of element 0, as kernels take it (see kernels/params.h).
    pub fn ptr(&self) -> u64 {
        self.block.ptr()
    }
    /// Keep the memory, drop the type (e.g. a workspace handed to a library).
    pub(crate) fn into_block(self) -> Block {
        self.block
    }
    /// The device address of element `i` (`i <= len`).
    pub fn ptr_at(&self, i: usize) -> u64 {
        debug_assert!(i <= self.len);
        self.block.ptr() + (i * std::mem::size_of::<T>()) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hands out fake addresses, tracks bytes in use against a limit, counts frees.
    #[derive(Default)]
    struct Fake {
        st: Mutex<(u64, usize, HashMap<u64, usize>)>, // next address, bytes used, live
        limit: usize,
    }
    impl RawAlloc for Fake {
        fn alloc(&self, bytes: usize) -> Result<u64> {
            let mut st = self.st.lock().unwrap();
            if st.1 + bytes > self.limit {
                return Err(Error::Cuda("out of memory".into()));
            }
            let p = st.0 + 4096;
            st.0 = p + bytes as u64;
            st.1 += bytes;
            st.2.insert(p, bytes);
            Ok(p)
        }
        fn free(&self, ptr: u64) {
            let mut st = self.st.lock().unwrap();
            let bytes = st.2.remove(&ptr).expect("free of an address not allocated");
            st.1 -= bytes;
        }
    }
    fn pool(limit: usize) -> Arc<Pool> {
        Pool::new(Box::new(Fake {
            limit,
            ..Default::default()
        }))
    }

    #[test]
    fn buckets_round_up_by_at_most_an_eighth() {
        assert_eq!(bucket_size(1), 512);
        assert_eq!(bucket_size(512), 512);
        assert_eq!(bucket_size(513), 1024);
        assert_eq!(bucket_size(4096), 4096);
        for bytes in [
            4097usize,
            10_000,
            123_457,
            1 << 20,
            (1 << 20) + 1,
            7_000_000_001,
        ] {
            let b = bucket_size(bytes);
            assert!(b >= bytes && (b - bytes) * 8 <= bytes, "{bytes} -> {b}");
            assert_eq!(b % 512, 0);
        }
    }

    #[test]
    fn reset_peak_restarts_at_what_is_in_use() {
        let pool = pool(usize::MAX);
        let keep = DeviceBuffer::<f32>::new(&pool, 1000).unwrap();
        let big = DeviceBuffer::<f32>::new(&pool, 100_000).unwrap();
        drop(big);
        assert!(pool.stats().peak_in_use_bytes >= 400_000);
        pool.reset_peak();
        let s = pool.stats();
        assert_eq!(s.peak_in_use_bytes, s.in_use_bytes);
        assert_eq!(s.in_use_bytes, bucket_size(4000));
        drop(keep);
    }

    #[test]
    fn second_step_allocates_nothing() {
        let pool = pool(usize::MAX);
        let sizes = [4 * 1000, 2 * 4096 * 13, 17, 4 * 1000, 999_999];
        let step = |pool: &Arc<Pool>| {
            let bufs: Vec<DeviceBuffer<f32>> = sizes
                .iter()
                .map(|&n| DeviceBuffer::new(pool, n).unwrap())
                .collect();
            let ptrs: Vec<u64> = bufs.iter().map(|b| b.ptr()).collect();
            assert_eq!(
                ptrs.iter().collect::<std::collections::HashSet<_>>().len(),
                ptrs.len()
            );
            drop(bufs);
        };
        step(&pool);
        let warm = pool.stats();
        assert_eq!(warm.device_allocs, sizes.len() as u64);
        assert_eq!(warm.in_use_bytes, 0);
        for _ in 0..3 {
            step(&pool);
        }
        let after = pool.stats();
        assert_eq!(
            after.device_allocs, warm.device_allocs,
            "allocated after warm-up"
        );
        assert_eq!(after.reuses, 3 * sizes.len() as u64);
        assert_eq!(after.reserved_bytes, warm.reserved_bytes);
    }

    #[test]
    fn out_of_memory_frees_the_cache_and_retries() {
        let pool = pool(3 * 1024 * 1024);
        let a = pool.alloc(1024 * 1024).unwrap();
        let b = pool.alloc(1024 * 1024).unwrap();
        drop(a);
        drop(b);
        // 2 MiB cached; a 2 MiB request does not fit beside them, only after freeing.
        let c = pool.alloc(2 * 1024 * 1024);
        assert!(c.is_ok());
        assert_eq!(pool.stats().device_frees, 2);
        assert!(pool.alloc(64 * 1024 * 1024).is_err());
    }

    #[test]
    fn empty_buffers_hold_nothing() {
        let pool = pool(usize::MAX);
        let e = DeviceBuffer::<u32>::new(&pool, 0).unwrap();
        assert!(e.is_empty() && e.ptr() == 0);
        assert_eq!(pool.stats().device_allocs, 0);
    }
}
